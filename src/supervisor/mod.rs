//! The prefork supervisor: forks the children and the probe, reaps them, re-forks with backoff,
//! detects crash loops, enforces timeouts and stops the fleet against one deadline.
//!
//! It is single-threaded and holds no database connection, pool or runtime for its whole life, so
//! it stays safe to `fork()`. Its only wait is `poll()` on the signal self-pipe with a timeout
//! computed from the nearest deadline: SIGCHLD wakes it at once, so a dead child is replaced in
//! about a millisecond. [`Supervisor::run`] is the master loop; read it top to bottom.

mod fleet;
mod signals;

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::child::{self, ChildSpec, Predecessor};
use crate::config::{Config, EX_CONFIG, MAX_CONCURRENCY};
use crate::handler::Handler;
use crate::host;
use crate::logging::{self, Role};
use crate::probe;
use crate::proctitle;
use crate::queue;
use crate::queue::consumer::Consumer;
use crate::slots::{monotonic_ms, SlotState, SlotTable};

use fleet::{RestartPolicy, SlotPlan};

/// Builds a child's default handler after the fork (so it may own processes and threads).
pub type HandlerFactory = dyn Fn(&Config) -> Box<dyn Handler>;

/// Exit code when `FORKQ_CRASH_LOOP_EXIT=1` and a slot is crash-looping (`EX_SOFTWARE`).
pub const EXIT_CRASH_LOOP: i32 = 70;
/// Exit code for start-up failures other than configuration (bind, fork, shared memory).
pub const EXIT_STARTUP: i32 = 1;

/// How long a stopping probe may take to record the host as stopped before it is killed.
const PROBE_STOP_GRACE: Duration = Duration::from_millis(500);
/// How long the probe waits before a re-fork after it died.
const PROBE_RESTART_DELAY: Duration = Duration::from_millis(200);
/// Grace between the SIGTERM and the SIGKILL of a child whose job exceeded its timeout.
pub(crate) const TIMEOUT_KILL_GRACE: Duration = Duration::from_secs(2);
/// The loop's longest sleep: stale heartbeats and job timeouts are checked at least this often.
const TICK: Duration = Duration::from_secs(1);

/// Runs the fleet until it is stopped; returns the process exit code.
pub fn run(config: Config, factory: &HandlerFactory) -> i32 {
    match Supervisor::start(config, factory) {
        Ok(mut supervisor) => supervisor.run(),
        Err(code) => code,
    }
}

/// A stop in progress.
struct Shutdown {
    /// Children still alive then are told to abandon their jobs.
    abandon_at: Instant,
    abandon_sent: bool,
    /// Children still alive then are killed.
    deadline: Instant,
    exit_code: i32,
}

/// A rolling restart (SIGHUP): one slot at a time.
struct RollingRestart {
    next: usize,
    waiting_for: Option<usize>,
}

struct Supervisor<'f> {
    config: Config,
    factory: &'f HandlerFactory,
    table: &'static SlotTable,
    listener: TcpListener,
    signals: signals::SignalPipe,
    supervisor_pid: Pid,
    lease_prefix: String,
    plans: Vec<SlotPlan>,
    policy: RestartPolicy,
    probe_pid: Option<Pid>,
    probe_restart_at: Option<Instant>,
    shutdown: Option<Shutdown>,
    rolling: Option<RollingRestart>,
    watchdog: Option<Duration>,
    last_watchdog: Instant,
    last_status: String,
}

impl<'f> Supervisor<'f> {
    /// Everything that must succeed before the first child: shared memory, the health listener,
    /// the database check, the signal pipe and the initial forks.
    fn start(config: Config, factory: &'f HandlerFactory) -> Result<Supervisor<'f>, i32> {
        if let Some(threads) = thread_count().filter(|&n| n > 1) {
            log::error!(
                "forkq::run found {threads} threads in this process: it forks, and forking a \
                 process with threads can deadlock its children. Call forkq::run before starting \
                 any thread (no async runtime, no connection pool or forkq::Client first)"
            );
            return Err(EXIT_STARTUP);
        }
        // While the process has one thread: the title area is prepared before anything forks.
        proctitle::init();
        logging::set_role(Role::Supervisor);
        let table = SlotTable::create_shared().map_err(|e| {
            log::error!("cannot create the shared slot table: {e}");
            EXIT_STARTUP
        })?;
        let listener = TcpListener::bind(config.health_addr).map_err(|e| {
            log::error!(
                "cannot listen on {} for the health endpoint (FORKQ_HEALTH_ADDR): {e}; \
                 pick a free address or stop whatever holds it",
                config.health_addr
            );
            EXIT_STARTUP
        })?;
        let bound = listener.local_addr().map_err(|_| EXIT_STARTUP)?;
        preflight(&config)?;
        let signals = signals::SignalPipe::install().map_err(|e| {
            log::error!("cannot install signal handlers: {e}");
            EXIT_STARTUP
        })?;
        table
            .header
            .concurrency
            .store(config.concurrency as u32, Ordering::Release);
        let now = Instant::now();
        let boot = fastrand::u64(..);
        table.header.boot.store(boot, Ordering::Release);
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        table
            .header
            .started_unix_ms
            .store(since_epoch.as_millis() as u64, Ordering::Release);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|us| Duration::from_micros(us) / 2);
        let mut supervisor = Supervisor {
            policy: RestartPolicy {
                healthy_uptime: config.healthy_uptime,
                crash_loop_threshold: config.crash_loop_threshold,
                backoff_base: config.restart_backoff_base,
                backoff_max: config.restart_backoff_max,
            },
            plans: (0..config.concurrency)
                .map(|_| SlotPlan::new(now))
                .collect(),
            config,
            factory,
            table,
            listener,
            signals,
            supervisor_pid: nix::unistd::getpid(),
            lease_prefix: host::lease_prefix(&host::hostname(), boot),
            probe_pid: None,
            probe_restart_at: None,
            shutdown: None,
            rolling: None,
            watchdog,
            last_watchdog: now,
            last_status: String::new(),
        };
        log::info!(
            "forkq supervisor {} starting {} children on queue(s) {}; health endpoint on http://{bound}/livez",
            supervisor.supervisor_pid,
            supervisor.config.concurrency,
            supervisor.config.queues.join(",")
        );
        supervisor.fork_probe().map_err(|e| {
            log::error!("cannot fork the probe process: {e}");
            EXIT_STARTUP
        })?;
        for index in 0..supervisor.plans.len() {
            if let Err(e) = supervisor.fork_slot(index) {
                log::error!("cannot fork child {index} at start-up: {e}; lower FORKQ_CONCURRENCY or raise the process limit");
                supervisor.begin_shutdown(true, EXIT_STARTUP);
                return Err(supervisor.run());
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        Ok(supervisor)
    }

    /// The master loop.
    fn run(&mut self) -> i32 {
        loop {
            self.table
                .header
                .supervisor_heartbeat_ms
                .store(monotonic_ms(), Ordering::Release);
            self.wait_for_event();
            for signal in self.signals.drain() {
                self.on_signal(signal);
            }
            self.reap();
            self.enforce_limits();
            if let Some(code) = self.drive_shutdown() {
                return code;
            }
            self.fork_due();
            self.advance_rolling_restart();
            self.report_to_systemd();
        }
    }

    /// Sleeps in `poll()` until a signal arrives or the nearest deadline.
    fn wait_for_event(&self) {
        let now = Instant::now();
        let mut wake = now + TICK;
        let deadlines = self
            .plans
            .iter()
            .flat_map(|p| [p.restart_at, p.kill_at])
            .chain([self.probe_restart_at])
            .chain([self.shutdown.as_ref().map(|s| s.abandon_at.min(s.deadline))])
            .flatten();
        for at in deadlines {
            wake = wake.min(at);
        }
        // Rounded up: waking a little after a deadline is fine, spinning until it is not.
        let millis = wake
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000);
        let timeout = PollTimeout::try_from(millis.min(60_000) as i32).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        // EINTR is expected: a signal interrupted the wait, and its byte is in the pipe.
        let _ = poll(&mut fds, timeout);
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::SIGCHLD => {} // reaped right after
            Signal::SIGTERM | Signal::SIGINT => {
                if self.shutdown.is_some() {
                    log::warn!("{signal} during a graceful stop: stopping at once");
                    self.begin_shutdown(true, 0);
                } else {
                    log::info!(
                        "{signal}: graceful stop, deadline {:?}",
                        self.config.shutdown_grace
                    );
                    self.begin_shutdown(false, 0);
                }
            }
            Signal::SIGQUIT => {
                log::info!("SIGQUIT: immediate stop; running jobs go back to the queue");
                self.begin_shutdown(true, 0);
            }
            Signal::SIGHUP if self.shutdown.is_none() => {
                log::info!("SIGHUP: rolling restart of {} children", self.concurrency());
                self.rolling = Some(RollingRestart {
                    next: 0,
                    waiting_for: None,
                });
            }
            Signal::SIGTTIN if self.shutdown.is_none() => self.resize(1),
            Signal::SIGTTOU if self.shutdown.is_none() => self.resize(-1),
            _ => {}
        }
    }

    fn concurrency(&self) -> usize {
        self.table.header.concurrency.load(Ordering::Acquire) as usize
    }

    /// TTIN/TTOU: one child more or less, never below one.
    fn resize(&mut self, delta: i32) {
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

    /// Collects every dead child, including orphans re-parented to us when we are PID 1.
    fn reap(&mut self) {
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
        // A child killed in the middle of a claim must not keep its turn (see wakeup::claim_gate_enter).
        slot.in_claim.store(false, Ordering::Release);
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
    fn enforce_limits(&mut self) {
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

    /// Forks the children and the probe whose restart is due.
    fn fork_due(&mut self) {
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

    /// The lease owner of generation `generation` of slot `index` of this boot.
    fn lease_owner(&self, index: usize, generation: u64) -> String {
        format!("{}{generation}/", self.slot_owner_prefix(index))
    }

    /// The prefix of every lease owner slot `index` had in this boot: a successor releases all
    /// of them, in case a predecessor died before releasing its own predecessor's jobs.
    fn slot_owner_prefix(&self, index: usize) -> String {
        format!("{}{index}/", self.lease_prefix)
    }

    /// Forks a child into slot `index`. The previous occupant (if any) is described to the new
    /// child, which releases that occupant's jobs as its first act.
    fn fork_slot(&mut self, index: usize) -> nix::Result<()> {
        let slot = &self.table.slots[index];
        let previous_generation = slot.generation.load(Ordering::Acquire);
        let generation = previous_generation + 1;
        let owner = self.lease_owner(index, generation);
        let predecessor = (previous_generation > 0).then(|| self.past_occupants(index));
        let recycle_after_jobs = self
            .config
            .max_jobs_per_child
            .map(|max| max + fastrand::u64(0..=max / 10));
        // Age from the fork, never from a fresh heartbeat: heartbeat_ms is left as it was.
        slot.forked_at_ms.store(monotonic_ms(), Ordering::Release);
        if previous_generation == 0 {
            slot.heartbeat_ms.store(monotonic_ms(), Ordering::Release);
        }
        match self.fork()? {
            ForkResult::Child => {
                let code = self.become_child(index, owner, predecessor, recycle_after_jobs);
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                slot.generation.store(generation, Ordering::Release);
                slot.pid.store(child.as_raw(), Ordering::Release);
                slot.set_state(SlotState::Starting);
                if previous_generation > 0 {
                    slot.restarts.fetch_add(1, Ordering::Relaxed);
                }
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

    fn fork_probe(&mut self) -> nix::Result<()> {
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

    /// Starts a stop: every child is asked to stop (SIGTERM to finish the job at hand, SIGQUIT to
    /// abandon it), all against one shared deadline.
    fn begin_shutdown(&mut self, immediate: bool, exit_code: i32) {
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
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
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
    fn drive_shutdown(&mut self) -> Option<i32> {
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
            self.wait_for_children(Duration::from_secs(2));
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

    /// The past occupants of slot `index`, as whoever releases their jobs needs them: every lease
    /// owner the slot had in this boot, the job in flight the slot still names, and how the last
    /// occupant ended (recorded on that job).
    fn past_occupants(&self, index: usize) -> Predecessor {
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

    /// Once the fleet is down: gives back the jobs of every slot whose last child did not exit
    /// cleanly (killed at the deadline, or dead and not yet replaced when the stop began), so
    /// nothing stays leased until its lease expires. Runs in a short-lived forked process (the
    /// supervisor itself never connects); the job each was running is charged an attempt.
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
            let mut consumer = match Consumer::connect(&self.config, "forkq shutdown") {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("cannot release the jobs of killed children ({e}); they return when their lease expires");
                    return 1;
                }
            };
            for p in &unclean {
                match consumer.release(&p.owner, p.in_flight, Some(&p.how_it_ended)) {
                    Ok(n) => log::info!("released {n} job(s) of {} ({})", p.owner, p.how_it_ended),
                    Err(e) => log::warn!("cannot release the jobs of {}: {e}", p.owner),
                }
            }
            0
        };
        run_forked("the shutdown releaser", Duration::from_secs(5), release);
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

    /// SIGHUP: replaces the children one at a time, waiting for each replacement to heartbeat
    /// before stopping the next, so the fleet never drops more than one child.
    fn advance_rolling_restart(&mut self) {
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

    /// Pets the systemd watchdog while the fleet is healthy, and keeps STATUS= current.
    fn report_to_systemd(&mut self) {
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
        if status != self.last_status {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
            self.last_status = status;
        }
        if let Some(interval) = self.watchdog {
            // Same verdict as /livez: a wedged or crash-looping fleet stops petting the watchdog.
            if self.last_watchdog.elapsed() >= interval
                && probe::liveness(self.table, &self.config).0
            {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                self.last_watchdog = Instant::now();
            }
        }
    }
}

/// Checks the database and the schema in a short-lived forked process, so the supervisor itself
/// never opens a connection. An unreachable database or an old schema stops start-up with 78.
fn preflight(config: &Config) -> Result<(), i32> {
    let check = || match queue::connect(&config.database_url, "forkq preflight")
        .and_then(|mut c| queue::migrations::require_current(&mut c, &config.schema))
    {
        Ok(()) => 0,
        Err(e) if e.is_connection_lost() => {
            log::error!("cannot reach the database at start-up ({e}); check DATABASE_URL and that PostgreSQL is running");
            EX_CONFIG
        }
        Err(e) => {
            log::error!("{e}");
            EX_CONFIG
        }
    };
    match run_forked(
        "the start-up database check",
        Duration::from_secs(30),
        || {
            logging::set_role(Role::Preflight);
            check()
        },
    ) {
        Some(0) => Ok(()),
        Some(code) => Err(code),
        None => Err(EXIT_STARTUP),
    }
}

/// The number of threads of this process, from /proc (None where it cannot be read).
fn thread_count() -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Runs `work` in a forked process and waits for its exit code, at most `limit` (then kills it).
/// `None` when it could not be forked or did not finish. The supervisor stays connection-free.
fn run_forked(what: &str, limit: Duration, work: impl FnOnce() -> i32) -> Option<i32> {
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
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
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
