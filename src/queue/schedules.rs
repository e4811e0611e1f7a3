//! Schedules in the database: a daemon declares its file's definitions, enqueues due ticks (each
//! exactly once across every daemon, see `schedule_fire` in migration 002), and the CLI lists them
//! and runs one now.
//!
//! Every statement goes out with typed parameters in one round trip, without a prepared
//! statement: a tick costs the ticker one round trip, and nothing here needs a session (poolers in
//! transaction mode are fine).

use jiff::Timestamp;
use postgres::types::Type;
use postgres::{GenericClient, Row};
use serde_json::Value;

use super::sql::{self, render};
use super::QueueError;
use crate::schedule::{Definition, Schedule};

/// A schedule as the database holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its name.
    pub name: String,
    /// Its definition as stored (a [`Definition`] unless written by another forkq version).
    pub definition: Value,
    /// Bumped at every change of the definition.
    pub revision: i32,
    /// Who declared the definition: host and supervisor pid.
    pub declared_by: String,
    /// When the declaring daemon started (the newest start wins).
    pub declared_at: Timestamp,
    /// No tick at or before this is enqueued (the latest tick enqueued, or the creation or the
    /// last change of timing).
    pub ticks_after: Timestamp,
    /// The latest tick enqueued.
    pub last_tick_at: Option<Timestamp>,
    /// When the latest job was enqueued, by a tick or `forkq schedule run`.
    pub last_run_at: Option<Timestamp>,
    /// That job.
    pub last_job_id: Option<i64>,
}

impl Stored {
    fn from_row(row: &Row) -> Stored {
        let time = |index: usize| row.get::<_, Option<f64>>(index).map(from_epoch);
        Stored {
            name: row.get(0),
            definition: row.get(1),
            revision: row.get(2),
            declared_by: row.get(3),
            declared_at: from_epoch(row.get(4)),
            ticks_after: from_epoch(row.get(5)),
            last_tick_at: time(6),
            last_run_at: time(7),
            last_job_id: row.get(8),
        }
    }

    /// The next tick after `now` (none when the stored definition cannot be followed).
    pub fn next_run(&self, now: Timestamp) -> Option<Timestamp> {
        self.schedule()
            .ok()
            .and_then(|schedule| schedule.next_after(self.ticks_after.max(now)))
    }

    /// A text field of the stored definition (`cron`, `timezone`, `queue`, `task`), or "?".
    pub fn field(&self, name: &str) -> String {
        self.definition
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    }

    /// The stored definition as a checked schedule; the error says why it cannot be followed.
    pub fn schedule(&self) -> Result<Schedule, String> {
        let definition: Definition = serde_json::from_value(self.definition.clone())
            .map_err(|e| format!("its stored definition is not one this forkq reads ({e})"))?;
        Schedule::new(&self.name, definition)
    }
}

/// Seconds since the epoch (as PostgreSQL's `extract(epoch ...)` gives them, exact to the
/// microsecond) as a timestamp.
fn from_epoch(seconds: f64) -> Timestamp {
    Timestamp::from_microsecond((seconds * 1e6).round() as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Declares `schedules` as the definitions of a daemon that started at `started_at`: each name
/// takes its definition unless a daemon that started later declared it. Returns what the
/// database holds for those names afterwards, by name.
pub fn declare(
    client: &mut impl GenericClient,
    schema: &str,
    schedules: &[Schedule],
    started_at: Timestamp,
    declared_by: &str,
) -> Result<Vec<Stored>, QueueError> {
    let names: Vec<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
    let definitions: Vec<Value> = schedules
        .iter()
        .map(|s| serde_json::to_value(&s.definition).expect("a definition is plain data"))
        .collect();
    let rows = client.query(
        &render(sql::SCHEDULE_DECLARE, schema),
        &[&names, &definitions, &started_at.to_string(), &declared_by],
    )?;
    Ok(rows.iter().map(Stored::from_row).collect())
}

/// The schedules named in `names` as the database holds them, or every one for `None`.
pub fn stored(
    client: &mut impl GenericClient,
    schema: &str,
    names: Option<&[&str]>,
) -> Result<Vec<Stored>, QueueError> {
    let rows = client.query_typed(
        &render(sql::SCHEDULE_STATE, schema),
        &[(&names, Type::TEXT_ARRAY)],
    )?;
    Ok(rows.iter().map(Stored::from_row).collect())
}

/// A tick to enqueue: a schedule, the tick's time and the revision it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// The schedule.
    pub name: String,
    /// When the tick is.
    pub at: Timestamp,
    /// The revision of the definition the tick comes from.
    pub revision: i32,
}

/// What became of one [`Tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// Enqueued as this job.
    Enqueued(i64),
    /// Enqueued already (by another daemon), or not after the schedule's tick record.
    Taken,
    /// The schedule's definition is at another revision now: reload it.
    Changed(i32),
    /// The schedule is no longer in the database.
    Gone,
}

/// Enqueues `ticks` (sorted by name, then time) in one statement; answers, per tick, what
/// became of it. Each tick is enqueued once across every daemon.
pub fn fire(
    client: &mut impl GenericClient,
    schema: &str,
    ticks: &[Tick],
) -> Result<Vec<Fired>, QueueError> {
    let names: Vec<&str> = ticks.iter().map(|t| t.name.as_str()).collect();
    let times: Vec<String> = ticks.iter().map(|t| t.at.to_string()).collect();
    let revisions: Vec<i32> = ticks.iter().map(|t| t.revision).collect();
    let rows = client.query_typed(
        &render(sql::SCHEDULE_FIRE, schema),
        &[
            (&names, Type::TEXT_ARRAY),
            (&times, Type::TEXT_ARRAY),
            (&revisions, Type::INT4_ARRAY),
        ],
    )?;
    Ok(ticks
        .iter()
        .zip(&rows)
        .map(
            |(tick, row)| match (row.get::<_, Option<i64>>(0), row.get::<_, Option<i32>>(1)) {
                (Some(job), _) => Fired::Enqueued(job),
                (None, None) => Fired::Gone,
                (None, Some(revision)) if revision != tick.revision => Fired::Changed(revision),
                (None, Some(_)) => Fired::Taken,
            },
        )
        .collect())
}

/// Enqueues one run of schedule `name` now, outside its ticks; `None` when the database knows
/// no such schedule.
pub fn run_now(
    client: &mut impl GenericClient,
    schema: &str,
    name: &str,
) -> Result<Option<i64>, QueueError> {
    Ok(client
        .query_typed_one(&render(sql::SCHEDULE_RUN, schema), &[(&name, Type::TEXT)])?
        .get(0))
}
