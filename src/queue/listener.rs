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
    /// (an empty payload concerns every queue), counting those already buffered. Zero on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Result<usize, QueueError> {
        let queues = &self.queues;
        let relevant = |payload: &str| payload.is_empty() || queues.iter().any(|q| q == payload);
        let mut notifications = self.client.notifications();
        let first = notifications.timeout_iter(timeout).next()?;
        let Some(first) = first else {
            return Ok(0);
        };
        let mut count = usize::from(relevant(first.payload()));
        while let Some(more) = notifications.iter().next()? {
            count += usize::from(relevant(more.payload()));
        }
        Ok(count)
    }
}
