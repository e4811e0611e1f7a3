//! Plumbing shared by the exec and coproc handlers: the environment a handler program sees, the
//! program itself (its own process group, tied to this worker's life, its pipes driven with
//! `poll()` so no payload size can deadlock them) and the pacing of a job while it runs.
//!
//! A handler program's whole process group belongs to the job: when the program exits, is timed
//! out or is abandoned, whatever is left of its group is killed, and this worker (a child
//! subreaper) reaps the orphans, so a job leaves neither processes nor zombies behind.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

use super::{JobContext, Outcome};

/// Between the SIGTERM and the SIGKILL of a handler program's group. It stays below the
/// supervisor's own grace after a job timeout, so the handler has cleaned up the group (and
/// reported the timeout) before the supervisor kills the worker itself.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
const _: () = assert!(KILL_GRACE.as_millis() < crate::supervisor::TIMEOUT_KILL_GRACE.as_millis());

/// How often a running job heartbeats (slot freshness, lease renewal, pending acks).
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);
/// The longest single wait on a program's pipes, so heartbeats and deadlines stay timely.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// How long the orphans of a killed group get to die before they are left to a later reap.
const REAP_LIMIT: Duration = Duration::from_secs(1);

/// Variables that never reach a handler, whatever `FORKQ_HANDLER_PASS_ENV` says: they are
/// systemd's conversation with the supervisor, and a handler answering it would lie about the
/// daemon's health.
const NEVER_PASSED: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Whether a variable's name looks like it holds a secret, so handlers do not see it unless
/// `FORKQ_HANDLER_PASS_ENV` lists it. The rule, case-insensitive: the name ends with
/// `DATABASE_URL`; or it contains `PASSWORD`, `PASSWD`, `PGPASS`, `SECRET`, `TOKEN`, `CREDENTIAL`
/// or `PRIVATE`; or one of its `_`-separated words ends with `KEY` or `KEYS` (`API_KEY`,
/// `APIKEY`, `AWS_SECRET_ACCESS_KEY`). It errs on the side of hiding.
pub fn looks_secret(name: &str) -> bool {
    const WORDS: [&str; 7] = [
        "PASSWORD",
        "PASSWD",
        "PGPASS",
        "SECRET",
        "TOKEN",
        "CREDENTIAL",
        "PRIVATE",
    ];
    let name = name.to_ascii_uppercase();
    name.ends_with("DATABASE_URL")
        || WORDS.iter().any(|word| name.contains(word))
        || name
            .split('_')
            .any(|part| part.ends_with("KEY") || part.ends_with("KEYS"))
}

/// The environment of a handler program: this process's, minus systemd's variables and minus
/// secret-looking ones not listed in `pass`.
pub fn handler_env(pass: &[String]) -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(name, _)| {
            let name = name.to_string_lossy();
            !NEVER_PASSED.contains(&name.as_ref())
                && (!looks_secret(&name) || pass.iter().any(|p| *p == name))
        })
        .collect()
}

/// A stream a handler program writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Its standard output.
    Stdout,
    /// Its standard error (when captured).
    Stderr,
}

/// Where the bytes read from a program go.
pub type Sink<'a> = &'a mut dyn FnMut(Stream, &[u8]);

/// A running handler program in its own process group, with non-blocking pipes.
pub struct Program {
    child: Child,
    /// Readable once the program has exited (pidfd); `None` on kernels without pidfds.
    exit_fd: Option<OwnedFd>,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// Bytes queued for stdin, and how many of them went out.
    input: Vec<u8>,
    written: usize,
    close_input_when_sent: bool,
    /// The program closed its stdin before taking all the input it was given.
    input_refused: bool,
    /// Set once the leader was waited for and its group cleaned up.
    status: Option<ExitStatus>,
}

impl Program {
    /// Starts `argv` (no shell) with exactly `env` plus `extra`, stdin and stdout piped, stderr
    /// captured or inherited. The program leads a new process group and is killed when this
    /// worker dies (`PR_SET_PDEATHSIG`).
    pub fn spawn(
        argv: &[String],
        env: &[(OsString, OsString)],
        extra: &[(&str, String)],
        capture_stderr: bool,
    ) -> io::Result<Program> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "empty command line"))?;
        become_subreaper();
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .process_group(0);
        let worker = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
        unsafe {
            command.pre_exec(move || {
                // An ignored signal stays ignored across exec: the ones the worker ignores (they
                // are the supervisor's) are the program's to handle as it pleases.
                for sig in crate::child::SUPERVISOR_ONLY {
                    libc::signal(sig as libc::c_int, libc::SIG_DFL);
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The worker died before the prctl took effect: nobody would ever kill us.
                if libc::getppid() != worker {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in [
            stdin.as_ref().map(AsRawFd::as_raw_fd),
            stdout.as_ref().map(AsRawFd::as_raw_fd),
            stderr.as_ref().map(AsRawFd::as_raw_fd),
        ]
        .into_iter()
        .flatten()
        {
            set_nonblocking(fd)?;
        }
        Ok(Program {
            exit_fd: pidfd_open(child.id()),
            child,
            stdin,
            stdout,
            stderr,
            input: Vec::new(),
            written: 0,
            close_input_when_sent: false,
            input_refused: false,
            status: None,
        })
    }

    /// The program's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Queues `bytes` for the program's stdin; they go out as it reads them.
    pub fn send(&mut self, bytes: &[u8]) {
        if self.written == self.input.len() {
            self.input.clear();
            self.written = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Closes stdin once everything queued has gone out, so the program sees end of input.
    pub fn close_input_when_sent(&mut self) {
        self.close_input_when_sent = true;
        self.close_input_if_done();
    }

    /// Whether the program closed its stdin while input was still queued for it.
    pub fn input_refused(&self) -> bool {
        self.input_refused
    }

    /// Whether the program's stdout is still open.
    pub fn stdout_open(&self) -> bool {
        self.stdout.is_some()
    }

    /// The leader's exit status, if it has exited (without blocking).
    pub fn try_exit(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        self.child.try_wait()
    }

    /// Waits up to `wait` for the program to read input, write output or exit, moves what it
    /// can, and hands what was read to `sink`. Returns early when anything happened.
    pub fn pump(&mut self, wait: Duration, sink: Sink<'_>) -> io::Result<()> {
        let pending = self.written < self.input.len();
        let ready = {
            let mut fds = Vec::with_capacity(4);
            let mut roles = Vec::with_capacity(4);
            if let (Some(stdin), true) = (&self.stdin, pending) {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLOUT));
                roles.push(Role::Stdin);
            }
            if let Some(stdout) = &self.stdout {
                fds.push(PollFd::new(stdout.as_fd(), PollFlags::POLLIN));
                roles.push(Role::Stdout);
            }
            if let Some(stderr) = &self.stderr {
                fds.push(PollFd::new(stderr.as_fd(), PollFlags::POLLIN));
                roles.push(Role::Stderr);
            }
            if let Some(exit_fd) = &self.exit_fd {
                fds.push(PollFd::new(exit_fd.as_fd(), PollFlags::POLLIN));
                roles.push(Role::Exit);
            }
            // Without a pidfd and with every pipe closed, nothing would wake us at the exit.
            let wait = if self.exit_fd.is_none() && roles.is_empty() {
                wait.min(Duration::from_millis(10))
            } else {
                wait
            };
            if roles.is_empty() {
                std::thread::sleep(wait);
                return Ok(());
            }
            let timeout = PollTimeout::try_from(wait.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::ZERO);
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                // A signal to this worker (a stop request) interrupts the wait; the caller looks.
                Err(Errno::EINTR) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let mut ready = Vec::with_capacity(roles.len());
            for (fd, role) in fds.iter().zip(roles) {
                if fd.revents().is_some_and(|r| !r.is_empty()) {
                    ready.push(role);
                }
            }
            ready
        };
        for role in ready {
            match role {
                Role::Stdin => self.write_input()?,
                Role::Stdout => read_available(&mut self.stdout, Stream::Stdout, sink)?,
                Role::Stderr => read_available(&mut self.stderr, Stream::Stderr, sink)?,
                Role::Exit => {}
            }
        }
        Ok(())
    }

    /// Reads whatever output is already waiting, without blocking.
    pub fn drain(&mut self, sink: Sink<'_>) -> io::Result<()> {
        read_available(&mut self.stdout, Stream::Stdout, sink)?;
        read_available(&mut self.stderr, Stream::Stderr, sink)
    }

    /// Ends the program: SIGTERM to its group, up to `grace` to exit (output still drained into
    /// `sink`, so a program blocked on a full pipe can exit), then SIGKILL; reaps the group.
    pub fn terminate(&mut self, grace: Duration, sink: Sink<'_>) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        self.signal_group(Signal::SIGTERM);
        self.wait_then_kill(grace, sink)
    }

    /// Closes stdin and gives the program up to `grace` to exit on its own (output drained into
    /// `sink` meanwhile), then kills whatever is left of its group and reaps it.
    pub fn wait_then_kill(&mut self, grace: Duration, sink: Sink<'_>) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        self.stdin = None;
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if self.pump((deadline - now).min(POLL_SLICE), sink).is_err() {
                std::thread::sleep(Duration::from_millis(10).min(deadline - now));
            }
        }
        self.finish()
    }

    /// After the leader's exit (or to force it): SIGKILL whatever is left of the group, wait for
    /// the leader, reap the orphans. Returns the leader's status.
    pub fn finish(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        self.stdin = None;
        self.signal_group(Signal::SIGKILL);
        // The leader itself too, in case it left its group (setsid): waiting must not hang.
        let _ = self.child.kill();
        let status = self.child.wait().unwrap_or_else(|e| {
            log::warn!("cannot wait for handler program {}: {e}", self.pid());
            std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL)
        });
        reap_group(self.pid());
        self.status = Some(status);
        status
    }

    /// Asks the program to stop: SIGTERM to its group (a cancelled job).
    pub fn interrupt(&self) {
        self.signal_group(Signal::SIGTERM);
    }

    fn signal_group(&self, signal: Signal) {
        // ESRCH: the group is already gone, which is what we want.
        let _ = killpg(Pid::from_raw(self.pid() as i32), signal);
    }

    fn write_input(&mut self) -> io::Result<()> {
        while let Some(stdin) = self.stdin.as_mut() {
            if self.written == self.input.len() {
                break;
            }
            match stdin.write(&self.input[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The program closed its stdin: whatever is left will never be read.
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    self.stdin = None;
                    self.input_refused = true;
                    self.written = self.input.len();
                }
                Err(e) => return Err(e),
            }
        }
        self.close_input_if_done();
        Ok(())
    }

    fn close_input_if_done(&mut self) {
        if self.close_input_when_sent && self.written == self.input.len() {
            self.stdin = None;
        }
    }
}

impl Drop for Program {
    /// A program is never left behind: one still running when its handle goes is killed with its
    /// group, and reaped.
    fn drop(&mut self) {
        self.finish();
    }
}

#[derive(Clone, Copy)]
enum Role {
    Stdin,
    Stdout,
    Stderr,
    Exit,
}

/// Reads a non-blocking pipe until it would block, handing the bytes to `sink`; closes it at
/// end of file.
fn read_available<R: Read>(pipe: &mut Option<R>, stream: Stream, sink: Sink<'_>) -> io::Result<()> {
    let mut buf = [0u8; 64 * 1024];
    while let Some(reader) = pipe.as_mut() {
        match reader.read(&mut buf) {
            Ok(0) => *pipe = None,
            Ok(n) => sink(stream, &buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor that becomes readable when process `pid` exits, so the pipe poll also wakes at
/// the exit; `None` where the kernel has no pidfds (then the poll is sliced finer).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes this worker the reaper of its handlers' orphans (a grandchild whose parent died), so
/// they can be reaped by process group instead of lingering as zombies.
fn become_subreaper() {
    // SAFETY: a prctl with an integer argument; it only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
}

/// Reaps the members of process group `pgid` that became this worker's children, giving the
/// killed ones up to [`REAP_LIMIT`] to die.
fn reap_group(pgid: u32) {
    let deadline = Instant::now() + REAP_LIMIT;
    let group = Pid::from_raw(-(pgid as i32));
    loop {
        match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    log::warn!("processes of handler group {pgid} are slow to die; leaving them");
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD: none left.
            Err(_) => return,
        }
    }
}

/// Paces a job while its program runs: heartbeats regularly and says when the program must be
/// stopped (the job timeout, an immediate stop of this worker, or a cancel the program did not
/// obey within the cancel grace).
pub struct Watch {
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    last_beat: Instant,
    /// How long a cancelled job's program has to stop once told (`FORKQ_CANCEL_GRACE_SECONDS`).
    cancel_grace: Duration,
    /// When the job's cancel was seen.
    cancelled_at: Option<Instant>,
    /// Whether the handler was told to tell its program.
    cancel_told: bool,
}

impl Watch {
    /// Starts pacing a job that starts now.
    pub fn start(ctx: &dyn JobContext, cancel_grace: Duration) -> Watch {
        let now = Instant::now();
        let timeout = ctx.timeout();
        Watch {
            deadline: timeout.map(|t| now + t),
            timeout,
            last_beat: now,
            cancel_grace,
            cancelled_at: None,
            cancel_told: false,
        }
    }

    /// True once, when the job's cancel was first seen: the handler tells its program to stop
    /// (exec: SIGTERM to its group; coproc: a cancel line).
    pub fn cancel_to_tell(&mut self) -> bool {
        let tell = self.cancelled_at.is_some() && !self.cancel_told;
        self.cancel_told |= tell;
        tell
    }

    /// Whether the job is being cancelled (its program was told, or is about to be).
    pub fn cancelling(&self) -> bool {
        self.cancelled_at.is_some()
    }

    /// Heartbeats when one is due; returns the outcome to end the job with when its program
    /// must be stopped now.
    pub fn check(&mut self, ctx: &mut dyn JobContext) -> Option<Outcome> {
        let now = Instant::now();
        if now.duration_since(self.last_beat) >= HEARTBEAT_EVERY {
            if let Some(stop) = self.beat(ctx) {
                return Some(stop);
            }
        }
        if self
            .cancelled_at
            .is_some_and(|at| now >= at + self.cancel_grace)
        {
            return Some(Outcome::Failure(format!(
                "cancelled; the program did not stop within the cancel grace of {:.1?}",
                self.cancel_grace
            )));
        }
        match (self.deadline, self.timeout) {
            (Some(deadline), Some(timeout)) if now >= deadline => Some(Outcome::Failure(format!(
                "timed out after {} s",
                timeout.as_secs()
            ))),
            _ => None,
        }
    }

    /// Heartbeats now (the program said it is making progress). A cancel is not a stop yet: the
    /// program is told first (see [`Watch::cancel_to_tell`]) and stopped after the grace.
    pub fn beat(&mut self, ctx: &mut dyn JobContext) -> Option<Outcome> {
        self.last_beat = Instant::now();
        let go_on = ctx.heartbeat();
        if ctx.cancelled() {
            self.cancelled_at.get_or_insert(self.last_beat);
            return None;
        }
        (!go_on).then(|| Outcome::Retry("interrupted by an immediate shutdown".into()))
    }

    /// How long the next wait on the program may last.
    pub fn slice(&self) -> Duration {
        let until_beat = HEARTBEAT_EVERY.saturating_sub(self.last_beat.elapsed());
        let until_deadline = self
            .deadline
            .into_iter()
            .chain(self.cancelled_at.map(|at| at + self.cancel_grace))
            .min()
            .map_or(POLL_SLICE, |d| d.saturating_duration_since(Instant::now()));
        POLL_SLICE
            .min(until_beat.max(Duration::from_millis(1)))
            .min(until_deadline)
    }
}

/// Replaces NUL characters, which PostgreSQL refuses in `text` and `jsonb`, so a handler's
/// output can always be stored.
pub fn storable(outcome: Outcome) -> Outcome {
    fn text(s: String) -> String {
        if s.contains('\0') {
            s.replace('\0', "\u{FFFD}")
        } else {
            s
        }
    }
    fn value(v: Value) -> Value {
        match v {
            Value::String(s) => Value::String(text(s)),
            Value::Array(items) => Value::Array(items.into_iter().map(value).collect()),
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (text(k), value(v))).collect())
            }
            other => other,
        }
    }
    match outcome {
        Outcome::Success(v) => Outcome::Success(value(v)),
        Outcome::Failure(e) => Outcome::Failure(text(e)),
        Outcome::Fatal(e) => Outcome::Fatal(text(e)),
        Outcome::Retry(e) => Outcome::Retry(text(e)),
        Outcome::Snooze(delay) => Outcome::Snooze(delay),
    }
}

/// Keeps the last `limit` bytes of a stream (a program's stderr, for the error of a failed job).
pub struct Tail {
    bytes: Vec<u8>,
    limit: usize,
}

impl Tail {
    /// An empty tail keeping at most `limit` bytes.
    pub fn new(limit: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            limit,
        }
    }

    /// Appends `more`, forgetting the oldest bytes beyond the limit.
    pub fn push(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
        if self.bytes.len() > 2 * self.limit {
            let cut = self.bytes.len() - self.limit;
            self.bytes.drain(..cut);
        }
    }

    /// The kept text, trimmed, as (lossy) UTF-8.
    pub fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(self.limit);
        String::from_utf8_lossy(&self.bytes[start..])
            .trim()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised() {
        for name in [
            "DATABASE_URL",
            "FORKQ_DATABASE_URL",
            "PGPASSWORD",
            "PGPASSFILE",
            "AWS_SECRET_ACCESS_KEY",
            "GITHUB_TOKEN",
            "api_key",
            "STRIPE_APIKEY",
            "SSH_PRIVATE_KEY_PATH",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "DB_PASSWD",
        ] {
            assert!(looks_secret(name), "{name}");
        }
        for name in ["PATH", "HOME", "LANG", "FORKQ_QUEUES", "KEYMAP_DIR", "TZ"] {
            assert!(!looks_secret(name), "{name}");
        }
    }

    #[test]
    fn nul_characters_are_replaced() {
        let out = storable(Outcome::Success(
            serde_json::json!({"a\u{0}": ["x\u{0}y", 1]}),
        ));
        assert_eq!(
            out,
            Outcome::Success(serde_json::json!({"a\u{FFFD}": ["x\u{FFFD}y", 1]}))
        );
        assert_eq!(
            storable(Outcome::Failure("e\u{0}".into())),
            Outcome::Failure("e\u{FFFD}".into())
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut tail = Tail::new(4);
        for chunk in [b"abc".as_slice(), b"defgh", b"ij"] {
            tail.push(chunk);
        }
        assert_eq!(tail.text(), "ghij");
    }
}
