//! The queue as one consumer child sees it: claim, settle, renew, release, wait.

use std::time::Duration;

use postgres::{Client, Statement};
use serde_json::Value;

use super::sql::{self, render};
use super::{connect_with_timeout, migrations, QueueError};
use crate::config::Config;
use crate::handler::Job;

/// A claimed job and the lease token that fences its acknowledgement.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job.
    pub job: Job,
    /// The token of this claim's lease.
    pub lease_token: i64,
}

/// How a finished job is to be settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Retire as completed, keeping the result.
    Completed(Value),
    /// Retire into the dead letter with this error.
    Failed(String),
    /// Back to the queue after `delay`, with an error to record (none for a temporary failure).
    Retry {
        /// Recorded as the job's last error when present.
        error: Option<String>,
        /// When to run again.
        delay: Duration,
    },
}

/// One acknowledgement waiting to be sent.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The job.
    pub id: i64,
    /// Its lease token.
    pub lease_token: i64,
    /// What to do with it.
    pub settlement: Settlement,
}

/// What a settle-and-claim round trip returned.
#[derive(Debug, Default)]
pub struct Round {
    /// Jobs claimed, in the order to run them.
    pub claimed: Vec<Claimed>,
    /// Acknowledgements refused because the lease was no longer ours.
    pub refused: Vec<i64>,
}

/// A consumer's connection with its statements prepared.
pub struct Consumer {
    client: Client,
    owner: String,
    queues: Vec<String>,
    lease_seconds: f64,
    retain: bool,
    settle_and_claim: Statement,
    renew: Statement,
    release: Statement,
}

impl Consumer {
    /// Connects, checks the schema version and prepares statements. `owner` names this consumer's
    /// leases (host, supervisor boot, slot and generation).
    pub fn connect(config: &Config, owner: &str) -> Result<Consumer, QueueError> {
        // A worker cannot heartbeat while it waits on the database, so every wait on it is
        // bounded (see WorkerTimeouts) and announced in its slot: a slow or partitioned database
        // makes the child reconnect (heartbeating meanwhile), never look wedged.
        let budget = super::WorkerTimeouts::new(config.health_stale).budget;
        let mut client = connect_with_timeout(&config.database_url, "forkq worker", budget)?;
        // Delivery is at least once anyway: an ack or claim lost in a database crash only makes
        // its job run again, exactly as a worker crash before the ack would. Not waiting for the
        // WAL flush at every round trip is what lets a child keep up with short jobs.
        // FORKQ_DURABLE=1 keeps every acknowledgement durable before the next job.
        let commit = if config.durable { "on" } else { "off" };
        client.batch_execute(&format!(
            "SET statement_timeout = {}; SET synchronous_commit = {commit}",
            budget.as_millis()
        ))?;
        migrations::require_current(&mut client, &config.schema)?;
        let s = &config.schema;
        let settle_and_claim = client.prepare(&render(sql::SETTLE_AND_CLAIM, s))?;
        let renew = client.prepare(&render(sql::RENEW, s))?;
        let release = client.prepare(&render(sql::RELEASE, s))?;
        Ok(Consumer {
            client,
            owner: owner.to_string(),
            queues: config.queues.clone(),
            lease_seconds: config.lease.as_secs_f64(),
            retain: !config.retention.is_zero(),
            settle_and_claim,
            renew,
            release,
        })
    }

    /// The lease owner string.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The connection, for maintenance work.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Sends `acks` and claims up to `limit` jobs in one round trip (`limit` 0 only settles).
    pub fn settle_and_claim(&mut self, acks: &[Ack], limit: usize) -> Result<Round, QueueError> {
        let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
        let tokens: Vec<i64> = acks.iter().map(|a| a.lease_token).collect();
        let mut outcomes = Vec::with_capacity(acks.len());
        let mut results = Vec::with_capacity(acks.len());
        let mut errors = Vec::with_capacity(acks.len());
        let mut delays = Vec::with_capacity(acks.len());
        for ack in acks {
            let (outcome, result, error, delay) = match &ack.settlement {
                Settlement::Completed(v) => ("completed", Some(v.clone()), None, 0.0),
                Settlement::Failed(e) => ("failed", None, Some(e.clone()), 0.0),
                Settlement::Retry { error, delay } => {
                    ("retry", None, error.clone(), delay.as_secs_f64())
                }
            };
            outcomes.push(outcome);
            results.push(result);
            errors.push(error);
            delays.push(delay);
        }
        let limit = limit as i32;
        let rows = self.client.query(
            &self.settle_and_claim,
            &[
                &ids,
                &tokens,
                &outcomes,
                &results,
                &errors,
                &delays,
                &self.retain,
                &self.queues,
                &limit,
                &self.owner,
                &self.lease_seconds,
            ],
        )?;
        let mut round = Round::default();
        for row in rows {
            if let Some(refused) = row.get::<_, Option<Vec<i64>>>("refused") {
                if round.refused.is_empty() {
                    round.refused = refused;
                }
            }
            let Some(id) = row.get::<_, Option<i64>>("id") else {
                continue;
            };
            round.claimed.push(Claimed {
                job: Job {
                    id,
                    queue: row.get("queue"),
                    task: row.get("task"),
                    payload: row.get("payload"),
                    attempt: row.get("attempt"),
                    max_attempts: row.get("max_attempts"),
                    batch_id: row.get("batch_id"),
                },
                lease_token: row.get("lease_token"),
            });
        }
        Ok(round)
    }

    /// Renews every lease this consumer holds; returns the ids it still holds.
    pub fn renew(&mut self) -> Result<Vec<i64>, QueueError> {
        Ok(self
            .client
            .query(&self.renew, &[&self.owner, &self.lease_seconds])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Gives back the jobs held by `owner` (this consumer, or a dead predecessor in its slot);
    /// `in_flight` is the job that was running (charged, dead-lettered with `error` when it has
    /// no attempts left). Returns how many went back to the queue.
    pub fn release(
        &mut self,
        owner: &str,
        in_flight: Option<i64>,
        error: Option<&str>,
    ) -> Result<i32, QueueError> {
        let in_flight = in_flight.unwrap_or(0);
        Ok(self
            .client
            .query_one(&self.release, &[&owner, &in_flight, &error, &self.retain])?
            .get(0))
    }
}
