//! The queue: schema, claim/settle SQL, producers, admin queries and maintenance.
//!
//! Everything that talks to PostgreSQL lives under this module; the SQL text itself lives in
//! [`sql`] and the migrations.

pub mod admin;
pub mod batch;
pub mod browse;
pub mod capacity;
pub mod consumer;
pub mod hosts;
pub mod listener;
pub mod maintenance;
pub mod migrations;
pub mod overview;
pub mod pooler;
pub mod producer;
pub mod queues;
pub mod schedules;
pub mod sql;
pub mod waiting;

use std::fmt;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{Client, GenericClient, NoTls};

/// Everything that can go wrong talking to the queue.
#[derive(Debug)]
pub enum QueueError {
    /// The database refused or the connection failed.
    Db(postgres::Error),
    /// A migration failed; nothing of it was applied.
    Migration {
        /// The migration that failed.
        version: i32,
        /// What PostgreSQL said.
        source: postgres::Error,
    },
    /// The schema is older than this binary.
    SchemaOutdated {
        /// The schema checked.
        schema: String,
        /// Its version.
        found: i32,
        /// The version this binary needs.
        expected: i32,
    },
    /// The schema was migrated by a newer forkq.
    SchemaTooNew {
        /// The schema checked.
        schema: String,
        /// Its version.
        found: i32,
        /// The version this binary knows.
        expected: i32,
    },
    /// A job was refused before it reached the database.
    InvalidJob(String),
    /// Other input was refused (a queue setting); nothing was changed.
    InvalidInput(String),
    /// The database could not be reached (a pool, or a worker that gave up waiting because it
    /// was told to stop); says what was tried.
    Unavailable(String),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Db(e) => match e.as_db_error() {
                Some(db) if looks_pooled(db.code().code()) => write!(
                    f,
                    "database error: {}; named prepared statements are being lost between \
                     transactions, as behind PgBouncer in transaction mode: set \
                     FORKQ_POOLER=transaction (see docs/pooler.md)",
                    db.message()
                ),
                Some(db) => write!(f, "database error: {}", db.message()),
                // The driver's own message is terse ("error connecting to server"); the
                // cause (refused, timed out, name unknown) is what the operator needs.
                None => match std::error::Error::source(e) {
                    Some(cause) => write!(f, "database error: {e}: {cause}"),
                    None => write!(f, "database error: {e}"),
                },
            },
            QueueError::Migration { version, source } => {
                write!(f, "migration {version} failed and was rolled back: {source}")
            }
            QueueError::SchemaOutdated { schema, found, expected } => write!(
                f,
                "schema {schema:?} is at version {found} but this forkq needs {expected}: run `forkq migrate` first"
            ),
            QueueError::SchemaTooNew { schema, found, expected } => write!(
                f,
                "schema {schema:?} is at version {found}, newer than this forkq knows ({expected}): upgrade forkq"
            ),
            QueueError::InvalidJob(why) => write!(f, "invalid job: {why}"),
            QueueError::InvalidInput(why) => write!(f, "{why}"),
            QueueError::Unavailable(why) => write!(f, "database unavailable: {why}"),
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Db(e) | QueueError::Migration { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for QueueError {
    fn from(e: postgres::Error) -> Self {
        QueueError::Db(e)
    }
}

impl QueueError {
    /// Whether the connection itself is gone (as opposed to a statement being refused), so the
    /// caller should reconnect.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            QueueError::Db(e) | QueueError::Migration { source: e, .. } => match e.as_db_error() {
                None => true,
                Some(db) => e.is_closed() || is_transient_server_state(db.code().code()),
            },
            _ => false,
        }
    }
}

/// SQLSTATEs that mean "the server is going away, not ready, or too slow", not "your statement is
/// wrong": connection exceptions (class 08), an administrator or crash shutdown, a server still
/// starting up, too many connections, and a statement cancelled by a worker's statement timeout.
/// Retrying on a fresh connection is the cure for all, on the worker's claim-and-ack path; the
/// maintenance pass never retries (a pass that timed out is given up until the next interval, see
/// `child::Worker::maybe_run_maintenance`).
fn is_transient_server_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "57014")
}

/// SQLSTATEs of a named prepared statement that exists where it should not (42P05) or is
/// missing where it should be (26000): what a session-bound client sees behind a pooler in
/// transaction mode.
fn looks_pooled(code: &str) -> bool {
    matches!(code, "42P05" | "26000")
}

/// How long a worker's database waits may last.
///
/// A child heartbeats from its single thread, so it cannot beat while a synchronous call blocks;
/// instead it announces in its slot the time by which the call must return
/// ([`crate::slots::Slot::wait_on_database`]), and only a child still blocked after that is
/// judged by the stale window. These bounds are what make the announced time true: every wait of
/// a worker's connection is cut by `statement_timeout` (the server), `connect_timeout`, and
/// `tcp_user_timeout` with keepalives (a server or network that vanished without a word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerTimeouts {
    /// The worker connection's `statement_timeout`, `connect_timeout`, `tcp_user_timeout` and
    /// keepalive idle time.
    pub budget: Duration,
}

impl WorkerTimeouts {
    /// A third of the stale window, at least 2 s: a slow database fails a statement (and the
    /// child retries, beating meanwhile) well before the supervisor would judge the child.
    pub fn new(health_stale: Duration) -> WorkerTimeouts {
        WorkerTimeouts {
            budget: (health_stale / 3).max(Duration::from_secs(2)),
        }
    }

    /// The longest one round trip blocks unless the server itself is frozen: a statement runs at
    /// most the budget (`statement_timeout`); a request the network does not deliver fails after
    /// the budget (`tcp_user_timeout`); a reply that never comes from a server gone silent is
    /// noticed at the first keepalive check after the connection has been quiet for the budget.
    /// One more [`KEEPALIVE_INTERVAL`] is slack for the transfer and scheduling.
    pub fn round_trip(&self) -> Duration {
        self.budget + KEEPALIVE_INTERVAL * 2
    }

    /// The longest opening a worker connection blocks: the socket connect (`connect_timeout`),
    /// then up to eight round trips (the start-up handshake with its authentication, the session
    /// settings, the schema check, the statements to prepare), each cut as any round trip is.
    pub fn connect(&self) -> Duration {
        self.budget + self.round_trip() * 8
    }

    /// The longest one statement sent as text blocks: the client prepares it, then runs it, in
    /// two round trips.
    pub fn text_statement(&self) -> Duration {
        self.round_trip() * 2
    }
}

/// Keepalive probes of an idle connection are this far apart, so that `tcp_user_timeout` is
/// checked this often once the first probe went out (the kernel's default is 75 s).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs one statement unnamed with declared parameter types, in one round trip and leaving
/// nothing on the server connection (so also behind a pooler in transaction mode); returns the
/// rows it changed.
pub fn execute_typed(
    client: &mut impl GenericClient,
    statement: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<u64, postgres::Error> {
    let mut rows =
        client.query_typed_raw(statement, params.iter().map(|(v, t)| (*v, t.clone())))?;
    while rows.next()?.is_some() {}
    Ok(rows.rows_affected().unwrap_or(0))
}

/// Opens one connection, shown as `application` in `pg_stat_activity`.
pub fn connect(url: &str, application: &str) -> Result<Client, QueueError> {
    connect_with_timeout(url, application, Duration::from_secs(10))
}

/// [`connect`] with a connect timeout (unless the URL sets one). TCP keepalives and a user
/// timeout of the same length make a connection to a vanished server fail within about that
/// time instead of hours.
pub fn connect_with_timeout(
    url: &str,
    application: &str,
    timeout: Duration,
) -> Result<Client, QueueError> {
    let mut config: postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name(application);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(timeout);
    }
    config.keepalives_idle(timeout);
    config.keepalives_interval(KEEPALIVE_INTERVAL);
    Ok(config.connect(NoTls)?)
}
