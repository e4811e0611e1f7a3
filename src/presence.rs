//! The presence service: a thread of the probe that records this daemon in the hosts table every
//! `FORKQ_HOST_INTERVAL_SECONDS` and brings back the jobs of hosts that are provably gone
//! ([`crate::queue::hosts`]). It runs in the probe because the probe holds connections anyway;
//! the supervisor never connects.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backoff;
use crate::child;
use crate::config::{Config, Pooler};
use crate::futex;
use crate::host;
use crate::probe;
use crate::queue::{self, hosts, pooler, QueueError};
use crate::slots::SlotTable;

/// The longest the presence service sleeps without looking at the probe's stop flag.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// The gap after a daemon's first write, doubled at each write until it reaches the interval.
const FIRST_GAP: Duration = Duration::from_millis(250);

/// How long to wait after the `writes`-th write (counted from 1) since the daemon started: hosts
/// of a fleet that start together each count the hosts serving at their first write, when the
/// others may not have written yet, and split the claim turns by that count (see
/// `claim_gate::share`); quick rewrites correct the count within a second instead of one
/// interval, for a few writes per start.
fn gap_after(writes: u32, interval: Duration) -> Duration {
    FIRST_GAP
        .saturating_mul(1 << writes.saturating_sub(1).min(16))
        .min(interval)
}

/// Writes this daemon's row every interval until the process ends; reconnects with backoff when
/// the database goes away.
pub fn run(config: &Config, table: &SlotTable) -> ! {
    let mut service = Presence {
        config,
        table,
        last_total: None,
        release_refused: None,
        role_checked: false,
        writes: 0,
    };
    let mut failures = 0u32;
    loop {
        let error = match service.connect() {
            Ok(mut client) => {
                if failures > 0 {
                    log::info!("host presence: reconnected");
                }
                failures = 0;
                loop {
                    let said_stopping = match service.turn(&mut client) {
                        Ok(stopping) => stopping,
                        Err(e) => break e,
                    };
                    if child::stop_requested() {
                        // The supervisor stops the probe last, after every child, and marks the
                        // shutdown in the header before it begins; a turn that was already on its
                        // way then still said "running", so one more says "stopping".
                        if !said_stopping {
                            let _ = service.turn(&mut client);
                        }
                        std::process::exit(0);
                    }
                    service.wait();
                }
            }
            Err(e) => e,
        };
        failures += 1;
        if failures == 1 || failures % 10 == 0 {
            log::warn!("host presence: {error}; this host shows as gone until it writes again");
        }
        if child::stop_requested() {
            std::process::exit(0);
        }
        std::thread::sleep(backoff::exponential(
            Duration::from_millis(200),
            config.host_interval,
            failures,
        ));
    }
}

struct Presence<'a> {
    config: &'a Config,
    table: &'a SlotTable,
    /// Jobs finished at the previous write, and when, for the rate.
    last_total: Option<(u64, Instant)>,
    /// Why this host does not bring back other hosts' jobs, once known (logged once).
    release_refused: Option<String>,
    /// Writes since the daemon started (see [`gap_after`]).
    writes: u32,
    /// Whether the role's settings were checked (behind a transaction-mode pooler; once).
    role_checked: bool,
}

impl Presence<'_> {
    fn boot(&self) -> String {
        host::boot_id(self.table.header.boot.load(Ordering::Acquire))
    }

    /// Opens the service's own connection and, with `FORKQ_HOST_RELEASE=1`, takes the boot's
    /// session lock on it, so a host whose probe is connected is never taken for gone.
    fn connect(&mut self) -> Result<postgres::Client, QueueError> {
        let mut client = queue::connect(&self.config.database_url, "forkq presence")?;
        if self.config.host_release {
            client.batch_execute(&hosts::hold_lock_statement(
                &self.config.schema,
                &self.boot(),
            ))?;
            if self.release_refused.is_none() {
                self.release_refused = self.refusal(&mut client)?;
                if let Some(why) = &self.release_refused {
                    log::warn!("host presence: not bringing back gone hosts' jobs early: {why}");
                }
            }
        }
        if self.config.pooler == Pooler::Transaction && !self.role_checked {
            self.check_role(&mut client)?;
        }
        Ok(client)
    }

    /// Behind a transaction-mode pooler the workers set nothing per session, so the role's
    /// settings stand in (see [`queue::pooler`]): says once per daemon what they lack.
    fn check_role(&mut self, client: &mut postgres::Client) -> Result<(), QueueError> {
        let settings = pooler::role_settings(client)?;
        for (severity, finding) in pooler::findings(self.config, &settings) {
            match severity {
                pooler::Severity::Advice => log::warn!("behind the pooler: {finding}"),
                pooler::Severity::Broken => log::error!("behind the pooler: {finding}"),
            }
        }
        self.role_checked = true;
        Ok(())
    }

    /// Why bringing back gone hosts' jobs early would not be safe here, if it would not: the
    /// server closes the sessions of vanished clients sooner than one lease, so a partitioned
    /// host could lose its leases before they expire.
    fn refusal(&self, client: &mut postgres::Client) -> Result<Option<String>, QueueError> {
        Ok(hosts::dead_client_timeout(client)?
            .filter(|t| *t < self.config.lease)
            .map(|t| {
                format!(
                    "the server drops vanished clients after {:.0} s (tcp_keepalives_*, \
                     tcp_user_timeout), less than FORKQ_LEASE_SECONDS={}; raise those settings \
                     or set FORKQ_HOST_RELEASE=0",
                    t.as_secs_f64(),
                    self.config.lease.as_secs()
                )
            }))
    }

    /// Sleeps one interval (less after the first writes: [`gap_after`]), cut short when a
    /// shutdown begins (the row then says "stopping" at once) or the probe is told to stop
    /// (SIGTERM, the last step of a shutdown): the supervisor wakes it on both (`presence_wake`).
    /// Each sleep lasts at most [`STOP_CHECK`]: the SIGTERM may reach the probe's handler only
    /// after the wake, and this thread would then sleep through it.
    fn wait(&self) {
        let until = Instant::now() + gap_after(self.writes, self.config.host_interval);
        let header = &self.table.header;
        let stopping = || header.shutting_down.load(Ordering::Acquire);
        let was_stopping = stopping();
        loop {
            // Read before the checks, so a wake between them and the wait is not lost.
            let seen = header.presence_wake.load(Ordering::Acquire);
            let now = Instant::now();
            if now >= until || stopping() != was_stopping || child::stop_requested() {
                return;
            }
            futex::wait(&header.presence_wake, seen, (until - now).min(STOP_CHECK));
        }
    }

    /// One write, then (where allowed) one pass over the gone hosts. Says whether the row written
    /// said "stopping".
    fn turn(&mut self, client: &mut postgres::Client) -> Result<bool, QueueError> {
        let report = self.report();
        let serving = hosts::record(client, &self.config.schema, &report)?;
        self.writes = self.writes.saturating_add(1);
        self.table.header.hosts_serving.store(
            serving.clamp(1, i64::from(u32::MAX)) as u32,
            Ordering::Release,
        );
        if !self.config.host_release || self.release_refused.is_some() || report.stopping {
            return Ok(report.stopping);
        }
        let gone_after = self.config.host_interval * hosts::GONE_AFTER_INTERVALS;
        for e in hosts::expire_gone(
            client,
            &self.config.schema,
            gone_after,
            !self.config.retention.is_zero(),
        )? {
            log::warn!(
                "host {} (boot {}) is gone: no session of it is left and it has not written for \
                 {:.0} s; {} job(s) it held are back in the queue",
                e.host,
                e.boot,
                gone_after.as_secs_f64(),
                e.jobs
            );
        }
        Ok(false)
    }

    fn report(&mut self) -> hosts::HostReport {
        let (_, live) = probe::liveness(self.table, self.config);
        let slots = self.table.active();
        let sum = |f: &dyn Fn(&crate::slots::Slot) -> u64| slots.iter().map(f).sum::<u64>();
        let succeeded = sum(&|s| s.succeeded.load(Ordering::Relaxed));
        let failed = sum(&|s| s.failed.load(Ordering::Relaxed));
        let finished = succeeded + failed + sum(&|s| s.retried.load(Ordering::Relaxed));
        let now = Instant::now();
        let jobs_per_second = match self.last_total {
            Some((before, at)) => {
                finished.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64()
            }
            None => 0.0,
        };
        self.last_total = Some((finished, now));
        let boot = self.table.header.boot.load(Ordering::Acquire);
        let host = host::hostname();
        let ints = |v: &serde_json::Value| -> Vec<i32> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_i64())
                        .map(|x| x as i32)
                        .collect()
                })
                .unwrap_or_default()
        };
        hosts::HostReport {
            boot: host::boot_id(boot),
            lease_prefix: host::lease_prefix(&host, boot),
            host,
            pid: nix::unistd::getppid().as_raw(),
            version: env!("CARGO_PKG_VERSION").into(),
            workload: hosts::Workload {
                queues: self.config.queues.clone(),
                concurrency: slots.len() as i32,
                alive: live["alive_children"].as_i64().unwrap_or(0) as i32,
                busy: slots
                    .iter()
                    .filter(|s| s.state() == crate::slots::SlotState::Running)
                    .count() as i32,
                crash_looping: ints(&live["crash_looping"]),
                slots: live["slots"].clone(),
                succeeded: succeeded as i64,
                failed: failed as i64,
                jobs_per_second,
            },
            interval: self.config.host_interval,
            holds_lock: self.config.host_release,
            stopping: self.table.header.shutting_down.load(Ordering::Acquire),
            started_unix: self.table.header.started_unix_ms.load(Ordering::Acquire) as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_writes_come_quickly_then_one_per_interval() {
        let interval = Duration::from_secs(5);
        let gaps: Vec<u128> = (1..=6)
            .map(|w| gap_after(w, interval).as_millis())
            .collect();
        assert_eq!(gaps, [250, 500, 1000, 2000, 4000, 5000]);
        assert_eq!(gap_after(u32::MAX, interval), interval);
        assert_eq!(
            gap_after(1, Duration::from_secs(1)).as_millis(),
            250,
            "never longer than the interval"
        );
        assert_eq!(gap_after(3, Duration::from_secs(1)).as_millis(), 1000);
    }
}
