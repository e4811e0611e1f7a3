//! The result table and docs/benchmarks.md.

use std::fmt::Write as _;

/// One table row: workload, what was measured, the same-run comparison, the product target.
pub struct Row {
    /// What ran.
    pub workload: String,
    /// The measurement.
    pub measured: String,
    /// Ratio to a same-run baseline, or other context.
    pub versus: String,
    /// The target and whether this run met it.
    pub target: String,
}

/// Rows collected as workloads finish.
#[derive(Default)]
pub struct Report {
    /// The rows, in run order.
    pub rows: Vec<Row>,
}

impl Report {
    /// Adds a row.
    pub fn add(
        &mut self,
        workload: impl Into<String>,
        measured: impl Into<String>,
        versus: impl Into<String>,
        target: impl Into<String>,
    ) {
        let row = Row {
            workload: workload.into(),
            measured: measured.into(),
            versus: versus.into(),
            target: target.into(),
        };
        eprintln!(
            "  {} | {} | {} | {}",
            row.workload, row.measured, row.versus, row.target
        );
        self.rows.push(row);
    }

    /// The markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| Workload | Measured | Same-run comparison | Target (issue 6) |\n|---|---|---|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                r.workload, r.measured, r.versus, r.target
            );
        }
        out
    }
}

/// "met" or "missed" for a target check.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

/// docs/benchmarks.md: machine, server settings, date, the table and how it was measured.
pub fn document(
    date: &str,
    machine: &[(String, String)],
    settings: &[(String, String)],
    mode: &str,
    elapsed_s: f64,
    table: &str,
    chart: Option<&str>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# forkq benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `make bench` ({mode} run, {elapsed_s:.0} s) on {date}. Absolute rates vary about 2x \
         between machines of the same kind and with whatever else the machine is doing; only the \
         ratios to the raw-SQL baselines measured in the same run are meaningful.\n"
    );
    let _ = writeln!(out, "## Machine\n");
    for (k, v) in machine {
        let _ = writeln!(out, "* {k}: {v}");
    }
    let _ = writeln!(out, "\n## PostgreSQL\n");
    for (k, v) in settings {
        let _ = writeln!(out, "* {k}: {v}");
    }
    let _ = writeln!(out, "\n## Results\n\n{table}");
    if let Some(chart) = chart {
        let _ = writeln!(
            out,
            "## Scale curve, PgBouncer, hosts at rest\n\nThe scale rows above as a chart \
             (docs/sizing.md reads them with the rest and fanout rows): jobs/s and PostgreSQL CPU \
             per job against the children in all, one line per number of daemons; triangles \
             went through PgBouncer.\n\n![scale curve]({chart})\n"
        );
    }
    out.push_str(METHOD);
    out
}

const METHOD: &str = "
## How each figure is measured

* Every workload runs on a fresh schema (migrated with `forkq::queue::migrations::migrate`, dropped
  afterwards) against the release `forkq` binary, spawned as a real daemon and killed by its pid.
  Jobs are pre-enqueued with one `INSERT … SELECT generate_series` and the table is analyzed.
* **W1**: time from spawning `forkq run` to an empty hot table (start-up included), and the
  steady rate between 10 % and 90 % done (sampled every 10 ms from `/livez`, i.e. shared memory,
  and every millisecond over the last 3 % of the jobs, so the end is not seen late; until
  2026-12-03 it was seen 5 ms late on average).
  `FORKQ_RETENTION_SECONDS=0` (delete on completion) unless the row says *archive*, so the work
  matches the raw round of 100 it is compared with. CPU is the summed user+system time of all
  forkq processes and of the PostgreSQL backends serving them (found by an `application_name`
  tag), per job; the raw loops' own client CPU is their two threads' (`CLOCK_THREAD_CPUTIME_ID`),
  and *client and PG CPU/job* compares the two sums: on a machine whose cores the drain keeps
  busy, the jobs/s ratio follows that sum more closely than the server's share. *Pairs*: each
  W1 and W1-durable row drains 5 times (quick: once), each time right after a raw drain of the
  same work; the ratios are taken pair by pair and the row gives their median and each pair's
  (the machine's speed and its disk's fsync rate move within minutes, so only drains seconds
  apart compare). The raw row above each is the median of its raw drains.
* **Crowded**: one schema gets 1M jobs scheduled for tomorrow (priority -1, same queue) and 10M
  completed rows in the archive (quick: 100k and 1M), then `VACUUM (ANALYZE)` of both tables and
  a `CHECKPOINT`, as a server would have done while the rows built up. Then 5 times (quick: once)
  a W1 archive drain in a schema with no crowd, and right after it the same drain in the crowded
  schema; both schemas serve every pair (each hot table vacuumed before each drain but the first,
  after the previous drain's deletes), and the ratio is taken pair by pair, as above.
* **Scale curve** (rows `D daemon(s) x C children`, and the chart): on `BENCH_SCALE_URL`, a
  private cluster with stock settings and `max_connections=400` that `scripts/bench.sh` starts, so
  8 x 32 children fit and nothing else runs there. D daemons of C children each on one schema,
  max(60k, 500 x D x C) noop jobs (quick: 5k, 100 per child), retention 0. The fleet starts on
  the empty schema and settles (every child idle, every daemon's host row written after the last
  one appeared, so each counts the others, as the claim gate needs); then the jobs are added in
  one statement, analyzed and announced by one NOTIFY (as an enqueue sends) in one transaction,
  and the clock runs from its commit, so the idle fleet wakes itself up. The fleet's start
  is measured apart: seconds from spawn to settled, and the CPU of its backends and processes
  until then. Until 2026-12-02 the jobs were there before the spawn and the clock ran from it, so
  eight daemons' start-up (50 runs of `psql -c 'SELECT 1'` cost the scale cluster 300 ms of CPU) weighed on
  their drains of a second or two. Each point drains 5 times (quick: once), in five passes over
  the curve; in each pass the points with as many children in all drain one right after the
  other, in the opposite order every other pass (this machine's speed wanders by several times
  over minutes, so peers a minute apart compared its moments as much as the fleets; until
  2026-12-03 each pass ran the points in the order of the table). The row is the median drain
  by throughput. Throughput is the steady rate (10 % to 90 % done; enqueue→empty when too fast
  to sample); the comparison with the best point with the same children in all is the median of
  the point's drains over the best's drain of the same pass, each pass's ratio given (the best:
  the point that drained fastest beside the others). *Through PgBouncer*: the
  same drain with the daemons on a PgBouncer 1.18 in transaction mode (`scripts/pgbouncer.sh`, 8
  server connections whose `connect_query` sets what a direct worker sets for its session:
  `synchronous_commit = off`, `statement_timeout = 5000`) and `FORKQ_POOLER=transaction`, each
  daemon's listener on a direct connection (`FORKQ_LISTEN_DATABASE_URL`), compared with the
  direct point of the same fleet; PgBouncer's own CPU is counted per job.
* **At rest / busy with long jobs**: 8 daemons x 8 children on one schema, from 8 s after
  start-up (past the quick first host rows), watched for 10 s (quick: 3 s): their backends' CPU,
  the forkq processes' CPU and the statements they sent, by kind, with their mean server time
  (`pg_stat_statements`, reset at the start of the window, which is why it runs on a server of
  its own), per host.
  *Busy*: each child runs an hour-long `sleep` job with `FORKQ_LEASE_SECONDS=4` (the shortest), so
  it renews its lease every 1.3 s; the third row adds 80,000 jobs running under other lease owners
  (100 each, leased for an hour, in a queue of their own), so a renewal's cost beside them shows.
* **Raw (e)**: `pg_notify` back to back, each in its own transaction, from one connection, to 1 or
  100 connections that LISTEN on the channel (a thread each); CPU of the sending backend and of the
  listening backends per notification.
* **W1-durable**: `FORKQ_DURABLE=1` (prefetch 1, each ack committed before the next job starts);
  compared with the raw rounds of 1 (delete, archive), the one-commit-per-job loops.
* **W2**: the benchmark's own worker binary (`forkq-bench worker`: `forkq::run` with a Rust handler
  whose first line writes CLOCK_MONOTONIC to a file), 2 idle children, jobs enqueued one by one
  with the library's `forkq::queue::producer::enqueue` at a fixed rate. Two spans: from just before
  the enqueue call, and from the moment the call (and so its commit) returned. Its floors: raw
  (d), a bare `NOTIFY` reaching a listening connection; and *W2 by hand*: W2's work without
  forkq, 300 times (quick: 200), one every 10 ms: one autocommit statement inserts a job and
  notifies (synchronous commit), and the one connection that LISTENs claims it at once with the
  raw round of 1 (`synchronous_commit = off`, nothing to acknowledge: a woken worker's acks went
  with its last round), then acknowledges it in a round of its own, untimed; from the moment the
  enqueue call returned to the moment the claim returned. Both of its connections sit idle
  between jobs, as W2's do: a claim on a backend (and a CPU) that has been asleep costs more
  than one in a loop of rounds. W2 is given beside it as a ratio of p50s and of p99s; forkq's
  path has one hop more (the host's one listener wakes an idle child, which then claims).
* **W3**: builtin `sleep` jobs of 50 ms, 2 children, spawn to empty.
* **Recovery**: a 5 s job in the stamping worker; 1.2 s into each run the child running it is
  killed with SIGKILL; time to the handler's next start (any child) and to the replacement child's
  first poll (its slot in `/livez` shows the new pid in state idle or running).
* **Idle**: a builtin fleet of 2 on an empty queue, from 8 s after it is ready (past its start-up
  work): CPU from /proc/PID/stat of the supervisor, the probe and the children over the window;
  RSS/PSS from /proc/PID/smaps_rollup.
* **Raw baselines**: 2 threads of the bench binary, each with its own `postgres::Client`, on the
  same tables and partial claim index as forkq, with `synchronous_commit = on`. Each round is one
  statement of data-modifying CTEs: delete the previous round's jobs (fenced by their lease
  token), insert them into `jobs_archive` (*into the archive*) or not (*delete*), and claim the
  next 100 (or 1) with `FOR UPDATE SKIP LOCKED`, setting a lease. Nothing is timed in the raw
  loops but the loop itself.
";
