//! Reaping and limits: what the supervisor does when a child dies (free its slot, kill what it
//! left behind, schedule the replacement the restart policy allows, detect a crash loop), and
//! to children that stopped making progress (a job past its timeout, a stale heartbeat).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::slots::{monotonic_ms, SlotState};

use super::{Supervisor, EXIT_CRASH_LOOP, TIMEOUT_KILL_GRACE};

/// How long the probe waits before a re-fork after it died.
const PROBE_RESTART_DELAY: Duration = Duration::from_millis(200);

impl Supervisor<'_> {
    /// Collects every dead child, including orphans re-parented to us when we are PID 1.
    pub(super) fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_death(pid, code, None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_death(pid, 128 + sig as i32, Some(sig))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Books the death of `pid` (exit `code`, or killed by `signal`): frees its slot and claim
    /// turn, kills its handler's process group, and schedules the replacement the restart policy
    /// allows (or marks the slot crash-looping). A dead probe is re-forked after a short delay.
    fn on_death(&mut self, pid: Pid, code: i32, signal: Option<Signal>) {
        let how = match signal {
            Some(sig) => format!("killed by signal {} ({sig})", sig as i32),
            None => format!("exited with status {code}"),
        };
        if Some(pid) == self.probe_pid {
            self.probe_pid = None;
            if self.shutdown.is_none() {
                log::warn!("probe process {pid} {how}; re-forking it");
                self.probe_restart_at = Some(Instant::now() + PROBE_RESTART_DELAY);
            }
            return;
        }
        let Some(index) = self.plans.iter().position(|p| p.pid == Some(pid.as_raw())) else {
            log::debug!("reaped process {pid} ({how}), not one of ours");
            return;
        };
        let now = Instant::now();
        let slot = &self.table.slots[index];
        let heartbeated =
            slot.heartbeat_ms.load(Ordering::Acquire) > slot.forked_at_ms.load(Ordering::Acquire);
        // A child that went through its own shut-down (recycling, a SIGTERM sent to it alone)
        // exits 0 in state `stopping`: a clean exit, not a crash. A handler calling exit(0) in
        // the middle of a job is still a crash.
        let clean = signal.is_none() && code == 0 && slot.state() == SlotState::Stopping;
        slot.last_exit
            .store(signal.map_or(code, |s| -(s as i32)), Ordering::Release);
        slot.pid.store(0, Ordering::Release);
        // Its handler program's group outlives it (only the program itself dies with it): kill
        // it now, before the successor forked below releases the job to run again.
        let pgid = slot.handler_pgid.swap(0, Ordering::AcqRel);
        if pgid > 0 && killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
            log::info!(
                "child {index} (pid {pid}) {how}; killed its handler's process group {pgid}"
            );
        }
        // A child killed in the middle of a claim must not keep its turn (see claim_gate::enter),
        // and a sibling waiting for one learns at once that it is free.
        crate::claim_gate::leave(self.table, index);
        // Nor its promise that a database call would return: the slot ages from its last beat.
        slot.waiting_until_ms.store(0, Ordering::Release);
        let plan = &mut self.plans[index];
        let uptime = now.saturating_duration_since(plan.forked_at);
        plan.exit_expected |= clean;
        let reason = plan.kill_reason.take();
        if self.shutdown.is_some() {
            log::info!("child {index} (pid {pid}) {how} during shutdown");
            plan.pid = None;
            plan.restart_at = None;
            // Recorded on its job in flight by the shutdown releaser, if it did not exit cleanly.
            plan.kill_reason = Some(reason.unwrap_or_else(|| format!("worker process {how}")));
            slot.set_state(SlotState::Unused);
            return;
        }
        let verdict = self.policy.on_death(plan, now, heartbeated);
        slot.fast_crashes
            .store(plan.fast_crashes, Ordering::Release);
        let in_flight = slot.job_id.load(Ordering::Acquire);
        match verdict.restart_in {
            None => {
                log::info!("child {index} (pid {pid}) {how}; slot retired");
                slot.set_state(SlotState::Unused);
                return;
            }
            Some(_) if clean => {
                log::info!(
                    "child {index} (pid {pid}) exited cleanly after {uptime:.1?}; re-forking"
                );
            }
            Some(delay) => {
                let job = if in_flight != 0 {
                    format!(" while running job {in_flight}")
                } else {
                    String::new()
                };
                let why = reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                log::warn!(
                    "child {index} (pid {pid}) {how}{why}{job} after {uptime:.1?}; re-forking in {delay:.1?} \
                     ({} fast crash(es) in a row)",
                    plan.fast_crashes
                );
            }
        }
        plan.kill_reason = Some(reason.unwrap_or_else(|| format!("worker process {how}")));
        if verdict.crash_looping {
            slot.set_state(SlotState::CrashLooping);
            log::error!(
                "slot {index} is crash-looping: {} deaths in a row, each within {:?} of its start",
                plan.fast_crashes,
                self.config.healthy_uptime
            );
            if self.config.crash_loop_exit {
                log::error!("FORKQ_CRASH_LOOP_EXIT=1: stopping the fleet and exiting with status {EXIT_CRASH_LOOP}");
                self.begin_shutdown(false, EXIT_CRASH_LOOP);
            }
        } else {
            slot.set_state(SlotState::BackingOff);
        }
    }

    /// Kills children whose job overran its timeout or whose heartbeat went stale, finishes
    /// pending kills, and clears the crash count of slots that have been healthy long enough.
    pub(super) fn enforce_limits(&mut self) {
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let stale_ms = self.config.health_stale.as_millis() as u64;
        for (index, plan) in self.plans.iter_mut().enumerate() {
            let Some(pid) = plan.pid else { continue };
            let slot = &self.table.slots[index];
            let pid = Pid::from_raw(pid);
            if plan.kill_at.is_some_and(|at| now >= at) {
                log::warn!("child {index} (pid {pid}) did not stop in time; killing it");
                let _ = kill(pid, Signal::SIGKILL);
                plan.kill_at = None;
                continue;
            }
            if plan.kill_reason.is_some() {
                continue;
            }
            // A starting child's slot still names its predecessor's job until it released it.
            let job = match slot.state() {
                SlotState::Running => slot.job_id.load(Ordering::Acquire),
                _ => 0,
            };
            let job_ms = now_ms.saturating_sub(slot.job_started_ms.load(Ordering::Acquire));
            // The job's own timeout, else the fleet's.
            let own = slot.job_timeout_ms.load(Ordering::Acquire);
            let timeout = match own {
                0 => self.config.job_timeout,
                ms => Some(Duration::from_millis(ms)),
            };
            if let Some(timeout) = timeout {
                if job != 0 && job_ms > timeout.as_millis() as u64 {
                    let reason = match own {
                        0 => format!(
                            "job {job} exceeded FORKQ_JOB_TIMEOUT_SECONDS={}",
                            timeout.as_secs()
                        ),
                        _ => format!("job {job} exceeded its own timeout of {timeout:.1?}"),
                    };
                    log::warn!("child {index} (pid {pid}): {reason}; stopping it");
                    let _ = kill(pid, Signal::SIGTERM);
                    plan.kill_at = Some(now + TIMEOUT_KILL_GRACE);
                    plan.kill_reason = Some(reason);
                    // The job overran, not the child: this death does not count as a crash.
                    plan.exit_expected = true;
                    continue;
                }
            }
            let age_ms = slot.life_heartbeat_age_ms(now_ms);
            if age_ms > stale_ms && self.shutdown.is_none() {
                let reason = format!(
                    "no heartbeat for {:.1} s (FORKQ_HEALTH_STALE_SECONDS={})",
                    age_ms as f64 / 1000.0,
                    stale_ms / 1000
                );
                log::warn!("child {index} (pid {pid}) is wedged: {reason}; killing it");
                let _ = kill(pid, Signal::SIGKILL);
                plan.kill_reason = Some(reason);
                continue;
            }
            let healthy_for = now.saturating_duration_since(plan.forked_at);
            if plan.fast_crashes > 0
                && healthy_for >= self.config.healthy_uptime
                && slot.heartbeat_ms.load(Ordering::Acquire)
                    > slot.forked_at_ms.load(Ordering::Acquire)
            {
                log::info!("slot {index} is healthy again after {healthy_for:.1?}");
                plan.fast_crashes = 0;
                slot.fast_crashes.store(0, Ordering::Release);
            }
        }
    }
}
