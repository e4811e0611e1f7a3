//! Time: unique windows, debounce (replace) and periodic schedules, against the real PostgreSQL,
//! the real `forkq` binary and real daemons.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use forkq::queue::consumer::{Ack, Claimed, Consumer, Settlement};
use forkq::queue::producer::{self, Enqueued, Limits};
use forkq::NewJob;
use serde_json::{json, Value};

fn limits() -> Limits {
    Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    }
}

fn submit(schema: &TestSchema, job: &NewJob) -> Enqueued {
    producer::enqueue_with_outcome(&mut connect(), &schema.name, &limits(), job).expect("enqueue")
}

/// Acknowledges a claimed job as completed; the ack must be accepted.
fn complete(consumer: &mut Consumer, claimed: &Claimed) {
    let ack = Ack::new(claimed, Settlement::Completed(json!(null)));
    assert!(consumer
        .settle_and_claim(&[ack], 0)
        .unwrap()
        .refused
        .is_empty());
}

/// Runs `work(thread, connection)` on eight threads released together; all their results.
fn race<T: Send + 'static>(
    work: impl Fn(usize, &mut postgres::Client) -> Vec<T> + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(8));
    let work = Arc::new(work);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (barrier, work) = (barrier.clone(), work.clone());
            std::thread::spawn(move || {
                let mut client = connect();
                barrier.wait();
                work(t, &mut client)
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

// ---------------------------------------------------------------------------------------------
// Unique windows

#[test]
fn unique_window_refuses_the_key_whatever_became_of_the_first_job() {
    let schema = TestSchema::new("window");
    let job = NewJob::new("default", "noop", json!({"n": 1}))
        .with_unique_key("report-7")
        .with_unique_for(Duration::from_secs(3));
    let first = submit(&schema, &job);
    assert!(first.created && !first.replaced, "{first:?}");
    assert_eq!(
        submit(&schema, &job),
        Enqueued {
            id: first.id,
            created: false,
            replaced: false
        },
        "a live job holds the key"
    );

    // The first job completes: the window still refuses the key, and names the job.
    let mut consumer = Consumer::connect(&schema.config(&[]), "test/window/0/").unwrap();
    let claimed = consumer.settle_and_claim(&[], 1).unwrap().claimed;
    assert_eq!(claimed[0].job.id, first.id);
    complete(&mut consumer, &claimed[0]);
    assert_eq!(schema.job(first.id).unwrap()["state"], "completed");
    let again = submit(&schema, &job);
    assert_eq!((again.id, again.created), (first.id, false));
    // The SQL API agrees.
    let sql_id: i64 = schema.count(
        "SELECT {s}.enqueue('default', 'noop', unique_key => 'report-7', \
                            unique_for => interval '3 seconds')",
    );
    assert_eq!(sql_id, first.id);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);

    // Once the window has passed, the key can be taken again.
    assert!(wait_until(Duration::from_secs(10), || submit(
        &schema, &job
    )
    .created));
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
    let holder = schema.count("SELECT job_id FROM {s}.unique_windows WHERE key = 'report-7'");
    assert_ne!(holder, first.id, "the window names the new job");
}

#[test]
fn racing_producers_get_one_job_per_window() {
    let schema = TestSchema::new("windowrace");
    let name = schema.name.clone();
    let all = race(move |_, client| {
        let job = NewJob::new("default", "noop", json!({}))
            .with_unique_key("hourly")
            .with_unique_for(Duration::from_secs(3600));
        (0..20)
            .map(|_| producer::enqueue_with_outcome(client, &name, &limits(), &job).unwrap())
            .collect()
    });
    let ids: HashSet<i64> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(all.iter().filter(|e| e.created).count(), 1);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
}

// ---------------------------------------------------------------------------------------------
// Debounce (replace)

#[test]
fn replace_updates_the_waiting_job_and_a_running_one_gives_up_its_key() {
    let schema = TestSchema::new("replace");
    let job = |n: i64| {
        NewJob::new("default", "reindex", json!({"user": 7, "n": n}))
            .with_unique_key("reindex-7")
            .with_replace()
    };
    let first = submit(&schema, &job(1).with_delay(60.0));
    assert!(first.created);
    let second = submit(&schema, &job(2).with_delay(120.0));
    assert_eq!(
        second,
        Enqueued {
            id: first.id,
            created: false,
            replaced: true
        }
    );
    let row = schema.job(first.id).unwrap();
    assert_eq!(row["payload"]["n"], 2);
    assert_eq!(row["state"], "scheduled");
    let delay = schema.count(&format!(
        "SELECT extract(epoch FROM run_at - created_at)::bigint FROM {{s}}.jobs WHERE id = {}",
        first.id
    ));
    assert!((118..=122).contains(&delay), "run time moved: {delay}");

    // Due now: a worker takes it; the next replace cannot touch a running job.
    assert!(submit(&schema, &job(3)).replaced);
    let mut consumer = Consumer::connect(&schema.config(&[]), "test/replace/0/").unwrap();
    let claimed = consumer.settle_and_claim(&[], 1).unwrap().claimed;
    assert_eq!(claimed[0].job.id, first.id);
    assert_eq!(claimed[0].job.payload["n"], 3);
    let fourth = submit(&schema, &job(4));
    assert!(fourth.created && fourth.id != first.id, "{fourth:?}");
    let running = schema.job(first.id).unwrap();
    assert_eq!(running["state"], "running");
    assert_eq!(
        running["unique_key"],
        Value::Null,
        "the running job gave up the key"
    );
    assert_eq!(schema.job(fourth.id).unwrap()["unique_key"], "reindex-7");
    // And the running job's ack is unaffected.
    complete(&mut consumer, &claimed[0]);
    assert_eq!(schema.job(first.id).unwrap()["state"], "completed");

    // A job waiting for its retry takes the new payload, and runs now when told to.
    let retried = NewJob::new("other", "reindex", json!({"n": 1}))
        .with_unique_key("retry-7")
        .with_replace();
    let id = submit(&schema, &retried).id;
    let mut worker = Consumer::connect(
        &schema.config(&[("FORKQ_QUEUES", "other")]),
        "test/replace/1/",
    )
    .unwrap();
    let claimed = worker.settle_and_claim(&[], 1).unwrap().claimed;
    let retry = Settlement::Retry {
        error: Some("busy".into()),
        delay: Duration::from_secs(600),
    };
    worker
        .settle_and_claim(&[Ack::new(&claimed[0], retry)], 0)
        .unwrap();
    assert_eq!(schema.job(id).unwrap()["state"], "retryable");
    let again = NewJob {
        payload: json!({"n": 2}),
        ..retried
    };
    assert!(submit(&schema, &again).replaced);
    let claimed = worker.settle_and_claim(&[], 1).unwrap().claimed;
    assert_eq!(
        (claimed[0].job.id, &claimed[0].job.payload),
        (id, &json!({"n": 2}))
    );
}

#[test]
fn racing_replacers_leave_one_waiting_job_with_the_last_payload() {
    let schema = TestSchema::new("replacerace");
    let name = schema.name.clone();
    let all = race(move |t, client| {
        (0..20)
            .map(|n| {
                let job = NewJob::new("default", "noop", json!({"t": t, "n": n}))
                    .with_delay(60.0)
                    .with_unique_key("burst")
                    .with_replace();
                producer::enqueue_with_outcome(client, &name, &limits(), &job).unwrap()
            })
            .collect()
    });
    assert_eq!(all.iter().filter(|e| e.created).count(), 1, "{all:?}");
    assert_eq!(all.iter().filter(|e| e.replaced).count(), 159);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
    // Every thread's last replace ran after its earlier ones; the survivor is someone's last.
    let n = schema.count("SELECT (payload->>'n')::bigint FROM {s}.jobs");
    assert_eq!(n, 19);
}

#[test]
fn cli_reports_created_duplicate_and_replaced() {
    let schema = TestSchema::new("clidedup");
    let args = [
        "enqueue",
        "--task",
        "noop",
        "--unique-key",
        "k",
        "--unique-for",
        "1h",
        "--json",
    ];
    let (code, out, _) = forkq_cli(&schema, &[], &args);
    assert_eq!(code, 0);
    let first = json_of(&out);
    assert_eq!(first["created"], true);
    let (code, out, err) = forkq_cli(&schema, &[], &args);
    assert_eq!(code, 0, "a duplicate is not an error: {err}");
    assert_eq!(
        json_of(&out),
        json!({"id": first["id"], "created": false, "replaced": false})
    );
    // Without --json: the id on stdout, the verdict on stderr.
    let (code, out, err) = forkq_cli(&schema, &[], &args[..7]);
    assert_eq!((code, out.trim()), (0, first["id"].to_string().as_str()));
    assert!(
        err.contains(&format!(
            "duplicate: job {} holds unique key \"k\"",
            first["id"]
        )),
        "{err}"
    );

    let replace = |payload: &str| {
        forkq_cli(
            &schema,
            &[],
            &[
                "enqueue",
                "--task",
                "noop",
                "--delay",
                "60",
                "--unique-key",
                "r",
                "--replace",
                "--payload",
                payload,
                "--json",
            ],
        )
    };
    let made = json_of(&replace(r#"{"v":1}"#).1);
    let replaced = json_of(&replace(r#"{"v":2}"#).1);
    assert_eq!(
        replaced,
        json!({"id": made["id"], "created": false, "replaced": true})
    );

    // Bulk: counts of each.
    let lines = "{\"task\":\"noop\",\"unique_key\":\"k\",\"unique_for\":\"1h\"}\n\
                 {\"task\":\"noop\",\"unique_key\":\"w\",\"unique_for\":3600}\n\
                 {\"task\":\"noop\"}\n\
                 {\"task\":\"noop\",\"unique_key\":\"r\",\"replace\":true,\"payload\":{\"v\":3}}\n";
    let path = std::env::temp_dir().join(format!("{}.jsonl", schema.name));
    std::fs::write(&path, lines).unwrap();
    let (code, out, err) = forkq_cli(
        &schema,
        &[],
        &["enqueue", "--jsonl", path.to_str().unwrap(), "--json"],
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json_of(&out),
        json!({"created": 2, "duplicate": 1, "replaced": 1})
    );
    let id = made["id"].as_i64().unwrap();
    assert_eq!(schema.job(id).unwrap()["payload"], json!({"v": 3}));

    // Still all or nothing: a job the database refuses (February 31st) undoes the replace and
    // the window sent before it.
    let lines = "{\"task\":\"noop\",\"unique_key\":\"r\",\"replace\":true,\"payload\":{\"v\":4}}\n\
                 {\"task\":\"noop\",\"unique_key\":\"n\",\"unique_for\":60}\n\
                 {\"task\":\"noop\",\"run_at\":\"2030-02-31T09:00:00Z\"}\n";
    std::fs::write(&path, lines).unwrap();
    let (code, _, err) = forkq_cli(
        &schema,
        &[],
        &["enqueue", "--jsonl", path.to_str().unwrap()],
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("2030-02-31"), "{err}");
    assert_eq!(schema.job(id).unwrap()["payload"], json!({"v": 3}));
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.unique_windows WHERE key = 'n'"),
        0
    );

    // Bad combinations are refused before anything is enqueued.
    let (code, _, err) = forkq_cli(&schema, &[], &["enqueue", "--task", "noop", "--replace"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = forkq_cli(
        &schema,
        &[],
        &[
            "enqueue",
            "--task",
            "noop",
            "--unique-key",
            "x",
            "--unique-for",
            "soon",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a duration"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Schedules

/// The repository's example, with `every-second` on queue `ticks`.
fn example_schedules() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/schedules.toml")
        .display()
        .to_string()
}

/// Writes a schedules file for one test; removed by the caller's guard dropping the schema is not
/// needed (the target dir is scratch space).
fn schedules_file(schema: &TestSchema, tag: &str, text: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-{tag}.toml", schema.name));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The run times (seconds since the epoch) of the jobs in queue `ticks`, oldest first.
fn tick_times(schema: &TestSchema) -> Vec<i64> {
    connect()
        .query(
            &format!(
                "SELECT extract(epoch FROM run_at)::bigint FROM \"{}\".jobs \
                 WHERE queue = 'ticks' ORDER BY run_at",
                schema.name
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Asserts one job per second from the first tick to the last: no duplicate, no gap.
fn assert_one_job_per_tick(times: &[i64]) {
    let distinct: HashSet<i64> = times.iter().copied().collect();
    assert_eq!(distinct.len(), times.len(), "duplicate ticks: {times:?}");
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "a gap between ticks: {times:?}");
    }
}

fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Daemon settings for the schedule tests: one child, consuming a queue the ticks are not on, so
/// every tick's job stays in the table with its run time.
fn ticking(file: &str) -> Vec<(&str, &str)> {
    vec![
        ("FORKQ_SCHEDULES", file),
        ("FORKQ_CONCURRENCY", "1"),
        ("FORKQ_QUEUES", "default"),
    ]
}

/// Three daemons with the example schedules; returns them, once they tick, and the time then.
fn three_ticking_daemons(schema: &TestSchema) -> (Vec<Daemon>, i64) {
    let file = example_schedules();
    let daemons = (0..3)
        .map(|_| Daemon::start(schema, &ticking(&file)))
        .collect();
    assert!(wait_until(Duration::from_secs(20), || !tick_times(schema).is_empty()));
    (daemons, now_epoch())
}

/// Waits (daemons still running) until the tick at `to - 1` is in, then asserts exactly one
/// `ticks` job per second and that the seconds from `from` to `to` are covered; returns the run
/// times. A loaded machine may make a tick late, never lose it.
fn assert_every_second_between(schema: &TestSchema, from: i64, to: i64) -> Vec<i64> {
    wait_until(Duration::from_secs(30), || {
        tick_times(schema).last() >= Some(&(to - 1))
    });
    let times = tick_times(schema);
    assert_one_job_per_tick(&times);
    assert!(
        times.first().is_some_and(|&t| t <= from + 1) && times.last() >= Some(&(to - 1)),
        "every second from {from} to {to} has its job: {times:?}"
    );
    times
}

#[test]
fn three_daemons_enqueue_every_tick_exactly_once() {
    let schema = TestSchema::new("threedaemons");
    let (daemons, all_up) = three_ticking_daemons(&schema);
    std::thread::sleep(Duration::from_secs(10));
    let times = assert_every_second_between(&schema, all_up, now_epoch());
    drop(daemons);
    assert!(times.len() >= 10, "{times:?}");
}

#[test]
fn a_killed_daemon_loses_no_tick() {
    let schema = TestSchema::new("killdaemon");
    let (mut daemons, all_up) = three_ticking_daemons(&schema);
    std::thread::sleep(Duration::from_secs(4));
    // SIGKILL, as a crashed host: the probe and its ticker die with the supervisor.
    let victim = daemons.remove(0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || !process_alive(
        victim.pid()
    )));
    drop(victim);
    let killed_at = now_epoch();
    std::thread::sleep(Duration::from_secs(6));
    let times = assert_every_second_between(&schema, all_up, now_epoch());
    drop(daemons);
    assert!(
        times.iter().filter(|&&t| t > killed_at).count() >= 5,
        "the two survivors kept ticking after {killed_at}: {times:?}"
    );
}

#[test]
fn racing_daemons_enqueue_each_tick_once() {
    // The tick record alone, without daemons: eight connections fire the same hundred ticks.
    let schema = TestSchema::new("tickrace");
    let schedule = forkq::schedule::parse(
        "[race]\ncron = \"* * * * * *\"\nqueue = \"ticks\"\ntask = \"noop\"\n",
        "test",
        25,
    )
    .unwrap();
    let start = jiff::Timestamp::now();
    let held =
        forkq::queue::schedules::declare(&mut connect(), &schema.name, &schedule, start, "test")
            .unwrap();
    let revision = held[0].revision;
    let ticks: Vec<forkq::queue::schedules::Tick> = (1..=100)
        .map(|n| forkq::queue::schedules::Tick {
            name: "race".into(),
            at: start + jiff::SignedDuration::from_secs(n),
            revision,
        })
        .collect();
    let name = schema.name.clone();
    let fired = race(move |_, client| {
        // In chunks, as daemons do, so the connections interleave.
        ticks
            .chunks(5)
            .flat_map(|chunk| forkq::queue::schedules::fire(client, &name, chunk).unwrap())
            .collect()
    });
    let enqueued = fired
        .iter()
        .filter(|f| matches!(f, forkq::queue::schedules::Fired::Enqueued(_)))
        .count();
    assert_eq!(enqueued, 100);
    assert_eq!(
        schema.count("SELECT count(DISTINCT run_at) FROM {s}.jobs WHERE queue = 'ticks'"),
        100
    );
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 100);
}

#[test]
fn bad_schedules_stop_start_up_with_exit_78_naming_file_line_and_fault() {
    let schema = TestSchema::new("badschedules");
    let cases = [
        (
            "cron",
            "[a]\ntask = \"noop\"\ncron = \"0 25 * * *\"\n",
            "line 3: schedule \"a\": cron expression \"0 25 * * *\" is invalid",
        ),
        (
            "zone",
            "[a]\ncron = \"* * * * *\"\ntask = \"noop\"\ntimezone = \"Europe/Atlantis\"\n",
            "line 4: schedule \"a\": time zone \"Europe/Atlantis\" is unknown",
        ),
        (
            "toml",
            "[a]\ncron = \"* * * * *\"\ntask =\n",
            "line 3: string values must be quoted",
        ),
    ];
    for (tag, text, expected) in cases {
        let file = schedules_file(&schema, tag, text);
        let mut daemon = Daemon::spawn(&schema, &[("FORKQ_SCHEDULES", &file)]);
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(78), "{tag}");
        let log = daemon.log_text();
        assert!(
            log.contains(&format!("FORKQ_SCHEDULES=\"{file}\""))
                && log.contains(&format!("{file} {expected}")),
            "{tag}: {log}"
        );
    }
    let missing = format!("{}/nowhere.toml", env!("CARGO_TARGET_TMPDIR"));
    let mut daemon = Daemon::spawn(&schema, &[("FORKQ_SCHEDULES", &missing)]);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(78));
    assert!(
        daemon.log_text().contains("cannot read it"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn missed_ticks_are_skipped_or_caught_up_after_an_outage() {
    let schema = TestSchema::new("missed");
    let file = schedules_file(
        &schema,
        "missed",
        "[caught-up]\ncron = \"* * * * *\"\nqueue = \"ticks\"\ntask = \"noop\"\n\
         missed = \"catch-up\"\ncatch_up_limit = 3\n\n\
         [skipped]\ncron = \"* * * * *\"\nqueue = \"skips\"\ntask = \"noop\"\n",
    );
    // A first daemon declares the schedules; then every daemon is down for an hour.
    drop(Daemon::start(&schema, &ticking(&file)));
    let mut client = connect();
    client
        .batch_execute(&format!(
            "UPDATE \"{0}\".schedules SET ticks_after = now() - interval '1 hour';
             DELETE FROM \"{0}\".jobs;",
            schema.name
        ))
        .unwrap();
    let daemon = Daemon::start(&schema, &ticking(&file));
    let minutes = |queue: &str| -> Vec<i64> {
        connect()
            .query(
                &format!(
                    "SELECT extract(epoch FROM run_at)::bigint / 60 FROM \"{}\".jobs \
                     WHERE queue = $1 ORDER BY run_at",
                    schema.name
                ),
                &[&queue],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert!(wait_until(Duration::from_secs(10), || !minutes("skips").is_empty()));
    let (caught_up, skipped) = (minutes("ticks"), minutes("skips"));
    // The late tick (the latest minute, less than LATE old) for both; three missed ones before
    // it for catch-up, oldest first; none for skip.
    assert_eq!(
        caught_up.len(),
        skipped.len() + 3,
        "{caught_up:?} {skipped:?}"
    );
    assert_eq!(&caught_up[3..], &skipped[..]);
    for pair in caught_up.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "consecutive minutes: {caught_up:?}");
    }
    let log = daemon.log_text();
    assert!(
        log.contains("schedule \"skipped\": ticks between")
            && log.contains("skipped (missed = \"skip\")"),
        "{log}"
    );
    assert!(log.contains("enqueueing the 3 most recent"), "{log}");
}

#[test]
fn a_differing_file_is_reported_and_the_daemon_started_last_wins() {
    let schema = TestSchema::new("differs");
    let text = |v: &str| {
        format!(
            "[every-second]\ncron = \"* * * * * *\"\nqueue = \"ticks\"\ntask = \"noop\"\n\
             payload = {{ v = \"{v}\" }}\n"
        )
    };
    let old = schedules_file(&schema, "old", &text("old"));
    let new = schedules_file(&schema, "new", &text("new"));
    let first = Daemon::start(&schema, &ticking(&old));
    std::thread::sleep(Duration::from_secs(2));
    let second = Daemon::start(&schema, &ticking(&new));
    assert!(
        wait_until(Duration::from_secs(10), || first.log_text().contains(
            "this daemon's FORKQ_SCHEDULES differs from the definition in the database"
        )),
        "{}",
        first.log_text()
    );
    assert!(first
        .log_text()
        .contains(r#"payload: file {"v":"old"}, database {"v":"new"}"#));
    assert!(
        !second.log_text().contains("differs from the definition"),
        "{}",
        second.log_text()
    );
    std::thread::sleep(Duration::from_secs(3));
    let switched = now_epoch();
    assert!(wait_until(Duration::from_secs(30), || tick_times(&schema)
        .last()
        >= Some(&(switched + 2))));
    drop((first, second));
    assert_one_job_per_tick(&tick_times(&schema));
    let payloads = connect()
        .query(
            &format!(
                "SELECT DISTINCT payload->>'v' FROM \"{}\".jobs \
                 WHERE queue = 'ticks' AND run_at >= to_timestamp($1)",
                schema.name
            ),
            &[&(switched as f64)],
        )
        .unwrap();
    let after: Vec<String> = payloads.iter().map(|r| r.get(0)).collect();
    assert_eq!(after, ["new"], "both daemons fire the newest definition");
}

#[test]
fn schedule_run_and_list_from_the_cli() {
    let schema = TestSchema::new("schedcli");
    let env = [("FORKQ_SCHEDULES", example_schedules())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, _, err) = forkq_cli(&schema, &env, &["schedule", "run", "every-second"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no schedule \"every-second\" in the database"),
        "{err}"
    );

    // Declared as a daemon declares it.
    let config = schema.config(&env);
    forkq::queue::schedules::declare(
        &mut connect(),
        &schema.name,
        &config.schedules,
        jiff::Timestamp::now(),
        "test",
    )
    .unwrap();
    let (code, out, err) = forkq_cli(
        &schema,
        &env,
        &["schedule", "run", "every-second", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let id = json_of(&out)["id"].as_i64().unwrap();
    let job = schema.job(id).unwrap();
    assert_eq!(
        (job["queue"].as_str(), job["task"].as_str()),
        (Some("ticks"), Some("noop"))
    );

    let (code, out, err) = forkq_cli(&schema, &env, &["schedule", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = out.lines().map(json_of).collect();
    let names: Vec<&str> = listed.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["every-second", "nightly-report"]);
    assert_eq!(listed[0]["last_job_id"], id);
    assert_eq!(
        listed[0]["last_tick"],
        Value::Null,
        "a manual run is no tick"
    );
    assert!(listed[0]["next_run"].is_string());
    assert_eq!(listed[1]["definition"]["timezone"], "Europe/Berlin");
    let (code, out, _) = forkq_cli(&schema, &env, &["schedule", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("nightly-report") && out.contains("Europe/Berlin"),
        "{out}"
    );
}
