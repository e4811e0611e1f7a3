//! The raw-SQL baselines: what two plain connections achieve with the same tables and indexes,
//! measured in the same run, so forkq's figures can be given as ratios to them.

use std::sync::{Arc, Barrier};

use postgres::fallible_iterator::FallibleIterator;
use std::time::Instant;

use crate::db::{connect, BenchResult, BenchSchema};
use crate::sys;

/// The picking subquery every baseline shares with forkq's claim: same predicate, same order,
/// so the same partial index serves it.
const PICK: &str = "SELECT id FROM {s}.jobs
    WHERE queue = 'default' AND state = 'available'
    ORDER BY priority, run_at, id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// The baselines of the issue.
#[derive(Clone, Copy, Debug)]
pub enum Baseline {
    /// (a) claim 100 per statement (UPDATE … SKIP LOCKED, setting a lease as forkq does), then
    /// delete them in one statement: two autocommit statements per 100 jobs.
    Batch100,
    /// (b) claim and delete one job per commit: `DELETE … WHERE id = (pick 1) RETURNING`.
    OneCommitDelete,
    /// (c) ack the previous job (delete, insert into the archive) and claim the next in one
    /// statement: one commit per job, the same work as forkq's durable mode with retention.
    OneCommitArchive,
}

impl Baseline {
    /// The row label.
    pub fn label(self) -> &'static str {
        match self {
            Baseline::Batch100 => "raw (a): claim 100/stmt + delete 100/stmt",
            Baseline::OneCommitDelete => "raw (b): claim+delete 1 job per commit",
            Baseline::OneCommitArchive => "raw (c): ack prev (archive) + claim next, 1 stmt/commit",
        }
    }
}

/// A baseline's result.
#[derive(Clone, Copy, Debug)]
pub struct RawResult {
    /// Jobs per second over the whole drain.
    pub rate: f64,
    /// PostgreSQL backend CPU per job, µs.
    pub pg_us_per_job: f64,
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
        threads.push(std::thread::spawn(move || -> BenchResult<(u64, f64)> {
            let owner = format!("raw-{worker}");
            let mut loop_ = Loop::prepare(&mut client, &schema, baseline)?;
            barrier.wait();
            let done = loop_.drain(&mut client, &owner)?;
            // Read while the connection (and so its backend) is still alive.
            Ok((done, sys::cpu_seconds(backend)))
        }));
    }
    let cpu_before = sys::cpu_total(&backends);
    barrier.wait();
    let started = Instant::now();
    let (mut done, mut cpu_after) = (0, 0.0);
    for t in threads {
        let (d, c) = t.join().map_err(|_| "a baseline thread panicked")??;
        done += d;
        cpu_after += c;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_after - cpu_before;
    if done as usize != n {
        return Err(format!("baseline finished {done} of {n} jobs").into());
    }
    Ok(RawResult {
        rate: n as f64 / elapsed,
        pg_us_per_job: cpu * 1e6 / n as f64,
    })
}

/// One connection's prepared statements for a baseline.
struct Loop {
    baseline: Baseline,
    first: postgres::Statement,
    second: Option<postgres::Statement>,
}

impl Loop {
    fn prepare(
        client: &mut postgres::Client,
        schema: &BenchSchema,
        baseline: Baseline,
    ) -> BenchResult<Loop> {
        let claim = format!(
            "UPDATE {{s}}.jobs j SET state = 'running', attempt = j.attempt + 1,
                 lease_owner = $2, lease_token = (random() * 9.2e18)::bigint,
                 lease_expires_at = now() + interval '30 seconds'
             FROM ({PICK}) p WHERE j.id = p.id
             RETURNING j.id, j.lease_token, j.payload"
        );
        let (first, second) = match baseline {
            Baseline::Batch100 => (
                client.prepare(&schema.sql(&claim))?,
                Some(client.prepare(&schema.sql("DELETE FROM {s}.jobs WHERE id = ANY($1)"))?),
            ),
            Baseline::OneCommitDelete => (
                client.prepare(&schema.sql(&format!(
                    "DELETE FROM {{s}}.jobs WHERE id = ({PICK}) RETURNING id, payload"
                )))?,
                None,
            ),
            Baseline::OneCommitArchive => (
                client.prepare(&schema.sql(&format!(
                    "WITH done AS (
                         DELETE FROM {{s}}.jobs WHERE id = $3 AND lease_token = $4 RETURNING *
                     ), archived AS (
                         INSERT INTO {{s}}.jobs_archive (id, queue, task, payload, priority, state,
                             attempt, max_attempts, unique_key, batch_id, created_at)
                         SELECT id, queue, task, payload, priority, 'completed', attempt,
                                max_attempts, unique_key, batch_id, created_at FROM done
                     ), claimed AS ({})
                     SELECT id, lease_token FROM claimed",
                    claim.replace(
                        "RETURNING j.id, j.lease_token, j.payload",
                        "RETURNING j.id, j.lease_token"
                    )
                )))?,
                None,
            ),
        };
        Ok(Loop {
            baseline,
            first,
            second,
        })
    }

    /// Runs until the queue is empty; returns the jobs this connection completed.
    fn drain(&mut self, client: &mut postgres::Client, owner: &str) -> BenchResult<u64> {
        let mut done = 0u64;
        match self.baseline {
            Baseline::Batch100 => loop {
                let rows = client.query(&self.first, &[&100i64, &owner])?;
                if rows.is_empty() {
                    return Ok(done);
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                let complete = self.second.as_ref().expect("prepared above");
                done += client.execute(complete, &[&ids])?;
            },
            Baseline::OneCommitDelete => loop {
                if client.query_opt(&self.first, &[&1i64])?.is_none() {
                    return Ok(done);
                }
                done += 1;
            },
            Baseline::OneCommitArchive => {
                let (mut prev, mut token) = (0i64, 0i64);
                loop {
                    let rows = client.query(&self.first, &[&1i64, &owner, &prev, &token])?;
                    match rows.first() {
                        Some(row) => {
                            if prev != 0 {
                                done += 1;
                            }
                            prev = row.get(0);
                            token = row.get(1);
                        }
                        // The final ack went with the claim that found nothing.
                        None => return Ok(done + u64::from(prev != 0)),
                    }
                }
            }
        }
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
    let start = Instant::now();
    let mut returned = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + std::time::Duration::from_millis(10 * i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sender.execute(&notify, &[&channel])?;
        returned.push(sys::mono_ns());
    }
    let arrivals = waiter
        .join()
        .map_err(|_| "the listener thread panicked")??;
    let mut out: Vec<f64> = returned
        .iter()
        .zip(&arrivals)
        .map(|(&r, &a)| (a as f64 - r as f64) / 1e6)
        .collect();
    out.sort_by(f64::total_cmp);
    Ok(out)
}
