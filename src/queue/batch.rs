//! Batches: many jobs created together, counted as they end, completed exactly once.
//!
//! The parent row and its children are inserted in one transaction (workers are notified when it
//! commits). Each child's terminal ack updates the parent's counters inside `retire()`, in the
//! ack's own transaction; the ack that takes the batch out of `open` enqueues its completion job.
//! See `sql/001_schema.sql` (the batch functions) for why that happens exactly once.

use std::borrow::Cow;

use postgres::types::Type;
use postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use super::producer::{self, Limits, NewJob};
use super::sql::{self, render};
use super::QueueError;
use crate::config::is_valid_queue_name;

/// The states a batch can be in.
pub const STATES: [&str; 4] = ["open", "completed", "failed", "cancelled"];

/// How many open batches one repair pass checks at most (each costs two index counts).
const REPAIR_LIMIT: i32 = 1000;

/// A batch to create. Build with [`NewBatch::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBatch {
    /// The queue of children that name none, and of the completion job unless
    /// `on_complete_queue` says otherwise.
    pub queue: String,
    /// Stop the batch at the first child that fails for good: cancel the waiting children,
    /// mark the batch failed and enqueue the completion job at once.
    pub fail_fast: bool,
    /// The task of the completion job enqueued when the batch ends; none when `None`.
    pub on_complete_task: Option<String>,
    /// The queue of the completion job (default: the batch's queue).
    pub on_complete_queue: Option<String>,
}

impl NewBatch {
    /// A batch on `queue`, without completion job, not fail-fast.
    pub fn new(queue: impl Into<String>) -> NewBatch {
        NewBatch {
            queue: queue.into(),
            fail_fast: false,
            on_complete_task: None,
            on_complete_queue: None,
        }
    }

    /// Makes the batch fail fast.
    pub fn with_fail_fast(mut self) -> NewBatch {
        self.fail_fast = true;
        self
    }

    /// Enqueues `task` when the batch ends, with the batch id, state and counts as payload.
    pub fn with_on_complete(mut self, task: impl Into<String>) -> NewBatch {
        self.on_complete_task = Some(task.into());
        self
    }

    /// Sends the completion job to `queue` instead of the batch's queue.
    pub fn with_on_complete_queue(mut self, queue: impl Into<String>) -> NewBatch {
        self.on_complete_queue = Some(queue.into());
        self
    }

    /// Refuses a batch that the database would refuse, with a message saying what to change.
    fn validate(&self, limits: &Limits) -> Result<(), QueueError> {
        if !is_valid_queue_name(&self.queue) {
            return Err(QueueError::InvalidJob(format!(
                "batch queue name {:?} is not allowed: use 1-128 bytes without spaces, commas or control characters",
                self.queue
            )));
        }
        if let Some(task) = &self.on_complete_task {
            let queue = self.on_complete_queue.as_deref().unwrap_or(&self.queue);
            let completion = NewJob::new(queue, task.as_str(), Value::Null);
            producer::check(&completion, limits)
                .map_err(|e| QueueError::InvalidJob(format!("the completion job: {e}")))?;
        } else if self.on_complete_queue.is_some() {
            return Err(QueueError::InvalidJob(
                "a completion queue was given without a completion task".into(),
            ));
        }
        Ok(())
    }
}

/// A batch's state and counters, as `forkq batch status --json` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchStatus {
    /// The batch id.
    pub id: i64,
    /// `open`, `completed`, `failed` or `cancelled`.
    pub state: String,
    /// Children created with the batch.
    pub total: i32,
    /// Children not yet ended (waiting, running or waiting for a retry).
    pub pending: i32,
    /// Children that completed.
    pub succeeded: i32,
    /// Children that failed for good.
    pub failed: i32,
    /// Children that were cancelled.
    pub cancelled: i32,
}

/// A batch with everything the operator sees in `forkq batch list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchInfo {
    /// State and counters.
    #[serde(flatten)]
    pub status: BatchStatus,
    /// The batch's queue.
    pub queue: String,
    /// Whether the first permanent failure stops the batch.
    pub fail_fast: bool,
    /// The completion job, once enqueued.
    pub completion_job_id: Option<i64>,
    /// When the batch was created, as PostgreSQL prints it.
    pub created_at: String,
    /// When it left `open`.
    pub finished_at: Option<String>,
}

impl BatchInfo {
    fn from_row(row: &postgres::Row) -> BatchInfo {
        BatchInfo {
            status: BatchStatus {
                id: row.get("id"),
                state: row.get("state"),
                total: row.get("total"),
                pending: row.get("pending"),
                succeeded: row.get("succeeded"),
                failed: row.get("failed"),
                cancelled: row.get("cancelled"),
            },
            queue: row.get("queue"),
            fail_fast: row.get("fail_fast"),
            completion_job_id: row.get("completion_job_id"),
            created_at: row.get("created_at"),
            finished_at: row.get("finished_at"),
        }
    }
}

/// Creates a batch with `jobs` as its children in one transaction inside `client` (a connection,
/// or the caller's own transaction: then the batch exists only if that commits). Jobs that name
/// no queue go to the batch's queue. Every job is validated before anything is inserted; if any
/// insert fails, the parent and every child are rolled back. A child whose unique key is live
/// already is not enqueued and not counted. Returns the batch id.
pub fn create(
    client: &mut impl GenericClient,
    schema: &str,
    limits: &Limits,
    batch: &NewBatch,
    jobs: &[NewJob],
) -> Result<i64, QueueError> {
    batch.validate(limits)?;
    if let Some(job) = jobs.iter().find(|j| j.replace) {
        return Err(QueueError::InvalidJob(format!(
            "a batch child cannot replace another job (task {:?}, unique key {:?}): \
             drop replace, or enqueue it outside the batch",
            job.task,
            job.unique_key.as_deref().unwrap_or("")
        )));
    }
    let jobs: Cow<'_, [NewJob]> = if jobs.iter().any(|j| j.queue.is_empty()) {
        Cow::Owned(
            jobs.iter()
                .map(|j| {
                    if j.queue.is_empty() {
                        NewJob {
                            queue: batch.queue.clone(),
                            ..j.clone()
                        }
                    } else {
                        j.clone()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(jobs)
    };
    let mut tx = client.transaction()?;
    let id: i64 = tx
        .query_typed_one(
            &render(sql::BATCH_OPEN, schema),
            &[
                (&batch.queue, Type::TEXT),
                (&batch.fail_fast, Type::BOOL),
                (&batch.on_complete_task, Type::TEXT),
                (&batch.on_complete_queue, Type::TEXT),
            ],
        )?
        .get(0);
    producer::enqueue_many(&mut tx, schema, limits, &jobs, Some(id))?;
    tx.query_typed_one(&render(sql::BATCH_SEAL, schema), &[(&id, Type::INT8)])?;
    tx.commit()?;
    Ok(id)
}

/// One batch's state and counters; `None` when there is no such batch.
pub fn status(
    client: &mut impl GenericClient,
    schema: &str,
    id: i64,
) -> Result<Option<BatchInfo>, QueueError> {
    Ok(client
        .query_typed_opt(&render(sql::BATCH_STATUS, schema), &[(&id, Type::INT8)])?
        .as_ref()
        .map(BatchInfo::from_row))
}

/// The newest `limit` batches with ids below `before` (keyset paging; `None` from the newest), only
/// those in `state` when given (one of [`STATES`]).
pub fn list(
    client: &mut impl GenericClient,
    schema: &str,
    state: Option<&str>,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<BatchInfo>, QueueError> {
    Ok(client
        .query_typed(
            &render(sql::BATCH_LIST, schema),
            &[
                (&state, Type::TEXT),
                (&limit, Type::INT8),
                (&before, Type::INT8),
            ],
        )?
        .iter()
        .map(BatchInfo::from_row)
        .collect())
}

/// What [`cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The batch was open and is now cancelled.
    Cancelled,
    /// The batch had finished already, in this state; nothing changed.
    AlreadyFinished(String),
}

/// Cancels an open batch: waiting children are cancelled, running ones are told to stop (never
/// retried), the completion job is enqueued. `None` when there is no such batch.
pub fn cancel(
    client: &mut impl GenericClient,
    schema: &str,
    id: i64,
    retain: bool,
) -> Result<Option<CancelOutcome>, QueueError> {
    Ok(client
        .query_typed_opt(
            &render(sql::BATCH_CANCEL, schema),
            &[(&id, Type::INT8), (&retain, Type::BOOL)],
        )?
        .map(|row| {
            if row.get::<_, bool>(1) {
                CancelOutcome::Cancelled
            } else {
                CancelOutcome::AlreadyFinished(row.get(0))
            }
        }))
}

/// What the repair changed in one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Repair {
    /// The batch.
    pub batch_id: i64,
    /// State and counters before.
    pub before: Value,
    /// State and counters after (and the completion job, when it has one).
    pub after: Value,
}

/// Recomputes the counters of open batches from their children's rows where they disagree, and
/// finishes batches whose children all ended (enqueueing the completion job once). Run by the
/// maintenance pass under its advisory lock; returns what it fixed, for the log.
pub fn repair(
    client: &mut impl GenericClient,
    schema: &str,
    retain: bool,
) -> Result<Vec<Repair>, QueueError> {
    Ok(client
        .query_typed(
            &render(sql::BATCH_REPAIR, schema),
            &[(&REPAIR_LIMIT, Type::INT4), (&retain, Type::BOOL)],
        )?
        .iter()
        .map(|row| Repair {
            batch_id: row.get(0),
            before: row.get(1),
            after: row.get(2),
        })
        .collect())
}
