//! Maintenance services: small periodic passes that keep the queue healthy.
//!
//! Any child may run them; an advisory lock makes one holder per database at a time, and the slot
//! table's header makes one attempt per host per interval. Each service is one function with one
//! job, in the spirit of River's maintenance services.

use std::sync::atomic::{AtomicU64, Ordering};
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
            (self.windows_purged, "expired unique window(s) purged"),
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

/// Runs every service once, if it is this caller's turn: at most one pass per `gap` across every
/// host of the schema (the `maintenance_turn` row; a caller that finds it taken, or locked by a
/// pass starting elsewhere, gets `None`). Every statement is one round trip of its own, committed
/// on its own, and every service skips rows others hold (`SKIP LOCKED`), so passes never wait on
/// each other and everything works behind a pooler in transaction mode. `before_each` is called
/// before every round trip, so a worker can announce how long that one may block it (each is
/// bounded by the connection's timeouts). An error ends the pass; the caller gives it up until
/// the next interval rather than retrying a statement that timed out.
pub fn run_pass(
    client: &mut Client,
    schema: &str,
    retention: Duration,
    gap: Duration,
    before_each: &mut dyn FnMut(),
) -> Result<Option<Report>, QueueError> {
    let retain = !retention.is_zero();
    before_each();
    let Some(rescued) = client
        .query_typed_one(
            &render(sql::TAKE_TURN_AND_RESCUE, schema),
            &[(&retain, Type::BOOL), (&gap.as_secs_f64(), Type::FLOAT8)],
        )?
        .get::<_, Option<i32>>(0)
    else {
        return Ok(None);
    };
    let mut report = Report {
        rescued,
        purged: purge_archive(client, schema, retention, before_each)?,
        windows_purged: {
            before_each();
            execute_typed(client, &render(sql::PURGE_EXPIRED_WINDOWS, schema), &[])?
        },
        batches_repaired: {
            before_each();
            repair_batches(client, schema, retain)?
        },
        limited_adopted: {
            before_each();
            client
                .query_typed_one(&render(sql::MARK_LIMITED, schema), &[])?
                .get(0)
        },
        progress_purged: {
            before_each();
            client
                .query_typed_one(
                    &render(sql::PURGE_PROGRESS, schema),
                    &[
                        (&retention.as_secs_f64(), Type::FLOAT8),
                        (&(PURGE_CHUNK as i32), Type::INT4),
                    ],
                )?
                .get(0)
        },
        vacuumed: Vec::new(),
    };
    before_each();
    client.query_typed(&render(sql::COMPACT_CHANGES, schema), &[])?;
    report.vacuumed = vacuum_bloated(client, schema, before_each)?;
    Ok(Some(report))
}

/// The retention service: deletes expired archived jobs in chunks, one statement each, until
/// none is left or [`PURGE_BUDGET`] is spent, so it keeps pace with the drain.
fn purge_archive(
    client: &mut Client,
    schema: &str,
    retention: Duration,
    before_each: &mut dyn FnMut(),
) -> Result<u64, QueueError> {
    let started = Instant::now();
    let purge = render(sql::PURGE_EXPIRED_ARCHIVE, schema);
    let mut purged = 0;
    loop {
        before_each();
        let chunk = execute_typed(
            client,
            &purge,
            &[
                (&retention.as_secs_f64(), Type::FLOAT8),
                (&(PURGE_CHUNK as i64), Type::INT8),
            ],
        )?;
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
const VACUUMED: [(&str, i64, f64); 6] = [
    ("jobs", 10_000, 0.1),
    ("jobs_archive", 100_000, 0.2),
    ("changes", 1_000, 0.0),
    ("unique_windows", 10_000, 0.2),
    // Rewritten at every progress report and rate-limited claim.
    ("job_progress", 1_000, 0.5),
    ("queues", 1_000, 0.0),
];

/// The vacuum service: vacuums each watched table whose dead rows exceed `base + fraction × live
/// rows` (one query finds them). A table someone else is vacuuming is skipped, and so is one that
/// a session has held a snapshot on since its last vacuum (see [`sql::BLOATED_TABLES`]); a vacuum
/// that outlasts the statement timeout is abandoned with a warning (the next pass tries again).
/// Empty pages at a table's end are kept (`TRUNCATE false`), as the table will fill them again.
/// Returns the tables vacuumed.
fn vacuum_bloated(
    client: &mut Client,
    schema: &str,
    before_each: &mut dyn FnMut(),
) -> Result<Vec<&'static str>, QueueError> {
    let names: Vec<&str> = VACUUMED.iter().map(|v| v.0).collect();
    let bases: Vec<i64> = VACUUMED.iter().map(|v| v.1).collect();
    let fractions: Vec<f64> = VACUUMED.iter().map(|v| v.2).collect();
    before_each();
    let bloated: Vec<(String, i64, bool)> = client
        .query_typed(
            sql::BLOATED_TABLES,
            &[
                (&schema, Type::TEXT),
                (&names, Type::TEXT_ARRAY),
                (&bases, Type::INT8_ARRAY),
                (&fractions, Type::FLOAT8_ARRAY),
            ],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if let Some((_, dead, _)) = bloated.iter().find(|(table, _, _)| table == "jobs") {
        warn_of_snapshot_holder(client, *dead, before_each);
    }
    let mut vacuumed = Vec::new();
    for (table, dead, held) in bloated {
        let Some(&(name, _, _)) = VACUUMED.iter().find(|v| v.0 == table) else {
            continue;
        };
        let relation = format!("{}.{name}", render("{s}", schema));
        if held {
            // Without this, a psql session holding its snapshot had the hot table vacuumed at
            // every pass (2 s), 80,000 dead rows left each time (FORKQ_LOG=debug).
            log::debug!(
                "not vacuuming {relation} ({dead} dead rows): a session has held a snapshot since \
                 before its last vacuum, which removed all it could"
            );
            continue;
        }
        before_each();
        // Without TRUNCATE false, a vacuum that left empty pages at the end of the table (a hot
        // table just drained) tried for up to 5 s to lock the table exclusively, to give them
        // back, while the workers' statements kept it from doing so: the statement timeout cut
        // it first, the vacuum's statistics were never recorded, and the next pass vacuumed the
        // table again (scale cluster, 300k-job drains at 8 x 8: cut so 6 times in 3 minutes). When
        // the lock was had, every claim waited behind it. A queue's tables fill again; the
        // space stays theirs.
        match client.batch_execute(&format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {relation}")) {
            Ok(()) => {
                log::debug!("vacuumed {relation}: {dead} dead rows");
                vacuumed.push(name);
            }
            Err(e) if e.code() == Some(&postgres::error::SqlState::QUERY_CANCELED) => {
                log::warn!(
                    "the vacuum of {relation} ({dead} dead rows) outlasted the statement timeout \
                     and was abandoned; the next maintenance pass tries again"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(vacuumed)
}

/// A session whose snapshot is older than this is named when the hot table is found bloated.
const SNAPSHOT_HOLDER_AGE: Duration = Duration::from_secs(60);
/// At most one warning about it per process and this long.
const SNAPSHOT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Logs a warning naming the session that has held a snapshot for more than
/// [`SNAPSHOT_HOLDER_AGE`], if any, once the hot table has `dead` dead rows to vacuum: while it
/// holds it, no vacuum can remove them and every claim walks past the index entries of the jobs
/// claimed since (a drain of 200k jobs took 17-22 s instead of 5.6, docs/performance.md). A
/// diagnostic only: an error reading it is left to the debug log.
fn warn_of_snapshot_holder(client: &mut Client, dead: i64, before_each: &mut dyn FnMut()) {
    static LAST_WARNED_MS: AtomicU64 = AtomicU64::new(0);
    let now_ms = crate::slots::monotonic_ms();
    let last = LAST_WARNED_MS.load(Ordering::Relaxed);
    if last != 0 && now_ms.saturating_sub(last) < SNAPSHOT_WARNING_EVERY.as_millis() as u64 {
        return;
    }
    before_each();
    match snapshot_holder(client, SNAPSHOT_HOLDER_AGE) {
        Ok(Some(h)) => {
            LAST_WARNED_MS.store(now_ms.max(1), Ordering::Relaxed);
            log::warn!(
                "the queue's hot table has {dead} dead rows that no vacuum can remove while \
                 session {} ({}, {}, for {:.0} s: {:?}) holds a snapshot; claims \
                 slow down as jobs drain until it ends: end or shorten that transaction (see \
                 'A drain that slows down as it goes' in docs/operations.md)",
                h.pid,
                h.application_name,
                h.state,
                h.held_for.as_secs_f64(),
                h.query
            );
        }
        Ok(None) => {}
        Err(e) => log::debug!("cannot look for a session holding an old snapshot: {e}"),
    }
}

/// A session holding a snapshot (see [`snapshot_holder`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotHolder {
    /// Its backend's process id.
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Its state (`active`, `idle in transaction`, ...).
    pub state: String,
    /// How long it has held its snapshot: since its running statement began when it is active,
    /// else since its transaction began (see `sql::SNAPSHOT_HOLDER`).
    pub held_for: Duration,
    /// The start of its current or last query.
    pub query: String,
}

/// The client session of this database, other than `client`'s own, that has held a snapshot or
/// a transaction id longest, if it has for more than `older_than`.
pub fn snapshot_holder(
    client: &mut Client,
    older_than: Duration,
) -> Result<Option<SnapshotHolder>, QueueError> {
    let rows = client.query_typed(
        sql::SNAPSHOT_HOLDER,
        &[(&older_than.as_secs_f64(), Type::FLOAT8)],
    )?;
    Ok(rows.first().map(|r| SnapshotHolder {
        pid: r.get(0),
        application_name: r.get(1),
        state: r.get(2),
        held_for: Duration::from_secs_f64(r.get::<_, f64>(3).max(0.0)),
        query: r.get(4),
    }))
}

/// The batch repair service: fixes open batches whose counters disagree with their children and
/// logs each fix, since a repair means something bypassed `retire()` (a hand edit, a bug).
fn repair_batches(client: &mut Client, schema: &str, retain: bool) -> Result<usize, QueueError> {
    let repairs = batch::repair(client, schema, retain)?;
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
            ..Report::default()
        };
        assert_eq!(
            report.to_string(),
            "3 expired lease(s) rescued, 120 archived job(s) purged, 4 expired unique window(s) \
             purged, 1 batch(es) repaired, vacuumed jobs"
        );
    }
}
