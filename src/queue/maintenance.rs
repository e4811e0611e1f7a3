//! Maintenance services: small periodic passes that keep the queue healthy.
//!
//! Any child may run them; an advisory lock makes one holder per database at a time, and the slot
//! table's header makes one attempt per host per interval. Each service is one function with one
//! job, in the spirit of River's maintenance services.

use std::time::{Duration, Instant};

use postgres::Client;

use super::sql::{self, render};
use super::{batch, QueueError};

/// How often a host attempts the maintenance pass.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// What one pass changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Expired leases returned to the queue (or dead-lettered).
    pub rescued: i32,
    /// Archived jobs deleted after their retention.
    pub purged: u64,
    /// Open batches whose counters or state were repaired (each is logged).
    pub batches_repaired: usize,
    /// Running jobs of capped queues counted against their caps after the fact (claimed while
    /// the cap was being set).
    pub limited_adopted: i32,
    /// Progress reports of finished jobs deleted after the retention.
    pub progress_purged: i32,
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
        self.rescued > 0
            || self.purged > 0
            || self.batches_repaired > 0
            || self.limited_adopted > 0
            || self.progress_purged > 0
    }
}

/// One sentence for the log, naming only what changed: "3 expired lease(s) rescued, ...".
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            (self.rescued as u64, "expired lease(s) rescued"),
            (self.purged, "archived job(s) purged"),
            (self.batches_repaired as u64, "batch(es) repaired"),
            (
                self.limited_adopted as u64,
                "running job(s) counted against their queue's new cap",
            ),
            (self.progress_purged as u64, "progress report(s) purged"),
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
/// the vacuums outside any.
pub fn run_pass(
    client: &mut Client,
    schema: &str,
    retention: Duration,
) -> Result<Option<Report>, QueueError> {
    let retain = !retention.is_zero();
    let Some(rescued) = locked(client, schema, |tx| {
        Ok(tx
            .query_one(&render(sql::RESCUE_EXPIRED, schema), &[&retain])?
            .get(0))
    })?
    else {
        return Ok(None);
    };
    let mut report = Report {
        rescued,
        purged: purge_archive(client, schema, retention)?,
        batches_repaired: locked(client, schema, |tx| {
            let repaired = repair_batches(tx, schema, retain)?;
            tx.execute(&render(sql::COMPACT_CHANGES, schema), &[])?;
            Ok(repaired)
        })?
        .unwrap_or(0),
        limited_adopted: locked(client, schema, |tx| {
            Ok(tx
                .query_one(&render(sql::MARK_LIMITED, schema), &[])?
                .get(0))
        })?
        .unwrap_or(0),
        progress_purged: locked(client, schema, |tx| {
            Ok(tx
                .query_one(
                    &render(sql::PURGE_PROGRESS, schema),
                    &[&retention.as_secs_f64(), &(PURGE_CHUNK as i32)],
                )?
                .get(0))
        })?
        .unwrap_or(0),
        vacuumed: Vec::new(),
    };
    for (table, base, fraction) in VACUUMED {
        if vacuum_if_bloated(client, schema, table, base, fraction)? {
            report.vacuumed.push(table);
        }
    }
    Ok(Some(report))
}

/// Runs `work` in a transaction holding the maintenance lock; `None` when another process holds
/// it.
fn locked<T>(
    client: &mut Client,
    schema: &str,
    work: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, QueueError>,
) -> Result<Option<T>, QueueError> {
    let mut tx = client.transaction()?;
    let got: bool = tx
        .query_one(
            sql::TRY_MAINTENANCE_LOCK,
            &[&sql::advisory_key("maintenance", schema)],
        )?
        .get(0);
    if !got {
        return Ok(None);
    }
    let out = work(&mut tx)?;
    tx.commit()?;
    Ok(Some(out))
}

/// The retention service: deletes expired archived jobs in chunks, each in its own transaction,
/// until none is left or [`PURGE_BUDGET`] is spent, so it keeps pace with the drain.
fn purge_archive(
    client: &mut Client,
    schema: &str,
    retention: Duration,
) -> Result<u64, QueueError> {
    let started = Instant::now();
    client.execute(&render(sql::SUMMARIZE_ARCHIVE, schema), &[])?;
    let purge = render(sql::PURGE_EXPIRED_ARCHIVE, schema);
    let mut purged = 0;
    loop {
        let chunk = locked(client, schema, |tx| {
            Ok(tx.execute(&purge, &[&retention.as_secs_f64(), &(PURGE_CHUNK as i64)])?)
        })?
        .unwrap_or(0);
        purged += chunk;
        if chunk < PURGE_CHUNK || started.elapsed() >= PURGE_BUDGET {
            return Ok(purged);
        }
    }
}

/// The tables the vacuum service watches: name, and the dead rows that trigger a vacuum (a base,
/// plus a fraction of the live rows). The hot table is vacuumed early: every claim walks past its
/// dead index entries, so claims slow down as they pile up, and autovacuum (when it is on at all)
/// visits a busy table only once a minute.
const VACUUMED: [(&str, i64, f64); 5] = [
    ("jobs", 10_000, 0.1),
    ("jobs_archive", 100_000, 0.2),
    ("changes", 1_000, 0.0),
    // Rewritten at every progress report and rate-limited claim.
    ("job_progress", 1_000, 0.5),
    ("queues", 1_000, 0.0),
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
) -> Result<bool, QueueError> {
    let relation = format!("{}.{table}", render("{s}", schema));
    let dead: Option<i64> = client
        .query_opt(
            "SELECT n_dead_tup FROM pg_stat_user_tables
             WHERE relid = $1::text::regclass AND n_dead_tup > $2::bigint + $3::float8 * n_live_tup",
            &[&relation, &base, &fraction],
        )?
        .map(|r| r.get(0));
    let Some(dead) = dead else {
        return Ok(false);
    };
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
            batches_repaired: 1,
            vacuumed: vec!["jobs"],
            ..Report::default()
        };
        assert_eq!(
            report.to_string(),
            "3 expired lease(s) rescued, 120 archived job(s) purged, 1 batch(es) repaired, \
             vacuumed jobs"
        );
    }
}
