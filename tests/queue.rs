//! The queue core against the real PostgreSQL: every test in its own schema.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use forkq::queue::consumer::{Ack, Claimed, Consumer, Round, Settlement};
use forkq::queue::producer::{self, Limits};
use forkq::queue::sql::{self, render};
use forkq::queue::{admin, maintenance, migrations, QueueError};
use forkq::NewJob;
use postgres::fallible_iterator::FallibleIterator;
use serde_json::{json, Value};

fn limits() -> Limits {
    Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    }
}

fn consumer(schema: &TestSchema, owner: &str, extra: &[(&str, &str)]) -> Consumer {
    Consumer::connect(&schema.config(extra), owner).expect("consumer connects")
}

fn enqueue(schema: &TestSchema, job: NewJob) -> i64 {
    producer::enqueue(&mut connect(), &schema.name, &limits(), &job).expect("enqueue")
}

/// Claims as a child does: a round that found due scheduled jobs (and claimed nothing) is
/// followed by the one that makes them claimable, and that one by another.
fn claim(c: &mut Consumer, limit: usize) -> Vec<Claimed> {
    let mut round = c.settle_and_claim(&[], limit).expect("claim");
    for _ in 0..2 {
        if !round.claimed.is_empty() || (round.promoted == 0 && !round.due) {
            break;
        }
        round = c.settle_and_claim(&[], limit).expect("claim");
    }
    round.claimed
}

fn settle(c: &mut Consumer, id: i64, token: i64, settlement: Settlement) -> Round {
    let ack = Ack {
        id,
        lease_token: token,
        batch_id: None,
        settlement,
    };
    c.settle_and_claim(&[ack], 0).expect("settle")
}

fn done() -> Settlement {
    Settlement::Completed(json!({"ok": true}))
}

/// A float from SQL with `{s}` for the schema.
fn float(schema: &TestSchema, query: &str) -> f64 {
    let query = query.replace("{s}", &format!("\"{}\"", schema.name));
    connect().query_one(&query, &[]).unwrap().get(0)
}

fn exec(schema: &TestSchema, statement: &str) {
    let statement = statement.replace("{s}", &format!("\"{}\"", schema.name));
    connect().batch_execute(&statement).unwrap();
}

#[test]
fn enqueue_claim_ack_round_trip() {
    let schema = TestSchema::new("roundtrip");
    let id = enqueue(&schema, NewJob::new("default", "noop", json!({"n": 7})));
    assert_eq!(schema.live("available"), 1);

    let mut c = consumer(&schema, "w1", &[]);
    let claimed = claim(&mut c, 10);
    assert_eq!(claimed.len(), 1);
    let job = &claimed[0].job;
    assert_eq!((job.id, &*job.task, &*job.queue), (id, "noop", "default"));
    assert_eq!(job.payload, json!({"n": 7}));
    assert_eq!((job.attempt, job.max_attempts), (1, 25));
    let row = schema.job(id).unwrap();
    assert_eq!(row["state"], "running");
    assert_eq!(row["lease_owner"], "w1");
    assert!(
        row.get("lease_token").is_none(),
        "the token is never shown: {row}"
    );

    assert!(
        claim(&mut c, 10).is_empty(),
        "a running job is not claimed twice"
    );
    let round = settle(&mut c, id, claimed[0].lease_token, done());
    assert!(round.refused.is_empty());
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
    let row = schema.job(id).unwrap();
    assert_eq!(row["state"], "completed");
    assert_eq!(row["result"], json!({"ok": true}));
    assert_eq!(row["attempt"], 1);
}

/// The database's claim gate (more hosts than claim turns): with every turn taken a round
/// claims nothing and says so; a claim queued for a turn gives up empty-handed after
/// `TURN_WAIT` with its transaction rolled back, and one that is waiting when the turn is given
/// back takes it and claims.
#[test]
fn a_refused_round_queues_in_the_database_for_a_claim_turn() {
    let schema = TestSchema::new("turns");
    for _ in 0..3 {
        enqueue(&schema, NewJob::new("default", "noop", json!({})));
    }
    let mut c = consumer(&schema, "w", &[]);
    c.set_claim_turns(1);
    let key = sql::claim_gate_key(&schema.name);
    let (held_tx, held) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut db = connect();
        let mut tx = db.transaction().unwrap();
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&key])
            .unwrap();
        held_tx.send(()).unwrap();
        release_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        // Given back while the claim below waits (it waits up to TURN_WAIT).
        std::thread::sleep(sql::TURN_WAIT / 4);
        let released = Instant::now();
        tx.commit().unwrap();
        released
    });
    held.recv_timeout(Duration::from_secs(10)).unwrap();
    let refused = c.settle_and_claim(&[], 10).unwrap();
    assert!(refused.no_turn && refused.claimed.is_empty());
    let started = Instant::now();
    let gave_up = c.claim_in_turn(10).unwrap();
    assert!(gave_up.no_turn && gave_up.claimed.is_empty());
    assert!(
        started.elapsed() >= sql::TURN_WAIT,
        "{:?}",
        started.elapsed()
    );
    release.send(()).unwrap();
    let asked = Instant::now();
    let claimed = c.claim_in_turn(10).unwrap().claimed;
    let claimed_at = Instant::now();
    let released = holder.join().unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(
        asked < released && released < claimed_at,
        "the claim did not wait for the turn to be given back"
    );
    // The claims committed: the jobs are running under this consumer's name.
    assert_eq!(
        float(
            &schema,
            "SELECT count(*)::float8 FROM {s}.jobs WHERE state = 'running' AND lease_owner = 'w'"
        ),
        3.0
    );
}

#[test]
fn concurrent_claimers_never_share_a_job() {
    const JOBS: usize = 10_000;
    let schema = TestSchema::new("concurrent");
    schema.enqueue_n("default", "noop", json!({}), JOBS);
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let config = schema.config(&[]);
            let check = render(
                "SELECT count(*) FROM {s}.jobs WHERE state <> 'running'",
                &schema.name,
            );
            std::thread::spawn(move || {
                let mut c = Consumer::connect(&config, &format!("w{w}")).unwrap();
                let mut seen = Vec::new();
                let mut acks: Vec<Ack> = Vec::new();
                loop {
                    let round = c.settle_and_claim(&acks, 25).unwrap();
                    assert!(round.refused.is_empty(), "{:?}", round.refused);
                    if round.claimed.is_empty() {
                        let waiting: i64 = c.client().query_one(&check, &[]).unwrap().get(0);
                        if waiting == 0 {
                            return seen;
                        }
                    }
                    acks = round
                        .claimed
                        .iter()
                        .map(|cl| {
                            assert_eq!(cl.job.attempt, 1, "job {} claimed again", cl.job.id);
                            seen.push(cl.job.id);
                            Ack::new(cl, Settlement::Completed(Value::Null))
                        })
                        .collect();
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut per_worker = Vec::new();
    for w in workers {
        let ids = w.join().expect("worker panicked");
        per_worker.push(ids.len());
        all.extend(ids);
    }
    let elapsed = started.elapsed();
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), JOBS, "claims: {}", all.len());
    assert_eq!(unique.len(), JOBS, "some job was claimed twice");
    assert_eq!(schema.archived("completed"), JOBS as i64);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
    println!(
        "8 claimers drained {JOBS} jobs in {elapsed:.2?} ({:.0} jobs/s); per worker {per_worker:?}",
        JOBS as f64 / elapsed.as_secs_f64()
    );
}

#[test]
fn stale_lease_token_is_refused() {
    let schema = TestSchema::new("fence");
    let id = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let mut a = consumer(&schema, "a", &[]);
    let first = claim(&mut a, 1).remove(0);

    // A made-up token changes nothing and is reported.
    let round = settle(&mut a, id, first.lease_token ^ 1, done());
    assert_eq!(round.refused, vec![id]);
    assert_eq!(schema.live("running"), 1);

    // A's lease expires, the job is rescued and B claims it: A's late ack must be refused.
    exec(
        &schema,
        "UPDATE {s}.jobs SET lease_expires_at = now() - interval '1 second'",
    );
    let rescued: i32 = connect()
        .query_one(&render(sql::RESCUE_EXPIRED, &schema.name), &[&true])
        .unwrap()
        .get(0);
    assert_eq!(rescued, 1);
    let mut b = consumer(&schema, "b", &[]);
    let second = claim(&mut b, 1).remove(0);
    // A's run was never reported started, so the expiry did not charge it.
    assert_eq!(second.job.attempt, 1);
    for settlement in [
        done(),
        Settlement::Failed("late".into()),
        Settlement::Retry {
            error: None,
            delay: Duration::ZERO,
        },
    ] {
        let round = settle(&mut a, id, first.lease_token, settlement);
        assert_eq!(round.refused, vec![id]);
    }
    // Refusals also travel with a round that claims jobs.
    let other = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let round = a
        .settle_and_claim(
            &[Ack {
                id,
                lease_token: first.lease_token,
                batch_id: None,
                settlement: done(),
            }],
            5,
        )
        .unwrap();
    assert_eq!(round.refused, vec![id]);
    assert_eq!(round.claimed.len(), 1);
    assert_eq!(round.claimed[0].job.id, other);
    let row = schema.job(id).unwrap();
    assert_eq!(
        (row["state"].as_str(), row["lease_owner"].as_str()),
        (Some("running"), Some("b"))
    );

    assert!(settle(&mut b, id, second.lease_token, done())
        .refused
        .is_empty());
    assert_eq!(schema.job(id).unwrap()["state"], "completed");
}

#[test]
fn retry_backs_off_then_dead_letters_with_the_error() {
    let schema = TestSchema::new("retry");
    let id = enqueue(
        &schema,
        NewJob::new("default", "flaky", json!({})).with_max_attempts(3),
    );
    let config = schema.config(&[]);
    let mut c = consumer(&schema, "w", &[]);
    for attempt in 1..=3 {
        let claimed = claim(&mut c, 1);
        assert_eq!(claimed.len(), 1, "attempt {attempt}");
        let job = &claimed[0].job;
        assert_eq!((job.attempt, job.max_attempts), (attempt, 3));
        let error = format!("boom {attempt}");
        if attempt < 3 {
            let delay = forkq::backoff::retry_delay(
                attempt,
                config.retry_backoff_base,
                config.retry_backoff_max,
            );
            let round = settle(
                &mut c,
                id,
                claimed[0].lease_token,
                Settlement::Retry {
                    error: Some(error.clone()),
                    delay,
                },
            );
            assert!(round.refused.is_empty());
            let row = schema.job(id).unwrap();
            assert_eq!(row["state"], "retryable");
            assert_eq!(row["attempt"], attempt);
            assert_eq!(row["last_error"], error.as_str());
            assert!(row["lease_owner"].is_null());
            // Base 2 s doubling with ±25 % jitter: 1.5-2.5 s, then 3-5 s.
            let ahead = float(
                &schema,
                &format!("SELECT extract(epoch FROM run_at - now())::float8 FROM {{s}}.jobs WHERE id = {id}"),
            );
            let nominal = 2f64 * f64::from(1 << (attempt - 1));
            assert!(
                ahead > nominal * 0.75 - 0.5 && ahead <= nominal * 1.25 + 0.01,
                "attempt {attempt}: run_at {ahead:.2} s ahead"
            );
            assert!(claim(&mut c, 1).is_empty(), "claimed before its retry time");
            // Let the backoff pass without sleeping through it.
            exec(&schema, "UPDATE {s}.jobs SET run_at = now()");
        } else {
            settle(
                &mut c,
                id,
                claimed[0].lease_token,
                Settlement::Failed(error),
            );
        }
    }
    let row = schema.job(id).unwrap();
    assert_eq!(row["state"], "failed");
    assert_eq!(row["attempt"], 3);
    assert_eq!(row["last_error"], "boom 3");
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
}

#[test]
fn scheduled_jobs_wait_for_their_time() {
    let schema = TestSchema::new("scheduled");
    let in_an_hour: String = connect()
        .query_one(
            "SELECT to_char((now() + interval '1 hour') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[],
        )
        .unwrap()
        .get(0);
    let delayed = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_delay(30.0),
    );
    let at = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_run_at(in_an_hour),
    );
    let past = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_run_at("2001-01-01T00:00:00Z"),
    );
    let soon = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_delay(1.0),
    );
    assert_eq!(schema.job(delayed).unwrap()["state"], "scheduled");
    assert_eq!(schema.job(at).unwrap()["state"], "scheduled");
    assert_eq!(schema.job(past).unwrap()["state"], "available");

    let mut c = consumer(&schema, "w", &[]);
    let ids: Vec<i64> = claim(&mut c, 10).iter().map(|cl| cl.job.id).collect();
    assert_eq!(ids, vec![past]);
    // The one-second job becomes claimable on its own; the others stay put.
    let mut got = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        got.extend(claim(&mut c, 10).iter().map(|cl| cl.job.id));
        !got.is_empty()
    }));
    assert_eq!(got, vec![soon]);
    assert_eq!(schema.live("scheduled"), 2);

    let bad = producer::enqueue(
        &mut connect(),
        &schema.name,
        &limits(),
        &NewJob::new("default", "noop", json!({})).with_run_at("next tuesday"),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("RFC 3339"), "{bad}");
    // The right shape but no such day: PostgreSQL's calendar check, with the same clear error.
    let bad = producer::enqueue(
        &mut connect(),
        &schema.name,
        &limits(),
        &NewJob::new("default", "noop", json!({})).with_run_at("2030-02-30T00:00:00Z"),
    )
    .unwrap_err();
    assert!(
        matches!(&bad, QueueError::InvalidJob(why) if why.contains("2030-02-30")),
        "{bad}"
    );
}

#[test]
fn lower_priority_runs_first() {
    let schema = TestSchema::new("priority");
    let mut expected = Vec::new();
    for p in [5i16, -3, 0, 10, -3, 0] {
        let id = enqueue(
            &schema,
            NewJob::new("default", "noop", json!({})).with_priority(p),
        );
        expected.push((p, id));
    }
    expected.sort();
    let expected: Vec<i64> = expected.into_iter().map(|(_, id)| id).collect();

    // One at a time...
    let mut c = consumer(&schema, "w", &[]);
    let mut one_by_one = Vec::new();
    for _ in 0..expected.len() {
        let cl = claim(&mut c, 1).remove(0);
        one_by_one.push(cl.job.id);
        settle(&mut c, cl.job.id, cl.lease_token, done());
    }
    assert_eq!(one_by_one, expected);

    // ...and within one batch, in the order they are to run.
    for p in [5i16, -3, 0, 10, -3, 0] {
        enqueue(
            &schema,
            NewJob::new("default", "noop", json!({})).with_priority(p),
        );
    }
    let batch: Vec<i16> = claim(&mut c, 10)
        .iter()
        .map(|cl| schema.job(cl.job.id).unwrap()["priority"].as_i64().unwrap() as i16)
        .collect();
    assert_eq!(batch, vec![-3, -3, 0, 0, 5, 10]);
}

#[test]
fn queues_are_served_in_the_configured_order() {
    let schema = TestSchema::new("queues");
    let low = enqueue(&schema, NewJob::new("low", "noop", json!({})));
    let high = enqueue(&schema, NewJob::new("high", "noop", json!({})));
    enqueue(&schema, NewJob::new("other", "noop", json!({})));
    let mut c = consumer(&schema, "w", &[("FORKQ_QUEUES", "high,low")]);
    let ids: Vec<i64> = claim(&mut c, 10).iter().map(|cl| cl.job.id).collect();
    assert_eq!(ids, vec![high, low]);
}

#[test]
fn unique_key_returns_the_live_job() {
    let schema = TestSchema::new("unique");
    let job = NewJob::new("default", "noop", json!({"v": 1})).with_unique_key("user-42");
    let first = enqueue(&schema, job.clone());
    let again = enqueue(&schema, job.clone().with_priority(3));
    assert_eq!(first, again);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
    // Bulk enqueue skips it too.
    let n = producer::enqueue_many(
        &mut connect(),
        &schema.name,
        &limits(),
        &[job.clone(), NewJob::new("default", "noop", json!({}))],
        None,
    )
    .unwrap();
    assert_eq!(n, 1);

    // Still live while running.
    let mut c = consumer(&schema, "w", &[]);
    let claimed = claim(&mut c, 1).remove(0);
    assert_eq!(claimed.job.id, first);
    assert_eq!(enqueue(&schema, job.clone()), first);
    settle(&mut c, first, claimed.lease_token, done());

    // Archived: the key is free again.
    let next = enqueue(&schema, job.clone());
    assert_ne!(next, first);
    assert_eq!(enqueue(&schema, job), next);
}

#[test]
fn cancel_waiting_and_running_jobs() {
    let schema = TestSchema::new("cancel");
    let mut client = connect();
    let s = schema.name.as_str();
    let waiting = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let scheduled = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_delay(600.0),
    );
    assert_eq!(
        admin::cancel(&mut client, s, waiting, true)
            .unwrap()
            .as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        admin::cancel(&mut client, s, scheduled, true)
            .unwrap()
            .as_deref(),
        Some("cancelled")
    );
    assert_eq!(schema.archived("cancelled"), 2);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
    assert_eq!(
        admin::cancel(&mut client, s, waiting, true)
            .unwrap()
            .as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        admin::cancel(&mut client, s, 999_999_999, true).unwrap(),
        None
    );

    // Running jobs are marked; whatever the run asks for afterwards, they are not retried.
    let mut c = consumer(&schema, "w", &[]);
    for settlement in [
        Settlement::Retry {
            error: Some("flaky".into()),
            delay: Duration::ZERO,
        },
        Settlement::Failed("broken".into()),
    ] {
        let id = enqueue(&schema, NewJob::new("default", "noop", json!({})));
        let cl = claim(&mut c, 1).remove(0);
        assert_eq!(
            admin::cancel(&mut client, s, id, true).unwrap().as_deref(),
            Some("cancelling")
        );
        assert_eq!(schema.job(id).unwrap()["state"], "running");
        let round = settle(&mut c, id, cl.lease_token, settlement);
        assert!(round.refused.is_empty());
        assert_eq!(schema.job(id).unwrap()["state"], "cancelled");
        assert!(claim(&mut c, 1).is_empty());
    }
    // A cancelled job that completes anyway stays completed (its work was done).
    let id = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let cl = claim(&mut c, 1).remove(0);
    admin::cancel(&mut client, s, id, true).unwrap();
    settle(&mut c, id, cl.lease_token, done());
    assert_eq!(schema.job(id).unwrap()["state"], "completed");
    assert_eq!(
        admin::cancel(&mut client, s, id, true).unwrap().as_deref(),
        Some("completed")
    );
}

#[test]
fn retry_moves_a_failed_job_back() {
    let schema = TestSchema::new("retryjob");
    let mut client = connect();
    let s = schema.name.as_str();
    let id = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_max_attempts(1),
    );
    let mut c = consumer(&schema, "w", &[]);
    let cl = claim(&mut c, 1).remove(0);
    settle(
        &mut c,
        id,
        cl.lease_token,
        Settlement::Failed("no luck".into()),
    );
    assert_eq!(schema.archived("failed"), 1);

    assert!(admin::retry(&mut client, s, id).unwrap());
    let row = schema.job(id).unwrap();
    assert_eq!(
        (row["state"].as_str(), row["attempt"].as_i64()),
        (Some("available"), Some(0))
    );
    assert_eq!(row["last_error"], "no luck", "the last error stays visible");
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs_archive"), 0);
    assert!(
        !admin::retry(&mut client, s, id).unwrap(),
        "a live job is not retried"
    );

    let cl = claim(&mut c, 1).remove(0);
    assert_eq!((cl.job.id, cl.job.attempt), (id, 1));
    settle(&mut c, id, cl.lease_token, done());
    assert!(
        !admin::retry(&mut client, s, id).unwrap(),
        "a completed job is not retried"
    );
    assert!(!admin::retry(&mut client, s, 999_999_999).unwrap());
}

#[test]
fn transactional_enqueue_commits_or_vanishes_with_the_callers_rows() {
    let schema = TestSchema::new("txenqueue");
    let client = forkq::Client::new(&schema.config(&[])).unwrap();
    let mut listener = connect();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", sql::channel(&schema.name)))
        .unwrap();
    let notified = |listener: &mut postgres::Client, wait: Duration| {
        let mut n = listener.notifications();
        let got = n.timeout_iter(wait).next().unwrap().is_some();
        while n.iter().next().unwrap().is_some() {}
        got
    };

    let mut app = connect();
    exec(&schema, "CREATE TABLE {s}.orders (id int)");
    let orders = format!("INSERT INTO \"{}\".orders VALUES (1)", schema.name);

    let mut tx = app.transaction().unwrap();
    tx.batch_execute(&orders).unwrap();
    let id = client
        .enqueue_in(&mut tx, &NewJob::new("default", "noop", json!({})))
        .unwrap();
    let id2 = producer::enqueue(
        &mut tx,
        &schema.name,
        &limits(),
        &NewJob::new("default", "noop", json!({})),
    )
    .unwrap();
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs"),
        0,
        "visible before commit"
    );
    tx.rollback().unwrap();
    assert!(schema.job(id).is_none() && schema.job(id2).is_none());
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.orders"), 0);
    assert!(
        !notified(&mut listener, Duration::from_millis(300)),
        "notified for a rolled-back job"
    );

    let mut tx = app.transaction().unwrap();
    tx.batch_execute(&orders).unwrap();
    let id = client
        .enqueue_in(&mut tx, &NewJob::new("default", "noop", json!({})))
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(schema.job(id).unwrap()["state"], "available");
    assert_eq!(schema.count("SELECT count(*) FROM {s}.orders"), 1);
    assert!(
        notified(&mut listener, Duration::from_secs(5)),
        "no notification after commit"
    );

    // A bad job inside the caller's transaction is refused before it touches the database.
    let mut tx = app.transaction().unwrap();
    let err = client
        .enqueue_in(&mut tx, &NewJob::new("default", "", json!({})))
        .unwrap_err();
    assert!(matches!(err, QueueError::InvalidJob(_)), "{err}");
    tx.batch_execute("SELECT 1")
        .expect("the caller's transaction is still usable");
}

#[test]
fn bulk_enqueue_of_100k() {
    const JOBS: usize = 100_000;
    let schema = TestSchema::new("bulk");
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| NewJob::new("default", "noop", json!({"i": i})))
        .collect();
    let mut client = connect();
    let started = Instant::now();
    let n = producer::enqueue_many(&mut client, &schema.name, &limits(), &jobs, None).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(n, JOBS as u64);
    assert_eq!(schema.live("available"), JOBS as i64);
    println!(
        "bulk enqueue (producer::enqueue_many): {JOBS} jobs in {elapsed:.2?} = {:.0} jobs/s",
        JOBS as f64 / elapsed.as_secs_f64()
    );
}

#[test]
fn bulk_enqueue_is_all_or_nothing() {
    let schema = TestSchema::new("bulkatomic");
    let good = NewJob::new("default", "noop", json!({}));
    let mut jobs = vec![good.clone(); 7_000];
    jobs.push(NewJob::new("default", "noop", json!({})).with_run_at("not a time"));
    let err =
        producer::enqueue_many(&mut connect(), &schema.name, &limits(), &jobs, None).unwrap_err();
    assert!(err.to_string().contains("RFC 3339"), "{err}");
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs"),
        0,
        "the first chunk was kept"
    );

    let input = "{\"task\":\"a\"}\n\n{\"task\":\"b\",\"payload\":[1]}\n{\"task\":\"c\",\"payload\":{\"x\":\n";
    let err = producer::parse_jsonl(input, "default", &limits()).unwrap_err();
    assert_eq!(err.line, 4, "{}", err.reason);
    let err =
        producer::parse_jsonl("{\"task\":\"a\"}\n{\"tusk\":\"a\"}\n", "q", &limits()).unwrap_err();
    assert_eq!(err.line, 2);
    assert!(err.reason.contains("tusk"), "{}", err.reason);
    let jobs = producer::parse_jsonl(
        "{\"task\":\"a\",\"queue\":\"x\"}\n{\"task\":\"b\"}",
        "q",
        &limits(),
    )
    .unwrap();
    assert_eq!((jobs[0].queue.as_str(), jobs[1].queue.as_str()), ("x", "q"));
}

#[test]
fn invalid_jobs_are_refused_clearly() {
    let schema = TestSchema::new("invalid");
    let small = Limits {
        max_payload_bytes: 64,
        default_max_attempts: 25,
    };
    let refuse = |job: NewJob, limits: &Limits| -> String {
        match producer::enqueue(&mut connect(), &schema.name, limits, &job) {
            Err(QueueError::InvalidJob(why)) => why,
            other => panic!("{job:?} was not refused: {other:?}"),
        }
    };
    let why = refuse(
        NewJob::new("default", "noop", json!({"blob": "x".repeat(100)})),
        &small,
    );
    assert!(
        why.contains("FORKQ_MAX_PAYLOAD_BYTES") && why.contains("limit is 64"),
        "{why}"
    );
    let why = refuse(
        NewJob::new("default", "noop", json!({"a": "x\u{0}y"})),
        &limits(),
    );
    assert!(why.contains("\\u0000"), "{why}");
    let why = refuse(
        NewJob::new("default", "noop", json!({"k\u{0}": 1})),
        &limits(),
    );
    assert!(why.contains("\\u0000"), "{why}");
    let why = refuse(NewJob::new("default", "no\u{0}op", json!({})), &limits());
    assert!(why.contains("NUL"), "{why}");
    let why = refuse(
        NewJob::new("default", "noop", json!({})).with_unique_key("k\u{0}"),
        &limits(),
    );
    assert!(why.contains("NUL"), "{why}");
    let why = refuse(NewJob::new("", "noop", json!({})), &limits());
    assert!(why.contains("queue name"), "{why}");
    let why = refuse(NewJob::new("a,b", "noop", json!({})), &limits());
    assert!(why.contains("queue name"), "{why}");
    let why = refuse(
        NewJob::new("default", "noop", json!({})).with_max_attempts(0),
        &limits(),
    );
    assert!(why.contains("max_attempts"), "{why}");
    let why = refuse(
        NewJob::new("default", "noop", json!({})).with_delay(-1.0),
        &limits(),
    );
    assert!(why.contains("delay"), "{why}");
    let why = refuse(
        NewJob::new("default", "noop", json!({}))
            .with_delay(1.0)
            .with_run_at("2030-01-01T00:00:00Z"),
        &limits(),
    );
    assert!(why.contains("not both"), "{why}");
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
    // The SQL function has PostgreSQL's own guard for NUL.
    let err = connect()
        .query_one(
            &render(
                "SELECT {s}.enqueue('default', 'noop', '{\"a\": \"\\u0000\"}')",
                &schema.name,
            ),
            &[],
        )
        .unwrap_err();
    assert!(err.as_db_error().is_some(), "{err}");
}

#[test]
fn migrations_are_idempotent_and_safe_concurrently() {
    let schema = FreshSchema::new("migrate");
    let name = schema.0.clone();
    let mut client = connect();
    let outdated = migrations::require_current(&mut client, &name).unwrap_err();
    assert!(
        outdated.to_string().contains("run `forkq migrate`"),
        "{outdated}"
    );
    let pending = migrations::status(&mut client, &name).unwrap();
    assert!(pending.iter().all(|m| m.applied_at.is_none()));

    let threads: Vec<_> = (0..2)
        .map(|_| {
            let name = name.clone();
            std::thread::spawn(move || migrations::migrate(&mut connect(), &name))
        })
        .collect();
    let mut results: Vec<Vec<i32>> = threads
        .into_iter()
        .map(|t| t.join().unwrap().expect("concurrent migrate"))
        .collect();
    results.sort();
    let every_version: Vec<i32> = migrations::MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(results, vec![vec![], every_version]);
    assert!(migrations::migrate(&mut client, &name).unwrap().is_empty());
    migrations::require_current(&mut client, &name).unwrap();
    let applied = migrations::status(&mut client, &name).unwrap();
    assert!(applied.iter().all(|m| m.applied_at.is_some()));
    let rows: i64 = client
        .query_one(
            &render("SELECT count(*) FROM {s}.schema_migrations", &name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, migrations::MIGRATIONS.len() as i64);
}

#[test]
fn consumer_refuses_an_unmigrated_schema() {
    let schema = FreshSchema::new("unmigrated");
    let mut vars: std::collections::HashMap<String, String> = Default::default();
    vars.insert("DATABASE_URL".into(), database_url());
    vars.insert("FORKQ_SCHEMA".into(), schema.0.clone());
    let config = forkq::Config::from_vars(vars).unwrap();
    let err = Consumer::connect(&config, "w").err().expect("refused");
    assert!(
        matches!(err, QueueError::SchemaOutdated { found: 0, .. }),
        "{err}"
    );
    assert!(forkq::Client::new(&config).is_err());
}

#[test]
fn release_returns_unstarted_jobs_uncharged() {
    let schema = TestSchema::new("release");
    for _ in 0..3 {
        enqueue(
            &schema,
            NewJob::new("default", "noop", json!({})).with_max_attempts(2),
        );
    }
    let mut c = consumer(&schema, "w", &[]);
    let claimed = claim(&mut c, 3);
    assert_eq!(claimed.len(), 3);
    let in_flight = claimed[0].job.id;
    let back = c
        .release("w", Some(in_flight), Some("worker stopped"))
        .unwrap();
    assert_eq!(back, 3);
    let row = schema.job(in_flight).unwrap();
    assert_eq!(
        (row["state"].as_str(), row["attempt"].as_i64()),
        (Some("available"), Some(1))
    );
    assert_eq!(row["last_error"], "worker stopped");
    for cl in &claimed[1..] {
        let row = schema.job(cl.job.id).unwrap();
        assert_eq!(
            (row["state"].as_str(), row["attempt"].as_i64()),
            (Some("available"), Some(0))
        );
        assert!(row["last_error"].is_null() && row["lease_owner"].is_null());
    }

    // Second round: the in-flight job has used its last attempt and goes to the dead letter;
    // a prefetched job that was cancelled meanwhile ends cancelled instead of running later.
    let claimed = claim(&mut c, 3);
    let in_flight = claimed.iter().find(|cl| cl.job.id == in_flight).unwrap();
    assert_eq!(in_flight.job.attempt, 2);
    let cancelled = claimed
        .iter()
        .find(|cl| cl.job.id != in_flight.job.id)
        .unwrap()
        .job
        .id;
    admin::cancel(&mut connect(), &schema.name, cancelled, true).unwrap();
    let back = c
        .release("w", Some(in_flight.job.id), Some("killed"))
        .unwrap();
    assert_eq!(back, 1);
    let row = schema.job(in_flight.job.id).unwrap();
    assert_eq!(
        (row["state"].as_str(), row["last_error"].as_str()),
        (Some("failed"), Some("killed"))
    );
    assert_eq!(schema.job(cancelled).unwrap()["state"], "cancelled");
    assert_eq!(schema.live("available"), 1);
    // Another owner's jobs are never touched.
    let mut other = consumer(&schema, "x", &[]);
    claim(&mut other, 1);
    assert_eq!(c.release("w", None, None).unwrap(), 0);
    assert_eq!(schema.live("running"), 1);
}

#[test]
fn rescue_returns_expired_leases_only() {
    let schema = TestSchema::new("rescue");
    let rescue_sql = render(sql::RESCUE_EXPIRED, &schema.name);
    let mut rescuer = connect();
    rescuer
        .batch_execute("SET statement_timeout = '10s'")
        .unwrap();
    let mut rescue = move || -> i32 { rescuer.query_one(&rescue_sql, &[&true]).unwrap().get(0) };
    let expire = |id: i64| {
        exec(
            &schema,
            &format!("UPDATE {{s}}.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = {id}"),
        )
    };

    let expired = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let renewed = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let mut a = consumer(&schema, "a", &[]);
    let mut b = consumer(&schema, "b", &[]);
    let ca = claim(&mut a, 1).remove(0);
    let cb = claim(&mut b, 1).remove(0);
    assert_eq!((ca.job.id, cb.job.id), (expired, renewed));
    assert_eq!(rescue(), 0, "nothing expired yet");
    expire(expired);
    expire(renewed);
    assert_eq!(
        b.renew(&[(renewed, cb.lease_token)], None).unwrap(),
        vec![(renewed, false)]
    );
    assert_eq!(rescue(), 1);
    // Its worker never reported the start, so the expiry does not charge it an attempt; it is a
    // suspect from now on.
    let row = schema.job(expired).unwrap();
    assert_eq!(
        (
            row["state"].as_str(),
            row["attempt"].as_i64(),
            row["expiries"].as_i64()
        ),
        (Some("available"), Some(0), Some(1))
    );
    assert!(row["last_error"]
        .as_str()
        .unwrap()
        .contains("lease expired"));
    assert_eq!(schema.job(renewed).unwrap()["state"], "running");
    assert!(settle(&mut a, expired, ca.lease_token, done()).refused == vec![expired]);
    assert!(settle(&mut b, renewed, cb.lease_token, done())
        .refused
        .is_empty());

    // An ack in flight: its transaction holds the row while rescue runs. Rescue must neither wait
    // for it nor touch the row; the ack then commits as if rescue had never run.
    let id = claim(&mut a, 1).remove(0);
    assert_eq!(id.job.id, expired);
    expire(expired);
    let mut acker = connect();
    let mut tx = acker.transaction().unwrap();
    let stale: Vec<i64> = tx
        .query_one(
            &render(
                "SELECT {s}.settle(ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY['completed'], \
                 ARRAY[NULL::jsonb], ARRAY[NULL::text], ARRAY[0::float8], true)",
                &schema.name,
            ),
            &[&expired, &id.lease_token],
        )
        .unwrap()
        .get(0);
    assert!(stale.is_empty());
    let started = Instant::now();
    assert_eq!(rescue(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "rescue waited for the ack"
    );
    tx.commit().unwrap();
    assert_eq!(schema.job(expired).unwrap()["state"], "completed");

    // A renewal in flight, likewise.
    let renewing = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let cl = claim(&mut b, 1).remove(0);
    assert_eq!(cl.job.id, renewing);
    expire(renewing);
    let mut renewer = connect();
    let mut tx = renewer.transaction().unwrap();
    tx.execute(
        &render(sql::RENEW, &schema.name),
        &[
            &"b",
            &vec![cl.job.id],
            &vec![cl.lease_token],
            &30f64,
            &true,
            &0i64,
        ],
    )
    .unwrap();
    assert_eq!(rescue(), 0);
    tx.commit().unwrap();
    assert_eq!(rescue(), 0, "the committed renewal keeps the lease");
    assert!(settle(&mut b, renewing, cl.lease_token, done())
        .refused
        .is_empty());

    // A run never reported started goes back uncharged, however few attempts the job has.
    // Once a suspect, its worker reports the start, and the next expiry charges it: with no
    // attempts left, the dead letter, with the reason.
    let last = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_max_attempts(1),
    );
    assert!(!claim(&mut a, 1)[0].suspect);
    expire(last);
    assert_eq!(rescue(), 1);
    let row = schema.job(last).unwrap();
    assert_eq!(
        (row["state"].as_str(), row["attempt"].as_i64()),
        (Some("available"), Some(0))
    );
    let again = claim(&mut a, 1).remove(0);
    assert!(again.suspect);
    assert!(a.mark_started(&again).unwrap());
    expire(last);
    assert_eq!(rescue(), 1);
    let row = schema.job(last).unwrap();
    assert_eq!(row["state"], "failed");
    assert!(row["last_error"]
        .as_str()
        .unwrap()
        .contains("lease expired"));
}

#[test]
fn retention_zero_deletes_completed_jobs_but_keeps_failed() {
    let schema = TestSchema::new("retention0");
    let ok = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let bad = enqueue(&schema, NewJob::new("default", "fail", json!({})));
    let mut c = consumer(&schema, "w", &[("FORKQ_RETENTION_SECONDS", "0")]);
    let claimed = claim(&mut c, 2);
    let acks: Vec<Ack> = claimed
        .iter()
        .map(|cl| {
            Ack::new(
                cl,
                if cl.job.id == ok {
                    done()
                } else {
                    Settlement::Failed("broken".into())
                },
            )
        })
        .collect();
    assert!(c.settle_and_claim(&acks, 0).unwrap().refused.is_empty());
    assert!(
        schema.job(ok).is_none(),
        "completed job kept with retention 0"
    );
    assert_eq!(schema.job(bad).unwrap()["state"], "failed");
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
}

#[test]
fn maintenance_purges_archived_jobs_after_retention() {
    let schema = TestSchema::new("purge");
    let s = schema.name.as_str();
    let ids: Vec<i64> = (0..4)
        .map(|_| enqueue(&schema, NewJob::new("default", "noop", json!({}))))
        .collect();
    let mut c = consumer(&schema, "w", &[]);
    let claimed = claim(&mut c, 3);
    let acks: Vec<Ack> = claimed
        .iter()
        .enumerate()
        .map(|(i, cl)| {
            Ack::new(
                cl,
                if i == 2 {
                    Settlement::Failed("x".into())
                } else {
                    done()
                },
            )
        })
        .collect();
    c.settle_and_claim(&acks, 0).unwrap();
    admin::cancel(&mut connect(), s, ids[3], true).unwrap();
    // ids[0] completed, ids[2] failed and ids[3] cancelled finished two days ago; ids[1] now.
    exec(
        &schema,
        &format!(
            "UPDATE {{s}}.jobs_archive SET finished_at = now() - interval '2 days' WHERE id IN ({}, {}, {})",
            ids[0], ids[2], ids[3]
        ),
    );
    let report = maintenance::run_pass(
        &mut connect(),
        s,
        Duration::from_secs(86_400),
        Duration::ZERO,
        &mut || {},
    )
    .unwrap()
    .expect("the maintenance lock was free");
    assert_eq!(report.purged, 2);
    assert!(schema.job(ids[0]).is_none() && schema.job(ids[3]).is_none());
    assert_eq!(schema.job(ids[1]).unwrap()["state"], "completed");
    assert_eq!(
        schema.job(ids[2]).unwrap()["state"],
        "failed",
        "the dead letter is kept"
    );

    // One pass per gap across the fleet: a pass that just ran leaves the next caller out...
    let pass = |gap: u64| {
        maintenance::run_pass(
            &mut connect(),
            s,
            Duration::from_secs(1),
            Duration::from_secs(gap),
            &mut || {},
        )
        .unwrap()
    };
    assert!(pass(60).is_none(), "the pass above took the turn");
    // ... and so does one taking its turn right now (holding the row).
    let mut holder = connect();
    let mut tx = holder.transaction().unwrap();
    tx.batch_execute(&render("SELECT * FROM {s}.maintenance_turn FOR UPDATE", s))
        .unwrap();
    assert!(pass(0).is_none());
    tx.rollback().unwrap();
    assert!(pass(0).is_some());
}

#[test]
fn due_jobs_are_promoted_into_the_claim() {
    let schema = TestSchema::new("promote");
    let id = enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_delay(600.0),
    );
    let mut c = consumer(&schema, "w", &[]);
    let round = c.settle_and_claim(&[], 10).unwrap();
    assert!(
        round.claimed.is_empty() && round.promoted == 0 && !round.due,
        "not due yet"
    );
    exec(
        &schema,
        "UPDATE {s}.jobs SET run_at = now() - interval '1 second'",
    );
    // The round that finds it due says so; an ack-only round says so too, and promotes nothing
    // (it claims nothing, and `$9` bounds the promotion); the next claim makes it claimable; the
    // one after claims it.
    let round = c.settle_and_claim(&[], 10).unwrap();
    assert!(round.claimed.is_empty() && round.promoted == 0 && round.due);
    let round = c.settle_and_claim(&[], 0).unwrap();
    assert!(round.promoted == 0 && round.due);
    assert_eq!(schema.job(id).unwrap()["state"], "scheduled");
    let round = c.settle_and_claim(&[], 10).unwrap();
    assert!(
        round.claimed.is_empty(),
        "promoted, not claimed in the same round"
    );
    assert_eq!((round.promoted, round.due), (1, false));
    assert_eq!(schema.job(id).unwrap()["state"], "available");
    let round = c.settle_and_claim(&[], 10).unwrap();
    assert_eq!(round.claimed[0].job.id, id);
    assert!(!round.due, "nothing else is due");
}

#[test]
fn sql_function_enqueues_from_plain_sql() {
    let schema = TestSchema::new("sqlfn");
    let mut client = connect();
    let positional: i64 = client
        .query_one(
            &render(
                "SELECT {s}.enqueue('default', 'noop', '{\"a\": 1}')",
                &schema.name,
            ),
            &[],
        )
        .unwrap()
        .get(0);
    let named: i64 = client
        .query_one(
            &render(
                "SELECT {s}.enqueue(queue => 'default', task => 'sleep', payload => '{\"ms\": 1}', \
                 priority => -5, max_attempts => 3, unique_key => 'only-once')",
                &schema.name,
            ),
            &[],
        )
        .unwrap()
        .get(0);
    let again: i64 = client
        .query_one(
            &render("SELECT {s}.enqueue(queue => 'default', task => 'sleep', unique_key => 'only-once')", &schema.name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(named, again);
    let later: i64 = client
        .query_one(
            &render(
                "SELECT {s}.enqueue('default', 'noop', run_at => now() + interval '1 hour')",
                &schema.name,
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(schema.job(later).unwrap()["state"], "scheduled");
    let row = schema.job(named).unwrap();
    assert_eq!(
        (row["priority"].as_i64(), row["max_attempts"].as_i64()),
        (Some(-5), Some(3))
    );

    let mut c = consumer(&schema, "w", &[]);
    let ids: Vec<i64> = claim(&mut c, 10).iter().map(|cl| cl.job.id).collect();
    assert_eq!(ids, vec![named, positional]);
    let err = client
        .query_one(
            &render("SELECT {s}.enqueue('default', '')", &schema.name),
            &[],
        )
        .unwrap_err();
    assert!(
        err.as_db_error().unwrap().message().contains("non-empty"),
        "{err}"
    );
}

/// The retention purge on a big archive that nothing has expired from yet, never analyzed (as
/// on a server whose autovacuum is off or behind): it reads a few pages, not the archive, and
/// whatever expires later goes oldest first. The dead letter (older still) is not walked at all.
#[test]
fn the_purge_reads_a_few_pages_when_nothing_has_expired() {
    let schema = TestSchema::new("purgeplan");
    exec(
        &schema,
        "INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                       max_attempts, created_at, finished_at)
         SELECT g, 'default', 'noop', '{}', 0,
                CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END, 1, 25, now(),
                now() - interval '2 hours' + g * interval '10 ms'
         FROM generate_series(1, 200000) g",
    );
    let purge = render(sql::PURGE_EXPIRED_ARCHIVE, &schema.name);
    let mut client = connect();
    let explain = |client: &mut postgres::Client, retention_s: f64| -> String {
        let text = format!("EXPLAIN (ANALYZE, BUFFERS) {purge}");
        let lines: Vec<String> = client
            .query(&text, &[&retention_s, &10_000i64])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        lines.join("\n")
    };
    // A day's retention: nothing is due.
    let plan = explain(&mut client, 86_400.0);
    println!("purge, nothing due:\n{plan}");
    assert!(
        plan.contains("jobs_archive_finished_idx") && !plan.contains("Seq Scan"),
        "the purge does not walk the archive oldest first:\n{plan}"
    );
    // The pages the execution touched (planning reads the catalogs, listed after "Planning:").
    let read: u64 = plan
        .lines()
        .take_while(|l| !l.starts_with("Planning"))
        .filter_map(|l| l.trim().strip_prefix("Buffers: shared "))
        .flat_map(|b| b.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "hit" || *k == "read")
        .map(|(_, v)| v.parse::<u64>().unwrap())
        .max()
        .unwrap_or(0);
    assert!(
        read < 50,
        "the purge read {read} pages to delete nothing:\n{plan}"
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs_archive"),
        200_000
    );
    // An hour's retention: the oldest hour of completed jobs goes, and no failed job.
    client
        .execute(&purge, &[&3_600.0f64, &1_000_000i64])
        .unwrap();
    assert_eq!(
        schema.count(
            "SELECT count(*) FROM {s}.jobs_archive
             WHERE state = 'completed' AND finished_at < now() - interval '1 hour'"
        ),
        0
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs_archive WHERE state = 'failed'"),
        20_000
    );
}

/// Prepares the lean round exactly as the children do (one queue and two; archiving, deleting or
/// no acks; promoting) on `schema`, planned both custom and generic, and checks each plan:
/// the pick walks the claim index in its order and the update reaches the picked rows through the
/// primary key; nothing scans or sorts the hot table.
fn assert_round_plans_use_the_indexes(schema: &TestSchema) {
    let mut client = connect();
    for (queues, settle, promotes, direct) in [
        (1, sql::Settle::Archiving, false, false),
        (2, sql::Settle::Archiving, false, false),
        (1, sql::Settle::Deleting, false, false),
        (1, sql::Settle::Nothing, false, false),
        (1, sql::Settle::Archiving, true, false),
        (2, sql::Settle::Nothing, true, false),
        (1, sql::Settle::Archiving, false, true),
        (2, sql::Settle::Deleting, false, true),
        (1, sql::Settle::Nothing, false, true),
    ] {
        let form = sql::RoundForm {
            settle,
            promotes,
            direct,
        };
        let round = render(&sql::round(queues, 100, form), &schema.name);
        client
            .batch_execute(&format!(
                "DEALLOCATE ALL; PREPARE round(bigint[], bigint[], jsonb[], boolean, text, bigint, \
                 float8, text[], int, int, int) AS {round}"
            ))
            .unwrap();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            client
                .batch_execute(&format!("SET plan_cache_mode = {mode}"))
                .unwrap();
            let plan: Vec<String> = client
                .query(
                    "EXPLAIN EXECUTE round('{1,2}', '{3,4}', '{null,null}', true, 'w', 1, 30, \
                     '{default,other}', 100, 4, 7)",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let plan = plan.join("\n");
            println!("round plan ({queues} queue(s), {form:?}, {mode}):\n{plan}");
            assert!(
                plan.contains("jobs_claim_idx") && plan.contains("jobs_pkey"),
                "{mode} plan misses an index:\n{plan}"
            );
            assert!(
                !plan.contains("Seq Scan on jobs ") && !plan.contains("Sort Key: c"),
                "{mode} plan scans or sorts the hot table:\n{plan}"
            );
        }
    }
}

/// Beside many jobs scheduled for later, with fresh statistics: a generic plan cannot know that
/// none is due (it guesses a third of them are), and a probe for "any due job?" that is not
/// walked in `run_at` order was planned as a sequential scan of the hot table, 104 ms a round at
/// 1M scheduled jobs (the crowded W1 drained 50x slower).
#[test]
fn round_plans_stay_on_the_indexes_beside_many_scheduled_jobs() {
    let schema = TestSchema::new("plansched");
    exec(
        &schema,
        "INSERT INTO {s}.jobs (queue, task, state, run_at)
         SELECT 'default', 'noop', 'scheduled', now() + interval '1 day'
         FROM generate_series(1, 200000)",
    );
    schema.enqueue_n("default", "noop", json!({}), 20_000);
    exec(&schema, "ANALYZE {s}.jobs");
    assert_round_plans_use_the_indexes(&schema);
}

/// A durable worker's rounds carry one ack and claim one job, and so do a quiet queue's (one
/// ack, room for a prefetch of 100): the plan cache must keep one generic plan for them. When the
/// custom plan of a one-element ack array looked cheaper than the generic plan (which guesses ten
/// acks), PostgreSQL planned every round afresh, 0.6 ms of server time each, and durable mode
/// drained at 0.6x the raw loop beside it.
#[test]
fn rounds_of_one_keep_their_generic_plan() {
    let schema = TestSchema::new("plancache");
    schema.enqueue_n("default", "noop", json!({}), 5_000);
    exec(&schema, "ANALYZE {s}.jobs");
    let mut client = connect();
    for settle in [
        sql::Settle::Archiving,
        sql::Settle::Deleting,
        sql::Settle::Nothing,
    ] {
        for (cap, direct) in [(1, false), (100, false), (1, true), (100, true)] {
            let form = sql::RoundForm {
                settle,
                promotes: false,
                direct,
            };
            let round = render(&sql::round(1, cap, form), &schema.name);
            client
                .batch_execute(&format!(
                    "DEALLOCATE ALL; PREPARE round(bigint[], bigint[], jsonb[], boolean, text, \
                     bigint, float8, text[], int, int, int) AS {round}"
                ))
                .unwrap();
            for _ in 0..20 {
                client
                    .batch_execute(
                        "EXECUTE round('{1}', '{1}', '{null}', true, 'w', 1, 30, '{default}', 1, 0, 0)",
                    )
                    .unwrap();
            }
            let row = client
                .query_one(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
                     WHERE name = 'round'",
                    &[],
                )
                .unwrap();
            let (generic, custom): (i64, i64) = (row.get(0), row.get(1));
            assert!(
                custom <= 5 && generic >= 15,
                "{settle:?} round (cap {cap}, direct {direct}) of one ack: {custom} custom and \
                 {generic} generic plans in 20 runs; the plan cache should keep the generic plan \
                 after 5"
            );
        }
    }
}

#[test]
fn claim_plan_stays_on_the_index_with_stale_statistics() {
    const JOBS: usize = 50_000;
    let schema = TestSchema::new("plan");
    exec(&schema, "ANALYZE {s}.jobs");
    schema.enqueue_n("default", "noop", json!({}), JOBS);

    assert_round_plans_use_the_indexes(&schema);

    let mut c = consumer(&schema, "w", &[("FORKQ_PREFETCH", "100")]);
    let started = Instant::now();
    let mut drained = 0;
    let mut acks = Vec::new();
    while drained < 20_000 {
        let round = c.settle_and_claim(&acks, 100).unwrap();
        drained += round.claimed.len();
        acks = round
            .claimed
            .iter()
            .map(|cl| Ack::new(cl, Settlement::Completed(Value::Null)))
            .collect();
    }
    c.settle_and_claim(&acks, 0).unwrap();
    let elapsed = started.elapsed();
    println!(
        "one consumer, batches of 100, stale statistics: {drained} jobs in {elapsed:.2?} = {:.0} jobs/s",
        drained as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(schema.archived("completed"), drained as i64);
}

#[test]
fn single_enqueue_round_trip_time() {
    let schema = TestSchema::new("rtt");
    let mut client = connect();
    let job = NewJob::new("default", "noop", json!({"n": 1}));
    let mut samples = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let started = Instant::now();
        producer::enqueue(&mut client, &schema.name, &limits(), &job).unwrap();
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "single enqueue (producer::enqueue, one connection, 1000 calls): p50 {:.2?} p99 {:.2?} max {:.2?}",
        samples[499], samples[989], samples[999]
    );
    assert_eq!(schema.live("available"), 1000);
}

#[test]
fn racing_enqueues_of_one_unique_key_get_one_job() {
    let schema = TestSchema::new("uniquerace");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let name = schema.name.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = connect();
                let job = NewJob::new("default", "noop", json!({})).with_unique_key("once");
                barrier.wait();
                (0..20)
                    .map(|_| producer::enqueue(&mut client, &name, &limits(), &job).unwrap())
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let ids: HashSet<i64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
}

#[test]
fn listener_wakes_on_notify_and_times_out_without() {
    let schema = TestSchema::new("notify");
    let config = schema.config(&[("FORKQ_QUEUES", "default,other")]);
    let mut listener = forkq::queue::listener::Listener::connect(&config).unwrap();
    let started = Instant::now();
    assert_eq!(
        listener.wait(Duration::from_millis(300)).unwrap().wakeups,
        0
    );
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Scheduled jobs do not wake anyone, nor jobs of queues this daemon does not serve; due ones
    // do, and a bulk enqueue once.
    enqueue(
        &schema,
        NewJob::new("default", "noop", json!({})).with_delay(600.0),
    );
    enqueue(&schema, NewJob::new("elsewhere", "noop", json!({})));
    assert_eq!(
        listener.wait(Duration::from_millis(300)).unwrap().wakeups,
        0
    );
    let producer = std::thread::spawn({
        let name = schema.name.clone();
        move || {
            std::thread::sleep(Duration::from_millis(200));
            producer::enqueue(
                &mut connect(),
                &name,
                &limits(),
                &NewJob::new("default", "noop", json!({})),
            )
            .unwrap()
        }
    });
    let started = Instant::now();
    assert_eq!(listener.wait(Duration::from_secs(10)).unwrap().wakeups, 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    producer.join().unwrap();
    schema.enqueue_n("default", "noop", json!({}), 3);
    enqueue(&schema, NewJob::new("other", "noop", json!({})));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        listener.wait(Duration::from_secs(5)).unwrap().wakeups,
        2,
        "one for the bulk insert, one for queue other"
    );
    assert_eq!(
        listener.wait(Duration::from_millis(200)).unwrap().wakeups,
        0,
        "buffered notifications were drained"
    );
}

#[test]
fn client_api_enqueues_through_its_pool() {
    let schema = TestSchema::new("clientapi");
    let client = forkq::Client::new(&schema.config(&[("FORKQ_MAX_ATTEMPTS", "7")])).unwrap();
    assert_eq!(client.schema(), schema.name);
    let id = client
        .enqueue(&NewJob::new("default", "noop", json!({"a": 1})))
        .unwrap();
    assert_eq!(schema.job(id).unwrap()["max_attempts"], 7);
    let jobs = vec![NewJob::new("default", "noop", json!({})); 10];
    assert_eq!(client.clone().enqueue_many(&jobs).unwrap(), 10);
    assert_eq!(schema.live("available"), 11);
    let err = client
        .enqueue(&NewJob::new("default", "noop", json!("x".repeat(2 << 20))))
        .unwrap_err();
    assert!(err.to_string().contains("FORKQ_MAX_PAYLOAD_BYTES"), "{err}");
}

#[test]
fn a_cancel_reaches_jobs_claimed_ahead_at_the_next_round() {
    let schema = TestSchema::new("changes");
    let ids: Vec<i64> = (0..3)
        .map(|_| enqueue(&schema, NewJob::new("default", "noop", json!({}))))
        .collect();
    let mut c = consumer(&schema, "w", &[]);
    let first = c.settle_and_claim(&[], 3).unwrap();
    assert_eq!(first.claimed.len(), 3);
    // Nothing changed: the next round reports the same count.
    assert_eq!(c.settle_and_claim(&[], 0).unwrap().changes, first.changes);
    assert_eq!(
        admin::cancel(&mut connect(), &schema.name, ids[1], true).unwrap(),
        Some("cancelling".to_string())
    );
    let next = c.settle_and_claim(&[], 0).unwrap();
    assert_eq!(next.changes, first.changes + 1, "the cancel is a change");
    let held: Vec<&Claimed> = first.claimed.iter().collect();
    assert_eq!(c.drop_cancelled(&held).unwrap(), vec![ids[1]]);
    let job = schema.job(ids[1]).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["attempt"].as_i64()),
        (Some("cancelled"), Some(0)),
        "cancelled before it started, uncharged: {job}"
    );
    // Folding the changes keeps the count.
    maintenance::run_pass(
        &mut connect(),
        &schema.name,
        Duration::from_secs(60),
        Duration::ZERO,
        &mut || {},
    )
    .unwrap()
    .unwrap();
    assert_eq!(schema.count("SELECT count(*) FROM {s}.changes"), 1);
    assert_eq!(c.settle_and_claim(&[], 0).unwrap().changes, next.changes);
}

#[test]
fn renewal_keeps_what_is_held_and_gives_back_the_rest() {
    let schema = TestSchema::new("strays");
    for _ in 0..3 {
        enqueue(&schema, NewJob::new("default", "noop", json!({})));
    }
    let mut c = consumer(&schema, "w/", &[]);
    let claimed = claim(&mut c, 3);
    // The worker lost track of the last two (an ack lost in a crash, a claim reply lost with the
    // connection): the renewal keeps the first and gives the others back, uncharged.
    let held = [(claimed[0].job.id, claimed[0].lease_token)];
    assert_eq!(
        c.renew(&held, Some(claimed[0].job.id)).unwrap(),
        vec![(claimed[0].job.id, false)]
    );
    assert_eq!(schema.live("running"), 1);
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE state = 'available' AND attempt = 0"),
        2
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE started"),
        1
    );
}

/// A renewal (and the release inside it) reads the renewing worker's own rows through
/// `jobs_running_idx`, however many rows other workers hold: with `starts_with()` on the owner,
/// which is no index condition in the functions' generic plans, each renewal read every running
/// row of the schema, twice (60 ms for a worker's 100 rows among 80,000 running, against 3 ms).
/// And `leased_under`, which makes the owner lookup a range, answers exactly what `starts_with`
/// does.
#[test]
fn a_renewal_reads_only_the_renewing_workers_rows() {
    let schema = TestSchema::new("renewidx");
    let mut db = schema.client();
    db.batch_execute(&render(
        "INSERT INTO {s}.jobs (queue, task) SELECT 'default', 'noop' FROM generate_series(1, 20000);
         UPDATE {s}.jobs SET state = 'running', lease_token = 7,
                lease_expires_at = now() + interval '1 minute',
                lease_owner = CASE WHEN id <= 3 THEN 'h/1/1/' ELSE 'h/' || (id % 64 + 2) || '/1/' END;
         ANALYZE {s}.jobs",
        &schema.name,
    ))
    .unwrap();
    let ids: Vec<i64> = db
        .query(
            &render("SELECT id FROM {s}.jobs WHERE id <= 3", &schema.name),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // This backend's counts not yet reported (its UPDATE above too): read around the call.
    let reads = render(
        "SELECT pg_stat_get_xact_numscans('{s}.jobs'::regclass),
                pg_stat_get_xact_tuples_returned('{s}.jobs_running_idx'::regclass)",
        &schema.name,
    );
    let mut tx = db.transaction().unwrap();
    let before = tx.query_one(&reads, &[]).unwrap();
    let renewed = tx
        .query(
            &render(
                "SELECT id FROM {s}.renew('h/1/1/', $1, $2, 30, true, 0)",
                &schema.name,
            ),
            &[&ids, &vec![7i64; 3]],
        )
        .unwrap()
        .len();
    let after = tx.query_one(&reads, &[]).unwrap();
    tx.commit().unwrap();
    assert_eq!(renewed, 3);
    let read = |column: usize| after.get::<_, i64>(column) - before.get::<_, i64>(column);
    let (scans, entries) = (read(0), read(1));
    assert_eq!(scans, 0, "sequential scans of the hot table in one renewal");
    assert!(
        entries <= 12,
        "{entries} running-index entries read for 3 rows"
    );

    let answers = db
        .query(
            &render(
                "SELECT o, p, {s}.leased_under(o, p), starts_with(o, p)
                 FROM unnest(ARRAY['a/1/', 'a/1/2/', 'a/10/', 'a/', 'a/0/', 'b/1/', 'é/1/', 'a/1'])
                      AS o,
                      unnest(ARRAY['a/1/', 'a/', 'é/', 'a/1']) AS p",
                &schema.name,
            ),
            &[],
        )
        .unwrap();
    for r in &answers {
        let (o, p): (String, String) = (r.get(0), r.get(1));
        assert_eq!(
            r.get::<_, bool>(2),
            r.get::<_, bool>(3),
            "{o:?} under {p:?}"
        );
    }
}

/// A round waits at most `sql::ROUND_LOCK_WAIT` for a row lock (so a cycle of rounds is broken
/// in milliseconds, not after the server's `deadlock_timeout` of a second), and sends itself
/// again when it gave up: an ack whose job another transaction holds locked for longer is
/// settled once the lock is gone, with no error and nothing refused. A lock held past the
/// consumer's retry window (half its statement budget: 2 s for a 6 s stale window) ends the call
/// with PostgreSQL's lock timeout, well before its statement timeout.
#[test]
fn a_round_held_up_by_a_row_lock_is_sent_again_until_it_settles() {
    let schema = TestSchema::new("lockwait");
    let id = enqueue(&schema, NewJob::new("default", "noop", json!({})));
    let mut c = consumer(&schema, "w", &[("FORKQ_HEALTH_STALE_SECONDS", "6")]);
    let round = c.settle_and_claim(&[], 1).unwrap();
    assert_eq!(round.claimed.len(), 1);
    let ack = Ack::new(
        &round.claimed[0],
        Settlement::Completed(json!({"ok": true})),
    );
    let hold = |held: Duration| {
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let statement = render(
            "SELECT 1 FROM {s}.jobs WHERE id = $1 FOR UPDATE",
            &schema.name,
        );
        let holder = std::thread::spawn(move || {
            let mut conn = connect();
            let mut tx = conn.transaction().unwrap();
            tx.execute(&statement, &[&id]).unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(held);
            tx.commit().unwrap();
        });
        locked.recv_timeout(Duration::from_secs(10)).unwrap();
        holder
    };

    let holder = hold(Duration::from_secs(3));
    let started = Instant::now();
    let err = c.settle_and_claim(std::slice::from_ref(&ack), 0).err();
    let gave_up = started.elapsed();
    holder.join().unwrap();
    let code = match &err {
        Some(QueueError::Db(e)) => e.code().cloned(),
        _ => None,
    };
    assert_eq!(
        code,
        Some(postgres::error::SqlState::LOCK_NOT_AVAILABLE),
        "{err:?} after {gave_up:?}"
    );
    assert!(
        gave_up >= Duration::from_millis(900) && gave_up < Duration::from_millis(1900),
        "gave up after {gave_up:?}: the retries should last about 1 s"
    );

    let held = sql::ROUND_LOCK_WAIT * 6;
    let holder = hold(held);
    let started = Instant::now();
    let settled = c.settle_and_claim(&[ack], 0).unwrap();
    let waited = started.elapsed();
    holder.join().unwrap();
    assert!(settled.refused.is_empty(), "refused: {:?}", settled.refused);
    assert!(
        waited >= held - sql::ROUND_LOCK_WAIT,
        "the round cannot have settled while the job was locked: {waited:?}"
    );
    assert_eq!(schema.archived("completed"), 1);
}

/// After a round that claimed all it asked for, the next goes in the direct form, whose claim is
/// the statement itself and whose first job carries what the round has to say. It says what the
/// other form says: the jobs in the order they are to run, the count of changes, the acks it
/// refused; and so does a direct round that claims nothing, which returns no row.
#[test]
fn a_direct_round_says_what_the_other_form_says() {
    let schema = TestSchema::new("direct");
    let mut expected = Vec::new();
    for p in [5i16, -3, 0, 10, -3, 0] {
        let job = NewJob::new("default", "noop", json!({})).with_priority(p);
        expected.push((p, enqueue(&schema, job)));
    }
    expected.sort();
    let expected: Vec<i64> = expected.into_iter().map(|(_, id)| id).collect();
    let mut c = consumer(&schema, "w", &[]);
    let acks = |round: &Round| -> Vec<Ack> {
        round
            .claimed
            .iter()
            .map(|cl| Ack::new(cl, done()))
            .collect()
    };
    let ids = |round: &Round| -> Vec<i64> { round.claimed.iter().map(|cl| cl.job.id).collect() };

    // The other form (no round before), claiming all it asked for...
    let first = c.settle_and_claim(&[], 2).unwrap();
    assert_eq!(ids(&first), expected[..2]);
    // ...so the next is direct; a change (a cancel, a queue paused) since moves the count.
    exec(&schema, "SELECT {s}.note_change()");
    let second = c.settle_and_claim(&acks(&first), 3).unwrap();
    assert_eq!(ids(&second), expected[2..5]);
    assert!(second.changes > first.changes, "{second:?} after {first:?}");
    assert!(second.refused.is_empty() && !second.no_turn && !second.due);
    assert_eq!(schema.archived("completed"), 2);

    // A direct round that claims nothing and one of whose acks is refused (its job taken over).
    let (taken, kept) = (second.claimed[0].job.id, second.claimed[1].job.id);
    exec(
        &schema,
        &format!("UPDATE {{s}}.jobs SET lease_token = lease_token + 1 WHERE id = {taken}"),
    );
    let last = c.settle_and_claim(&acks(&second)[1..], 1).unwrap();
    assert_eq!(ids(&last), expected[5..]);
    let mut with_taken = acks(&last);
    with_taken.push(Ack::new(&second.claimed[0], done()));
    let empty = c.settle_and_claim(&with_taken, 1).unwrap();
    assert!(empty.claimed.is_empty());
    assert_eq!(empty.refused, vec![taken]);
    assert_eq!(empty.changes, second.changes);
    assert!(!empty.no_turn && !empty.due);
    assert_eq!(
        schema.archived("completed"),
        5,
        "{kept} and the rest were archived"
    );
    assert_eq!(
        schema.live("running"),
        1,
        "the job taken over is still running"
    );
}

/// The maintenance pass names a session that holds a snapshot (while it does, no vacuum can
/// remove the jobs claimed since, and claims slow down as a backlog drains): one in a repeatable
/// read transaction for over a second is found, and after it commits it no longer is.
#[test]
fn a_session_holding_an_old_snapshot_is_named() {
    let mut holder = connect();
    holder
        .batch_execute(
            "SET application_name = 'forkq-test snapshot holder';
             BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1",
        )
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    std::thread::sleep(Duration::from_millis(1500));
    let found = maintenance::snapshot_holder(&mut connect(), Duration::from_secs(1))
        .unwrap()
        .expect("a session has held a snapshot for more than a second");
    println!("held: {found:?}");
    // Another test's session may have held one longer; it would be named first.
    if found.pid == holder_pid {
        assert_eq!(found.application_name, "forkq-test snapshot holder");
        assert_eq!(found.state, "idle in transaction");
        assert!(found.held_for >= Duration::from_secs(1), "{found:?}");
        assert!(found.query.contains("pg_backend_pid"), "{found:?}");
    } else {
        assert!(found.held_for >= Duration::from_millis(1500), "{found:?}");
    }
    holder.batch_execute("COMMIT").unwrap();
    let after = maintenance::snapshot_holder(&mut connect(), Duration::from_secs(1)).unwrap();
    assert!(
        after.as_ref().is_none_or(|h| h.pid != holder_pid),
        "a session that committed holds no snapshot: {after:?}"
    );
}

/// A session whose transaction took a transaction id holds back the removal of dead rows from then
/// until it ends, even while a statement it began just now runs: it is named by its
/// transaction's age, not its statement's.
#[test]
fn a_session_holding_an_old_transaction_id_is_named_while_a_new_statement_runs() {
    let mut holder = connect();
    holder
        .batch_execute(
            "SET application_name = 'forkq-test xid holder'; BEGIN; SELECT txid_current()",
        )
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    std::thread::sleep(Duration::from_millis(1500));
    let sleeper = std::thread::spawn(move || {
        holder.batch_execute("SELECT pg_sleep(2); COMMIT").unwrap();
    });
    let mut db = connect();
    assert!(
        wait_until(Duration::from_secs(2), || db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&holder_pid],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1),
        "the holder's statement never showed as running"
    );
    let found = maintenance::snapshot_holder(&mut db, Duration::from_secs(1))
        .unwrap()
        .expect("a session has held a transaction id for more than a second");
    sleeper.join().unwrap();
    // Another test's session may have held one longer; it would be named first.
    if found.pid == holder_pid {
        assert_eq!(found.state, "active", "{found:?}");
        assert!(found.query.contains("pg_sleep"), "{found:?}");
    }
    assert!(found.held_for >= Duration::from_millis(1500), "{found:?}");
}

/// Leaves 12,000 dead rows in `schema`'s hot table (its vacuum threshold is 10,000 and a tenth of
/// the live rows), their statistics flushed at once, and waits until the server's statistics show
/// them; returns a reader of the table's dead rows.
fn bloat_hot_table(schema: &str) -> impl Fn() -> i64 + '_ {
    connect()
        .batch_execute(&render(
            "INSERT INTO {s}.jobs (queue, task, payload)
             SELECT 'default', 'noop', '{}' FROM generate_series(1, 12000);
             DELETE FROM {s}.jobs;
             SELECT pg_stat_force_next_flush()",
            schema,
        ))
        .unwrap();
    let dead = move || -> i64 {
        connect()
            .query_one(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'jobs'",
                &[&schema],
            )
            .unwrap()
            .get(0)
    };
    // The deleting session's statistics reach the server within a second or so.
    assert!(
        wait_until(Duration::from_secs(20), || dead() >= 10_000),
        "the dead rows never showed: {}",
        dead()
    );
    dead
}

/// The tables one maintenance pass on `client` vacuumed in `schema`.
fn vacuumed_by_a_pass(client: &mut postgres::Client, schema: &str) -> Vec<&'static str> {
    maintenance::run_pass(
        client,
        schema,
        Duration::from_secs(3600),
        Duration::ZERO,
        &mut || {},
    )
    .unwrap()
    .expect("the maintenance turn was free")
    .vacuumed
}

/// The vacuum service vacuums a hot table that was just drained while workers' statements hold
/// their usual lock on it: it keeps the empty pages instead of trying, for longer than its
/// statement timeout, to lock the table exclusively to cut them off (which ended in the timeout,
/// with the vacuum's statistics unrecorded, so the next pass vacuumed the table again).
#[test]
fn a_drained_hot_table_is_vacuumed_while_workers_hold_it() {
    let schema = TestSchema::new("drainedvacuum");
    let s = schema.name.as_str();
    let _dead = bloat_hot_table(s);
    // What a worker's statement holds on the table while it runs (no snapshot, no rows).
    let mut worker = connect();
    worker
        .batch_execute(&render(
            "BEGIN; LOCK TABLE {s}.jobs IN ROW EXCLUSIVE MODE",
            s,
        ))
        .unwrap();
    let mut maintainer = connect();
    maintainer
        .batch_execute("SET statement_timeout = '2s'")
        .unwrap();
    let vacuumed = vacuumed_by_a_pass(&mut maintainer, s);
    worker.batch_execute("COMMIT").unwrap();
    assert_eq!(vacuumed, vec!["jobs"]);
}

/// The vacuum service leaves a bloated table alone while a session holds a snapshot taken before
/// the table's last vacuum (that vacuum removed all it could; another would remove nothing, and
/// without this the hot table was vacuumed at every pass), and vacuums it again once the session
/// ends.
#[test]
fn a_table_is_not_vacuumed_again_while_a_snapshot_older_than_its_last_vacuum_is_held() {
    let schema = TestSchema::new("heldvacuum");
    let s = schema.name.as_str();
    let mut holder = connect();
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    // The dead rows, which the holder's snapshot keeps.
    let dead = bloat_hot_table(s);
    let pass = || vacuumed_by_a_pass(&mut connect(), s);
    assert_eq!(pass(), vec!["jobs"], "bloated, and never vacuumed yet");
    assert!(
        dead() >= 10_000,
        "the held snapshot keeps the dead rows: {}",
        dead()
    );
    assert_eq!(
        pass(),
        Vec::<&str>::new(),
        "that vacuum removed all it could"
    );
    holder.batch_execute("COMMIT").unwrap();
    // Passes until one has vacuumed the rows away: another test's session can hold them too,
    // and not always visibly (a statement's snapshot can be older than the statement, as old as
    // the oldest transaction running when it began), so a pass may vacuum in vain first.
    assert!(
        wait_until(Duration::from_secs(20), || {
            pass();
            dead() < 10_000
        }),
        "never vacuumed again: {} dead rows",
        dead()
    );
}
