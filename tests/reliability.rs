//! Fault injection: forkq broken the way production breaks it, against real processes and a real
//! PostgreSQL. `make test` runs the short versions; `make chaos` (FORKQ_CHAOS=long) the long ones.
//! Figures are printed (run with --nocapture) and collected in docs/reliability.md.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, Daemon, TestSchema};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

fn long_run() -> bool {
    std::env::var("FORKQ_CHAOS").is_ok_and(|v| v == "long")
}

/// A coproc handler that appends "<job id>\n" to `record` for every execution (O_APPEND, one
/// write per line, so concurrent children never interleave) and succeeds.
fn recording_coproc(dir: &Path, record: &Path) -> String {
    let script = dir.join("record.py");
    std::fs::write(
        &script,
        format!(
            r#"import json, os, sys
fd = os.open({record:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for line in sys.stdin:
    job = json.loads(line)
    os.write(fd, (str(job["id"]) + "\n").encode())
    sys.stdout.write(json.dumps({{"id": job["id"], "ok": True, "result": None}}) + "\n")
    sys.stdout.flush()
"#,
            record = record.to_str().unwrap()
        ),
    )
    .unwrap();
    format!("coproc:python3 {}", script.display())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn total_attempts_beyond_first(schema: &TestSchema) -> i64 {
    schema.count("SELECT coalesce(sum(attempt - 1), 0)::bigint FROM {s}.jobs_archive")
}

/// Kill storm: a random child is killed with SIGKILL about every 50 ms (a 20 ms sleep, the probe's
/// answer and a count) while jobs drain. Every job must complete exactly once in the archive, none
/// lost or failed; re-runs are bounded by kills × prefetch, and only the job in flight at each kill
/// is charged an attempt.
#[test]
fn kill_storm_loses_nothing() {
    let jobs = if long_run() { 20_000 } else { 3_000 };
    let schema = TestSchema::new("storm");
    let dir = temp_dir("storm");
    let record = dir.join("executions");
    let handler = recording_coproc(&dir, &record);
    schema.enqueue_n("default", "record", json!({}), jobs);
    // Each kill charges the job in flight an attempt (it may be what killed its worker). One of
    // the four children dies about every 50 ms, so each lives about 200 ms, while a fresh child's
    // first job waits for its coprocess to start: in a fresh-clone `.ci/run` the last job left
    // was killed in every child that took it until its 25 attempts were spent, and was
    // dead-lettered. The storm is no job's fault: the attempts are made plenty, so this test sees
    // what it is about, loss and wrong charges.
    schema.set_max_attempts(1000);
    let prefetch = 10;
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "4"),
            ("FORKQ_PREFETCH", "10"),
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_HEALTHY_UPTIME_SECONDS", "1"),
            ("FORKQ_CRASH_LOOP_THRESHOLD", "1000"),
            ("FORKQ_RESTART_BACKOFF_BASE_MS", "10"),
            ("FORKQ_RESTART_BACKOFF_MAX_MS", "50"),
            ("FORKQ_LEASE_SECONDS", "5"),
        ],
    );
    let started = Instant::now();
    let mut kills = 0u64;
    let drained = wait_until(
        Duration::from_secs(if long_run() { 600 } else { 120 }),
        || {
            let pids: Vec<i32> = daemon.child_pids().into_iter().filter(|&p| p > 0).collect();
            if !pids.is_empty() {
                let victim = pids[fastrand::usize(..pids.len())];
                if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
                    kills += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            schema.archived("completed") == jobs as i64
        },
    );
    let elapsed = started.elapsed();
    assert!(
        drained,
        "drain did not finish: {} of {jobs} completed",
        schema.archived("completed")
    );
    let executions = std::fs::read_to_string(&record).unwrap().lines().count() as i64;
    let reruns = executions - jobs as i64;
    let charged = total_attempts_beyond_first(&schema);
    println!(
        "kill storm: {jobs} jobs, {kills} kills in {elapsed:.1?}, {executions} executions, \
         {reruns} re-runs, {charged} extra attempts charged, 0 lost, {} failed",
        schema.archived("failed")
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs"),
        0,
        "jobs left in the hot table"
    );
    assert_eq!(schema.archived("failed"), 0);
    assert_eq!(schema.archived("completed"), jobs as i64);
    assert!(
        reruns >= 0,
        "fewer executions than jobs: a job completed without running"
    );
    assert!(
        reruns as u64 <= kills * prefetch,
        "{reruns} re-runs for {kills} kills"
    );
    assert!(
        charged as u64 <= kills,
        "{charged} attempts charged for {kills} kills: innocent jobs were charged"
    );
}

/// The supervisor is killed with SIGKILL mid-drain: its children die with it, and a new
/// `forkq run` recovers every leased job within one lease and finishes the drain.
#[test]
fn supervisor_killed_mid_drain_recovers_within_one_lease() {
    let schema = TestSchema::new("supkill");
    schema.enqueue_n("default", "sleep", json!({"ms": 20}), 400);
    let env = [
        ("FORKQ_CONCURRENCY", "4"),
        ("FORKQ_LEASE_SECONDS", "4"),
        ("FORKQ_PREFETCH", "5"),
    ];
    let mut first = Daemon::start(&schema, &env);
    assert!(wait_until(Duration::from_secs(30), || schema
        .archived("completed")
        >= 50));
    let children: Vec<i32> = first.child_pids();
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(3), || children
            .iter()
            .all(|&p| !common::process_alive(p))),
        "children outlived the supervisor"
    );
    let leased = schema.live("running");
    println!("supervisor killed with {leased} job(s) leased");
    let restarted = Instant::now();
    let _second = Daemon::start(&schema, &env);
    assert!(
        wait_until(Duration::from_secs(60), || schema.archived("completed")
            == 400),
        "drain did not finish after restart"
    );
    let recovered_after = restarted.elapsed();
    println!("new daemon finished the drain {recovered_after:.1?} after start (lease 4 s)");
    assert_eq!(schema.archived("failed"), 0);
}

/// A private PostgreSQL cluster on its own port, stopped and removed when dropped.
struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn start(name: &str) -> PrivateCluster {
        let bin = ["/usr/lib/postgresql/15/bin", "/usr/local/bin"]
            .iter()
            .map(PathBuf::from)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
            .expect("initdb and pg_ctl installed");
        let dir = temp_dir(name);
        let port = common::free_port();
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        let ok = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-D"])
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "initdb failed");
        let cluster = PrivateCluster { dir, bin, port };
        cluster.pg_ctl(&["start", "-w"]);
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let ok = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-o", &options])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "pg_ctl {args:?} failed");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `forkq` against the private cluster.
fn forkq_on(url: &str, args: &[&str]) {
    let out = Command::new(common::forkq_bin())
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "forkq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The default schema on a private cluster, migrated.
struct ClusterSchema {
    url: String,
}

impl ClusterSchema {
    fn migrate(url: &str) -> ClusterSchema {
        let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
        forkq::queue::migrations::migrate(&mut client, "forkq").unwrap();
        ClusterSchema {
            url: url.to_string(),
        }
    }

    fn count(&self, sql: &str) -> Option<i64> {
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls).ok()?;
        client.query_one(sql, &[]).ok().map(|r| r.get(0))
    }
}

fn spawn_on(
    url: &str,
    extra: &[(&str, &str)],
) -> (std::process::Child, std::net::SocketAddr, PathBuf) {
    static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("private-{}-{n}.log", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(common::forkq_bin());
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env("FORKQ_HEALTH_ADDR", "127.0.0.1:0")
        .env("FORKQ_CONCURRENCY", "4")
        .envs(extra.iter().copied())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let addr = common::bound_address(&log, &mut child);
    (child, addr, log)
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Samples /livez and /readyz every 50 ms while `during` runs; returns (livez codes, readyz codes).
fn sample_probes(
    addr: std::net::SocketAddr,
    mut during: impl FnMut() -> bool,
) -> (Vec<u16>, Vec<u16>) {
    let mut live = Vec::new();
    let mut ready = Vec::new();
    while during() {
        live.push(common::http_get(addr, "/livez").map_or(0, |(c, _)| c));
        ready.push(common::http_get(addr, "/readyz").map_or(0, |(c, _)| c));
        std::thread::sleep(Duration::from_millis(50));
    }
    (live, ready)
}

/// PostgreSQL restarted mid-drain, then every forkq connection terminated: children reconnect,
/// liveness stays 200, readiness goes 503 and back, nothing is lost.
#[test]
fn database_restart_and_connection_loss_lose_nothing() {
    let cluster = PrivateCluster::start("pgrestart");
    let url = cluster.url();
    let db = ClusterSchema::migrate(&url);
    let jobs = 3_000;
    let lines: String = (0..jobs)
        .map(|_| "{\"task\":\"sleep\",\"payload\":{\"ms\":2}}\n")
        .collect();
    let file = cluster.dir.join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    forkq_on(&url, &["enqueue", "--jsonl", file.to_str().unwrap()]);
    let (child, addr, log) = spawn_on(&url, &[("FORKQ_LEASE_SECONDS", "5")]);
    let _guard = Killed(child);
    assert!(wait_until(Duration::from_secs(20), || db
        .count("SELECT count(*) FROM forkq.jobs_archive")
        .unwrap_or(0)
        >= 300));

    // 1. The server goes away and comes back (a restart, held down for two seconds).
    let stopped = Instant::now();
    cluster.pg_ctl(&["stop", "-m", "fast", "-w"]);
    let (live_down, ready_down) =
        sample_probes(addr, || stopped.elapsed() < Duration::from_secs(2));
    cluster.pg_ctl(&["start", "-w"]);
    let restarted = Instant::now();
    let mut ready_after = None;
    let (live_up, _) = sample_probes(addr, || {
        let ok = common::http_get(addr, "/readyz").is_some_and(|(c, _)| c == 200);
        if ok && ready_after.is_none() {
            ready_after = Some(restarted.elapsed());
        }
        !ok && restarted.elapsed() < Duration::from_secs(20)
    });
    println!("database down: livez {live_down:?}, readyz {ready_down:?}; ready again {ready_after:?} after start");
    assert!(
        live_down.iter().chain(&live_up).all(|&c| c == 200),
        "liveness depended on the database"
    );
    assert!(
        ready_down.iter().all(|&c| c == 503),
        "readiness stayed 200 without a database: {ready_down:?}"
    );
    assert!(ready_after.is_some(), "readiness did not come back");

    // 2. Every forkq connection terminated by an administrator.
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'forkq worker'",
                &[],
            )
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            == 4
    }));
    let terminated: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name LIKE 'forkq%') t",
            &[],
        )
        .unwrap()
        .get(0);
    println!("terminated {terminated} forkq connections");
    assert!(terminated >= 4);
    let t = Instant::now();
    let (live, _) = sample_probes(addr, || t.elapsed() < Duration::from_secs(2));
    assert!(
        live.iter().all(|&c| c == 200),
        "liveness failed after connections were terminated: {live:?}"
    );

    let done = wait_until(Duration::from_secs(90), || {
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state = 'completed'") == Some(jobs)
    });
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(done, "drain did not finish; log:\n{log_text}");
    assert_eq!(db.count("SELECT count(*) FROM forkq.jobs"), Some(0));
    assert_eq!(
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state = 'failed'"),
        Some(0)
    );
}

/// A job longer than its lease runs once: the lease is renewed while it runs.
#[test]
fn long_job_outlives_its_lease_and_runs_once() {
    let schema = TestSchema::new("longlease");
    let id = schema.enqueue("default", "sleep", json!({"ms": 7000}));
    let _daemon = Daemon::start(
        &schema,
        &[("FORKQ_LEASE_SECONDS", "4"), ("FORKQ_CONCURRENCY", "2")],
    );
    assert!(wait_until(Duration::from_secs(30), || schema
        .archived("completed")
        == 1));
    let job = schema.job(id).unwrap();
    assert_eq!(job["attempt"], 1, "the job ran more than once: {job}");
}

/// A child frozen past its lease: the job is rescued and completed by another child, and the
/// frozen child's late acknowledgement is refused when it wakes up. The stale window is below
/// two thirds of the lease, so the supervisor would kill a child frozen that long; a lease lapses
/// under a live child only when its whole host pauses (a suspended VM), supervisor included. The
/// test pauses the child and lapses the lease in the database, which is what the rest of the
/// fleet then sees.
#[test]
fn frozen_child_late_ack_is_refused() {
    let schema = TestSchema::new("frozen");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    let id = schema.enqueue("default", "sleep", json!({"ms": 1500}));
    let mut holder = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        daemon.livez().is_some_and(|(_, body)| {
            body["slots"].as_array().unwrap().iter().any(|s| {
                if s["job_id"].as_i64() == Some(id) {
                    holder = s["pid"].as_i64().unwrap() as i32;
                    true
                } else {
                    false
                }
            })
        })
    }));
    kill(Pid::from_raw(holder), Signal::SIGSTOP).unwrap();
    schema.count(&format!(
        "WITH lapsed AS (UPDATE {{s}}.jobs SET lease_expires_at = now() - interval '1 second' \
         WHERE id = {id} RETURNING 1) SELECT count(*) FROM lapsed"
    ));
    // Rescued by the next maintenance pass, run by the other child.
    let rescued = wait_until(Duration::from_secs(20), || {
        schema.archived("completed") == 1
    });
    kill(Pid::from_raw(holder), Signal::SIGCONT).unwrap();
    assert!(
        rescued,
        "the frozen child's job was not rescued; log:\n{}",
        daemon.log_text()
    );
    let job = schema.job(id).unwrap();
    // Its run was never reported started (no renewal came due in 1.5 s), so the expiry did not
    // charge it: the run that completed is attempt 1 again.
    assert_eq!(job["attempt"], 1, "{job}");
    assert!(
        daemon.wait_for_log("refused the result of job(s)", Duration::from_secs(10)),
        "the late ack was not reported as refused; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(schema.archived("completed"), 1);
}

/// SIGTERM while 8 children run jobs: exit within the shared deadline, every job either
/// completed or back in the queue, none stuck in running.
#[test]
fn shutdown_under_load_leaves_nothing_running() {
    let schema = TestSchema::new("shutload");
    schema.enqueue_n("default", "sleep", json!({"ms": 400}), 200);
    schema.enqueue_n("default", "sleep", json!({"ms": 30000}), 4);
    let mut daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "8"),
            ("FORKQ_SHUTDOWN_GRACE_SECONDS", "4"),
            ("FORKQ_PREFETCH", "3"),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let code = daemon.wait_exit(Duration::from_secs(15));
    let took = t.elapsed();
    println!("shutdown under load took {took:.1?}, exit {code:?}");
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(7),
        "shutdown took {took:?} with a 4 s deadline"
    );
    assert_eq!(
        schema.live("running"),
        0,
        "jobs left running after shutdown"
    );
    let total = schema.archived("completed") + schema.count("SELECT count(*) FROM {s}.jobs");
    assert_eq!(total, 204, "jobs lost");
}

/// Twenty-odd invalid settings: each stops `forkq run` with exit 78 and names the variable.
#[test]
fn invalid_settings_exit_78_naming_the_variable() {
    let cases: &[(&str, &str)] = &[
        ("FORKQ_CONCURRENCY", "zero"),
        ("FORKQ_CONCURRENCY", "0"),
        ("FORKQ_PREFETCH", "0"),
        ("FORKQ_PREFETCH", "100000"),
        ("FORKQ_ACK_DELAY_MS", "-1"),
        ("FORKQ_DURABLE", "perhaps"),
        ("FORKQ_LEASE_SECONDS", "1"),
        ("FORKQ_MAX_ATTEMPTS", "0"),
        ("FORKQ_RETRY_BACKOFF_BASE_SECONDS", "x"),
        ("FORKQ_POLL_INTERVAL_MS", "1"),
        ("FORKQ_LISTEN", "2"),
        ("FORKQ_MAX_PAYLOAD_BYTES", "1"),
        ("FORKQ_RETENTION_SECONDS", "-5"),
        ("FORKQ_HANDLER", "shell:rm"),
        ("FORKQ_HANDLER", "exec:"),
        ("FORKQ_ROUTES", "resize"),
        ("FORKQ_JOB_TIMEOUT_SECONDS", "1e3"),
        ("FORKQ_HEALTH_ADDR", "localhost"),
        ("FORKQ_HEALTH_STALE_SECONDS", "0"),
        // Not below two thirds of the default lease (30 s).
        ("FORKQ_HEALTH_STALE_SECONDS", "20"),
        ("FORKQ_CRASH_LOOP_THRESHOLD", "0"),
        ("FORKQ_HEALTHY_UPTIME_SECONDS", "0"),
        ("FORKQ_CRASH_LOOP_EXIT", "yes please"),
        ("FORKQ_SHUTDOWN_GRACE_SECONDS", "forever"),
        ("FORKQ_SCHEMA", "a\"; DROP TABLE x; --"),
        ("FORKQ_QUEUES", "a,,b"),
        ("DATABASE_URL", "mysql://x"),
    ];
    for (name, value) in cases {
        // Spawned in its own process group and killed after 10 s: if a validation ever regresses,
        // the daemon would start and run, and the test must fail rather than hang.
        let mut cmd = Command::new(common::forkq_bin());
        cmd.arg("run")
            .env_clear()
            .env("DATABASE_URL", common::database_url())
            .env("FORKQ_HEALTH_ADDR", "127.0.0.1:0")
            .env(name, value)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = Killed(cmd.spawn().unwrap());
        let pid = child.0.id() as i32;
        let exited = wait_until(Duration::from_secs(10), || !common::process_alive(pid));
        assert!(
            exited,
            "{name}={value:?}: forkq run started instead of refusing the setting"
        );
        let status = child.0.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(78), "{name}={value:?}: {stderr}");
        assert!(
            stderr.contains(name),
            "{name}={value:?}: message does not name it: {stderr}"
        );
    }
}

/// Bad input at enqueue is refused with a clear message and nothing is inserted.
#[test]
fn malformed_input_is_refused_at_enqueue() {
    let schema = TestSchema::new("badinput");
    let enqueue = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(common::forkq_bin())
            .arg("enqueue")
            .args(args)
            .envs(schema.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let cases: Vec<(Vec<&str>, Vec<u8>, &str)> = vec![
        (
            vec!["--task", "noop", "--payload", "{not json"],
            vec![],
            "not valid JSON",
        ),
        (
            vec!["--task", "noop", "--payload", r#"{"a":"\u0000"}"#],
            vec![],
            "\\u0000",
        ),
        (vec!["--task", "no\u{1}op"], vec![], "control"),
        (vec!["--task", ""], vec![], "empty"),
        (
            vec!["--jsonl", "-"],
            b"{\"task\":\"noop\"}\n{\"task\":\"noop\"\n".to_vec(),
            "line 2",
        ),
        (
            vec!["--jsonl", "-"],
            b"{\"task\":\"noop\",\"payload\":\"\xff\xfe\"}\n".to_vec(),
            "UTF-8",
        ),
        (
            vec!["--jsonl", "-"],
            b"{\"task\":\"noop\",\"bogus\":1}\n".to_vec(),
            "bogus",
        ),
    ];
    for (args, stdin, expect) in cases {
        let (code, stderr) = enqueue(&args, &stdin);
        assert_eq!(code, Some(65), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected {expect:?} in {stderr:?}"
        );
    }
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(2 << 20));
    let (code, stderr) = enqueue(
        &["--jsonl", "-"],
        format!("{{\"task\":\"noop\",\"payload\":{big}}}\n").as_bytes(),
    );
    assert_eq!(code, Some(65));
    assert!(stderr.contains("FORKQ_MAX_PAYLOAD_BYTES"), "{stderr}");
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs"),
        0,
        "a refused job was inserted"
    );
}

/// The probe answers only GET/HEAD on its paths and keeps answering liveness while 1,000 slow
/// clients hold connections open (loopback, bounded in count and time).
#[test]
fn probe_survives_slow_clients() {
    let schema = TestSchema::new("slowloris");
    let daemon = Daemon::start(&schema, &[]);
    let mut slow = Vec::new();
    for _ in 0..1000 {
        match std::net::TcpStream::connect_timeout(&daemon.addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n");
                slow.push(s);
            }
            Err(_) => break,
        }
    }
    println!("{} slow connections open", slow.len());
    let t = Instant::now();
    let answer = daemon.get("/livez");
    let took = t.elapsed();
    println!("/livez answered in {took:.1?} with 1,000 slow clients connected");
    assert_eq!(answer.map(|(c, _)| c), Some(200));
    drop(slow);
    let post = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://{}/livez", daemon.addr))
        .output();
    if let Ok(out) = post {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
    }
    assert_eq!(daemon.get("/nope").map(|(c, _)| c), Some(404));
}

/// A child that cannot stop (frozen with SIGSTOP) is killed at the shutdown deadline, and its
/// job goes back to the queue at once instead of waiting for its lease to expire.
#[test]
fn jobs_of_children_killed_at_the_deadline_go_back_at_once() {
    let schema = TestSchema::new("deadline");
    let mut daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_SHUTDOWN_GRACE_SECONDS", "2"),
            ("FORKQ_LEASE_SECONDS", "600"),
            ("FORKQ_HEALTH_STALE_SECONDS", "300"),
        ],
    );
    let id = schema.enqueue("default", "sleep", json!({"ms": 60000}));
    let mut holder = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        daemon.livez().is_some_and(|(_, body)| {
            body["slots"].as_array().unwrap().iter().any(|s| {
                holder = s["pid"].as_i64().unwrap_or(0) as i32;
                s["job_id"].as_i64() == Some(id)
            })
        })
    }));
    kill(Pid::from_raw(holder), Signal::SIGSTOP).unwrap();
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)), Some(0));
    let job = schema.job(id).unwrap();
    assert_eq!(job["state"], "available", "{job}\n{}", daemon.log_text());
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("shutdown deadline"),
        "{job}"
    );
}

/// A handler stuck in a loop that reports no progress: liveness turns 503 within the stale
/// window, the child is killed and replaced, the job runs again (then goes to the dead letter),
/// and the other child keeps draining meanwhile.
#[test]
fn wedged_handler_is_detected_killed_and_nothing_else_stalls() {
    let schema = TestSchema::new("wedged");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_DEMO_TASKS", "1"),
            ("FORKQ_HEALTH_STALE_SECONDS", "3"),
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    let limits = forkq::queue::producer::Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    };
    let wedged = forkq::queue::producer::enqueue(
        &mut schema.client(),
        &schema.name,
        &limits,
        &forkq::NewJob::new("default", "spin", json!({})).with_max_attempts(2),
    )
    .unwrap();
    let started = Instant::now();
    let mut saw_stale = None;
    let mut completed_meanwhile = 0;
    let settled = wait_until(Duration::from_secs(40), || {
        if saw_stale.is_none()
            && daemon
                .livez()
                .is_some_and(|(code, body)| code == 503 && body["check"] == "stale")
        {
            saw_stale = Some(started.elapsed());
        }
        schema.enqueue("default", "sleep", json!({"ms": 10}));
        completed_meanwhile = schema.archived("completed");
        schema.archived("failed") == 1
    });
    assert!(
        settled,
        "the wedged job was not dead-lettered; log:\n{}",
        daemon.log_text()
    );
    println!(
        "wedged handler: liveness 503 stale after {saw_stale:?}, dead-lettered after 2 attempts in {:.1?}, \
         {completed_meanwhile} other jobs completed meanwhile",
        started.elapsed()
    );
    assert!(
        saw_stale.is_some(),
        "liveness never reported the wedged child"
    );
    let job = schema.job(wedged).unwrap();
    assert_eq!(job["attempt"], 2, "{job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("heartbeat"),
        "{job}"
    );
    assert!(completed_meanwhile > 10, "the healthy child stalled too");
    assert!(wait_until(Duration::from_secs(10), || daemon
        .livez()
        .is_some_and(|(c, _)| c == 200)));
}

/// The database refuses one job's result (a trigger stands in for any such refusal): the other
/// acknowledgements sent with it still land, the refused job goes to the dead letter with the
/// database's reason, and the child neither crashes nor loops on it.
#[test]
fn a_result_the_database_refuses_is_dead_lettered_alone() {
    let schema = TestSchema::new("refused");
    schema
        .client()
        .batch_execute(&format!(
            r#"CREATE FUNCTION "{s}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF NEW.state = 'completed' AND NEW.payload->>'refuse' = 'yes' THEN
                       RAISE EXCEPTION 'this result is refused on purpose';
                   END IF;
                   RETURN NEW;
               END $$;
               CREATE TRIGGER refuse BEFORE INSERT ON "{s}".jobs_archive
                   FOR EACH ROW EXECUTE FUNCTION "{s}".refuse();"#,
            s = schema.name
        ))
        .unwrap();
    schema.enqueue_n("default", "noop", json!({}), 50);
    let bad = schema.enqueue("default", "noop", json!({"refuse": "yes"}));
    schema.enqueue_n("default", "noop", json!({}), 50);
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "1")]);
    assert!(
        wait_until(Duration::from_secs(20), || schema.archived("completed")
            == 100
            && schema.archived("failed") == 1),
        "log:\n{}",
        daemon.log_text()
    );
    let job = schema.job(bad).unwrap();
    assert_eq!(job["state"], "failed");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("refused on purpose"),
        "{job}"
    );
    assert!(
        !daemon.log_text().contains("cannot recover"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.livez().map(|(c, _)| c), Some(200));
}

/// A coproc handler that appends "<job id> <wall-clock seconds>" to `record` when each job starts,
/// sleeps `payload.ms` milliseconds, and fails the job when `payload.fail` is true.
fn stamping_coproc(dir: &Path, record: &Path) -> String {
    let script = dir.join("stamp.py");
    std::fs::write(
        &script,
        format!(
            r#"import json, os, sys, time
fd = os.open({record:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for line in sys.stdin:
    job = json.loads(line)
    os.write(fd, ("%d %.6f\n" % (job["id"], time.time())).encode())
    payload = job.get("payload") or {{}}
    time.sleep(payload.get("ms", 0) / 1000.0)
    if payload.get("fail"):
        reply = {{"id": job["id"], "ok": False, "error": "told to fail"}}
    else:
        reply = {{"id": job["id"], "ok": True, "result": None}}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"#,
            record = record.to_str().unwrap()
        ),
    )
    .unwrap();
    format!("coproc:python3 {}", script.display())
}

/// The starts recorded by [`stamping_coproc`]: (job id, wall-clock seconds).
fn stamps(record: &Path) -> Vec<(i64, f64)> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (id, at) = l.split_once(' ')?;
            Some((id.parse().ok()?, at.parse().ok()?))
        })
        .collect()
}

/// PostgreSQL crashes (immediate stop) under a steady load, and a row is left `running` under a
/// busy worker's name that the worker does not hold (what an acknowledgement lost with an
/// asynchronous commit, or a claim whose reply was lost, leaves behind). A worker that renews
/// everything under its name keeps such rows alive for as long as it stays busy; a worker that
/// renews only what it holds gives them back at its next renewal, well within one lease, while
/// the load goes on. Nothing enqueued before the crash is lost or left running.
#[test]
fn database_crash_under_load_strands_nothing() {
    let cluster = PrivateCluster::start("pgcrash");
    let url = cluster.url();
    let db = ClusterSchema::migrate(&url);
    let (child, _addr, log) = spawn_on(
        &url,
        &[("FORKQ_CONCURRENCY", "3"), ("FORKQ_LEASE_SECONDS", "30")],
    );
    let _guard = Killed(child);
    // About 40 jobs a second from a producer that reconnects through the crash.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut client = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if client.is_none() {
                    client = postgres::Client::connect(&url, postgres::NoTls).ok();
                }
                if let Some(c) = client.as_mut() {
                    let sent = c.execute(
                        "SELECT forkq.enqueue('default', 'sleep', '{\"ms\": 20}')",
                        &[],
                    );
                    if sent.is_err() {
                        client = None;
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || db
            .count("SELECT count(*) FROM forkq.jobs_archive")
            .unwrap_or(0)
            >= 100),
        "fewer than 100 jobs done in 30 s before the crash; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    cluster.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    cluster.pg_ctl(&["start", "-w"]);
    let before = db
        .count("SELECT coalesce(max(id), 0) FROM forkq.jobs")
        .unwrap()
        .max(db.count("SELECT max(id) FROM forkq.jobs_archive").unwrap());
    // A stray: a waiting job made to look claimed by a busy worker under its own name.
    assert!(
        wait_until(Duration::from_secs(30), || db
            .count("SELECT count(*) FROM forkq.jobs WHERE state = 'running'")
            .unwrap_or(0)
            > 0),
        "no job running within 30 s of the restart; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let stray: i64 = client
        .query_one(
            "SELECT forkq.enqueue('default', 'sleep', '{\"ms\": 20}', run_at => now() + interval '1 hour')",
            &[],
        )
        .unwrap()
        .get(0);
    client
        .execute(
            "UPDATE forkq.jobs SET state = 'running', attempt = 1, lease_token = 42,
                    lease_expires_at = now() + interval '30 seconds',
                    lease_owner = (SELECT lease_owner FROM forkq.jobs
                                   WHERE state = 'running' AND lease_owner IS NOT NULL LIMIT 1)
             WHERE id = $1",
            &[&stray],
        )
        .unwrap();
    let injected = Instant::now();
    // While the load goes on: the stray is given back (and, due in an hour, waits again) before
    // its 30 s lease could expire, and every job of before the crash completes.
    let settled = wait_until(Duration::from_secs(25), || {
        db.count(&format!(
            "SELECT count(*) FROM forkq.jobs WHERE id <= {before} OR (id = {stray} AND state = 'running')"
        )) == Some(0)
    });
    let left = db.count(&format!(
        "SELECT count(*) FROM forkq.jobs WHERE (id <= {before} OR id = {stray}) AND state = 'running'"
    ));
    println!(
        "settled: {settled} {:.1?} after the stray was made (still running: {left:?})",
        injected.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.join().unwrap();
    assert!(
        settled,
        "{left:?} job(s) still running under a worker that does not hold them; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state = 'failed'"),
        Some(0)
    );
}

/// Two daemons share one claim turn (`FORKQ_CLAIMERS=1`), so most of their claims queue for it
/// in a transaction of their own (`Consumer::claim_in_turn`: a lock wait, the round, a commit),
/// while a random child of either is killed at every look (about every 130 ms: a 50 ms sleep and
/// the probes' answers) and PostgreSQL crashes once (immediate stop) mid-drain. A claim cut off anywhere in that transaction claimed nothing; one that
/// committed is the worker's, and its jobs run or go back. Every job runs at least once and
/// completes; none is lost, failed or left running.
#[test]
fn scarce_claim_turns_through_kills_and_a_crash_lose_nothing() {
    let jobs: i64 = if long_run() { 20_000 } else { 3_000 };
    let cluster = PrivateCluster::start("turncrash");
    let url = cluster.url();
    let db = ClusterSchema::migrate(&url);
    let dir = temp_dir("turncrash-record");
    let record = dir.join("executions");
    let handler = recording_coproc(&dir, &record);
    let env = [
        ("FORKQ_CONCURRENCY", "3"),
        ("FORKQ_PREFETCH", "10"),
        ("FORKQ_CLAIMERS", "1"),
        ("FORKQ_HOST_INTERVAL_SECONDS", "1"),
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_HEALTHY_UPTIME_SECONDS", "1"),
        ("FORKQ_CRASH_LOOP_THRESHOLD", "1000"),
        ("FORKQ_RESTART_BACKOFF_BASE_MS", "10"),
        ("FORKQ_RESTART_BACKOFF_MAX_MS", "50"),
        ("FORKQ_LEASE_SECONDS", "5"),
    ];
    // As common's daemons (killed by their group on drop, their logs printed on a failure), so
    // their children and metrics are read as other tests read them.
    let daemons = [spawn_on(&url, &env), spawn_on(&url, &env)].map(|(child, addr, log)| Daemon {
        child,
        addr,
        log,
    });
    // Each daemon counts two hosts from the other's first row, read at its own next write; from
    // then on the database grants the one turn alone (see claim_gate::fleet).
    assert!(wait_until(Duration::from_secs(20), || {
        db.count("SELECT count(*) FROM forkq.hosts") == Some(2)
    }));
    std::thread::sleep(Duration::from_secs(2));
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let all: std::collections::HashSet<i64> = client
        .query(
            "INSERT INTO forkq.jobs (queue, task, payload)
             SELECT 'default', 'record', '{}' FROM generate_series(1, $1::bigint) RETURNING id",
            &[&jobs],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    client
        .execute(
            "SELECT pg_notify($1, '')",
            &[&forkq::queue::sql::channel("forkq")],
        )
        .unwrap();
    let completed = || {
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state = 'completed'")
            .unwrap_or(0)
    };
    // Each turn missed is counted by the daemon that missed it, kills and restarts included
    // (the slots outlive their children); the highest reading of each is kept.
    let missed = |daemon: &Daemon| -> u64 {
        daemon
            .get("/metrics")
            .and_then(|(_, text)| {
                text.lines()
                    .find_map(|l| l.strip_prefix("forkq_claim_turns_missed_total "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let (mut kills, mut crashed, mut most_missed) = (0u64, false, [0u64; 2]);
    let started = Instant::now();
    let drained = wait_until(Duration::from_secs(180), || {
        let done = completed();
        if !crashed && done >= jobs / 3 {
            cluster.pg_ctl(&["stop", "-m", "immediate", "-w"]);
            cluster.pg_ctl(&["start", "-w"]);
            crashed = true;
        }
        if done < jobs * 9 / 10 {
            let pids: Vec<i32> = daemons
                .iter()
                .flat_map(Daemon::child_pids)
                .filter(|&p| p > 0)
                .collect();
            if !pids.is_empty() {
                let victim = pids[fastrand::usize(..pids.len())];
                if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
                    kills += 1;
                }
            }
        }
        for (most, daemon) in most_missed.iter_mut().zip(&daemons) {
            *most = (*most).max(missed(daemon));
        }
        std::thread::sleep(Duration::from_millis(50));
        done == jobs
    });
    let executions = std::fs::read_to_string(&record).unwrap_or_default();
    let ran: std::collections::HashSet<i64> =
        executions.lines().filter_map(|l| l.parse().ok()).collect();
    println!(
        "scarce turns: {jobs} jobs, {kills} kills and one crash in {:.1?}, {} executions \
         ({} distinct), {} claim rounds found no turn",
        started.elapsed(),
        executions.lines().count(),
        ran.len(),
        most_missed.iter().sum::<u64>()
    );
    assert!(
        drained,
        "{} of {jobs} completed ({:?} left running)",
        completed(),
        db.count("SELECT count(*) FROM forkq.jobs WHERE state = 'running'"),
    );
    assert!(crashed, "the drain ended before the crash");
    assert_eq!(db.count("SELECT count(*) FROM forkq.jobs"), Some(0));
    assert_eq!(
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state <> 'completed'"),
        Some(0)
    );
    assert_eq!(
        all.difference(&ran).count(),
        0,
        "jobs completed without running"
    );
    assert!(
        most_missed.iter().sum::<u64>() > 0,
        "no round found the turn taken: the queue for turns was not tested"
    );
}

/// A whole daemon killed (every process of its group) while it holds prefetched jobs that allow
/// one attempt: the jobs it never started must not be charged when their leases expire; only a
/// job that may have started can reach the dead letter.
#[test]
fn host_death_charges_only_jobs_that_started() {
    let schema = TestSchema::new("hostdeath");
    let dir = temp_dir("hostdeath");
    let record = dir.join("starts");
    let handler = stamping_coproc(&dir, &record);
    let jobs = 3_000;
    schema.enqueue_n("default", "stamp", json!({}), jobs);
    schema.set_max_attempts(1);
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_CONCURRENCY", "4"),
        ("FORKQ_LEASE_SECONDS", "4"),
    ];
    let first = Daemon::start(&schema, &env);
    assert!(wait_until(Duration::from_secs(60), || schema
        .archived("completed")
        >= 300));
    // The host dies: every process of the daemon at once.
    kill(Pid::from_raw(-first.pid()), Signal::SIGKILL).unwrap();
    let held = schema.live("running");
    drop(first);
    let _second = Daemon::start(&schema, &env);
    assert!(wait_until(Duration::from_secs(60), || schema
        .archived("completed")
        + schema.archived("failed")
        == jobs as i64));
    let started: std::collections::HashSet<i64> =
        stamps(&record).into_iter().map(|(id, _)| id).collect();
    let mut client = schema.client();
    let failed: Vec<i64> = client
        .query(
            &format!(
                "SELECT id FROM \"{}\".jobs_archive WHERE state = 'failed'",
                schema.name
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unrecorded = failed.iter().filter(|id| !started.contains(id)).count();
    println!(
        "killed holding {held} running job(s); dead-lettered {} ({unrecorded} without a start \
         record: handed to a program that had not read it yet)",
        failed.len()
    );
    assert!(held > 4, "the daemon held only {held} jobs when killed");
    // Only the jobs in flight, at most one per child, may have started, so only they may have
    // been charged; the prefetched ones went back as they were.
    assert!(failed.len() <= 4, "{} jobs dead-lettered", failed.len());
}

/// A job that takes its whole host down every time it runs: each new daemon runs it and dies.
/// It is not charged for the first death (it might have been a bystander), but once a suspect its
/// start is recorded, so it reaches the dead letter after at most max_attempts + 1 deaths.
#[test]
fn a_job_that_kills_its_host_reaches_the_dead_letter() {
    let schema = TestSchema::new("poison");
    let dir = temp_dir("poison");
    let script = dir.join("poison.sh");
    // The handler's parent is the forkq child; its process group is the whole daemon.
    std::fs::write(
        &script,
        "#!/bin/bash\ngroup=$(ps -o pgid= -p $PPID | tr -d ' ')\nkill -KILL -- -$group\nsleep 5\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let handler = format!("exec:{}", script.display());
    let mut client = schema.client();
    client
        .execute(
            &format!(
                "SELECT \"{}\".enqueue('default', 'poison', max_attempts => 2)",
                schema.name
            ),
            &[],
        )
        .unwrap();
    let env = [
        ("FORKQ_HANDLER", handler.as_str()),
        ("FORKQ_CONCURRENCY", "1"),
        ("FORKQ_LEASE_SECONDS", "4"),
    ];
    let mut deaths = 0;
    while schema.archived("failed") == 0 && deaths < 6 {
        // Not `start`: the job may kill the daemon before it has answered a health check.
        let mut daemon = Daemon::spawn(&schema, &env);
        let ended = daemon.wait_exit(Duration::from_secs(30));
        if ended.is_some() {
            deaths += 1;
        }
        // The daemon that finds the job dead-lettered by its rescue lives on: stop it.
        if ended.is_none() {
            break;
        }
    }
    let job = schema.job(1).unwrap();
    println!("host deaths before the dead letter: {deaths}; job: {job}");
    assert_eq!(job["state"], "failed", "{job}");
    assert!(deaths <= 3, "{deaths} host deaths for max_attempts = 2");
}

/// Jobs waiting or running, counted in one statement: two counts taken one after the other can miss
/// the jobs claimed between them (0 running, then 0 available once the children had claimed all
/// 300 of a batch); fail_fast_reaches_prefetched_siblings once read its batch still open so.
const UNSETTLED: &str = "SELECT count(*) FROM {s}.jobs WHERE state IN ('available', 'running')";

/// A fail-fast batch whose third child fails while the siblings are claimed ahead (the children
/// were warmed up by fast jobs, so each claims many): no sibling starts after the failure has
/// been committed and each child's next round trip has passed, and the ones that never started
/// end cancelled.
#[test]
fn fail_fast_reaches_prefetched_siblings() {
    let schema = TestSchema::new("failfastpf");
    let dir = temp_dir("failfastpf");
    let record = dir.join("starts");
    let handler = stamping_coproc(&dir, &record);
    let _daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", handler.as_str()),
            ("FORKQ_CONCURRENCY", "4"),
        ],
    );
    // Fast jobs first, so the children's claims grow to the prefetch.
    schema.enqueue_n("default", "stamp", json!({}), 2_000);
    let client = forkq::Client::new(&schema.config(&[])).unwrap();
    assert!(wait_until(Duration::from_secs(60), || schema
        .count(UNSETTLED)
        == 0));
    let children: Vec<forkq::NewJob> = (0..300)
        .map(|i| {
            let payload = if i == 2 {
                json!({"fail": true})
            } else {
                json!({"ms": 10})
            };
            forkq::NewJob::new("default", "stamp", payload).with_max_attempts(1)
        })
        .collect();
    let batch = client
        .enqueue_batch(&forkq::NewBatch::new("default").with_fail_fast(), &children)
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || schema
        .count(UNSETTLED)
        == 0));
    let mut db = schema.client();
    let row = db
        .query_one(
            &format!(
                "SELECT state, cancelled, extract(epoch FROM finished_at)::float8
                 FROM \"{}\".batches WHERE id = $1",
                schema.name
            ),
            &[&batch],
        )
        .unwrap();
    let (state, cancelled, failed_at): (String, i32, f64) = (row.get(0), row.get(1), row.get(2));
    let ids: std::collections::HashSet<i64> = db
        .query(
            &format!(
                "SELECT id FROM \"{}\".jobs_archive WHERE batch_id = $1",
                schema.name
            ),
            &[&batch],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let late: Vec<f64> = stamps(&record)
        .into_iter()
        .filter(|(id, at)| ids.contains(id) && *at > failed_at)
        .map(|(_, at)| at - failed_at)
        .collect();
    let latest = late.iter().copied().fold(0.0, f64::max);
    println!(
        "batch {state}, {cancelled} cancelled; {} sibling(s) started after the failure, the last {latest:.3} s after",
        late.len()
    );
    assert_eq!(state, "failed");
    assert!(cancelled >= 100, "only {cancelled} siblings cancelled");
    assert!(
        latest < 0.3,
        "a sibling started {latest:.3} s after the batch failed"
    );
}

/// Two children warmed up by fast jobs (so each claims a hundred at a time), then one job of
/// 10 s followed by 200 fast ones: the child that claims the slow job claims the next 99 with it.
/// They must go back to the queue for the idle sibling instead of waiting 10 s behind it.
#[test]
fn fast_jobs_do_not_wait_behind_a_slow_one() {
    let schema = TestSchema::new("behindslow");
    let _daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    schema.enqueue_n("default", "noop", json!({}), 2_000);
    assert!(wait_until(Duration::from_secs(60), || schema
        .archived("completed")
        == 2_000));
    let mut db = schema.client();
    db.batch_execute(&format!(
        "BEGIN;
         SELECT \"{s}\".enqueue('default', 'sleep', '{{\"ms\": 10000}}');
         INSERT INTO \"{s}\".jobs (queue, task) SELECT 'default', 'noop' FROM generate_series(1, 200);
         SELECT pg_notify('forkq_{s}', 'default');
         COMMIT;",
        s = schema.name
    ))
    .unwrap();
    assert!(wait_until(Duration::from_secs(60), || schema
        .archived("completed")
        == 2_201));
    let row = db
        .query_one(
            &format!(
                "WITH slow AS (SELECT finished_at - interval '10 seconds' AS started
                               FROM \"{s}\".jobs_archive WHERE task = 'sleep')
                 SELECT count(*) FILTER (WHERE a.finished_at > slow.started + interval '2 seconds'),
                        extract(epoch FROM max(a.finished_at) - slow.started)::float8
                 FROM \"{s}\".jobs_archive a, slow
                 WHERE a.task = 'noop' AND a.finished_at > slow.started - interval '1 second'
                 GROUP BY slow.started",
                s = schema.name
            ),
            &[],
        )
        .unwrap();
    let (late, worst): (i64, f64) = (row.get(0), row.get(1));
    println!(
        "{late} fast job(s) finished over 2 s after the slow one started (last: {worst:.2} s)"
    );
    assert_eq!(late, 0, "fast jobs waited behind the slow one");
}

/// Slot restart counts from /livez, by slot.
fn restarts(addr: std::net::SocketAddr) -> Vec<u64> {
    common::http_get(addr, "/livez")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .map(|body| {
            body["slots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["restarts"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// A database outage longer than the stale window, with the fleet busy: 8 children on this
/// 2-CPU machine (so half of them wait at the claim gate), stale window 5 s, PostgreSQL stopped
/// for 12 s (long: 20 s). Waiting on the database is being alive: no child is killed, `/livez`
/// stays 200 throughout, and the drain finishes once the database is back, nothing lost.
#[test]
fn a_database_outage_kills_no_healthy_child() {
    let outage = Duration::from_secs(if long_run() { 20 } else { 12 });
    let cluster = PrivateCluster::start("outage");
    let url = cluster.url();
    let db = ClusterSchema::migrate(&url);
    // Tiny jobs: the children spend their time in claim round trips, so when the database goes
    // away most of them are at the claim gate or in a claim.
    let jobs = 50_000;
    let lines: String = (0..jobs).map(|_| "{\"task\":\"noop\"}\n").collect();
    let file = cluster.dir.join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    forkq_on(&url, &["enqueue", "--jsonl", file.to_str().unwrap()]);
    let (child, addr, log) = spawn_on(
        &url,
        &[
            ("FORKQ_CONCURRENCY", "8"),
            ("FORKQ_HEALTH_STALE_SECONDS", "5"),
        ],
    );
    let _guard = Killed(child);
    assert!(wait_until(Duration::from_secs(30), || db
        .count("SELECT count(*) FROM forkq.jobs_archive")
        .unwrap_or(0)
        >= 2_000));
    let before = restarts(addr);
    assert_eq!(before.len(), 8);

    let stopped = Instant::now();
    cluster.pg_ctl(&["stop", "-m", "fast", "-w"]);
    let (live, _) = sample_probes(addr, || stopped.elapsed() < outage);
    cluster.pg_ctl(&["start", "-w"]);
    let after = restarts(addr);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let red = live.iter().filter(|&&c| c != 200).count();
    let killed = log_text().matches("is wedged").count();
    println!(
        "database down {outage:?}, 8 children, stale 5 s: /livez not 200 in {red} of {} samples, \
         {killed} child(ren) killed as wedged, restarts {before:?} -> {after:?}",
        live.len()
    );
    assert_eq!(
        killed,
        0,
        "healthy children were killed; log:\n{}",
        log_text()
    );
    assert_eq!(red, 0, "liveness failed during the outage: {live:?}");
    assert_eq!(before, after, "children died during the outage");

    let done = wait_until(Duration::from_secs(90), || {
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state = 'completed'") == Some(jobs)
    });
    assert!(done, "drain did not finish; log:\n{}", log_text());
    assert_eq!(
        db.count("SELECT count(*) FROM forkq.jobs_archive WHERE state = 'failed'"),
        Some(0)
    );
}

/// A maintenance statement that keeps timing out (the compaction of the changes table waits on
/// a lock another session holds, as a manual `LOCK TABLE` or an index build would): the pass is
/// given up until the next interval, never retried on the spot, so the child that runs it is not
/// kept from its jobs (one child: it is the whole fleet) and is not killed.
#[test]
fn a_maintenance_pass_that_times_out_keeps_no_child_from_its_jobs() {
    let schema = TestSchema::new("mainttimeout");
    schema.enqueue_n("default", "noop", json!({}), 20);
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "1"),
            ("FORKQ_RETENTION_SECONDS", "1"),
            ("FORKQ_HEALTH_STALE_SECONDS", "2"),
        ],
    );
    assert!(wait_until(Duration::from_secs(20), || schema
        .archived("completed")
        == 20));
    // Hold a lock that lets the children read the changes table at every round but lets no one
    // write it: the maintenance pass's compaction waits on it until its statement timeout (2 s
    // here) cancels it, at every pass. Nothing in a plain drain writes to it.
    let mut holder = schema.client();
    let mut tx = holder.transaction().unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{}\".changes IN EXCLUSIVE MODE",
        schema.name
    ))
    .unwrap();
    // Long enough for the child to have hit the purge once or more.
    std::thread::sleep(Duration::from_secs(5));
    let started = Instant::now();
    schema.enqueue_n("default", "noop", json!({}), 200);
    let drained = wait_until(Duration::from_secs(20), || {
        schema.count("SELECT count(*) FROM {s}.jobs") == 0
    });
    let took = started.elapsed();
    let failures = daemon.log_text().matches("maintenance pass failed").count();
    tx.rollback().unwrap();
    println!(
        "maintenance blocked by a table lock: 200 jobs drained in {took:.1?}; {failures} \
         maintenance pass(es) given up"
    );
    assert!(
        drained,
        "the children were kept from their jobs; log:\n{}",
        daemon.log_text()
    );
    assert!(
        failures >= 1,
        "the compaction never timed out; log:\n{}",
        daemon.log_text()
    );
    assert!(
        !daemon.log_text().contains("is wedged"),
        "a child was killed; log:\n{}",
        daemon.log_text()
    );
}

/// An exec program that leaves a grandchild doing the job's work: it records "start <attempt>
/// <ns>" and its grandchild "tick <attempt> <ns>" every 100 ms for 3 s, into `record`.
fn program_with_a_grandchild(dir: &Path, record: &Path) -> String {
    let script = dir.join("grandchild.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
echo "start $FORKQ_JOB_ID $FORKQ_ATTEMPT $(date +%s%N)" >> {record}
sh -c 'i=0; while [ $i -lt 30 ]; do
    echo "tick $FORKQ_JOB_ID $FORKQ_ATTEMPT $(date +%s%N)" >> {record}; sleep 0.1; i=$((i+1))
done' &
wait
"#,
            record = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!("exec:{}", script.display())
}

/// Nanosecond timestamps by attempt.
type ByAttempt = std::collections::BTreeMap<i64, u128>;

/// (first start, last tick) of each attempt of `job` in the record.
fn executions(record: &Path, job: i64) -> (ByAttempt, ByAttempt) {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let mut starts = ByAttempt::new();
    let mut ticks = ByAttempt::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 || f[1].parse::<i64>().ok() != Some(job) {
            continue;
        }
        let (attempt, at) = (f[2].parse::<i64>().unwrap(), f[3].parse::<u128>().unwrap());
        match f[0] {
            "start" => {
                starts.entry(attempt).or_insert(at);
            }
            _ => {
                let last = ticks.entry(attempt).or_insert(at);
                *last = (*last).max(at);
            }
        }
    }
    (starts, ticks)
}

/// Whatever kills a worker, its handler program's whole process group dies before the job runs
/// again: `kill -9` of the worker, and a worker frozen until it is killed as stale. The program
/// leaves a grandchild doing the work (PDEATHSIG reaches only the program itself); no tick of an
/// attempt may come after the start of the next one.
#[test]
fn a_killed_workers_program_never_runs_beside_the_jobs_next_attempt() {
    let schema = TestSchema::new("pgroup");
    let dir = temp_dir("pgroup");
    let record = dir.join("executions");
    let handler = program_with_a_grandchild(&dir, &record);
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_HEALTH_STALE_SECONDS", "3"),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    for (how, signal) in [
        ("kill -9", Signal::SIGKILL),
        ("frozen, then stale", Signal::SIGSTOP),
    ] {
        let id = schema.enqueue("default", "work", json!({}));
        let mut holder = 0;
        assert!(wait_until(Duration::from_secs(20), || {
            let ticking = !executions(&record, id).1.is_empty();
            ticking
                && daemon.livez().is_some_and(|(_, body)| {
                    body["slots"].as_array().unwrap().iter().any(|s| {
                        holder = s["pid"].as_i64().unwrap_or(0) as i32;
                        s["job_id"].as_i64() == Some(id)
                    })
                })
        }));
        kill(Pid::from_raw(holder), signal).unwrap();
        let done = wait_until(Duration::from_secs(30), || {
            schema.job(id).is_some_and(|j| j["state"] == "completed")
        });
        assert!(
            done,
            "{how}: job {id} not completed; log:\n{}",
            daemon.log_text()
        );
        // Anything of attempt 1 still alive would tick on for up to 3 s.
        std::thread::sleep(Duration::from_secs(1));
        let (starts, ticks) = executions(&record, id);
        let second = *starts.get(&2).expect("attempt 2 started");
        let last_first = ticks[&1];
        let overlap_ms = last_first as i128 / 1_000_000 - second as i128 / 1_000_000;
        println!(
            "{how}: attempt 1's last tick came {overlap_ms} ms after attempt 2 started \
             (negative: no overlap)"
        );
        assert!(
            last_first < second,
            "{how}: attempt 1 ran {overlap_ms} ms beside attempt 2; log:\n{}",
            daemon.log_text()
        );
    }
}

/// More children than the server has connections for (a private cluster with max_connections =
/// 20, 30 children): start-up stops with exit 78 saying how many connections are free, before any
/// child takes one; a fleet that fits (10 children) starts.
#[test]
fn a_fleet_the_server_has_no_connections_for_does_not_start() {
    let cluster = PrivateCluster::start("maxconn");
    let url = cluster.url();
    postgres::Client::connect(&url, postgres::NoTls)
        .unwrap()
        .batch_execute("ALTER SYSTEM SET max_connections = 20")
        .unwrap();
    cluster.pg_ctl(&["restart", "-w"]);
    ClusterSchema::migrate(&url);
    let (child, _, log) = spawn_on(&url, &[("FORKQ_CONCURRENCY", "30")]);
    let mut child = Killed(child);
    let pid = child.0.id() as i32;
    let exited = wait_until(Duration::from_secs(20), || !common::process_alive(pid));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        exited,
        "30 children started on a server of 20 connections; log:\n{text}"
    );
    assert_eq!(child.0.wait().unwrap().code(), Some(78), "{text}");
    let said = text
        .lines()
        .find(|l| l.contains("FORKQ_CONCURRENCY=30 needs 33 connections"))
        .unwrap_or_else(|| panic!("no message naming the need; log:\n{text}"));
    println!("30 children, max_connections 20: exit 78: {said}");
    assert!(said.contains("only 20 are free"), "{said}");

    let (child, addr, _) = spawn_on(&url, &[("FORKQ_CONCURRENCY", "10")]);
    let _guard = Killed(child);
    assert!(
        wait_until(Duration::from_secs(30), || {
            common::http_get(addr, "/livez")
                .is_some_and(|(code, body)| code == 200 && body.contains("\"alive_children\":10"))
        }),
        "a fleet of 10 did not start on a server of 20 connections"
    );
}

/// Lease renewals come due between jobs claimed ahead (a short lease, so many renewals): each
/// renewal must count the job about to start as held, or it gives it back and the job runs twice.
#[test]
fn renewals_between_prefetched_jobs_run_each_job_once() {
    let schema = TestSchema::new("renewonce");
    let dir = temp_dir("renewonce");
    let record = dir.join("starts");
    let handler = stamping_coproc(&dir, &record);
    schema.enqueue_n("default", "stamp", json!({"ms": 10}), 400);
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", handler.as_str()),
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_LEASE_SECONDS", "4"),
        ],
    );
    assert!(wait_until(Duration::from_secs(60), || schema
        .archived("completed")
        == 400));
    let mut runs = std::collections::HashMap::new();
    for (id, _) in stamps(&record) {
        *runs.entry(id).or_insert(0) += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert_eq!(runs.len(), 400);
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert!(
        !daemon.log_text().contains("refused the result"),
        "{}",
        daemon.log_text()
    );
}
