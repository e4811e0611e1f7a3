//! The `forkq` command line, run as a real process against the real PostgreSQL.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// What one `forkq` run printed and how it ended.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout, trimmed.
    fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.stdout.trim()
    }
}

/// A `forkq` command with a clean environment: only PATH and `env`.
fn command(env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(forkq_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FORKQ_LOG", "warn")
        .envs(env.iter().cloned())
        .stdin(Stdio::null());
    cmd
}

fn run_with(env: &[(String, String)], args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut cmd = command(env, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn forkq");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    Run::from(child.wait_with_output().unwrap())
}

fn forkq(schema: &TestSchema, args: &[&str]) -> Run {
    run_with(&schema.env(), args, None)
}

fn forkq_env(schema: &TestSchema, extra: &[(&str, &str)], args: &[&str]) -> Run {
    let mut env = schema.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    run_with(&env, args, None)
}

fn env_of(schema: &str) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), database_url()),
        ("FORKQ_SCHEMA".into(), schema.into()),
    ]
}

fn id_of(run: &Run) -> i64 {
    run.ok()
        .parse()
        .unwrap_or_else(|_| panic!("not a job id: {:?}", run.stdout))
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn bad_environment_exits_78_naming_the_variable() {
    let schema = TestSchema::new("cli_env");
    let closed_port = free_port();
    let unreachable = format!("postgres://postgres@127.0.0.1:{closed_port}/test");
    let cases: &[(&str, &str)] = &[
        ("FORKQ_PREFETCH", "0"),
        ("FORKQ_PREFETCH", "lots"),
        ("FORKQ_SCHEMA", "bad\"x"),
        ("FORKQ_QUEUES", ","),
        ("FORKQ_HANDLER", "ftp:x"),
        ("FORKQ_LEASE_SECONDS", "-1"),
        ("FORKQ_MAX_PAYLOAD_BYTES", "1e9"),
        ("FORKQ_RETENTION_SECONDS", "forever"),
        ("FORKQ_LISTEN", "maybe"),
        ("DATABASE_URL", "mysql://x"),
    ];
    for (variable, value) in cases {
        for args in [
            &["status"][..],
            &["enqueue", "--task", "noop"],
            &["migrate"],
        ] {
            let mut env = schema.env();
            env.retain(|(k, _)| k != variable);
            env.push((variable.to_string(), value.to_string()));
            let run = run_with(&env, args, None);
            assert_eq!(run.code, 78, "{variable}={value} {args:?}: {}", run.stderr);
            assert!(
                run.stderr.contains(variable) && run.stderr.contains(&format!("{value:?}")),
                "{variable}={value}: message does not name it: {}",
                run.stderr
            );
            assert_eq!(
                run.stderr.trim().lines().count(),
                1,
                "one line: {}",
                run.stderr
            );
        }
    }
    let missing = run_with(&[], &["status"], None);
    assert_eq!(missing.code, 78);
    assert!(
        missing.stderr.contains("DATABASE_URL"),
        "{}",
        missing.stderr
    );

    let started = Instant::now();
    let down = run_with(
        &[("DATABASE_URL".into(), unreachable.clone())],
        &["status"],
        None,
    );
    assert_eq!(down.code, 78, "{}", down.stderr);
    assert!(
        down.stderr.contains("DATABASE_URL=") && down.stderr.contains(&closed_port.to_string()),
        "{}",
        down.stderr
    );
    assert!(
        down.stderr.contains("refused"),
        "the cause is shown: {}",
        down.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let down = run_with(
        &[("FORKQ_DATABASE_URL".into(), unreachable)],
        &["migrate"],
        None,
    );
    assert_eq!(down.code, 78, "{}", down.stderr);
    assert!(
        down.stderr.contains("FORKQ_DATABASE_URL"),
        "{}",
        down.stderr
    );
}

#[test]
fn every_command_has_help_with_an_example() {
    let top = run_with(&[], &["--help"], None);
    assert!(
        top.ok().contains("2 usage error"),
        "--help lists the exit codes: {}",
        top.stdout
    );
    for cmd in [
        "migrate",
        "enqueue",
        "status",
        "job",
        "jobs",
        "hosts",
        "dashboard",
        "retry",
        "cancel",
        "run",
        "health",
    ] {
        let run = run_with(&[], &[cmd, "--help"], None);
        assert!(run.ok().contains("Example"), "{cmd} --help: {}", run.stdout);
    }
    for sub in ["create", "status", "cancel", "list"] {
        let run = run_with(&[], &["batch", sub, "--help"], None);
        assert!(
            run.ok().contains("Example"),
            "batch {sub} --help: {}",
            run.stdout
        );
    }
    let usage = run_with(&[], &["enqueue", "--no-such-flag"], None);
    assert_eq!(usage.code, 2, "usage errors exit 2: {}", usage.stderr);
}

#[test]
fn version_names_the_schema_it_expects() {
    let run = run_with(&[], &["--version"], None);
    let expected = format!(
        "forkq {} (schema version {})",
        env!("CARGO_PKG_VERSION"),
        forkq::queue::migrations::latest_version()
    );
    assert_eq!(run.ok(), expected);
}

#[test]
fn payload_from_a_file_or_stdin() {
    let schema = TestSchema::new("cli_payload_file");
    let file = temp_file(
        "payload.json",
        "{\n  \"pages\": [1, 2],\n  \"name\": \"report\"\n}\n",
    );
    let arg = format!("@{}", file.display());
    let id = id_of(&forkq(
        &schema,
        &["enqueue", "--task", "render", "--payload", &arg],
    ));
    assert_eq!(
        schema.job(id).unwrap()["payload"],
        json!({"pages": [1, 2], "name": "report"})
    );
    let piped = run_with(
        &schema.env(),
        &["enqueue", "--task", "render", "--payload", "-"],
        Some(b"[\"from\", \"stdin\"]"),
    );
    assert_eq!(
        schema.job(id_of(&piped)).unwrap()["payload"],
        json!(["from", "stdin"])
    );

    let refused = |payload: &str, needles: &[&str]| {
        let run = forkq(
            &schema,
            &["enqueue", "--task", "render", "--payload", payload],
        );
        assert_eq!(run.code, 65, "{}", run.stderr);
        for needle in needles {
            assert!(run.stderr.contains(needle), "{needle:?}: {}", run.stderr);
        }
    };
    refused(
        "@/nonexistent/payload.json",
        &["/nonexistent/payload.json", "cannot read"],
    );
    let broken = temp_file("broken.json", "{\"pages\": [1,");
    refused(
        &format!("@{}", broken.display()),
        &["broken.json", "not valid JSON"],
    );
    let both = forkq(&schema, &["enqueue", "--payload", "{}", "--jsonl", "-"]);
    assert_eq!(both.code, 2, "{}", both.stderr);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 2);
}

#[test]
fn migrate_twice_at_once_and_status() {
    let schema = FreshSchema::new("cli_migrate");
    let env = env_of(&schema.0);
    let pending = run_with(&env, &["migrate", "--status"], None);
    assert!(pending.ok().contains("pending"), "{}", pending.stdout);

    let refused = run_with(&env, &["status"], None);
    assert_eq!(refused.code, 78);
    assert!(
        refused.stderr.contains("run `forkq migrate`"),
        "{}",
        refused.stderr
    );
    let refused = run_with(&env, &["enqueue", "--task", "noop"], None);
    assert_eq!(refused.code, 78);
    assert!(
        refused.stderr.contains("forkq migrate"),
        "{}",
        refused.stderr
    );

    let children: Vec<_> = (0..2)
        .map(|_| {
            command(&env, &["migrate"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| Run::from(c.wait_with_output().unwrap()))
        .collect();
    for run in &runs {
        run.ok();
    }
    let applied = runs.iter().filter(|r| r.stdout.contains("applied")).count();
    let current = runs
        .iter()
        .filter(|r| r.stdout.contains("up to date"))
        .count();
    assert_eq!(
        (applied, current),
        (1, 1),
        "{:?}",
        runs.iter().map(|r| &r.stdout).collect::<Vec<_>>()
    );
    assert!(run_with(&env, &["migrate"], None)
        .ok()
        .contains("up to date"));

    let status = run_with(&env, &["migrate", "--status"], None);
    let out = status.ok();
    assert!(out.contains("applied") && !out.contains("pending"), "{out}");
    assert!(
        out.lines().next().unwrap().trim_start().starts_with('1'),
        "{out}"
    );
    run_with(&env, &["status"], None).ok();
}

#[test]
fn enqueue_options_reach_the_job() {
    let schema = TestSchema::new("cli_enqueue");
    let id = id_of(&forkq(
        &schema,
        &[
            "enqueue",
            "--queue",
            "mail",
            "--task",
            "send",
            "--payload",
            r#"{"to":"a@b.c"}"#,
            "--priority",
            "-7",
            "--max-attempts",
            "4",
        ],
    ));
    let job = schema.job(id).unwrap();
    assert_eq!(job["queue"], "mail");
    assert_eq!(job["task"], "send");
    assert_eq!(job["payload"], json!({"to": "a@b.c"}));
    assert_eq!(
        (job["priority"].as_i64(), job["max_attempts"].as_i64()),
        (Some(-7), Some(4))
    );
    assert_eq!(job["state"], "available");

    let default_attempts = id_of(&forkq_env(
        &schema,
        &[("FORKQ_MAX_ATTEMPTS", "9")],
        &["enqueue", "--task", "noop"],
    ));
    let job = schema.job(default_attempts).unwrap();
    assert_eq!(
        (job["queue"].as_str(), job["max_attempts"].as_i64()),
        (Some("default"), Some(9))
    );

    let delayed = id_of(&forkq(
        &schema,
        &["enqueue", "--task", "noop", "--delay", "60"],
    ));
    let at = id_of(&forkq(
        &schema,
        &[
            "enqueue",
            "--task",
            "noop",
            "--run-at",
            "2099-01-01T00:00:00Z",
        ],
    ));
    for id in [delayed, at] {
        assert_eq!(schema.job(id).unwrap()["state"], "scheduled");
    }
    let ahead = schema.count(&format!(
        "SELECT extract(epoch FROM run_at - now())::bigint FROM {{s}}.jobs WHERE id = {delayed}"
    ));
    assert!((55..=60).contains(&ahead), "{ahead}");
    let bad = forkq(
        &schema,
        &["enqueue", "--task", "noop", "--run-at", "tomorrow"],
    );
    assert_eq!(bad.code, 65);
    assert!(bad.stderr.contains("RFC 3339"), "{}", bad.stderr);
    let both = forkq(
        &schema,
        &[
            "enqueue",
            "--task",
            "noop",
            "--delay",
            "1",
            "--run-at",
            "2099-01-01T00:00:00Z",
        ],
    );
    assert_eq!(both.code, 2, "clap refuses both: {}", both.stderr);

    let first = id_of(&forkq(
        &schema,
        &["enqueue", "--task", "noop", "--unique-key", "k1"],
    ));
    let second = id_of(&forkq(
        &schema,
        &["enqueue", "--task", "noop", "--unique-key", "k1"],
    ));
    assert_eq!(first, second);

    // Scheduled jobs are not claimed early (by the real daemon, too).
    let daemon = Daemon::start(&schema, &[("FORKQ_QUEUES", "default")]);
    assert!(wait_until(Duration::from_secs(20), || schema
        .job(first)
        .unwrap()["state"]
        == "completed"));
    std::thread::sleep(Duration::from_millis(500));
    for id in [delayed, at] {
        assert_eq!(
            schema.job(id).unwrap()["state"],
            "scheduled",
            "{}",
            daemon.log_text()
        );
    }
}

#[test]
fn bad_payloads_are_refused_with_exit_65() {
    let schema = TestSchema::new("cli_payload");
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(200));
    let run = forkq_env(
        &schema,
        &[("FORKQ_MAX_PAYLOAD_BYTES", "100")],
        &["enqueue", "--task", "noop", "--payload", &big],
    );
    assert_eq!(run.code, 65, "{}", run.stderr);
    assert!(
        run.stderr.contains("FORKQ_MAX_PAYLOAD_BYTES"),
        "{}",
        run.stderr
    );

    let run = forkq(
        &schema,
        &[
            "enqueue",
            "--task",
            "noop",
            "--payload",
            r#"{"a":"\u0000"}"#,
        ],
    );
    assert_eq!(run.code, 65, "{}", run.stderr);
    assert!(run.stderr.contains("\\u0000"), "{}", run.stderr);
    let run = forkq(
        &schema,
        &["enqueue", "--task", "noop", "--payload", "{nope"],
    );
    assert_eq!(run.code, 65);
    assert!(
        run.stderr.contains("--payload is not valid JSON"),
        "{}",
        run.stderr
    );

    let file = temp_file(
        "nul.jsonl",
        "{\"task\":\"noop\"}\n{\"task\":\"no\\u0000op\"}\n",
    );
    let run = forkq(&schema, &["enqueue", "--jsonl", file.to_str().unwrap()]);
    assert_eq!(run.code, 65);
    assert!(
        run.stderr.contains("line 2") && run.stderr.contains("NUL"),
        "{}",
        run.stderr
    );
    let file = temp_file(
        "big.jsonl",
        &format!("{{\"task\":\"noop\",\"payload\":{big}}}\n"),
    );
    let run = forkq_env(
        &schema,
        &[("FORKQ_MAX_PAYLOAD_BYTES", "100")],
        &["enqueue", "--jsonl", file.to_str().unwrap()],
    );
    assert_eq!(run.code, 65);
    assert!(
        run.stderr.contains("line 1") && run.stderr.contains("FORKQ_MAX_PAYLOAD_BYTES"),
        "{}",
        run.stderr
    );
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);
}

#[test]
fn jsonl_is_all_or_nothing() {
    let schema = TestSchema::new("cli_jsonl");
    let good = "{\"task\":\"noop\"}\n{\"task\":\"sleep\",\"payload\":{\"ms\":1},\"priority\":2}\n\n{\"task\":\"noop\",\"queue\":\"other\",\"delay\":60}\n";
    let file = temp_file("good.jsonl", good);
    assert_eq!(
        forkq(
            &schema,
            &["enqueue", "--queue", "q", "--jsonl", file.to_str().unwrap()]
        )
        .ok(),
        "3"
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'q'"),
        2
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'other' AND state = 'scheduled'"),
        1
    );
    let piped = run_with(
        &schema.env(),
        &["enqueue", "--queue", "q", "--jsonl", "-"],
        Some(good.as_bytes()),
    );
    assert_eq!(piped.ok(), "3");

    let bad = format!("{good}{{\"task\":\"noop\",\"payload\":{{\"x\":1}}\n{{\"task\":\"noop\"}}\n");
    let file = temp_file("bad.jsonl", &bad);
    let run = forkq(
        &schema,
        &["enqueue", "--queue", "z", "--jsonl", file.to_str().unwrap()],
    );
    assert_eq!(run.code, 65, "{}", run.stderr);
    assert!(run.stderr.contains("line 5"), "{}", run.stderr);
    assert!(
        run.stderr.contains("nothing was enqueued"),
        "{}",
        run.stderr
    );
    let missing_task = temp_file("notask.jsonl", "{\"task\":\"a\"}\n{\"payload\":{}}\n");
    let run = forkq(
        &schema,
        &[
            "enqueue",
            "--queue",
            "z",
            "--jsonl",
            missing_task.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 65);
    assert!(
        run.stderr.contains("line 2") && run.stderr.contains("task"),
        "{}",
        run.stderr
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'z'"),
        0
    );
    let run = forkq(&schema, &["enqueue", "--jsonl", "/nonexistent/jobs.jsonl"]);
    assert_eq!(run.code, 65);
    assert!(run.stderr.contains("cannot read"), "{}", run.stderr);
}

#[test]
fn jsonl_bulk_of_100k_through_the_cli() {
    const JOBS: usize = 100_000;
    let schema = TestSchema::new("cli_bulk");
    let mut input = String::with_capacity(JOBS * 40);
    for i in 0..JOBS {
        input.push_str(&format!(
            "{{\"task\":\"noop\",\"payload\":{{\"i\":{i}}}}}\n"
        ));
    }
    let file = temp_file("bulk.jsonl", &input);
    let started = Instant::now();
    let mut cmd = command(
        &schema.env(),
        &["enqueue", "--jsonl", file.to_str().unwrap()],
    );
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (run, max_rss_kib) = wait_with_peak_memory(child);
    let elapsed = started.elapsed();
    assert_eq!(run.ok(), JOBS.to_string());
    assert_eq!(
        run.stderr, "",
        "no progress line when stderr is not a terminal"
    );
    assert_eq!(schema.live("available"), JOBS as i64);
    println!(
        "bulk enqueue (forkq enqueue --jsonl, whole process): {JOBS} jobs in {elapsed:.2?} = {:.0} jobs/s, \
         peak resident memory {:.1} MiB",
        JOBS as f64 / elapsed.as_secs_f64(),
        max_rss_kib as f64 / 1024.0
    );
    // Read whole (as before streaming) this input took about 180 MiB; streamed, about 16 MiB.
    assert!(
        max_rss_kib < 100 * 1024,
        "forkq enqueue --jsonl peaked at {max_rss_kib} KiB for {JOBS} lines"
    );
    let _ = std::fs::remove_file(file);
}

/// Waits for `child` and collects its output and its peak resident memory (KiB, from `wait4`).
fn wait_with_peak_memory(mut child: std::process::Child) -> (Run, i64) {
    use std::io::Read;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut out = String::new();
    let _ = stdout.read_to_string(&mut out);
    let mut status = 0;
    // SAFETY: plain wait4 on our own child's pid with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let run = Run {
        code,
        stdout: out,
        stderr: err_reader.join().unwrap(),
    };
    (run, usage.ru_maxrss)
}

#[test]
fn jsonl_shows_progress_on_a_terminal_only() {
    let schema = TestSchema::new("cli_progress");
    let input: String = (0..50_000)
        .map(|i| format!("{{\"task\":\"noop\",\"payload\":{{\"i\":{i}}}}}\n"))
        .collect();
    let file = temp_file("progress.jsonl", &input);
    // `script` runs the command on a pseudo-terminal, as a person at a shell would.
    let shell_command = format!("{} enqueue --jsonl {}", forkq_bin(), file.display());
    let mut env = schema.env();
    env.push(("FORKQ_LOG".into(), "warn".into()));
    let output = Command::new("script")
        .args(["-qec", &shell_command, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs a command on a pseudo-terminal");
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    assert!(
        screen.contains("jobs (") && screen.contains("MiB"),
        "a progress line with jobs and bytes read: {screen:?}"
    );
    assert!(screen.trim_end().ends_with("50000"), "{screen:?}");
    assert_eq!(schema.live("available"), 50_000);
}

#[test]
fn status_json_has_the_documented_shape() {
    let schema = TestSchema::new("cli_status");
    let env = schema.env();
    let enqueue = |args: &[&str]| {
        let mut all = vec!["enqueue", "--queue", "q1", "--task"];
        all.extend_from_slice(args);
        id_of(&run_with(&env, &all, None))
    };
    // available 2, scheduled 1, running 1, retryable 1, completed 1, failed 1, cancelled 1.
    let running = enqueue(&["noop", "--priority", "-3"]);
    let retryable = enqueue(&["noop", "--priority", "-2"]);
    let completed = enqueue(&["noop", "--priority", "-1"]);
    let failed = enqueue(&["noop", "--priority", "-1", "--max-attempts", "1"]);
    enqueue(&["noop"]);
    enqueue(&["noop"]);
    enqueue(&["noop", "--delay", "600"]);
    let cancelled = enqueue(&["noop"]);
    forkq(&schema, &["cancel", &cancelled.to_string()]).ok();

    let config = schema.config(&[("FORKQ_QUEUES", "q1")]);
    let mut c = forkq::queue::consumer::Consumer::connect(&config, "w").unwrap();
    let claimed = c.settle_and_claim(&[], 4).unwrap().claimed;
    let ids: Vec<i64> = claimed.iter().map(|cl| cl.job.id).collect();
    assert_eq!(ids, vec![running, retryable, completed, failed]);
    use forkq::queue::consumer::{Ack, Settlement};
    let acks: Vec<Ack> = claimed[1..]
        .iter()
        .map(|cl| {
            Ack::new(
                cl,
                match cl.job.id {
                    id if id == retryable => Settlement::Retry {
                        error: Some("later".into()),
                        delay: Duration::from_secs(600),
                    },
                    id if id == completed => Settlement::Completed(Value::Null),
                    _ => Settlement::Failed("broken".into()),
                },
            )
        })
        .collect();
    assert!(c.settle_and_claim(&acks, 0).unwrap().refused.is_empty());
    std::thread::sleep(Duration::from_millis(1100));

    let out: Value = serde_json::from_str(forkq(&schema, &["status", "--json"]).ok()).unwrap();
    let q = &out["queues"]["q1"];
    let mut keys: Vec<&str> = q.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "available",
            "cancelled",
            "completed",
            "failed",
            "oldest_available_seconds",
            "retryable",
            "running",
            "scheduled"
        ]
    );
    assert_eq!(out.as_object().unwrap().len(), 1, "{out}");
    assert_eq!(out["queues"].as_object().unwrap().len(), 1, "{out}");
    for (state, n) in [
        ("available", 2),
        ("scheduled", 1),
        ("running", 1),
        ("retryable", 1),
        ("completed", 1),
        ("failed", 1),
        ("cancelled", 1),
    ] {
        assert_eq!(q[state], n, "{state} in {out}");
    }
    let oldest = q["oldest_available_seconds"].as_f64().unwrap();
    assert!((1.0..60.0).contains(&oldest), "{oldest}");

    let table = forkq(&schema, &["status"]);
    let text = table.ok();
    assert!(text.lines().any(|l| l.starts_with("q1")), "{text}");
    assert!(
        text.contains("available") && text.contains("cancelled"),
        "{text}"
    );

    let empty = TestSchema::new("cli_status_empty");
    let out: Value = serde_json::from_str(forkq(&empty, &["status", "--json"]).ok()).unwrap();
    assert_eq!(out, json!({"queues": {}}));
    drop(c);
    let _ = running;
}

#[test]
fn job_shows_live_and_archived_jobs() {
    let schema = TestSchema::new("cli_job");
    let id = id_of(&forkq(
        &schema,
        &["enqueue", "--task", "sleep", "--payload", r#"{"ms":5}"#],
    ));
    let job: Value =
        serde_json::from_str(forkq(&schema, &["job", &id.to_string(), "--json"]).ok()).unwrap();
    assert_eq!(job["id"], id);
    assert_eq!(job["state"], "available");
    assert_eq!(job["task"], "sleep");
    assert_eq!(job["payload"], json!({"ms": 5}));
    assert_eq!(job["attempt"], 0);
    assert!(job.get("lease_token").is_none());
    let pretty = forkq(&schema, &["job", &id.to_string()]);
    assert!(
        pretty.ok().lines().count() > 5,
        "pretty JSON: {}",
        pretty.stdout
    );

    forkq(&schema, &["cancel", &id.to_string()]).ok();
    let job: Value =
        serde_json::from_str(forkq(&schema, &["job", &id.to_string(), "--json"]).ok()).unwrap();
    assert_eq!(job["state"], "cancelled");
    assert!(job["finished_at"].is_string());
    let missing = forkq(&schema, &["job", "987654321", "--json"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no job 987654321"),
        "{}",
        missing.stderr
    );
}

#[test]
fn cancel_and_retry_commands() {
    let schema = TestSchema::new("cli_cancel");
    let waiting = id_of(&forkq(
        &schema,
        &["enqueue", "--queue", "q", "--task", "noop"],
    ));
    let run = forkq(&schema, &["cancel", &waiting.to_string()]);
    assert!(run.ok().contains("cancelled"));
    assert_eq!(schema.job(waiting).unwrap()["state"], "cancelled");
    // Cancelling is idempotent.
    let again = forkq(&schema, &["cancel", &waiting.to_string()]);
    assert!(again.ok().contains("cancelled"), "{}", again.stdout);
    assert_eq!(forkq(&schema, &["cancel", "987654321"]).code, 1);

    // A running job is marked and then not retried.
    let running = id_of(&forkq(
        &schema,
        &[
            "enqueue",
            "--queue",
            "q",
            "--task",
            "fail",
            "--max-attempts",
            "5",
        ],
    ));
    let config = schema.config(&[("FORKQ_QUEUES", "q")]);
    let mut c = forkq::queue::consumer::Consumer::connect(&config, "w").unwrap();
    let cl = c.settle_and_claim(&[], 1).unwrap().claimed.remove(0);
    assert_eq!(cl.job.id, running);
    assert!(forkq(&schema, &["cancel", &running.to_string()])
        .ok()
        .contains("will not be retried"));
    let ack = forkq::queue::consumer::Ack {
        id: running,
        lease_token: cl.lease_token,
        batch_id: None,
        settlement: forkq::queue::consumer::Settlement::Retry {
            error: Some("boom".into()),
            delay: Duration::ZERO,
        },
    };
    c.settle_and_claim(&[ack], 0).unwrap();
    assert_eq!(schema.job(running).unwrap()["state"], "cancelled");

    // Retry one job, then every failed job of a queue (and only that queue).
    assert!(forkq(&schema, &["retry", &waiting.to_string()])
        .ok()
        .contains("back in the queue"));
    assert_eq!(schema.job(waiting).unwrap()["state"], "available");
    let not_failed = forkq(&schema, &["retry", &waiting.to_string()]);
    assert_eq!(not_failed.code, 1);
    assert!(
        not_failed.stderr.contains("not in the dead letter"),
        "{}",
        not_failed.stderr
    );
    forkq(&schema, &["cancel", &waiting.to_string()]).ok();

    let mut failed = Vec::new();
    for queue in ["q", "q", "q", "elsewhere"] {
        failed.push(id_of(&forkq(
            &schema,
            &[
                "enqueue",
                "--queue",
                queue,
                "--task",
                "fail",
                "--max-attempts",
                "1",
            ],
        )));
    }
    let config = schema.config(&[("FORKQ_QUEUES", "q,elsewhere")]);
    let mut c = forkq::queue::consumer::Consumer::connect(&config, "w2").unwrap();
    let claimed = c.settle_and_claim(&[], 10).unwrap().claimed;
    assert_eq!(claimed.len(), 4);
    let acks: Vec<_> = claimed
        .iter()
        .map(|cl| {
            forkq::queue::consumer::Ack::new(
                cl,
                forkq::queue::consumer::Settlement::Failed("nope".into()),
            )
        })
        .collect();
    c.settle_and_claim(&acks, 0).unwrap();
    assert_eq!(schema.archived("failed"), 4);
    let unconfirmed = forkq(&schema, &["retry", "--failed", "--queue", "q"]);
    assert_eq!(unconfirmed.code, 1, "{}", unconfirmed.stdout);
    assert!(
        unconfirmed
            .stderr
            .contains("3 jobs match; nothing was changed: add --yes"),
        "{}",
        unconfirmed.stderr
    );
    assert_eq!(schema.archived("failed"), 4, "nothing moved without --yes");
    let run = forkq(&schema, &["retry", "--failed", "--queue", "q", "--yes"]);
    assert_eq!(run.ok(), "3 job(s) back in their queue");
    assert_eq!(
        schema.count("SELECT count(*) FROM {s}.jobs WHERE queue = 'q' AND state = 'available'"),
        3
    );
    assert_eq!(schema.archived("failed"), 1, "the other queue's job stays");
    assert_eq!(
        schema.archived("cancelled"),
        2,
        "cancelled jobs are not in --failed"
    );
    assert_eq!(
        forkq(&schema, &["retry", "--failed", "--queue", "q"]).ok(),
        "no job matches; nothing to retry"
    );
    // One job needs no confirmation; the filter spans every queue.
    assert_eq!(
        forkq(&schema, &["retry", "--failed"]).ok(),
        "1 job(s) back in their queue"
    );
    assert_eq!(forkq(&schema, &["retry"]).code, 2, "an id or a filter");
}

#[test]
fn daemon_retries_then_dead_letters_with_the_error() {
    let schema = TestSchema::new("cli_deadletter");
    let id = id_of(&forkq(
        &schema,
        &[
            "enqueue",
            "--task",
            "fail",
            "--payload",
            r#"{"error":"disk on fire"}"#,
            "--max-attempts",
            "3",
        ],
    ));
    let ok = id_of(&forkq(&schema, &["enqueue", "--task", "noop"]));
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_RETRY_BACKOFF_BASE_SECONDS", "1"),
            ("FORKQ_CONCURRENCY", "1"),
        ],
    );
    let done = wait_until(Duration::from_secs(30), || {
        schema.job(id).is_some_and(|j| j["state"] == "failed")
    });
    assert!(done, "job {:?}\n{}", schema.job(id), daemon.log_text());
    let job = schema.job(id).unwrap();
    assert_eq!(job["attempt"], 3);
    assert_eq!(job["last_error"], "disk on fire");
    assert_eq!(schema.job(ok).unwrap()["state"], "completed");
}

/// The NOTIFY channel `forkq_<schema>` is an identifier too, so a schema name may have 57 bytes
/// (63 - 6): at that length `migrate`, `enqueue` and the daemon all work; one byte more and every
/// command refuses it with exit 78 naming `FORKQ_SCHEMA`, `migrate` first.
#[test]
fn a_schema_name_is_accepted_by_every_command_or_by_none() {
    let base = format!("t_long_{}_", std::process::id());
    let longest = TestSchema {
        name: format!("{base}{}", "x".repeat(57 - base.len())),
    };
    let env = longest.env();
    run_with(&env, &["migrate"], None).ok();
    let id = id_of(&run_with(&env, &["enqueue", "--task", "noop"], None));
    let _daemon = Daemon::start(&longest, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || longest.archived("completed")
            == 1),
        "job {id} not done"
    );

    let too_long = FreshSchema(format!("{base}{}", "x".repeat(58 - base.len())));
    for args in [&["migrate"][..], &["enqueue", "--task", "noop"], &["run"]] {
        let run = run_with(&env_of(&too_long.0), args, None);
        assert_eq!(run.code, 78, "forkq {args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("FORKQ_SCHEMA") && run.stderr.contains("57 bytes"),
            "forkq {args:?}: {}",
            run.stderr
        );
    }
}
