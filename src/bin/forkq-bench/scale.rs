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
    /// Passes over the curve, each draining every point once (see [`pass_order`]): a point's
    /// row gives its median drain, and its comparison the median of its drains over its peer's
    /// of the same pass. Five: with three, one point's drains spread over up to 1.5x within a
    /// run, and a point that drains as fast as its peer when the two alternate outside the bench
    /// read 0.79x of it.
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
    /// The throughput of the point's drain in each pass over the curve (none where it failed):
    /// its peers' drains of the same pass ran right beside it.
    passes: Vec<Option<f64>>,
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
        let drained: Vec<f64> = self.passes.iter().flatten().copied().collect();
        let slowest = drained.iter().copied().fold(f64::INFINITY, f64::min);
        let fastest = drained.iter().copied().fold(0.0, f64::max);
        let runs = match drained.len() {
            0 | 1 => String::new(),
            n => format!("median of {n} drains ({slowest:.0}-{fastest:.0} jobs/s): "),
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
    let mut drains: Vec<Vec<Option<Point>>> = fleets.iter().map(|_| Vec::new()).collect();
    for pass in 0..plan.repeats {
        for i in pass_order(&fleets, pass) {
            let (daemons, children, pooled) = fleets[i];
            let drained = drain_point(ctx, plan, daemons, children, pooled);
            if let Err(e) = &drained {
                report.add(
                    format!("scale: {daemons} daemon(s) x {children} children"),
                    format!("error: {e}"),
                    "",
                    "",
                );
            }
            drains[i].push(drained.ok());
        }
    }
    let points: Vec<Point> = drains.into_iter().filter_map(median).collect();
    for p in &points {
        let (versus, target) = compare(p, &points);
        report.add(p.label(), p.measured(), versus, target);
    }
    points
}

/// The order in which pass `pass` drains `fleets` (indexes into it): the direct points with as
/// many children in all one right after the other, so that the ones compared (see [`compare`])
/// drain within seconds of each other, and in the opposite order every other pass, so that
/// neither always drains first. This shared machine's speed wanders by several times over
/// minutes (a fixed loop timed every few seconds took 72-192 ms in one minute, 193-446 ms two
/// minutes later, on an otherwise idle machine): points a minute apart in one pass compared
/// the machine's moments as much as the fleets. The pooled points come last.
fn pass_order(fleets: &[(usize, usize, bool)], pass: usize) -> Vec<usize> {
    let mut totals: Vec<usize> = fleets
        .iter()
        .filter(|f| !f.2)
        .map(|&(d, c, _)| d * c)
        .collect();
    totals.sort_unstable();
    totals.dedup();
    let mut order = Vec::with_capacity(fleets.len());
    for total in totals {
        let mut peers: Vec<usize> = (0..fleets.len())
            .filter(|&i| !fleets[i].2 && fleets[i].0 * fleets[i].1 == total)
            .collect();
        if pass % 2 == 1 {
            peers.reverse();
        }
        order.extend(peers);
    }
    order.extend((0..fleets.len()).filter(|&i| fleets[i].2));
    order
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
    Ok(Point {
        daemons,
        children,
        pooled,
        pooler_cpu_s: bouncer.as_ref().map_or(0.0, PgBouncer::cpu_seconds) - before,
        drain,
        passes: Vec::new(),
    })
}

/// The median drain of a point by throughput (the lower middle one of an even count), with the
/// throughput of each pass's drain (`passes`, in pass order; none where it failed).
fn median(passes: Vec<Option<Point>>) -> Option<Point> {
    let throughputs: Vec<Option<f64>> = passes
        .iter()
        .map(|p| p.as_ref().map(Point::throughput))
        .collect();
    let mut runs: Vec<Point> = passes.into_iter().flatten().collect();
    runs.sort_by(|a, b| a.throughput().total_cmp(&b.throughput()));
    if runs.is_empty() {
        return None;
    }
    let mut point = runs.swap_remove((runs.len() - 1) / 2);
    point.passes = throughputs;
    Some(point)
}

/// 8 hosts of 8 children at rest and busy with long jobs, the latter also beside many jobs that
/// other hosts hold: what hosts cost when no job finishes.
pub fn rest(ctx: &Ctx, plan: &Plan, report: &mut Report) {
    for (what, busy, elsewhere) in [
        ("at rest: empty queue", false, 0),
        (
            "busy with long jobs (FORKQ_LEASE_SECONDS=4: a renewal per child every 1.3 s)",
            true,
            0,
        ),
        (
            "busy with long jobs (as above), and 80,000 more jobs running under other hosts' \
             leases, as 100 hosts of 8 children holding 100 each would",
            true,
            80_000,
        ),
    ] {
        let label = format!("8 daemons x 8 children {what}");
        match workloads::rest(ctx, 8, 8, plan.rest_seconds, busy, elsewhere) {
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
    if peers.len() < 2 {
        return (
            format!("the only point with {} children in all", p.total()),
            String::new(),
        );
    }
    // The best is the peer that drained fastest beside the others, pass by pass.
    let standing = |q: &Point| -> f64 {
        peers
            .iter()
            .filter_map(|o| paired(q, o))
            .map(|(ratio, _)| ratio.ln())
            .sum()
    };
    let best = peers
        .iter()
        .max_by(|a, b| standing(a).total_cmp(&standing(b)))
        .expect("p is among its peers");
    let by_pass = |each: Vec<f64>| -> String {
        let each: Vec<String> = each.iter().map(|r| format!("{r:.2}")).collect();
        each.join(", ")
    };
    if std::ptr::eq(p, *best) {
        let next = peers
            .iter()
            .filter(|q| !std::ptr::eq(**q, p))
            .max_by(|a, b| standing(a).total_cmp(&standing(b)))
            .expect("there are at least two peers");
        return (
            match paired(p, next) {
                Some((ratio, each)) => format!(
                    "the best with {} children in all: {ratio:.2}x {} x {} (its drains over \
                     that point's drain of the same pass: {})",
                    p.total(),
                    next.daemons,
                    next.children,
                    by_pass(each)
                ),
                None => format!("the best with {} children in all", p.total()),
            },
            format!("≥ 0.9x: {}", verdict(true)),
        );
    }
    let Some((ratio, each)) = paired(p, best) else {
        return (
            format!(
                "no pass drained both this point and {} x {}",
                best.daemons, best.children
            ),
            String::new(),
        );
    };
    (
        format!(
            "{ratio:.2}x the best with {} children in all ({} x {}): the median of its drains \
             over that point's drain of the same pass (each pass: {})",
            p.total(),
            best.daemons,
            best.children,
            by_pass(each)
        ),
        format!("≥ 0.9x: {}", verdict(ratio >= 0.9)),
    )
}

/// `p`'s throughput over `q`'s in each pass both drained in, in pass order, and their median
/// (the lower middle one of an even count, as [`median`] and the paired W1 rows take it); none
/// when no pass drained both.
fn paired(p: &Point, q: &Point) -> Option<(f64, Vec<f64>)> {
    let each: Vec<f64> = p
        .passes
        .iter()
        .zip(&q.passes)
        .filter_map(|(a, b)| Some((*a)? / (*b)?))
        .collect();
    let mut sorted = each.clone();
    sorted.sort_by(f64::total_cmp);
    let middle = *sorted.get(sorted.len().checked_sub(1)? / 2)?;
    Some((middle, each))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn point(daemons: usize, children: usize, passes: &[Option<f64>]) -> Point {
        Point {
            daemons,
            children,
            pooled: false,
            drain: Drain {
                n: 60_000,
                total_s: 1.0,
                first_job_s: 0.0,
                steady: passes.iter().flatten().next().copied(),
                forkq_cpu_s: 0.0,
                pg_cpu_s: 0.0,
                claims: 0,
                turns_missed: 0,
                fleet_start: None,
            },
            pooler_cpu_s: 0.0,
            passes: passes.to_vec(),
        }
    }

    #[test]
    fn peers_drain_side_by_side_and_swap_places_every_other_pass() {
        let fleets = [
            (1, 8, false),
            (2, 8, false),
            (1, 2, false),
            (8, 2, false),
            (4, 2, false),
            (4, 2, true),
        ];
        // 2 children: 1 x 2; 8: 1 x 8, 4 x 2; 16: 2 x 8, 8 x 2; then the pooled point.
        assert_eq!(pass_order(&fleets, 0), vec![2, 0, 4, 1, 3, 5]);
        assert_eq!(pass_order(&fleets, 1), vec![2, 4, 0, 3, 1, 5]);
        assert_eq!(pass_order(&fleets, 2), pass_order(&fleets, 0));
    }

    #[test]
    fn a_point_is_compared_pass_by_pass_with_its_best_peer() {
        // Pass by pass: 2 x 8's fastest drain came in the one pass 8 x 2 missed, which
        // therefore does not count.
        let fast = point(
            8,
            2,
            &[
                Some(30e3),
                Some(20e3),
                Some(40e3),
                None,
                Some(33e3),
                Some(31e3),
            ],
        );
        let slow = point(
            2,
            8,
            &[
                Some(27e3),
                Some(22e3),
                Some(36e3),
                Some(50e3),
                Some(30e3),
                Some(60e3),
            ],
        );
        let alone = point(1, 2, &[Some(40e3)]);
        let points = [fast, slow, alone];
        let (ratio, each) = paired(&points[1], &points[0]).unwrap();
        assert_eq!(each.len(), 5, "the pass 8 x 2 missed is left out");
        assert!(
            (ratio - 30.0 / 33.0).abs() < 1e-9,
            "{ratio}: the median of 0.9, 1.1, 0.9, 0.91, 1.94"
        );
        let (versus, target) = compare(&points[1], &points);
        assert!(
            versus.starts_with("0.91x the best with 16 children in all (8 x 2)"),
            "{versus}"
        );
        assert_eq!(target, "≥ 0.9x: met");
        let (versus, target) = compare(&points[0], &points);
        assert!(
            versus.starts_with("the best with 16 children in all: 1.10x 2 x 8"),
            "{versus}"
        );
        assert_eq!(target, "≥ 0.9x: met");
        let (versus, target) = compare(&points[2], &points);
        assert_eq!(
            (versus.as_str(), target.as_str()),
            ("the only point with 2 children in all", "")
        );
        assert!(paired(&points[0], &point(8, 2, &[None, None])).is_none());
    }
}
