//! Batches against the real PostgreSQL and, where children are involved, the real daemon.

#[rustfmt::skip]
mod common;

use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{connect, http_get, run_cli, wait_until, Daemon, TestSchema};
use forkq::queue::batch::{self, BatchInfo, CancelOutcome};
use forkq::queue::maintenance;
use forkq::{NewBatch, NewJob};
use postgres::fallible_iterator::FallibleIterator;
use serde_json::{json, Value};

fn client(schema: &TestSchema) -> forkq::Client {
    forkq::Client::new(&schema.config(&[])).expect("client")
}

fn info(schema: &TestSchema, id: i64) -> BatchInfo {
    batch::status(&mut connect(), &schema.name, id)
        .unwrap()
        .expect("batch exists")
}

/// Completion jobs of `task`, live or archived: the "exactly once" count.
fn completions(schema: &TestSchema, task: &str) -> Vec<Value> {
    connect()
        .query(
            &format!(
                "SELECT payload FROM \"{s}\".jobs WHERE task = $1
                 UNION ALL SELECT payload FROM \"{s}\".jobs_archive WHERE task = $1",
                s = schema.name
            ),
            &[&task],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn jobs(queue: &str, task: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::new(queue, task, json!({ "i": i })))
        .collect()
}

/// Ends `ids` through retire(), the path every terminal ack takes, in its own transaction.
fn retire(schema: &TestSchema, ids: &[i64], state: &str) {
    let sql = format!(
        "SELECT count(*) FROM \"{s}\".retire($1::bigint[], array_fill(NULL::bigint, ARRAY[cardinality($1)]),
             array_fill($2::text, ARRAY[cardinality($1)]), array_fill(NULL::text, ARRAY[cardinality($1)]),
             array_fill(NULL::jsonb, ARRAY[cardinality($1)]), true)",
        s = schema.name
    );
    let n: i64 = connect().query_one(&sql, &[&ids, &state]).unwrap().get(0);
    assert_eq!(n as usize, ids.len());
}

fn children(schema: &TestSchema, batch_id: i64) -> Vec<i64> {
    connect()
        .query(
            &format!(
                "SELECT id FROM \"{}\".jobs WHERE batch_id = $1 ORDER BY id",
                schema.name
            ),
            &[&batch_id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn counts(b: &BatchInfo) -> (&str, i32, i32, i32, i32, i32) {
    let s = &b.status;
    (
        s.state.as_str(),
        s.total,
        s.pending,
        s.succeeded,
        s.failed,
        s.cancelled,
    )
}

/// Runs the forkq CLI against `schema`, with `stdin` as its input.
fn forkq(schema: &TestSchema, args: &[&str], stdin: &str) -> Output {
    run_cli(schema, &[], args, stdin)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn ten_thousand_children_drained_under_a_kill_storm_complete_exactly_once() {
    let schema = TestSchema::new("bkill");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "8"),
            ("FORKQ_QUEUES", "kids"),
            ("FORKQ_RESTART_BACKOFF_BASE_MS", "5"),
            ("FORKQ_RESTART_BACKOFF_MAX_MS", "50"),
            ("FORKQ_HEALTHY_UPTIME_SECONDS", "1"),
            ("FORKQ_CRASH_LOOP_THRESHOLD", "1000"),
        ],
    );
    let spec = NewBatch::new("kids")
        .with_on_complete("kids-done")
        .with_on_complete_queue("done");
    let id = client(&schema)
        .enqueue_batch(&spec, &jobs("kids", "noop", 10_000))
        .unwrap();
    let started = Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (stop, kills, addr) = (stop.clone(), kills.clone(), daemon.addr);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                // Often enough for a few kills even when a release build drains the batch in
                // under a second.
                std::thread::sleep(Duration::from_millis(40));
                let Some((_, body)) = http_get(addr, "/livez") else {
                    continue;
                };
                let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let pids: Vec<i32> = body["slots"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .filter_map(|s| s["pid"].as_i64())
                            .filter(|p| *p > 0)
                            .map(|p| p as i32)
                            .collect()
                    })
                    .unwrap_or_default();
                if pids.is_empty() {
                    continue;
                }
                let pid = pids[fastrand::usize(..pids.len())];
                let sent = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                if sent.is_ok() {
                    kills.fetch_add(1, Ordering::AcqRel);
                }
            }
        })
    };
    let finished = wait_until(Duration::from_secs(300), || {
        info(&schema, id).status.state != "open"
    });
    stop.store(true, Ordering::Release);
    killer.join().unwrap();
    let elapsed = started.elapsed();
    assert!(
        finished,
        "the batch did not finish: {:?}",
        info(&schema, id)
    );
    let kills = kills.load(Ordering::Acquire);
    println!(
        "10k-child batch drained by 8 children in {:.1} s with {kills} SIGKILLs",
        elapsed.as_secs_f64()
    );
    assert!(kills >= 5, "the storm killed only {kills} children");

    // Let any straggling ack land before counting (there should be none: pending is 0).
    std::thread::sleep(Duration::from_millis(500));
    let b = info(&schema, id);
    assert_eq!(counts(&b), ("completed", 10_000, 0, 10_000, 0, 0));
    let archived = schema.count(&format!(
        "SELECT count(*) FROM {{s}}.jobs_archive WHERE batch_id = {id} AND state = 'completed'"
    ));
    let live = schema.count(&format!(
        "SELECT count(*) FROM {{s}}.jobs WHERE batch_id = {id}"
    ));
    assert_eq!(
        (archived, live),
        (10_000, 0),
        "counters must match the children"
    );
    let done = completions(&schema, "kids-done");
    assert_eq!(done.len(), 1, "completion job enqueued exactly once");
    assert_eq!(
        done[0],
        json!({"batch_id": id, "state": "completed", "total": 10_000, "pending": 0,
               "succeeded": 10_000, "failed": 0, "cancelled": 0})
    );
    assert!(b.completion_job_id.is_some());
    drop(daemon);
}

#[test]
fn a_failed_insert_of_the_500th_child_rolls_back_the_parent_and_the_first_499() {
    let schema = TestSchema::new("brollback");
    let nothing = |schema: &TestSchema| {
        (
            schema.count("SELECT count(*) FROM {s}.batches"),
            schema.count("SELECT count(*) FROM {s}.jobs"),
        )
    };

    // The Rust producer: only PostgreSQL knows that this run_at is not a time.
    let mut children = jobs("q", "noop", 500);
    children[499] = NewJob::new("q", "noop", json!({})).with_run_at("the day after never");
    let err = client(&schema)
        .enqueue_batch(&NewBatch::new("q").with_on_complete("done"), &children)
        .unwrap_err();
    assert!(err.to_string().contains("run_at"), "{err}");
    assert_eq!(nothing(&schema), (0, 0));

    // The SQL function: every child is its own INSERT, the 500th breaks a CHECK constraint.
    let mut array: Vec<Value> = (0..499)
        .map(|i| json!({"task": "noop", "payload": {"i": i}}))
        .collect();
    array.push(json!({"task": "noop", "max_attempts": 0}));
    let err = connect()
        .query_one(
            &format!(
                "SELECT \"{}\".enqueue_batch('q', $1, false, 'done')",
                schema.name
            ),
            &[&Value::Array(array)],
        )
        .unwrap_err();
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.code().code() == "23514"),
        "{err}"
    );
    assert_eq!(nothing(&schema), (0, 0));

    // The caller's own transaction: a failure aborts it, nothing is left after the rollback.
    let mut conn = connect();
    let mut tx = conn.transaction().unwrap();
    assert!(client(&schema)
        .enqueue_batch_in(&mut tx, &NewBatch::new("q"), &children)
        .is_err());
    drop(tx);
    assert_eq!(nothing(&schema), (0, 0));
}

#[test]
fn parent_and_children_become_visible_and_notify_only_at_commit() {
    let schema = TestSchema::new("bnotify");
    let mut listener = connect();
    listener
        .batch_execute(&format!("LISTEN \"forkq_{}\"", schema.name))
        .unwrap();
    let c = client(&schema);
    let mut conn = connect();
    let mut tx = conn.transaction().unwrap();
    let id = c
        .enqueue_batch_in(&mut tx, &NewBatch::new("q"), &jobs("q", "noop", 3))
        .unwrap();
    assert_eq!(schema.count("SELECT count(*) FROM {s}.batches"), 0);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
    let early = listener
        .notifications()
        .timeout_iter(Duration::from_millis(500))
        .next()
        .unwrap();
    assert!(early.is_none(), "notified before commit: {early:?}");
    tx.commit().unwrap();
    let late = listener
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .next()
        .unwrap();
    assert!(late.is_some(), "no notification after commit");
    assert_eq!(counts(&info(&schema, id)), ("open", 3, 3, 0, 0, 0));
    assert_eq!(children(&schema, id).len(), 3);
}

#[test]
fn fail_fast_cancels_the_rest_and_completes_once() {
    let schema = TestSchema::new("bfailfast");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_QUEUES", "ff"),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    let mut children = vec![NewJob::new("ff", "fail", json!({}))
        .with_priority(-1)
        .with_max_attempts(1)];
    children.extend((0..50).map(|i| NewJob::new("ff", "sleep", json!({"ms": 100, "i": i}))));
    let spec = NewBatch::new("ff")
        .with_fail_fast()
        .with_on_complete("ff-done")
        .with_on_complete_queue("done");
    let id = client(&schema).enqueue_batch(&spec, &children).unwrap();

    assert!(
        wait_until(Duration::from_secs(30), || info(&schema, id).status.state
            != "open"),
        "batch still open: {:?}",
        info(&schema, id)
    );
    // The completion job is there at once, while running siblings may still be pending.
    assert_eq!(completions(&schema, "ff-done").len(), 1);
    assert!(wait_until(Duration::from_secs(30), || info(&schema, id)
        .status
        .pending
        == 0));
    std::thread::sleep(Duration::from_millis(300));
    let b = info(&schema, id);
    let s = &b.status;
    assert_eq!((s.state.as_str(), s.total, s.failed), ("failed", 51, 1));
    assert_eq!(s.succeeded + s.cancelled, 50);
    assert!(s.cancelled >= 40, "only {} cancelled: {b:?}", s.cancelled);
    assert_eq!(
        schema.count(&format!(
            "SELECT count(*) FROM {{s}}.jobs_archive WHERE batch_id = {id} AND state = 'cancelled'"
        )),
        i64::from(s.cancelled)
    );
    let done = completions(&schema, "ff-done");
    assert_eq!(done.len(), 1, "completion job enqueued exactly once");
    assert_eq!(done[0]["state"], "failed");
    assert_eq!(done[0]["batch_id"], id);
    drop(daemon);
}

#[test]
fn an_empty_batch_completes_at_creation() {
    let schema = TestSchema::new("bempty");
    let id = client(&schema)
        .enqueue_batch(&NewBatch::new("q").with_on_complete("empty-done"), &[])
        .unwrap();
    let b = info(&schema, id);
    assert_eq!(counts(&b), ("completed", 0, 0, 0, 0, 0));
    assert!(b.finished_at.is_some());
    let done = completions(&schema, "empty-done");
    assert_eq!(
        done,
        vec![
            json!({"batch_id": id, "state": "completed", "total": 0, "pending": 0,
                     "succeeded": 0, "failed": 0, "cancelled": 0})
        ]
    );
    assert!(b.completion_job_id.is_some());

    let sql_id: i64 = connect()
        .query_one(
            &format!(
                "SELECT \"{}\".enqueue_batch('q', '[]', false, 'empty-done')",
                schema.name
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(counts(&info(&schema, sql_id)).0, "completed");
    assert_eq!(completions(&schema, "empty-done").len(), 2);
}

/// Claims one job of queue `q` on `conn` through the children's own round: (id, lease token).
fn claim(conn: &mut postgres::Client, schema: &TestSchema, owner: &str) -> (i64, i64) {
    let none: Vec<i64> = Vec::new();
    let results: Vec<serde_json::Value> = Vec::new();
    let token = fastrand::i64(..);
    let rows = conn
        .query(
            &forkq::queue::sql::render(
                &forkq::queue::sql::round(
                    1,
                    100,
                    forkq::queue::sql::RoundForm {
                        settle: forkq::queue::sql::Settle::Archiving,
                        promotes: false,
                        direct: false,
                    },
                ),
                &schema.name,
            ),
            &[
                &none,
                &none,
                &results,
                &true,
                &owner,
                &token,
                &30f64,
                &vec!["q"],
                &1i32,
                &0i32,
                &0i32,
            ],
        )
        .unwrap();
    let id = rows.iter().find_map(|r| r.get::<_, Option<i64>>("id"));
    (id.expect("a job to claim"), token)
}

/// Settles a claimed job as completed through the same function the children use.
fn settle_sql(schema: &TestSchema) -> String {
    format!(
        "SELECT \"{}\".settle(ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY['completed'],
                ARRAY[NULL::jsonb], ARRAY[NULL::text], ARRAY[0::float8], true)",
        schema.name
    )
}

#[test]
fn concurrent_completions_of_the_last_two_children_complete_the_batch_once() {
    let schema = TestSchema::new("blasttwo");
    let c = client(&schema);
    let spec = NewBatch::new("q")
        .with_on_complete("two-done")
        .with_on_complete_queue("done");

    // Orchestrated: A settles and holds its transaction open; B settles while A is open and is
    // seen waiting on the batch's row lock; then A commits. Both acks are in flight at once.
    let id = c.enqueue_batch(&spec, &jobs("q", "noop", 2)).unwrap();
    let (mut a, mut b) = (connect(), connect());
    let app_b = format!("b_{}", schema.name);
    b.batch_execute(&format!("SET application_name = '{app_b}'"))
        .unwrap();
    let job_a = claim(&mut a, &schema, "a");
    let job_b = claim(&mut b, &schema, "b");
    let mut tx_a = a.transaction().unwrap();
    tx_a.query_one(&settle_sql(&schema), &[&job_a.0, &job_a.1])
        .unwrap();
    let settle = settle_sql(&schema);
    let thread_b = std::thread::spawn(move || {
        let mut tx = b.transaction().unwrap();
        tx.query_one(&settle, &[&job_b.0, &job_b.1]).unwrap();
        tx.commit().unwrap();
    });
    let waiting = wait_until(Duration::from_secs(10), || {
        let n: i64 = connect()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app_b],
            )
            .unwrap()
            .get(0);
        n == 1
    });
    assert!(waiting, "B never waited on A's lock");
    assert_eq!(completions(&schema, "two-done").len(), 0);
    tx_a.commit().unwrap();
    thread_b.join().unwrap();
    assert_eq!(counts(&info(&schema, id)), ("completed", 2, 0, 2, 0, 0));
    assert_eq!(completions(&schema, "two-done").len(), 1);

    // Free-for-all: the last two acks released by a barrier, many times.
    for round in 0..20 {
        let task = format!("race-{round}");
        let id = c
            .enqueue_batch(
                &NewBatch::new("q")
                    .with_on_complete(task.as_str())
                    .with_on_complete_queue("done"),
                &jobs("q", "noop", 2),
            )
            .unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = ["x", "y"]
            .into_iter()
            .map(|owner| {
                let mut conn = connect();
                let job = claim(&mut conn, &schema, owner);
                let (barrier, settle) = (barrier.clone(), settle_sql(&schema));
                std::thread::spawn(move || {
                    let mut tx = conn.transaction().unwrap();
                    barrier.wait();
                    tx.query_one(&settle, &[&job.0, &job.1]).unwrap();
                    tx.commit().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counts(&info(&schema, id)), ("completed", 2, 0, 2, 0, 0));
        assert_eq!(completions(&schema, &task).len(), 1, "round {round}");
    }
}

#[test]
fn repair_fixes_a_parent_whose_counters_were_corrupted_by_hand() {
    let schema = TestSchema::new("brepair");
    let c = client(&schema);
    let retention = Duration::from_secs(86_400);
    let spec = NewBatch::new("q")
        .with_on_complete("fix-done")
        .with_on_complete_queue("done");
    let corrupt = |sql: &str, id: i64| {
        connect()
            .execute(
                &format!("UPDATE \"{}\".batches SET {sql} WHERE id = $1", schema.name),
                &[&id],
            )
            .unwrap();
    };
    let pass = || {
        maintenance::run_pass(
            &mut connect(),
            &schema.name,
            retention,
            Duration::ZERO,
            &mut || {},
        )
        .unwrap()
        .expect("maintenance lock free")
    };

    // An open batch with 7 of 10 children done, whose counters were overwritten.
    let open = c.enqueue_batch(&spec, &jobs("q", "noop", 10)).unwrap();
    retire(&schema, &children(&schema, open)[..7], "completed");
    corrupt("pending = 8, succeeded = 2, total = 12", open);
    // A batch whose children all ended but which is still open, without its completion job.
    let stuck = c.enqueue_batch(&spec, &jobs("q", "noop", 5)).unwrap();
    let kids = children(&schema, stuck);
    retire(&schema, &kids[..4], "completed");
    retire(&schema, &kids[4..], "failed");
    corrupt(
        "state = 'open', pending = 2, succeeded = 3, failed = 0, finished_at = NULL, completion_job_id = NULL",
        stuck,
    );
    connect()
        .execute(
            &format!(
                "DELETE FROM \"{}\".jobs WHERE task = 'fix-done'",
                schema.name
            ),
            &[],
        )
        .unwrap();
    // A healthy batch must not be touched.
    let healthy = c.enqueue_batch(&spec, &jobs("q", "noop", 3)).unwrap();

    assert_eq!(pass().batches_repaired, 2);
    assert_eq!(counts(&info(&schema, open)), ("open", 10, 3, 7, 0, 0));
    let b = info(&schema, stuck);
    assert_eq!(counts(&b), ("failed", 5, 0, 4, 1, 0));
    assert!(b.completion_job_id.is_some() && b.finished_at.is_some());
    assert_eq!(counts(&info(&schema, healthy)), ("open", 3, 3, 0, 0, 0));
    let done = completions(&schema, "fix-done");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["batch_id"], stuck);
    assert_eq!(pass().batches_repaired, 0, "a second pass finds nothing");

    // The repaired batch goes on counting correctly and completes once.
    retire(&schema, &children(&schema, open), "completed");
    assert_eq!(counts(&info(&schema, open)), ("completed", 10, 0, 10, 0, 0));
    assert_eq!(completions(&schema, "fix-done").len(), 2);

    // The daemon runs the same repair in its maintenance pass and logs it.
    let late = c.enqueue_batch(&spec, &jobs("q", "noop", 2)).unwrap();
    retire(&schema, &children(&schema, late), "completed");
    corrupt(
        "state = 'open', pending = 1, succeeded = 1, completion_job_id = NULL",
        late,
    );
    let daemon = Daemon::start(
        &schema,
        &[("FORKQ_CONCURRENCY", "1"), ("FORKQ_QUEUES", "idle")],
    );
    assert!(
        wait_until(Duration::from_secs(20), || info(&schema, late).status.state
            == "completed"),
        "the daemon did not repair batch {late}"
    );
    // The line is written once the statement that repaired the batch has returned.
    assert!(
        daemon.wait_for_log(
            &format!("batch repair: batch {late}"),
            Duration::from_secs(5)
        ),
        "log:\n{}",
        daemon.log_text()
    );
    assert_eq!(counts(&info(&schema, late)), ("completed", 2, 0, 2, 0, 0));
}

#[test]
fn retrying_a_failed_child_counts_it_as_pending_again() {
    let schema = TestSchema::new("bretry");
    let c = client(&schema);
    let id = c
        .enqueue_batch(
            &NewBatch::new("q").with_on_complete("r-done"),
            &jobs("q", "noop", 2),
        )
        .unwrap();
    let kids = children(&schema, id);
    retire(&schema, &kids[..1], "failed");
    assert_eq!(counts(&info(&schema, id)), ("open", 2, 1, 0, 1, 0));
    assert!(forkq::queue::admin::retry(&mut connect(), &schema.name, kids[0]).unwrap());
    assert_eq!(counts(&info(&schema, id)), ("open", 2, 2, 0, 0, 0));
    retire(&schema, &kids, "completed");
    assert_eq!(counts(&info(&schema, id)), ("completed", 2, 0, 2, 0, 0));
    assert_eq!(completions(&schema, "r-done").len(), 1);
}

#[test]
fn cancelling_a_batch_cancels_waiting_children_and_stops_retries_of_running_ones() {
    let schema = TestSchema::new("bcancel");
    let c = client(&schema);
    let id = c
        .enqueue_batch(
            &NewBatch::new("q").with_on_complete("c-done"),
            &jobs("q", "noop", 4),
        )
        .unwrap();
    let mut worker = connect();
    let (job, token) = claim(&mut worker, &schema, "w");
    assert_eq!(
        batch::cancel(&mut connect(), &schema.name, id, true).unwrap(),
        Some(CancelOutcome::Cancelled)
    );
    assert_eq!(counts(&info(&schema, id)), ("cancelled", 4, 1, 0, 0, 3));
    assert_eq!(completions(&schema, "c-done").len(), 1);
    // The running child asks for a retry; it is cancelled instead, and counted.
    let refused: Vec<i64> = worker
        .query_one(
            &format!(
                "SELECT \"{}\".settle(ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY['retry'],
                        ARRAY[NULL::jsonb], ARRAY['try again'], ARRAY[0::float8], true)",
                schema.name
            ),
            &[&job, &token],
        )
        .unwrap()
        .get(0);
    assert!(refused.is_empty());
    assert_eq!(counts(&info(&schema, id)), ("cancelled", 4, 0, 0, 0, 4));
    assert_eq!(completions(&schema, "c-done").len(), 1);
    assert_eq!(
        batch::cancel(&mut connect(), &schema.name, id, true).unwrap(),
        Some(CancelOutcome::AlreadyFinished("cancelled".into()))
    );
    assert_eq!(
        batch::cancel(&mut connect(), &schema.name, 987_654, true).unwrap(),
        None
    );
    assert_eq!(completions(&schema, "c-done").len(), 1);
}

#[test]
fn cli_batch_create_status_list_and_cancel() {
    let schema = TestSchema::new("bcli");
    let lines = "{\"task\":\"noop\"}\n\n{\"task\":\"sleep\",\"payload\":{\"ms\":1}}\n{\"task\":\"noop\",\"queue\":\"other\"}\n";
    let out = forkq(
        &schema,
        &[
            "batch",
            "create",
            "--queue",
            "cq",
            "--on-complete",
            "cli-done",
            "--jsonl",
            "-",
        ],
        lines,
    );
    assert!(out.status.success(), "{out:?}");
    let id: i64 = stdout(&out).parse().expect("prints the batch id");
    assert_eq!(
        schema.count(&format!(
            "SELECT count(*) FROM {{s}}.jobs WHERE batch_id = {id} AND queue = 'other'"
        )),
        1
    );

    let out = forkq(&schema, &["batch", "status", &id.to_string(), "--json"], "");
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        status,
        json!({"id": id, "state": "open", "total": 3, "pending": 3, "succeeded": 0,
               "failed": 0, "cancelled": 0})
    );
    let out = forkq(&schema, &["batch", "status", &id.to_string()], "");
    assert!(stdout(&out).contains("open"), "{out:?}");

    let empty = stdout(&forkq(
        &schema,
        &["batch", "create", "--queue", "cq", "--jsonl", "-"],
        "",
    ));
    let listed = |state: &str| -> Vec<i64> {
        let out = forkq(&schema, &["batch", "list", "--state", state, "--json"], "");
        assert!(out.status.success(), "{out:?}");
        stdout(&out)
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(listed("open"), vec![id]);
    assert_eq!(listed("completed"), vec![empty.parse::<i64>().unwrap()]);
    let table = stdout(&forkq(&schema, &["batch", "list"], ""));
    assert_eq!(table.lines().count(), 3, "{table}");

    let out = forkq(&schema, &["batch", "cancel", &id.to_string()], "");
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("cancelled"));
    assert_eq!(listed("cancelled"), vec![id]);
    assert_eq!(listed("open"), Vec::<i64>::new());
    let status: Value = serde_json::from_str(&stdout(&forkq(
        &schema,
        &["batch", "status", &id.to_string(), "--json"],
        "",
    )))
    .unwrap();
    assert_eq!(status["state"], "cancelled");
    assert_eq!(status["cancelled"], 3);
    assert_eq!(completions(&schema, "cli-done").len(), 1);

    let again = forkq(&schema, &["batch", "cancel", &id.to_string()], "");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cancelled"));
    let missing = forkq(&schema, &["batch", "status", "987654321"], "");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no batch 987654321"));
    let bad_state = forkq(&schema, &["batch", "list", "--state", "done"], "");
    assert_eq!(bad_state.status.code(), Some(2));

    // Bad input is refused before anything is written.
    let before = schema.count("SELECT count(*) FROM {s}.batches");
    let bad = forkq(
        &schema,
        &["batch", "create", "--queue", "cq", "--jsonl", "-"],
        "{\"task\":\"noop\"}\n{\"tsk\":\"noop\"}\n",
    );
    assert_eq!(bad.status.code(), Some(65), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("line 2"));
    assert_eq!(schema.count("SELECT count(*) FROM {s}.batches"), before);
}

/// Waits until `queue` has no live jobs; returns the seconds it took.
fn drain_seconds(schema: &TestSchema, queue: &str, started: Instant) -> f64 {
    let sql = format!("SELECT count(*) FROM {{s}}.jobs WHERE queue = '{queue}'");
    assert!(
        wait_until(Duration::from_secs(600), || schema.count(&sql) == 0),
        "{queue} did not drain"
    );
    started.elapsed().as_secs_f64()
}

/// Batch creation rate and the cost of counter updates on drain throughput. Numbers are printed,
/// never asserted: `cargo test --release --test batches -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_batch_creation_and_drain_overhead() {
    let schema = TestSchema::new("bbench");
    let c = client(&schema);
    let n = 100_000;
    let children = jobs("parked", "noop", n);
    let started = Instant::now();
    c.enqueue_batch(&NewBatch::new("parked"), &children)
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "create (Client::enqueue_batch): {n} children in {secs:.2} s = {:.0} children/s",
        n as f64 / secs
    );
    let array = Value::Array(
        (0..n)
            .map(|i| json!({"task": "noop", "payload": {"i": i}}))
            .collect(),
    );
    let started = Instant::now();
    connect()
        .query_one(
            &format!("SELECT \"{}\".enqueue_batch('parked', $1)", schema.name),
            &[&array],
        )
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "create (SQL enqueue_batch):     {n} children in {secs:.2} s = {:.0} children/s",
        n as f64 / secs
    );

    let drain = 20_000;
    let concurrency = std::env::var("BENCH_CONCURRENCY").unwrap_or_else(|_| "4".into());
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", concurrency.as_str()),
            ("FORKQ_QUEUES", "plain,batched"),
        ],
    );
    let plain = jobs("plain", "noop", drain);
    let started = Instant::now();
    c.enqueue_many(&plain).unwrap();
    let plain_rate = drain as f64 / drain_seconds(&schema, "plain", started);
    let batched = jobs("batched", "noop", drain);
    let started = Instant::now();
    let id = c
        .enqueue_batch(&NewBatch::new("batched"), &batched)
        .unwrap();
    let batch_rate = drain as f64 / drain_seconds(&schema, "batched", started);
    assert_eq!(
        counts(&info(&schema, id)),
        ("completed", drain as i32, 0, drain as i32, 0, 0)
    );
    println!(
        "drain {drain} noop jobs, FORKQ_CONCURRENCY={concurrency}: plain {plain_rate:.0} jobs/s, \
         batch children {batch_rate:.0} jobs/s, ratio {:.3}",
        batch_rate / plain_rate
    );
    drop(daemon);
}

/// Fail-fast marks the running siblings it can lock; one whose row a lease renewal held at that
/// moment is caught when it asks for a retry: a child of a failed batch is never sent back.
#[test]
fn a_running_sibling_missed_by_fail_fast_is_not_retried() {
    let schema = TestSchema::new("bffrace");
    let c = client(&schema);
    let id = c
        .enqueue_batch(&NewBatch::new("q").with_fail_fast(), &jobs("q", "noop", 2))
        .unwrap();
    let mut conn = connect();
    let (first, first_token) = claim(&mut conn, &schema, "w1/");
    let (second, second_token) = claim(&mut conn, &schema, "w2/");
    // A renewal of the second child's lease holds its row while the first fails for good.
    let mut renewal = connect();
    let mut tx = renewal.transaction().unwrap();
    tx.execute(
        &format!(
            "UPDATE \"{}\".jobs SET lease_expires_at = now() + interval '30 s' WHERE id = $1",
            schema.name
        ),
        &[&second],
    )
    .unwrap();
    let settle = |id: i64, token: i64, outcome: &str| {
        connect()
            .query_one(
                &format!(
                    "SELECT \"{}\".settle(ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY[$3::text],
                            ARRAY[NULL::jsonb], ARRAY['boom'::text], ARRAY[0::float8], true)",
                    schema.name
                ),
                &[&id, &token, &outcome],
            )
            .unwrap();
    };
    settle(first, first_token, "failed");
    tx.commit().unwrap();
    assert_eq!(info(&schema, id).status.state, "failed");
    // The second child's handler asks for a retry: the batch is over, so it is not sent back.
    settle(second, second_token, "retry");
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs"),
        0,
        "a child of a failed batch went back to the queue"
    );
    assert_eq!(schema.job(second).unwrap()["state"], "failed");
}
