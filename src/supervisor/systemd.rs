//! Talking to systemd (`Type=notify`): readiness once every child is forked, stopping when a stop
//! begins, a STATUS= line, and the watchdog, petted only while the fleet is live. Every call is a
//! datagram on `NOTIFY_SOCKET` and does nothing when the daemon is not run by systemd.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::probe;

use super::Supervisor;

/// What the supervisor last told systemd, and how often it must pet the watchdog.
pub(super) struct Reporter {
    /// Half of `WATCHDOG_USEC`, so a late loop turn does not miss the watchdog's deadline.
    watchdog: Option<Duration>,
    last_watchdog: Instant,
    last_status: String,
}

impl Reporter {
    /// Reads the watchdog interval systemd set in the environment (none without a watchdog).
    pub(super) fn from_env(now: Instant) -> Reporter {
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|us| Duration::from_micros(us) / 2);
        Reporter {
            watchdog,
            last_watchdog: now,
            last_status: String::new(),
        }
    }
}

/// READY=1: start-up is over and every child is forked.
pub(super) fn notify_ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

/// STOPPING=1: the fleet is stopping (systemd shows the unit as deactivating).
pub(super) fn notify_stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

impl Supervisor<'_> {
    /// Pets the systemd watchdog while the fleet is healthy, and keeps STATUS= current.
    pub(super) fn report_to_systemd(&mut self) {
        let alive = self.plans.iter().filter(|p| p.pid.is_some()).count();
        let looping = self
            .table
            .active()
            .iter()
            .filter(|s| s.fast_crashes.load(Ordering::Acquire) >= self.config.crash_loop_threshold)
            .count();
        let status = format!(
            "{alive}/{} children alive, {looping} crash-looping",
            self.concurrency()
        );
        let reporter = &mut self.systemd;
        if status != reporter.last_status {
            let _ = sd_notify::notify(false, &[NotifyState::Status(&status)]);
            reporter.last_status = status;
        }
        if let Some(interval) = reporter.watchdog {
            // Same verdict as /livez: a wedged or crash-looping fleet stops petting the watchdog.
            if reporter.last_watchdog.elapsed() >= interval
                && probe::liveness(self.table, &self.config).0
            {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                reporter.last_watchdog = Instant::now();
            }
        }
    }
}
