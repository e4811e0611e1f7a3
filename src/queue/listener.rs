//! A connection that LISTENs for enqueue notifications, for the process that wakes idle children.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::sql;
use super::{connect, QueueError};
use crate::config::Config;

/// Subscribed to the schema's channel.
pub struct Listener {
    client: Client,
    queues: Vec<String>,
}

impl Listener {
    /// Connects (through `FORKQ_LISTEN_DATABASE_URL` when set: LISTEN needs a session, which a
    /// pooler in transaction mode does not keep) and subscribes.
    pub fn connect(config: &Config) -> Result<Listener, QueueError> {
        let mut client = connect(&config.listen_database_url, "forkq listener")?;
        client.batch_execute(&format!("LISTEN \"{}\"", sql::channel(&config.schema)))?;
        Ok(Listener {
            client,
            queues: config.queues.clone(),
        })
    }

    /// Waits up to `timeout` for notifications; returns how many concern this daemon's queues
    /// (an empty payload concerns every queue), counting those already buffered, and the jobs
    /// whose cancel they announce (payload `cancel ID`, which no queue name can be: those have
    /// no spaces). Nothing on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Result<Heard, QueueError> {
        let queues = &self.queues;
        let mut heard = Heard::default();
        let mut note = |payload: &str| match payload.strip_prefix("cancel ") {
            Some(id) => heard.cancels.extend(id.parse::<i64>().ok()),
            None if payload.is_empty() || queues.iter().any(|q| q == payload) => heard.wakeups += 1,
            None => {}
        };
        let mut notifications = self.client.notifications();
        let first = notifications.timeout_iter(timeout).next()?;
        let Some(first) = first else {
            return Ok(heard);
        };
        note(first.payload());
        while let Some(more) = notifications.iter().next()? {
            note(more.payload());
        }
        Ok(heard)
    }
}

/// What one wait of the [`Listener`] heard.
#[derive(Debug, Default, PartialEq)]
pub struct Heard {
    /// Notifications of work for this daemon's queues: one idle child to wake for each.
    pub wakeups: usize,
    /// Jobs whose cancel was requested.
    pub cancels: Vec<i64>,
}
