//! The builtin tasks, for tests, demos and benchmarks.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Handler, Job, JobContext, Outcome};

/// `noop` succeeds at once, `sleep` waits `payload.ms` milliseconds, `fail` always fails, `crash`
/// aborts the whole child process (to exercise crash recovery), `spin` loops forever without
/// reporting progress (a wedged handler, to exercise the stale-heartbeat kill), `getenv` returns
/// `{"value": ...}` for the environment variable `payload.name` as the worker sees it (null when
/// unset; to check what reaches handlers). Any other task fails for good with
/// "no handler for task X".
#[derive(Debug, Default)]
pub struct Builtin;

impl Handler for Builtin {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        match job.task.as_str() {
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
        let now = Instant::now();
        if now >= deadline {
            return Outcome::Success(Value::Null);
        }
        if !ctx.heartbeat() {
            if ctx.cancelled() {
                return Outcome::Failure("cancelled while it slept".into());
            }
            return Outcome::Retry("interrupted by an immediate shutdown".into());
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}
