//! Maintenance services: small periodic passes that keep the queue healthy.
//!
//! Any child may run them; an advisory lock makes one holder per database at a time, and the slot
//! table's header makes one attempt per host per interval. Each service is one function with one
//! job, in the spirit of River's maintenance services.

use std::time::Duration;

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
    /// Due scheduled or retryable jobs marked available.
    pub promoted: u64,
    /// Archived jobs deleted after their retention.
    pub purged: u64,
    /// Open batches whose counters or state were repaired (each is logged).
    pub batches_repaired: usize,
}

/// Runs every service once, if no other process holds the maintenance lock. Returns `None`
/// when another holder had it. `before_each` is called before every round trip, so a worker can
/// announce how long that one may block it (each is bounded by the connection's timeouts; a pass
/// has several). An error ends the pass, rolled back; the caller gives it up until the next
/// interval rather than retrying a statement that timed out.
pub fn run_pass(
    client: &mut Client,
    schema: &str,
    retention: Duration,
    before_each: &mut dyn FnMut(),
) -> Result<Option<Report>, QueueError> {
    before_each();
    let mut tx = client.transaction()?;
    before_each();
    let locked: bool = tx
        .query_one(
            sql::TRY_MAINTENANCE_LOCK,
            &[&sql::advisory_key("maintenance", schema)],
        )?
        .get(0);
    if !locked {
        return Ok(None);
    }
    let retain = !retention.is_zero();
    let report = Report {
        rescued: {
            before_each();
            tx.query_one(&render(sql::RESCUE_EXPIRED, schema), &[&retain])?
                .get(0)
        },
        promoted: {
            before_each();
            tx.execute(&render(sql::PROMOTE_DUE, schema), &[])?
        },
        purged: {
            before_each();
            tx.execute(
                &render(sql::PURGE_EXPIRED_ARCHIVE, schema),
                &[&retention.as_secs_f64()],
            )?
        },
        batches_repaired: {
            before_each();
            repair_batches(&mut tx, schema, retain)?
        },
    };
    before_each();
    tx.commit()?;
    Ok(Some(report))
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
