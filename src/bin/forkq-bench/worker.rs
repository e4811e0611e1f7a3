//! The benchmark's own worker (`forkq-bench worker`): the library's `forkq::run` with a Rust
//! handler whose first line records when it started, so start latency is measured at the handler
//! itself and not inferred from the database.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use forkq::{Handler, Job, JobContext, Outcome};

use crate::sys::mono_ns;

/// The stamp file's environment variable.
pub const STAMPS_VAR: &str = "BENCH_STAMPS";

/// Appends `id attempt pid start_ns` per job to the stamp file, then sleeps `payload.ms`
/// (heartbeating, as a real long job must).
struct Stamper {
    file: File,
}

impl Handler for Stamper {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        let started = mono_ns();
        // One write(2) per line on an O_APPEND file: lines of concurrent children never interleave.
        let line = format!(
            "{} {} {} {started}\n",
            job.id,
            job.attempt,
            std::process::id()
        );
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            return Outcome::Failure(format!("cannot write the stamp: {e}"));
        }
        let ms = job.payload.get("ms").and_then(|v| v.as_u64()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < deadline {
            if !ctx.heartbeat() {
                return Outcome::Retry("stopping".into());
            }
            std::thread::sleep((deadline - Instant::now()).min(Duration::from_millis(50)));
        }
        Outcome::Success(serde_json::Value::Null)
    }
}

/// Runs the fleet; returns the exit code.
pub fn main() -> i32 {
    let config = forkq::Config::from_env().unwrap_or_else(|e| forkq::exit_on_config_error(e));
    let Ok(path) = std::env::var(STAMPS_VAR) else {
        eprintln!("forkq-bench worker: set {STAMPS_VAR} to the stamp file");
        return 2;
    };
    forkq::run(config, move |_config| {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("the stamp file is writable");
        Box::new(Stamper { file })
    })
}

/// One handler start read back from the stamp file.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// The job's attempt.
    pub attempt: i32,
    /// The child that ran it.
    pub pid: i32,
    /// When the handler's first line ran (CLOCK_MONOTONIC, ns).
    pub at_ns: u64,
}

/// Every stamp so far, by job id, in file order.
pub fn read_stamps(path: &Path) -> HashMap<i64, Vec<Stamp>> {
    let mut out: HashMap<i64, Vec<Stamp>> = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [id, attempt, pid, at] = f[..] {
            if let (Ok(id), Ok(attempt), Ok(pid), Ok(at_ns)) =
                (id.parse(), attempt.parse(), pid.parse(), at.parse())
            {
                out.entry(id).or_default().push(Stamp {
                    attempt,
                    pid,
                    at_ns,
                });
            }
        }
    }
    out
}
