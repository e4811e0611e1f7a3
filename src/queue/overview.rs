//! What the dashboard's queue page shows, without counting the archive's bulk: live jobs by
//! state (the hot table is small by design), the dead letter up to a cap (through its partial
//! index), the age of the oldest runnable job and how many hosts serve each queue.

use postgres::types::Type;
use postgres::GenericClient;
use serde::Serialize;

use super::hosts::GONE_AFTER_INTERVALS;
use super::queues::Settings;
use super::sql::{self, render};
use super::QueueError;

/// The dead letter of a queue is counted up to this many jobs; beyond, the page says "more than".
pub const DEAD_COUNT_CAP: i64 = 10_000;
/// The queue page lists at most this many queues.
const MAX_QUEUES: i64 = 500;

/// One queue's line on the queue page.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QueueRow {
    /// The queue.
    pub queue: String,
    /// Jobs that can run now (due scheduled and retryable ones included).
    pub available: i64,
    /// Jobs waiting for their first run time.
    pub scheduled: i64,
    /// Jobs leased to a worker.
    pub running: i64,
    /// Jobs waiting for a retry.
    pub retryable: i64,
    /// Age of the oldest job that could run now (0 when none).
    pub oldest_available_seconds: f64,
    /// Dead-lettered jobs (at most [`DEAD_COUNT_CAP`] counted).
    pub failed: i64,
    /// Cancelled jobs still archived (within the same cap).
    pub cancelled: i64,
    /// More dead-lettered jobs than the cap.
    pub dead_capped: bool,
    /// Hosts consuming this queue now.
    pub hosts: i64,
    /// Paused or not, and its limits.
    pub settings: Settings,
}

/// Every queue with live or dead-lettered jobs, a host serving it or settings, by name.
pub fn queues(client: &mut impl GenericClient, schema: &str) -> Result<Vec<QueueRow>, QueueError> {
    Ok(client
        .query_typed(
            &render(sql::QUEUE_OVERVIEW, schema),
            &[
                (&DEAD_COUNT_CAP, Type::INT8),
                (&f64::from(GONE_AFTER_INTERVALS), Type::FLOAT8),
                (&MAX_QUEUES, Type::INT8),
            ],
        )?
        .iter()
        .map(|r| QueueRow {
            queue: r.get(0),
            available: r.get(1),
            scheduled: r.get(2),
            running: r.get(3),
            retryable: r.get(4),
            oldest_available_seconds: r.get(5),
            failed: r.get(6),
            cancelled: r.get(7),
            dead_capped: r.get(8),
            hosts: r.get(9),
            settings: Settings::from_row(r, 10).1,
        })
        .collect())
}
