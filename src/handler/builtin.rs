//! The builtin tasks, for tests, demos and benchmarks.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Handler, Job, JobContext, Outcome};
use crate::config::Config;

/// The builtin tasks that can harm the worker running them, answered only with
/// `FORKQ_DEMO_TASKS=1`: anyone who can enqueue could otherwise crash or wedge workers, or read
/// their environment (the database password included) into a job's stored result.
pub const DEMO_TASKS: [&str; 3] = ["crash", "spin", "getenv"];

/// `noop` succeeds at once, `sleep` waits `payload.ms` milliseconds, `fail` always fails. With
/// `FORKQ_DEMO_TASKS=1` also: `crash` aborts the whole child process (to exercise crash
/// recovery), `spin` loops forever without reporting progress (a wedged handler, to exercise the
/// stale-heartbeat kill), `getenv` returns `{"value": ...}` for the environment variable
/// `payload.name` as the worker sees it (null when unset; to check what reaches handlers). Any
/// other task, and a demo task while they are off, fails for good with an error saying why.
#[derive(Debug, Default)]
pub struct Builtin {
    demo_tasks: bool,
}

impl Builtin {
    /// The builtin tasks as `config` allows them (`FORKQ_DEMO_TASKS`).
    pub fn new(config: &Config) -> Builtin {
        Builtin {
            demo_tasks: config.demo_tasks,
        }
    }
}

impl Handler for Builtin {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        match &*job.task {
            demo if !self.demo_tasks && DEMO_TASKS.contains(&demo) => Outcome::Fatal(format!(
                "the builtin task {demo} is a demo task, off unless FORKQ_DEMO_TASKS=1 (it can \
                 crash or wedge a worker, or read its environment)"
            )),
            "noop" => Outcome::Success(Value::Null),
            "sleep" => {
                let ms = job.payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
                sleep_with_heartbeats(Duration::from_millis(ms), ctx)
            }
            "fail" => Outcome::Failure(
                job.payload
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the builtin fail task always fails")
                    .to_string(),
            ),
            "crash" => std::process::abort(),
            "spin" => loop {
                std::hint::spin_loop();
            },
            "getenv" => {
                let name = job
                    .payload
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                Outcome::Success(serde_json::json!({ "value": std::env::var(name).ok() }))
            }
            other => Outcome::Fatal(format!("no handler for task {other}")),
        }
    }
}

/// Sleeps in slices so the heartbeat and lease renewal keep going during a long sleep.
fn sleep_with_heartbeats(total: Duration, ctx: &mut dyn JobContext) -> Outcome {
    let deadline = Instant::now() + total;
    loop {
        if Instant::now() >= deadline {
            return Outcome::Success(Value::Null);
        }
        if !ctx.heartbeat() {
            if ctx.cancelled() {
                return Outcome::Failure("cancelled while it slept".into());
            }
            return Outcome::Retry("interrupted by an immediate shutdown".into());
        }
        // What is left after the heartbeat (which may have waited on the database).
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}
