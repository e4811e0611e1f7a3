//! Flow control end to end (docs/flow-control.md): pause, fleet-wide caps, per-key caps and rate
//! limits checked from the handlers' own start and end records across two or more daemons that
//! share one schema; cancels reaching running Rust, coproc and exec handlers; snooze, progress,
//! waiting for results, and refused input.

// The shared harness keeps its own formatting (it is merged from several branches).
#[rustfmt::skip]
mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    connect, doc_block, forkq_bin, forkq_cli, run_doc_script, wait_until, Daemon, FreshSchema,
    TestSchema,
};
use forkq::queue::consumer::{Ack, Consumer, Settlement};
use forkq::queue::sql;
use forkq::NewJob;
use serde_json::{json, Value};

/// `forkq` with the schema's environment; (exit code, stdout, stderr).
fn forkq(schema: &TestSchema, args: &[&str]) -> (i32, String, String) {
    forkq_cli(schema, &[], args)
}

/// Runs `forkq` and insists it succeeds; its stdout.
fn forkq_ok(schema: &TestSchema, args: &[&str]) -> String {
    let (code, out, err) = forkq(schema, args);
    assert_eq!(code, 0, "forkq {args:?}: {out}{err}");
    out
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh directory for one test's programs and records.
fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "flow-{name}-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A coproc handler written in Python that records, in `record`, one line per event with the
/// wall-clock time: `start ID QUEUE KEY T`, `end ID T`, `cancel ID T`, `stray LINE` (a line that
/// is not a job: must never happen). A job's payload drives it: `ms` (how long it works),
/// `key` (recorded), `progress` (reports `{"n": i}` that many times while it works, then the
/// last), `snooze` and `snooze_times` (snoozes for that many seconds until it has started
/// `snooze_times` + 1 times), `ignore_cancel`. A cancel stops the work and answers a failure.
fn recording_coproc(dir: &Path, record: &Path) -> String {
    let script = dir.join("flow.py");
    std::fs::write(
        &script,
        format!(
            r#"import json, os, select, sys, time
RECORD = {record:?}
fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def note(*parts):
    os.write(fd, (" ".join(str(p) for p in parts) + "\n").encode())
def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
buf = b""
def lines(timeout):
    global buf
    ready, _, _ = select.select([0], [], [], timeout)
    if ready:
        chunk = os.read(0, 65536)
        if not chunk:
            sys.exit(0)
        buf += chunk
    out = []
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        if line.strip():
            out.append(json.loads(line))
    return out
def starts(jid):
    with open(RECORD) as f:
        return sum(1 for l in f if l.startswith("start %d " % jid))
pending = []
while True:
    if not pending:
        pending.extend(lines(None))
        continue
    job = pending.pop(0)
    if "task" not in job:
        note("stray", json.dumps(job).replace(" ", ""))
        continue
    jid = job["id"]
    p = job.get("payload") or {{}}
    note("start", jid, job["queue"], p.get("key", "-"), "%.6f" % time.time())
    if p.get("snooze_times") and starts(jid) <= p["snooze_times"]:
        note("end", jid, "%.6f" % time.time())
        reply({{"id": jid, "snooze": p["snooze"]}})
        continue
    ms = p.get("ms", 0)
    progress = p.get("progress", 0)
    deadline = time.time() + ms / 1000.0
    cancelled = False
    n = 0
    while True:
        left = deadline - time.time()
        if left <= 0:
            break
        wait = min(left, ms / 1000.0 / progress) if progress else left
        for msg in lines(wait):
            if msg.get("cancel") and msg.get("id") == jid:
                note("cancel", jid, "%.6f" % time.time())
                cancelled = not p.get("ignore_cancel")
            else:
                pending.append(msg)
        if cancelled:
            break
        if progress and n < progress:
            n += 1
            reply({{"id": jid, "progress": {{"n": n}}}})
    note("end", jid, "%.6f" % time.time())
    if cancelled:
        reply({{"id": jid, "ok": False, "error": "stopped on cancel"}})
    else:
        if progress:
            reply({{"id": jid, "progress": {{"n": progress, "done": True}}}})
        reply({{"id": jid, "ok": True, "result": {{"id": jid}}}})
"#,
            record = record.to_str().unwrap()
        ),
    )
    .unwrap();
    format!("coproc:python3 {}", script.display())
}

/// One job's run as its handler recorded it.
#[derive(Debug, Clone)]
struct Run {
    id: i64,
    queue: String,
    key: String,
    start: f64,
    end: f64,
}

/// The runs in `record` (a start without its end yet is left out), and the other events as
/// (kind, id, time).
fn runs(record: &Path) -> (Vec<Run>, Vec<(String, i64, f64)>) {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let mut open: HashMap<i64, Run> = HashMap::new();
    let mut done = Vec::new();
    let mut events = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["start", id, queue, key, t] => {
                let id = id.parse().unwrap();
                open.insert(
                    id,
                    Run {
                        id,
                        queue: queue.to_string(),
                        key: key.to_string(),
                        start: t.parse().unwrap(),
                        end: f64::INFINITY,
                    },
                );
            }
            ["end", id, t] => {
                let id: i64 = id.parse().unwrap();
                if let Some(mut run) = open.remove(&id) {
                    run.end = t.parse().unwrap();
                    done.push(run);
                }
            }
            [kind, id, t] => {
                events.push((kind.to_string(), id.parse().unwrap(), t.parse().unwrap()))
            }
            other => events.push((other.join(" "), 0, 0.0)),
        }
    }
    (done, events)
}

/// The most runs of `runs` that overlapped at any moment.
fn max_overlap<'a>(runs: impl IntoIterator<Item = &'a Run>) -> usize {
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for r in runs {
        edges.push((r.start, 1));
        edges.push((r.end, -1));
    }
    // At equal times an end comes before a start: a job that ends as another starts is not an
    // overlap.
    edges.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

/// Enqueues `jobs` in one transaction.
fn enqueue_all(schema: &TestSchema, jobs: &[NewJob]) {
    forkq::Client::new(&schema.config(&[]))
        .unwrap()
        .enqueue_many(jobs)
        .unwrap();
}

/// A job's state, live or archived.
fn state(schema: &TestSchema, id: i64) -> String {
    schema.job(id).map_or("gone".into(), |j| {
        j["state"].as_str().unwrap_or_default().to_string()
    })
}

/// Waits until job `id` is in `state`; panics with the job after `timeout`.
fn wait_state(schema: &TestSchema, id: i64, want: &str, timeout: Duration) {
    assert!(
        wait_until(timeout, || state(schema, id) == want),
        "job {id} is not {want} after {timeout:?}: {:?}",
        schema.job(id)
    );
}

fn live_jobs(schema: &TestSchema) -> i64 {
    schema.count("SELECT count(*) FROM {s}.jobs")
}

/// Pause is exact across daemons: once `forkq queue pause` returns, no job of the queue starts
/// anywhere (beyond the few already claimed at that moment), enqueues are accepted, a running job
/// finishes, /metrics says so; resume lets the jobs run.
#[test]
fn pause_and_resume_across_two_daemons() {
    let schema = TestSchema::new("fpause");
    let dir = temp_dir("pause");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_QUEUES", "p,other"),
        ("FORKQ_CONCURRENCY", "2"),
    ];
    let a = Daemon::start(&schema, &env);
    let _b = Daemon::start(&schema, &env);

    // A long job is running when the queue is paused: it finishes.
    let long = schema.enqueue("p", "work", json!({"ms": 1500}));
    wait_state(&schema, long, "running", Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&record)
            .unwrap_or_default()
            .contains(&format!("start {long} "))
    }));
    forkq_ok(&schema, &["queue", "pause", "p"]);
    let paused_at = now();
    let ids: Vec<i64> = (0..20)
        .map(|_| schema.enqueue("p", "work", json!({"ms": 1})))
        .collect();
    let other = schema.enqueue("other", "work", json!({"ms": 1}));
    wait_state(&schema, other, "completed", Duration::from_secs(20));
    wait_state(&schema, long, "completed", Duration::from_secs(20));
    // Two poll intervals and more: nothing of p started.
    std::thread::sleep(Duration::from_millis(2500));
    let (done, _) = runs(&record);
    let late: Vec<&Run> = done
        .iter()
        .filter(|r| r.queue == "p" && r.start > paused_at)
        .collect();
    assert!(late.is_empty(), "jobs of a paused queue started: {late:?}");
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'p' AND state = 'available'"),
        20
    );
    let (_, metrics) = a.get("/metrics").unwrap();
    assert!(
        metrics.contains("forkq_queue_paused{queue=\"p\"} 1"),
        "{metrics}"
    );
    let listed: Value =
        serde_json::from_str(&forkq_ok(&schema, &["queue", "list", "--json"])).unwrap();
    let p = listed["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "p")
        .unwrap()
        .clone();
    assert_eq!(
        (p["paused"].clone(), p["available"].clone()),
        (json!(true), json!(20)),
        "{p}"
    );

    forkq_ok(&schema, &["queue", "resume", "p"]);
    for id in ids {
        wait_state(&schema, id, "completed", Duration::from_secs(20));
    }
    let (_, metrics) = a.get("/metrics").unwrap();
    assert!(
        metrics.contains("forkq_queue_paused{queue=\"p\"} 0"),
        "{metrics}"
    );
}

/// A queue capped at 3 running jobs, claimed by two daemons of four children each that also run
/// a lean queue of fast jobs (so their claims grow to the prefetch): the handlers never overlap
/// more than 3 jobs of it, and do reach 3; every job runs once.
#[test]
fn max_running_is_exact_across_daemons_under_prefetch() {
    let schema = TestSchema::new("fcap");
    let dir = temp_dir("cap");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    forkq_ok(&schema, &["queue", "set", "capped", "--max-running", "3"]);
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_QUEUES", "capped,free"),
        ("FORKQ_CONCURRENCY", "4"),
    ];
    let _a = Daemon::start(&schema, &env);
    let _b = Daemon::start(&schema, &env);
    let mut jobs: Vec<NewJob> = (0..600)
        .map(|_| NewJob::new("free", "work", json!({"ms": 1})))
        .collect();
    jobs.extend((0..40).map(|_| NewJob::new("capped", "work", json!({"ms": 150}))));
    enqueue_all(&schema, &jobs);
    assert!(
        wait_until(Duration::from_secs(90), || live_jobs(&schema) == 0),
        "not drained: {} live",
        live_jobs(&schema)
    );
    let (done, events) = runs(&record);
    let capped: Vec<&Run> = done.iter().filter(|r| r.queue == "capped").collect();
    let most = max_overlap(capped.iter().copied());
    println!(
        "capped jobs: {}, most running at once: {most}",
        capped.len()
    );
    let ids: std::collections::HashSet<i64> = capped.iter().map(|r| r.id).collect();
    assert_eq!(
        (capped.len(), ids.len()),
        (40, 40),
        "each capped job runs once"
    );
    assert!(most <= 3, "{most} capped jobs ran at once");
    assert_eq!(most, 3, "the cap was never reached");
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(schema.archived("completed"), 640);
}

/// Two daemons sharing one claim turn (`FORKQ_CLAIMERS=1`), serving a lean queue before a
/// capped one, while the test holds that turn: every round finds it taken, yet claims from the
/// capped queue (a limited claim takes no turn), and those jobs run at once rather than
/// waiting, leased, for their lease to run out (120 s here). Once the turn is given back the
/// lean queue drains too, and so do more jobs of both queues, the daemons now taking the turn
/// from each other; every job runs once.
#[test]
fn claims_made_while_turns_are_scarce_all_run() {
    let schema = TestSchema::new("fscarce");
    let dir = temp_dir("scarce");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    forkq_ok(&schema, &["queue", "set", "capped", "--max-running", "2"]);
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_QUEUES", "free,capped"),
        ("FORKQ_CONCURRENCY", "2"),
        ("FORKQ_CLAIMERS", "1"),
        ("FORKQ_HOST_INTERVAL_SECONDS", "1"),
        ("FORKQ_LEASE_SECONDS", "120"),
    ];
    let a = Daemon::start(&schema, &env);
    let b = Daemon::start(&schema, &env);
    // Each counts two hosts from the other's first host row, read at its own next write; from
    // then on the database grants the one turn alone (see claim_gate::fleet).
    assert!(wait_until(Duration::from_secs(20), || {
        schema.count("SELECT count(*) FROM {s}.hosts") == 2
    }));
    std::thread::sleep(Duration::from_secs(2));
    let key = sql::claim_gate_key(&schema.name);
    let mut direct = connect();
    let mut turn = direct.transaction().unwrap();
    turn.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&key])
        .unwrap();
    let mut jobs: Vec<NewJob> = (0..100)
        .map(|_| NewJob::new("free", "work", json!({"ms": 1})))
        .collect();
    jobs.extend((0..30).map(|_| NewJob::new("capped", "work", json!({"ms": 10}))));
    enqueue_all(&schema, &jobs);
    let capped_left = || schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'capped'");
    assert!(
        wait_until(Duration::from_secs(30), || capped_left() == 0),
        "with the turn taken, {} capped jobs are left ({} running)",
        capped_left(),
        schema.count("SELECT count(*) FROM {s}.jobs WHERE state = 'running'")
    );
    println!(
        "lean jobs waiting for the turn: {}",
        schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'free'")
    );
    turn.commit().unwrap();
    // The two daemons now take the turn from each other, and a round refused it (which may have
    // claimed a capped job) is followed by a claim that queues for it and gets it.
    enqueue_all(&schema, &jobs);
    enqueue_all(&schema, &jobs);
    assert!(
        wait_until(Duration::from_secs(60), || live_jobs(&schema) == 0),
        "not drained: {} live ({} running)",
        live_jobs(&schema),
        schema.count("SELECT count(*) FROM {s}.jobs WHERE state = 'running'")
    );
    let (done, events) = runs(&record);
    assert!(events.is_empty(), "{events:?}");
    let ids: std::collections::HashSet<i64> = done.iter().map(|r| r.id).collect();
    assert_eq!((done.len(), ids.len()), (390, 390), "each job runs once");
    let missed: u64 = [&a, &b]
        .iter()
        .map(|d| {
            let (_, metrics) = d.get("/metrics").expect("metrics");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("forkq_claim_turns_missed_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("forkq_claim_turns_missed_total")
        })
        .sum();
    println!("claim rounds that found no turn: {missed}");
    assert!(
        missed > 0,
        "no round found the turn taken: the gate was not tested"
    );
}

/// A per-key cap of 1: jobs of one key never overlap, while different keys run side by side; a
/// burst of one key enqueued first does not hold back another key's jobs enqueued after it.
#[test]
fn per_key_cap_holds_and_one_key_cannot_take_the_fleet() {
    let schema = TestSchema::new("fkey");
    let dir = temp_dir("key");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    forkq_ok(&schema, &["queue", "set", "keyed", "--per-key", "1"]);
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_QUEUES", "keyed"),
        ("FORKQ_CONCURRENCY", "3"),
    ];
    let _a = Daemon::start(&schema, &env);
    let _b = Daemon::start(&schema, &env);
    let job = |key: &str| {
        NewJob::new("keyed", "work", json!({"ms": 100, "key": key})).with_concurrency_key(key)
    };
    // 60 jobs of key a first (more than the per-key claim's first look), then b and c.
    let mut jobs: Vec<NewJob> = (0..60).map(|_| job("a")).collect();
    jobs.extend((0..5).map(|_| job("b")));
    jobs.extend((0..5).map(|_| job("c")));
    enqueue_all(&schema, &jobs);
    assert!(
        wait_until(Duration::from_secs(60), || schema.count(
            "SELECT count(*) FROM {s}.jobs WHERE concurrency_key IN ('b', 'c')"
        ) == 0),
        "keys b and c waited behind a"
    );
    let a_left = schema.count("SELECT count(*) FROM {s}.jobs WHERE concurrency_key = 'a'");
    println!("jobs of key a still waiting when b and c were done: {a_left}");
    assert!(a_left > 0, "b and c should not have waited for a's burst");
    assert!(wait_until(Duration::from_secs(60), || live_jobs(&schema) == 0));
    let (done, events) = runs(&record);
    assert!(events.is_empty(), "{events:?}");
    for key in ["a", "b", "c"] {
        let most = max_overlap(done.iter().filter(|r| r.key == key));
        assert_eq!(most, 1, "key {key}: {most} ran at once");
    }
    let most = max_overlap(&done);
    assert!(most >= 2, "different keys never ran side by side");
    assert_eq!(done.len(), 70);
}

/// A rate of 10/s with a burst of 2, claimed by two daemons: the starts in any window of 1, 2 or
/// 3 seconds stay within burst + rate × window (one more for the claim-to-start jitter at the
/// window's edges), and the rate is used, not undershot by much. The coprocs are warmed up first:
/// the first job of a program still starting starts later than its claim (see the docs).
#[test]
fn rate_limit_holds_over_every_window() {
    let schema = TestSchema::new("frate");
    let dir = temp_dir("rate");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    forkq_ok(
        &schema,
        &["queue", "set", "rated", "--rate", "10/s", "--burst", "2"],
    );
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_QUEUES", "rated,warm"),
        ("FORKQ_CONCURRENCY", "3"),
    ];
    let _a = Daemon::start(&schema, &env);
    let _b = Daemon::start(&schema, &env);
    enqueue_all(
        &schema,
        &(0..120)
            .map(|_| NewJob::new("warm", "work", json!({"ms": 20})))
            .collect::<Vec<_>>(),
    );
    assert!(wait_until(Duration::from_secs(60), || live_jobs(&schema) == 0));
    let n = 50;
    enqueue_all(
        &schema,
        &(0..n)
            .map(|_| NewJob::new("rated", "work", json!({"ms": 1})))
            .collect::<Vec<_>>(),
    );
    assert!(wait_until(Duration::from_secs(60), || live_jobs(&schema) == 0));
    let (done, _) = runs(&record);
    let mut starts: Vec<f64> = done
        .iter()
        .filter(|r| r.queue == "rated")
        .map(|r| r.start)
        .collect();
    starts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(starts.len(), n);
    for window in [1.0, 2.0, 3.0] {
        let most = (0..starts.len())
            .map(|i| {
                starts[i..]
                    .iter()
                    .take_while(|&&t| t < starts[i] + window)
                    .count()
            })
            .max()
            .unwrap();
        let allowed = 2.0 + 10.0 * window;
        println!("window {window} s: at most {most} starts (allowed {allowed})");
        assert!(most as f64 <= allowed + 1.0, "{most} starts in {window} s");
    }
    let span = starts[n - 1] - starts[0];
    let rate = (n - 1) as f64 / span;
    println!("{n} starts over {span:.2} s: {rate:.1}/s");
    assert!(rate > 5.0, "the rate limit undershoots: {rate:.1}/s");
}

/// Strict queue order across lean and limited queues, at the level of one consumer: a lean queue
/// before a limited one is drained first, the limited one gives one job per claim up to its cap,
/// then the lean queue after it is served.
#[test]
fn queue_order_holds_across_lean_and_limited_queues() {
    let schema = TestSchema::new("forder");
    forkq_ok(&schema, &["queue", "set", "b", "--max-running", "1"]);
    for q in ["a", "b", "c"] {
        schema.enqueue_n(q, "noop", json!({}), 3);
    }
    let mut c = Consumer::connect(&schema.config(&[("FORKQ_QUEUES", "a,b,c")]), "w/").unwrap();
    let queues = |claimed: &[forkq::queue::consumer::Claimed]| -> Vec<String> {
        claimed.iter().map(|c| c.job.queue.to_string()).collect()
    };
    let first = c.settle_and_claim(&[], 10).unwrap().claimed;
    assert_eq!(queues(&first), ["a", "a", "a"]);
    let acks: Vec<Ack> = first
        .iter()
        .map(|cl| Ack::new(cl, Settlement::Completed(Value::Null)))
        .collect();
    let second = c.settle_and_claim(&acks, 10).unwrap().claimed;
    assert_eq!(
        queues(&second),
        ["b"],
        "one job of a limited queue per claim"
    );
    // b is at its cap: c is next.
    let third = c.settle_and_claim(&[], 10).unwrap().claimed;
    assert_eq!(queues(&third), ["c", "c", "c"]);
    // A claim ahead (while a job runs) never takes a limited queue's job.
    let ack = Ack::new(&second[0], Settlement::Completed(Value::Null));
    assert!(c
        .settle_and_claim_ahead(&[ack], 10)
        .unwrap()
        .claimed
        .is_empty());
    assert_eq!(queues(&c.settle_and_claim(&[], 10).unwrap().claimed), ["b"]);
}

/// A cap set while jobs of the queue run (claimed by the lean round) counts them at once: the
/// limited claim does not start more.
#[test]
fn a_new_cap_counts_the_jobs_already_running() {
    let schema = TestSchema::new("fadopt");
    schema.enqueue_n("q", "noop", json!({}), 5);
    let config = schema.config(&[("FORKQ_QUEUES", "q")]);
    let mut lean = Consumer::connect(&config, "lean/").unwrap();
    assert_eq!(lean.settle_and_claim(&[], 2).unwrap().claimed.len(), 2);
    forkq_ok(&schema, &["queue", "set", "q", "--max-running", "2"]);
    let mut limited = Consumer::connect(&config, "limited/").unwrap();
    assert!(limited.settle_and_claim(&[], 5).unwrap().claimed.is_empty());
    // The lean worker learns of the cap at its next round (the changes count moved).
    let round = lean.settle_and_claim(&[], 5).unwrap();
    assert!(
        round.claimed.is_empty(),
        "the lean round claimed a capped queue"
    );
    assert_eq!(
        lean.refresh_flow().unwrap().limited,
        ["q".to_string()].into()
    );
}

/// The builtin `sleep` task (a Rust handler): `forkq cancel` ends it `cancelled` within about a
/// heartbeat through the wake-up listener, and through the lease renewal without it; never
/// retried.
#[test]
fn cancel_reaches_a_running_rust_handler() {
    for (listen, lease) in [("1", "30"), ("0", "4")] {
        let schema = TestSchema::new("fcancelrs");
        let _d = Daemon::start(
            &schema,
            &[
                ("FORKQ_LISTEN", listen),
                ("FORKQ_LEASE_SECONDS", lease),
                ("FORKQ_POLL_INTERVAL_MS", "200"),
            ],
        );
        let id = schema.enqueue("default", "sleep", json!({"ms": 60_000}));
        wait_state(&schema, id, "running", Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        let (code, out, _) = forkq(&schema, &["cancel", &id.to_string()]);
        assert_eq!(code, 0, "{out}");
        wait_state(&schema, id, "cancelled", Duration::from_secs(15));
        let took = asked.elapsed();
        println!("FORKQ_LISTEN={listen}, lease {lease} s: cancelled in {took:.2?}");
        // The renewal runs every third of the lease: 1.3 s here without LISTEN.
        let bound = if listen == "1" { 2.0 } else { 4.0 };
        assert!(took.as_secs_f64() < bound, "cancel took {took:?}");
        let job = schema.job(id).unwrap();
        assert_eq!(job["attempt"], 1, "{job}");
    }
}

/// A coproc job is sent `{"id", "cancel": true}` and stops; one that ignores it is stopped after
/// the grace. Both end cancelled, and the next job runs on a fresh program that never sees a
/// stray cancel line.
#[test]
fn cancel_reaches_a_running_coproc() {
    let schema = TestSchema::new("fcancelco");
    let dir = temp_dir("cancelco");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    let _d = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", handler.as_str()),
            ("FORKQ_CONCURRENCY", "1"),
            ("FORKQ_CANCEL_GRACE_SECONDS", "1"),
        ],
    );
    for ignore in [false, true] {
        let id = schema.enqueue(
            "default",
            "work",
            json!({"ms": 60_000, "ignore_cancel": ignore}),
        );
        wait_state(&schema, id, "running", Duration::from_secs(20));
        assert!(wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&record)
                .unwrap_or_default()
                .contains(&format!("start {id} "))
        }));
        let asked = Instant::now();
        forkq_ok(&schema, &["cancel", &id.to_string()]);
        wait_state(&schema, id, "cancelled", Duration::from_secs(15));
        let took = asked.elapsed();
        println!("coproc ignoring the cancel: {ignore}; cancelled in {took:.2?}");
        let told = std::fs::read_to_string(&record)
            .unwrap()
            .contains(&format!("cancel {id} "));
        assert!(told, "the program was not sent the cancel");
        let bound = if ignore { 4.0 } else { 2.0 };
        assert!(took.as_secs_f64() < bound, "cancel took {took:?}");
        let next = schema.enqueue("default", "work", json!({"ms": 1}));
        wait_state(&schema, next, "completed", Duration::from_secs(20));
    }
    let (_, events) = runs(&record);
    assert!(
        events.iter().all(|(kind, _, _)| kind == "cancel"),
        "{events:?}"
    );
}

/// An exec job's process group gets SIGTERM; one that ignores it gets SIGKILL after the grace.
/// Both end cancelled, not retried.
#[test]
fn cancel_reaches_a_running_exec_program() {
    let schema = TestSchema::new("fcancelex");
    let dir = temp_dir("cancelex");
    let record = dir.join("record");
    let script = dir.join("work.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nREC={rec}\necho \"start $FORKQ_JOB_ID\" >> $REC\n\
             if [ \"$FORKQ_TASK\" = stubborn ]; then trap '' TERM; else \
             trap 'echo \"term $FORKQ_JOB_ID\" >> $REC; exit 143' TERM; fi\n\
             sleep 60 & wait\n",
            rec = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let handler = format!("exec:{}", script.display());
    let _d = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", handler.as_str()),
            ("FORKQ_CONCURRENCY", "1"),
            ("FORKQ_CANCEL_GRACE_SECONDS", "1"),
        ],
    );
    for task in ["polite", "stubborn"] {
        let id = schema.enqueue("default", task, json!({}));
        assert!(wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&record)
                .unwrap_or_default()
                .contains(&format!("start {id}\n"))
        }));
        std::thread::sleep(Duration::from_millis(200));
        let asked = Instant::now();
        forkq_ok(&schema, &["cancel", &id.to_string()]);
        wait_state(&schema, id, "cancelled", Duration::from_secs(15));
        let took = asked.elapsed();
        println!("exec task {task}: cancelled in {took:.2?}");
        let termed = std::fs::read_to_string(&record)
            .unwrap()
            .contains(&format!("term {id}\n"));
        assert_eq!(termed, task == "polite");
        let bound = if task == "stubborn" { 4.0 } else { 2.0 };
        assert!(took.as_secs_f64() < bound, "cancel took {took:?}");
        assert_eq!(schema.job(id).unwrap()["attempt"], 1);
    }
}

/// A snoozing job runs again after its delay without being charged an attempt: from a coproc
/// (`{"snooze": s}`) and from an exec program (exit 79, the delay on stdout).
#[test]
fn snooze_runs_again_later_uncharged() {
    let schema = TestSchema::new("fsnooze");
    let dir = temp_dir("snooze");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    let script = dir.join("snooze.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ ! -e {m} ]; then touch {m}; echo 0.5; exit 79; fi\necho '\"woke\"'\n",
            m = dir.join("marker").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let routes = format!("snoozer=exec:{}", script.display());
    let _d = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", handler.as_str()),
            ("FORKQ_ROUTES", routes.as_str()),
            ("FORKQ_POLL_INTERVAL_MS", "100"),
        ],
    );
    let id = forkq::Client::new(&schema.config(&[]))
        .unwrap()
        .enqueue(
            &NewJob::new("default", "work", json!({"snooze": 0.4, "snooze_times": 2}))
                .with_max_attempts(1),
        )
        .unwrap();
    let exec = forkq::Client::new(&schema.config(&[]))
        .unwrap()
        .enqueue(&NewJob::new("default", "snoozer", json!({})).with_max_attempts(1))
        .unwrap();
    wait_state(&schema, id, "completed", Duration::from_secs(30));
    wait_state(&schema, exec, "completed", Duration::from_secs(30));
    let text = std::fs::read_to_string(&record).unwrap();
    let starts: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("start {id} ")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 3, "{text}");
    for pair in starts.windows(2) {
        assert!(
            pair[1] - pair[0] >= 0.4,
            "snoozed only {:.3} s",
            pair[1] - pair[0]
        );
    }
    for job in [id, exec] {
        let row = schema.job(job).unwrap();
        assert_eq!(
            (row["attempt"].clone(), row["last_error"].clone()),
            (json!(1), Value::Null),
            "{row}"
        );
    }
    assert_eq!(schema.job(exec).unwrap()["result"], "woke");
}

/// Progress from a coproc shows in `forkq job ID` with when it was reported, is written at most
/// about once a second however often the handler reports, and the last value is kept. An exec
/// program reports through FORKQ_PROGRESS_FILE.
#[test]
fn progress_is_shown_and_rate_limited() {
    let schema = TestSchema::new("fprogress");
    let dir = temp_dir("progress");
    let record = dir.join("record");
    let handler = recording_coproc(&dir, &record);
    let script = dir.join("progress.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nfor i in 1 2 3; do echo \"{\\\"step\\\": $i}\" >> \"$FORKQ_PROGRESS_FILE\"; sleep 0.3; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let routes = format!("steps=exec:{}", script.display());
    let _d = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", handler.as_str()),
            ("FORKQ_ROUTES", routes.as_str()),
        ],
    );
    // 100 reports over 3 s.
    let id = schema.enqueue("default", "work", json!({"ms": 3000, "progress": 100}));
    let mut seen: Vec<(String, Value)> = Vec::new();
    let mut db = schema.client();
    let read = format!(
        "SELECT reported_at::text, progress FROM \"{}\".job_progress WHERE job_id = $1",
        schema.name
    );
    wait_until(Duration::from_secs(30), || {
        if let Some(row) = db.query_opt(&read, &[&id]).unwrap() {
            let at: String = row.get(0);
            if seen.last().map_or(true, |(last, _)| *last != at) {
                seen.push((at, row.get(1)));
            }
        }
        state(&schema, id) == "completed"
    });
    wait_state(&schema, id, "completed", Duration::from_secs(5));
    let shown: Value =
        serde_json::from_str(&forkq_ok(&schema, &["job", &id.to_string(), "--json"])).unwrap();
    println!("progress writes seen: {}; last shown: {shown}", seen.len());
    assert_eq!(
        shown["progress"],
        json!({"n": 100, "done": true}),
        "{shown}"
    );
    assert!(shown["progress_at"].is_string(), "{shown}");
    assert!(
        (2..=6).contains(&seen.len()),
        "{} progress writes for 100 reports over 3 s: {seen:?}",
        seen.len()
    );

    let steps = schema.enqueue("default", "steps", json!({}));
    wait_state(&schema, steps, "completed", Duration::from_secs(30));
    assert_eq!(schema.job(steps).unwrap()["progress"], json!({"step": 3}));
}

/// `forkq enqueue --wait` prints the result and exits 0 when the job completes, 4 when it fails
/// for good, 5 when it is cancelled, 124 when the wait times out; `Client::wait` says the same.
#[test]
fn enqueue_wait_exit_codes() {
    let schema = TestSchema::new("fwait");
    let _d = Daemon::start(&schema, &[]);
    let (code, out, err) = forkq(&schema, &["enqueue", "--task", "noop", "--wait"]);
    assert_eq!((code, out.trim()), (0, "null"), "{err}");
    let (code, _, err) = forkq(
        &schema,
        &["enqueue", "--task", "fail", "--max-attempts", "1", "--wait"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("failed"), "{err}");
    let (code, _, err) = forkq(
        &schema,
        &[
            "enqueue",
            "--task",
            "sleep",
            "--payload",
            "{\"ms\": 5000}",
            "--wait",
            "--wait-timeout",
            "0.5",
        ],
    );
    assert_eq!(code, 124, "{err}");

    let waiter = std::thread::spawn({
        let env = schema.env();
        move || {
            Command::new(forkq_bin())
                .args([
                    "enqueue",
                    "--task",
                    "sleep",
                    "--payload",
                    "{\"ms\": 60000}",
                    "--wait",
                ])
                .env_clear()
                .envs(env)
                .output()
                .unwrap()
        }
    });
    let mut db = schema.client();
    let newest = format!(
        "SELECT max(id) FROM \"{}\".jobs WHERE task = 'sleep' AND payload->>'ms' = '60000'",
        schema.name
    );
    let mut id: Option<i64> = None;
    assert!(wait_until(Duration::from_secs(20), || {
        id = db.query_one(&newest, &[]).unwrap().get(0);
        id.is_some_and(|id| state(&schema, id) == "running")
    }));
    forkq_ok(&schema, &["cancel", &id.unwrap().to_string()]);
    let out = waiter.join().unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    let client = forkq::Client::new(&schema.config(&[])).unwrap();
    let id = client
        .enqueue(&NewJob::new("default", "sleep", json!({"ms": 100})))
        .unwrap();
    assert_eq!(
        client.wait(id, Duration::from_secs(20)).unwrap(),
        Some(forkq::queue::waiting::Finished::Completed {
            result: Value::Null
        })
    );
    let slow = client
        .enqueue(&NewJob::new("default", "sleep", json!({"ms": 3000})))
        .unwrap();
    assert_eq!(client.wait(slow, Duration::from_millis(200)).unwrap(), None);
}

/// Bad settings exit 65 naming what is wrong, and change nothing (not even the good flags of the
/// same call); from SQL too. Bad per-job options are refused at enqueue.
#[test]
fn bad_queue_settings_exit_65_and_change_nothing() {
    let schema = TestSchema::new("fbad");
    forkq_ok(&schema, &["queue", "set", "q", "--max-running", "3"]);
    let settings = || -> Value {
        let listed: Value =
            serde_json::from_str(&forkq_ok(&schema, &["queue", "list", "--json"])).unwrap();
        listed["queues"][0].clone()
    };
    let before = settings();
    for (args, says) in [
        (vec!["--max-running", "-1"], "--max-running"),
        (vec!["--max-running", "5", "--rate", "0/s"], "--rate"),
        (vec!["--per-key", "0"], "--per-key"),
        (vec!["--rate", "fast"], "--rate"),
        (vec!["--rate", "10/s", "--burst", "0"], "--burst"),
    ] {
        let mut all = vec!["queue", "set", "q"];
        all.extend(args.iter());
        let (code, _, err) = forkq(&schema, &all);
        assert_eq!(code, 65, "{args:?}: {err}");
        assert!(
            err.contains(says) && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(settings(), before, "{args:?} changed something");
    }
    // From SQL, all or nothing as well.
    let sql = format!(
        "SELECT \"{}\".queue_set('q', '{{\"max_running\": 5, \"rate\": 0}}')",
        schema.name
    );
    let err = schema.client().query_one(&sql, &[]).unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("rate"), "{message}");
    assert_eq!(settings(), before);
    let (code, _, err) = forkq(
        &schema,
        &["queue", "set", "bad queue", "--max-running", "1"],
    );
    assert_eq!(code, 65, "{err}");
    let (code, _, _) = forkq(&schema, &["queue", "set", "q"]);
    assert_eq!(code, 2, "no setting is a usage error");
    for args in [
        vec!["--timeout", "-1"],
        vec!["--timeout", "0"],
        vec!["--backoff", "-5"],
        vec!["--concurrency-key", ""],
    ] {
        let mut all = vec!["enqueue", "--task", "noop"];
        all.extend(args.iter());
        let (code, _, err) = forkq(&schema, &all);
        assert_eq!(code, 65, "{args:?}: {err}");
    }
    assert_eq!(live_jobs(&schema), 0);
}

/// Per-job overrides travel with the job: a timeout shorter than the fleet's stops it, a backoff
/// sets its retry delay, and a dead-lettered job keeps both (and its key) when retried.
#[test]
fn per_job_timeout_and_backoff_apply() {
    let schema = TestSchema::new("foverride");
    let _d = Daemon::start(&schema, &[("FORKQ_RETRY_BACKOFF_BASE_SECONDS", "1")]);
    let out = forkq_ok(
        &schema,
        &[
            "enqueue",
            "--task",
            "sleep",
            "--payload",
            "{\"ms\": 30000}",
            "--timeout",
            "1",
            "--max-attempts",
            "1",
            "--concurrency-key",
            "k1",
        ],
    );
    let id: i64 = out.trim().parse().unwrap();
    let started = Instant::now();
    wait_state(&schema, id, "failed", Duration::from_secs(20));
    println!(
        "a 30 s job with --timeout 1 failed after {:.2?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let job = schema.job(id).unwrap();
    assert_eq!(
        (
            job["timeout_seconds"].as_f64(),
            job["concurrency_key"].clone()
        ),
        (Some(1.0), json!("k1")),
        "{job}"
    );
    assert!(forkq::queue::admin::retry(&mut schema.client(), &schema.name, id).unwrap());
    let job = schema.job(id).unwrap();
    assert_eq!(job["concurrency_key"], "k1", "{job}");

    let out = forkq_ok(
        &schema,
        &[
            "enqueue",
            "--task",
            "fail",
            "--backoff",
            "600",
            "--max-attempts",
            "3",
        ],
    );
    let id: i64 = out.trim().parse().unwrap();
    wait_state(&schema, id, "retryable", Duration::from_secs(20));
    let wait: f64 = schema
        .client()
        .query_one(
            &format!(
                "SELECT extract(epoch FROM run_at - now())::float8 FROM \"{}\".jobs WHERE id = $1",
                schema.name
            ),
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(
        (400.0..=800.0).contains(&wait),
        "retry in {wait:.0} s, not about 600"
    );
}

/// The "Try it" block of docs/flow-control.md runs as written with bash on a fresh schema, in a
/// directory where `target/release/forkq` is the binary under test.
#[test]
fn the_flow_control_walkthrough_runs_as_written() {
    let block = doc_block(include_str!("../docs/flow-control.md"), "Try it");
    let schema = FreshSchema::new("flowdoc");
    let run = run_doc_script("flowdoc", &block, &schema.0, Duration::from_secs(60));
    let log = std::fs::read_to_string(run.dir.join("forkq.log")).unwrap_or_default();
    let printed = &run.printed;
    assert!(
        run.status.is_some_and(|s| s.success()),
        "the walkthrough failed ({:?}):\n{printed}\n---- forkq.log ----\n{log}",
        run.status
    );
    for expected in [
        "refused with exit 65, nothing changed",
        "exit 124",
        "\"state\": \"cancelled\"",
    ] {
        assert!(
            printed.contains(expected),
            "{expected:?} missing:\n{printed}"
        );
    }
}
