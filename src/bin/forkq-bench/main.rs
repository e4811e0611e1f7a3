//! `make bench`: measures forkq against raw-SQL baselines in the same run, prints one markdown
//! table and writes docs/benchmarks.md, which also says how each figure is measured.
//!
//! `forkq-bench` runs the whole plan; `forkq-bench worker` is the library worker the latency and
//! recovery workloads spawn. Settings (environment): `DATABASE_URL`, `BENCH_FORKQ_BIN` (the release
//! `forkq`, default: next to this binary), `BENCH_QUICK=1` (a few minutes instead of about half
//! an hour), `BENCH_ONLY=raw,w1,crowded,durable,mixed,w2,w3,recovery,idle,scale,rest,fanout,purge,
//! soak` (a subset),
//! `BENCH_STOCK_URL` (a server with stock settings, for the second soak; `scripts/bench.sh`
//! starts a private one), `BENCH_SCALE_URL` (a server that takes the scale curve's ~300
//! connections, for scale, rest and fanout; default `DATABASE_URL`; `scripts/bench.sh` starts a
//! private one with pg_stat_statements), `BENCH_OUT`
//! (default `docs/benchmarks.md`, with the scale chart beside it; `-` writes nothing),
//! `BENCH_DIR` (logs, default `target/bench`), `BENCH_SCALE_POINTS=8x2,2x8` (only these points
//! of the scale curve, daemons x children).

mod daemon;
mod db;
mod pooler;
mod raw;
mod report;
mod scale;
mod sys;
mod worker;
mod workloads;

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use daemon::Programs;
use db::BenchResult;
use raw::{Baseline, RawResult};
use report::{verdict, Report};
use sys::percentile;
use workloads::{Crowd, Ctx, Drain};

/// Sizes of one run: the quick one takes a few minutes; the full one about half an hour, most of
/// it the two ten-minute soaks.
struct Plan {
    w1: usize,
    /// Raw and forkq drains back to back, per W1 and durable row (see `paired`): one pair's
    /// ratio moved between 0.58 and 1.09 within a row, so the median is of 5.
    pairs: usize,
    crowd: Crowd,
    /// Clean and crowded drains back to back (see `workloads::crowded_pairs`).
    crowded_pairs: usize,
    durable: usize,
    w2: usize,
    w3: usize,
    recovery_rounds: usize,
    idle_seconds: f64,
    scale: scale::Plan,
    fanout_n: usize,
    purge: usize,
    soak_seconds: u64,
}

impl Plan {
    fn new(quick: bool, points: Option<Vec<(usize, usize)>>) -> Plan {
        if quick {
            Plan {
                w1: 20_000,
                pairs: 1,
                crowd: Crowd {
                    scheduled: 100_000,
                    archived: 1_000_000,
                },
                crowded_pairs: 1,
                durable: 5_000,
                w2: 200,
                w3: 100,
                recovery_rounds: 2,
                idle_seconds: 3.0,
                scale: scale::Plan::new(true, points),
                fanout_n: 300,
                purge: 100_000,
                soak_seconds: 60,
            }
        } else {
            Plan {
                w1: 100_000,
                pairs: 5,
                crowd: Crowd {
                    scheduled: 1_000_000,
                    archived: 10_000_000,
                },
                crowded_pairs: 5,
                durable: 20_000,
                w2: 500,
                w3: 400,
                recovery_rounds: 4,
                idle_seconds: 10.0,
                scale: scale::Plan::new(false, points),
                fanout_n: 2_000,
                purge: 1_000_000,
                soak_seconds: 600,
            }
        }
    }
}

/// What `forkq-bench --help` prints.
const USAGE: &str = "\
forkq-bench: measures forkq against raw-SQL loops doing the same work, in the same run; prints one
markdown table and writes docs/benchmarks.md. Run it through `make bench` (which builds the release
binaries and starts the private clusters), or directly with the settings below. Never fails on a
number, only on errors.

Usage: forkq-bench            run the plan the settings below choose
       forkq-bench worker     the library worker the latency and recovery workloads spawn

Settings (environment):
  DATABASE_URL        the server to measure (make bench: 127.0.0.1:5432/test or a private cluster)
  BENCH_FORKQ_BIN     the release forkq binary (default: next to this one)
  BENCH_QUICK=1       a run of a few minutes instead of about half an hour
  BENCH_ONLY=LIST     a subset: raw,w1,crowded,durable,mixed,w2,w3,recovery,idle,scale,rest,fanout,
                      purge,soak
  BENCH_SCALE_POINTS  only these points of the scale curve, e.g. 8x2,2x8 (daemons x children)
  BENCH_STOCK_URL     a server with stock settings for the second soak (empty: skip it)
  BENCH_SCALE_URL     a server with room for ~300 connections for scale, rest and fanout
  BENCH_OUT           the report (default docs/benchmarks.md; - writes nothing)
  BENCH_DIR           logs (default target/bench)
";

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("worker") => std::process::exit(worker::main()),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return;
        }
        Some(other) => {
            eprintln!("forkq-bench: unknown argument {other:?}; see forkq-bench --help");
            std::process::exit(65);
        }
        None => {}
    }
    if let Err(e) = run() {
        eprintln!("forkq-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> BenchResult<()> {
    let begun = Instant::now();
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let wants = |name: &str| match &only {
        None => true,
        Some(o) => o.iter().any(|s| s == name),
    };
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let bench = std::env::current_exe()?;
    let forkq = std::env::var("BENCH_FORKQ_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| bench.with_file_name("forkq"));
    if !forkq.is_file() {
        return Err(format!(
            "no forkq binary at {} (build it with `cargo build --release` or set BENCH_FORKQ_BIN)",
            forkq.display()
        )
        .into());
    }
    let work_dir =
        PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench".into()));
    std::fs::create_dir_all(&work_dir)?;
    let ctx = Ctx {
        url: url.clone(),
        programs: Programs {
            forkq,
            bench,
            work_dir,
        },
        via: None,
    };
    let points = match std::env::var("BENCH_SCALE_POINTS") {
        Ok(text) => Some(scale::Plan::points_from(&text)?),
        Err(_) => None,
    };
    let plan = Plan::new(quick, points);
    let machine = sys::machine();
    let settings = db::server_settings(&url)?;
    let date: String = db::connect(&url, "forkq-bench")?
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"')",
            &[],
        )?
        .get(0);
    eprintln!(
        "forkq-bench: {} run against {url}",
        if quick { "quick" } else { "full" }
    );

    let mut report = Report::default();
    // One-commit-per-job loops run at the disk's fsync rate, which varies 20x between an idle and
    // a busy machine: size them to about 4 s at the measured commit latency, so the run stays
    // bounded, and give forkq's durable mode the same size, so the comparison stays fair.
    let mut one_commit_n = plan.durable;
    if wants("raw") || wants("durable") {
        match raw::commit_latency(&url, 200) {
            Ok(v) => {
                let per_second = 2.0 * 1e3 / percentile(&v, 0.5).max(0.01);
                one_commit_n = ((per_second * 4.0 / 100.0) as usize * 100).clamp(500, plan.durable);
                report.add(
                    "one durable commit (1-row INSERT, 1 connection, x200)",
                    format!(
                        "p50 {:.2} / p99 {:.2} ms",
                        percentile(&v, 0.5),
                        percentile(&v, 0.99)
                    ),
                    "bounds every commit-per-round loop",
                    "",
                );
            }
            Err(e) => report.add("one durable commit", format!("error: {e}"), "", ""),
        }
    }
    let round100 = |archive| Baseline {
        batch: 100,
        archive,
    };
    let round1 = |archive| Baseline { batch: 1, archive };
    if wants("raw") {
        // W1 and durable drain their baselines beside them, in pairs (see `paired`).
        let mut baselines = Vec::new();
        if !wants("w1") {
            baselines.extend([(round100(true), plan.w1), (round100(false), plan.w1)]);
        }
        if !wants("durable") {
            baselines.extend([(round1(true), one_commit_n), (round1(false), one_commit_n)]);
        }
        for (baseline, n) in baselines {
            match raw::run(&url, baseline, n) {
                Ok(r) => report.add(
                    format!("{} ({}k jobs)", baseline.label(), n as f64 / 1000.0),
                    raw_text(&r),
                    "baseline",
                    "",
                ),
                Err(e) => report.add(baseline.label(), format!("error: {e}"), "", ""),
            }
        }
    }

    let retain0 = ("FORKQ_RETENTION_SECONDS", "0".to_string());
    if wants("w1") {
        for (archive, extra) in [(true, vec![]), (false, vec![retain0.clone()])] {
            let baseline = round100(archive);
            let label = format!(
                "W1 {}k noop, 2 children, {}",
                plan.w1 / 1000,
                if archive {
                    "default retention (archive)"
                } else {
                    "FORKQ_RETENTION_SECONDS=0"
                }
            );
            match paired(&ctx, "w1", baseline, plan.w1, &extra, plan.pairs) {
                Ok(pairs) => {
                    paired_rows(
                        &mut report,
                        &label,
                        raw_names(baseline),
                        &pairs,
                        ISSUE_TARGETS,
                    );
                }
                Err(e) => report.add(label, format!("error: {e}"), "", ""),
            }
        }
    }
    if wants("crowded") {
        let (n, crowd) = (plan.w1, plan.crowd);
        let label = format!(
            "W1 {}k crowded: {}k scheduled for tomorrow in the same queue, {}M archived",
            n / 1000,
            crowd.scheduled / 1000,
            crowd.archived as f64 / 1e6
        );
        match workloads::crowded_pairs(&ctx, n, crowd, plan.crowded_pairs) {
            Ok(pairs) => {
                let pairs: Vec<(RawResult, Drain)> = pairs
                    .into_iter()
                    .map(|p| (measured(&p.clean), p.crowded))
                    .collect();
                let clean = (
                    format!("W1 {}k noop, 2 children, no crowd", n / 1000),
                    "the clean drain".to_string(),
                );
                paired_rows(&mut report, &label, clean, &pairs, (0.9, f64::INFINITY));
            }
            Err(e) => report.add(label, format!("error: {e}"), "", ""),
        }
    }
    if wants("durable") {
        let durable = ("FORKQ_DURABLE", "1".to_string());
        for (archive, extra) in [
            (true, vec![durable.clone()]),
            (false, vec![durable.clone(), retain0.clone()]),
        ] {
            let baseline = round1(archive);
            let label = format!(
                "W1-durable {}k, {}",
                one_commit_n as f64 / 1000.0,
                if archive {
                    "archive"
                } else {
                    "delete (retention 0)"
                }
            );
            match paired(&ctx, "durable", baseline, one_commit_n, &extra, plan.pairs) {
                Ok(pairs) => {
                    let names = raw_names(baseline);
                    paired_rows(&mut report, &label, names, &pairs, (0.9, f64::INFINITY));
                }
                Err(e) => report.add(label, format!("error: {e}"), "", ""),
            }
        }
    }
    if wants("mixed") {
        let label = "mixed: 500 noops, one 10 s job, 200 noops, 2 children";
        match workloads::mixed(&ctx, 500, 200) {
            Ok(m) => report.add(
                label,
                format!(
                    "{} of {} noops finished over 1 s after the slow job started (the last {:.2} s after)",
                    m.late, m.fast, m.worst_s
                ),
                "",
                format!("none waits behind the slow job: {}", verdict(m.late == 0)),
            ),
            Err(e) => report.add(label, format!("error: {e}"), "", ""),
        }
    }
    if wants("w2") {
        let n = plan.w2.min(300);
        match raw::notify_latency(&url, n) {
            Ok(v) => report.add(
                "raw (d): bare NOTIFY → a LISTENing connection",
                format!("{} after the NOTIFY call returned", spans(&v)),
                "baseline",
                "",
            ),
            Err(e) => report.add("raw (d): NOTIFY", format!("error: {e}"), "", ""),
        }
        let floor = raw::listen_claim_latency(&url, n);
        match &floor {
            Ok(v) => report.add(
                "raw: W2 by hand: enqueue + NOTIFY, one statement; the LISTENing connection claims the job (floor under W2)",
                format!("{} after the enqueue call returned", spans(v)),
                "baseline",
                "",
            ),
            Err(e) => report.add("raw: W2 by hand", format!("error: {e}"), "", ""),
        }
        {
            let extra: Vec<(&str, String)> = Vec::new();
            let label = format!("W2 {} jobs one by one at 100/s, idle fleet of 2", plan.w2);
            match workloads::latency(&ctx, plan.w2, 100, &extra) {
                Ok(l) => {
                    let met = percentile(&l.from_commit, 0.5) <= 0.3
                        && percentile(&l.from_commit, 0.99) <= 1.0;
                    report.add(
                        format!("{label}: enqueue call → handler"),
                        spans(&l.from_call),
                        "peers: 1.5–2 ms p50, 3–5 ms p99",
                        "",
                    );
                    let beside_floor = floor.as_ref().map_or(String::new(), |f| {
                        format!(
                            "; {:.2}x the floor's p50, {:.2}x its p99",
                            percentile(&l.from_commit, 0.5) / percentile(f, 0.5),
                            percentile(&l.from_commit, 0.99) / percentile(f, 0.99)
                        )
                    });
                    report.add(
                        format!("{label}: commit returned → handler"),
                        spans(&l.from_commit),
                        format!(
                            "the enqueue call itself: p50 {:.2} ms{beside_floor}",
                            percentile(&l.enqueue, 0.5)
                        ),
                        format!("p50 ≤ 0.3, p99 ≤ 1 ms: {}", verdict(met)),
                    );
                }
                Err(e) => report.add(label, format!("error: {e}"), "", ""),
            }
        }
    }
    if wants("w3") {
        let n = plan.w3;
        let ideal = n as f64 * 0.05 / 2.0;
        {
            let extra: Vec<(&str, String)> = Vec::new();
            let result = workloads::drain(
                &ctx,
                "w3",
                n,
                ("sleep", json!({"ms": 50})),
                &[2],
                &extra,
                Crowd::default(),
            );
            let label = format!("W3 {n} sleep jobs of 50 ms, 2 children");
            match result {
                Ok(d) => report.add(
                    label,
                    format!(
                        "{:.3} s spawn→empty (start-up {:.3} s)",
                        d.total_s, d.first_job_s
                    ),
                    format!(
                        "ideal {ideal:.2} s; {:.1} % over",
                        (d.total_s / ideal - 1.0) * 100.0
                    ),
                    format!(
                        "≤ {:.2} s: {}",
                        ideal * 1.015,
                        verdict(d.total_s <= ideal * 1.015)
                    ),
                ),
                Err(e) => report.add(label, format!("error: {e}"), "", ""),
            }
        }
    }
    if wants("recovery") {
        let label = format!(
            "recovery: kill -9 the child running a 5 s job (x{})",
            plan.recovery_rounds
        );
        match workloads::recovery(&ctx, plan.recovery_rounds) {
            Ok(r) => {
                let list = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let worst = percentile(&r.job_again, 1.0);
                report.add(
                    format!("{label}: job running again"),
                    format!(
                        "median {:.1} ms (each: {} ms)",
                        percentile(&r.job_again, 0.5),
                        list(&r.job_again)
                    ),
                    "",
                    format!("< 100 ms: {}", verdict(worst < 100.0)),
                );
                report.add(
                    format!("{label}: replacement child polled"),
                    format!(
                        "median {:.1} ms (each: {} ms)",
                        percentile(&r.child_polls, 0.5),
                        list(&r.child_polls)
                    ),
                    "",
                    "",
                );
            }
            Err(e) => report.add(label, format!("error: {e}"), "", ""),
        }
    }
    if wants("idle") {
        match workloads::idle(&ctx, plan.idle_seconds) {
            Ok(i) => {
                report.add(
                    format!("idle: empty queue, 2 children, {:.0} s", i.seconds),
                    format!(
                        "forkq CPU {:.3} % of a core ({} processes: {}); their PG backends {:.3} %",
                        i.forkq_cpu_pct,
                        i.forkq_processes,
                        i.per_process
                            .iter()
                            .map(|(n, c)| format!("{n} {c:.3} %"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        i.pg_cpu_pct
                    ),
                    "from /proc/PID/task/*/schedstat (ns)",
                    format!("0 % (≤ 0.05 %): {}", verdict(i.forkq_cpu_pct <= 0.05)),
                );
                for (name, rss, pss) in &i.memory {
                    let target = if name == "idle child" {
                        format!("PSS ≤ 1 MiB: {}", verdict(*pss <= 1024))
                    } else {
                        String::new()
                    };
                    report.add(
                        format!("memory: {name}"),
                        format!(
                            "RSS {:.1} MiB, PSS {:.2} MiB",
                            *rss as f64 / 1024.0,
                            *pss as f64 / 1024.0
                        ),
                        "",
                        target,
                    );
                }
            }
            Err(e) => report.add("idle", format!("error: {e}"), "", ""),
        }
    }
    let scale_ctx = Ctx {
        url: std::env::var("BENCH_SCALE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| url.clone()),
        ..ctx.clone()
    };
    let mut scale_points = Vec::new();
    if wants("scale") {
        scale_points = scale::run(&scale_ctx, &plan.scale, &mut report);
    }
    if wants("rest") {
        scale::rest(&scale_ctx, &plan.scale, &mut report);
    }
    if wants("fanout") {
        for listeners in [1, 100] {
            let label = format!(
                "raw (e): {} NOTIFYs, each its own transaction, to {listeners} LISTENing \
                 connection(s)",
                plan.fanout_n
            );
            match raw::notify_fanout(&scale_ctx.url, listeners, plan.fanout_n) {
                Ok(f) => report.add(
                    label,
                    format!(
                        "{:.0} notifications/s; PG CPU per notification: sender {:.1} µs, each \
                         listener {:.1} µs",
                        f.per_second, f.sender_us, f.delivery_us
                    ),
                    format!("{} deliveries", f.sent * f.listeners),
                    "",
                ),
                Err(e) => report.add(label, format!("error: {e}"), "", ""),
            }
        }
    }

    if wants("purge") {
        let n = plan.purge;
        let label = format!(
            "purge: {}k completed jobs past a 1 s retention, 2 children",
            n / 1000
        );
        match workloads::purge(&ctx, n) {
            Ok(rate) => report.add(
                label,
                format!("{rate:.0} rows/s, daemon start included"),
                "must keep pace with the highest drain rate above",
                "",
            ),
            Err(e) => report.add(label, format!("error: {e}"), "", ""),
        }
    }
    if wants("soak") {
        let stock = std::env::var("BENCH_STOCK_URL").unwrap_or_default();
        let servers = [
            (url.clone(), "this server"),
            (
                stock,
                "a private cluster with stock settings (autovacuum on)",
            ),
        ];
        for (server, which) in servers.iter().filter(|(u, _)| !u.is_empty()) {
            let label = format!(
                "soak {} s, producer keeps 200k waiting, 2 children, default retention, on {which}",
                plan.soak_seconds
            );
            match workloads::soak(&ctx, server, plan.soak_seconds, 200_000) {
                Ok(soak) => {
                    let first = soak.per_window.first().copied().unwrap_or(0.0);
                    let last = soak.per_window.last().copied().unwrap_or(0.0);
                    report.add(
                        label,
                        format!(
                            "jobs/s per {} s: {}; PG CPU {:.1} µs/job; at the end: hot table {} rows, {:.0} MB; archive {:.0} MB",
                            soak.window_s,
                            soak.per_window
                                .iter()
                                .map(|r| format!("{r:.0}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            soak.pg_us_per_job,
                            soak.hot_rows,
                            soak.hot_bytes as f64 / 1e6,
                            soak.archive_bytes as f64 / 1e6
                        ),
                        format!("last window {:.2}x the first", last / first.max(1.0)),
                        format!("≥ 0.9x: {}", verdict(last >= 0.9 * first)),
                    );
                }
                Err(e) => report.add(label, format!("error: {e}"), "", ""),
            }
        }
    }

    let elapsed = begun.elapsed().as_secs_f64();
    let table = report.table();
    println!("{table}");
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "docs/benchmarks.md".into());
    if out != "-" {
        let mode = if quick {
            "quick (BENCH_QUICK=1)"
        } else {
            "full"
        };
        let chart = std::path::Path::new(&out).with_file_name("scale.svg");
        let chart = if scale_points.is_empty() {
            None
        } else {
            scale::chart(&scale_points, &chart, &format!("{mode} run, {date}"))?;
            eprintln!("forkq-bench: wrote {}", chart.display());
            chart.file_name().map(|n| n.to_string_lossy().into_owned())
        };
        std::fs::write(
            &out,
            report::document(
                &date,
                &machine,
                &settings,
                mode,
                elapsed,
                &table,
                chart.as_deref(),
            ),
        )?;
        eprintln!("forkq-bench: wrote {out} ({elapsed:.0} s)");
    }
    Ok(())
}

/// The issue's targets for a drain against the raw loop doing the same work: spawn→empty at
/// least 0.9x its rate, server CPU per job at most 1.15x its own.
const ISSUE_TARGETS: (f64, f64) = (0.9, 1.15);

/// A drain's row: rates, start-up, CPU split per job, and the ratios (spawn→empty rate, server
/// CPU per job) to a baseline `(rate, PG µs/job, name)` measured in the same run, checked against
/// A drain beside its raw baseline: `pairs` times, a raw drain of `n` jobs (`baseline`), then
/// forkq draining the same `n` noops (2 children, settings `extra`, schemas named after `label`)
/// right after it. This machine's
/// speed (and its disk's fsync rate) moves by half within minutes, so a ratio is only as good as
/// the two drains are close in time: each pair's ratio is taken on its own, and the row gives
/// their median.
fn paired(
    ctx: &Ctx,
    label: &str,
    baseline: Baseline,
    n: usize,
    extra: &[(&str, String)],
    pairs: usize,
) -> BenchResult<Vec<(RawResult, Drain)>> {
    (0..pairs)
        .map(|_| {
            let raw = raw::run(&ctx.url, baseline, n)?;
            let job = ("noop", json!({}));
            let drain = workloads::drain(ctx, label, n, job, &[2], extra, Crowd::default())?;
            Ok((raw, drain))
        })
        .collect()
}

/// A raw baseline's row label and its short name in the ratios (see [`paired_rows`]).
fn raw_names(baseline: Baseline) -> (String, String) {
    let name = format!(
        "raw round of {} ({})",
        baseline.batch,
        if baseline.archive {
            "archive"
        } else {
            "delete"
        }
    );
    (baseline.label(), name)
}

/// A drain's figures as the side a drain is compared with in [`paired_rows`].
fn measured(d: &Drain) -> RawResult {
    RawResult {
        rate: d.rate(),
        pg_us_per_job: d.pg_us_per_job(),
        client_us_per_job: d.forkq_us_per_job(),
    }
}

/// The rows of drains taken in pairs, each right after what it is compared with (a raw loop of
/// the same work, see [`paired`], or a clean drain): the base's median, labelled and named by
/// `base`, then forkq's median drain with the median of the pairs' ratios and each pair's,
/// judged against `targets` (least jobs/s ratio, most server CPU ratio).
fn paired_rows(
    report: &mut Report,
    label: &str,
    base: (String, String),
    pairs: &[(RawResult, Drain)],
    targets: (f64, f64),
) {
    // The pair whose `key` is the median of the pairs'.
    let middle = |key: &dyn Fn(&(RawResult, Drain)) -> f64| {
        let mut sorted: Vec<&(RawResult, Drain)> = pairs.iter().collect();
        sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
        sorted[(sorted.len() - 1) / 2]
    };
    let rate_of = |(r, d): &(RawResult, Drain)| d.rate() / r.rate;
    let cpu_of = |(r, d): &(RawResult, Drain)| d.pg_us_per_job() / r.pg_us_per_job;
    let both_of = |(r, d): &(RawResult, Drain)| {
        (d.pg_us_per_job() + d.forkq_us_per_job()) / (r.pg_us_per_job + r.client_us_per_job)
    };
    let (rate_ratio, cpu_ratio) = (rate_of(middle(&rate_of)), cpu_of(middle(&cpu_of)));
    let both_ratio = both_of(middle(&both_of));
    let rates: Vec<f64> = pairs.iter().map(rate_of).collect();
    let cpus: Vec<f64> = pairs.iter().map(cpu_of).collect();
    let raw = middle(&|(r, _)| r.rate).0;
    let drain = &middle(&|(_, d)| d.rate()).1;
    let of = |k: usize| {
        if k == 1 {
            String::new()
        } else {
            format!(", median of {k} drains")
        }
    };
    let (base_label, name) = base;
    report.add(
        format!(
            "{base_label} ({}k jobs{})",
            drain.n as f64 / 1000.0,
            of(pairs.len())
        ),
        raw_text(&raw),
        "baseline",
        "",
    );
    let each = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (least, most) = targets;
    let goal = if most.is_finite() {
        format!(
            "≥ {least}x and CPU ≤ {most}x: {}",
            verdict(rate_ratio >= least && cpu_ratio <= most)
        )
    } else {
        format!("≥ {least}x: {}", verdict(rate_ratio >= least))
    };
    report.add(
        format!("{label}{}", of(pairs.len())),
        drain_text(drain),
        format!(
            "spawn→empty {rate_ratio:.2}x {name}; PG CPU/job {cpu_ratio:.2}x; client and PG \
             CPU/job {both_ratio:.2}x (each pair, drained back to back: {} and {})",
            each(&rates),
            each(&cpus)
        ),
        goal,
    );
}

/// Sorted milliseconds as a row gives them: "p50 … / p95 … / p99 … / max … ms".
fn spans(v: &[f64]) -> String {
    format!(
        "p50 {:.2} / p95 {:.2} / p99 {:.2} / max {:.2} ms",
        percentile(v, 0.5),
        percentile(v, 0.95),
        percentile(v, 0.99),
        percentile(v, 1.0)
    )
}

/// What a baseline (a raw loop, or a clean drain) measured, for its row.
fn raw_text(r: &RawResult) -> String {
    format!(
        "{:.0} jobs/s; CPU/job: client {:.1} µs, PG {:.1} µs",
        r.rate, r.client_us_per_job, r.pg_us_per_job
    )
}

/// What a drain measured, for its row.
fn drain_text(d: &Drain) -> String {
    let steady_text = match d.steady {
        Some(rate) => format!("{rate:.0} jobs/s"),
        None => "n/a (too fast to sample)".into(),
    };
    let per_job = |s: f64| s * 1e6 / d.n as f64;
    format!(
        "{:.2} s spawn→empty = {:.0} jobs/s; steady {steady_text}; start-up {:.2} s; CPU/job: forkq {:.1} µs, PG {:.1} µs",
        d.total_s,
        d.rate(),
        d.first_job_s,
        per_job(d.forkq_cpu_s),
        per_job(d.pg_cpu_s)
    )
}
