//! Start-up: everything that must succeed before the first child, in order. A failure here stops
//! the process with a clear error instead of running a fleet that cannot work (no shared memory,
//! no health endpoint, no database, or threads that make forking unsafe).

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::host;
use crate::logging::{self, Role};
use crate::proctitle;
use crate::slots::{monotonic_ms, SlotTable};

use super::fleet::{RestartPolicy, SlotPlan};
use super::spawn::run_forked;
use super::{signals, systemd, DatabaseHooks, HandlerFactory, Supervisor, EXIT_STARTUP};

/// The longest the start-up database check may take before start-up fails.
const PREFLIGHT_LIMIT: Duration = Duration::from_secs(30);

impl<'f> Supervisor<'f> {
    /// Everything that must succeed before the first child: shared memory, the health listener,
    /// the database check, the signal pipe and the initial forks.
    pub(super) fn start(
        config: Config,
        factory: &'f HandlerFactory,
        database: DatabaseHooks,
    ) -> Result<Supervisor<'f>, i32> {
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
        preflight(&config, database)?;
        let signals = signals::SignalPipe::install().map_err(|e| {
            log::error!("cannot install signal handlers: {e}");
            EXIT_STARTUP
        })?;
        table
            .header
            .concurrency
            .store(config.concurrency as u32, Ordering::Release);
        // The first maintenance pass waits one interval: the children's first claims come first
        // (a fresh child releases its predecessors' jobs itself; expired leases can wait 2 s).
        table
            .header
            .maintenance_ms
            .store(monotonic_ms(), Ordering::Release);
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
            database,
            table,
            listener,
            signals,
            supervisor_pid: nix::unistd::getpid(),
            lease_prefix: host::lease_prefix(&host::hostname(), boot),
            probe_pid: None,
            probe_restart_at: None,
            shutdown: None,
            rolling: None,
            systemd: systemd::Reporter::from_env(now),
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
        systemd::notify_ready();
        Ok(supervisor)
    }
}

/// Runs the database's start-up check in a short-lived forked process, so the supervisor itself
/// never opens a connection. A failed check stops start-up with the code it chose (78 for an
/// unreachable database, an old schema or too few free connections).
fn preflight(config: &Config, database: DatabaseHooks) -> Result<(), i32> {
    let check = || {
        logging::set_role(Role::Preflight);
        (database.preflight)(config)
    };
    match run_forked("the start-up database check", PREFLIGHT_LIMIT, check) {
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
