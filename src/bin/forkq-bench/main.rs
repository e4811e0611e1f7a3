//! `make bench`: measures forkq against raw-SQL baselines in the same run, prints one markdown
//! table and writes docs/benchmarks.md, which also says how each figure is measured.
//!
//! `forkq-bench` runs the whole plan; `forkq-bench worker` is the library worker the latency and
//! recovery workloads spawn. Settings (environment): `DATABASE_URL`, `BENCH_FORKQ_BIN` (the release
//! `forkq`, default: next to this binary), `BENCH_QUICK=1` (about a minute instead of about four),
//! `BENCH_ONLY=raw,w1,durable,w2,w3,recovery,idle,scale` (a subset), `BENCH_OUT` (default
//! `docs/benchmarks.md`; `-` writes nothing), `BENCH_DIR` (logs, default `target/bench`).

mod daemon;
mod db;
mod raw;
mod report;
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
use workloads::{Ctx, Drain};

/// A W1 row: label, jobs, extra environment, whether the target applies.
type W1Variant = (String, usize, Vec<(&'static str, String)>, bool);

/// Sizes of one run: the full run stays under 5 minutes on 2 cores, the quick one near 1.
struct Plan {
    w1: [usize; 2],
    durable: usize,
    w2: usize,
    w3: usize,
    recovery_rounds: usize,
    idle_seconds: f64,
    scale_n: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                w1: [5_000, 20_000],
                durable: 5_000,
                w2: 200,
                w3: 100,
                recovery_rounds: 2,
                idle_seconds: 3.0,
                scale_n: 5_000,
            }
        } else {
            Plan {
                w1: [20_000, 100_000],
                durable: 20_000,
                w2: 500,
                w3: 400,
                recovery_rounds: 4,
                idle_seconds: 10.0,
                scale_n: 20_000,
            }
        }
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        std::process::exit(worker::main());
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
    };
    let plan = Plan::new(quick);
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
    let mut raw_results: Vec<(Baseline, usize, RawResult)> = Vec::new();
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
    if wants("raw") {
        for (baseline, n) in [
            (Baseline::Batch100, plan.w1[0]),
            (Baseline::Batch100, plan.w1[1]),
            (Baseline::OneCommitDelete, one_commit_n),
            (Baseline::OneCommitArchive, one_commit_n),
        ] {
            match raw::run(&url, baseline, n) {
                Ok(r) => {
                    report.add(
                        format!("{} ({}k jobs)", baseline.label(), n as f64 / 1000.0),
                        format!("{:.0} jobs/s; PG CPU {:.1} µs/job", r.rate, r.pg_us_per_job),
                        "baseline",
                        "",
                    );
                    raw_results.push((baseline, n, r));
                }
                Err(e) => report.add(baseline.label(), format!("error: {e}"), "", ""),
            }
        }
    }
    let raw_rate = |b: Baseline, n: usize| {
        raw_results
            .iter()
            .filter(|(rb, _, _)| std::mem::discriminant(rb) == std::mem::discriminant(&b))
            .min_by_key(|(_, rn, _)| rn.abs_diff(n))
            .map(|(_, _, r)| *r)
    };

    let retain0 = ("FORKQ_RETENTION_SECONDS", "0".to_string());
    let noop = || ("noop", json!({}));
    if wants("w1") {
        let (small, large) = (plan.w1[0], plan.w1[1]);
        let variants: Vec<W1Variant> = vec![
            (
                format!("W1 {}k noop, 2 children", small / 1000),
                small,
                vec![retain0.clone()],
                false,
            ),
            (
                format!("W1 {}k noop, 2 children", large / 1000),
                large,
                vec![retain0.clone()],
                true,
            ),
            (
                format!("W1 {}k, archive (default retention)", small / 1000),
                small,
                vec![],
                false,
            ),
            (
                format!("W1 {}k, FORKQ_PREFETCH=10", large / 1000),
                large,
                vec![retain0.clone(), ("FORKQ_PREFETCH", "10".into())],
                false,
            ),
        ];
        for (label, n, extra, headline) in variants {
            let result = workloads::drain(&ctx, "w1", n, noop(), &[2], &extra);
            let target = if headline { Some(0.9) } else { None };
            drain_row(
                &mut report,
                &label,
                result,
                raw_rate(Baseline::Batch100, n),
                "raw (a)",
                target,
            );
        }
    }
    if wants("durable") {
        let n = one_commit_n;
        let durable = ("FORKQ_DURABLE", "1".to_string());
        let result = workloads::drain(
            &ctx,
            "durable",
            n,
            noop(),
            &[2],
            &[durable.clone(), retain0.clone()],
        );
        drain_row(
            &mut report,
            &format!("W1-durable {}k, delete (retention 0)", n as f64 / 1000.0),
            result,
            raw_rate(Baseline::OneCommitDelete, n),
            "raw (b)",
            Some(0.9),
        );
        let result = workloads::drain(&ctx, "durable", n, noop(), &[2], &[durable]);
        drain_row(
            &mut report,
            &format!("W1-durable {}k, archive", n as f64 / 1000.0),
            result,
            raw_rate(Baseline::OneCommitArchive, n),
            "raw (c)",
            Some(0.9),
        );
    }
    if wants("w2") {
        match raw::notify_latency(&url, plan.w2.min(300)) {
            Ok(v) => report.add(
                "raw (d): bare NOTIFY → a LISTENing connection (floor under W2)",
                format!(
                    "p50 {:.2} / p95 {:.2} / p99 {:.2} / max {:.2} ms after the NOTIFY call returned",
                    percentile(&v, 0.5),
                    percentile(&v, 0.95),
                    percentile(&v, 0.99),
                    percentile(&v, 1.0)
                ),
                "baseline",
                "",
            ),
            Err(e) => report.add("raw (d): NOTIFY", format!("error: {e}"), "", ""),
        }
        {
            let extra: Vec<(&str, String)> = Vec::new();
            let label = format!("W2 {} jobs one by one at 100/s, idle fleet of 2", plan.w2);
            match workloads::latency(&ctx, plan.w2, 100, &extra) {
                Ok(l) => {
                    let spans = |v: &[f64]| {
                        format!(
                            "p50 {:.2} / p95 {:.2} / p99 {:.2} / max {:.2} ms",
                            percentile(v, 0.5),
                            percentile(v, 0.95),
                            percentile(v, 0.99),
                            percentile(v, 1.0)
                        )
                    };
                    let met = percentile(&l.from_commit, 0.5) <= 0.3
                        && percentile(&l.from_commit, 0.99) <= 1.0;
                    report.add(
                        format!("{label}: enqueue call → handler"),
                        spans(&l.from_call),
                        "peers: 1.5–2 ms p50, 3–5 ms p99",
                        "",
                    );
                    report.add(
                        format!("{label}: commit returned → handler"),
                        spans(&l.from_commit),
                        format!(
                            "the enqueue call itself: p50 {:.2} ms",
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
            let result =
                workloads::drain(&ctx, "w3", n, ("sleep", json!({"ms": 50})), &[2], &extra);
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
    if wants("scale") {
        let n = plan.scale_n;
        let base = raw_rate(Baseline::Batch100, n);
        let fleets: Vec<(String, Vec<usize>)> = [1usize, 2, 4, 16, 64]
            .iter()
            .map(|&c| (format!("scale {}k: {c} children", n / 1000), vec![c]))
            .chain([(
                format!("scale {}k: 4 daemons x 2 children, one schema", n / 1000),
                vec![2; 4],
            )])
            .collect();
        for (label, fleet) in fleets {
            let result = workloads::drain(
                &ctx,
                "scale",
                n,
                noop(),
                &fleet,
                std::slice::from_ref(&retain0),
            );
            drain_row(&mut report, &label, result, base, "raw (a)", None);
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
        std::fs::write(
            &out,
            report::document(&date, &machine, &settings, mode, elapsed, &table),
        )?;
        eprintln!("forkq-bench: wrote {out} ({elapsed:.0} s)");
    }
    Ok(())
}

/// A drain's row: rates, start-up, CPU split per job, ratio to the baseline.
fn drain_row(
    report: &mut Report,
    label: &str,
    result: BenchResult<Drain>,
    baseline: Option<RawResult>,
    baseline_name: &str,
    target: Option<f64>,
) {
    let d = match result {
        Ok(d) => d,
        Err(e) => return report.add(label, format!("error: {e}"), "", ""),
    };
    // A drain too fast to sample between 10 % and 90 % has no steady rate: say so, and compare
    // the whole run instead.
    let steady = d.steady.unwrap_or_else(|| d.rate());
    let steady_text = match d.steady {
        Some(rate) => format!("{rate:.0} jobs/s"),
        None => "n/a (too fast to sample)".into(),
    };
    let per_job = |s: f64| s * 1e6 / d.n as f64;
    let measured = format!(
        "{:.2} s spawn→empty = {:.0} jobs/s; steady {steady_text}; start-up {:.2} s; CPU/job: forkq {:.1} µs, PG {:.1} µs",
        d.total_s,
        d.rate(),
        d.first_job_s,
        per_job(d.forkq_cpu_s),
        per_job(d.pg_cpu_s)
    );
    let (versus, goal) = match baseline {
        Some(raw) => (
            format!(
                "steady {:.2}x {baseline_name}; spawn→empty {:.2}x; PG CPU/job {:.1}x",
                steady / raw.rate,
                d.rate() / raw.rate,
                per_job(d.pg_cpu_s) / raw.pg_us_per_job
            ),
            target.map(|t| {
                format!(
                    "steady ≥ {t}x {baseline_name}: {}",
                    verdict(steady / raw.rate >= t)
                )
            }),
        ),
        None => (String::new(), None),
    };
    report.add(label, measured, versus, goal.unwrap_or_default());
}
