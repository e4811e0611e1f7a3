//! The prefork supervisor: forks the children and the probe, reaps them, re-forks with backoff,
//! detects crash loops, enforces timeouts and stops the fleet against one deadline.
//!
//! It is single-threaded and holds no database connection, pool or runtime for its whole life, so
//! it stays safe to `fork()`. It knows nothing of SQL: what it needs from the database (the
//! start-up check, the releaser after a forced stop) is handed to it as [`DatabaseHooks`] and runs
//! only in processes it forks for them. Its only wait is `poll()` on the signal self-pipe with a
//! timeout computed from the nearest deadline: SIGCHLD wakes it at once, so a dead child is
//! replaced in about a millisecond.
//!
//! `Supervisor::run` below is the master loop; read it top to bottom. Each step lives in a file
//! of its own: `start` (start-up), `spawn` (forking children and the probe), `reap` (deaths,
//! restart policy, timeouts and stale heartbeats), `shutdown` (stopping the fleet), `rolling`
//! (SIGHUP rolling restart, TTIN/TTOU resizing) and `systemd` (readiness, watchdog, status).

mod fleet;
mod reap;
mod rolling;
mod shutdown;
mod signals;
mod spawn;
mod start;
mod systemd;

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::child::Predecessor;
use crate::config::Config;
use crate::handler::Handler;
use crate::slots::{monotonic_ms, SlotTable};

use fleet::{RestartPolicy, SlotPlan};
use rolling::RollingRestart;
use shutdown::Shutdown;

/// Builds a child's default handler after the fork (so it may own processes and threads).
pub type HandlerFactory = dyn Fn(&Config) -> Box<dyn Handler>;

/// What the supervisor needs from the database, handed in by the layer that builds it
/// ([`crate::run`]), so this module never touches SQL. Plain functions, not closures: they
/// capture nothing, so nothing the caller holds (a connection, a pool) can reach the supervisor
/// through them. Each runs only inside a short-lived process the supervisor forks for it, and its
/// return value is that process's exit code.
#[derive(Clone, Copy)]
pub struct DatabaseHooks {
    /// The start-up check (database reachable, schema current, enough free connections for
    /// `config`'s fleet): 0 lets start-up go on; any other code stops it with that code, once
    /// the check has logged why.
    pub preflight: fn(&Config) -> i32,
    /// After a forced stop: gives back the jobs of each past occupant named, recording how it
    /// ended on the job it was running.
    pub release: fn(&Config, &[Predecessor]) -> i32,
}

/// Exit code when `FORKQ_CRASH_LOOP_EXIT=1` and a slot is crash-looping (`EX_SOFTWARE`).
pub const EXIT_CRASH_LOOP: i32 = 70;
/// Exit code for start-up failures other than configuration (bind, fork, shared memory).
pub const EXIT_STARTUP: i32 = 1;
/// Grace between the SIGTERM and the SIGKILL of a child whose job exceeded its timeout.
pub(crate) const TIMEOUT_KILL_GRACE: Duration = Duration::from_secs(2);
/// After the shutdown deadline's SIGKILL, the longest wait for the killed children to be reaped.
pub const SHUTDOWN_REAP_LIMIT: Duration = Duration::from_secs(2);
/// The longest the shutdown releaser may take to give back the jobs of killed children.
pub const SHUTDOWN_RELEASER_LIMIT: Duration = Duration::from_secs(5);
/// The longest a stop lasts beyond `FORKQ_SHUTDOWN_GRACE_SECONDS`: reaping what the deadline
/// killed, the releaser, and a second for stopping the probe and exiting. A service manager's stop
/// timeout must be at least the grace plus this, or it kills jobs the daemon was about to give
/// back. (Only a child stuck in the kernel, which even SIGKILL cannot end, makes it longer.)
pub const STOP_OVERHEAD: Duration =
    Duration::from_secs(SHUTDOWN_REAP_LIMIT.as_secs() + SHUTDOWN_RELEASER_LIMIT.as_secs() + 1);

/// The loop's longest sleep: stale heartbeats and job timeouts are checked at least this often.
const TICK: Duration = Duration::from_secs(1);

/// Runs the fleet until it is stopped; returns the process exit code.
pub fn run(config: Config, factory: &HandlerFactory, database: DatabaseHooks) -> i32 {
    match Supervisor::start(config, factory, database) {
        Ok(mut supervisor) => supervisor.run(),
        Err(code) => code,
    }
}

struct Supervisor<'f> {
    config: Config,
    factory: &'f HandlerFactory,
    database: DatabaseHooks,
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
    systemd: systemd::Reporter,
}

impl Supervisor<'_> {
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
            .chain([self.shutdown.as_ref().map(Shutdown::next_deadline)])
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
            Signal::SIGHUP if self.shutdown.is_none() => self.begin_rolling_restart(),
            Signal::SIGTTIN if self.shutdown.is_none() => self.resize(1),
            Signal::SIGTTOU if self.shutdown.is_none() => self.resize(-1),
            _ => {}
        }
    }

    /// The number of slots the fleet runs now (TTIN/TTOU move it), as the probe sees it too.
    fn concurrency(&self) -> usize {
        self.table.header.concurrency.load(Ordering::Acquire) as usize
    }
}
