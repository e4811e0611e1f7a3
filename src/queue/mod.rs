//! The queue: schema, claim/settle SQL, producers, admin queries and maintenance.
//!
//! Everything that talks to PostgreSQL lives under this module; the SQL text itself lives in
//! [`sql`] and the migrations.

pub mod admin;
pub mod batch;
pub mod browse;
pub mod consumer;
pub mod hosts;
pub mod listener;
pub mod maintenance;
pub mod migrations;
pub mod overview;
pub mod producer;
pub mod queues;
pub mod sql;
pub mod waiting;

use std::fmt;
use std::time::Duration;

use postgres::{Client, NoTls};

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
/// Retrying on a fresh connection is the cure for all.
fn is_transient_server_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "57014")
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
    Ok(config.connect(NoTls)?)
}
