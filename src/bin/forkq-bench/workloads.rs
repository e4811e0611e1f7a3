//! The workloads of `make bench`, each on a fresh schema with a real fleet.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use forkq::queue::producer::{self, Limits};
use serde_json::{json, Value};

use crate::daemon::{Daemon, Program, Programs};
use crate::db::{connect, BenchResult, BenchSchema};
use crate::sys::{self, mono_ns};
use crate::worker::{read_stamps, STAMPS_VAR};

/// What every workload needs.
#[derive(Clone)]
pub struct Ctx {
    /// The database.
    pub url: String,
    /// The binaries and the work directory.
    pub programs: Programs,
    /// A pooler in transaction mode the daemons of a drain go through (`FORKQ_POOLER=transaction`,
    /// tagged like the direct URL); schemas are made and watched directly.
    pub via: Option<String>,
}

/// A drain: jobs, fleets, time until the hot table is empty; when the clock starts depends on
/// the [`Start`].
#[derive(Debug, Clone)]
pub struct Drain {
    /// Jobs drained.
    pub n: usize,
    /// Seconds from the start of the clock to an empty hot table.
    pub total_s: f64,
    /// Seconds from the start of the clock to the first finished job.
    pub first_job_s: f64,
    /// Jobs per second between 10 % and 90 % done.
    pub steady: Option<f64>,
    /// CPU seconds of every forkq process (supervisors, probes, children) while the clock ran.
    pub forkq_cpu_s: f64,
    /// CPU seconds of the PostgreSQL backends serving them while the clock ran.
    pub pg_cpu_s: f64,
    /// Claim round trips of all the children.
    pub claims: u64,
    /// How many of those found no claim turn in the database (and then queued for one).
    pub turns_missed: u64,
    /// What the fleets cost to start, when that was before the clock ([`Start::Ready`]).
    pub fleet_start: Option<FleetStart>,
}

/// How a drain's fleets meet its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The jobs are in the table when the fleets are spawned, and the clock runs from the spawn:
    /// the fleets' start-up is part of the drain.
    Spawned,
    /// The fleets are spawned on the empty schema and left until every child idles and every
    /// daemon has counted the others (the claim gate shares its turns by that count); then the
    /// jobs are added, analyzed and announced (one NOTIFY, as an enqueue sends) in one
    /// transaction, and the clock runs from its commit. What the fleets cost to start is kept
    /// apart ([`Drain::fleet_start`]).
    Ready,
}

/// What a drain's fleets cost from their spawn until they had settled ([`Start::Ready`]).
#[derive(Debug, Clone)]
pub struct FleetStart {
    /// Seconds from the spawn to settled.
    pub seconds: f64,
    /// CPU seconds of the PostgreSQL backends serving the fleets (those still connected then).
    pub pg_cpu_s: f64,
    /// CPU seconds of the forkq processes.
    pub forkq_cpu_s: f64,
}

impl Drain {
    /// Jobs per second from the start of the clock to empty.
    pub fn rate(&self) -> f64 {
        self.n as f64 / self.total_s
    }

    /// PostgreSQL backend CPU per job, µs.
    pub fn pg_us_per_job(&self) -> f64 {
        self.pg_cpu_s * 1e6 / self.n as f64
    }

    /// The forkq processes' CPU per job, µs.
    pub fn forkq_us_per_job(&self) -> f64 {
        self.forkq_cpu_s * 1e6 / self.n as f64
    }
}

/// Rows that crowd the tables around the jobs a drain runs: never claimed, never purged.
#[derive(Clone, Copy, Debug, Default)]
pub struct Crowd {
    /// Jobs in the drained queue scheduled for tomorrow.
    pub scheduled: usize,
    /// Completed jobs in the archive.
    pub archived: usize,
}

impl Crowd {
    /// Adds the rows to `schema` (one statement each), then vacuums and analyzes both tables, as
    /// autovacuum would have done while the rows built up, and checkpoints, as the server would
    /// have done meanwhile: otherwise the drain would time a one-off catch-up over 11M rows that
    /// arrived at once, or the checkpoint of their gigabytes of WAL.
    fn fill(self, schema: &BenchSchema) -> BenchResult<()> {
        if self.scheduled == 0 && self.archived == 0 {
            return Ok(());
        }
        let mut client = connect(&schema.url, "forkq-bench")?;
        client.execute(
            &schema.sql(
                "INSERT INTO {s}.jobs (queue, task, payload, priority, state, run_at)
                 SELECT 'default', 'noop', '{}', -1, 'scheduled', now() + interval '1 day'
                 FROM generate_series(1, $1)",
            ),
            &[&(self.scheduled as i32)],
        )?;
        client.execute(
            &schema.sql(
                "INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                               max_attempts, created_at, finished_at)
                 SELECT -g, 'default', 'noop', '{}', 0, 'completed', 1, 25, now(), now()
                 FROM generate_series(1, $1) g",
            ),
            &[&(self.archived as i32)],
        )?;
        // One statement each: VACUUM cannot run in the implicit transaction of a multi-statement
        // query.
        for table in ["jobs", "jobs_archive"] {
            client.batch_execute(&schema.sql(&format!("VACUUM (ANALYZE) {{s}}.{table}")))?;
        }
        client.batch_execute("CHECKPOINT")?;
        Ok(())
    }
}

/// Drains of W1 beside a crowd and without one (see [`crowded_pairs`]).
pub struct CrowdedPair {
    /// The clean drain: nothing in its schema but the jobs.
    pub clean: Drain,
    /// The crowded drain.
    pub crowded: Drain,
}

/// `pairs` times, a drain of `n` noops in a schema with nothing else in it, then one beside
/// `crowd` in another, so each crowded drain is compared with a clean one taken seconds before it
/// (the machine's speed moves within minutes). Both schemas serve every pair, so both drains
/// write into tables that were there before the last checkpoint: with a fresh schema for each
/// clean drain, the 4th and 5th crowded drains of two full runs ran at 0.47-0.60x their clean
/// drains, while the first three ran at 0.80-1.17x. The crowd is filled once, then checkpointed;
/// before each drain after the first, each hot table is vacuumed, as autovacuum would have done
/// after the deletes of the drain before (the archives only grow, by `n` a drain).
pub fn crowded_pairs(
    ctx: &Ctx,
    n: usize,
    crowd: Crowd,
    pairs: usize,
) -> BenchResult<Vec<CrowdedPair>> {
    let clean = BenchSchema::new(&ctx.url, "w1")?;
    let crowded = BenchSchema::new(&ctx.url, "crowded")?;
    crowd.fill(&crowded)?;
    let mut client = connect(&ctx.url, "forkq-bench")?;
    let mut drain_again = |schema: &BenchSchema, pair: usize| {
        if pair > 0 {
            client.batch_execute(&schema.sql("VACUUM {s}.jobs"))?;
        }
        drain_in(
            ctx,
            schema,
            n,
            ("noop", json!({})),
            &[2],
            &[],
            Start::Spawned,
        )
    };
    (0..pairs)
        .map(|pair| {
            Ok(CrowdedPair {
                clean: drain_again(&clean, pair)?,
                crowded: drain_again(&crowded, pair)?,
            })
        })
        .collect()
}

/// One drain: `fleets` daemons (their concurrency each) on a schema of its own holding `n` jobs,
/// and `crowd` around them.
pub fn drain(
    ctx: &Ctx,
    label: &str,
    n: usize,
    job: (&str, Value),
    fleets: &[usize],
    extra: &[(&str, String)],
    crowd: Crowd,
) -> BenchResult<Drain> {
    let schema = BenchSchema::new(&ctx.url, label)?;
    crowd.fill(&schema)?;
    drain_in(ctx, &schema, n, job, fleets, extra, Start::Spawned)
}

/// [`drain`] with no crowd, the fleets settled before the jobs arrive ([`Start::Ready`]).
pub fn drain_ready(
    ctx: &Ctx,
    label: &str,
    n: usize,
    job: (&str, Value),
    fleets: &[usize],
    extra: &[(&str, String)],
) -> BenchResult<Drain> {
    let schema = BenchSchema::new(&ctx.url, label)?;
    drain_in(ctx, &schema, n, job, fleets, extra, Start::Ready)
}

/// [`drain`] in `schema` as it is: adds the `n` jobs, spawns the fleets (in the order `start`
/// says), times them to empty.
fn drain_in(
    ctx: &Ctx,
    schema: &BenchSchema,
    n: usize,
    job: (&str, Value),
    fleets: &[usize],
    extra: &[(&str, String)],
    start: Start,
) -> BenchResult<Drain> {
    if start == Start::Spawned {
        schema.fill(n, job.0, &job.1)?;
    }
    let mut monitor = connect(&ctx.url, "forkq-bench monitor")?;
    let timeout = Duration::from_secs(60 + n as u64 / 500);
    let mut env = extra.to_vec();
    if let Some(pooler) = &ctx.via {
        env.push(("DATABASE_URL", schema.tagged(pooler)));
        env.push(("FORKQ_POOLER", "transaction".into()));
        // Wake-ups on a direct connection of their own, as docs/pooler.md advises.
        env.push(("FORKQ_LISTEN_DATABASE_URL", schema.tagged(&ctx.url)));
    }
    let spawned = Instant::now();
    let mut daemons = Vec::new();
    for &concurrency in fleets {
        daemons.push(Daemon::spawn(
            &ctx.programs,
            Program::Forkq,
            schema,
            concurrency,
            &env,
        )?);
    }
    let cpu_now = |daemons: &[Daemon], monitor: &mut postgres::Client| -> BenchResult<(f64, f64)> {
        let pids: Vec<i32> = daemons.iter().flat_map(Daemon::all_pids).collect();
        Ok((
            sys::cpu_total(&schema.backend_pids(monitor)?),
            sys::cpu_total(&pids),
        ))
    };
    let (started, fleet_start) = match start {
        Start::Spawned => (spawned, None),
        Start::Ready => {
            settle(&mut daemons, fleets, schema, &mut monitor, timeout)?;
            let (pg_cpu_s, forkq_cpu_s) = cpu_now(&daemons, &mut monitor)?;
            let seconds = spawned.elapsed().as_secs_f64();
            let started = schema.fill_announced(n, job.0, &job.1, true)?;
            let before = FleetStart {
                seconds,
                pg_cpu_s,
                forkq_cpu_s,
            };
            (started, Some(before))
        }
    };
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut first_job_s = None;
    loop {
        let done: u64 = daemons.iter().map(|d| d.succeeded().unwrap_or(0)).sum();
        let at = started.elapsed().as_secs_f64();
        samples.push((at, done));
        if done > 0 && first_job_s.is_none() {
            first_job_s = Some(at);
        }
        if done >= n as u64 {
            break;
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "only {done} of {n} jobs done after {timeout:?}; log: {}",
                crate::daemon::tail(&daemons[0].log)
            )
            .into());
        }
        // About a hundred /livez requests a second in all, whatever the number of daemons: the
        // probes answering them run on the machine being measured. Over the last 3 % of the
        // jobs, one request a millisecond, so the end is seen when it comes: the raw loops'
        // clocks stop exactly at theirs, and 5 ms late on average was up to 0.5 % of a W1 drain.
        let near_end = done as f64 >= 0.97 * n as f64;
        std::thread::sleep(match near_end {
            true => Duration::from_millis(1),
            false => Duration::from_millis(10) * daemons.len() as u32,
        });
    }
    // Every handler finished; the last acknowledgements may still be on their way.
    while !schema.is_drained(&mut monitor)? {
        if started.elapsed() > timeout {
            return Err("jobs were run but never acknowledged".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let total_s = started.elapsed().as_secs_f64();
    let (pg_cpu_s, forkq_cpu_s) = cpu_now(&daemons, &mut monitor)?;
    let (pg_cpu_s, forkq_cpu_s) = match &fleet_start {
        Some(f) => (pg_cpu_s - f.pg_cpu_s, forkq_cpu_s - f.forkq_cpu_s),
        None => (pg_cpu_s, forkq_cpu_s),
    };
    let counted = |counter: &str| -> u64 {
        daemons
            .iter()
            .map(|d| d.slot_sum(counter).unwrap_or(0))
            .sum()
    };
    let (claims, turns_missed) = (counted("claims"), counted("claim_turns_missed"));
    let crossing = |fraction: f64| {
        let goal = fraction * n as f64;
        samples.windows(2).find_map(|w| {
            let ((t0, d0), (t1, d1)) = (w[0], w[1]);
            ((d1 as f64) >= goal && (d0 as f64) < goal)
                .then(|| t0 + (t1 - t0) * (goal - d0 as f64) / (d1 - d0) as f64)
        })
    };
    let steady = match (crossing(0.1), crossing(0.9)) {
        (Some(a), Some(b)) if b > a => Some(0.8 * n as f64 / (b - a)),
        _ => None,
    };
    Ok(Drain {
        n,
        total_s,
        first_job_s: first_job_s.unwrap_or(total_s),
        steady,
        forkq_cpu_s,
        pg_cpu_s,
        claims,
        turns_missed,
        fleet_start,
    })
}

/// Waits until every child of `daemons` (of `fleets` children each) idles and every daemon has
/// counted all of them: each host row was written after the last of them appeared, and a daemon
/// counts the hosts in the statement that writes its row.
fn settle(
    daemons: &mut [Daemon],
    fleets: &[usize],
    schema: &BenchSchema,
    monitor: &mut postgres::Client,
    timeout: Duration,
) -> BenchResult<()> {
    for (daemon, &concurrency) in daemons.iter_mut().zip(fleets) {
        daemon.wait_ready(concurrency, timeout)?;
    }
    let deadline = Instant::now() + timeout;
    let mut all_seen_at: Option<std::time::SystemTime> = None;
    loop {
        for daemon in daemons.iter_mut() {
            daemon.still_running()?;
        }
        // A daemon whose probe does not answer shows no slots: that is not idle.
        let idle = daemons.iter().zip(fleets).all(|(d, &concurrency)| {
            let slots = d.slots();
            slots.len() == concurrency && slots.iter().all(|(_, state)| state == "idle")
        });
        let row = monitor.query_one(
            &schema.sql(
                "SELECT count(*), now(), coalesce(bool_and(last_seen > $1), false) FROM {s}.hosts",
            ),
            &[&all_seen_at.unwrap_or(std::time::UNIX_EPOCH)],
        )?;
        let (hosts, now, written_since): (i64, std::time::SystemTime, bool) =
            (row.get(0), row.get(1), row.get(2));
        if hosts as usize == daemons.len() && all_seen_at.is_none() {
            all_seen_at = Some(now);
        } else if idle && all_seen_at.is_some() && written_since {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the fleets did not settle within {timeout:?} ({hosts} host rows, children idle: {idle})"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long after start-up the fleets at rest are watched from: past the first claims, the first
/// maintenance pass and a daemon's quick first host rows (0.25 to 4 s apart, 7.75 s in all).
const PAST_START_UP: Duration = Duration::from_secs(8);

/// Start latencies of jobs enqueued one by one into an idle fleet, in milliseconds, sorted.
pub struct Latency {
    /// From just before the enqueue call to the handler's first line.
    pub from_call: Vec<f64>,
    /// From the moment the enqueue commit returned to the handler's first line.
    pub from_commit: Vec<f64>,
    /// The enqueue call itself (statement, commit, reply).
    pub enqueue: Vec<f64>,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Starts a fleet of the stamping worker on a fresh schema; the stamp file is returned too.
fn stamp_fleet(
    ctx: &Ctx,
    label: &str,
    extra: &[(&str, String)],
) -> BenchResult<(BenchSchema, Daemon, std::path::PathBuf)> {
    let schema = BenchSchema::new(&ctx.url, label)?;
    let stamps = ctx
        .programs
        .work_dir
        .join(format!("{}.stamps", schema.name));
    let _ = std::fs::remove_file(&stamps);
    let mut env = vec![(STAMPS_VAR, stamps.to_string_lossy().into_owned())];
    env.extend(extra.iter().cloned());
    let mut daemon = Daemon::spawn(&ctx.programs, Program::StampWorker, &schema, 2, &env)?;
    daemon.wait_ready(2, Duration::from_secs(30))?;
    Ok((schema, daemon, stamps))
}

/// W2: `n` jobs enqueued one by one at `per_second` into an idle fleet of 2.
pub fn latency(
    ctx: &Ctx,
    n: usize,
    per_second: u64,
    extra: &[(&str, String)],
) -> BenchResult<Latency> {
    let (schema, _daemon, stamps) = stamp_fleet(ctx, "w2", extra)?;
    // Let the children settle into their idle wait.
    std::thread::sleep(Duration::from_millis(500));
    let mut producer_db = connect(&ctx.url, "forkq-bench producer")?;
    let limits = Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    };
    let job = forkq::NewJob::new("default", "stamp", json!({}));
    let interval = Duration::from_nanos(1_000_000_000 / per_second);
    let start = Instant::now();
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let before = mono_ns();
        let id = producer::enqueue(&mut producer_db, &schema.name, &limits, &job)?;
        let after = mono_ns();
        sent.push((id, before, after));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let started = loop {
        let s = read_stamps(&stamps);
        if s.len() >= n || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if started.len() < n {
        return Err(format!("only {} of {n} jobs started", started.len()).into());
    }
    let ms = |a: u64, b: u64| (b as f64 - a as f64) / 1e6;
    let at = |id: i64| started[&id][0].at_ns;
    Ok(Latency {
        from_call: sorted(sent.iter().map(|&(id, b, _)| ms(b, at(id))).collect()),
        from_commit: sorted(sent.iter().map(|&(id, _, a)| ms(a, at(id))).collect()),
        enqueue: sorted(sent.iter().map(|&(_, b, a)| ms(b, a)).collect()),
    })
}

/// Recovery after kill -9 of the child running a job, in milliseconds, one entry per kill.
pub struct Recovery {
    /// kill → the job's handler starts again (in any child).
    pub job_again: Vec<f64>,
    /// kill → the replacement child has polled (its slot left `starting`, seen in /livez).
    pub child_polls: Vec<f64>,
}

/// Kills the child running a 5 s job `rounds` times, each time 1.2 s into the job.
pub fn recovery(ctx: &Ctx, rounds: usize) -> BenchResult<Recovery> {
    // A child that ran 1.2 s and heartbeated is not a "fast crash", so no restart backoff.
    let extra = [("FORKQ_HEALTHY_UPTIME_SECONDS", "1".to_string())];
    let (schema, daemon, stamps) = stamp_fleet(ctx, "recovery", &extra)?;
    let mut db = connect(&ctx.url, "forkq-bench producer")?;
    let limits = Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 100,
    };
    let id = producer::enqueue(
        &mut db,
        &schema.name,
        &limits,
        &forkq::NewJob::new("default", "stamp", json!({"ms": 5000})),
    )?;
    let wait_attempt = |attempt: usize| -> BenchResult<crate::worker::Stamp> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = read_stamps(&stamps)
                .get(&id)
                .and_then(|v| v.iter().find(|s| s.attempt as usize >= attempt).copied())
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("attempt {attempt} never started").into());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    };
    let mut out = Recovery {
        job_again: Vec::new(),
        child_polls: Vec::new(),
    };
    let mut running = wait_attempt(1)?;
    for _ in 0..rounds {
        let kill_at = running.at_ns + 1_200_000_000;
        std::thread::sleep(Duration::from_nanos(kill_at.saturating_sub(mono_ns())));
        let slots = daemon.slots();
        let slot = slots
            .iter()
            .position(|(pid, _)| *pid == running.pid)
            .ok_or("the child running the job is not in /livez")?;
        let addr = daemon.addr;
        let victim = running.pid;
        let killed = mono_ns();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let watcher = std::thread::spawn(move || -> Option<u64> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some((_, body)) = sys::http_get(addr, "/livez") {
                    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    let s = &v["slots"][slot];
                    let pid = s["pid"].as_i64().unwrap_or(0) as i32;
                    if pid > 0
                        && pid != victim
                        && matches!(s["state"].as_str(), Some("idle" | "running"))
                    {
                        return Some(mono_ns());
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        });
        running = wait_attempt(running.attempt as usize + 1)?;
        out.job_again.push((running.at_ns - killed) as f64 / 1e6);
        let polled = watcher
            .join()
            .map_err(|_| "the /livez watcher panicked")?
            .ok_or("the replacement child never polled")?;
        out.child_polls.push((polled - killed) as f64 / 1e6);
    }
    out.job_again = sorted(out.job_again);
    out.child_polls = sorted(out.child_polls);
    Ok(out)
}

/// An idle fleet: CPU over a window, and memory per process.
pub struct Idle {
    /// The window, seconds.
    pub seconds: f64,
    /// CPU of all forkq processes, percent of one core.
    pub forkq_cpu_pct: f64,
    /// How many forkq processes that was.
    pub forkq_processes: usize,
    /// CPU of their PostgreSQL backends, percent of one core.
    pub pg_cpu_pct: f64,
    /// CPU percent per process: supervisor, probe, children.
    pub per_process: Vec<(String, f64)>,
    /// (process, RSS KiB, PSS KiB).
    pub memory: Vec<(String, u64, u64)>,
}

/// Starts the builtin fleet of 2 on an empty queue and watches it for `seconds`.
pub fn idle(ctx: &Ctx, seconds: f64) -> BenchResult<Idle> {
    let schema = BenchSchema::new(&ctx.url, "idle")?;
    let mut daemon = Daemon::spawn(&ctx.programs, Program::Forkq, &schema, 2, &[])?;
    daemon.wait_ready(2, Duration::from_secs(30))?;
    std::thread::sleep(PAST_START_UP);
    let mut monitor = connect(&ctx.url, "forkq-bench monitor")?;
    let children: Vec<i32> = daemon.slots().iter().map(|(p, _)| *p).collect();
    let all = daemon.all_pids();
    let known: HashSet<i32> = children.iter().copied().chain([daemon.pid()]).collect();
    let probe = all.iter().copied().find(|p| !known.contains(p));
    let backends = schema.backend_pids(&mut monitor)?;
    let mut named: Vec<(String, i32)> = vec![("supervisor".into(), daemon.pid())];
    named.extend(probe.map(|p| ("probe".to_string(), p)));
    named.extend(
        children
            .iter()
            .enumerate()
            .map(|(i, &p)| (format!("child {i}"), p)),
    );
    let before: Vec<f64> = named.iter().map(|(_, p)| sys::cpu_seconds(*p)).collect();
    let (f0, p0) = (sys::cpu_total(&all), sys::cpu_total(&backends));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let window = t0.elapsed().as_secs_f64();
    let (f1, p1) = (sys::cpu_total(&all), sys::cpu_total(&backends));
    let per_process = named
        .iter()
        .zip(before)
        .map(|((name, pid), b)| (name.clone(), (sys::cpu_seconds(*pid) - b) * 100.0 / window))
        .collect();
    let mut memory = Vec::new();
    let mut add = |name: &str, pid: Option<i32>| {
        if let Some((rss, pss)) = pid.and_then(sys::rss_pss_kib) {
            memory.push((name.to_string(), rss, pss));
        }
    };
    add("supervisor", Some(daemon.pid()));
    add("probe", probe);
    add("idle child", children.first().copied());
    add("PostgreSQL backend of a child", backends.first().copied());
    Ok(Idle {
        seconds: window,
        forkq_cpu_pct: (f1 - f0) * 100.0 / window,
        forkq_processes: all.len(),
        pg_cpu_pct: (p1 - p0) * 100.0 / window,
        per_process,
        memory,
    })
}

/// Fast jobs around a slow one: how late the fast ones finish.
pub struct Mixed {
    /// Fast jobs that finished more than a second after the slow one started.
    pub late: usize,
    /// The fast jobs.
    pub fast: usize,
    /// The latest a fast job finished after the slow one started, seconds.
    pub worst_s: f64,
}

/// Two children; `before` noops, one 10 s sleep, `after` noops, enqueued in that order in one
/// transaction: every noop should be done long before the sleep ends.
pub fn mixed(ctx: &Ctx, before: usize, after: usize) -> BenchResult<Mixed> {
    let schema = BenchSchema::new(&ctx.url, "mixed")?;
    let mut client = connect(&ctx.url, "forkq-bench")?;
    client.batch_execute(&schema.sql(&format!(
        "BEGIN;
         INSERT INTO {{s}}.jobs (queue, task, payload)
             SELECT 'default', 'noop', '{{}}' FROM generate_series(1, {before});
         INSERT INTO {{s}}.jobs (queue, task, payload) VALUES ('default', 'sleep', '{{\"ms\": 10000}}');
         INSERT INTO {{s}}.jobs (queue, task, payload)
             SELECT 'default', 'noop', '{{}}' FROM generate_series(1, {after});
         COMMIT; ANALYZE {{s}}.jobs;"
    )))?;
    let _daemon = Daemon::spawn(&ctx.programs, Program::Forkq, &schema, 2, &[])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !schema.is_drained(&mut client)? {
        if Instant::now() > deadline {
            return Err("the mixed workload did not finish within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let row = client.query_one(
        &schema.sql(
            "WITH slow AS (SELECT finished_at - interval '10 seconds' AS started
                           FROM {s}.jobs_archive WHERE task = 'sleep')
             SELECT count(*) FILTER (WHERE a.finished_at > slow.started + interval '1 second'),
                    count(*),
                    coalesce(extract(epoch FROM max(a.finished_at) - slow.started), 0)::float8
             FROM {s}.jobs_archive a, slow WHERE a.task = 'noop' GROUP BY slow.started",
        ),
        &[],
    )?;
    Ok(Mixed {
        late: row.get::<_, i64>(0) as usize,
        fast: row.get::<_, i64>(1) as usize,
        worst_s: row.get(2),
    })
}

/// A soak: producers keep the backlog full while 2 children drain it.
pub struct Soak {
    /// The length of one window, seconds.
    pub window_s: u64,
    /// Completions per second in each window (the last one possibly shorter).
    pub per_window: Vec<f64>,
    /// Server CPU per job over the whole soak (the daemon's backends), µs.
    pub pg_us_per_job: f64,
    /// The hot table's size at the end, bytes (with indexes).
    pub hot_bytes: i64,
    /// The archive's size at the end, bytes (with indexes).
    pub archive_bytes: i64,
    /// Rows in the hot table at the end.
    pub hot_rows: i64,
}

/// Drains for `seconds` while a producer tops the backlog up to `backlog` waiting jobs in
/// chunks of 10k (default retention, so every completed job is archived). The producer keeps
/// count from the fleet's own counter, so it costs the server nothing but its inserts.
pub fn soak(ctx: &Ctx, url: &str, seconds: u64, backlog: u64) -> BenchResult<Soak> {
    const CHUNK: u64 = 10_000;
    let schema = BenchSchema::new(url, "soak")?;
    schema.fill(backlog as usize, "noop", &json!({}))?;
    let daemon = Daemon::spawn(&ctx.programs, Program::Forkq, &schema, 2, &[])?;
    let mut producer = connect(url, "forkq-bench producer")?;
    let top_up = schema.sql(
        "INSERT INTO {s}.jobs (queue, task, payload)
         SELECT 'default', 'noop', '{}' FROM generate_series(1, $1)",
    );
    let notify = schema.sql("SELECT pg_notify('forkq_' || $1, 'default')");
    let window_s = (seconds / 10).max(10);
    let started = Instant::now();
    let mut enqueued = backlog;
    let mut marks = vec![(0.0, 0u64)];
    let mut last_mark = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let done = daemon.succeeded().unwrap_or(0);
        if enqueued.saturating_sub(done) < backlog {
            let mut tx = producer.transaction()?;
            tx.execute(&top_up, &[&(CHUNK as i32)])?;
            tx.execute(&notify, &[&schema.name])?;
            tx.commit()?;
            enqueued += CHUNK;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        if last_mark.elapsed() >= Duration::from_secs(window_s) {
            last_mark = Instant::now();
            marks.push((started.elapsed().as_secs_f64(), done));
        }
    }
    let done = daemon.succeeded().unwrap_or(0);
    marks.push((started.elapsed().as_secs_f64(), done));
    let per_window = marks
        .windows(2)
        .filter(|w| w[1].0 - w[0].0 >= window_s as f64 / 2.0)
        .map(|w| (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0))
        .collect();
    let pg_cpu = sys::cpu_total(&schema.backend_pids(&mut producer)?);
    let mut size = |rel: &str| -> BenchResult<i64> {
        Ok(producer
            .query_one(
                "SELECT pg_total_relation_size($1::text::regclass)",
                &[&format!("\"{}\".{rel}", schema.name)],
            )?
            .get(0))
    };
    Ok(Soak {
        window_s,
        per_window,
        pg_us_per_job: pg_cpu * 1e6 / done.max(1) as f64,
        hot_bytes: size("jobs")?,
        archive_bytes: size("jobs_archive")?,
        hot_rows: producer
            .query_one(&schema.sql("SELECT count(*) FROM {s}.jobs"), &[])?
            .get(0),
    })
}

/// Hosts at rest, watched over a window.
pub struct Rest {
    /// Daemons.
    pub hosts: usize,
    /// The window, seconds.
    pub seconds: f64,
    /// CPU of the PostgreSQL backends serving them, percent of one core, all hosts together.
    pub pg_cpu_pct: f64,
    /// CPU of every forkq process, percent of one core, all hosts together.
    pub forkq_cpu_pct: f64,
    /// The statements they sent, by kind: (kind, calls per second, mean server time in ms), all
    /// hosts together; empty when the server does not load pg_stat_statements.
    pub statements: Vec<(String, f64, f64)>,
    /// Children running a job during the window.
    pub busy: usize,
}

/// What kind of statement `query` (as pg_stat_statements shows it) is, by the SQL forkq sends.
fn statement_kind(query: &str) -> &'static str {
    const KINDS: [(&str, &str); 9] = [
        // The claim round's claim, in either form (its first CTE is the claim gate's turn, as is
        // maintenance's).
        ("claimed AS", "claim rounds"),
        ("picked AS", "claim rounds"),
        (".renew(", "renewals"),
        (".settle(", "settlements"),
        ("hosts", "host rows"),
        ("schema_migrations", "schema checks"),
        ("pg_notify", "notifications"),
        ("BEGIN", "BEGIN/COMMIT"),
        ("COMMIT", "BEGIN/COMMIT"),
    ];
    KINDS
        .iter()
        .find(|(needle, _)| query.contains(needle))
        .map_or("maintenance", |(_, kind)| kind)
}

/// `hosts` daemons of `children` on one schema, either idle on an empty queue or (`busy`) each
/// child running a job far longer than the window with `FORKQ_LEASE_SECONDS=4` (the shortest),
/// so every child renews its lease every 1.3 s: what the fleet costs the database when no job finishes.
/// With `elsewhere` > 0, that many more jobs are running under other lease owners (hosts that are
/// not in the fleet, 100 jobs each, leased for an hour), as a big fleet's other hosts would hold
/// them: a renewal should not cost more for them.
/// Statements are counted with pg_stat_statements when the server loads it (reset at the start
/// of the window: run it on a server of its own).
pub fn rest(
    ctx: &Ctx,
    hosts: usize,
    children: usize,
    seconds: f64,
    busy: bool,
    elsewhere: usize,
) -> BenchResult<Rest> {
    let schema = BenchSchema::new(&ctx.url, "rest")?;
    let total = hosts * children;
    let mut extra: Vec<(&str, String)> = Vec::new();
    if busy {
        schema.fill(total, "sleep", &json!({"ms": 3_600_000}))?;
        extra.push(("FORKQ_LEASE_SECONDS", "4".into()));
    }
    if elsewhere > 0 {
        connect(&ctx.url, "forkq-bench")?.batch_execute(&schema.sql(&format!(
            "INSERT INTO {{s}}.jobs (queue, task, state, attempt, lease_owner, lease_token,
                                    lease_expires_at)
             SELECT 'elsewhere', 'noop', 'running', 1, 'elsewhere/' || g / 100 || '/1/', g,
                    now() + interval '1 hour'
             FROM generate_series(1, {elsewhere}) g;
             ANALYZE {{s}}.jobs"
        )))?;
    }
    let mut daemons = Vec::new();
    for _ in 0..hosts {
        let mut d = Daemon::spawn(&ctx.programs, Program::Forkq, &schema, children, &extra)?;
        d.wait_ready(children, Duration::from_secs(60))?;
        daemons.push(d);
    }
    let mut monitor = connect(&ctx.url, "forkq-bench monitor")?;
    let running = schema
        .sql("SELECT count(*) FROM {s}.jobs WHERE state = 'running' AND queue <> 'elsewhere'");
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy_now = |monitor: &mut postgres::Client| -> BenchResult<usize> {
        Ok(monitor.query_one(&running, &[])?.get::<_, i64>(0) as usize)
    };
    while busy && busy_now(&mut monitor)? < total {
        if Instant::now() > deadline {
            return Err("the long jobs did not all start within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(PAST_START_UP);
    let counted = monitor
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
        )
        .is_ok();
    let pids: Vec<i32> = daemons.iter().flat_map(Daemon::all_pids).collect();
    let backends = schema.backend_pids(&mut monitor)?;
    let (f0, p0) = (sys::cpu_total(&pids), sys::cpu_total(&backends));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (f1, p1) = (sys::cpu_total(&pids), sys::cpu_total(&backends));
    let window = t0.elapsed().as_secs_f64();
    let mut statements: Vec<(String, f64, f64)> = Vec::new();
    if counted {
        let rows = monitor.query(
            "SELECT s.query, s.calls, s.total_exec_time FROM pg_stat_statements s
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND (s.query LIKE '%' || $1 || '%' OR s.query IN ('BEGIN', 'COMMIT'))",
            &[&schema.name],
        )?;
        for row in rows {
            let kind = statement_kind(row.get(0));
            let (calls, ms): (i64, f64) = (row.get(1), row.get(2));
            match statements.iter_mut().find(|(k, _, _)| k == kind) {
                Some(entry) => {
                    entry.1 += calls as f64;
                    entry.2 += ms;
                }
                None => statements.push((kind.to_string(), calls as f64, ms)),
            }
        }
        for entry in &mut statements {
            entry.2 /= entry.1.max(1.0);
            entry.1 /= window;
        }
        statements.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    Ok(Rest {
        hosts,
        seconds: window,
        pg_cpu_pct: (p1 - p0) * 100.0 / window,
        forkq_cpu_pct: (f1 - f0) * 100.0 / window,
        statements,
        busy: busy_now(&mut monitor)?,
    })
}

/// The retention service against a backlog: `n` completed jobs archived past their retention
/// (one second), purged by maintenance passes as a daemon runs them; rows purged per second.
pub fn purge(ctx: &Ctx, n: usize) -> BenchResult<f64> {
    let schema = BenchSchema::new(&ctx.url, "purge")?;
    let mut client = connect(&ctx.url, "forkq-bench")?;
    client.execute(
        &schema.sql(
            "INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                           max_attempts, created_at, finished_at)
             SELECT g, 'default', 'noop', '{}', 0, 'completed', 1, 25, now(), now()
             FROM generate_series(1, $1) g",
        ),
        &[&(n as i32)],
    )?;
    client.batch_execute(&schema.sql("ANALYZE {s}.jobs_archive"))?;
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let _daemon = Daemon::spawn(
        &ctx.programs,
        Program::Forkq,
        &schema,
        2,
        &[("FORKQ_RETENTION_SECONDS", "1".to_string())],
    )?;
    let left = schema.sql("SELECT count(*) FROM {s}.jobs_archive");
    let deadline = started + Duration::from_secs(120);
    while client.query_one(&left, &[])?.get::<_, i64>(0) > 0 {
        if Instant::now() > deadline {
            return Err("the archive was not purged within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use forkq::queue::sql;

    #[test]
    fn claim_rounds_and_maintenance_are_told_apart() {
        for (queues, settle, promotes, direct) in [
            (1, sql::Settle::Archiving, false, false),
            (1, sql::Settle::Deleting, false, false),
            (3, sql::Settle::Nothing, true, false),
            (1, sql::Settle::Nothing, false, false),
            (1, sql::Settle::Archiving, false, true),
            (2, sql::Settle::Deleting, false, true),
        ] {
            let form = sql::RoundForm {
                settle,
                promotes,
                direct,
            };
            assert_eq!(
                super::statement_kind(&sql::round(queues, 100, form)),
                "claim rounds"
            );
        }
        assert_eq!(
            super::statement_kind(sql::TAKE_TURN_AND_RESCUE),
            "maintenance"
        );
        assert_eq!(super::statement_kind(sql::RENEW), "renewals");
    }
}
