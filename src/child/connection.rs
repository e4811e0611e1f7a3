//! The child's connection to the queue: opened on first use, re-opened with backoff whenever it
//! drops, and after a drop first used to renew what the child holds and give back the rest.
//!
//! Waiting for the database is being alive: the slot heartbeat goes on while the database is
//! unreachable, and each blocking call is announced in the slot with its bound, so a slow or
//! partitioned database never makes the child look wedged.

use std::time::{Duration, Instant};

use super::acks::Holdings;
use super::{immediate_stop_requested, stop_requested};
use crate::backoff;
use crate::config::Config;
use crate::logging::{self, Activity};
use crate::queue::consumer::Consumer;
use crate::queue::{QueueError, WorkerTimeouts};
use crate::slots::Slot;

/// A child's consumer connection, and whether the last one was lost.
pub(super) struct Connection<'a> {
    config: &'a Config,
    /// The child's slot: heartbeats while waiting, and the bound of each blocking call.
    slot: &'a Slot,
    /// The child's lease owner, which the connection claims under.
    owner: &'a str,
    consumer: Option<Consumer>,
    /// Set when the connection dropped; the next connection starts by giving back strays.
    lost: bool,
}

impl<'a> Connection<'a> {
    /// Not connected yet: the first [`Self::run`] connects.
    pub(super) fn new(config: &'a Config, slot: &'a Slot, owner: &'a str) -> Self {
        Connection {
            config,
            slot,
            owner,
            consumer: None,
            lost: false,
        }
    }

    /// Whether a connection is open now (it may still turn out lost on its next use).
    pub(super) fn is_open(&self) -> bool {
        self.consumer.is_some()
    }

    /// The open connection, if any, for work that must not wait for one to open (the
    /// maintenance pass); it calls [`Self::lose`] if it finds it lost.
    pub(super) fn open(&mut self) -> Option<&mut Consumer> {
        self.consumer.as_mut()
    }

    /// Drops a connection found lost: the next [`Self::run`] reconnects and gives back what it
    /// finds under this child's name.
    pub(super) fn lose(&mut self) {
        self.consumer = None;
        self.lost = true;
    }

    /// Runs `op` (one round trip, and up to `longer` besides) on the connection, opening or
    /// re-opening it with backoff while the database is unreachable (heartbeating meanwhile).
    /// Errors other than a lost connection are returned. Each blocking call is announced in the
    /// slot with its bound. `held` is what a re-opened connection renews first.
    pub(super) fn run<T>(
        &mut self,
        held: &mut Holdings,
        longer: Duration,
        mut op: impl FnMut(&mut Consumer) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let timeouts = WorkerTimeouts::new(self.config.health_stale);
        let mut failures = 0u32;
        loop {
            if self.consumer.is_none() {
                self.slot
                    .wait_on_database(timeouts.connect() + timeouts.text_statement());
                let connected = self.connect(held);
                self.slot.database_returned();
                match connected {
                    Ok(db) => {
                        if failures > 0 {
                            log::info!("worker {} reconnected to the database", self.owner);
                        }
                        self.consumer = Some(db);
                    }
                    Err(e) if e.is_connection_lost() => {
                        failures += 1;
                        self.pause(&e, failures, held)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let db = self.consumer.as_mut().expect("connected above");
            self.slot.wait_on_database(timeouts.round_trip() + longer);
            let done = op(db);
            self.slot.database_returned();
            match done {
                Ok(v) => return Ok(v),
                Err(e) if e.is_connection_lost() => {
                    self.lose();
                    failures += 1;
                    self.pause(&e, failures, held)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the connection. After a lost one, first renews what this worker holds and gives back
    /// everything else under its name: acknowledgements lost with an asynchronous commit when the
    /// database crashed, and claims whose reply was lost with the connection, would otherwise stay
    /// `running` until their lease expired.
    fn connect(&mut self, held: &mut Holdings) -> Result<Consumer, QueueError> {
        let mut db = Consumer::connect(self.config, self.owner)?;
        if self.lost {
            let renewed = db.renew(&held.leases(&|_| true), held.running_id())?;
            held.keep_renewed(&renewed, &|_| true, self.owner);
            held.renewing();
            self.lost = false;
        }
        Ok(db)
    }

    /// Waits before the next attempt, with exponential backoff and jitter, heartbeating. Gives
    /// up (`Unavailable`) on an immediate stop, or on a stop while no acknowledgement is owed:
    /// pending acks keep a stopping worker trying until its deadline.
    fn pause(&self, error: &QueueError, failures: u32, held: &Holdings) -> Result<(), QueueError> {
        let _waiting = logging::activity(Activity::WaitingForDatabase);
        let pause = backoff::with_jitter(
            backoff::exponential(Duration::from_millis(100), Duration::from_secs(5), failures),
            fastrand::f64(),
        );
        if failures == 1 || failures % 10 == 0 {
            log::warn!(
                "worker {}: database unavailable ({error}); retrying in {pause:.1?}",
                self.owner
            );
        }
        let deadline = Instant::now() + pause;
        while Instant::now() < deadline {
            if immediate_stop_requested() || (stop_requested() && !held.owes_acks()) {
                return Err(QueueError::Unavailable(
                    "told to stop while waiting for the database; the jobs this worker held run \
                     again once their lease expires"
                        .into(),
                ));
            }
            self.slot.beat();
            std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
        }
        Ok(())
    }
}
