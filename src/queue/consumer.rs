//! The queue as one consumer child sees it: claim, settle, renew, release.
//!
//! A worker serves its queues in strict order. Queues without limits are claimed together by the
//! lean round, a batch per round trip; a limited queue (a cap or a rate limit, see
//! docs/flow-control.md) is claimed one job at a time through its own statement, at its place in
//! the order. The worker learns which of its queues are paused or limited from the `queues` table
//! when it connects and whenever the queue's count of changes moves (see [`Round::changes`]); the
//! database enforces both whatever the worker knows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, Row, Statement};
use serde_json::Value;

use super::sql::{self, claim_column, render};
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
    /// Whether a limited claim took it (it counts against its queue's caps).
    pub limited: bool,
    /// The job's own timeout, overriding `FORKQ_JOB_TIMEOUT_SECONDS`.
    pub timeout: Option<Duration>,
    /// The job's own retry backoff base, overriding `FORKQ_RETRY_BACKOFF_BASE_SECONDS`.
    pub backoff: Option<Duration>,
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
    /// Back to the queue after this delay, its attempt not charged (the handler snoozed).
    Snooze(Duration),
    /// Retire as cancelled (its cancel was requested while it ran), with this error.
    Cancelled(String),
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

    fn is_snooze(&self) -> bool {
        matches!(self.settlement, Settlement::Snooze(_))
    }
}

/// What a settle-and-claim round trip returned.
#[derive(Debug, Default)]
pub struct Round {
    /// Jobs claimed, in the order to run them.
    pub claimed: Vec<Claimed>,
    /// Acknowledgements refused because the lease was no longer ours.
    pub refused: Vec<i64>,
    /// The count of changes a worker must notice (cancels, stopped batches, queue settings) as of
    /// this round; when it moves, the worker re-reads its queues' settings
    /// ([`Consumer::refresh_flow`]) and checks its prefetched jobs ([`Consumer::drop_cancelled`]).
    pub changes: i64,
    /// Due scheduled and retryable jobs this round made claimable (for the next round).
    pub promoted: i64,
    /// Due scheduled or retryable jobs wait to be made claimable: the consumer's next round
    /// that claims makes them so (this one only looked; see [`sql::round`]).
    pub due: bool,
    /// When a rate-limited queue allows its next start, if one refused this round's claim.
    pub retry_in: Option<Duration>,
    /// The round's lean queues claimed nothing because every claim turn of the schema was taken
    /// (`FORKQ_CLAIMERS` rounds were picking at once, across the hosts): jobs may well be
    /// waiting, so try again shortly rather than going idle. (A limited queue's claim takes no
    /// turn: the round may have claimed from one all the same.)
    pub no_turn: bool,
}

/// Which of a worker's queues are paused or limited, as the `queues` table said at the last look.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Flow {
    /// Paused queues: not claimed.
    pub paused: HashSet<String>,
    /// Limited queues (a cap or a rate limit): claimed one job at a time, by a limited claim.
    pub limited: HashSet<String>,
    /// The count of changes as of this read (see [`Round::changes`]).
    pub changes: i64,
}

/// One step of a worker's claim, in the order of its queues.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// A run of queues without limits, claimed together by the lean round.
    Lean(Vec<String>),
    /// A limited queue, claimed one job at a time.
    Limited(String),
}

/// The steps that claim from `queues` in order: paused queues are left out (the database skips
/// them anyway), consecutive unlimited queues share a lean round, and each limited queue is a
/// step of its own. The first step is always a lean one (possibly of no queue), so the
/// acknowledgements and the count of changes travel with the first round trip.
fn plan(queues: &[String], flow: &Flow) -> Vec<Step> {
    let mut steps = vec![Step::Lean(Vec::new())];
    for queue in queues.iter().filter(|q| !flow.paused.contains(*q)) {
        match steps.last_mut() {
            _ if flow.limited.contains(queue) => steps.push(Step::Limited(queue.clone())),
            Some(Step::Lean(run)) => run.push(queue.clone()),
            _ => steps.push(Step::Lean(vec![queue.clone()])),
        }
    }
    steps
}

/// A consumer's connection; its statements are prepared on first use.
pub struct Consumer {
    client: Connection,
    schema: String,
    owner: String,
    queues: Vec<String>,
    lease_seconds: f64,
    retain: bool,
    flow: Flow,
    steps: Vec<Step>,
    /// The database-wide claim gate: how many rounds may pick at once (0: no gate; see
    /// [`Consumer::set_claim_turns`]), and its lock key.
    claimers: i32,
    claim_gate_key: i32,
    /// The most jobs one round claims (`FORKQ_PREFETCH`), written into the round (see
    /// [`sql::round`]).
    claim_cap: usize,
    /// The last round said jobs are due: the next one that claims promotes them.
    promote_next: bool,
    /// The last first-step round claimed all it asked for: the next is sent in the direct form
    /// (see [`sql::RoundForm::direct`]).
    claimed_in_full: bool,
    statements: Statements,
    names: Names,
}

/// The queue and task names of the jobs a consumer claims, each allocated once and shared by
/// every job that bears it, instead of twice per job.
#[derive(Default)]
struct Names(Vec<Arc<str>>);

/// The most names [`Names`] keeps: past it, it starts again empty (a worker serves a few
/// queues and tasks; a search through many would cost more than the allocation it saves).
const MAX_NAMES: usize = 16;

impl Names {
    /// The shared copy of `name`.
    fn shared(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.iter().find(|known| ***known == *name) {
            return Arc::clone(known);
        }
        if self.0.len() == MAX_NAMES {
            self.0.clear();
        }
        let name: Arc<str> = Arc::from(name);
        self.0.push(Arc::clone(&name));
        name
    }
}

/// The statements of one connection, by what they do.
#[derive(Default)]
struct Statements {
    /// The lean rounds, by step and form, once used (see [`sql::round`]).
    rounds: HashMap<(usize, sql::RoundForm), Prepared>,
    claim_limited: Option<Prepared>,
    snooze: Option<Prepared>,
    report_progress: Option<Prepared>,
    queue_flow: Option<Prepared>,
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
    /// How long a statement that gave up waiting for a row lock is sent again (see [`retried`]):
    /// half a statement's budget, so a job held by a slow command is settled late rather than
    /// refused, and the call still ends well within the time the child announced for it.
    lock_retry_for: Duration,
    /// An explicit transaction is open (see [`Consumer::claim_in_turn`]).
    in_transaction: bool,
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
    let statement = ready(client, render(text, schema), None)?;
    *slot = Some(statement.clone());
    Ok(statement)
}

/// Makes the rendered `text` ready to send on `client` (see [`prepared`]). `types`: its
/// parameters' types, given rather than learned, so a statement may leave some unread.
fn ready(
    client: &mut Connection,
    text: String,
    types: Option<&[Type]>,
) -> Result<Prepared, QueueError> {
    Ok(match (client.pooled, types) {
        (true, Some(types)) => Prepared::Unnamed(Arc::new((text, types.to_vec()))),
        (true, None) => {
            let types = parameter_types(&mut client.client, &text)?;
            Prepared::Unnamed(Arc::new((text, types)))
        }
        (false, Some(types)) => Prepared::Named(client.client.prepare_typed(&text, types)?),
        (false, None) => Prepared::Named(client.client.prepare(&text)?),
    })
}

/// The lean round's parameters (see [`sql::round`]), `$1` to `$11`.
const ROUND_PARAMETERS: [Type; 11] = [
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::JSONB_ARRAY,
    Type::BOOL,
    Type::TEXT,
    Type::INT8,
    Type::FLOAT8,
    Type::TEXT_ARRAY,
    Type::INT4,
    Type::INT4,
    Type::INT4,
];

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
        let client = &mut self.client;
        let mut send = || match statement {
            Prepared::Named(named) => client.query(named, params),
            Prepared::Unnamed(unnamed) => {
                let (text, types) = &**unnamed;
                client.query_typed(text, &typed(text, types, params))
            }
        };
        // Inside a transaction an aborted statement aborted the transaction: sending it again
        // could only fail; the transaction's owner rolls back instead.
        match self.in_transaction {
            true => send(),
            false => retried(self.lock_retry_for, send),
        }
    }

    /// Sends `statement` (which returns at most one row) with `params`; the row, if any.
    fn query_opt(
        &mut self,
        statement: &Prepared,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        Ok(self.query(statement, params)?.into_iter().next())
    }

    /// Sends `statement` (which always returns one row: a call or an aggregate) with `params`;
    /// the row.
    fn query_one(
        &mut self,
        statement: &Prepared,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, QueueError> {
        self.query_opt(statement, params)?.ok_or_else(|| {
            QueueError::Unavailable(
                "a queue statement that always answers one row answered none: is the schema's \
                 migration intact? (run `forkq migrate`)"
                    .to_string(),
            )
        })
    }
}

/// How many times a consumer statement PostgreSQL aborted to break a deadlock is sent again.
const DEADLOCK_RETRIES: u32 = 3;

/// Sends a consumer statement again when PostgreSQL aborted it to break a deadlock (40P01), or
/// when it gave up waiting for a lock (55P03; for up to `lock_retry_for`). Safe because each is
/// one statement in its own implicit transaction: the abort undid all of it (acks fenced by
/// lease token, claims, renewals), and sending it again does the same work once. Why they can deadlock at all: see
/// the lean round in `sql.rs` (a `SKIP LOCKED` walk may still lock, or wait for, rows another
/// round is changing). The detector needs `deadlock_timeout` (1 s by default) to break one, and
/// a round gives up after `sql::ROUND_LOCK_WAIT`, so neither is a busy loop.
fn retried<T>(
    lock_retry_for: Duration,
    mut send: impl FnMut() -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    let mut deadlocks = 0;
    let began = Instant::now();
    loop {
        match send() {
            Err(e)
                if deadlocks < DEADLOCK_RETRIES
                    && e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                deadlocks += 1;
                log::warn!(
                    "a queue statement was chosen to break a deadlock; sending it again: {e}"
                );
            }
            Err(e)
                if began.elapsed() < lock_retry_for
                    && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) =>
            {
                log::debug!("a queue statement gave up waiting for a row lock; sending it again");
            }
            sent => return sent,
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
        let acks = acks.into_iter();
        let n = acks.size_hint().0;
        let mut c = AckColumns {
            ids: Vec::with_capacity(n),
            tokens: Vec::with_capacity(n),
            outcomes: Vec::with_capacity(n),
            results: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            delays: Vec::with_capacity(n),
        };
        for ack in acks {
            let (outcome, result, error, delay) = match &ack.settlement {
                Settlement::Completed(v) => ("completed", Some(v), None, 0.0),
                Settlement::Failed(e) => ("failed", None, Some(e.as_str()), 0.0),
                Settlement::Retry { error, delay } => {
                    ("retry", None, error.as_deref(), delay.as_secs_f64())
                }
                Settlement::Snooze(delay) => ("snooze", None, None, delay.as_secs_f64()),
                Settlement::Cancelled(e) => ("cancelled", None, Some(e.as_str()), 0.0),
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
    // A worker's statements each touch a few pages; a few are costed high (a purge that may have
    // a whole archive behind its limit) and would be compiled by JIT for 10-15 ms, hundreds of
    // times what running them takes (0.03 ms for a purge with nothing expired).
    format!(
        "SET statement_timeout = {}; SET synchronous_commit = {commit}; SET jit = off{boot_lock}",
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
        let mut consumer = Consumer {
            client: Connection {
                client,
                pooled,
                lock_retry_for: budget / 2,
                in_transaction: false,
            },
            schema: config.schema.clone(),
            owner: owner.to_string(),
            queues: config.queues.clone(),
            lease_seconds: config.lease.as_secs_f64(),
            retain: !config.retention.is_zero(),
            flow: Flow::default(),
            steps: Vec::new(),
            claimers: config.claimers as i32,
            // The high half of the schema's key: advisory locks of two keys live apart from the
            // one-key locks forkq takes elsewhere.
            claim_gate_key: sql::claim_gate_key(&config.schema),
            claim_cap: config.prefetch,
            promote_next: false,
            claimed_in_full: false,
            statements: Statements::default(),
            names: Names::default(),
        };
        consumer.refresh_flow()?;
        Ok(consumer)
    }

    /// Reads which of this worker's queues are paused or limited and plans its claims
    /// accordingly; returns what it read.
    pub fn refresh_flow(&mut self) -> Result<Flow, QueueError> {
        let read = prepared(
            &mut self.client,
            &mut self.statements.queue_flow,
            &self.schema,
            sql::QUEUE_FLOW,
        )?;
        let mut flow = Flow::default();
        for row in self.client.query(&read, &[&self.queues])? {
            let name: String = row.get(0);
            flow.changes = row.get(3);
            if row.get(1) {
                flow.paused.insert(name.clone());
            }
            if row.get(2) {
                flow.limited.insert(name);
            }
        }
        let steps = plan(&self.queues, &flow);
        if steps != self.steps {
            if !self.steps.is_empty() {
                log::info!(
                    "worker {}: queue settings changed; paused: {:?}, limited: {:?}",
                    self.owner,
                    sorted(&flow.paused),
                    sorted(&flow.limited)
                );
            }
            self.statements.rounds.clear();
            self.steps = steps;
        }
        self.flow = flow.clone();
        Ok(flow)
    }

    /// What the last read of this worker's queue settings said.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// The lease owner string.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The connection, for maintenance work.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client.client
    }

    /// How many rounds of the schema may pick at once across every host (the gate's advisory
    /// locks; 0: no gate): `FORKQ_CLAIMERS` at first, then what the worker's host count makes
    /// of it (see `claim_gate::fleet`).
    pub fn set_claim_turns(&mut self, turns: usize) {
        self.claimers = i32::try_from(turns).unwrap_or(i32::MAX);
    }

    /// Sends `acks` and claims up to `limit` jobs (`limit` 0 only settles; never more than
    /// `FORKQ_PREFETCH`) from this worker's queues in order: the first step that claims anything
    /// ends the round. Plain completed jobs and the first step share one round trip (the lean
    /// round); the other acknowledgements (failures, retries, batch children, snoozes) are
    /// settled first, in one more each.
    pub fn settle_and_claim(&mut self, acks: &[Ack], limit: usize) -> Result<Round, QueueError> {
        self.settle_and_claim_through(acks, limit, false)
    }

    /// Claims up to `limit` jobs from this worker's queues without limits, after a round the
    /// claim gate refused: takes a turn freed meanwhile, or else waits in the database for one
    /// of them (chosen at random), and claims while holding it, in one transaction (see
    /// [`sql::turn_wait`]). So hosts whose shares of the turns add up to more than the fleet's
    /// (see `claim_gate::fleet`) queue for them and are served in turn, instead of all picking
    /// at once or sending refused rounds again and again. At least three round trips, taken only
    /// after a refused round. Limited queues are left to the next round (as a claim ahead
    /// leaves them), so the transaction holds no lock of theirs. A wait that runs out, or a
    /// round that fails inside the transaction, rolls it back and claims nothing (`no_turn`):
    /// the worker sends its next round outside, where an error that persists is reported.
    pub fn claim_in_turn(&mut self, limit: usize) -> Result<Round, QueueError> {
        let turns = self.claimers;
        if turns <= 0 {
            return self.settle_and_claim(&[], limit);
        }
        let wait = sql::turn_wait(self.claim_gate_key, turns, fastrand::i32(0..turns));
        self.client.in_transaction = true;
        let claimed = match self.client.client.batch_execute(&wait) {
            Ok(()) => {
                self.claimers = 0;
                let round = self.settle_and_claim_ahead(&[], limit);
                self.claimers = turns;
                round
            }
            Err(e) => Err(e.into()),
        };
        self.client.in_transaction = false;
        match claimed {
            Ok(round) => {
                // Only a committed claim is one: a commit that fails loses the jobs to lease
                // expiry, as a lost reply to a round does, and none of them runs here.
                self.client.client.batch_execute("COMMIT")?;
                Ok(round)
            }
            // The caller drops the connection, and the transaction with it.
            Err(e) if e.is_connection_lost() => Err(e),
            Err(e) => {
                log::debug!("a claim waiting for its turn claimed nothing: {e}");
                self.client.client.batch_execute("ROLLBACK")?;
                Ok(Round {
                    no_turn: true,
                    ..Round::default()
                })
            }
        }
    }

    /// [`Consumer::settle_and_claim`] for a claim ahead of time, while a job runs: it stops before
    /// the first limited queue, whose jobs are claimed only to start at once.
    pub fn settle_and_claim_ahead(
        &mut self,
        acks: &[Ack],
        limit: usize,
    ) -> Result<Round, QueueError> {
        self.settle_and_claim_through(acks, limit, true)
    }

    fn settle_and_claim_through(
        &mut self,
        acks: &[Ack],
        limit: usize,
        ahead: bool,
    ) -> Result<Round, QueueError> {
        let mut refused = self.snooze(acks.iter().filter(|a| a.is_snooze()))?;
        if acks.iter().any(|a| !a.is_lean() && !a.is_snooze()) {
            let c = AckColumns::of(acks.iter().filter(|a| !a.is_lean() && !a.is_snooze()));
            let settle = prepared(
                &mut self.client,
                &mut self.statements.settle,
                &self.schema,
                sql::SETTLE,
            )?;
            let settled: Vec<i64> = self
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
            refused.extend(settled);
        }
        let mut lean_acks = Some(acks.iter().filter(|a| a.is_lean()));
        let mut out = Round::default();
        for index in 0..self.steps.len() {
            if index > 0 && limit == 0 {
                break;
            }
            let claimed = match self.steps[index].clone() {
                Step::Lean(queues) => {
                    let acks: Vec<&Ack> = lean_acks.take().into_iter().flatten().collect();
                    // Only a round that claims promotes: `$9` bounds the promotion too.
                    let promotes = index == 0 && limit > 0 && self.promote_next;
                    let form = sql::RoundForm {
                        settle: match (acks.is_empty(), self.retain) {
                            (true, _) => sql::Settle::Nothing,
                            (false, true) => sql::Settle::Archiving,
                            (false, false) => sql::Settle::Deleting,
                        },
                        promotes,
                        // After a round that claimed all it asked for, when more jobs most
                        // likely wait; outside the transaction that queues for a turn; and only
                        // without a gate: with one, direct rounds cost the server more per job
                        // (8 x 2: 22.1-22.2 µs against 20.7; 2 x 8, whose rounds were never
                        // refused a turn: 18.5-19.2 against 17.9-18.3; scale cluster, 2
                        // alternations), for reasons not pinned down.
                        direct: index == 0
                            && !promotes
                            && self.claimed_in_full
                            && self.claimers == 0
                            && !queues.is_empty()
                            && !self.client.in_transaction,
                    };
                    let (mut round, summarized) = self.round(index, &queues, &acks, limit, form)?;
                    if !summarized {
                        // A direct round that claimed nothing said nothing and settled nothing:
                        // the same round again in the other form says it all (and claims
                        // whatever came meanwhile).
                        let form = sql::RoundForm {
                            direct: false,
                            ..form
                        };
                        round = self.round(index, &queues, &acks, limit, form)?.0;
                    }
                    if index == 0 {
                        self.claimed_in_full = limit > 0 && round.claimed.len() == limit;
                        out.refused = round.refused;
                        out.changes = round.changes;
                        out.due = round.due;
                        self.promote_next = round.due;
                    }
                    out.promoted += round.promoted;
                    out.no_turn |= round.no_turn;
                    round.claimed
                }
                Step::Limited(_) if ahead => break,
                Step::Limited(queue) => {
                    let (claimed, retry_in) = self.claim_limited(&queue)?;
                    out.retry_in = match (out.retry_in, retry_in) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    claimed.into_iter().collect()
                }
            };
            if !claimed.is_empty() {
                out.claimed = claimed;
                break;
            }
        }
        out.refused.extend(refused);
        Ok(out)
    }

    /// The lean round of step `index` over `queues`, in `form` (see [`sql::round`]); also says
    /// whether a row brought the round's summary (a direct round that claims nothing returns
    /// none).
    fn round(
        &mut self,
        index: usize,
        queues: &[String],
        acks: &[&Ack],
        limit: usize,
        form: sql::RoundForm,
    ) -> Result<(Round, bool), QueueError> {
        let c = AckColumns::of(acks.iter().copied());
        let round = match self.statements.rounds.get(&(index, form)) {
            Some(round) => round.clone(),
            // Built only when it is to be prepared: rendering the few kilobytes of text at every
            // round was a child's largest user-space cost in durable mode (4 % of its CPU, perf).
            None => {
                let text = render(
                    &sql::round(queues.len(), self.claim_cap, form),
                    &self.schema,
                );
                let round = ready(&mut self.client, text, Some(&ROUND_PARAMETERS))?;
                self.statements.rounds.insert((index, form), round.clone());
                round
            }
        };
        // Only the archiving form reads the results: the others are spared receiving them.
        let unread = Vec::new();
        let results = match form.settle {
            sql::Settle::Archiving => &c.results,
            sql::Settle::Deleting | sql::Settle::Nothing => &unread,
        };
        let token = fastrand::i64(..);
        let limit = limit as i32;
        // A step with no queue (a worker whose first queue is limited) picks nothing: no turn.
        let gate = match queues.is_empty() {
            true => 0,
            false => self.claimers,
        };
        let rows = self.client.query(
            &round,
            &[
                &c.ids,
                &c.tokens,
                results,
                &self.retain,
                &self.owner,
                &token,
                &self.lease_seconds,
                &queues,
                &limit,
                &gate,
                &self.claim_gate_key,
            ],
        )?;
        let mut out = Round::default();
        let mut summarized = false;
        let mut order = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(summary) = row.get::<_, Option<Vec<i64>>>(sql::ROUND_SUMMARY) {
                // See sql::SUMMARY.
                let [changes, promoted, due, taken, refused @ ..] = summary.as_slice() else {
                    return Err(QueueError::Unavailable(format!(
                        "a claim round returned the summary {summary:?}, where at least four \
                         values belong: a bug in forkq's round statement; please report it"
                    )));
                };
                out.changes = *changes;
                out.promoted = *promoted;
                out.due = *due != 0;
                out.no_turn = limit > 0 && *taken == 0;
                out.refused = refused.to_vec();
                summarized = true;
            }
            let Some(claimed) = self.claimed(&row, token, false) else {
                continue;
            };
            let position = queues.iter().position(|q| **q == *claimed.job.queue);
            let run_at: std::time::SystemTime = row.get(claim_column::RUN_AT);
            order.push((
                position,
                row.get::<_, i16>(claim_column::PRIORITY),
                run_at,
                claimed.job.id,
            ));
            out.claimed.push(claimed);
        }
        // The statement returns rows in the order it updated them; jobs run in claim order.
        let mut ranked: Vec<(_, Claimed)> = order.into_iter().zip(out.claimed).collect();
        ranked.sort_by_key(|r| r.0);
        out.claimed = ranked.into_iter().map(|(_, c)| c).collect();
        Ok((out, summarized))
    }

    /// Claims at most one job of the limited queue `queue`; also says when its rate limit allows
    /// the next start, if that is what refused it.
    fn claim_limited(
        &mut self,
        queue: &str,
    ) -> Result<(Option<Claimed>, Option<Duration>), QueueError> {
        let claim = prepared(
            &mut self.client,
            &mut self.statements.claim_limited,
            &self.schema,
            sql::CLAIM_LIMITED,
        )?;
        let token = fastrand::i64(..);
        let row = self
            .client
            .query_opt(&claim, &[&queue, &self.owner, &token, &self.lease_seconds])?;
        Ok(match row {
            None => (None, None),
            Some(row) => match self.claimed(&row, token, true) {
                Some(claimed) => (Some(claimed), None),
                None => (
                    None,
                    row.get::<_, Option<f64>>("retry_in")
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0))),
                ),
            },
        })
    }

    /// The job a claim's `row` describes (`None` for a row without a job).
    fn claimed(&mut self, row: &postgres::Row, token: i64, limited: bool) -> Option<Claimed> {
        let id = row.get::<_, Option<i64>>(claim_column::ID)?;
        let seconds = |column: usize| {
            row.get::<_, Option<f64>>(column)
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
        };
        Some(Claimed {
            job: Job {
                id,
                queue: self.names.shared(row.get(claim_column::QUEUE)),
                task: self.names.shared(row.get(claim_column::TASK)),
                payload: row.get(claim_column::PAYLOAD),
                attempt: row.get(claim_column::ATTEMPT),
                max_attempts: row.get(claim_column::MAX_ATTEMPTS),
                batch_id: row.get(claim_column::BATCH_ID),
            },
            lease_token: token,
            suspect: row.get::<_, i16>(claim_column::EXPIRIES) > 0,
            limited,
            timeout: seconds(claim_column::TIMEOUT_SECONDS),
            backoff: seconds(claim_column::BACKOFF_SECONDS),
        })
    }

    /// Sends snoozed jobs back to the queue, uncharged; returns the ids refused.
    fn snooze<'a>(&mut self, acks: impl Iterator<Item = &'a Ack>) -> Result<Vec<i64>, QueueError> {
        let c = AckColumns::of(acks);
        if c.ids.is_empty() {
            return Ok(Vec::new());
        }
        let snooze = prepared(
            &mut self.client,
            &mut self.statements.snooze,
            &self.schema,
            sql::SNOOZE,
        )?;
        Ok(self
            .client
            .query_one(&snooze, &[&c.ids, &c.tokens, &c.delays, &self.retain])?
            .get(0))
    }

    /// Records `progress` for the running job `id` (fenced by `token`); false when the lease is
    /// no longer ours.
    pub fn report_progress(
        &mut self,
        id: i64,
        token: i64,
        progress: &Value,
    ) -> Result<bool, QueueError> {
        let report = prepared(
            &mut self.client,
            &mut self.statements.report_progress,
            &self.schema,
            sql::REPORT_PROGRESS,
        )?;
        Ok(self
            .client
            .query_one(&report, &[&id, &token, progress])?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false))
    }

    /// Renews the leases of `held` (id, token) and gives back anything else under this
    /// consumer's name; `running` (the job running now) is recorded as started. Returns the held
    /// jobs still leased to it, each with whether its cancel was requested.
    pub fn renew(
        &mut self,
        held: &[(i64, i64)],
        running: Option<i64>,
    ) -> Result<Vec<(i64, bool)>, QueueError> {
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
            .map(|r| (r.get(0), r.get(1)))
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

/// A set's members in order, for a log line.
fn sorted(set: &HashSet<String>) -> Vec<&String> {
    let mut v: Vec<&String> = set.iter().collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn limited_queues_split_the_lean_round_in_queue_order() {
        let queues = names(&["a", "b", "c", "d", "e"]);
        let flow = Flow {
            paused: ["d".to_string()].into(),
            limited: ["b".to_string(), "c".to_string()].into(),
            changes: 0,
        };
        assert_eq!(
            plan(&queues, &flow),
            vec![
                Step::Lean(names(&["a"])),
                Step::Limited("b".into()),
                Step::Limited("c".into()),
                Step::Lean(names(&["e"])),
            ]
        );
        assert_eq!(
            plan(&queues, &Flow::default()),
            vec![Step::Lean(queues.clone())]
        );
        let first_limited = Flow {
            limited: ["a".to_string()].into(),
            ..Flow::default()
        };
        assert_eq!(
            plan(&names(&["a", "b"]), &first_limited),
            vec![
                Step::Lean(Vec::new()),
                Step::Limited("a".into()),
                Step::Lean(names(&["b"]))
            ]
        );
    }
}
