//! The ticker: enqueues the ticks of the daemon's schedules (`FORKQ_SCHEDULES`).
//!
//! One per daemon, a thread of the probe process with a connection of its own, and only when the
//! daemon has schedules. The probe already runs threads and no job, so ticks are on time however
//! long the children's jobs take, and the supervisor stays free of connections and threads. The
//! ticker sleeps until the next tick of any schedule and then sends one statement (one round
//! trip) with every tick due; the database enqueues each tick once across all daemons (the tick record
//! `ticks_after`, see `schedule_fire` in migration 002), so any number of daemons may carry the
//! same file and any of them may die.
//!
//! At start the daemon declares its file's definitions; the database keeps, per name, the one of
//! the daemon that started last. A daemon whose file differs from what the database holds says
//! so in its log and follows the database's, so every daemon fires the same thing.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::Timestamp;

use crate::backoff;
use crate::config::Config;
use crate::queue::schedules::{self, Fired, Stored, Tick};
use crate::queue::{self, QueueError};
use crate::schedule::{Missed, Schedule, LATE};
use crate::slots::SlotTable;

/// The longest sleep between two looks at the clock, so a wall-clock jump (NTP, a suspended VM)
/// delays a tick by at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(10);

/// A schedule as this daemon follows it: the definition the database holds.
struct Followed {
    schedule: Schedule,
    revision: i32,
    /// Every tick up to here is dealt with (enqueued, by this daemon or another, or dropped).
    after: Timestamp,
}

/// Runs the ticker for `config.schedules` until the process ends; reconnects with backoff when
/// the database goes away (ticks due meanwhile are late, and enqueued when it is back, or
/// missed after [`LATE`]).
pub fn run(config: &Config, table: &SlotTable) -> ! {
    let started_at =
        Timestamp::from_millisecond(table.header.started_unix_ms.load(Ordering::Acquire) as i64)
            .unwrap_or_else(|_| Timestamp::now());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let declared_by = format!("{host}/{}", nix::unistd::getppid());
    // Differences are reported once per revision, not at every reconnect.
    let mut reported = HashSet::new();
    let mut failures = 0u32;
    loop {
        // A panic must not end the thread quietly: the probe would live on without ticker.
        let attempt =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match Ticker::start(config, started_at, &declared_by, &mut reported) {
                    Ok(mut ticker) => {
                        if failures > 0 {
                            log::info!("ticker reconnected to the database");
                        }
                        failures = 0;
                        ticker.run(&mut reported).to_string()
                    }
                    Err(e) => e.to_string(),
                }
            }));
        let error = attempt.unwrap_or_else(|_| "the ticker panicked".to_string());
        failures += 1;
        let pause = backoff::with_jitter(
            backoff::exponential(Duration::from_millis(200), Duration::from_secs(5), failures),
            fastrand::f64(),
        );
        if failures == 1 || failures % 10 == 0 {
            log::warn!("ticker: database unavailable ({error}); retrying in {pause:.1?}");
        }
        std::thread::sleep(pause);
    }
}

struct Ticker<'a> {
    config: &'a Config,
    client: postgres::Client,
    followed: Vec<Followed>,
}

impl<'a> Ticker<'a> {
    /// Connects, declares this daemon's schedules and follows what the database holds.
    fn start(
        config: &'a Config,
        started_at: Timestamp,
        declared_by: &str,
        reported: &mut HashSet<(String, i32)>,
    ) -> Result<Ticker<'a>, QueueError> {
        let mut client = queue::connect(&config.database_url, "forkq ticker")?;
        let held = schedules::declare(
            &mut client,
            &config.schema,
            &config.schedules,
            started_at,
            declared_by,
        )?;
        let mut ticker = Ticker {
            config,
            client,
            followed: Vec::new(),
        };
        ticker.follow(&held, reported);
        let plan: Vec<String> = ticker
            .followed
            .iter()
            .map(|f| {
                let d = &f.schedule.definition;
                let next = f
                    .schedule
                    .next_after(f.after.max(Timestamp::now()))
                    .map_or("never".to_string(), |t| t.to_string());
                format!(
                    "{} ({:?} in {}, queue {}, task {}, next {next})",
                    f.schedule.name, d.cron, d.timezone, d.queue, d.task
                )
            })
            .collect();
        log::info!(
            "ticker: {} schedule(s) from {}: {}",
            plan.len(),
            config
                .schedules_file
                .as_ref()
                .map_or("FORKQ_SCHEDULES".into(), |p| p.display().to_string()),
            plan.join("; ")
        );
        Ok(ticker)
    }

    /// Takes `held` (what the database holds for some of this daemon's schedules) as what to
    /// follow, reporting each definition that differs from this daemon's file.
    fn follow(&mut self, held: &[Stored], reported: &mut HashSet<(String, i32)>) {
        for stored in held {
            let Some(mine) = self.config.schedules.iter().find(|s| s.name == stored.name) else {
                continue;
            };
            let known = self
                .followed
                .iter()
                .position(|f| f.schedule.name == stored.name);
            let after = known.map_or(stored.ticks_after, |i| {
                self.followed[i].after.max(stored.ticks_after)
            });
            if let Some(i) = known {
                self.followed.remove(i);
            }
            let schedule = match stored.schedule() {
                Ok(s) => s,
                Err(why) => {
                    if reported.insert((stored.name.clone(), stored.revision)) {
                        log::error!(
                            "schedule {:?}: the database holds revision {} (declared by {}), \
                             which this daemon cannot follow: {why}; the daemons that declared it \
                             fire it, this one does not",
                            stored.name,
                            stored.revision,
                            stored.declared_by
                        );
                    }
                    continue;
                }
            };
            if schedule.definition != mine.definition
                && reported.insert((stored.name.clone(), stored.revision))
            {
                log::warn!(
                    "schedule {:?}: this daemon's FORKQ_SCHEDULES differs from the definition in \
                     the database (revision {}, declared by {} for a daemon started at {}): {}; \
                     following the database's, as the daemon started last wins",
                    stored.name,
                    stored.revision,
                    stored.declared_by,
                    stored.declared_at,
                    differences(&mine.definition, &schedule.definition)
                );
            }
            self.followed.push(Followed {
                schedule,
                revision: stored.revision,
                after,
            });
        }
        self.followed
            .sort_by(|a, b| a.schedule.name.cmp(&b.schedule.name));
    }

    /// Sleeps until the next tick and enqueues what is due, until the database fails.
    fn run(&mut self, reported: &mut HashSet<(String, i32)>) -> QueueError {
        loop {
            let changed = match self.step(Timestamp::now()) {
                Ok(changed) => changed,
                Err(e) => return e,
            };
            if !changed.is_empty() {
                let names: Vec<&str> = changed.iter().map(String::as_str).collect();
                match schedules::stored(&mut self.client, &self.config.schema, Some(&names)) {
                    Ok(held) => self.follow(&held, reported),
                    Err(e) => return e,
                }
                continue;
            }
            let now = Timestamp::now();
            let next = self
                .followed
                .iter()
                .filter_map(|f| f.schedule.next_after(f.after.max(now)))
                .min();
            let sleep = next.map_or(MAX_SLEEP, |t| {
                // A millisecond past the tick, so the clock read after waking has reached it.
                Duration::try_from(t.duration_since(now))
                    .unwrap_or_default()
                    .saturating_add(Duration::from_millis(1))
                    .min(MAX_SLEEP)
            });
            std::thread::sleep(sleep);
        }
    }

    /// Enqueues every tick due at `now` in one statement (none when nothing is due). Returns the
    /// schedules whose definition changed in the database meanwhile: their ticks were not
    /// enqueued, and are computed again from the new definition.
    fn step(&mut self, now: Timestamp) -> Result<Vec<String>, QueueError> {
        let mut ticks = Vec::new();
        for f in &self.followed {
            let due = f.schedule.due(f.after, now);
            if due.left_out {
                let d = &f.schedule.definition;
                log::warn!(
                    "schedule {:?}: ticks between {} and {} were missed (no daemon could enqueue \
                     them within {LATE:?}); {}",
                    f.schedule.name,
                    f.after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    (now - LATE).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    match d.missed {
                        Missed::Skip => "skipped (missed = \"skip\")".to_string(),
                        Missed::CatchUp => format!(
                            "enqueueing the {} most recent (missed = \"catch-up\")",
                            d.catch_up_limit.unwrap_or(0)
                        ),
                    }
                );
            }
            ticks.extend(due.ticks.into_iter().map(|at| Tick {
                name: f.schedule.name.clone(),
                at,
                revision: f.revision,
            }));
        }
        let mut changed = Vec::new();
        if !ticks.is_empty() {
            let fired = schedules::fire(&mut self.client, &self.config.schema, &ticks)?;
            for (tick, outcome) in ticks.iter().zip(fired) {
                match outcome {
                    Fired::Enqueued(job) => log::debug!(
                        "schedule {:?}: tick {} enqueued as job {job}",
                        tick.name,
                        tick.at
                    ),
                    Fired::Taken => {}
                    Fired::Changed(_) => {
                        if !changed.contains(&tick.name) {
                            changed.push(tick.name.clone());
                        }
                    }
                    Fired::Gone => {
                        log::warn!(
                            "schedule {:?} is no longer in the database; this daemon stops \
                             firing it until it restarts (and declares it again)",
                            tick.name
                        );
                        self.followed.retain(|f| f.schedule.name != tick.name);
                    }
                }
            }
        }
        for f in &mut self.followed {
            if !changed.contains(&f.schedule.name) {
                f.after = f.after.max(now);
            }
        }
        Ok(changed)
    }
}

/// The fields in which `mine` (this daemon's file) and `theirs` (the database) differ, as
/// `field: file X, database Y`.
fn differences(mine: &crate::schedule::Definition, theirs: &crate::schedule::Definition) -> String {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (
        serde_json::to_value(mine).unwrap_or_default(),
        serde_json::to_value(theirs).unwrap_or_default(),
    ) else {
        return "the definitions differ".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("(none)".into(), |v| v.to_string());
            format!("{k}: file {}, database {}", show(a.get(k)), show(b.get(k)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
