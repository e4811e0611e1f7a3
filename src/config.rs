//! Configuration from the environment: parsed once, validated, passed down.
//!
//! Every setting is an environment variable (`FORKQ_*` plus `DATABASE_URL`), because forkq is run by
//! systemd, docker-compose and Kubernetes, which all speak environment. A bad value is a
//! [`ConfigError`] naming the variable, the value and what is allowed; the CLI turns it into exit
//! code 78 (`EX_CONFIG`). Limits that are merely too large are clamped and the clamp is logged.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::handler::HandlerSpec;
use crate::schedule::{self, Schedule};

/// Exit code for configuration errors (`EX_CONFIG` from sysexits.h), which systemd and operators
/// recognise as "fix the settings, restarting will not help".
pub const EX_CONFIG: i32 = 78;

/// The largest fleet one supervisor will run; the shared slot table has this many slots.
pub const MAX_CONCURRENCY: usize = 256;

/// A setting that cannot be used, with everything the operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: String,
    /// The value it had (or a note that it was missing).
    pub value: String,
    /// What would have been accepted.
    pub allowed: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}={:?}: {}",
            self.variable, self.value, self.allowed
        )
    }
}

impl std::error::Error for ConfigError {}

/// Every setting forkq reads, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection string (`DATABASE_URL` or `FORKQ_DATABASE_URL`).
    pub database_url: String,
    /// Schema holding forkq's tables, so tests and tenants can share one database.
    pub schema: String,
    /// Queues this daemon consumes, in strict priority order.
    pub queues: Vec<String>,
    /// Number of consumer children.
    pub concurrency: usize,
    /// The most jobs claimed per round trip (a child claims fewer when its jobs are slow).
    pub prefetch: usize,
    /// At most this many claim rounds of the schema pick jobs at the same time, across every
    /// host (a gate in the database; 0: none).
    pub claimers: usize,
    /// Longest time a finished job's acknowledgement may wait to be sent with others.
    pub ack_delay: Duration,
    /// Commit every acknowledgement before the next job starts (prefetch 1, no ack delay).
    pub durable: bool,
    /// How long a claimed job is leased; renewed every third of it while the job runs.
    pub lease: Duration,
    /// Default attempts for jobs enqueued by this process.
    pub max_attempts: i32,
    /// First retry delay; doubles with every attempt.
    pub retry_backoff_base: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
    /// Idle polling period (the fallback when no notification arrives).
    pub poll_interval: Duration,
    /// Wake idle children with LISTEN/NOTIFY (by default off behind a transaction-mode pooler
    /// unless `listen_database_url` gives the listener a direct connection).
    pub listen: bool,
    /// The connection string of the wake-up listener: a direct one when `database_url` goes
    /// through a pooler (`FORKQ_LISTEN_DATABASE_URL`), else `database_url`.
    pub listen_database_url: String,
    /// How `database_url` reaches PostgreSQL (`FORKQ_POOLER`): directly, or through a pooler in
    /// transaction mode, which keeps no session state between transactions.
    pub pooler: Pooler,
    /// Largest accepted payload, in bytes of JSON text.
    pub max_payload_bytes: usize,
    /// How long completed jobs stay in the archive; zero deletes them on completion.
    pub retention: Duration,
    /// The handler for tasks without a route.
    pub handler: HandlerSpec,
    /// Per-task handlers (`task=handler;task=handler`).
    pub routes: Vec<(String, HandlerSpec)>,
    /// Answer the builtin demo tasks that can harm a worker (`crash`, `spin`, `getenv`).
    pub demo_tasks: bool,
    /// Environment variables handlers may see although they look like secrets.
    pub handler_pass_env: Vec<String>,
    /// Largest result a handler program may return: an exec program's stdout, a coproc's line.
    pub max_result_bytes: usize,
    /// Hard limit on one job's run time; `None` for no limit.
    pub job_timeout: Option<Duration>,
    /// How long the program of a cancelled job has to stop once told, before it is killed.
    pub cancel_grace: Duration,
    /// Where the probe serves `/livez`, `/readyz` and `/metrics`.
    pub health_addr: SocketAddr,
    /// A child whose heartbeat is older than this is stale (liveness 503, then replaced).
    pub health_stale: Duration,
    /// Consecutive fast deaths that make a slot crash-looping.
    pub crash_loop_threshold: u32,
    /// A child that lived at least this long did not crash "fast".
    pub healthy_uptime: Duration,
    /// Exit the supervisor (non-zero) instead of reporting a crash loop through liveness.
    pub crash_loop_exit: bool,
    /// First re-fork delay after a fast crash; doubles with every consecutive one.
    pub restart_backoff_base: Duration,
    /// Longest re-fork delay.
    pub restart_backoff_max: Duration,
    /// Recycle a child after about this many jobs; `None` never.
    pub max_jobs_per_child: Option<u64>,
    /// Recycle a child whose resident memory exceeds this many MiB; `None` never.
    pub max_child_rss_mb: Option<u64>,
    /// One deadline for all children to stop on SIGTERM before they are killed.
    pub shutdown_grace: Duration,
    /// The schedules file (`FORKQ_SCHEDULES`), if any.
    pub schedules_file: Option<std::path::PathBuf>,
    /// The schedules it declares, checked; empty without a file.
    pub schedules: Vec<Schedule>,
    /// How often the probe records this daemon in the hosts table.
    pub host_interval: Duration,
    /// Every connection holds the boot's session lock, and the probe brings back the jobs of
    /// provably gone hosts before their leases expire (off behind a transaction-mode pooler).
    pub host_release: bool,
}

/// What stands between forkq and PostgreSQL (`FORKQ_POOLER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// Direct connections, or a pooler in session mode: session settings, named prepared
    /// statements and session advisory locks last as long as the connection.
    None,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`): each transaction may
    /// run on another server connection, so forkq relies on none of those (docs/pooler.md).
    Transaction,
}

/// Reads variables from a map so parsing can be tested without touching the process environment.
struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    /// The trimmed value, or `None` when unset or empty (empty means "use the default").
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn error(&self, name: &str, allowed: impl Into<String>) -> ConfigError {
        ConfigError {
            variable: name.to_string(),
            value: self.0.get(name).cloned().unwrap_or_default(),
            allowed: allowed.into(),
        }
    }

    /// An integer in `min..=max`, or the default when unset.
    fn int(&self, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        match raw.parse::<i64>() {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(self.error(name, format!("an integer from {min} to {max}"))),
        }
    }

    /// A flag: `1/true/yes/on` or `0/false/no/off`.
    fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.error(name, "1 or 0 (also true/false, yes/no, on/off)")),
        }
    }

    fn seconds(
        &self,
        name: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(
            self.int(name, default, min, max)? as u64
        ))
    }

    fn millis(
        &self,
        name: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(
            self.int(name, default, min, max)? as u64
        ))
    }

    /// A PostgreSQL connection string, or `None` when unset.
    fn url(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(url)
                if url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.contains('=') =>
            {
                Ok(Some(url.to_string()))
            }
            Some(_) => Err(self.error(
                name,
                "a postgres:// or postgresql:// URL, or a key=value connection string",
            )),
        }
    }

    /// A positive limit where 0 means "off".
    fn optional_limit(&self, name: &str, max: i64) -> Result<Option<u64>, ConfigError> {
        let v = self.int(name, 0, 0, max)?;
        Ok((v > 0).then_some(v as u64))
    }
}

/// PostgreSQL's longest identifier in bytes (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The longest schema name: the schema's NOTIFY channel, `forkq_<schema>`, is an identifier too,
/// and a channel name over the limit makes every enqueue fail.
pub const MAX_SCHEMA_BYTES: usize = MAX_IDENTIFIER_BYTES - crate::queue::sql::CHANNEL_PREFIX.len();

/// Whether `name` is a safe SQL identifier for the schema: it is spliced into statements, so only
/// lower-case letters, digits and underscores, starting with a letter or underscore, are allowed,
/// at most [`MAX_SCHEMA_BYTES`] of them.
pub fn is_valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= MAX_SCHEMA_BYTES
}

/// Whether `name` can be a queue name: printable, no commas (the list separator), at most 128 bytes.
pub fn is_valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && c != ',')
}

/// `url` with its password replaced by `***`, for messages and logs.
pub fn redacted_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // userinfo ends at the last '@' before the host part.
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!("{scheme}://{}:***{}", &rest[..colon], &rest[at..]);
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim() == "password" => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The default number of children: one per CPU the process may run on.
fn default_concurrency() -> i64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as i64)
        .unwrap_or(1)
}

impl Config {
    /// Connections the probe process holds: readiness and metrics, the wake-up listener (unless
    /// `FORKQ_LISTEN=0`), the hosts table, and the schedules ticker when there are schedules. A
    /// fleet needs `concurrency` + this many.
    pub fn probe_connections(&self) -> usize {
        2 + usize::from(self.listen) + usize::from(!self.schedules.is_empty())
    }

    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(std::env::vars().collect())
    }

    /// Reads and validates settings from `vars` (the environment, in tests a literal map).
    pub fn from_vars(vars: HashMap<String, String>) -> Result<Config, ConfigError> {
        let v = Vars(&vars);
        // FORKQ_DATABASE_URL wins, so it is the one checked (and named) when both are set.
        let database_url = match (v.url("FORKQ_DATABASE_URL")?, v.url("DATABASE_URL")) {
            (Some(url), _) => url,
            (None, Ok(Some(url))) => url,
            (None, Err(e)) => return Err(e),
            (None, Ok(None)) => {
                return Err(v.error(
                    "DATABASE_URL",
                    "a PostgreSQL URL such as postgres://user@127.0.0.1:5432/db \
                     (set DATABASE_URL or FORKQ_DATABASE_URL)",
                ))
            }
        };
        let pooler = pooler(&v)?;
        let listen_url = v.url("FORKQ_LISTEN_DATABASE_URL")?;
        let listen = listen_setting(&v, pooler, listen_url.is_some())?;
        let listen_database_url = listen_url.unwrap_or_else(|| database_url.clone());
        let host_release = host_release_setting(&v, pooler)?;

        let schema = v.get("FORKQ_SCHEMA").unwrap_or("forkq").to_string();
        if !is_valid_schema_name(&schema) {
            return Err(v.error(
                "FORKQ_SCHEMA",
                format!(
                    "a lower-case identifier: letters, digits and _, starting with a letter or _, \
                     at most {MAX_SCHEMA_BYTES} bytes (the NOTIFY channel forkq_<schema> must fit \
                     PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte identifiers)"
                ),
            ));
        }

        let queues: Vec<String> = v
            .get("FORKQ_QUEUES")
            .unwrap_or("default")
            .split(',')
            .map(|q| q.trim().to_string())
            .collect();
        if queues.iter().any(|q| !is_valid_queue_name(q)) {
            return Err(v.error(
                "FORKQ_QUEUES",
                "a comma-separated list of non-empty queue names (no spaces or control characters, at most 128 bytes each)",
            ));
        }

        let requested = v
            .int("FORKQ_CONCURRENCY", default_concurrency(), 1, i64::MAX)
            .map_err(|_| {
                v.error(
                    "FORKQ_CONCURRENCY",
                    format!("an integer from 1 to {MAX_CONCURRENCY}"),
                )
            })?;
        let concurrency = if requested as usize > MAX_CONCURRENCY {
            log::warn!("FORKQ_CONCURRENCY={requested} is above the limit; using {MAX_CONCURRENCY}");
            MAX_CONCURRENCY
        } else {
            requested as usize
        };

        let durable = v.flag("FORKQ_DURABLE", false)?;
        let mut prefetch = v.int("FORKQ_PREFETCH", 100, 1, 1000)? as usize;
        let mut ack_delay = v.millis("FORKQ_ACK_DELAY_MS", 5, 0, 10_000)?;
        if durable && (prefetch != 1 || !ack_delay.is_zero()) {
            log::info!("FORKQ_DURABLE=1: using FORKQ_PREFETCH=1 and FORKQ_ACK_DELAY_MS=0");
            prefetch = 1;
            ack_delay = Duration::ZERO;
        }

        let lease = v.seconds("FORKQ_LEASE_SECONDS", 30, 4, 86_400)?;
        let retry_backoff_base = v.seconds("FORKQ_RETRY_BACKOFF_BASE_SECONDS", 2, 0, 86_400)?;
        let retry_backoff_max =
            v.seconds("FORKQ_RETRY_BACKOFF_MAX_SECONDS", 3_600, 0, 30 * 86_400)?;
        if retry_backoff_max < retry_backoff_base {
            return Err(v.error(
                "FORKQ_RETRY_BACKOFF_MAX_SECONDS",
                "a value not below FORKQ_RETRY_BACKOFF_BASE_SECONDS",
            ));
        }

        let handler = match v.get("FORKQ_HANDLER") {
            None => HandlerSpec::Builtin,
            Some(raw) => HandlerSpec::parse(raw).map_err(|why| v.error("FORKQ_HANDLER", why))?,
        };
        let routes = match v.get("FORKQ_ROUTES") {
            None => Vec::new(),
            Some(raw) => parse_routes(raw).map_err(|why| v.error("FORKQ_ROUTES", why))?,
        };

        let health_addr = health_addr(&v)?;
        let max_attempts = v.int("FORKQ_MAX_ATTEMPTS", 25, 1, 1000)? as i32;
        let schedules_file = v.get("FORKQ_SCHEDULES").map(std::path::PathBuf::from);
        let schedules = match &schedules_file {
            None => Vec::new(),
            Some(path) => schedule::load(path, max_attempts).map_err(|why| {
                v.error(
                    "FORKQ_SCHEDULES",
                    format!("{why}; fix the file or unset FORKQ_SCHEDULES"),
                )
            })?,
        };

        let job_timeout = v.optional_limit("FORKQ_JOB_TIMEOUT_SECONDS", 7 * 86_400)?;
        let health_stale = health_stale(&v, lease)?;

        let restart_backoff_base = v.millis("FORKQ_RESTART_BACKOFF_BASE_MS", 100, 0, 60_000)?;
        let restart_backoff_max = v.millis("FORKQ_RESTART_BACKOFF_MAX_MS", 30_000, 0, 3_600_000)?;
        if restart_backoff_max < restart_backoff_base {
            return Err(v.error(
                "FORKQ_RESTART_BACKOFF_MAX_MS",
                "a value not below FORKQ_RESTART_BACKOFF_BASE_MS",
            ));
        }

        Ok(Config {
            database_url,
            schema,
            queues,
            concurrency,
            prefetch,
            claimers: v.int("FORKQ_CLAIMERS", 2 * default_concurrency(), 0, 1000)? as usize,
            ack_delay,
            durable,
            lease,
            max_attempts,
            retry_backoff_base,
            retry_backoff_max,
            poll_interval: v.millis("FORKQ_POLL_INTERVAL_MS", 1000, 10, 60_000)?,
            listen,
            listen_database_url,
            pooler,
            max_payload_bytes: v.int("FORKQ_MAX_PAYLOAD_BYTES", 1 << 20, 2, 64 << 20)? as usize,
            retention: v.seconds("FORKQ_RETENTION_SECONDS", 86_400, 0, 3_650 * 86_400)?,
            handler,
            routes,
            demo_tasks: v.flag("FORKQ_DEMO_TASKS", false)?,
            handler_pass_env: v
                .get("FORKQ_HANDLER_PASS_ENV")
                .map(|raw| {
                    raw.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            max_result_bytes: v.int("FORKQ_MAX_RESULT_BYTES", 1 << 20, 1024, 64 << 20)? as usize,
            job_timeout: job_timeout.map(Duration::from_secs),
            cancel_grace: v.seconds("FORKQ_CANCEL_GRACE_SECONDS", 5, 0, 3_600)?,
            health_addr,
            health_stale,
            crash_loop_threshold: v.int("FORKQ_CRASH_LOOP_THRESHOLD", 3, 1, 1000)? as u32,
            healthy_uptime: v.seconds("FORKQ_HEALTHY_UPTIME_SECONDS", 10, 1, 86_400)?,
            crash_loop_exit: v.flag("FORKQ_CRASH_LOOP_EXIT", false)?,
            restart_backoff_base,
            restart_backoff_max,
            max_jobs_per_child: v.optional_limit("FORKQ_MAX_JOBS_PER_CHILD", i64::MAX)?,
            max_child_rss_mb: v.optional_limit("FORKQ_MAX_CHILD_RSS_MB", 1 << 20)?,
            shutdown_grace: v.seconds("FORKQ_SHUTDOWN_GRACE_SECONDS", 30, 0, 86_400)?,
            schedules_file,
            schedules,
            host_interval: v.seconds("FORKQ_HOST_INTERVAL_SECONDS", 5, 1, 3_600)?,
            host_release,
        })
    }

    /// The handler for `task`: its route, or the default handler.
    pub fn handler_for(&self, task: &str) -> &HandlerSpec {
        self.routes
            .iter()
            .find(|(name, _)| name == task)
            .map(|(_, spec)| spec)
            .unwrap_or(&self.handler)
    }
}

/// `FORKQ_POOLER`: `none` (the default) or `transaction`.
fn pooler(v: &Vars<'_>) -> Result<Pooler, ConfigError> {
    match v
        .get("FORKQ_POOLER")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("none") => Ok(Pooler::None),
        Some("transaction") => Ok(Pooler::Transaction),
        Some(_) => Err(v.error(
            "FORKQ_POOLER",
            "none (direct connections, or a pooler in session mode) or transaction (PgBouncer or \
             another pooler in transaction mode; see docs/pooler.md)",
        )),
    }
}

/// `FORKQ_LISTEN`: on by default, except behind a transaction-mode pooler without a direct
/// connection for the listener, where LISTEN would receive nothing; asking for it there is an
/// error rather than a fleet that silently falls back to polling.
fn listen_setting(
    v: &Vars<'_>,
    pooler: Pooler,
    direct_listener: bool,
) -> Result<bool, ConfigError> {
    let usable = pooler == Pooler::None || direct_listener;
    let listen = v.flag("FORKQ_LISTEN", usable)?;
    if listen && !usable {
        return Err(v.error(
            "FORKQ_LISTEN",
            "0 behind a pooler in transaction mode (FORKQ_POOLER=transaction), where LISTEN \
             receives nothing; or set FORKQ_LISTEN_DATABASE_URL to a direct connection for the \
             wake-up listener",
        ));
    }
    Ok(listen)
}

/// `FORKQ_HOST_RELEASE`: on by default, except behind a transaction-mode pooler, which drops
/// session advisory locks between transactions; asking for it there is an error.
fn host_release_setting(v: &Vars<'_>, pooler: Pooler) -> Result<bool, ConfigError> {
    let usable = pooler == Pooler::None;
    let release = v.flag("FORKQ_HOST_RELEASE", usable)?;
    if release && !usable {
        return Err(v.error(
            "FORKQ_HOST_RELEASE",
            "0 behind a pooler in transaction mode (FORKQ_POOLER=transaction): it needs a \
             session advisory lock on every connection, which such a pooler does not keep; the \
             jobs of a dead host then come back when their leases expire",
        ));
    }
    Ok(release)
}

/// The stale window when `FORKQ_HEALTH_STALE_SECONDS` is not set (and the lease allows it).
const DEFAULT_HEALTH_STALE_SECONDS: i64 = 15;

/// `FORKQ_HEALTH_STALE_SECONDS`, which must stay below two thirds of the lease: a child renews its
/// leases every third of the lease, so a wedged child's leases lapse two thirds of a lease after
/// its last heartbeat, and it must be dead by then or its job can run twice at the same time.
/// Unset, the default is lowered to fit a short lease (and that is logged); set, a value that does
/// not fit is refused. A lease of 4 s, the shortest, fits a stale window of 2 s, the shortest.
fn health_stale(v: &Vars<'_>, lease: Duration) -> Result<Duration, ConfigError> {
    let lease_seconds = lease.as_secs() as i64;
    // The largest whole number of seconds strictly below two thirds of the lease.
    let fits = (2 * lease_seconds - 1) / 3;
    let stale = match v.get("FORKQ_HEALTH_STALE_SECONDS") {
        None => {
            let stale = DEFAULT_HEALTH_STALE_SECONDS.min(fits);
            if stale < DEFAULT_HEALTH_STALE_SECONDS {
                log::info!(
                    "FORKQ_HEALTH_STALE_SECONDS unset: using {stale} s, below two thirds of \
                     FORKQ_LEASE_SECONDS={lease_seconds}"
                );
            }
            stale
        }
        Some(_) => {
            let stale = v.int(
                "FORKQ_HEALTH_STALE_SECONDS",
                DEFAULT_HEALTH_STALE_SECONDS,
                2,
                86_400,
            )?;
            if stale > fits {
                return Err(v.error(
                    "FORKQ_HEALTH_STALE_SECONDS",
                    format!(
                        "an integer from 2 to {fits}: below two thirds of \
                         FORKQ_LEASE_SECONDS={lease_seconds}, so that a wedged child is killed \
                         before its leases lapse and its job runs twice (or raise the lease)"
                    ),
                ));
            }
            stale
        }
    };
    Ok(Duration::from_secs(stale as u64))
}

/// `FORKQ_HEALTH_ADDR`, or 0.0.0.0:9280.
fn health_addr(v: &Vars<'_>) -> Result<SocketAddr, ConfigError> {
    match v.get("FORKQ_HEALTH_ADDR") {
        None => Ok(SocketAddr::from(([0, 0, 0, 0], 9280))),
        Some(raw) => raw.parse().map_err(|_| {
            v.error(
                "FORKQ_HEALTH_ADDR",
                "an IP address and port such as 0.0.0.0:9280 or 127.0.0.1:0 (port 0 picks a free port)",
            )
        }),
    }
}

/// The probe's address from the environment alone, for `forkq health`, which must work where
/// the rest of the configuration (the database URL, say) is absent.
pub fn health_addr_from_env() -> Result<SocketAddr, ConfigError> {
    health_addr(&Vars(&std::env::vars().collect()))
}

/// The settings only `forkq dashboard` reads.
#[derive(Clone)]
pub struct DashboardSettings {
    /// Where the dashboard listens (`FORKQ_DASHBOARD_ADDR`).
    pub addr: SocketAddr,
    /// The token that allows actions (`FORKQ_DASHBOARD_TOKEN`); read-only without it.
    pub token: Option<String>,
}

impl fmt::Debug for DashboardSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardSettings")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl DashboardSettings {
    /// Reads and validates the dashboard's settings from the process environment.
    pub fn from_env() -> Result<DashboardSettings, ConfigError> {
        DashboardSettings::from_vars(&std::env::vars().collect())
    }

    /// Reads and validates the dashboard's settings from `vars`.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<DashboardSettings, ConfigError> {
        let v = Vars(vars);
        let addr = match v.get("FORKQ_DASHBOARD_ADDR") {
            None => SocketAddr::from(([127, 0, 0, 1], 9281)),
            Some(raw) => raw.parse().map_err(|_| {
                v.error(
                    "FORKQ_DASHBOARD_ADDR",
                    "an IP address and port such as 127.0.0.1:9281 (port 0 picks a free port)",
                )
            })?,
        };
        let token = v.get("FORKQ_DASHBOARD_TOKEN").map(str::to_string);
        if let Some(t) = &token {
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(v.error(
                    "FORKQ_DASHBOARD_TOKEN",
                    "at least 16 characters without spaces, e.g. the output of `openssl rand -hex 16`",
                )
                .hide_value());
            }
        }
        Ok(DashboardSettings { addr, token })
    }
}

impl ConfigError {
    /// The same error without the value, for secrets.
    fn hide_value(mut self) -> ConfigError {
        self.value = "(hidden)".into();
        self
    }
}

/// Parses `task=handler;task=handler`.
fn parse_routes(raw: &str) -> Result<Vec<(String, HandlerSpec)>, String> {
    let mut routes = Vec::new();
    for entry in raw.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (task, spec) = entry.split_once('=').ok_or_else(|| {
            format!("entries of the form task=handler separated by ';' (got {entry:?})")
        })?;
        let task = task.trim();
        if task.is_empty() {
            return Err(format!("a task name before '=' (got {entry:?})"));
        }
        let spec =
            HandlerSpec::parse(spec.trim()).map_err(|why| format!("route {task:?}: {why}"))?;
        routes.push((task.to_string(), spec));
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.entry("DATABASE_URL".into())
            .or_insert_with(|| "postgres://u@127.0.0.1/db".into());
        Config::from_vars(vars)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.schema, "forkq");
        assert_eq!(c.queues, vec!["default"]);
        assert_eq!(c.prefetch, 100);
        assert_eq!(c.lease, Duration::from_secs(30));
        assert_eq!(c.max_payload_bytes, 1 << 20);
        assert!(c.listen);
        assert_eq!(c.handler, HandlerSpec::Builtin);
    }

    #[test]
    fn forkq_database_url_wins() {
        let c = parse(&[("FORKQ_DATABASE_URL", "postgres://other@127.0.0.1/x")]).unwrap();
        assert_eq!(c.database_url, "postgres://other@127.0.0.1/x");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("FORKQ_PREFETCH", "0"),
            ("FORKQ_PREFETCH", "ten"),
            ("FORKQ_SCHEMA", "bad\"name"),
            ("FORKQ_SCHEMA", "Upper"),
            ("FORKQ_QUEUES", "a,,b"),
            ("FORKQ_LISTEN", "maybe"),
            ("FORKQ_HANDLER", "ftp:/x"),
            ("FORKQ_HEALTH_ADDR", "nowhere"),
            ("FORKQ_CONCURRENCY", "0"),
            ("FORKQ_LEASE_SECONDS", "1"),
            ("FORKQ_MAX_RESULT_BYTES", "10"),
        ] {
            let err = parse(&[(name, value)]).unwrap_err();
            assert_eq!(err.variable, name, "{value}");
            assert_eq!(err.value, value);
            assert!(err.to_string().contains(name));
        }
    }

    #[test]
    fn schema_names_leave_room_for_the_notify_channel() {
        let longest = "s".repeat(MAX_SCHEMA_BYTES);
        assert!(is_valid_schema_name(&longest));
        assert_eq!(
            crate::queue::sql::channel(&longest).len(),
            MAX_IDENTIFIER_BYTES
        );
        let err = parse(&[("FORKQ_SCHEMA", &format!("{longest}s"))]).unwrap_err();
        assert_eq!(err.variable, "FORKQ_SCHEMA");
        assert!(err.allowed.contains("at most 57 bytes"), "{err}");
    }

    #[test]
    fn the_stale_window_stays_below_two_thirds_of_the_lease() {
        let stale = |pairs: &[(&str, &str)]| parse(pairs).map(|c| c.health_stale.as_secs());
        assert_eq!(stale(&[]), Ok(15));
        assert_eq!(stale(&[("FORKQ_LEASE_SECONDS", "60")]), Ok(15));
        // Unset, it is lowered to fit a short lease.
        assert_eq!(stale(&[("FORKQ_LEASE_SECONDS", "10")]), Ok(6));
        assert_eq!(stale(&[("FORKQ_LEASE_SECONDS", "4")]), Ok(2));
        // Set, it must fit.
        assert_eq!(
            stale(&[
                ("FORKQ_LEASE_SECONDS", "60"),
                ("FORKQ_HEALTH_STALE_SECONDS", "39")
            ]),
            Ok(39)
        );
        for (lease, stale) in [("60", "40"), ("30", "20"), ("10", "7")] {
            let err = parse(&[
                ("FORKQ_LEASE_SECONDS", lease),
                ("FORKQ_HEALTH_STALE_SECONDS", stale),
            ])
            .unwrap_err();
            assert_eq!(err.variable, "FORKQ_HEALTH_STALE_SECONDS");
            assert!(err.allowed.contains("FORKQ_LEASE_SECONDS"), "{err}");
        }
        assert_eq!(
            parse(&[("FORKQ_LEASE_SECONDS", "3")]).unwrap_err().variable,
            "FORKQ_LEASE_SECONDS"
        );
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted_url("postgres://app:s3cr@t@db:5432/x?sslmode=off"),
            "postgres://app:***@db:5432/x?sslmode=off"
        );
        assert_eq!(redacted_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redacted_url("host=db user=app password=hunter2"),
            "host=db user=app password=***"
        );
    }

    #[test]
    fn concurrency_is_clamped() {
        assert_eq!(
            parse(&[("FORKQ_CONCURRENCY", "100000")])
                .unwrap()
                .concurrency,
            MAX_CONCURRENCY
        );
    }

    #[test]
    fn durable_forces_prefetch_one() {
        let c = parse(&[("FORKQ_DURABLE", "1"), ("FORKQ_PREFETCH", "50")]).unwrap();
        assert_eq!((c.prefetch, c.ack_delay), (1, Duration::ZERO));
    }

    #[test]
    fn missing_database_url_is_an_error() {
        let err = Config::from_vars(HashMap::new()).unwrap_err();
        assert_eq!(err.variable, "DATABASE_URL");
    }

    #[test]
    fn a_transaction_pooler_turns_off_what_needs_a_session() {
        let c = parse(&[("FORKQ_POOLER", "transaction")]).unwrap();
        assert_eq!(c.pooler, Pooler::Transaction);
        assert!(!c.listen && !c.host_release);
        assert_eq!(c.listen_database_url, c.database_url);
        let direct = "postgres://u@10.0.0.5:5432/db";
        let c = parse(&[
            ("FORKQ_POOLER", "transaction"),
            ("FORKQ_LISTEN_DATABASE_URL", direct),
        ])
        .unwrap();
        assert!(c.listen && !c.host_release);
        assert_eq!(c.listen_database_url, direct);
        let c = parse(&[]).unwrap();
        assert_eq!(c.pooler, Pooler::None);
        assert!(c.listen && c.host_release);
    }

    #[test]
    fn session_features_asked_for_behind_a_transaction_pooler_are_refused() {
        for (name, value) in [("FORKQ_LISTEN", "1"), ("FORKQ_HOST_RELEASE", "on")] {
            let err = parse(&[("FORKQ_POOLER", "transaction"), (name, value)]).unwrap_err();
            assert_eq!(err.variable, name);
            assert!(err.allowed.contains("FORKQ_POOLER=transaction"), "{err}");
        }
        let err = parse(&[("FORKQ_POOLER", "statement")]).unwrap_err();
        assert_eq!(err.variable, "FORKQ_POOLER");
        let err = parse(&[("FORKQ_LISTEN_DATABASE_URL", "db:5432")]).unwrap_err();
        assert_eq!(err.variable, "FORKQ_LISTEN_DATABASE_URL");
    }

    #[test]
    fn routes_pick_handlers() {
        let c = parse(&[(
            "FORKQ_ROUTES",
            "resize=exec:/usr/bin/resize --fast;mail=coproc:/srv/mailer",
        )])
        .unwrap();
        assert!(
            matches!(c.handler_for("resize"), HandlerSpec::Exec(argv) if argv == &["/usr/bin/resize", "--fast"])
        );
        assert!(matches!(c.handler_for("mail"), HandlerSpec::Coproc(_)));
        assert_eq!(c.handler_for("other"), &HandlerSpec::Builtin);
        assert_eq!(
            parse(&[("FORKQ_ROUTES", "nohandler")])
                .unwrap_err()
                .variable,
            "FORKQ_ROUTES"
        );
    }
}
