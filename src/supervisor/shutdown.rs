//! Shutdown: stopping the whole fleet against one shared deadline. Children are asked first
//! (SIGTERM finishes the job at hand, SIGQUIT abandons it), those still busy shortly before the
//! deadline abandon their jobs, the deadline kills the rest, a forked releaser gives back what the
//! killed ones held, and the probe, which records the host as stopped, goes last.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::child::Predecessor;
use crate::futex;
use crate::logging::{self, Role};

use super::spawn::run_forked;
use super::{systemd, Supervisor, SHUTDOWN_REAP_LIMIT, SHUTDOWN_RELEASER_LIMIT};

/// How long a stopping probe may take to record the host as stopped before it is killed.
const PROBE_STOP_GRACE: Duration = Duration::from_millis(500);

/// A stop in progress.
pub(super) struct Shutdown {
    /// Children still alive then are told to abandon their jobs.
    abandon_at: Instant,
    abandon_sent: bool,
    /// Children still alive then are killed.
    deadline: Instant,
    exit_code: i32,
}

impl Shutdown {
    /// The next moment the stop must act (abandon, then kill), for the loop's wait.
    pub(super) fn next_deadline(&self) -> Instant {
        self.abandon_at.min(self.deadline)
    }
}

impl Supervisor<'_> {
    /// Starts a stop: every child is asked to stop (SIGTERM to finish the job at hand, SIGQUIT to
    /// abandon it), all against one shared deadline.
    pub(super) fn begin_shutdown(&mut self, immediate: bool, exit_code: i32) {
        let now = Instant::now();
        let grace = if immediate {
            self.config.shutdown_grace.min(Duration::from_secs(3))
        } else {
            self.config.shutdown_grace
        };
        let deadline = match &self.shutdown {
            Some(s) => s.deadline.min(now + grace),
            None => now + grace,
        };
        // Children still busy shortly before the deadline abandon their jobs (released, not
        // failed) so nothing is left leased when the SIGKILL comes.
        let abandon_at = if immediate {
            now
        } else {
            deadline - (grace / 4).min(Duration::from_secs(1))
        };
        let exit_code = self
            .shutdown
            .as_ref()
            .map_or(exit_code, |s| s.exit_code.max(exit_code));
        self.shutdown = Some(Shutdown {
            abandon_at,
            abandon_sent: false,
            deadline,
            exit_code,
        });
        self.rolling = None;
        self.table
            .header
            .shutting_down
            .store(true, Ordering::Release);
        futex::wake(&self.table.header.presence_wake);
        systemd::notify_stopping();
        let signal = if immediate {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        };
        for plan in self.plans.iter_mut() {
            plan.restart_at = None;
            plan.exit_expected = true;
            if let Some(pid) = plan.pid {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// Advances a stop in progress; returns the exit code once every child is gone.
    pub(super) fn drive_shutdown(&mut self) -> Option<i32> {
        let shutdown = self.shutdown.as_mut()?;
        let now = Instant::now();
        if !shutdown.abandon_sent && now >= shutdown.abandon_at {
            shutdown.abandon_sent = true;
            for pid in self.plans.iter().filter_map(|p| p.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            }
        }
        if now >= shutdown.deadline {
            // Poll once more before killing: a child that just exited must not be killed.
            self.reap();
            for (index, plan) in self.plans.iter_mut().enumerate() {
                if let Some(pid) = plan.pid {
                    log::warn!("child {index} (pid {pid}) still running at the shutdown deadline; killing it");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    plan.kill_reason = Some(
                        "worker killed at the shutdown deadline (FORKQ_SHUTDOWN_GRACE_SECONDS)"
                            .into(),
                    );
                }
            }
            self.wait_for_children(SHUTDOWN_REAP_LIMIT);
        }
        if self.plans.iter().any(|p| p.pid.is_some()) {
            return None;
        }
        self.release_unclean_slots();
        let code = self.shutdown.as_ref().map_or(0, |s| s.exit_code);
        self.stop_probe();
        log::info!("all children stopped; supervisor exiting with status {code}");
        Some(code)
    }

    /// Once the fleet is down: gives back the jobs of every slot whose last child did not exit
    /// cleanly (killed at the deadline, or dead and not yet replaced when the stop began), so
    /// nothing stays leased until its lease expires. The release hook runs in a short-lived
    /// forked process (the supervisor itself never connects).
    fn release_unclean_slots(&self) {
        let unclean: Vec<Predecessor> = (0..self.plans.len())
            .filter_map(|index| {
                let slot = &self.table.slots[index];
                let ran = slot.generation.load(Ordering::Acquire) > 0;
                let clean = slot.last_exit.load(Ordering::Acquire) == 0;
                (ran && !clean).then(|| self.past_occupants(index))
            })
            .collect();
        if unclean.is_empty() {
            return;
        }
        let release = || {
            logging::set_role(Role::Releaser);
            self.signals.forget_in_child();
            (self.database.release)(&self.config, &unclean)
        };
        run_forked("the shutdown releaser", SHUTDOWN_RELEASER_LIMIT, release);
    }

    /// Blocks until every child is reaped or `limit` passes (used only after SIGKILL).
    fn wait_for_children(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.plans.iter().any(|p| p.pid.is_some()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            self.reap();
        }
    }

    /// Asks the probe to stop (its presence service then records this host as stopped) and
    /// kills it if it has not exited within [`PROBE_STOP_GRACE`].
    fn stop_probe(&mut self) {
        if let Some(pid) = self.probe_pid.take() {
            let _ = kill(pid, Signal::SIGTERM);
            // The signal sets the probe's stop flag; the wake makes its presence service look.
            futex::wake(&self.table.header.presence_wake);
            let until = Instant::now() + PROBE_STOP_GRACE;
            while matches!(
                waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive)
            ) {
                if Instant::now() >= until {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
