//! Maintenance services: small periodic passes that keep the queue healthy.
//!
//! Any child may run them; an advisory lock makes one holder per database at a time, and the slot
//! table's header makes one attempt per host per interval. Each service is one function with one
//! job, in the spirit of River's maintenance services.

use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::Client;

use super::sql::{self, render};
use super::{batch, execute_typed, QueueError};

/// How often a host attempts the maintenance pass.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// What one pass changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Expired leases returned to the queue (or dead-lettered).
    pub rescued: i32,
    /// Archived jobs deleted after their retention.
    pub purged: u64,
    /// Expired unique windows deleted.
    pub windows_purged: u64,
    /// Open batches whose counters or state were repaired (each is logged).
    pub batches_repaired: usize,
    /// Tables vacuumed because dead rows piled up in them.
    pub vacuumed: Vec<&'static str>,
}

/// The longest a pass keeps purging the archive; what is left waits for the next pass.
const PURGE_BUDGET: Duration = Duration::from_secs(1);
/// Archived rows deleted per purge statement (each in its own short transaction).
const PURGE_CHUNK: u64 = 10_000;

impl Report {
    /// Whether the pass changed any job or batch (not only vacuumed).
    pub fn changed_jobs(&self) -> bool {
        self.rescued > 0 || self.purged > 0 || self.batches_repaired > 0
    }
}

/// One sentence for the log, naming only what changed: "3 expired lease(s) rescued, ...".
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            (self.rescued as u64, "expired lease(s) rescued"),
            (self.purged, "archived job(s) purged"),
            (self.windows_purged, "expired unique window(s) purged"),
            (self.batches_repaired as u64, "batch(es) repaired"),
        ];
        let mut changed: Vec<String> = parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        if !self.vacuumed.is_empty() {
            changed.push(format!("vacuumed {}", self.vacuumed.join(", ")));
        }
        if changed.is_empty() {
            f.write_str("nothing to do")
        } else {
            f.write_str(&changed.join(", "))
        }
    }
}

/// Runs every service once, if no other process holds the maintenance lock. Returns `None`
/// when another holder had it. Each service runs in short transactions of its own (under the
/// same lock, taken per transaction, so it also works behind a pooler in transaction mode), and
/// the vacuums outside any. `before_each` is called before every round trip, so a worker can
/// announce how long that one may block it (each is bounded by the connection's timeouts; a pass
/// has several). An error ends the pass (the transaction at hand rolled back); the caller gives it
/// up until the next interval rather than retrying a statement that timed out.
pub fn run_pass(
    client: &mut Client,
    schema: &str,
    retention: Duration,
    before_each: &mut dyn FnMut(),
) -> Result<Option<Report>, QueueError> {
    let retain = !retention.is_zero();
    let Some(rescued) = locked(client, schema, before_each, |tx, before_each| {
        before_each();
        Ok(tx
            .query_typed_one(
                &render(sql::RESCUE_EXPIRED, schema),
                &[(&retain, Type::BOOL)],
            )?
            .get(0))
    })?
    else {
        return Ok(None);
    };
    let mut report = Report {
        rescued,
        purged: purge_archive(client, schema, retention, before_each)?,
        windows_purged: purge_windows(client, schema, before_each)?,
        batches_repaired: locked(client, schema, before_each, |tx, before_each| {
            before_each();
            let repaired = repair_batches(tx, schema, retain)?;
            before_each();
            tx.query_typed(&render(sql::COMPACT_CHANGES, schema), &[])?;
            Ok(repaired)
        })?
        .unwrap_or(0),
        vacuumed: Vec::new(),
    };
    for (table, base, fraction) in VACUUMED {
        if vacuum_if_bloated(client, schema, table, base, fraction, before_each)? {
            report.vacuumed.push(table);
        }
    }
    Ok(Some(report))
}

/// Runs `work` in a transaction holding the maintenance lock; `None` when another process holds
/// it. `before_each` announces every round trip (`work` calls it before each of its own).
fn locked<T>(
    client: &mut Client,
    schema: &str,
    before_each: &mut dyn FnMut(),
    work: impl FnOnce(&mut postgres::Transaction<'_>, &mut dyn FnMut()) -> Result<T, QueueError>,
) -> Result<Option<T>, QueueError> {
    before_each();
    let mut tx = client.transaction()?;
    before_each();
    let got: bool = tx
        .query_typed_one(
            sql::TRY_MAINTENANCE_LOCK,
            &[(&sql::advisory_key("maintenance", schema), Type::INT8)],
        )?
        .get(0);
    if !got {
        return Ok(None);
    }
    let out = work(&mut tx, before_each)?;
    before_each();
    tx.commit()?;
    Ok(Some(out))
}

/// The retention service: deletes expired archived jobs in chunks, each in its own transaction,
/// until none is left or [`PURGE_BUDGET`] is spent, so it keeps pace with the drain.
fn purge_archive(
    client: &mut Client,
    schema: &str,
    retention: Duration,
    before_each: &mut dyn FnMut(),
) -> Result<u64, QueueError> {
    let started = Instant::now();
    before_each();
    client.query_typed(&render(sql::SUMMARIZE_ARCHIVE, schema), &[])?;
    let purge = render(sql::PURGE_EXPIRED_ARCHIVE, schema);
    let mut purged = 0;
    loop {
        let chunk = locked(client, schema, before_each, |tx, before_each| {
            before_each();
            Ok(execute_typed(
                tx,
                &purge,
                &[
                    (&retention.as_secs_f64(), Type::FLOAT8),
                    (&(PURGE_CHUNK as i64), Type::INT8),
                ],
            )?)
        })?
        .unwrap_or(0);
        purged += chunk;
        if chunk < PURGE_CHUNK || started.elapsed() >= PURGE_BUDGET {
            return Ok(purged);
        }
    }
}

/// The unique-window service: deletes one chunk of expired unique windows per pass, in a
/// transaction of its own.
fn purge_windows(
    client: &mut Client,
    schema: &str,
    before_each: &mut dyn FnMut(),
) -> Result<u64, QueueError> {
    Ok(locked(client, schema, before_each, |tx, before_each| {
        before_each();
        Ok(execute_typed(
            tx,
            &render(sql::PURGE_EXPIRED_WINDOWS, schema),
            &[],
        )?)
    })?
    .unwrap_or(0))
}

/// The tables the vacuum service watches: name, and the dead rows that trigger a vacuum (a base,
/// plus a fraction of the live rows). The hot table is vacuumed early: every claim walks past its
/// dead index entries, so claims slow down as they pile up, and autovacuum (when it is on at all)
/// visits a busy table only once a minute.
const VACUUMED: [(&str, i64, f64); 4] = [
    ("jobs", 10_000, 0.1),
    ("jobs_archive", 100_000, 0.2),
    ("changes", 1_000, 0.0),
    ("unique_windows", 10_000, 0.2),
];

/// The vacuum service: vacuums `table` when its dead rows exceed `base + fraction × live rows`.
/// A table someone else is vacuuming is skipped; a vacuum that outlasts the statement timeout
/// is abandoned with a warning (the next pass tries again). Returns whether it vacuumed.
fn vacuum_if_bloated(
    client: &mut Client,
    schema: &str,
    table: &str,
    base: i64,
    fraction: f64,
    before_each: &mut dyn FnMut(),
) -> Result<bool, QueueError> {
    let relation = format!("{}.{table}", render("{s}", schema));
    before_each();
    let dead: Option<i64> = client
        .query_typed_opt(
            sql::DEAD_ROWS,
            &[
                (&relation, Type::TEXT),
                (&base, Type::INT8),
                (&fraction, Type::FLOAT8),
            ],
        )?
        .map(|r| r.get(0));
    let Some(dead) = dead else {
        return Ok(false);
    };
    before_each();
    match client.batch_execute(&format!("VACUUM (SKIP_LOCKED) {relation}")) {
        Ok(()) => {
            log::debug!("vacuumed {relation}: {dead} dead rows");
            Ok(true)
        }
        Err(e) if e.code() == Some(&postgres::error::SqlState::QUERY_CANCELED) => {
            log::warn!(
                "the vacuum of {relation} ({dead} dead rows) outlasted the statement timeout and \
                 was abandoned; the next maintenance pass tries again"
            );
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The batch repair service: fixes open batches whose counters disagree with their children and
/// logs each fix, since a repair means something bypassed `retire()` (a hand edit, a bug).
fn repair_batches(
    tx: &mut postgres::Transaction<'_>,
    schema: &str,
    retain: bool,
) -> Result<usize, QueueError> {
    let repairs = batch::repair(tx, schema, retain)?;
    for r in &repairs {
        log::warn!(
            "batch repair: batch {} had {} and now has {}",
            r.batch_id,
            r.before,
            r.after
        );
    }
    Ok(repairs.len())
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn a_report_reads_as_a_sentence_of_what_changed() {
        assert_eq!(Report::default().to_string(), "nothing to do");
        let report = Report {
            rescued: 3,
            purged: 120,
            windows_purged: 4,
            batches_repaired: 1,
            vacuumed: vec!["jobs"],
        };
        assert_eq!(
            report.to_string(),
            "3 expired lease(s) rescued, 120 archived job(s) purged, 4 expired unique window(s) \
             purged, 1 batch(es) repaired, vacuumed jobs"
        );
    }
}
