//! Shared test harness: a private schema per test, the real `forkq` binary, real HTTP.
//!
//! Every wait is bounded; every process started here is killed by pid when its guard drops.

#![allow(dead_code)]

pub mod browser;
pub mod pgbouncer;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The database the tests use: `DATABASE_URL`, or the machine's PostgreSQL.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The forkq binary built for this test run.
pub fn forkq_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forkq")
}

/// Runs `forkq ARGS` against `schema` with a clean environment (PATH, `FORKQ_LOG=warn`, the
/// schema's variables, then `extra`) and no stdin: (exit code, stdout, stderr).
pub fn forkq_cli(
    schema: &TestSchema,
    extra: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let output = Command::new(forkq_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FORKQ_LOG", "warn")
        .envs(schema.env())
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdin(Stdio::null())
        .output()
        .expect("run forkq");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback (bound and released; tests pass it to the daemon at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static SCHEMA_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A schema of its own for one test, migrated, dropped when the guard drops.
pub struct TestSchema {
    pub name: String,
}

impl TestSchema {
    /// Creates and migrates `t_<prefix>_<pid>_<n>`.
    pub fn new(prefix: &str) -> TestSchema {
        let name = format!(
            "t_{prefix}_{}_{}",
            std::process::id(),
            SCHEMA_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut client = connect();
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
            .unwrap();
        forkq::queue::migrations::migrate(&mut client, &name).expect("migrate");
        TestSchema { name }
    }

    /// The environment every forkq process of this test gets.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), database_url()),
            ("FORKQ_SCHEMA".into(), self.name.clone()),
        ]
    }

    /// A configuration for in-process use, with extra variables.
    pub fn config(&self, extra: &[(&str, &str)]) -> forkq::Config {
        let mut vars: std::collections::HashMap<String, String> = self.env().into_iter().collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        forkq::Config::from_vars(vars).expect("valid test config")
    }

    /// A fresh connection.
    pub fn client(&self) -> postgres::Client {
        connect()
    }

    /// Enqueues one job; returns its id.
    pub fn enqueue(&self, queue: &str, task: &str, payload: Value) -> i64 {
        let limits = forkq::queue::producer::Limits {
            max_payload_bytes: 1 << 20,
            default_max_attempts: 25,
        };
        let job = forkq::NewJob::new(queue, task, payload);
        forkq::queue::producer::enqueue(&mut connect(), &self.name, &limits, &job).unwrap()
    }

    /// Enqueues `n` copies of one job in one transaction.
    pub fn enqueue_n(&self, queue: &str, task: &str, payload: Value, n: usize) {
        let limits = forkq::queue::producer::Limits {
            max_payload_bytes: 1 << 20,
            default_max_attempts: 25,
        };
        let jobs: Vec<_> = (0..n)
            .map(|_| forkq::NewJob::new(queue, task, payload.clone()))
            .collect();
        forkq::queue::producer::enqueue_many(&mut connect(), &self.name, &limits, &jobs, None)
            .unwrap();
    }

    /// Gives every job in the hot table `n` attempts in all.
    pub fn set_max_attempts(&self, n: i32) {
        connect()
            .batch_execute(&format!(
                "UPDATE \"{}\".jobs SET max_attempts = {n}",
                self.name
            ))
            .unwrap();
    }

    /// Runs a query returning one bigint.
    pub fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.name));
        connect().query_one(&sql, &[]).unwrap().get(0)
    }

    /// Jobs in the hot table in `state`.
    pub fn live(&self, state: &str) -> i64 {
        connect()
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{}\".jobs WHERE state = $1",
                    self.name
                ),
                &[&state],
            )
            .unwrap()
            .get(0)
    }

    /// Jobs in the archive in `state`.
    pub fn archived(&self, state: &str) -> i64 {
        connect()
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{}\".jobs_archive WHERE state = $1",
                    self.name
                ),
                &[&state],
            )
            .unwrap()
            .get(0)
    }

    /// A job's row (live or archived) as JSON.
    pub fn job(&self, id: i64) -> Option<Value> {
        forkq::queue::admin::job(&mut connect(), &self.name, id).unwrap()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&database_url(), postgres::NoTls) {
            let _ =
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
        }
    }
}

/// Runs the forkq CLI for `schema` with `env` on top of its environment and `stdin` as its
/// input; waits for it to exit.
pub fn run_cli(
    schema: &TestSchema,
    env: &[(&str, String)],
    args: &[&str],
    stdin: &str,
) -> std::process::Output {
    let mut child = Command::new(forkq_bin())
        .args(args)
        .env_clear()
        .envs(schema.env())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("FORKQ_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A connection to the test database.
pub fn connect() -> postgres::Client {
    postgres::Client::connect(&database_url(), postgres::NoTls).expect("test database reachable")
}

/// `wrapper` followed by `forkq run`, as (program, arguments).
fn wrapped<'a>(wrapper: &[&'a str]) -> (&'a str, Vec<&'a str>) {
    let (program, args) = wrapper.split_first().expect("a wrapper command");
    let mut args = args.to_vec();
    args.extend([forkq_bin(), "run"]);
    (program, args)
}

/// A `forkq run` process, killed (with its whole process group) when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `forkq run` for `schema` with extra environment; waits until /livez answers 200
    /// with every child alive (or panics with the log after 20 s).
    pub fn start(schema: &TestSchema, extra: &[(&str, &str)]) -> Daemon {
        Daemon::start_program(forkq_bin(), &["run"], schema, extra)
    }

    /// [`Daemon::start`] through a wrapper command that execs its last argument (for example
    /// `setpriv --reuid=65534 ...`), so the supervisor keeps the spawned pid.
    pub fn start_wrapped(schema: &TestSchema, extra: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let (program, args) = wrapped(wrapper);
        Daemon::start_program(program, &args, schema, extra)
    }

    /// As [`Daemon::start`], for another program built on the library (an example calling
    /// `forkq::run`), started with `args`.
    pub fn start_program(
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        schema: &TestSchema,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let daemon = Daemon::spawn_program(program, args, schema, extra);
        let concurrency: usize = extra
            .iter()
            .find(|(k, _)| *k == "FORKQ_CONCURRENCY")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(2);
        let ok = wait_until(Duration::from_secs(20), || {
            matches!(daemon.livez(), Some((200, ref body)) if body["alive_children"].as_u64() == Some(concurrency as u64)
                && body["slots"].as_array().is_some_and(|s| s.iter().all(|s| s["state"] != "starting")))
        });
        assert!(
            ok,
            "daemon did not become healthy; log:\n{}",
            daemon.log_text()
        );
        daemon
    }

    /// Starts `forkq run` without waiting for anything.
    pub fn spawn(schema: &TestSchema, extra: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_program(forkq_bin(), &["run"], schema, extra)
    }

    /// [`Daemon::spawn`] through a wrapper command (see [`Daemon::start_wrapped`]).
    pub fn spawn_wrapped(schema: &TestSchema, extra: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let (program, args) = wrapped(wrapper);
        Daemon::spawn_program(program, &args, schema, extra)
    }

    /// As [`Daemon::spawn`], for another program started with `args`.
    pub fn spawn_program(
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        schema: &TestSchema,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log = dir.join(format!(
            "{}-{}.log",
            schema.name,
            SCHEMA_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Port 0: the daemon binds a free port itself (no race between parallel tests) and
            // logs the address, which is read back below.
            .env("FORKQ_HEALTH_ADDR", "127.0.0.1:0")
            .env("FORKQ_CONCURRENCY", "2")
            .env("FORKQ_LOG", "info")
            .envs(schema.env())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("spawn forkq run");
        let addr = match extra.iter().find(|(k, _)| *k == "FORKQ_HEALTH_ADDR") {
            Some((_, given)) => given
                .parse()
                .expect("FORKQ_HEALTH_ADDR in a test is ip:port"),
            None => bound_address(&log, &mut child),
        };
        Daemon { child, addr, log }
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `line` shows up in the log within `timeout`. A line about a change is written once
    /// the statement that made it has returned, so a test that saw the change waits for it.
    pub fn wait_for_log(&self, line: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_text().contains(line))
    }

    /// GET `path` on the probe: (status, body), or `None` when it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.addr, path)
    }

    /// /livez as (status, JSON).
    pub fn livez(&self) -> Option<(u16, Value)> {
        let (code, body) = self.get("/livez")?;
        Some((code, serde_json::from_str(&body).ok()?))
    }

    /// The pids of the children, by slot (0 for an empty slot).
    pub fn child_pids(&self) -> Vec<i32> {
        self.livez()
            .map(|(_, body)| {
                body["slots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["pid"].as_i64().unwrap_or(0) as i32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `signal` to the supervisor.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits up to `timeout` for the supervisor to exit; its exit code (or 128+signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.map(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- forkq log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// The health address a daemon logged at start-up; 127.0.0.1:0 (nothing answers) if it exited
/// or said nothing within 20 s, so tests of failed start-ups go on to check the exit.
pub fn bound_address(log: &std::path::Path, child: &mut Child) -> SocketAddr {
    let marker = "health endpoint on http://";
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        found = text
            .split(marker)
            .nth(1)
            .and_then(|rest| rest.split('/').next()?.parse().ok());
        found.is_some() || child.try_wait().ok().flatten().is_some()
    });
    found.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())
}

/// A minimal HTTP/1.0 GET with a 5 s timeout.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z')
}

/// A process's state letter from /proc (`R`, `S`, `T` stopped, `Z` zombie…), `None` when gone.
pub fn process_state(pid: i32) -> Option<char> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()?
        .rsplit(')')
        .next()?
        .trim_start()
        .chars()
        .next()
}

/// A schema name of its own that is dropped at the end but never migrated, for tests of the
/// migrations themselves and of commands run against an un-migrated schema.
pub struct FreshSchema(pub String);

impl FreshSchema {
    /// Picks `t_<prefix>_<pid>_<n>` and makes sure it does not exist.
    pub fn new(prefix: &str) -> FreshSchema {
        let name = format!(
            "t_{prefix}_{}_{}",
            std::process::id(),
            SCHEMA_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        connect()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
            .unwrap();
        FreshSchema(name)
    }
}

impl Drop for FreshSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&database_url(), postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0));
        }
    }
}

/// The first fenced `sh` block of the section of `markdown` whose heading starts with `heading`
/// (a `## ` heading).
pub fn doc_block(markdown: &str, heading: &str) -> String {
    let section = markdown
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("no section {heading:?}"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap_or_else(|| panic!("section {heading:?} has no ```sh block"));
    block.split("\n```").next().unwrap().to_string() + "\n"
}

/// A documentation script run as written: what it printed and the directory it ran in.
pub struct DocRun {
    /// How bash ended; `None` when it did not within the timeout (then it was killed).
    pub status: Option<std::process::ExitStatus>,
    /// Its stdout and stderr.
    pub printed: String,
    /// Where it ran (its files are there).
    pub dir: PathBuf,
}

/// Runs `script` with `bash -e -u -o pipefail` in a fresh directory `name` where
/// `target/release/forkq` is the binary under test, against schema `schema` (not migrated by
/// this), up to `timeout`; its whole process group is killed at the end.
pub fn run_doc_script(name: &str, script: &str, schema: &str, timeout: Duration) -> DocRun {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(forkq_bin(), dir.join("target/release/forkq")).unwrap();
    let output = dir.join("output.txt");
    let out = std::fs::File::create(&output).unwrap();
    let mut bash = Command::new("bash");
    bash.args(["-e", "-u", "-o", "pipefail", "-c", script])
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url())
        .env("FORKQ_SCHEMA", schema)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut bash, 0);
    let mut child = bash.spawn().expect("bash runs the script");
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
    DocRun {
        status,
        printed: std::fs::read_to_string(&output).unwrap_or_default(),
        dir,
    }
}
