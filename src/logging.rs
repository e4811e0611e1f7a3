//! Who is speaking: every log line names the process's role (supervisor, probe, child N, ...), its
//! pid and, while a child runs a job, the job; `ps` shows the same (see [`crate::proctitle`]).
//!
//! The log goes to stderr as text, or with `FORKQ_LOG_FORMAT=json` as one JSON object per line
//! for log shippers. `FORKQ_LOG` filters it (env_logger syntax). Writing a line is a call on the
//! logging process's own thread: no logger thread, so the supervisor stays safe to fork.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicUsize, Ordering};

use serde::Serialize;

use crate::config::ConfigError;
use crate::proctitle;

/// What a process of the fleet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A `forkq` command other than `run` (and any process before it takes a role).
    Cli,
    /// The supervisor of `forkq run`.
    Supervisor,
    /// The probe: HTTP endpoints and the wake-up listener.
    Probe,
    /// The consumer child in this slot.
    Child(usize),
    /// The short-lived process that checks the database before the first fork.
    Preflight,
    /// The short-lived process that hands back the jobs of children killed at shutdown.
    Releaser,
}

impl Role {
    /// The role's name in JSON logs (the slot is a field of its own).
    fn name(self) -> &'static str {
        match self {
            Role::Cli => "cli",
            Role::Supervisor => "supervisor",
            Role::Probe => "probe",
            Role::Child(_) => "child",
            Role::Preflight => "preflight",
            Role::Releaser => "releaser",
        }
    }

    fn slot(self) -> Option<usize> {
        match self {
            Role::Child(slot) => Some(slot),
            _ => None,
        }
    }

    fn encode(self) -> (u8, usize) {
        let kind = match self {
            Role::Cli => 0,
            Role::Supervisor => 1,
            Role::Probe => 2,
            Role::Child(_) => 3,
            Role::Preflight => 4,
            Role::Releaser => 5,
        };
        (kind, self.slot().unwrap_or(0))
    }

    fn decode(kind: u8, slot: usize) -> Role {
        match kind {
            1 => Role::Supervisor,
            2 => Role::Probe,
            3 => Role::Child(slot),
            4 => Role::Preflight,
            5 => Role::Releaser,
            _ => Role::Cli,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.slot() {
            Some(slot) => write!(f, "child {slot}"),
            None => f.write_str(self.name()),
        }
    }
}

/// What a child is doing, for `ps` and, while it runs a job, for its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Nothing worth showing: starting, claiming, acknowledging.
    Busy,
    /// Waiting for work.
    Idle,
    /// Running this job.
    Job(i64),
    /// Waiting for the database to come back.
    WaitingForDatabase,
}

// The process's context: plain atomics, because the probe logs from several threads and a forked
// process must find them consistent whatever its parent was doing.
static ROLE_KIND: AtomicU8 = AtomicU8::new(0);
static ROLE_SLOT: AtomicUsize = AtomicUsize::new(0);
/// 0 busy, 1 idle, 2 job, 3 waiting for the database.
static ACTIVITY: AtomicU8 = AtomicU8::new(0);
static JOB: AtomicI64 = AtomicI64::new(0);

/// This process's role.
pub fn role() -> Role {
    Role::decode(
        ROLE_KIND.load(Ordering::Relaxed),
        ROLE_SLOT.load(Ordering::Relaxed),
    )
}

/// Takes `role` for the rest of this process's life (a forked process takes its own) and shows it
/// in `ps` as `forkq: ROLE`.
pub fn set_role(role: Role) {
    let (kind, slot) = role.encode();
    ROLE_KIND.store(kind, Ordering::Relaxed);
    ROLE_SLOT.store(slot, Ordering::Relaxed);
    ACTIVITY.store(0, Ordering::Relaxed);
    JOB.store(0, Ordering::Relaxed);
    // The supervisor keeps its program's own short name, which is what `pgrep -x`, `killall` and
    // service managers look for ("forkq: supervisor" would be cut to 15 bytes anyway).
    if role != Role::Supervisor {
        proctitle::set_name(&format!("forkq: {role}"));
    }
    show(role, Activity::Busy);
}

fn current_activity() -> Activity {
    match ACTIVITY.load(Ordering::Relaxed) {
        1 => Activity::Idle,
        2 => Activity::Job(JOB.load(Ordering::Relaxed)),
        3 => Activity::WaitingForDatabase,
        _ => Activity::Busy,
    }
}

fn store_activity(activity: Activity) {
    let (code, job) = match activity {
        Activity::Busy => (0, 0),
        Activity::Idle => (1, 0),
        Activity::Job(id) => (2, id),
        Activity::WaitingForDatabase => (3, 0),
    };
    JOB.store(job, Ordering::Relaxed);
    ACTIVITY.store(code, Ordering::Relaxed);
}

/// Writes the process title for `role` doing `activity` (no allocation: it runs per job).
fn show(role: Role, activity: Activity) {
    match activity {
        Activity::Busy => proctitle::set(format_args!("forkq: {role}")),
        Activity::Idle => proctitle::set(format_args!("forkq: {role} idle")),
        Activity::Job(id) => proctitle::set(format_args!("forkq: {role} job {id}")),
        Activity::WaitingForDatabase => {
            proctitle::set(format_args!("forkq: {role} waiting for the database"))
        }
    }
}

/// Marks this process as doing `activity` until the guard drops, which restores what it was
/// doing before (activities nest: a job that waits for the database goes back to the job).
#[must_use = "the activity ends when the guard drops"]
pub fn activity(activity: Activity) -> ActivityGuard {
    let previous = current_activity();
    store_activity(activity);
    show(role(), activity);
    ActivityGuard { previous }
}

/// Restores the previous activity when dropped; see [`activity`].
pub struct ActivityGuard {
    previous: Activity,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        store_activity(self.previous);
        show(role(), self.previous);
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-11-30T09:00:00.123Z  INFO child 3 [4711] message`
    Text,
    /// One JSON object per line: timestamp, level, role, pid, slot, job, target, message.
    Json,
}

impl LogFormat {
    /// Parses `FORKQ_LOG_FORMAT` (empty means text).
    pub fn parse(value: &str) -> Result<LogFormat, ConfigError> {
        match value.trim() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(ConfigError {
                variable: "FORKQ_LOG_FORMAT".into(),
                value: other.into(),
                allowed: "text (the default) or json (one JSON object per line)".into(),
            }),
        }
    }
}

/// One line of the JSON log, its fields in this order.
#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: String,
    level: String,
    role: &'static str,
    pid: u32,
    /// The child's slot; null for other roles.
    slot: Option<usize>,
    /// The job a child is running; null between jobs.
    job: Option<i64>,
    /// The Rust module that logged.
    target: &'a str,
    message: String,
}

/// Installs the logger: `FORKQ_LOG` filters (default `info`), `FORKQ_LOG_FORMAT` picks text or
/// JSON. A bad format is a configuration error (exit 78); a second call changes nothing.
pub fn init() -> Result<(), ConfigError> {
    let format = LogFormat::parse(&std::env::var("FORKQ_LOG_FORMAT").unwrap_or_default())?;
    let filter = std::env::var("FORKQ_LOG").unwrap_or_else(|_| "info".into());
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format(move |buf, record| {
            let role = role();
            let pid = std::process::id();
            let timestamp = buf.timestamp_millis();
            match format {
                LogFormat::Text => writeln!(
                    buf,
                    "{timestamp} {:>5} {role} [{pid}] {}",
                    record.level(),
                    record.args()
                ),
                LogFormat::Json => {
                    let line = JsonLine {
                        timestamp: timestamp.to_string(),
                        level: record.level().as_str().to_ascii_lowercase(),
                        role: role.name(),
                        pid,
                        slot: role.slot(),
                        job: match current_activity() {
                            Activity::Job(id) => Some(id),
                            _ => None,
                        },
                        target: record.target(),
                        message: record.args().to_string(),
                    };
                    serde_json::to_writer(&mut *buf, &line)?;
                    writeln!(buf)
                }
            }
        })
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_read_as_words() {
        for role in [
            Role::Cli,
            Role::Supervisor,
            Role::Probe,
            Role::Child(0),
            Role::Child(255),
            Role::Preflight,
            Role::Releaser,
        ] {
            let (kind, slot) = role.encode();
            assert_eq!(Role::decode(kind, slot), role);
        }
        assert_eq!(Role::Child(3).to_string(), "child 3");
        assert_eq!(Role::Supervisor.to_string(), "supervisor");
    }

    #[test]
    fn log_format_accepts_text_and_json_only() {
        assert_eq!(LogFormat::parse("").unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::parse("json").unwrap(), LogFormat::Json);
        let e = LogFormat::parse("yaml").unwrap_err();
        assert_eq!(e.variable, "FORKQ_LOG_FORMAT");
    }
}
