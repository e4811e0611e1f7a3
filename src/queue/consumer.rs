//! The queue as one consumer child sees it: claim, settle, renew, release.

use std::sync::Arc;
use std::time::Duration;

use postgres::types::{ToSql, Type};
use postgres::{Client, Row, Statement};
use serde_json::Value;

use super::sql::{self, render};
use super::{connect_with_timeout, hosts, migrations, QueueError};
use crate::config::{Config, Pooler};
use crate::handler::Job;

/// A claimed job and the lease token that fences its acknowledgement.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job.
    pub job: Job,
    /// The token of this claim's lease.
    pub lease_token: i64,
    /// Whether a lease on this job expired before (its worker vanished): the worker reports the
    /// start of such a job before running it (see [`Consumer::mark_started`]).
    pub suspect: bool,
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
    /// Its batch: a batch child's ack also counts it in its batch, off the lean path.
    pub batch_id: Option<i64>,
    /// What to do with it.
    pub settlement: Settlement,
}

impl Ack {
    /// The acknowledgement of `claimed` with `settlement`.
    pub fn new(claimed: &Claimed, settlement: Settlement) -> Ack {
        Ack {
            id: claimed.job.id,
            lease_token: claimed.lease_token,
            batch_id: claimed.job.batch_id,
            settlement,
        }
    }

    /// Whether the lean round settles it: a plain job that completed.
    fn is_lean(&self) -> bool {
        self.batch_id.is_none() && matches!(self.settlement, Settlement::Completed(_))
    }
}

/// What a settle-and-claim round trip returned.
#[derive(Debug, Default)]
pub struct Round {
    /// Jobs claimed, in the order to run them.
    pub claimed: Vec<Claimed>,
    /// Acknowledgements refused because the lease was no longer ours.
    pub refused: Vec<i64>,
    /// The count of changes a worker must notice (cancels, stopped batches) as of this round;
    /// when it moves, prefetched jobs are checked with [`Consumer::drop_cancelled`].
    pub changes: i64,
    /// Due scheduled and retryable jobs this round made claimable (for the next round).
    pub promoted: i64,
}

/// A consumer's connection; its statements are prepared on first use.
pub struct Consumer {
    client: Connection,
    schema: String,
    owner: String,
    queues: Vec<String>,
    lease_seconds: f64,
    retain: bool,
    statements: Statements,
}

/// The statements of one connection, by what they do.
#[derive(Default)]
struct Statements {
    round: Option<Prepared>,
    settle: Option<Prepared>,
    renew: Option<Prepared>,
    release: Option<Prepared>,
    mark_started: Option<Prepared>,
    drop_cancelled: Option<Prepared>,
}

/// A consumer's connection, and whether it goes through a pooler in transaction mode.
struct Connection {
    client: Client,
    pooled: bool,
}

/// A statement ready to be sent on one connection (see [`prepared`]).
#[derive(Clone)]
enum Prepared {
    /// Prepared once under a name: each use sends only the values. What keeps a direct
    /// connection fast: the server parses and plans the statement once, not at every round.
    Named(Statement),
    /// Sent whole and unnamed, with its parameter types, in the one round trip of each use:
    /// behind a pooler in transaction mode, a named statement would stay on a server connection
    /// the next transaction may not get (and another client's may already hold its name).
    Unnamed(Arc<(String, Vec<Type>)>),
}

/// Makes `text` (rendered for `schema`) ready to send on `client`, once per connection, and
/// returns it from `slot` afterwards. The one place that decides how a consumer's statements
/// travel: named prepared statements on a direct connection; behind a transaction-mode pooler,
/// unnamed ones with parameter types learned once (see [`parameter_types`]).
fn prepared(
    client: &mut Connection,
    slot: &mut Option<Prepared>,
    schema: &str,
    text: &str,
) -> Result<Prepared, QueueError> {
    if let Some(statement) = slot {
        return Ok(statement.clone());
    }
    let text = render(text, schema);
    let statement = if client.pooled {
        let types = parameter_types(&mut client.client, &text)?;
        Prepared::Unnamed(Arc::new((text, types)))
    } else {
        Prepared::Named(client.client.prepare(&text)?)
    };
    *slot = Some(statement.clone());
    Ok(statement)
}

/// The parameter types PostgreSQL infers for `text`, asked in one simple query (so on one
/// server connection, even behind a pooler) that prepares it under a name of forkq's own, reads
/// the types and deallocates it again: nothing is left on the server connection.
fn parameter_types(client: &mut Client, text: &str) -> Result<Vec<Type>, QueueError> {
    let reply = client.simple_query(&sql::DESCRIBE.replace("{statement}", text))?;
    let oids = reply
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default();
    oids.trim_matches(['{', '}'])
        .split(',')
        .filter(|o| !o.is_empty())
        .map(|oid| {
            oid.parse().ok().and_then(Type::from_oid).ok_or_else(|| {
                QueueError::Unavailable(format!(
                    "statement parameter of type oid {oid} is not a built-in type; it cannot \
                         be sent unnamed behind a pooler: {text}"
                ))
            })
        })
        .collect()
}

impl Connection {
    /// Sends `statement` with `params`; the rows it returns.
    fn query(
        &mut self,
        statement: &Prepared,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        match statement {
            Prepared::Named(named) => self.client.query(named, params),
            Prepared::Unnamed(unnamed) => {
                let (text, types) = &**unnamed;
                self.client.query_typed(text, &typed(text, types, params))
            }
        }
    }

    /// Sends `statement` with `params`; the one row it must return.
    fn query_one(
        &mut self,
        statement: &Prepared,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        match statement {
            Prepared::Named(named) => self.client.query_one(named, params),
            Prepared::Unnamed(unnamed) => {
                let (text, types) = &**unnamed;
                self.client
                    .query_typed_one(text, &typed(text, types, params))
            }
        }
    }
}

/// Pairs `params` with the statement's parameter types, for `query_typed`.
fn typed<'a>(
    text: &str,
    types: &[Type],
    params: &[&'a (dyn ToSql + Sync)],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    // A count that disagrees is a bug in the caller, which a named statement would have
    // refused too: never send the values shifted.
    assert_eq!(
        params.len(),
        types.len(),
        "statement takes {} parameters, got {}: {text}",
        types.len(),
        params.len()
    );
    params.iter().copied().zip(types.iter().cloned()).collect()
}

/// Splits `acks` into the columns a settling statement takes.
struct AckColumns<'a> {
    ids: Vec<i64>,
    tokens: Vec<i64>,
    outcomes: Vec<&'static str>,
    results: Vec<Option<&'a Value>>,
    errors: Vec<Option<&'a str>>,
    delays: Vec<f64>,
}

impl<'a> AckColumns<'a> {
    fn of(acks: impl IntoIterator<Item = &'a Ack>) -> AckColumns<'a> {
        let mut c = AckColumns {
            ids: Vec::new(),
            tokens: Vec::new(),
            outcomes: Vec::new(),
            results: Vec::new(),
            errors: Vec::new(),
            delays: Vec::new(),
        };
        for ack in acks {
            let (outcome, result, error, delay) = match &ack.settlement {
                Settlement::Completed(v) => ("completed", Some(v), None, 0.0),
                Settlement::Failed(e) => ("failed", None, Some(e.as_str()), 0.0),
                Settlement::Retry { error, delay } => {
                    ("retry", None, error.as_deref(), delay.as_secs_f64())
                }
            };
            c.ids.push(ack.id);
            c.tokens.push(ack.lease_token);
            c.outcomes.push(outcome);
            c.results.push(result);
            c.errors.push(error);
            c.delays.push(delay);
        }
        c
    }
}

/// What a worker sets for its whole session on a direct connection, in the round trip it makes
/// anyway. Behind a transaction-mode pooler none of it would last beyond one transaction: there
/// the role's settings stand in for the first two (docs/pooler.md), and no boot lock is held
/// (`FORKQ_HOST_RELEASE` is off).
fn session_settings(config: &Config, owner: &str, budget: Duration) -> String {
    // Delivery is at least once anyway: an ack or claim lost in a database crash only makes its
    // job run again, exactly as a worker crash before the ack would (and the worker gives back
    // what it finds under its name when it reconnects). Not waiting for the WAL flush at every
    // round trip is what lets a child keep up with short jobs. FORKQ_DURABLE=1 keeps every
    // acknowledgement durable before the next job.
    let commit = if config.durable { "on" } else { "off" };
    // A worker of a daemon boot holds the boot's session lock for as long as it is connected: no
    // other host brings back the jobs of a boot that still has a session (see queue::hosts).
    let boot_lock = match crate::host::boot_of_owner(owner) {
        Some(boot) if config.host_release => {
            format!("; {}", hosts::hold_lock_statement(&config.schema, boot))
        }
        _ => String::new(),
    };
    format!(
        "SET statement_timeout = {}; SET synchronous_commit = {commit}{boot_lock}",
        budget.as_millis()
    )
}

impl Consumer {
    /// Connects and checks the schema version. `owner` names this consumer's leases (host,
    /// supervisor boot, slot and generation).
    pub fn connect(config: &Config, owner: &str) -> Result<Consumer, QueueError> {
        // A worker cannot heartbeat while it waits on the database, so every wait on it is
        // bounded (see WorkerTimeouts) and announced in its slot: a slow or partitioned database
        // makes the child reconnect (heartbeating meanwhile), never look wedged.
        let budget = super::WorkerTimeouts::new(config.health_stale).budget;
        let mut client = connect_with_timeout(&config.database_url, "forkq worker", budget)?;
        let pooled = config.pooler == Pooler::Transaction;
        if !pooled {
            client.batch_execute(&session_settings(config, owner, budget))?;
        }
        migrations::require_current(&mut client, &config.schema)?;
        Ok(Consumer {
            client: Connection { client, pooled },
            schema: config.schema.clone(),
            owner: owner.to_string(),
            queues: config.queues.clone(),
            lease_seconds: config.lease.as_secs_f64(),
            retain: !config.retention.is_zero(),
            statements: Statements::default(),
        })
    }

    /// The lease owner string.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The connection, for maintenance work.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client.client
    }

    /// Sends `acks` and claims up to `limit` jobs (`limit` 0 only settles). Plain completed jobs
    /// and the claim share one round trip (the lean round); the other acknowledgements (failures,
    /// retries, batch children) are settled first, in one more.
    pub fn settle_and_claim(&mut self, acks: &[Ack], limit: usize) -> Result<Round, QueueError> {
        let mut refused: Vec<i64> = Vec::new();
        if acks.iter().any(|a| !a.is_lean()) {
            let c = AckColumns::of(acks.iter().filter(|a| !a.is_lean()));
            let settle = prepared(
                &mut self.client,
                &mut self.statements.settle,
                &self.schema,
                sql::SETTLE,
            )?;
            refused = self
                .client
                .query_one(
                    &settle,
                    &[
                        &c.ids,
                        &c.tokens,
                        &c.outcomes,
                        &c.results,
                        &c.errors,
                        &c.delays,
                        &self.retain,
                    ],
                )?
                .get(0);
        }
        let mut round = self.round(acks.iter().filter(|a| a.is_lean()), limit)?;
        round.refused.extend(refused);
        Ok(round)
    }

    /// The lean round (see [`sql::round`]).
    fn round<'a>(
        &mut self,
        acks: impl IntoIterator<Item = &'a Ack>,
        limit: usize,
    ) -> Result<Round, QueueError> {
        let c = AckColumns::of(acks);
        let text = sql::round(self.queues.len());
        let round = prepared(
            &mut self.client,
            &mut self.statements.round,
            &self.schema,
            &text,
        )?;
        let token = fastrand::i64(..);
        let limit = limit as i32;
        let rows = self.client.query(
            &round,
            &[
                &c.ids,
                &c.tokens,
                &c.results,
                &self.retain,
                &self.owner,
                &token,
                &self.lease_seconds,
                &self.queues,
                &limit,
            ],
        )?;
        let mut out = Round::default();
        let mut order = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(id) = row.get::<_, Option<i64>>("id") else {
                out.refused = row
                    .get::<_, Option<Vec<i64>>>("refused")
                    .unwrap_or_default();
                out.changes = row.get("changes");
                out.promoted = row.get("promoted");
                continue;
            };
            let queue: String = row.get("queue");
            let position = self.queues.iter().position(|q| *q == queue);
            let priority: i16 = row.get("priority");
            let run_at: std::time::SystemTime = row.get("run_at");
            order.push((position, priority, run_at, id));
            out.claimed.push(Claimed {
                job: Job {
                    id,
                    queue,
                    task: row.get("task"),
                    payload: row.get("payload"),
                    attempt: row.get("attempt"),
                    max_attempts: row.get("max_attempts"),
                    batch_id: row.get("batch_id"),
                },
                lease_token: token,
                suspect: row.get::<_, i16>("expiries") > 0,
            });
        }
        // The statement returns rows in the order it updated them; jobs run in claim order.
        let mut ranked: Vec<(_, Claimed)> = order.into_iter().zip(out.claimed).collect();
        ranked.sort_by_key(|r| r.0);
        out.claimed = ranked.into_iter().map(|(_, c)| c).collect();
        Ok(out)
    }

    /// Renews the leases of `held` (id, token) and gives back anything else under this
    /// consumer's name; `running` (the job running now) is recorded as started. Returns the held
    /// jobs still leased to it.
    pub fn renew(
        &mut self,
        held: &[(i64, i64)],
        running: Option<i64>,
    ) -> Result<Vec<i64>, QueueError> {
        let ids: Vec<i64> = held.iter().map(|h| h.0).collect();
        let tokens: Vec<i64> = held.iter().map(|h| h.1).collect();
        let renew = prepared(
            &mut self.client,
            &mut self.statements.renew,
            &self.schema,
            sql::RENEW,
        )?;
        Ok(self
            .client
            .query(
                &renew,
                &[
                    &self.owner,
                    &ids,
                    &tokens,
                    &self.lease_seconds,
                    &self.retain,
                    &running.unwrap_or(0),
                ],
            )?
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
        let release = prepared(
            &mut self.client,
            &mut self.statements.release,
            &self.schema,
            sql::RELEASE,
        )?;
        Ok(self
            .client
            .query_one(&release, &[&owner, &in_flight, &error, &self.retain])?
            .get(0))
    }

    /// Reports that the suspect job `claimed` starts now, so a host death during this run
    /// charges it. False when its lease is no longer ours (the job must not run).
    pub fn mark_started(&mut self, claimed: &Claimed) -> Result<bool, QueueError> {
        let mark = prepared(
            &mut self.client,
            &mut self.statements.mark_started,
            &self.schema,
            sql::MARK_STARTED,
        )?;
        Ok(self
            .client
            .query_one(&mark, &[&claimed.job.id, &claimed.lease_token])?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false))
    }

    /// Ends cancelled, uncharged, the claimed-but-not-started jobs among `held` that must no
    /// longer run (cancelled, or children of a stopped batch); returns their ids.
    pub fn drop_cancelled(&mut self, held: &[&Claimed]) -> Result<Vec<i64>, QueueError> {
        let ids: Vec<i64> = held.iter().map(|c| c.job.id).collect();
        let tokens: Vec<i64> = held.iter().map(|c| c.lease_token).collect();
        let drop = prepared(
            &mut self.client,
            &mut self.statements.drop_cancelled,
            &self.schema,
            sql::DROP_CANCELLED,
        )?;
        Ok(self
            .client
            .query_one(&drop, &[&ids, &tokens, &self.retain])?
            .get(0))
    }
}
