//! Handlers: what runs a claimed job.
//!
//! The consumer loop hands each job to a [`Handler`] and gets an [`Outcome`] back. A child builds its
//! handlers after the fork, so a handler may hold processes, sockets or threads of its own.

pub mod builtin;
pub mod coproc;
pub mod exec;
pub mod process;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// A claimed job as a handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's id.
    pub id: i64,
    /// The queue it was claimed from (shared with the other jobs of its queue a worker claims).
    pub queue: Arc<str>,
    /// The task name, which picks the handler (shared likewise).
    pub task: Arc<str>,
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
    /// Run again after this delay, without charging an attempt or recording an error (the job
    /// is waiting for something: a slot at a provider, a file that is not there yet).
    Snooze(Duration),
}

/// How an outcome reads in a log line.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Success(_) => f.write_str("succeeded"),
            Outcome::Failure(why) => write!(f, "failed: {why}"),
            Outcome::Fatal(why) => write!(f, "failed for good: {why}"),
            Outcome::Retry(why) => write!(f, "to be retried: {why}"),
            Outcome::Snooze(delay) => write!(f, "snoozed for {delay:.1?}"),
        }
    }
}

/// What a running handler can ask of the child that runs it.
pub trait JobContext {
    /// Shows the worker is alive: refreshes the slot heartbeat and renews leases when they are
    /// due. Call it at least every few seconds during long work. Returns false when the handler
    /// should stop: the job was cancelled (see [`JobContext::cancelled`]) or the child was asked
    /// to stop at once. A job that stops after a cancel ends `cancelled` whatever it returns
    /// (unless it returns success).
    fn heartbeat(&mut self) -> bool;
    /// The hard limit on this job's run time, if one is configured (the job's own timeout, else
    /// `FORKQ_JOB_TIMEOUT_SECONDS`).
    fn timeout(&self) -> Option<Duration>;
    /// Says that the job now runs in process group `pgid` (a handler program leading its own
    /// group), so that if this worker dies, that whole group is killed before the job can run
    /// again anywhere. The worker forgets it when the handler returns.
    fn runs_in_process_group(&mut self, pgid: u32) {
        let _ = pgid;
    }
    /// Whether this job's cancel was requested (`forkq cancel`, a batch cancel or fail-fast)
    /// while it runs; known within about one heartbeat.
    fn cancelled(&self) -> bool {
        false
    }
    /// Reports how far the job is, as a small JSON value (`forkq job ID` shows the latest and
    /// when it came). Cheap to call often: the worker writes at most one value a second per job
    /// (the latest wins) and the last one when the job ends.
    fn progress(&mut self, _value: Value) {}
}

/// Runs jobs. One instance lives in one child and sees one job at a time.
pub trait Handler {
    /// Runs `job` to an outcome. Panics are caught and count as failures.
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome;
}

/// The handler named by `FORKQ_HANDLER` or a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HandlerSpec {
    /// The builtin tasks `noop`, `sleep`, `fail` (and the demo tasks with `FORKQ_DEMO_TASKS=1`).
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

/// Dispatches each job to the handler of its task: its `FORKQ_ROUTES` entry, else the default
/// handler (`FORKQ_HANDLER`; when that is `builtin`, the handler compiled into the program:
/// forkq's builtin tasks for the `forkq` binary, your own for a program calling [`crate::run`]).
///
/// Handlers are built per child, after the fork, on the first job that needs them; routes naming
/// the same handler share one instance (so one coproc serves all the tasks routed to it).
pub struct Router {
    routes: HashMap<String, HandlerSpec>,
    default: HandlerSpec,
    handlers: HashMap<HandlerSpec, Box<dyn Handler>>,
    config: crate::config::Config,
}

impl Router {
    /// Builds the router of one child. `compiled_in` makes the handler that `builtin` stands
    /// for; it is called only when `FORKQ_HANDLER` is `builtin` (the default).
    pub fn new(
        config: &crate::config::Config,
        compiled_in: impl FnOnce() -> Box<dyn Handler>,
    ) -> Router {
        let mut handlers = HashMap::new();
        if config.handler == HandlerSpec::Builtin {
            handlers.insert(HandlerSpec::Builtin, compiled_in());
        }
        Router {
            routes: config.routes.iter().cloned().collect(),
            default: config.handler.clone(),
            handlers,
            config: config.clone(),
        }
    }
}

/// A fresh handler for `spec`.
fn build(spec: &HandlerSpec, config: &crate::config::Config) -> Box<dyn Handler> {
    match spec {
        HandlerSpec::Builtin => Box::new(builtin::Builtin::new(config)),
        HandlerSpec::Exec(argv) => Box::new(exec::Exec::new(argv.clone(), config)),
        HandlerSpec::Coproc(argv) => Box::new(coproc::Coproc::new(argv.clone(), config)),
    }
}

impl Handler for Router {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        let spec = self.routes.get(&*job.task).unwrap_or(&self.default);
        if !self.handlers.contains_key(spec) {
            self.handlers
                .insert(spec.clone(), build(spec, &self.config));
        }
        let handler = self.handlers.get_mut(spec).expect("inserted above");
        // The worker makes every outcome storable (see child::Worker::run_job).
        handler.handle(job, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    struct Ctx;

    impl JobContext for Ctx {
        fn heartbeat(&mut self) -> bool {
            true
        }
        fn timeout(&self) -> Option<Duration> {
            None
        }
    }

    /// A library handler that answers with its name.
    struct Named(&'static str);

    impl Handler for Named {
        fn handle(&mut self, _job: &Job, _ctx: &mut dyn JobContext) -> Outcome {
            Outcome::Success(Value::from(self.0))
        }
    }

    fn config(vars: &[(&str, &str)]) -> Config {
        let mut map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.insert("DATABASE_URL".into(), "postgres://u@127.0.0.1/db".into());
        Config::from_vars(map).unwrap()
    }

    fn job(task: &str, payload: Value) -> Job {
        Job {
            id: 1,
            queue: "default".into(),
            task: task.into(),
            payload,
            attempt: 1,
            max_attempts: 3,
            batch_id: None,
        }
    }

    #[test]
    fn the_library_handler_is_the_default_and_routes_win() {
        let config = config(&[("FORKQ_ROUTES", "echo=exec:/bin/cat")]);
        let mut router = Router::new(&config, || Box::new(Named("mine")));
        assert_eq!(
            router.handle(&job("anything", Value::Null), &mut Ctx),
            Outcome::Success(Value::from("mine"))
        );
        assert_eq!(
            router.handle(&job("echo", Value::from("hi")), &mut Ctx),
            Outcome::Success(Value::from("hi"))
        );
    }

    #[test]
    fn a_program_handler_replaces_the_library_default() {
        let config = config(&[("FORKQ_HANDLER", "exec:/bin/cat")]);
        let mut router = Router::new(&config, || panic!("not asked for"));
        assert_eq!(
            router.handle(&job("anything", Value::from(7)), &mut Ctx),
            Outcome::Success(Value::from(7))
        );
    }
}
