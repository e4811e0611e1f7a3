//! The Rust producer API: a small connection pool and enqueue calls.
//!
//! For use in applications, never in the supervisor (r2d2 starts threads).

use postgres::{NoTls, Transaction};
use r2d2_postgres::PostgresConnectionManager;

use crate::config::Config;
use crate::queue::batch::{self, NewBatch};
use crate::queue::producer::{self, Enqueued, Limits, NewJob};
use crate::queue::waiting::{self, Finished};
use crate::queue::{migrations, QueueError};

/// Enqueues jobs from an application. Cheap to clone; the pool is shared.
#[derive(Clone)]
pub struct Client {
    pool: r2d2::Pool<PostgresConnectionManager<NoTls>>,
    schema: String,
    limits: Limits,
}

impl Client {
    /// Connects with the settings of `config` (database URL, schema, payload limit, default
    /// attempts) and checks that the schema is migrated.
    pub fn new(config: &Config) -> Result<Client, QueueError> {
        let pg: postgres::Config = config.database_url.parse()?;
        let pool = r2d2::Pool::builder()
            .max_size(4)
            .build(PostgresConnectionManager::new(pg, NoTls))
            .map_err(|e| {
                QueueError::Unavailable(format!(
                    "cannot open the connection pool ({e}); check DATABASE_URL"
                ))
            })?;
        let client = Client {
            pool,
            schema: config.schema.clone(),
            limits: Limits {
                max_payload_bytes: config.max_payload_bytes,
                default_max_attempts: config.max_attempts,
            },
        };
        migrations::require_current(&mut *client.connection()?, &client.schema)?;
        Ok(client)
    }

    fn connection(
        &self,
    ) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, QueueError> {
        self.pool
            .get()
            .map_err(|e| QueueError::Unavailable(format!("no connection from the pool ({e}); check DATABASE_URL and that PostgreSQL is running")))
    }

    /// Enqueues one job; returns its id.
    pub fn enqueue(&self, job: &NewJob) -> Result<i64, QueueError> {
        producer::enqueue(&mut *self.connection()?, &self.schema, &self.limits, job)
    }

    /// Enqueues one job and says what happened: created, or the job holding its unique key
    /// (replaced, with [`NewJob::with_replace`]).
    pub fn enqueue_with_outcome(&self, job: &NewJob) -> Result<Enqueued, QueueError> {
        producer::enqueue_with_outcome(&mut *self.connection()?, &self.schema, &self.limits, job)
    }

    /// Enqueues one job inside the caller's transaction: it exists only if that transaction
    /// commits, and workers are notified only then.
    pub fn enqueue_in(&self, tx: &mut Transaction<'_>, job: &NewJob) -> Result<i64, QueueError> {
        producer::enqueue(tx, &self.schema, &self.limits, job)
    }

    /// Enqueues many jobs in one transaction; returns how many were inserted.
    pub fn enqueue_many(&self, jobs: &[NewJob]) -> Result<u64, QueueError> {
        producer::enqueue_many(
            &mut *self.connection()?,
            &self.schema,
            &self.limits,
            jobs,
            None,
        )
    }

    /// Creates a batch with `jobs` as its children, parent and children in one transaction;
    /// returns the batch id. Workers are notified after commit. An empty batch completes at once.
    pub fn enqueue_batch(&self, batch: &NewBatch, jobs: &[NewJob]) -> Result<i64, QueueError> {
        batch::create(
            &mut *self.connection()?,
            &self.schema,
            &self.limits,
            batch,
            jobs,
        )
    }

    /// [`Client::enqueue_batch`] inside the caller's transaction: the batch and its children
    /// exist only if that transaction commits, and workers are notified only then.
    pub fn enqueue_batch_in(
        &self,
        tx: &mut Transaction<'_>,
        batch: &NewBatch,
        jobs: &[NewJob],
    ) -> Result<i64, QueueError> {
        batch::create(tx, &self.schema, &self.limits, batch, jobs)
    }

    /// Waits up to `timeout` for job `id` to end and says how (`None`: still not ended). Polls
    /// with a growing pause (10 ms to 1 s) and holds no pooled connection between polls; jobs
    /// nobody waits for pay nothing for it.
    pub fn wait(
        &self,
        id: i64,
        timeout: std::time::Duration,
    ) -> Result<Option<Finished>, QueueError> {
        waiting::wait(
            || waiting::finished(&mut *self.connection()?, &self.schema, id),
            timeout,
        )
    }

    /// The schema this client enqueues into.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}
