//! The scale curve: 1, 2, 4 and 8 daemons x 2, 8 and 32 children on one schema, each point's
//! throughput and server CPU per job, compared with the best point at the same total of
//! children; the same drain through PgBouncer in transaction mode; what hosts cost at rest
//! (`BENCH_ONLY=rest`); and docs/scale.svg, the curve as a chart.

use std::path::Path;

use plotters::prelude::*;
use serde_json::json;

use crate::db::BenchResult;
use crate::pooler::PgBouncer;
use crate::report::{verdict, Report};
use crate::workloads::{self, Ctx, Drain, Rest};

/// Server connections of the benchmark's PgBouncer: a few per core of this 2-core server, the
/// size a transaction-mode pool in front of a small database would have.
pub const POOL_SIZE: u32 = 8;

/// Which points to run and how big.
pub struct Plan {
    /// The points (daemons, children per daemon) that drain directly.
    pub direct: Vec<(usize, usize)>,
    /// Jobs per point, at least.
    pub base_n: usize,
    /// Jobs per child in all, so big fleets drain long enough to be measured past start-up.
    pub per_child: usize,
    /// The fleets that also drain through PgBouncer (daemons, children).
    pub pooled: Vec<(usize, usize)>,
    /// How long the fleets at rest are watched.
    pub rest_seconds: f64,
    /// Drains per point, taken in turn over the whole curve (a slow minute of the shared machine
    /// then hits every point once rather than one point several times); the median counts. Five:
    /// with three, one point's drains spread over up to 1.5x within a run, and a point that drains
    /// as fast as its peer when the two alternate outside the bench read 0.79x of it.
    pub repeats: usize,
}

impl Plan {
    /// The whole curve, or (quick) its corners; `points` (`BENCH_SCALE_POINTS=8x2,2x8`), when
    /// given, are the only points run, directly and through PgBouncer alike.
    pub fn new(quick: bool, points: Option<Vec<(usize, usize)>>) -> Plan {
        let grid = |daemons: &[usize], children: &[usize]| -> Vec<(usize, usize)> {
            daemons
                .iter()
                .flat_map(|&d| children.iter().map(move |&c| (d, c)))
                .collect()
        };
        let mut plan = if quick {
            Plan {
                direct: grid(&[1, 4], &[2, 32]),
                base_n: 5_000,
                per_child: 100,
                pooled: vec![(1, 2), (4, 32)],
                rest_seconds: 3.0,
                repeats: 1,
            }
        } else {
            Plan {
                direct: grid(&[1, 2, 4, 8], &[2, 8, 32]),
                base_n: 60_000,
                per_child: 500,
                pooled: vec![(1, 2), (4, 32)],
                rest_seconds: 10.0,
                repeats: 5,
            }
        };
        if let Some(points) = points {
            plan.pooled.retain(|p| points.contains(p));
            plan.direct = points;
        }
        plan
    }

    /// Parses `BENCH_SCALE_POINTS` ("DxC,DxC"): the points to run instead of the whole curve.
    pub fn points_from(text: &str) -> Result<Vec<(usize, usize)>, String> {
        text.split(',')
            .map(|p| {
                let (d, c) = p.trim().split_once('x').unwrap_or(("", ""));
                match (d.parse::<usize>(), c.parse::<usize>()) {
                    (Ok(d), Ok(c)) if d > 0 && c > 0 => Ok((d, c)),
                    _ => Err(format!(
                        "BENCH_SCALE_POINTS: {p:?} is not DAEMONSxCHILDREN (for example 8x2,2x8)"
                    )),
                }
            })
            .collect()
    }

    fn jobs(&self, total_children: usize) -> usize {
        self.base_n.max(self.per_child * total_children)
    }
}

/// One measured point of the curve.
pub struct Point {
    daemons: usize,
    children: usize,
    /// Through PgBouncer.
    pooled: bool,
    drain: Drain,
    /// CPU seconds of PgBouncer during the drain (pooled points).
    pooler_cpu_s: f64,
    /// The slowest and fastest throughput of the point's drains, and how many there were.
    spread: (f64, f64),
    drains: usize,
}

impl Point {
    fn total(&self) -> usize {
        self.daemons * self.children
    }

    /// Jobs per second: the steady rate (10 % to 90 % done), or enqueue→empty when the drain was
    /// too fast to sample.
    fn throughput(&self) -> f64 {
        self.drain.steady.unwrap_or_else(|| self.drain.rate())
    }

    fn pg_us_per_job(&self) -> f64 {
        self.drain.pg_us_per_job()
    }

    fn label(&self) -> String {
        format!(
            "{} daemon(s) x {} children ({} in all){}, {}k noop",
            self.daemons,
            self.children,
            self.total(),
            if self.pooled {
                format!(", through PgBouncer (pool {POOL_SIZE}, commits asynchronous)")
            } else {
                String::new()
            },
            self.drain.n / 1000
        )
    }

    fn measured(&self) -> String {
        let d = &self.drain;
        let per_job = |s: f64| s * 1e6 / d.n as f64;
        let steady = d
            .steady
            .map_or("n/a".into(), |r| format!("{r:.0} jobs/s steady"));
        let runs = match self.drains {
            1 => String::new(),
            n => format!(
                "median of {n} drains ({:.0}-{:.0} jobs/s): ",
                self.spread.0, self.spread.1
            ),
        };
        let mut text = format!(
            "{runs}{steady}; enqueue→empty {:.0} jobs/s; {:.1} jobs per claim round, {:.0} % of \
             rounds found no turn; CPU/job: PG {:.1} µs, forkq {:.1} µs",
            d.rate(),
            d.n as f64 / d.claims.max(1) as f64,
            100.0 * d.turns_missed as f64 / d.claims.max(1) as f64,
            per_job(d.pg_cpu_s),
            per_job(d.forkq_cpu_s)
        );
        if self.pooled {
            text.push_str(&format!(", PgBouncer {:.1} µs", per_job(self.pooler_cpu_s)));
        }
        if let Some(f) = &d.fleet_start {
            text.push_str(&format!(
                "; the fleet's start before it (spawn to settled, {:.1} s): PG {:.0} ms, forkq {:.0} ms of CPU",
                f.seconds,
                f.pg_cpu_s * 1e3,
                f.forkq_cpu_s * 1e3
            ));
        }
        text
    }
}

/// Runs the curve on `ctx` (a server that takes 8 x 35 connections) and the pooled points
/// through a PgBouncer of their own each; adds the rows to `report` and returns the points for
/// the chart.
pub fn run(ctx: &Ctx, plan: &Plan, report: &mut Report) -> Vec<Point> {
    let fleets: Vec<(usize, usize, bool)> = plan
        .direct
        .iter()
        .map(|&(d, c)| (d, c, false))
        .chain(plan.pooled.iter().map(|&(d, c)| (d, c, true)))
        .collect();
    let mut drains: Vec<Vec<Point>> = fleets.iter().map(|_| Vec::new()).collect();
    for _ in 0..plan.repeats {
        for (i, &(daemons, children, pooled)) in fleets.iter().enumerate() {
            match drain_point(ctx, plan, daemons, children, pooled) {
                Ok(point) => drains[i].push(point),
                Err(e) => report.add(
                    format!("scale: {daemons} daemon(s) x {children} children"),
                    format!("error: {e}"),
                    "",
                    "",
                ),
            }
        }
    }
    let points: Vec<Point> = drains.into_iter().filter_map(median).collect();
    for p in &points {
        let (versus, target) = compare(p, &points);
        report.add(p.label(), p.measured(), versus, target);
    }
    points
}

/// One drain of one point, through a PgBouncer of its own when `pooled`.
fn drain_point(
    ctx: &Ctx,
    plan: &Plan,
    daemons: usize,
    children: usize,
    pooled: bool,
) -> BenchResult<Point> {
    let bouncer = pooled
        .then(|| start_pooler(ctx, daemons, children))
        .transpose()?;
    let ctx = Ctx {
        via: bouncer.as_ref().map(|b| b.url.clone()),
        ..ctx.clone()
    };
    let before = bouncer.as_ref().map_or(0.0, PgBouncer::cpu_seconds);
    let drain = workloads::drain_ready(
        &ctx,
        "scale",
        plan.jobs(daemons * children),
        ("noop", json!({})),
        &vec![children; daemons],
        &[("FORKQ_RETENTION_SECONDS", "0".to_string())],
    )?;
    let mut point = Point {
        daemons,
        children,
        pooled,
        pooler_cpu_s: bouncer.as_ref().map_or(0.0, PgBouncer::cpu_seconds) - before,
        drain,
        spread: (0.0, 0.0),
        drains: 1,
    };
    point.spread = (point.throughput(), point.throughput());
    Ok(point)
}

/// The median drain of a point by throughput (the lower middle one of an even count), with the
/// spread of them all.
fn median(mut runs: Vec<Point>) -> Option<Point> {
    runs.sort_by(|a, b| a.throughput().total_cmp(&b.throughput()));
    let spread = (runs.first()?.throughput(), runs.last()?.throughput());
    let drains = runs.len();
    let mut point = runs.swap_remove((drains - 1) / 2);
    point.spread = spread;
    point.drains = drains;
    Some(point)
}

/// 8 hosts of 8 children at rest and busy with long jobs: what hosts cost when no job finishes.
pub fn rest(ctx: &Ctx, plan: &Plan, report: &mut Report) {
    for (what, busy) in [
        ("at rest: empty queue", false),
        (
            "busy with long jobs (FORKQ_LEASE_SECONDS=4: a renewal per child every 1.3 s)",
            true,
        ),
    ] {
        let label = format!("8 daemons x 8 children {what}");
        match workloads::rest(ctx, 8, 8, plan.rest_seconds, busy) {
            Ok(r) => report.add(label, rest_text(&r), "", ""),
            Err(e) => report.add(label, format!("error: {e}"), "", ""),
        }
    }
}

/// A PgBouncer for one pooled point, logging next to the daemons' logs. Its server connections
/// get what a direct worker sets for its session (docs/pooler.md: the role's settings, or this),
/// so the two paths do the same work.
fn start_pooler(ctx: &Ctx, daemons: usize, children: usize) -> BenchResult<PgBouncer> {
    let log = ctx
        .programs
        .work_dir
        .join(format!("pgbouncer-{daemons}x{children}.log"));
    PgBouncer::start(&ctx.url, POOL_SIZE, SESSION_SETTINGS, &log)
}

/// What a direct worker of the default configuration sets for its session.
const SESSION_SETTINGS: &str = "SET synchronous_commit = off; SET statement_timeout = 5000";

/// A direct point against the best direct point with as many children in all (the issue's
/// bound: no point below 0.9x of it); a pooled one against the direct point of the same fleet.
fn compare(p: &Point, points: &[Point]) -> (String, String) {
    if p.pooled {
        return match points
            .iter()
            .find(|q| !q.pooled && (q.daemons, q.children) == (p.daemons, p.children))
        {
            Some(direct) => (
                format!(
                    "{:.2}x the direct connections' jobs/s; PG CPU/job {:.2}x",
                    p.throughput() / direct.throughput(),
                    p.pg_us_per_job() / direct.pg_us_per_job()
                ),
                String::new(),
            ),
            None => (String::new(), String::new()),
        };
    }
    let peers: Vec<&Point> = points
        .iter()
        .filter(|q| !q.pooled && q.total() == p.total())
        .collect();
    let best = peers
        .iter()
        .max_by(|a, b| a.throughput().total_cmp(&b.throughput()))
        .expect("p is among its peers");
    if peers.len() < 2 {
        return (
            format!("the only point with {} children in all", p.total()),
            String::new(),
        );
    }
    let ratio = p.throughput() / best.throughput();
    (
        format!(
            "{ratio:.2}x the best with {} children in all ({} x {})",
            p.total(),
            best.daemons,
            best.children
        ),
        format!("≥ 0.9x: {}", verdict(ratio >= 0.9)),
    )
}

fn rest_text(r: &Rest) -> String {
    let per_host = |v: f64| v / r.hosts as f64;
    let statements = if r.statements.is_empty() {
        "statements: n/a (the server does not load pg_stat_statements)".to_string()
    } else {
        let total: f64 = r.statements.iter().map(|s| s.1).sum();
        let kinds: Vec<String> = r
            .statements
            .iter()
            .map(|(kind, per_s, ms)| format!("{kind} {:.2} ({ms:.2} ms)", per_host(*per_s)))
            .collect();
        format!(
            "{:.1} statements/s per host: {} (mean server time)",
            per_host(total),
            kinds.join(", ")
        )
    };
    format!(
        "over {:.0} s, {} busy children: PG CPU {:.2} % of a core per host; forkq CPU {:.2} % of \
         a core per host; {statements}",
        r.seconds,
        r.busy,
        per_host(r.pg_cpu_pct),
        per_host(r.forkq_cpu_pct),
    )
}

/// What a chart panel shows of each point.
type Measure = fn(&Point) -> f64;

/// Draws the curve into `path`: jobs/s (left) and PostgreSQL CPU per job (right) against the
/// children in all, one line per number of daemons, the pooled points as triangles.
pub fn chart(points: &[Point], path: &Path, subtitle: &str) -> BenchResult<()> {
    let root = SVGBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("forkq scale curve: noop drain, daemons x children on one schema ({subtitle})"),
        ("sans-serif", 16),
    )?;
    let (left, right) = root.split_horizontally(500);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let mut daemons: Vec<usize> = points.iter().map(|p| p.daemons).collect();
    daemons.sort_unstable();
    daemons.dedup();
    let measures: [(&str, Measure); 2] = [
        ("jobs/s", Point::throughput),
        ("PostgreSQL CPU µs per job", Point::pg_us_per_job),
    ];
    for (panel, (area, (what, value))) in [left, right].iter().zip(measures).enumerate() {
        let top = points.iter().map(value).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d((1u32..400u32).log_scale(), 0f64..top.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("children in all (log scale)")
            .y_desc(what)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, &d) in daemons.iter().enumerate() {
            let color = colors[i % colors.len()];
            let mut line: Vec<(u32, f64)> = points
                .iter()
                .filter(|p| p.daemons == d && !p.pooled)
                .map(|p| (p.total() as u32, value(p)))
                .collect();
            line.sort_by_key(|&(x, _)| x);
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(format!("{d} daemon(s)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.pooled)
                    .map(|p| TriangleMarker::new((p.total() as u32, value(p)), 7, BLACK.filled())),
            )?
            .label("through PgBouncer")
            .legend(|(x, y)| TriangleMarker::new((x + 8, y), 5, BLACK.filled()));
        // One legend for both panels, where the left one has room (few children: fast).
        if panel == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
