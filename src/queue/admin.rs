//! Operator queries: status, one job, cancel, retry.

use std::collections::BTreeMap;

use postgres::types::Type;
use postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use super::sql::{self, render};
use super::QueueError;

/// Every state a job can be in, in the order status prints them.
pub const STATES: [&str; 7] = [
    "available",
    "scheduled",
    "running",
    "retryable",
    "completed",
    "failed",
    "cancelled",
];

/// Counts of one queue.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct QueueStatus {
    /// Jobs that can run now.
    pub available: i64,
    /// Jobs waiting for their first run time.
    pub scheduled: i64,
    /// Jobs leased to a worker.
    pub running: i64,
    /// Jobs waiting for a retry.
    pub retryable: i64,
    /// Completed jobs still in the archive.
    pub completed: i64,
    /// Dead-lettered jobs.
    pub failed: i64,
    /// Cancelled jobs still in the archive.
    pub cancelled: i64,
    /// Age of the oldest job that could run now (0 when none).
    pub oldest_available_seconds: f64,
}

impl QueueStatus {
    fn count_mut(&mut self, state: &str) -> Option<&mut i64> {
        Some(match state {
            "available" => &mut self.available,
            "scheduled" => &mut self.scheduled,
            "running" => &mut self.running,
            "retryable" => &mut self.retryable,
            "completed" => &mut self.completed,
            "failed" => &mut self.failed,
            "cancelled" => &mut self.cancelled,
            _ => return None,
        })
    }

    /// The count for `state` (one of [`STATES`]).
    pub fn count(&self, state: &str) -> i64 {
        self.clone().count_mut(state).map_or(0, |c| *c)
    }
}

/// Counts per queue and state, plus the age of each queue's oldest runnable job. The completed
/// jobs of the archive are counted only with `completed` (a scan of the whole archive: fine for
/// a command, too much for every metrics scrape); otherwise they show as 0.
pub fn status(
    client: &mut impl GenericClient,
    schema: &str,
    completed: bool,
) -> Result<BTreeMap<String, QueueStatus>, QueueError> {
    let mut queues: BTreeMap<String, QueueStatus> = BTreeMap::new();
    for row in client.query_typed(&render(sql::STATUS_COUNTS, schema), &[])? {
        let queue: String = row.get(0);
        let state: String = row.get(1);
        if let Some(count) = queues.entry(queue).or_default().count_mut(&state) {
            *count += row.get::<_, i64>(2);
        }
    }
    if completed {
        for row in client.query_typed(&render(sql::COMPLETED_COUNTS, schema), &[])? {
            queues.entry(row.get(0)).or_default().completed = row.get(1);
        }
    }
    for row in client.query_typed(&render(sql::OLDEST_AVAILABLE, schema), &[])? {
        queues
            .entry(row.get(0))
            .or_default()
            .oldest_available_seconds = row.get(1);
    }
    Ok(queues)
}

/// One job, live or archived, as JSON; `None` when there is no such job.
pub fn job(
    client: &mut impl GenericClient,
    schema: &str,
    id: i64,
) -> Result<Option<Value>, QueueError> {
    Ok(client
        .query_typed_opt(&render(sql::JOB_BY_ID, schema), &[(&id, Type::INT8)])?
        .map(|row| row.get(0)))
}

/// Cancels a job; returns its state afterwards (`cancelled`, `cancelling` for a running job, or
/// the terminal state it already had), or `None` when there is no such job.
pub fn cancel(
    client: &mut impl GenericClient,
    schema: &str,
    id: i64,
    retain: bool,
) -> Result<Option<String>, QueueError> {
    Ok(client
        .query_typed_one(
            &render(sql::CANCEL, schema),
            &[(&id, Type::INT8), (&retain, Type::BOOL)],
        )?
        .get(0))
}

/// Moves a failed or cancelled job back to the queue; false when it is not in the dead letter
/// (or a live job holds its unique key).
pub fn retry(client: &mut impl GenericClient, schema: &str, id: i64) -> Result<bool, QueueError> {
    Ok(client
        .query_typed_one(&render(sql::RETRY, schema), &[(&id, Type::INT8)])?
        .get(0))
}
