//! A real `forkq run` (or the benchmark's own library worker) as a separate process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::db::{BenchResult, BenchSchema};
use crate::sys;

/// Which program runs the fleet.
#[derive(Clone, Copy)]
pub enum Program {
    /// The release `forkq` binary with its builtin handler.
    Forkq,
    /// This binary's `worker` mode: `forkq::run` with a handler that stamps its start time.
    StampWorker,
}

/// Where the programs are and where logs go.
#[derive(Clone)]
pub struct Programs {
    /// The `forkq` binary.
    pub forkq: PathBuf,
    /// This binary.
    pub bench: PathBuf,
    /// Directory for daemon logs and stamp files.
    pub work_dir: PathBuf,
}

/// A running daemon; its whole process group is killed (by the supervisor's pid) when dropped.
pub struct Daemon {
    child: Child,
    /// Where its probe listens.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts a fleet of `concurrency` children on `schema` with extra environment.
    pub fn spawn(
        programs: &Programs,
        program: Program,
        schema: &BenchSchema,
        concurrency: usize,
        extra: &[(&str, String)],
    ) -> BenchResult<Daemon> {
        let port = sys::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = programs
            .work_dir
            .join(format!("{}-{port}.log", schema.name));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = match program {
            Program::Forkq => {
                let mut c = Command::new(&programs.forkq);
                c.arg("run");
                c
            }
            Program::StampWorker => {
                let mut c = Command::new(&programs.bench);
                c.arg("worker");
                c
            }
        };
        let url = schema.tagged_url();
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .env("FORKQ_SCHEMA", &schema.name)
            .env("FORKQ_HEALTH_ADDR", addr.to_string())
            .env("FORKQ_CONCURRENCY", concurrency.to_string())
            .env("FORKQ_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn()?;
        Ok(Daemon { child, addr, log })
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The supervisor and every process it forked.
    pub fn all_pids(&self) -> Vec<i32> {
        let mut pids = vec![self.pid()];
        pids.extend(sys::descendants(self.pid()));
        pids
    }

    /// /livez as JSON (whatever its status), or `None` when the probe does not answer.
    pub fn livez(&self) -> Option<Value> {
        let (_, body) = sys::http_get(self.addr, "/livez")?;
        serde_json::from_str(&body).ok()
    }

    /// Jobs the fleet finished successfully so far, from /livez (shared memory only: /metrics
    /// would also query the database, and a benchmark polling it would measure itself).
    pub fn succeeded(&self) -> Option<u64> {
        self.slot_sum("jobs_succeeded")
    }

    /// The sum of one counter of /livez over the slots (`jobs_succeeded`, `claims`,
    /// `claim_turns_missed`).
    pub fn slot_sum(&self, counter: &str) -> Option<u64> {
        let body = self.livez()?;
        Some(
            body["slots"]
                .as_array()?
                .iter()
                .filter_map(|s| s[counter].as_u64())
                .sum(),
        )
    }

    /// The children's pids by slot, with their state.
    pub fn slots(&self) -> Vec<(i32, String)> {
        self.livez()
            .and_then(|body| {
                Some(
                    body["slots"]
                        .as_array()?
                        .iter()
                        .map(|s| {
                            (
                                s["pid"].as_i64().unwrap_or(0) as i32,
                                s["state"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Waits until every child has polled once (no slot is still starting).
    pub fn wait_ready(&mut self, concurrency: usize, timeout: Duration) -> BenchResult<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let slots = self.slots();
            if slots.len() == concurrency
                && slots
                    .iter()
                    .all(|(pid, state)| *pid > 0 && state != "starting")
            {
                return Ok(());
            }
            self.still_running()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the fleet was not ready within {timeout:?}; log: {}",
            tail(&self.log)
        )
        .into())
    }

    /// An error naming the exit and the log's tail if the supervisor has exited.
    pub fn still_running(&mut self) -> BenchResult<()> {
        match self.child.try_wait()? {
            Some(status) => {
                Err(format!("forkq exited with {status}; log: {}", tail(&self.log)).into())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The daemon runs in its own process group, whose id is the supervisor's pid.
        let group = nix::unistd::Pid::from_raw(-self.pid());
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
