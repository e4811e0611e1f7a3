//! The `exec:` handler: one program per job.
//!
//! The payload goes to the program's stdin as one line of JSON and the job's metadata into
//! `FORKQ_*` environment variables; the payload never appears in argv (visible to every user in
//! `ps`) and no shell ever parses anything. Exit 0 is success with stdout as the result, exit 75
//! (`EX_TEMPFAIL`) asks for a retry without recording an error, exit 79 snoozes the job for the
//! number of seconds printed on stdout, anything else fails the job with the tail of stderr.
//!
//! Progress: the program appends JSON lines to the file named by `FORKQ_PROGRESS_FILE`; the
//! last whole line is the job's progress. A cancelled job's program gets SIGTERM (its whole
//! group), then SIGKILL after `FORKQ_CANCEL_GRACE_SECONDS`.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::Value;

use super::process::{handler_env, Program, Stream, Tail, Watch, KILL_GRACE};
use super::{Handler, Job, JobContext, Outcome};
use crate::config::Config;

/// The exit code that asks for a retry without counting as an error (`EX_TEMPFAIL`).
pub const EXIT_RETRY: i32 = 75;
/// The exit code that snoozes the job (run again later, the attempt not charged) for the number
/// of seconds the program printed on stdout.
pub const EXIT_SNOOZE: i32 = 79;
/// How much of a failed program's stderr becomes the job's error.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// Runs one program per job; see the module documentation for the contract.
pub struct Exec {
    argv: Vec<String>,
    env: Vec<(OsString, OsString)>,
    max_result_bytes: usize,
    cancel_grace: Duration,
}

impl Exec {
    /// A handler running `argv` for every job. The environment is computed once: it is this
    /// worker's, filtered (see [`handler_env`](super::process::handler_env)).
    pub fn new(argv: Vec<String>, config: &Config) -> Exec {
        Exec {
            argv,
            env: handler_env(&config.handler_pass_env),
            max_result_bytes: config.max_result_bytes,
            cancel_grace: config.cancel_grace,
        }
    }
}

/// The metadata of `job` as a handler program's environment.
pub fn job_env(job: &Job) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("FORKQ_JOB_ID", job.id.to_string()),
        ("FORKQ_QUEUE", job.queue.to_string()),
        ("FORKQ_TASK", job.task.to_string()),
        ("FORKQ_ATTEMPT", job.attempt.to_string()),
        ("FORKQ_MAX_ATTEMPTS", job.max_attempts.to_string()),
    ];
    if let Some(batch) = job.batch_id {
        env.push(("FORKQ_BATCH_ID", batch.to_string()));
    }
    env
}

impl Handler for Exec {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        let mut progress = match ProgressFile::create(job) {
            Ok(file) => file,
            Err(e) => return Outcome::Failure(format!("cannot create the progress file: {e}")),
        };
        let mut env = job_env(job);
        env.push(("FORKQ_PROGRESS_FILE", progress.path.display().to_string()));
        let mut program = match Program::spawn(&self.argv, &self.env, &env, true) {
            Ok(program) => program,
            Err(e) => {
                return Outcome::Failure(format!("cannot start {:?}: {e}", self.argv[0]));
            }
        };
        ctx.runs_in_process_group(program.pid());
        let mut input = serde_json::to_vec(&job.payload).expect("a JSON value always serializes");
        input.push(b'\n');
        program.send(&input);
        program.close_input_when_sent();

        let mut stdout = Output::new(self.max_result_bytes);
        let mut stderr = Tail::new(STDERR_TAIL_BYTES);
        let mut sink = |stream: Stream, bytes: &[u8]| match stream {
            Stream::Stdout => stdout.push(bytes),
            Stream::Stderr => stderr.push(bytes),
        };
        let mut watch = Watch::start(ctx, self.cancel_grace);
        let status = loop {
            if let Some(value) = progress.latest() {
                ctx.progress(value);
            }
            if let Some(stop) = watch.check(ctx) {
                let status = if watch.cancelling() {
                    // It had its grace after the SIGTERM.
                    program.finish()
                } else {
                    program.terminate(KILL_GRACE, &mut sink)
                };
                log::warn!(
                    "job {} ({}): stopped {:?} (pid {}, {}): {stop:?}",
                    job.id,
                    job.task,
                    self.argv[0],
                    program.pid(),
                    describe(status)
                );
                return stop;
            }
            if watch.cancel_to_tell() {
                program.interrupt();
            }
            match program.try_exit() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    program.finish();
                    return Outcome::Failure(format!("cannot wait for {:?}: {e}", self.argv[0]));
                }
            }
            if let Err(e) = program.pump(watch.slice(), &mut sink) {
                program.finish();
                return Outcome::Failure(format!("cannot talk to {:?}: {e}", self.argv[0]));
            }
        };
        // What the program wrote before it exited is already in the pipes; what its leftover
        // processes might still write is not the job's output.
        let _ = program.drain(&mut sink);
        program.finish();
        if status.success() && log::log_enabled!(log::Level::Debug) {
            log::debug!("job {} ({}) stderr: {}", job.id, job.task, stderr.text());
        }
        if let Some(value) = progress.latest() {
            ctx.progress(value);
        }
        outcome(status, stdout, &stderr)
    }
}

/// The file an exec program reports progress through: it appends JSON lines, forkq reads the
/// new whole lines while the program runs and keeps the last. Created empty (mode 0600) in the
/// temporary directory for each job, deleted when the job ends.
struct ProgressFile {
    path: PathBuf,
    file: std::fs::File,
    read: u64,
    partial: Vec<u8>,
}

impl ProgressFile {
    fn create(job: &Job) -> std::io::Result<ProgressFile> {
        let path = std::env::temp_dir().join(format!(
            "forkq-progress-{}-{}-{}",
            std::process::id(),
            job.id,
            job.attempt
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        Ok(ProgressFile {
            path,
            file,
            read: 0,
            partial: Vec::new(),
        })
    }

    /// The last whole line appended since the last call, if it is JSON (a line that is not is
    /// logged and skipped).
    fn latest(&mut self) -> Option<Value> {
        let len = self.file.metadata().ok()?.len();
        if len <= self.read {
            return None;
        }
        let mut more = Vec::new();
        self.file.seek(SeekFrom::Start(self.read)).ok()?;
        let n = (&mut self.file)
            .take(len - self.read)
            .read_to_end(&mut more)
            .ok()?;
        self.read += n as u64;
        self.partial.extend_from_slice(&more);
        let end = self.partial.iter().rposition(|&b| b == b'\n')?;
        let lines: Vec<u8> = self.partial.drain(..=end).collect();
        let last = lines[..end].rsplit(|&b| b == b'\n').next()?;
        match serde_json::from_slice(last) {
            Ok(value) => Some(value),
            Err(e) => {
                log::warn!(
                    "a progress line in FORKQ_PROGRESS_FILE is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&last[..last.len().min(200)])
                );
                None
            }
        }
    }
}

impl Drop for ProgressFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A program's stdout, kept up to a limit and counted beyond it.
struct Output {
    bytes: Vec<u8>,
    total: usize,
    limit: usize,
}

impl Output {
    fn new(limit: usize) -> Output {
        Output {
            bytes: Vec::new(),
            total: 0,
            limit,
        }
    }

    fn push(&mut self, more: &[u8]) {
        self.total += more.len();
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&more[..more.len().min(room)]);
    }

    /// The result: the output as JSON when it is JSON, else as a string (surrounding whitespace
    /// trimmed; `null` when empty). Output beyond the limit is cut, and the cut is said.
    fn into_result(self) -> Value {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        if self.total > self.limit {
            log::warn!(
                "handler output of {} bytes is above FORKQ_MAX_RESULT_BYTES={}; keeping the start",
                self.total,
                self.limit
            );
            return Value::String(format!(
                "{text}… [truncated: {} bytes in all, FORKQ_MAX_RESULT_BYTES={}]",
                self.total, self.limit
            ));
        }
        if text.is_empty() {
            return Value::Null;
        }
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
    }
}

/// The outcome of a program that exited with `status`.
fn outcome(status: ExitStatus, stdout: Output, stderr: &Tail) -> Outcome {
    let with_stderr = |what: String| {
        let tail = stderr.text();
        if tail.is_empty() {
            format!("{what} (stderr was empty)")
        } else {
            format!("{what}: {tail}")
        }
    };
    match status.code() {
        Some(0) => Outcome::Success(stdout.into_result()),
        Some(EXIT_RETRY) => {
            Outcome::Retry(with_stderr(format!("exit code {EXIT_RETRY} (EX_TEMPFAIL)")))
        }
        Some(EXIT_SNOOZE) => match stdout.into_result().as_f64() {
            Some(seconds) if (0.0..=10.0 * 365.0 * 86_400.0).contains(&seconds) => {
                Outcome::Snooze(Duration::from_secs_f64(seconds))
            }
            _ => Outcome::Failure(format!(
                "exit code {EXIT_SNOOZE} snoozes the job: print the delay in seconds (0 to ten \
                 years) on stdout"
            )),
        },
        _ => Outcome::Failure(with_stderr(describe(status))),
    }
}

/// "exit code 3" or "killed by SIGKILL".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => format!("ended with status {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(text: &str, limit: usize) -> Output {
        let mut out = Output::new(limit);
        out.push(text.as_bytes());
        out
    }

    #[test]
    fn results_are_json_when_they_can_be() {
        assert_eq!(
            output("{\"a\": 1}\n", 100).into_result(),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            output("plain text\n", 100).into_result(),
            Value::String("plain text".into())
        );
        assert_eq!(output("  \n", 100).into_result(), Value::Null);
        let cut = output("abcdefgh", 4).into_result();
        assert!(
            cut.as_str()
                .unwrap()
                .starts_with("abcd… [truncated: 8 bytes"),
            "{cut}"
        );
    }

    #[test]
    fn exit_statuses_map_to_outcomes() {
        let mut tail = Tail::new(100);
        tail.push(b"boom\n");
        let exited = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(
            outcome(exited(0), output("1", 10), &tail),
            Outcome::Success(Value::from(1))
        );
        assert!(matches!(
            outcome(exited(75), output("", 10), &tail),
            Outcome::Retry(_)
        ));
        assert_eq!(
            outcome(exited(79), output("2.5\n", 10), &tail),
            Outcome::Snooze(Duration::from_millis(2500))
        );
        assert!(matches!(
            outcome(exited(79), output("soon", 10), &tail),
            Outcome::Failure(_)
        ));
        assert_eq!(
            outcome(exited(2), output("", 10), &tail),
            Outcome::Failure("exit code 2: boom".into())
        );
        assert_eq!(
            outcome(ExitStatus::from_raw(9), output("", 10), &Tail::new(10)),
            Outcome::Failure("killed by SIGKILL (stderr was empty)".into())
        );
    }
}
