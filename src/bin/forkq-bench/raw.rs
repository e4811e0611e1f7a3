//! The raw-SQL baselines: what two plain connections achieve with the same tables and indexes,
//! measured in the same run, so forkq's figures can be given as ratios to them.

use std::sync::{Arc, Barrier};

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use std::time::Instant;

use crate::db::{connect, BenchResult, BenchSchema};
use crate::sys;

/// The picking subquery every baseline shares with forkq's claim: same predicate, same order,
/// so the same partial index serves it.
const PICK: &str = "SELECT id FROM {s}.jobs
    WHERE queue = 'default' AND state = 'available'
    ORDER BY priority, run_at, id LIMIT $5 FOR UPDATE SKIP LOCKED";

/// The baselines of the issue: plain SQL loops doing forkq's work, each round one statement that
/// acknowledges the previous round's jobs (fenced by their lease token) and claims the next ones
/// (setting a lease), with `synchronous_commit = on`. What an engineer would write by hand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baseline {
    /// Jobs claimed (and so acknowledged) per round: 100, or 1 for one commit per job.
    pub batch: usize,
    /// Whether acknowledged jobs move into the archive (forkq's default retention) or are
    /// deleted (retention 0).
    pub archive: bool,
}

impl Baseline {
    /// The row label.
    pub fn label(self) -> String {
        format!(
            "raw: ack previous {n} ({how}) + claim next {n}, 1 statement, sync commit",
            n = self.batch,
            how = if self.archive {
                "into the archive"
            } else {
                "delete"
            }
        )
    }
}

/// A baseline's result.
#[derive(Clone, Copy, Debug)]
pub struct RawResult {
    /// Jobs per second over the whole drain.
    pub rate: f64,
    /// PostgreSQL backend CPU per job, µs.
    pub pg_us_per_job: f64,
    /// The client's own CPU per job, µs: the loop's threads (forkq's processes, for a drain).
    pub client_us_per_job: f64,
}

/// Drains `n` pre-enqueued jobs with two connections running `baseline`.
pub fn run(url: &str, baseline: Baseline, n: usize) -> BenchResult<RawResult> {
    let schema = Arc::new(BenchSchema::new(url, "raw")?);
    schema.fill(n, "noop", &serde_json::json!({}))?;
    let barrier = Arc::new(Barrier::new(3));
    let mut threads = Vec::new();
    let mut backends = Vec::new();
    for worker in 0..2 {
        let mut client = connect(url, "forkq-bench raw")?;
        let backend: i32 = client.query_one("SELECT pg_backend_pid()", &[])?.get(0);
        backends.push(backend);
        let schema = Arc::clone(&schema);
        let barrier = Arc::clone(&barrier);
        threads.push(std::thread::spawn(
            move || -> BenchResult<(u64, f64, f64)> {
                let owner = format!("raw-{worker}");
                client.batch_execute("SET synchronous_commit = on")?;
                let round = client.prepare(&schema.sql(&statement(baseline)))?;
                barrier.wait();
                let client_before = sys::thread_cpu_seconds();
                let done = drain(&mut client, &round, baseline.batch, &owner)?;
                let client_cpu = sys::thread_cpu_seconds() - client_before;
                // Read while the connection (and so its backend) is still alive.
                Ok((done, sys::cpu_seconds(backend), client_cpu))
            },
        ));
    }
    let cpu_before = sys::cpu_total(&backends);
    barrier.wait();
    let started = Instant::now();
    let (mut done, mut cpu_after, mut client_cpu) = (0, 0.0, 0.0);
    for t in threads {
        let (d, c, own) = t.join().map_err(|_| "a baseline thread panicked")??;
        done += d;
        cpu_after += c;
        client_cpu += own;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_after - cpu_before;
    if done as usize != n {
        return Err(format!("baseline finished {done} of {n} jobs").into());
    }
    Ok(RawResult {
        rate: n as f64 / elapsed,
        pg_us_per_job: cpu * 1e6 / n as f64,
        client_us_per_job: client_cpu * 1e6 / n as f64,
    })
}

/// The baseline's one statement: `$1` the previous round's ids, `$2` their lease token, `$3` the
/// owner, `$4` this round's lease token, `$5` the batch size.
fn statement(baseline: Baseline) -> String {
    let archive = if baseline.archive {
        "INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                       max_attempts, unique_key, batch_id, created_at)
         SELECT id, queue, task, payload, priority, 'completed', attempt, max_attempts,
                unique_key, batch_id, created_at FROM done"
    } else {
        "SELECT 1"
    };
    format!(
        "WITH done AS (
             DELETE FROM {{s}}.jobs WHERE id = ANY($1) AND lease_token = $2 RETURNING *
         ), archived AS ({archive})
         UPDATE {{s}}.jobs SET state = 'running', attempt = attempt + 1, lease_owner = $3,
                lease_token = $4, lease_expires_at = now() + interval '30 seconds'
         WHERE id = ANY(ARRAY({PICK}))
         RETURNING id, payload"
    )
}

/// Runs rounds until one claims nothing (its acknowledgements still go through); returns the
/// jobs this connection completed.
fn drain(
    client: &mut postgres::Client,
    round: &postgres::Statement,
    batch: usize,
    owner: &str,
) -> BenchResult<u64> {
    let (mut done, mut previous, mut token) = (0u64, Vec::<i64>::new(), 0i64);
    let batch = batch as i64;
    loop {
        let next_token = fastrand::i64(..);
        let rows = client.query(round, &[&previous, &token, &owner, &next_token, &batch])?;
        done += previous.len() as u64;
        if rows.is_empty() {
            return Ok(done);
        }
        previous = rows.iter().map(|r| r.get(0)).collect();
        token = next_token;
    }
}

/// The cost of one durable commit as a client sees it: `n` autocommit single-row inserts on one
/// connection, in milliseconds, sorted. Every one-commit-per-job figure is bounded by this.
pub fn commit_latency(url: &str, n: usize) -> BenchResult<Vec<f64>> {
    let schema = BenchSchema::new(url, "commit")?;
    let mut client = connect(url, "forkq-bench raw")?;
    client.batch_execute(&schema.sql("CREATE TABLE {s}.t (x int)"))?;
    let insert = client.prepare(&schema.sql("INSERT INTO {s}.t VALUES (1)"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.execute(&insert, &[])?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// W2's work done by hand, its floor: `n` jobs enqueued one by one, each in one autocommit
/// statement (synchronous commit, as forkq's producers) that inserts the job and notifies, one
/// every 10 ms; one connection LISTENs, and at each notification claims the job with the baseline
/// round of 1 (acknowledging nothing, with `synchronous_commit = off`, as forkq's woken workers
/// do), then acknowledges it in a round of its own (untimed, as forkq's worker acks before it
/// idles). Milliseconds from the moment the enqueue call returned to the moment the claim
/// returned the job, sorted. Between enqueues both connections sit idle, as W2's do, so each
/// claim runs on a backend (and a CPU) that has been asleep: what the hot loop of rounds never
/// shows.
pub fn listen_claim_latency(url: &str, n: usize) -> BenchResult<Vec<f64>> {
    let schema = BenchSchema::new(url, "wake")?;
    let channel = format!("forkq_bench_wake_{}", std::process::id());
    let mut worker = connect(url, "forkq-bench raw")?;
    worker.batch_execute(&format!("SET synchronous_commit = off; LISTEN {channel}"))?;
    let round = worker.prepare(&schema.sql(&statement(Baseline {
        batch: 1,
        archive: true,
    })))?;
    let waiter = std::thread::spawn(move || -> BenchResult<Vec<u64>> {
        let mut held = Vec::with_capacity(n);
        let none: Vec<i64> = Vec::new();
        while held.len() < n {
            let heard = worker
                .notifications()
                .timeout_iter(std::time::Duration::from_secs(10))
                .next()?;
            if heard.is_none() {
                return Err(format!("no notification after {} jobs", held.len()).into());
            }
            let token = fastrand::i64(..);
            let rows = worker.query(&round, &[&none, &0i64, &"raw", &token, &1i64])?;
            held.push(sys::mono_ns());
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            if ids.len() != 1 {
                return Err(format!("the claim round took {} jobs, not 1", ids.len()).into());
            }
            worker.query(&round, &[&ids, &token, &"raw", &0i64, &0i64])?;
        }
        Ok(held)
    });
    let mut producer = connect(url, "forkq-bench raw")?;
    let enqueue = producer.prepare(&schema.sql(
        "WITH job AS (INSERT INTO {s}.jobs (queue, task, payload)
                      VALUES ('default', 'noop', '{}') RETURNING id)
         SELECT pg_notify($1, '') FROM job",
    ))?;
    paced(&mut producer, &enqueue, &channel, n, waiter)
}

/// Runs `statement` on `client` `n` times, one every 10 ms, with `channel` as its parameter, then
/// joins `waiter`, whose moments pair with those at which each call returned: milliseconds from
/// each return to its moment, sorted.
fn paced(
    client: &mut Client,
    statement: &postgres::Statement,
    channel: &str,
    n: usize,
    waiter: std::thread::JoinHandle<BenchResult<Vec<u64>>>,
) -> BenchResult<Vec<f64>> {
    let start = Instant::now();
    let mut returned = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + std::time::Duration::from_millis(10 * i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        client.execute(statement, &[&channel])?;
        returned.push(sys::mono_ns());
    }
    let moments = waiter
        .join()
        .map_err(|_| "the listening thread panicked")??;
    let mut out: Vec<f64> = returned
        .iter()
        .zip(&moments)
        .map(|(&r, &m)| (m as f64 - r as f64) / 1e6)
        .collect();
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// The floor under W2: `n` bare `NOTIFY`s (autocommit, one every 10 ms) from one connection to
/// another that LISTENs and blocks on its socket; milliseconds from the moment the notifying
/// call returned to the moment the listener held the notification, sorted.
pub fn notify_latency(url: &str, n: usize) -> BenchResult<Vec<f64>> {
    let channel = format!("forkq_bench_{}", std::process::id());
    let mut listener = connect(url, "forkq-bench raw")?;
    listener.batch_execute(&format!("LISTEN {channel}"))?;
    let waiter = std::thread::spawn(move || -> BenchResult<Vec<u64>> {
        let mut arrivals = Vec::with_capacity(n);
        let mut notifications = listener.notifications();
        let mut it = notifications.blocking_iter();
        while arrivals.len() < n {
            if it.next()?.is_none() {
                break;
            }
            arrivals.push(sys::mono_ns());
        }
        Ok(arrivals)
    });
    let mut sender = connect(url, "forkq-bench raw")?;
    let notify = sender.prepare("SELECT pg_notify($1, '')")?;
    paced(&mut sender, &notify, &channel, n, waiter)
}

/// What one notification costs when many hosts listen.
pub struct Fanout {
    /// Notifications sent.
    pub sent: usize,
    /// Listening connections (one per host in forkq).
    pub listeners: usize,
    /// Notifications sent per second (each its own transaction, one connection, back to back).
    pub per_second: f64,
    /// Server CPU of the sending backend per notification, µs.
    pub sender_us: f64,
    /// Server CPU of all listening backends per notification and listener, µs.
    pub delivery_us: f64,
}

/// `n` notifications (autocommit `pg_notify`, back to back) from one connection to `listeners`
/// connections that LISTEN on the channel, each drained by a thread of its own: the cost of one
/// enqueue's wake-up when every host of a fleet listens.
pub fn notify_fanout(url: &str, listeners: usize, n: usize) -> BenchResult<Fanout> {
    let channel = format!("forkq_bench_fanout_{}", std::process::id());
    let tag = format!("forkq-bench fanout {}", std::process::id());
    let mut threads = Vec::new();
    for _ in 0..listeners {
        let mut client = connect(url, &tag)?;
        client.batch_execute(&format!("LISTEN {channel}"))?;
        // Each thread hands its connection back, so its backend is still there to be measured.
        threads.push(std::thread::spawn(move || -> BenchResult<Client> {
            let mut notifications = client.notifications();
            let mut it = notifications.timeout_iter(std::time::Duration::from_secs(30));
            for _ in 0..n {
                if it.next()?.is_none() {
                    return Err("a listener waited 30 s for a notification".into());
                }
            }
            drop(it);
            drop(notifications);
            Ok(client)
        }));
    }
    let mut sender = connect(url, &format!("{tag} sender"))?;
    let mut monitor = connect(url, "forkq-bench monitor")?;
    let pids = |monitor: &mut Client, name: &str| -> BenchResult<Vec<i32>> {
        Ok(monitor
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    };
    let listening = pids(&mut monitor, &tag)?;
    let sending = pids(&mut monitor, &format!("{tag} sender"))?;
    let (l0, s0) = (sys::cpu_total(&listening), sys::cpu_total(&sending));
    let notify = sender.prepare("SELECT pg_notify($1, 'default')")?;
    let start = Instant::now();
    for _ in 0..n {
        sender.execute(&notify, &[&channel])?;
    }
    let sent_in = start.elapsed().as_secs_f64();
    let mut done = Vec::new();
    for t in threads {
        done.push(t.join().map_err(|_| "a listener thread panicked")??);
    }
    let (l1, s1) = (sys::cpu_total(&listening), sys::cpu_total(&sending));
    drop(done);
    Ok(Fanout {
        sent: n,
        listeners,
        per_second: n as f64 / sent_in,
        sender_us: (s1 - s0) * 1e6 / n as f64,
        delivery_us: (l1 - l0) * 1e6 / (n * listeners) as f64,
    })
}
