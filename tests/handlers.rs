//! Handlers end to end: a real daemon runs real programs (shell, Python, Node) written to a
//! temporary directory, and the results are read back from PostgreSQL.

// The shared harness keeps its own formatting (it is merged from several branches).
#[rustfmt::skip]
mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{process_alive, wait_until, Daemon, TestSchema};
use serde_json::{json, Value};

/// A job as it ended: state, attempts, error and result.
#[derive(Debug)]
struct Done {
    state: String,
    attempt: i32,
    error: Option<String>,
    result: Option<Value>,
}

/// Waits up to `timeout` for job `id` to reach the archive.
fn wait_done(schema: &TestSchema, id: i64, timeout: Duration) -> Done {
    let sql = format!(
        "SELECT state, attempt, last_error, result FROM \"{}\".jobs_archive WHERE id = $1",
        schema.name
    );
    let mut client = schema.client();
    let mut done = None;
    wait_until(timeout, || {
        done = client.query_opt(&sql, &[&id]).unwrap().map(|row| Done {
            state: row.get(0),
            attempt: row.get(1),
            error: row.get(2),
            result: row.get(3),
        });
        done.is_some()
    });
    done.unwrap_or_else(|| {
        panic!(
            "job {id} did not finish in {timeout:?}: {:?}",
            schema.job(id)
        )
    })
}

/// Enqueues a job allowed `max_attempts` attempts (through the SQL function producers use).
fn enqueue_with(schema: &TestSchema, task: &str, payload: Value, max_attempts: i32) -> i64 {
    let sql = format!(
        "SELECT \"{}\".enqueue('default', $1, $2, max_attempts => $3)",
        schema.name
    );
    schema
        .client()
        .query_one(&sql, &[&task, &payload, &max_attempts])
        .unwrap()
        .get(0)
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh directory for one test's programs and marker files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "handlers-{name}-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes an executable program.
fn program(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The real Python interpreter (not a version manager's shim, which needs more environment).
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is installed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A Python program: the interpreter's path as its shebang.
fn python_program(dir: &Path, name: &str, body: &str) -> PathBuf {
    program(dir, name, &format!("#!{}\n{body}", python()))
}

/// The fenced `lang` block of docs/handlers.md whose first lines mention `name`.
fn documented_example(lang: &str, name: &str) -> String {
    let page = include_str!("../docs/handlers.md");
    let fence = format!("```{lang}\n");
    page.split(&fence)
        .skip(1)
        .map(|rest| rest.split("\n```").next().unwrap().to_string() + "\n")
        .find(|block| block.lines().take(3).any(|l| l.contains(name)))
        .unwrap_or_else(|| panic!("no {lang} block about {name} in docs/handlers.md"))
}

fn pid_of(path: &Path) -> i32 {
    let mut pid = 0;
    wait_until(Duration::from_secs(10), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    assert!(pid != 0, "{} never written", path.display());
    pid
}

const ECHO_JOB: &str = r#"
import json, os, sys
payload = json.load(sys.stdin)
print(json.dumps({"payload": payload, "id": int(os.environ["FORKQ_JOB_ID"]),
                  "queue": os.environ["FORKQ_QUEUE"], "task": os.environ["FORKQ_TASK"],
                  "attempt": int(os.environ["FORKQ_ATTEMPT"]),
                  "max_attempts": int(os.environ["FORKQ_MAX_ATTEMPTS"]),
                  "batch": os.environ.get("FORKQ_BATCH_ID"), "args": sys.argv[1:]}))
"#;

#[test]
fn exec_success_keeps_the_result() {
    let schema = TestSchema::new("h_exec_ok");
    let dir = temp_dir("exec-ok");
    let echo = python_program(&dir, "echo.py", ECHO_JOB);
    let text = program(&dir, "text.sh", "#!/bin/sh\necho 'plain words, not JSON'\n");
    let nul = program(
        &dir,
        "nul.sh",
        "#!/bin/sh\nprintf '{\"s\": \"a\\\\u0000b\"}'\n",
    );
    let routes = format!("text=exec:{};nul=exec:{}", text.display(), nul.display());
    let handler = format!("exec:{} 'two words' x", echo.display());
    let _daemon = Daemon::start(
        &schema,
        &[("FORKQ_HANDLER", &handler), ("FORKQ_ROUTES", &routes)],
    );

    let id = enqueue_with(&schema, "echo", json!({"n": 1, "s": "é"}), 5);
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.state, "completed", "{done:?}");
    assert_eq!(
        done.result.unwrap(),
        json!({"payload": {"n": 1, "s": "é"}, "id": id, "queue": "default", "task": "echo",
               "attempt": 1, "max_attempts": 5, "batch": null, "args": ["two words", "x"]})
    );

    let id = schema.enqueue("default", "text", json!({}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.result, Some(json!("plain words, not JSON")));

    // PostgreSQL cannot store NUL characters: they are replaced, and the job still completes.
    let id = schema.enqueue("default", "nul", json!({}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.result, Some(json!({"s": "a\u{FFFD}b"})));
}

#[test]
fn exec_payload_is_only_data() {
    let schema = TestSchema::new("h_exec_data");
    let dir = temp_dir("exec-data");
    let marker = dir.join("pwned");
    let _daemon = Daemon::start(&schema, &[("FORKQ_HANDLER", "exec:/bin/cat")]);
    let evil = format!(
        "\"; rm -rf / ; touch {} ; echo \"$(id)`id`",
        marker.display()
    );
    let id = schema.enqueue("default", "anything", json!(evil));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    // cat gave the payload back untouched: no shell ever saw it.
    assert_eq!(done.result, Some(json!(evil)));
    assert!(!marker.exists());
}

#[test]
fn exec_exit_75_is_retried_without_an_error() {
    let schema = TestSchema::new("h_exec_75");
    let dir = temp_dir("exec-75");
    let prog = program(
        &dir,
        "flaky.sh",
        "#!/bin/sh\nif [ \"$FORKQ_ATTEMPT\" = 1 ]; then echo 'try later' >&2; exit 75; fi\necho '\"second time\"'\n",
    );
    let handler = format!("exec:{}", prog.display());
    let _daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_RETRY_BACKOFF_BASE_SECONDS", "0"),
        ],
    );
    let id = enqueue_with(&schema, "flaky", json!({}), 5);
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.state, "completed", "{done:?}");
    assert_eq!(done.attempt, 2, "the retry counts as an attempt");
    assert_eq!(done.error, None, "exit 75 records no error");
    assert_eq!(done.result, Some(json!("second time")));
}

#[test]
fn exec_failure_keeps_the_tail_of_stderr() {
    let schema = TestSchema::new("h_exec_fail");
    let dir = temp_dir("exec-fail");
    let fails = program(
        &dir,
        "fails.sh",
        "#!/bin/sh\necho 'FIRST LINE' >&2\nhead -c 20000 /dev/zero | tr '\\0' x >&2\necho >&2\necho 'the real reason' >&2\nexit 3\n",
    );
    let killed = program(&dir, "killed.sh", "#!/bin/sh\nkill -9 $$\n");
    let routes = format!(
        "fails=exec:{};killed=exec:{}",
        fails.display(),
        killed.display()
    );
    let _daemon = Daemon::start(&schema, &[("FORKQ_ROUTES", &routes)]);

    let id = enqueue_with(&schema, "fails", json!({}), 1);
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.state, "failed");
    let error = done.error.unwrap();
    assert!(error.starts_with("exit code 3: "), "{error}");
    assert!(error.ends_with("the real reason"), "{error}");
    assert!(!error.contains("FIRST LINE"), "only the tail is kept");
    assert!(error.len() < 5000, "bounded: {} bytes", error.len());

    let id = enqueue_with(&schema, "killed", json!({}), 1);
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.state, "failed");
    assert_eq!(
        done.error.as_deref(),
        Some("killed by SIGKILL (stderr was empty)")
    );
}

#[test]
fn exec_timeout_kills_the_whole_group() {
    let schema = TestSchema::new("h_exec_timeout");
    let dir = temp_dir("exec-timeout");
    // It ignores SIGTERM (and so does its background grandchild): only the SIGKILL ends them.
    let hangs = program(
        &dir,
        "hangs.sh",
        &format!(
            "#!/bin/bash\ntrap '' TERM\nsleep 1000 &\necho $! > {dir}/grandchild\necho $$ > {dir}/leader\nwhile true; do sleep 1; done\n",
            dir = dir.display()
        ),
    );
    let handler = format!("exec:{}", hangs.display());
    let _daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_JOB_TIMEOUT_SECONDS", "2"),
        ],
    );
    let started = Instant::now();
    let id = enqueue_with(&schema, "hang", json!({}), 1);
    let leader = pid_of(&dir.join("leader"));
    let grandchild = pid_of(&dir.join("grandchild"));
    assert!(process_alive(leader) && process_alive(grandchild));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    println!("timed out job settled after {:?}", started.elapsed());
    assert_eq!(done.state, "failed");
    assert_eq!(done.error.as_deref(), Some("timed out after 2 s"));
    assert!(
        wait_until(Duration::from_secs(5), || gone(leader) && gone(grandchild)),
        "leader alive: {}, grandchild alive: {} (or left a zombie)",
        process_alive(leader),
        process_alive(grandchild)
    );
}

#[test]
fn exec_leftover_processes_end_with_the_job() {
    let schema = TestSchema::new("h_exec_leftover");
    let dir = temp_dir("exec-leftover");
    // The background sleep keeps stdout open: the job must not wait for it, nor leave it behind.
    let prog = program(
        &dir,
        "leaves.sh",
        &format!(
            "#!/bin/sh\nsleep 1000 &\necho $! > {}/background\necho '\"done\"'\n",
            dir.display()
        ),
    );
    let handler = format!("exec:{}", prog.display());
    let _daemon = Daemon::start(&schema, &[("FORKQ_HANDLER", &handler)]);
    let started = Instant::now();
    let id = schema.enqueue("default", "leave", json!({}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    println!("settled after {:?}", started.elapsed());
    assert_eq!(done.result, Some(json!("done")));
    let background = pid_of(&dir.join("background"));
    assert!(
        wait_until(Duration::from_secs(5), || gone(background)),
        "the background process outlived its job (or is an unreaped zombie)"
    );
}

/// Whether a process is gone entirely: dead and reaped, not even a zombie.
fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn immediate_stop_abandons_the_program_and_hands_the_job_back() {
    let schema = TestSchema::new("h_exec_quit");
    let dir = temp_dir("exec-quit");
    let hangs = program(
        &dir,
        "hangs.sh",
        &format!(
            "#!/bin/bash\nsleep 1000 &\necho $! > {dir}/grandchild\necho $$ > {dir}/leader\nwait\n",
            dir = dir.display()
        ),
    );
    let coproc = python_program(&dir, "noop.py", NOOP_COPROC);
    let handler = format!("exec:{}", hangs.display());
    let routes = format!("noop=coproc:{}", coproc.display());
    let mut daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_ROUTES", &routes),
            ("FORKQ_CONCURRENCY", "1"),
        ],
    );
    let noop = schema.enqueue("default", "noop", json!({}));
    let coproc_pid = wait_done(&schema, noop, Duration::from_secs(30))
        .result
        .unwrap()
        .as_i64()
        .unwrap() as i32;
    let id = enqueue_with(&schema, "hang", json!({}), 5);
    let leader = pid_of(&dir.join("leader"));
    let grandchild = pid_of(&dir.join("grandchild"));
    daemon.signal(nix::sys::signal::Signal::SIGQUIT);
    assert!(daemon.wait_exit(Duration::from_secs(20)).is_some());
    let job = schema.job(id).unwrap();
    assert_eq!(job["state"], "available", "handed back: {job}");
    for pid in [leader, grandchild, coproc_pid] {
        assert!(
            wait_until(Duration::from_secs(5), || !process_alive(pid)),
            "{pid} outlived the daemon"
        );
    }
}

#[test]
fn exec_megabyte_payload_through_stdin() {
    let schema = TestSchema::new("h_exec_big");
    let dir = temp_dir("exec-big");
    // It writes 256 KiB to stderr before reading stdin: with both pipes full, only a handler that
    // moves both at once gets through.
    let prog = python_program(
        &dir,
        "big.py",
        r#"
import hashlib, json, sys
sys.stderr.write("e" * 262144)
sys.stderr.flush()
data = sys.stdin.buffer.read()
print(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
"#,
    );
    let handler = format!("exec:{}", prog.display());
    let _daemon = Daemon::start(&schema, &[("FORKQ_HANDLER", &handler)]);
    let big = "x".repeat((1 << 20) - 100);
    let payload = json!({ "data": big });
    let mut expected = serde_json::to_vec(&payload).unwrap();
    expected.push(b'\n');
    let id = schema.enqueue("default", "big", payload);
    let done = wait_done(&schema, id, Duration::from_secs(60));
    assert_eq!(done.state, "completed", "{done:?}");
    let result = done.result.unwrap();
    assert_eq!(result["bytes"], json!(expected.len()));
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&expected)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(result["sha256"], json!(digest));
}

#[test]
fn exec_environment_hides_secrets() {
    let schema = TestSchema::new("h_exec_env");
    let dir = temp_dir("exec-env");
    let prog = python_program(
        &dir,
        "env.py",
        "import json, os\nprint(json.dumps(dict(os.environ)))\n",
    );
    let handler = format!("exec:{}", prog.display());
    let url = common::database_url();
    let _daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_DATABASE_URL", &url),
            ("MY_API_TOKEN", "hidden"),
            ("PGPASSWORD", "hidden"),
            ("SHARED_SECRET", "passed"),
            ("PLAIN_SETTING", "visible"),
            ("WATCHDOG_USEC", "1"),
            (
                "FORKQ_HANDLER_PASS_ENV",
                "SHARED_SECRET,WATCHDOG_USEC,NOTIFY_SOCKET",
            ),
        ],
    );
    let id = schema.enqueue("default", "env", json!({}));
    let env = wait_done(&schema, id, Duration::from_secs(30))
        .result
        .unwrap();
    for hidden in [
        "DATABASE_URL",
        "FORKQ_DATABASE_URL",
        "MY_API_TOKEN",
        "PGPASSWORD",
        "WATCHDOG_USEC",
        "NOTIFY_SOCKET",
    ] {
        assert!(env.get(hidden).is_none(), "{hidden} reached the handler");
    }
    assert_eq!(env["SHARED_SECRET"], "passed");
    assert_eq!(env["PLAIN_SETTING"], "visible");
    assert_eq!(env["FORKQ_JOB_ID"], json!(id.to_string()));
    assert!(env.get("PATH").is_some());
}

#[test]
fn exec_noop_throughput() {
    let schema = TestSchema::new("h_exec_rate");
    let n = 1000;
    schema.enqueue_n("default", "noop", json!({}), n);
    let started = Instant::now();
    let _daemon = Daemon::spawn(
        &schema,
        &[
            ("FORKQ_HANDLER", "exec:/bin/true"),
            ("FORKQ_CONCURRENCY", "2"),
        ],
    );
    let all = wait_until(Duration::from_secs(180), || {
        schema.archived("completed") == n as i64
    });
    let took = started.elapsed();
    assert!(all, "{} of {n} done", schema.archived("completed"));
    println!(
        "exec:/bin/true, 2 children: {n} jobs in {took:.2?} = {:.0} jobs/s (including start-up)",
        n as f64 / took.as_secs_f64()
    );
}

const NOOP_COPROC: &str = r#"
import json, os, sys
pid = os.getpid()
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.write(json.dumps({"id": job["id"], "ok": True, "result": pid}) + "\n")
    sys.stdout.flush()
"#;

#[test]
fn coproc_runs_ten_thousand_jobs_through_one_program_per_child() {
    let schema = TestSchema::new("h_coproc_rate");
    let dir = temp_dir("coproc-rate");
    let prog = python_program(&dir, "noop.py", NOOP_COPROC);
    let n = 10_000;
    schema.enqueue_n("default", "noop", json!({}), n);
    let handler = format!("coproc:{}", prog.display());
    let started = Instant::now();
    let _daemon = Daemon::spawn(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_PREFETCH", "100"),
        ],
    );
    let all = wait_until(Duration::from_secs(300), || {
        schema.archived("completed") == n as i64
    });
    let took = started.elapsed();
    assert!(all, "{} of {n} done", schema.archived("completed"));
    println!(
        "coproc (Python), 2 children: {n} jobs in {took:.2?} = {:.0} jobs/s (including start-up)",
        n as f64 / took.as_secs_f64()
    );
    let sql = format!(
        "SELECT DISTINCT result FROM \"{}\".jobs_archive",
        schema.name
    );
    let pids: HashSet<i64> = schema
        .client()
        .query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Value>(0).as_i64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "one program per child: {pids:?}");
}

#[test]
fn coproc_protocol_errors_restart_the_program() {
    let schema = TestSchema::new("h_coproc_proto");
    let dir = temp_dir("coproc-proto");
    let prog = python_program(
        &dir,
        "broken.py",
        r#"
import json, os, sys, time
for line in sys.stdin:
    job = json.loads(line)
    task, id = job["task"], job["id"]
    if task == "garbage":
        print("this is not json", flush=True)
    elif task == "wrong-id":
        print(json.dumps({"id": id + 1000, "ok": True}), flush=True)
    elif task == "exit":
        sys.exit(3)
    elif task == "hang":
        time.sleep(1000)
    elif task == "long-line":
        print("x" * 5000, flush=True)
    elif task == "reply-then-exit":
        print(json.dumps({"id": id, "ok": True, "result": os.getpid()}), flush=True)
        sys.exit(0)
    else:
        print(json.dumps({"id": id, "ok": True, "result": os.getpid()}), flush=True)
"#,
    );
    let handler = format!("coproc:{}", prog.display());
    let _daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_CONCURRENCY", "1"),
            ("FORKQ_JOB_TIMEOUT_SECONDS", "2"),
            ("FORKQ_MAX_RESULT_BYTES", "4096"),
        ],
    );
    let run = |task: &str| {
        wait_done(
            &schema,
            enqueue_with(&schema, task, json!({}), 1),
            Duration::from_secs(30),
        )
    };
    let mut pids = vec![run("ok").result.unwrap().as_i64().unwrap() as i32];
    for (task, expected) in [
        (
            "garbage",
            "coproc protocol error: a line that is not JSON: \"this is not json\"",
        ),
        ("wrong-id", "coproc protocol error: a line for id "),
        ("exit", "coproc protocol error: the program "),
        (
            "long-line",
            "coproc protocol error: a line longer than FORKQ_MAX_RESULT_BYTES=4096",
        ),
        ("hang", "timed out after 2 s"),
    ] {
        let done = run(task);
        assert_eq!(done.state, "failed", "{task}: {done:?}");
        let error = done.error.unwrap();
        assert!(error.starts_with(expected), "{task}: {error}");
        let done = run("ok");
        assert_eq!(done.state, "completed", "after {task}: {done:?}");
        let pid = done.result.unwrap().as_i64().unwrap() as i32;
        assert!(
            !pids.contains(&pid),
            "after {task}: a fresh program, not {pid} again"
        );
        for old in &pids {
            assert!(
                wait_until(Duration::from_secs(5), || !process_alive(*old)),
                "the program {old} was not killed"
            );
        }
        pids.push(pid);
    }
    // A program that exits between jobs is replaced without failing the next job.
    let done = run("reply-then-exit");
    assert_eq!(done.state, "completed");
    let pid = done.result.unwrap().as_i64().unwrap() as i32;
    assert!(wait_until(Duration::from_secs(5), || !process_alive(pid)));
    let done = run("ok");
    assert_eq!(done.state, "completed", "{done:?}");
    assert_ne!(done.result.unwrap().as_i64().unwrap() as i32, pid);
}

#[test]
fn coproc_heartbeats_keep_a_long_job_leased() {
    let schema = TestSchema::new("h_coproc_beat");
    let dir = temp_dir("coproc-beat");
    let runs = dir.join("runs");
    let prog = python_program(
        &dir,
        "long.py",
        &format!(
            r#"
import json, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open("{runs}", "a") as f:
        f.write(f"{{job['id']}}\n")
    for _ in range(16):
        time.sleep(0.5)
        if job["payload"]["beat"]:
            print(json.dumps({{"id": job["id"], "heartbeat": True}}), flush=True)
    print(json.dumps({{"id": job["id"], "ok": True, "result": "slept 8 s"}}), flush=True)
"#,
            runs = runs.display()
        ),
    );
    let handler = format!("coproc:{}", prog.display());
    let _daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_HANDLER", &handler),
            ("FORKQ_LEASE_SECONDS", "4"),
            ("FORKQ_CONCURRENCY", "3"),
        ],
    );
    // With heartbeat lines, and without: forkq keeps the lease of a live program either way.
    let with = enqueue_with(&schema, "long", json!({"beat": true}), 5);
    let without = enqueue_with(&schema, "long", json!({"beat": false}), 5);
    for id in [with, without] {
        let done = wait_done(&schema, id, Duration::from_secs(60));
        assert_eq!(done.state, "completed", "{done:?}");
        assert_eq!(done.attempt, 1, "job {id} ran more than once");
        assert_eq!(done.result, Some(json!("slept 8 s")));
    }
    let lines = std::fs::read_to_string(&runs).unwrap();
    let mut started: Vec<&str> = lines.lines().collect();
    started.sort();
    assert_eq!(started.len(), 2, "each job started once: {lines:?}");
}

#[test]
fn documented_coproc_examples_work_in_python_and_node() {
    let dir = temp_dir("readme");
    let py = python_program(
        &dir,
        "coproc.py",
        &documented_example("python", "coproc.py"),
    );
    let js = program(&dir, "coproc.js", &documented_example("js", "coproc.js"));
    for handler in [
        format!("coproc:{}", py.display()),
        format!("coproc:node {}", js.display()),
    ] {
        let schema = TestSchema::new("h_readme");
        let _daemon = Daemon::start(&schema, &[("FORKQ_HANDLER", &handler)]);
        let ids: Vec<i64> = (1..=20)
            .map(|n| schema.enqueue("default", "add", json!({"numbers": [n, 2, 3]})))
            .collect();
        for (n, id) in (1..=20).zip(ids) {
            let done = wait_done(&schema, id, Duration::from_secs(30));
            assert_eq!(done.result, Some(json!(n + 5)), "{handler}");
        }
        let id = schema.enqueue("default", "nosuch", json!({}));
        let done = wait_done(&schema, id, Duration::from_secs(30));
        assert_eq!(
            (done.state.as_str(), done.attempt, done.error.as_deref()),
            ("failed", 1, Some("unknown task nosuch")),
            "{handler}: retry false dead-letters at once"
        );
    }
}

#[test]
fn documented_exec_example_works() {
    let schema = TestSchema::new("h_readme_exec");
    let dir = temp_dir("readme-exec");
    let prog = python_program(
        &dir,
        "word_count.py",
        &documented_example("python", "word_count.py"),
    );
    let handler = format!("exec:{}", prog.display());
    let _daemon = Daemon::start(&schema, &[("FORKQ_HANDLER", &handler)]);
    let id = schema.enqueue("default", "count", json!({"text": "to be or not to be"}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.result, Some(json!({"words": 6, "attempt": 1})));
    let id = enqueue_with(&schema, "count", json!({}), 1);
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(done.state, "failed");
    assert_eq!(
        done.error.as_deref(),
        Some("exit code 1: the payload needs \"text\"")
    );
}

#[test]
fn routes_send_tasks_to_their_handlers() {
    let schema = TestSchema::new("h_routes");
    let dir = temp_dir("routes");
    let upper = program(&dir, "upper.sh", "#!/bin/sh\ntr a-z A-Z\n");
    let counter = python_program(
        &dir,
        "counter.py",
        r#"
import json, sys
count = 0
for line in sys.stdin:
    job = json.loads(line)
    count += 1
    print(json.dumps({"id": job["id"], "ok": True, "result": {"task": job["task"], "count": count}}), flush=True)
"#,
    );
    let routes = format!(
        "upper=exec:{};count=coproc:{};tally=coproc:{}",
        upper.display(),
        counter.display(),
        counter.display()
    );
    let _daemon = Daemon::start(
        &schema,
        &[("FORKQ_ROUTES", &routes), ("FORKQ_CONCURRENCY", "1")],
    );
    let id = schema.enqueue("default", "upper", json!("shout"));
    assert_eq!(
        wait_done(&schema, id, Duration::from_secs(30)).result,
        Some(json!("SHOUT"))
    );
    // Two tasks routed to the same program share one coproc.
    let a = schema.enqueue("default", "count", json!({}));
    let b = schema.enqueue("default", "tally", json!({}));
    assert_eq!(
        wait_done(&schema, a, Duration::from_secs(30)).result,
        Some(json!({"task": "count", "count": 1}))
    );
    assert_eq!(
        wait_done(&schema, b, Duration::from_secs(30)).result,
        Some(json!({"task": "tally", "count": 2}))
    );
    // No route: the builtin handler.
    let id = schema.enqueue("default", "noop", json!({}));
    assert_eq!(
        wait_done(&schema, id, Duration::from_secs(30)).state,
        "completed"
    );
    // Unknown to everyone: dead-lettered at once, with attempts to spare.
    let id = schema.enqueue("default", "nosuch", json!({}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(
        (done.state.as_str(), done.attempt, done.error.as_deref()),
        ("failed", 1, Some("no handler for task nosuch"))
    );
}

/// Builds `examples/NAME` into this test run's target directory (bounded by a timeout) and
/// returns its path.
fn build_example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target_dir = profile_dir.parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--example", name, "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().unwrap() == "release" {
        cargo.arg("--release");
    }
    let mut child = cargo.spawn().unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(600), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("cargo build --example {name} took more than 10 minutes");
    }
    assert!(
        status.unwrap().success(),
        "cargo build --example {name} failed"
    );
    profile_dir.join("examples").join(name)
}

#[test]
fn library_example_hashes_files() {
    let example = build_example("hash_files");
    let schema = TestSchema::new("h_library");
    let dir = temp_dir("library");
    let file = dir.join("data.bin");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    use sha2::Digest;
    let expected: String = sha2::Sha256::digest(&content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let _daemon = Daemon::start_program(&example, &[], &schema, &[]);
    let id = schema.enqueue("default", "hash", json!({"path": file}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(
        done.result,
        Some(json!({"path": file, "bytes": content.len(), "sha256": expected}))
    );
    let id = schema.enqueue("default", "hash", json!({"no": "path"}));
    let done = wait_done(&schema, id, Duration::from_secs(30));
    assert_eq!(
        (done.state.as_str(), done.attempt),
        ("failed", 1),
        "a bad payload is not retried: {done:?}"
    );
}

/// The builtin demo tasks that can harm a worker are off unless `FORKQ_DEMO_TASKS=1`: `crash`,
/// `spin` and `getenv` each fail at once with an error naming the setting, no child dies or
/// hangs, and nothing of the environment (the database URL) is stored; `noop`, `sleep` and `fail`
/// still answer.
#[test]
fn demo_tasks_are_off_unless_asked_for() {
    let schema = TestSchema::new("hdl_demo");
    let daemon = Daemon::start(&schema, &[("FORKQ_HEALTH_STALE_SECONDS", "3")]);
    let pids = daemon.child_pids();
    let demo = [
        enqueue_with(&schema, "crash", json!({}), 3),
        enqueue_with(&schema, "spin", json!({}), 3),
        enqueue_with(&schema, "getenv", json!({"name": "DATABASE_URL"}), 3),
    ];
    for id in demo {
        let done = wait_done(&schema, id, Duration::from_secs(30));
        println!("{done:?}");
        assert_eq!(
            (done.state.as_str(), done.attempt),
            ("failed", 1),
            "{done:?}"
        );
        assert!(
            done.error
                .as_deref()
                .is_some_and(|e| e.contains("FORKQ_DEMO_TASKS=1")),
            "{done:?}"
        );
        assert_eq!(done.result, None, "{done:?}");
    }
    for (task, payload, state) in [
        ("noop", json!({}), "completed"),
        ("sleep", json!({"ms": 10}), "completed"),
        ("fail", json!({}), "failed"),
    ] {
        let id = enqueue_with(&schema, task, payload, 1);
        assert_eq!(wait_done(&schema, id, Duration::from_secs(30)).state, state);
    }
    assert_eq!(daemon.child_pids(), pids, "a demo task reached a worker");
    assert_eq!(daemon.livez().map(|(c, _)| c), Some(200));
}
