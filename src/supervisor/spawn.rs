//! Spawning: forking children into their slots and the probe, and the first steps every forked
//! process takes to leave the supervisor behind. Also the lease owners a slot's children claim
//! under, and [`run_forked`] for the short-lived processes that do the supervisor's database work.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult};

use crate::child::{self, ChildSpec, Predecessor};
use crate::logging::{self, Role};
use crate::probe;

use super::{signals, Supervisor};

impl Supervisor<'_> {
    /// Forks the children and the probe whose restart is due.
    pub(super) fn fork_due(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        let now = Instant::now();
        if self.probe_restart_at.is_some_and(|at| now >= at) {
            if let Err(e) = self.fork_probe() {
                log::error!("cannot fork the probe: {e}; retrying in 1 s");
                self.probe_restart_at = Some(now + Duration::from_secs(1));
            }
        }
        for index in 0..self.plans.len().min(self.concurrency()) {
            let plan = &self.plans[index];
            if plan.pid.is_none() && plan.restart_at.is_some_and(|at| now >= at) {
                if let Err(e) = self.fork_slot(index) {
                    log::error!(
                        "cannot fork child {index}: {e} (process limit or memory exhausted); retrying in 1 s"
                    );
                    self.plans[index].restart_at = Some(now + Duration::from_secs(1));
                }
            }
        }
    }

    /// Forks a child into slot `index`. The previous occupant (if any) is described to the new
    /// child, which releases that occupant's jobs as its first act.
    pub(super) fn fork_slot(&mut self, index: usize) -> nix::Result<()> {
        let slot = &self.table.slots[index];
        let previous_generation = slot.generation.load(Ordering::Acquire);
        let generation = previous_generation + 1;
        let owner = self.lease_owner(index, generation);
        let predecessor = (previous_generation > 0).then(|| self.past_occupants(index));
        let recycle_after_jobs = self
            .config
            .max_jobs_per_child
            .map(|max| max + fastrand::u64(0..=max / 10));
        let previous_state = slot.state();
        slot.prepare_fork();
        let forked = self
            .fork()
            .inspect_err(|_| slot.set_state(previous_state))?;
        match forked {
            ForkResult::Child => {
                let code = self.become_child(index, owner, predecessor, recycle_after_jobs);
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                slot.forked(child.as_raw(), generation);
                let plan = &mut self.plans[index];
                plan.pid = Some(child.as_raw());
                plan.forked_at = Instant::now();
                plan.restart_at = None;
                plan.kill_reason = None;
                log::info!("forked child {index} as pid {child} (generation {generation})");
                Ok(())
            }
        }
    }

    /// Forks the probe, which answers the health endpoint on the listener bound at start-up.
    pub(super) fn fork_probe(&mut self) -> nix::Result<()> {
        match self.fork()? {
            ForkResult::Child => {
                self.detach_from_supervisor(Role::Probe);
                let code = probe::serve(&self.listener, self.table, &self.config);
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                self.probe_pid = Some(child);
                self.probe_restart_at = None;
                self.table
                    .header
                    .probe_pid
                    .store(child.as_raw(), Ordering::Release);
                log::debug!("forked the probe as pid {child}");
                Ok(())
            }
        }
    }

    /// Forks with the handled signals blocked: a signal sent to a new process before it has its
    /// own handlers waits for them, instead of running the supervisor's inherited handler (and
    /// being lost). The parent unblocks at once; the new process in [`Self::detach_from_supervisor`].
    fn fork(&self) -> nix::Result<ForkResult> {
        let previous = signals::block()?;
        // SAFETY: this process is single-threaded (no pool, runtime or logger thread ever runs
        // here), so the child gets a consistent copy of every lock and allocator state.
        let forked = unsafe { fork() };
        if !matches!(forked, Ok(ForkResult::Child)) {
            signals::restore(&previous);
        }
        forked
    }

    /// The first steps of a forked process, shared by children and the probe: drop everything of
    /// the supervisor's that must not survive the fork, install the process's own handlers, and
    /// only then take the signals that arrived meanwhile.
    fn detach_from_supervisor(&self, role: Role) {
        logging::set_role(role);
        self.signals.forget_in_child();
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        // Die with the supervisor; check right after in case it died before the prctl.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
        if nix::unistd::getppid() != self.supervisor_pid {
            std::process::exit(1);
        }
        child::install_signal_handlers();
        signals::unblock_all();
    }

    /// The life of a freshly forked child: leave the supervisor behind, build the handler and run
    /// the consumer loop; returns the child's exit code.
    fn become_child(
        &self,
        index: usize,
        owner: String,
        predecessor: Option<Predecessor>,
        recycle_after_jobs: Option<u64>,
    ) -> i32 {
        self.detach_from_supervisor(Role::Child(index));
        // SAFETY: the health listener belongs to the probe; this process never uses it.
        unsafe { libc::close(self.listener.as_raw_fd()) };
        let mut handler = (self.factory)(&self.config);
        child::run(
            ChildSpec {
                config: &self.config,
                table: self.table,
                index,
                owner,
                predecessor,
                recycle_after_jobs,
            },
            handler.as_mut(),
        )
    }

    /// The lease owner of generation `generation` of slot `index` of this boot.
    fn lease_owner(&self, index: usize, generation: u64) -> String {
        format!("{}{generation}/", self.slot_owner_prefix(index))
    }

    /// The prefix of every lease owner slot `index` had in this boot: a successor releases all
    /// of them, in case a predecessor died before releasing its own predecessor's jobs.
    fn slot_owner_prefix(&self, index: usize) -> String {
        format!("{}{index}/", self.lease_prefix)
    }

    /// The past occupants of slot `index`, as whoever releases their jobs needs them: every lease
    /// owner the slot had in this boot, the job in flight the slot still names, and how the last
    /// occupant ended (recorded on that job).
    pub(super) fn past_occupants(&self, index: usize) -> Predecessor {
        let in_flight = self.table.slots[index].job_id.load(Ordering::Acquire);
        Predecessor {
            owner: self.slot_owner_prefix(index),
            in_flight: (in_flight != 0).then_some(in_flight),
            how_it_ended: self.plans[index]
                .kill_reason
                .clone()
                .unwrap_or_else(|| "worker process ended".into()),
        }
    }
}

/// Runs `work` in a forked process and waits for its exit code, at most `limit` (then kills it).
/// `None` when it could not be forked or did not finish. The supervisor stays connection-free:
/// whatever `work` opens lives and dies in that process.
pub(super) fn run_forked(what: &str, limit: Duration, work: impl FnOnce() -> i32) -> Option<i32> {
    // The process holds one end of a socket pair until it exits, so the wait is a poll() that
    // ends with it: sleeping in steps of 5 ms made every start-up 2.5 ms later on average.
    let ends = std::os::unix::net::UnixStream::pair();
    // SAFETY: the supervisor is single-threaded, so the child gets a consistent copy.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => std::process::exit(work()),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            log::error!(
                "cannot fork {what}: {e}; raise the process limit (ulimit -u) or free memory"
            );
            return None;
        }
    };
    // Without the pair (out of descriptors), the wait falls back to steps of 5 ms.
    let exited = ends.ok().map(|(watch, held)| {
        drop(held);
        watch
    });
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                // The socket reads as closed a moment before the process can be reaped: from
                // then on the poll returns at once, and steps of 1 ms cover that moment (and a
                // poll a signal interrupted).
                let left = deadline.saturating_duration_since(Instant::now());
                match &exited {
                    Some(watch) => {
                        let timeout = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                            .unwrap_or(PollTimeout::ZERO);
                        let mut fds = [PollFd::new(watch.as_fd(), PollFlags::POLLIN)];
                        if !matches!(poll(&mut fds, timeout), Ok(0)) {
                            std::thread::sleep(Duration::from_millis(1).min(left));
                        }
                    }
                    None => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(WaitStatus::StillAlive) => {
                log::error!("{what} did not finish within {limit:?}; killing it");
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return None;
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                log::error!("{what} was killed by {signal}");
                return None;
            }
            Err(e) => {
                log::error!("cannot wait for {what}: {e}");
                return None;
            }
            Ok(_) => {
                log::error!("{what} was stopped or traced instead of finishing");
                return None;
            }
        }
    }
}
