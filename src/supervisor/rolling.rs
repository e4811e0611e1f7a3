//! Changing the fleet while it runs: SIGHUP replaces every child one at a time (a rolling
//! restart), SIGTTIN and SIGTTOU add or retire one slot.

use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::MAX_CONCURRENCY;

use super::fleet::SlotPlan;
use super::Supervisor;

/// A rolling restart (SIGHUP): one slot at a time.
pub(super) struct RollingRestart {
    next: usize,
    waiting_for: Option<usize>,
}

impl Supervisor<'_> {
    /// SIGHUP: starts a rolling restart from the first slot (a restart already under way starts
    /// over).
    pub(super) fn begin_rolling_restart(&mut self) {
        log::info!("SIGHUP: rolling restart of {} children", self.concurrency());
        self.rolling = Some(RollingRestart {
            next: 0,
            waiting_for: None,
        });
    }

    /// SIGHUP: replaces the children one at a time, waiting for each replacement to heartbeat
    /// before stopping the next, so the fleet never drops more than one child.
    pub(super) fn advance_rolling_restart(&mut self) {
        let concurrency = self.concurrency();
        let Some(rolling) = self.rolling.as_mut() else {
            return;
        };
        if let Some(index) = rolling.waiting_for {
            let slot = &self.table.slots[index];
            let replaced = self.plans[index].pid.is_some()
                && !self.plans[index].exit_expected
                && slot.heartbeat_ms.load(Ordering::Acquire)
                    > slot.forked_at_ms.load(Ordering::Acquire);
            if !replaced {
                return;
            }
            rolling.waiting_for = None;
        }
        if rolling.next >= concurrency {
            log::info!("rolling restart done");
            self.rolling = None;
            return;
        }
        let index = rolling.next;
        rolling.next += 1;
        let plan = &mut self.plans[index];
        // A slot without an occupant (backing off) gets a fresh child anyway: nothing to wait for.
        if let Some(pid) = plan.pid {
            plan.exit_expected = true;
            rolling.waiting_for = Some(index);
            log::info!("rolling restart: stopping child {index} (pid {pid})");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }

    /// TTIN/TTOU: one child more or less, never below one.
    pub(super) fn resize(&mut self, delta: i32) {
        let current = self.concurrency();
        if delta > 0 {
            if current >= MAX_CONCURRENCY {
                log::warn!("SIGTTIN ignored: already at the maximum of {MAX_CONCURRENCY} children");
                return;
            }
            if current == self.plans.len() {
                self.plans.push(SlotPlan::new(Instant::now()));
            } else {
                let plan = &mut self.plans[current];
                plan.retiring = false;
                if plan.pid.is_none() {
                    plan.restart_at = Some(Instant::now());
                    // A slot joining the fleet again starts a new life, like a brand-new slot:
                    // the time it spent retired is not staleness.
                    self.table.slots[current].beat();
                }
            }
            self.table
                .header
                .concurrency
                .store(current as u32 + 1, Ordering::Release);
            log::info!("SIGTTIN: concurrency {current} -> {}", current + 1);
        } else {
            if current <= 1 {
                log::warn!("SIGTTOU ignored: at least one child must run");
                return;
            }
            let index = current - 1;
            self.table
                .header
                .concurrency
                .store(index as u32, Ordering::Release);
            let plan = &mut self.plans[index];
            plan.retiring = true;
            plan.restart_at = None;
            if let Some(pid) = plan.pid {
                plan.exit_expected = true;
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            log::info!("SIGTTOU: concurrency {current} -> {index}");
        }
    }
}
