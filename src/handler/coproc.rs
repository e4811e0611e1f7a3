//! The `coproc:` handler: one long-lived program per worker, speaking JSON lines.
//!
//! For each job forkq writes one line to the program's stdin:
//! `{"id":..,"queue":..,"task":..,"payload":..,"attempt":..,"max_attempts":..,"batch_id":..}`.
//! The program answers with one line on stdout, `{"id":..,"ok":true,"result":..}` or
//! `{"id":..,"ok":false,"error":"..","retry":true|false}` or `{"id":..,"snooze":SECONDS}` (run
//! again later, the attempt not charged), and may send `{"id":..,"heartbeat":true}` and
//! `{"id":..,"progress":VALUE}` lines while it works. When the job is cancelled forkq writes
//! `{"id":..,"cancel":true}`; the program should stop and reply (any reply); after
//! `FORKQ_CANCEL_GRACE_SECONDS` without one it is stopped like a broken one. Either way the next
//! job gets a fresh program, so a cancel line it never read cannot reach it as a job. Anything
//! else — a line that is not JSON, a reply for another id, a line
//! longer than `FORKQ_MAX_RESULT_BYTES`, end of file or the death of the program — fails the job
//! in flight with a protocol error; the program is killed with its process group and a fresh one
//! is started for the next job. The program's stderr is the daemon's.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::{json, Value};

use super::process::{handler_env, Program, Stream, Watch, KILL_GRACE};
use super::{Handler, Job, JobContext, Outcome};
use crate::config::Config;

/// How much of an offending line a protocol error quotes.
const QUOTE_BYTES: usize = 200;

/// Runs jobs through one long-lived program; see the module documentation for the protocol.
pub struct Coproc {
    argv: Vec<String>,
    env: Vec<(OsString, OsString)>,
    max_line_bytes: usize,
    cancel_grace: Duration,
    /// The running program, started at the first job and after every failure.
    program: Option<Program>,
    /// Bytes read from the program's stdout that do not make a whole line yet.
    buffer: Vec<u8>,
}

impl Coproc {
    /// A handler that will run `argv` (started lazily, at the first job).
    pub fn new(argv: Vec<String>, config: &Config) -> Coproc {
        Coproc {
            argv,
            env: handler_env(&config.handler_pass_env),
            max_line_bytes: config.max_result_bytes,
            cancel_grace: config.cancel_grace,
            program: None,
            buffer: Vec::new(),
        }
    }

    /// The running program, started if there is none.
    fn program(&mut self) -> std::io::Result<&mut Program> {
        // A program that died between jobs is replaced before it is given one: no job was in
        // flight, so none fails.
        if let Some(program) = self.program.as_mut() {
            if let Ok(Some(status)) = program.try_exit() {
                log::warn!(
                    "coproc {:?} (pid {}) exited between jobs ({status}); starting a fresh one",
                    self.argv[0],
                    program.pid()
                );
                program.finish();
                self.program = None;
            }
        }
        if self.program.is_none() {
            let program = Program::spawn(&self.argv, &self.env, &[], false)?;
            log::info!("started coproc {:?} as pid {}", self.argv[0], program.pid());
            self.buffer.clear();
            self.program = Some(program);
        }
        Ok(self.program.as_mut().expect("started above"))
    }

    /// Stops the program (SIGTERM, then SIGKILL after the grace) so the next job gets a fresh
    /// one, and returns `outcome` for the job in flight.
    fn restart(&mut self, job: &Job, outcome: Outcome) -> Outcome {
        if let Some(mut program) = self.program.take() {
            let status = program.terminate(KILL_GRACE, &mut |_, _| {});
            log::warn!(
                "job {} ({}): coproc {:?} (pid {}) stopped ({status}); the job {outcome}",
                job.id,
                job.task,
                self.argv[0],
                program.pid()
            );
        }
        self.buffer.clear();
        outcome
    }

    /// The failure of the job in flight when the program broke the protocol.
    fn protocol_error(&mut self, job: &Job, why: String) -> Outcome {
        let error = format!(
            "coproc protocol error: {why}; the program was killed and is restarted for the next job"
        );
        self.restart(job, Outcome::Failure(error))
    }

    /// The failure of the job in flight when the program wrote a line beyond the limit (whole,
    /// or still growing without its end of line).
    fn line_too_long(&mut self, job: &Job) -> Outcome {
        let why = format!(
            "a line longer than FORKQ_MAX_RESULT_BYTES={} bytes",
            self.max_line_bytes
        );
        self.protocol_error(job, why)
    }

    /// Takes the next whole line out of the buffer.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        let end = self.buffer.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }
}

impl Handler for Coproc {
    fn handle(&mut self, job: &Job, ctx: &mut dyn JobContext) -> Outcome {
        let request = json!({
            "id": job.id,
            "queue": &*job.queue,
            "task": &*job.task,
            "payload": job.payload,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
            "batch_id": job.batch_id,
        });
        let mut line = serde_json::to_vec(&request).expect("a JSON value always serializes");
        line.push(b'\n');
        match self.program() {
            Ok(program) => {
                ctx.runs_in_process_group(program.pid());
                program.send(&line);
            }
            Err(e) => {
                return Outcome::Failure(format!("cannot start coproc {:?}: {e}", self.argv[0]))
            }
        }
        let mut watch = Watch::start(ctx, self.cancel_grace);
        loop {
            while let Some(line) = self.next_line() {
                if line.len() > self.max_line_bytes {
                    return self.line_too_long(job);
                }
                match parse_line(&line, job.id) {
                    Line::Blank => {}
                    Line::Heartbeat => {
                        if let Some(stop) = watch.beat(ctx) {
                            return self.restart(job, stop);
                        }
                    }
                    Line::Progress(value) => ctx.progress(value),
                    Line::Reply(outcome) if watch.cancelling() => {
                        // The cancel line may still be unread in its stdin, where it would reach
                        // the program as the next job: the next job gets a fresh program.
                        if let Some(mut program) = self.program.take() {
                            program.wait_then_kill(KILL_GRACE, &mut |_, _| {});
                        }
                        self.buffer.clear();
                        return outcome;
                    }
                    Line::Reply(outcome) => return outcome,
                    Line::Invalid(why) => return self.protocol_error(job, why),
                }
            }
            if self.buffer.len() > self.max_line_bytes {
                return self.line_too_long(job);
            }
            if let Some(stop) = watch.check(ctx) {
                return self.restart(job, stop);
            }
            if watch.cancel_to_tell() {
                let mut cancel = serde_json::to_vec(&json!({"id": job.id, "cancel": true}))
                    .expect("a JSON value always serializes");
                cancel.push(b'\n');
                if let Some(program) = self.program.as_mut() {
                    program.send(&cancel);
                }
            }
            let Coproc {
                program, buffer, ..
            } = self;
            let program = program.as_mut().expect("started for this job");
            if program.input_refused() {
                return self.protocol_error(job, "the program closed its stdin".into());
            }
            if !program.stdout_open() {
                let status = program.finish();
                return self.protocol_error(
                    job,
                    format!("the program closed its stdout or exited mid-job ({status})"),
                );
            }
            if let Ok(Some(status)) = program.try_exit() {
                // Its last words may still be in the pipe: a reply written just before the exit
                // counts.
                let _ = program.drain(&mut |_, bytes| buffer.extend_from_slice(bytes));
                if buffer.contains(&b'\n') {
                    continue;
                }
                program.finish();
                return self.protocol_error(job, format!("the program exited mid-job ({status})"));
            }
            let mut sink = |stream: Stream, bytes: &[u8]| {
                if stream == Stream::Stdout {
                    buffer.extend_from_slice(bytes);
                }
            };
            if let Err(e) = program.pump(watch.slice(), &mut sink) {
                return self.protocol_error(job, format!("cannot talk to the program: {e}"));
            }
        }
    }
}

impl Drop for Coproc {
    /// At the worker's exit: end of input tells the program to finish; it is killed after the
    /// grace if it does not.
    fn drop(&mut self) {
        if let Some(mut program) = self.program.take() {
            program.wait_then_kill(KILL_GRACE, &mut |_, _| {});
        }
    }
}

/// One line from the program, understood.
#[derive(Debug, PartialEq)]
enum Line {
    /// An empty line, ignored.
    Blank,
    /// The job in flight is making progress.
    Heartbeat,
    /// The job in flight reports how far it is.
    Progress(Value),
    /// The job in flight is done.
    Reply(Outcome),
    /// A broken line, with what was wrong with it.
    Invalid(String),
}

/// Reads one line of the protocol while job `id` is in flight.
fn parse_line(line: &[u8], id: i64) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Blank;
    }
    let quoted = || {
        let cut = &line[..line.len().min(QUOTE_BYTES)];
        let more = if line.len() > QUOTE_BYTES { "…" } else { "" };
        format!("{:?}{more}", String::from_utf8_lossy(cut))
    };
    let value: Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(_) => return Line::Invalid(format!("a line that is not JSON: {}", quoted())),
    };
    let Some(reply) = value.as_object() else {
        return Line::Invalid(format!("a line that is not a JSON object: {}", quoted()));
    };
    if reply.get("id").and_then(Value::as_i64) != Some(id) {
        return Line::Invalid(format!(
            "a line for id {} while job {id} is in flight: {}",
            reply.get("id").map_or("(none)".into(), Value::to_string),
            quoted()
        ));
    }
    if reply.get("heartbeat") == Some(&Value::Bool(true)) {
        return Line::Heartbeat;
    }
    if let Some(progress) = reply.get("progress") {
        return Line::Progress(progress.clone());
    }
    if let Some(snooze) = reply.get("snooze") {
        return match snooze.as_f64() {
            Some(s) if (0.0..=10.0 * 365.0 * 86_400.0).contains(&s) => {
                Line::Reply(Outcome::Snooze(Duration::from_secs_f64(s)))
            }
            _ => Line::Invalid(format!(
                "a snooze that is not a number of seconds from 0 to ten years: {}",
                quoted()
            )),
        };
    }
    match reply.get("ok") {
        Some(Value::Bool(true)) => Line::Reply(Outcome::Success(
            reply.get("result").cloned().unwrap_or(Value::Null),
        )),
        Some(Value::Bool(false)) => {
            let error = match reply.get("error") {
                Some(Value::String(e)) => e.clone(),
                None | Some(Value::Null) => "the coproc reported a failure without an error".into(),
                Some(other) => other.to_string(),
            };
            match reply.get("retry") {
                Some(Value::Bool(false)) => Line::Reply(Outcome::Fatal(error)),
                _ => Line::Reply(Outcome::Failure(error)),
            }
        }
        _ => Line::Invalid(format!(
            "a line with none of \"ok\": true|false, \"snooze\", \"progress\" or \"heartbeat\": true: {}",
            quoted()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_understood() {
        let parse = |s: &str| parse_line(s.as_bytes(), 7);
        assert_eq!(
            parse(r#"{"id":7,"ok":true,"result":{"n":1}}"#),
            Line::Reply(Outcome::Success(json!({"n": 1})))
        );
        assert_eq!(
            parse(r#"{"id":7,"ok":true}"#),
            Line::Reply(Outcome::Success(Value::Null))
        );
        assert_eq!(
            parse(r#"{"id":7,"ok":false,"error":"no","retry":false}"#),
            Line::Reply(Outcome::Fatal("no".into()))
        );
        assert_eq!(
            parse(r#"{"id":7,"ok":false,"error":"later"}"#),
            Line::Reply(Outcome::Failure("later".into()))
        );
        assert_eq!(parse(r#"{"id":7,"heartbeat":true}"#), Line::Heartbeat);
        assert_eq!(
            parse(r#"{"id":7,"snooze":1.5}"#),
            Line::Reply(Outcome::Snooze(Duration::from_millis(1500)))
        );
        assert_eq!(
            parse(r#"{"id":7,"progress":{"done":3}}"#),
            Line::Progress(json!({"done": 3}))
        );
        assert_eq!(parse("  "), Line::Blank);
    }

    #[test]
    fn broken_lines_are_protocol_errors() {
        for (line, expect) in [
            ("hello", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"id":8,"ok":true}"#, "for id 8 while job 7"),
            (r#"{"id":"7","ok":true}"#, "for id \"7\""),
            (r#"{"ok":true}"#, "for id (none)"),
            (r#"{"id":7}"#, "none of"),
            (r#"{"id":7,"snooze":-1}"#, "snooze"),
        ] {
            match parse_line(line.as_bytes(), 7) {
                Line::Invalid(why) => assert!(why.contains(expect), "{line}: {why}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }
}
