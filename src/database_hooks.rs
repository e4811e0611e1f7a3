//! The database work the supervisor needs, handed to it by [`crate::run`] as
//! [`DatabaseHooks`], so the supervisor module itself knows nothing of SQL. Each function runs
//! only in a short-lived process the supervisor forks for it, never in the supervisor, which
//! stays free of connections: its own exit code is the function's return value.

use std::time::Instant;

use crate::child::Predecessor;
use crate::config::{Config, EX_CONFIG};
use crate::queue;
use crate::queue::consumer::Consumer;
use crate::supervisor::DatabaseHooks;

/// The hooks of a fleet whose children consume the queue of `forkq::queue`.
pub(crate) const HOOKS: DatabaseHooks = DatabaseHooks { preflight, release };

/// The start-up check: the database is reachable, the schema current, and enough connections are
/// free for the fleet. Returns 78 (`EX_CONFIG`) after logging what is wrong and what to do.
fn preflight(config: &Config) -> i32 {
    let probe = config.probe_connections();
    let needed = (config.concurrency + probe) as i64;
    match check_database(config) {
        Ok(Some(room)) if room.free < needed => {
            log::error!(
                "FORKQ_CONCURRENCY={} needs {needed} connections to PostgreSQL (one per child, \
                 {probe} for the probe) but only {} are free ({}): lower FORKQ_CONCURRENCY, or \
                 make room on the server (raise max_connections, stop other clients)",
                config.concurrency,
                room.free.max(0),
                room.bound_by
            );
            EX_CONFIG
        }
        Ok(room) => {
            if room.is_none() {
                log::info!(
                    "the database URL leads to a connection pooler, not straight to PostgreSQL: \
                     the fleet's {needed} connections are not checked against the server's"
                );
            }
            0
        }
        Err(e) if e.is_connection_lost() => {
            log::error!("cannot reach the database at start-up ({e}); check DATABASE_URL and that PostgreSQL is running");
            EX_CONFIG
        }
        Err(e) => {
            log::error!("{e}");
            EX_CONFIG
        }
    }
}

/// Connects, checks the schema, and measures the connection headroom (`None` behind a pooler).
fn check_database(config: &Config) -> Result<Option<queue::capacity::Headroom>, queue::QueueError> {
    let started = Instant::now();
    let mut client = queue::connect(&config.database_url, "forkq preflight")?;
    let connected_in = started.elapsed();
    queue::migrations::require_current(&mut client, &config.schema)?;
    queue::capacity::headroom(&config.database_url, connected_in, &mut client)
}

/// After a forced stop: gives back the jobs of every past occupant in `unclean`; the job each was
/// running is charged an attempt, with how its worker ended as the error. Returns 1 when the
/// database cannot be reached (the jobs then return when their leases expire).
fn release(config: &Config, unclean: &[Predecessor]) -> i32 {
    let mut consumer = match Consumer::connect(config, "forkq shutdown") {
        Ok(c) => c,
        Err(e) => {
            log::warn!("cannot release the jobs of killed children ({e}); they return when their lease expires");
            return 1;
        }
    };
    for p in unclean {
        match consumer.release(&p.owner, p.in_flight, Some(&p.how_it_ended)) {
            Ok(n) => log::info!("released {n} job(s) of {} ({})", p.owner, p.how_it_ended),
            Err(e) => log::warn!("cannot release the jobs of {}: {e}", p.owner),
        }
    }
    0
}
