//! The deployment files agree with the daemon and with each other.
//!
//! systemd units, Dockerfile, compose stack and Kubernetes manifest are linted with the real tools
//! where they can run here (`systemd-analyze verify`, `docker compose config`, hadolint,
//! `kubernetes-validate --strict`; missing ones are installed by `scripts/ops-tools.sh`, and a check
//! is skipped with a printed reason only when its tool cannot be had), and every one of them is parsed and checked against the daemon's real
//! configuration parser: each file's environment must be accepted by `Config::from_vars`, and the
//! numbers that must agree (docs/deploying.md) are asserted on the parsed values. The
//! configuration documentation (`config.example.env`, the table in docs/configuration.md) is checked against the
//! source, both ways, and its defaults against the parser's.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forkq::config::Config;
use serde_yaml::Value as Yaml;

/// `FORKQ_*` names in `src/` that are not settings: job metadata the exec and coproc handlers
/// hand to the user's program, never read by forkq itself. A new name in the source is either a
/// setting (then documented in config.example.env and docs/configuration.md) or belongs here.
const HANDLER_METADATA: &[&str] = &[
    "FORKQ_JOB_ID",
    "FORKQ_QUEUE",
    "FORKQ_TASK",
    "FORKQ_ATTEMPT",
    "FORKQ_BATCH_ID",
    "FORKQ_PROGRESS_FILE",
];

/// Settings read under a name without the `FORKQ_` prefix.
const UNPREFIXED_SETTINGS: &[&str] = &["DATABASE_URL"];

/// The stop timeout of every service manager must exceed the daemon's shutdown deadline by at
/// least this much: after the deadline the supervisor SIGKILLs what is left and waits up to 2 s to
/// reap it, gives their jobs back through a releaser allowed 5 s, then stops the probe and exits
/// (docs/deploying.md, "The numbers that must agree").
const STOP_MARGIN: Duration = forkq::supervisor::STOP_OVERHEAD;

/// The health port the images and manifests use: the default of `FORKQ_HEALTH_ADDR`.
const HEALTH_PORT: u16 = 9280;

// ---------------------------------------------------------------------------------------------
// Reading the repository

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Every `.rs` file under `dir`, recursively.
fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Every maximal `FORKQ_[A-Z0-9_]+` token in `text` (a bare `FORKQ_` or `FORKQ_*` is not a name).
fn forkq_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("FORKQ_") {
        let start = i + at;
        let preceded = start > 0 && is_name_byte(bytes[start - 1]);
        let mut end = start + "FORKQ_".len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        if !preceded && end > start + "FORKQ_".len() {
            names.insert(text[start..end].trim_end_matches('_').to_string());
        }
        i = end;
    }
    names
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'
}

/// One variable of `config.example.env`.
#[derive(Debug)]
struct Documented {
    name: String,
    /// The default as written (empty: computed or none).
    default: String,
    /// Whether the assignment is active (`NAME=v`) rather than commented out (`#NAME=v`).
    active: bool,
    /// The comment block above it.
    doc: String,
}

/// Parses an env file in the format of config.example.env: `# text` comment lines, `NAME=value`
/// and `#NAME=value` assignments.
fn parse_env_file(text: &str) -> Vec<Documented> {
    let mut vars = Vec::new();
    let mut doc = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            doc.clear();
            continue;
        }
        let (active, body) = match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_uppercase()) => (false, rest),
            Some(rest) => {
                doc.push_str(rest.trim());
                doc.push('\n');
                continue;
            }
            None => (true, line),
        };
        let (name, value) = body
            .split_once('=')
            .unwrap_or_else(|| panic!("not NAME=value: {line:?}"));
        assert!(
            name.bytes().all(is_name_byte),
            "not a variable name: {name:?} in {line:?}"
        );
        vars.push(Documented {
            name: name.to_string(),
            default: value.to_string(),
            active,
            doc: std::mem::take(&mut doc),
        });
    }
    vars
}

fn example_env() -> Vec<Documented> {
    parse_env_file(&read("config.example.env"))
}

/// The configuration table of docs/configuration.md: variable -> (default, allowed, meaning).
fn documented_config_table() -> BTreeMap<String, Vec<String>> {
    let page = read("docs/configuration.md");
    let mut rows = BTreeMap::new();
    for line in page.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_string())
            .collect();
        let name = cells[0].trim_matches('`');
        if name.bytes().all(is_name_byte) && !name.is_empty() {
            assert_eq!(
                cells.len(),
                4,
                "row must be variable | default | allowed | meaning: {line}"
            );
            rows.insert(name.to_string(), cells[1..].to_vec());
        }
    }
    rows
}

/// Settings read by the code: every `FORKQ_*` name in `src/` except handler metadata, plus the
/// unprefixed settings.
fn settings_in_source() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in rust_sources(&repo_path("src")) {
        names.extend(forkq_names(&std::fs::read_to_string(file).unwrap()));
    }
    names.retain(|n| !HANDLER_METADATA.contains(&n.as_str()));
    names.extend(UNPREFIXED_SETTINGS.iter().map(|s| s.to_string()));
    names
}

/// All source text of `src/`, to ask whether a name is read (appears as a string literal).
fn source_text() -> String {
    rust_sources(&repo_path("src"))
        .into_iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

/// Parses a deployment file's environment with the daemon's own parser; every name in it must be a
/// documented setting. A placeholder database URL is added when the file gets it elsewhere.
fn parse_deployment_env(what: &str, env: &BTreeMap<String, String>) -> Config {
    let documented: BTreeSet<String> = example_env().into_iter().map(|v| v.name).collect();
    for name in env.keys() {
        assert!(
            documented.contains(name),
            "{what} sets {name}, which config.example.env does not document"
        );
    }
    let mut vars: HashMap<String, String> = env.clone().into_iter().collect();
    vars.entry("DATABASE_URL".into())
        .or_insert_with(|| "postgres://placeholder@127.0.0.1/db".into());
    Config::from_vars(vars).unwrap_or_else(|e| panic!("{what}: the daemon refuses it: {e}"))
}

/// The rules between settings that every deployment must keep (docs/deploying.md, "The numbers
/// that must agree"), checked on the daemon's parsed view of that deployment's environment.
fn assert_numbers_agree(what: &str, config: &Config, stop_timeout: Duration) {
    let grace = config.shutdown_grace;
    assert!(
        stop_timeout >= grace + STOP_MARGIN,
        "{what}: stop timeout {stop_timeout:?} must be at least FORKQ_SHUTDOWN_GRACE_SECONDS \
         ({grace:?}) + {STOP_MARGIN:?}"
    );
    assert!(
        config.health_stale * 3 < config.lease * 2,
        "{what}: FORKQ_HEALTH_STALE_SECONDS ({:?}) must stay below 2/3 of FORKQ_LEASE_SECONDS ({:?}) \
         so a wedged child is killed before its lease can lapse",
        config.health_stale,
        config.lease
    );
    if let Some(timeout) = config.job_timeout {
        assert!(
            timeout < grace,
            "{what}: FORKQ_JOB_TIMEOUT_SECONDS ({timeout:?}) should be below the shutdown grace \
             ({grace:?}) so that a stop lets every job finish"
        );
    }
}

/// "45s", "45", "1min", "1m30s", "2min 5s" in seconds (systemd and compose durations).
fn parse_duration(raw: &str) -> Duration {
    let mut total = 0u64;
    let mut number = String::new();
    let mut unit = String::new();
    let mut flush = |number: &mut String, unit: &mut String| {
        if number.is_empty() {
            return;
        }
        let n: u64 = number.parse().unwrap();
        total += n * match unit.as_str() {
            "" | "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            other => panic!("unknown duration unit {other:?} in {raw:?}"),
        };
        number.clear();
        unit.clear();
    };
    for c in raw.chars() {
        if c.is_ascii_digit() {
            if !unit.is_empty() {
                flush(&mut number, &mut unit);
            }
            number.push(c);
        } else if c.is_ascii_alphabetic() {
            unit.push(c);
        } else {
            flush(&mut number, &mut unit);
        }
    }
    flush(&mut number, &mut unit);
    Duration::from_secs(total)
}

// ---------------------------------------------------------------------------------------------
// Tools

/// Runs scripts/ops-tools.sh once per test process (installs missing linters); returns its output
/// so a skip can say why.
fn install_tools() -> &'static str {
    static LOG: OnceLock<String> = OnceLock::new();
    LOG.get_or_init(|| {
        match Command::new("bash")
            .arg(repo_path("scripts/ops-tools.sh"))
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("cannot run scripts/ops-tools.sh: {e}"),
        }
    })
}

/// Whether `program args` runs and exits 0.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The first of `candidates` (program and leading arguments) that answers `probe`, installing
/// the tools first if none does; `None` after printing why the check is skipped.
fn find_tool(what: &str, candidates: &[&[&str]], probe: &str) -> Option<Vec<String>> {
    let find = || {
        candidates.iter().find_map(|c| {
            let args: Vec<&str> = c[1..].iter().copied().chain([probe]).collect();
            runs(c[0], &args).then(|| c.iter().map(|s| s.to_string()).collect())
        })
    };
    if let Some(found) = find() {
        return Some(found);
    }
    let log = install_tools();
    let found = find();
    if found.is_none() {
        println!(
            "SKIPPED: {what} is not available and scripts/ops-tools.sh could not install it:\n{log}"
        );
    }
    found
}

fn run_tool(tool: &[String], args: &[&str], dir: &Path) -> Output {
    Command::new(&tool[0])
        .args(&tool[1..])
        .args(args)
        .current_dir(dir)
        .env_remove("FORKQ_CONCURRENCY")
        .env_remove("POSTGRES_PASSWORD")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool:?}: {e}"))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A scratch directory for one test, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> ScratchDir {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("ops-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// systemd

/// A unit file: (section, key) -> values in order (keys like Environment= repeat).
struct Unit(Vec<(String, String, String)>);

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let (key, value) = line.split_once('=').expect("key=value");
            entries.push((section.clone(), key.to_string(), value.to_string()));
        }
        Unit(entries)
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    fn get(&self, section: &str, key: &str) -> &str {
        self.all(section, key)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("[{section}] {key}= is missing"))
    }

    /// The variables of the Environment= lines.
    fn environment(&self) -> BTreeMap<String, String> {
        self.all("Service", "Environment")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("Environment=NAME=value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(tool) = find_tool("systemd-analyze", &[&["systemd-analyze"]], "--version") else {
        return;
    };
    // verify insists that ExecStart's binary exists: check copies of the units that point at the
    // binary this test run built, side by side so Requires=forkq-migrate.service resolves.
    let dir = ScratchDir::new("systemd");
    let mut paths = Vec::new();
    for unit in [
        "forkq.service",
        "forkq-migrate.service",
        "forkq-dashboard.service",
    ] {
        let text = read(&format!("systemd/{unit}"));
        assert!(
            text.contains("/usr/local/bin/forkq "),
            "{unit} runs /usr/local/bin/forkq"
        );
        let path = dir.0.join(unit);
        std::fs::write(
            &path,
            text.replace(
                "/usr/local/bin/forkq ",
                &format!("{} ", common::forkq_bin()),
            ),
        )
        .unwrap();
        paths.push(path.to_string_lossy().into_owned());
    }
    let mut args = vec!["verify", "--man=no"];
    args.extend(paths.iter().map(String::as_str));
    let out = run_tool(&tool, &args, &dir.0);
    let text = output_text(&out);
    println!("systemd-analyze verify:\n{text}");
    // verify exits 0 on unknown keys and bad values ("ignoring"), so any output is a failure too.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
}

#[test]
fn systemd_unit_agrees_with_the_daemon() {
    let unit = Unit::parse(&read("systemd/forkq.service"));
    assert_eq!(
        unit.get("Service", "Type"),
        "notify",
        "READY=1 comes from the supervisor"
    );
    assert_eq!(unit.get("Service", "ExecStart"), "/usr/local/bin/forkq run");
    assert_eq!(
        unit.get("Service", "KillMode"),
        "mixed",
        "SIGTERM to the supervisor only"
    );
    assert_eq!(unit.get("Service", "KillSignal"), "SIGTERM");
    assert_eq!(unit.get("Service", "Restart"), "on-failure");
    let watchdog = parse_duration(unit.get("Service", "WatchdogSec"));
    assert!(
        watchdog >= Duration::from_secs(2),
        "WatchdogSec {watchdog:?}: the supervisor pets every half of it from a 250 ms loop"
    );
    assert_eq!(
        unit.get("Service", "EnvironmentFile"),
        "/etc/forkq/forkq.env"
    );
    let user = unit.get("Service", "User");
    assert!(
        user != "root" && user != "0",
        "a dedicated user, not {user}"
    );
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(unit.get("Service", key), value, "hardening {key}");
    }
    for key in ["Requires", "After"] {
        assert!(
            unit.get("Unit", key)
                .split_whitespace()
                .any(|u| u == "forkq-migrate.service"),
            "{key}= must name forkq-migrate.service"
        );
    }
    assert_eq!(unit.get("Install", "WantedBy"), "multi-user.target");

    let config = parse_deployment_env("systemd/forkq.service Environment=", &unit.environment());
    assert!(
        config.crash_loop_exit,
        "systemd restarts on exit, not on a red /livez"
    );
    assert_numbers_agree(
        "systemd/forkq.service",
        &config,
        parse_duration(unit.get("Service", "TimeoutStopSec")),
    );

    let migrate = Unit::parse(&read("systemd/forkq-migrate.service"));
    assert_eq!(migrate.get("Service", "Type"), "oneshot");
    assert_eq!(migrate.get("Service", "RemainAfterExit"), "yes");
    assert_eq!(
        migrate.get("Service", "ExecStart"),
        "/usr/local/bin/forkq migrate"
    );
    assert_eq!(migrate.get("Unit", "Before"), "forkq.service");
    assert_eq!(
        migrate.get("Service", "EnvironmentFile"),
        "/etc/forkq/forkq.env"
    );
    assert_eq!(migrate.get("Service", "User"), user);
}

// ---------------------------------------------------------------------------------------------
// Docker image

/// The Dockerfile's instructions, continuation lines joined and comments dropped: (KEYWORD, rest).
fn dockerfile() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("docker/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
        instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    instructions
}

/// A JSON-array (exec form) argument of an instruction.
fn exec_form(raw: &str) -> Vec<String> {
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("not exec form {raw:?}: {e}"))
}

#[test]
fn dockerfile_builds_a_small_nonroot_image_running_forkq_as_pid_1() {
    let all = dockerfile();
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(
        stages.len() >= 2,
        "multi-stage: a build stage and a runtime stage"
    );
    let build_stage = &all[..stages[stages.len() - 1]];
    let runtime = &all[stages[stages.len() - 1]..];
    let find = |instrs: &[(String, String)], keyword: &str| -> Vec<String> {
        instrs
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert!(
        find(build_stage, "RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the build stage runs cargo build --release --locked"
    );
    let base = &runtime[0].1;
    assert!(
        base.contains("-slim") || base.contains("distroless"),
        "a small runtime base (slim or distroless), not {base}"
    );
    assert!(
        find(runtime, "COPY")
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with("/usr/local/bin/forkq")),
        "the runtime copies only the binary from the build stage"
    );
    let user = find(runtime, "USER");
    let user = user.last().expect("USER in the runtime stage");
    assert!(
        !["root", "0", "0:0"].contains(&user.as_str()),
        "a non-root user, not {user}"
    );
    assert_eq!(find(runtime, "STOPSIGNAL"), ["SIGTERM"]);
    assert_eq!(find(runtime, "EXPOSE"), [HEALTH_PORT.to_string()]);
    let healthcheck = find(runtime, "HEALTHCHECK");
    let cmd = healthcheck[0]
        .split_once("CMD ")
        .expect("HEALTHCHECK ... CMD [...]")
        .1;
    assert_eq!(exec_form(cmd), ["forkq", "health"]);
    // forkq itself is PID 1 (it reaps orphans): no tini or dumb-init in front of it.
    assert_eq!(exec_form(&find(runtime, "ENTRYPOINT")[0]), ["forkq"]);
    assert_eq!(exec_form(&find(runtime, "CMD")[0]), ["run"]);

    let default_port = Config::from_vars(HashMap::from([(
        "DATABASE_URL".to_string(),
        "postgres://x@127.0.0.1/db".to_string(),
    )]))
    .unwrap()
    .health_addr
    .port();
    assert_eq!(
        default_port, HEALTH_PORT,
        "EXPOSE follows FORKQ_HEALTH_ADDR's default"
    );

    let ignore = read(".dockerignore");
    for excluded in ["target", ".git"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == excluded),
            ".dockerignore leaves out {excluded}"
        );
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let Some(tool) = find_tool("hadolint", &[&["hadolint"]], "--version") else {
        return;
    };
    let out = run_tool(&tool, &["docker/Dockerfile"], &repo_path("."));
    let text = output_text(&out);
    println!("hadolint:\n{text}");
    assert!(out.status.success(), "hadolint docker/Dockerfile:\n{text}");
}

/// Health checks: `forkq health` (the image's HEALTHCHECK) and the probe paths of the manifests
/// answer on a real daemon, and `forkq health` fails once it is gone.
#[test]
fn health_command_and_probe_paths_work_against_a_running_daemon() {
    let schema = common::TestSchema::new("ops_health");
    let mut daemon = common::Daemon::start(&schema, &[]);
    let port = daemon.addr.port().to_string();
    let health = |addr_env: &str, args: &[&str]| {
        Command::new(common::forkq_bin())
            .arg("health")
            .args(args)
            .env_clear()
            .envs(schema.env())
            .env("FORKQ_HEALTH_ADDR", addr_env)
            .output()
            .unwrap()
    };
    // As in the container: FORKQ_HEALTH_ADDR=0.0.0.0:PORT is asked on 127.0.0.1.
    let out = health(&format!("0.0.0.0:{port}"), &[]);
    assert!(out.status.success(), "forkq health: {}", output_text(&out));
    let out = health("0.0.0.0:1", &["--addr", &format!("127.0.0.1:{port}")]);
    assert!(
        out.status.success(),
        "forkq health --addr: {}",
        output_text(&out)
    );

    let manifest = kubernetes();
    let container = &deployment_container(&manifest);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        let answered = common::wait_until(Duration::from_secs(20), || {
            matches!(daemon.get(path), Some((200, _)))
        });
        assert!(
            answered,
            "{probe} {path} does not answer 200: {:?}",
            daemon.get(path)
        );
    }

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(40)), Some(0));
    let out = health(&format!("0.0.0.0:{port}"), &[]);
    assert!(
        !out.status.success(),
        "forkq health must fail without a daemon"
    );
}

/// The margin the stop timeouts are built on: with jobs still running at SIGTERM, the daemon is gone
/// within FORKQ_SHUTDOWN_GRACE_SECONDS + STOP_MARGIN.
#[test]
fn daemon_stops_within_its_grace_plus_the_stop_margin() {
    let schema = common::TestSchema::new("ops_stop");
    schema.enqueue_n("default", "sleep", serde_json::json!({"ms": 120_000}), 2);
    let grace = Duration::from_secs(3);
    let mut daemon = common::Daemon::start(&schema, &[("FORKQ_SHUTDOWN_GRACE_SECONDS", "3")]);
    let busy = common::wait_until(Duration::from_secs(20), || schema.live("running") == 2);
    assert!(busy, "both children should be running a long job");
    let started = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let code = daemon.wait_exit(grace + STOP_MARGIN + Duration::from_secs(10));
    let took = started.elapsed();
    println!("stop with 2 running jobs, grace {grace:?}: exited {code:?} after {took:.2?}");
    assert_eq!(code, Some(0));
    assert!(
        took <= grace + STOP_MARGIN,
        "took {took:?}, more than grace {grace:?} + margin {STOP_MARGIN:?}"
    );
}

/// The slowest stop: a child that cannot stop (frozen) is killed at the deadline, and the
/// releaser that gives its job back waits on a row lock until it is killed at its own limit. The
/// daemon is still gone within FORKQ_SHUTDOWN_GRACE_SECONDS + STOP_MARGIN, the margin every
/// shipped stop timeout is checked against.
#[test]
fn the_slowest_stop_fits_the_stop_margin() {
    let schema = common::TestSchema::new("ops_slowstop");
    let id = schema.enqueue("default", "sleep", serde_json::json!({"ms": 120_000}));
    let grace = Duration::from_secs(2);
    let mut daemon = common::Daemon::start(
        &schema,
        &[
            ("FORKQ_SHUTDOWN_GRACE_SECONDS", "2"),
            // A statement timeout (a third of the stale window) longer than the releaser's limit.
            ("FORKQ_HEALTH_STALE_SECONDS", "30"),
            ("FORKQ_LEASE_SECONDS", "60"),
        ],
    );
    let mut holder = 0;
    let running = common::wait_until(Duration::from_secs(20), || {
        daemon.livez().is_some_and(|(_, body)| {
            body["slots"].as_array().unwrap().iter().any(|s| {
                holder = s["pid"].as_i64().unwrap_or(0) as i32;
                s["job_id"].as_i64() == Some(id)
            })
        })
    });
    assert!(running, "the job did not start");
    let stop = nix::sys::signal::Signal::SIGSTOP;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder), stop).unwrap();
    let mut client = schema.client();
    let mut lock = client.transaction().unwrap();
    lock.execute(
        &format!(
            "SELECT 1 FROM \"{}\".jobs WHERE id = $1 FOR UPDATE",
            schema.name
        ),
        &[&id],
    )
    .unwrap();
    let started = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let code = daemon.wait_exit(grace + STOP_MARGIN + Duration::from_secs(10));
    let took = started.elapsed();
    lock.rollback().unwrap();
    println!("slowest stop, grace {grace:?}: exited {code:?} after {took:.2?}");
    assert_eq!(code, Some(0));
    assert!(
        daemon.log_text().contains("did not finish within"),
        "the releaser was not the slow part; log:\n{}",
        daemon.log_text()
    );
    assert!(
        took <= grace + STOP_MARGIN,
        "took {took:?}, more than grace {grace:?} + margin {STOP_MARGIN:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// docker compose

/// `${NAME:-default}` / `${NAME-default}` / `${NAME}` with the shell environment ignored, as the
/// stack runs when nothing is exported.
fn interpolate(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("closing }") + at;
        let inner = &rest[at + 2..end];
        let default = inner
            .split_once(":-")
            .or_else(|| inner.split_once('-'))
            .map_or("", |(_, d)| d);
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn yaml_str(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn compose() -> Yaml {
    serde_yaml::from_str(&read("docker/docker-compose.yaml")).expect("compose YAML")
}

/// A compose service's environment as the container sees it: env_file, then environment:.
fn compose_env(service: &Yaml) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let files = match service.get("env_file") {
        None => Vec::new(),
        Some(Yaml::Sequence(files)) => files.iter().map(yaml_str).collect(),
        Some(file) => vec![yaml_str(file)],
    };
    for file in files {
        for var in parse_env_file(&read(&format!("docker/{file}"))) {
            if var.active {
                env.insert(var.name, var.default);
            }
        }
    }
    if let Some(Yaml::Mapping(vars)) = service.get("environment") {
        for (k, v) in vars {
            env.insert(yaml_str(k), interpolate(&yaml_str(v)));
        }
    }
    env
}

fn string_list(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(yaml_str)
        .collect()
}

#[test]
fn compose_file_passes_docker_compose_config() {
    let Some(tool) = find_tool(
        "docker compose",
        &[&["docker", "compose"], &["docker-compose"]],
        "version",
    ) else {
        return;
    };
    let out = run_tool(
        &tool,
        &["-f", "docker-compose.yaml", "config"],
        &repo_path("docker"),
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{tool:?} config:\n{text}");
    // Cross-check this test's reading of env_file + environment with the tool's.
    let resolved: Yaml = serde_yaml::from_slice(&out.stdout).expect("config prints YAML");
    let worker = &resolved["services"]["worker"];
    let tool_env: BTreeMap<String, String> = worker["environment"]
        .as_mapping()
        .expect("resolved environment")
        .iter()
        .map(|(k, v)| (yaml_str(k), yaml_str(v)))
        .collect();
    assert_eq!(tool_env, compose_env(&compose()["services"]["worker"]));
}

#[test]
fn compose_stack_agrees_with_the_daemon() {
    let doc = compose();
    let services = &doc["services"];
    let postgres = &services["postgres"];
    let migrate = &services["migrate"];
    let worker = &services["worker"];

    let pg_check = string_list(&postgres["healthcheck"]["test"]).join(" ");
    assert!(
        pg_check.contains("pg_isready"),
        "postgres healthcheck: {pg_check}"
    );

    assert_eq!(string_list(&migrate["command"]), ["migrate"]);
    assert_eq!(
        migrate["restart"].as_str(),
        Some("no"),
        "migrate is a one-shot"
    );
    assert_eq!(
        migrate["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert!(
        migrate["build"]["dockerfile"].as_str() == Some("docker/Dockerfile"),
        "the stack builds docker/Dockerfile"
    );
    assert_eq!(worker["image"], migrate["image"], "one image for both");

    assert_eq!(string_list(&worker["command"]), ["run"]);
    assert_eq!(
        worker["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(
        worker["depends_on"]["migrate"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(worker["restart"].as_str(), Some("unless-stopped"));
    assert_eq!(
        string_list(&worker["healthcheck"]["test"]),
        ["CMD", "forkq", "health"]
    );
    assert_ne!(
        worker["init"].as_bool(),
        Some(true),
        "forkq is PID 1 and reaps"
    );
    if let Some(signal) = worker.get("stop_signal") {
        assert_eq!(signal.as_str(), Some("SIGTERM"));
    }
    let raw_concurrency = yaml_str(&worker["environment"]["FORKQ_CONCURRENCY"]);
    assert!(
        raw_concurrency.starts_with("${FORKQ_CONCURRENCY"),
        "concurrency is a variable of the stack: {raw_concurrency}"
    );

    let env = compose_env(worker);
    let config = parse_deployment_env("docker-compose worker", &env);
    assert!(
        config.crash_loop_exit,
        "compose never restarts an unhealthy container: FORKQ_CRASH_LOOP_EXIT=1"
    );
    assert_numbers_agree(
        "docker-compose worker",
        &config,
        parse_duration(&yaml_str(&worker["stop_grace_period"])),
    );
    let ports = string_list(&worker["ports"]);
    assert!(
        ports
            .iter()
            .any(|p| p.ends_with(&format!(":{}", config.health_addr.port()))),
        "the published port is the probe's ({ports:?})"
    );
    assert!(
        config.health_addr.ip().is_unspecified(),
        "the probe must listen beyond the container's loopback"
    );
    parse_deployment_env("docker-compose migrate", &compose_env(migrate));
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn kubernetes() -> Vec<Yaml> {
    let text = read("docker/kubernetes.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("manifest YAML"))
        .filter(|doc: &Yaml| !doc.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn deployment_container(docs: &[Yaml]) -> Yaml {
    let containers = kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers")
        .clone();
    assert_eq!(containers.len(), 1, "one container: forkq");
    containers[0].clone()
}

/// "500m" or "4" (cores) in millicores.
fn millicores(v: &Yaml) -> u64 {
    let s = yaml_str(v);
    match s.strip_suffix('m') {
        Some(m) => m.parse().unwrap(),
        None => (s.parse::<f64>().unwrap() * 1000.0) as u64,
    }
}

/// "288Mi" / "1Gi" in MiB.
fn mebibytes(v: &Yaml) -> u64 {
    let s = yaml_str(v);
    if let Some(m) = s.strip_suffix("Mi") {
        m.parse().unwrap()
    } else if let Some(g) = s.strip_suffix("Gi") {
        g.parse::<u64>().unwrap() * 1024
    } else {
        panic!("memory {s:?}: write it in Mi or Gi")
    }
}

/// The container's configuration: the ConfigMap it loads, and its Secret reference for the URL.
fn assert_configured_from_configmap_and_secret(what: &str, container: &Yaml, docs: &[Yaml]) {
    let configmap = kind(docs, "ConfigMap");
    let secret = kind(docs, "Secret");
    let from = container["envFrom"].as_sequence().expect("envFrom");
    assert!(
        from.iter()
            .any(|f| f["configMapRef"]["name"] == configmap["metadata"]["name"]),
        "{what}: settings come from the ConfigMap"
    );
    let url = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"].as_str() == Some("DATABASE_URL"))
        .unwrap_or_else(|| panic!("{what}: DATABASE_URL in env"));
    let key_ref = &url["valueFrom"]["secretKeyRef"];
    assert_eq!(
        key_ref["name"], secret["metadata"]["name"],
        "{what}: DATABASE_URL from the Secret"
    );
    let key = key_ref["key"].as_str().unwrap();
    assert!(
        !secret["stringData"][key].is_null() || !secret["data"][key].is_null(),
        "the Secret holds {key}"
    );
}

#[test]
fn kubernetes_manifest_passes_schema_validation() {
    let Some(tool) = find_tool(
        "kubernetes-validate",
        &[&["kubernetes-validate"]],
        "--version",
    ) else {
        return;
    };
    // --strict also rejects fields the schema does not know (a misspelt probe setting).
    let out = run_tool(
        &tool,
        &["--strict", "docker/kubernetes.yaml"],
        &repo_path("."),
    );
    let text = output_text(&out);
    println!("kubernetes-validate:\n{text}");
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{text}"
    );
    assert_eq!(
        text.matches(" passed for resource ").count(),
        kubernetes().len(),
        "every document validated"
    );
}

#[test]
fn kubernetes_manifest_agrees_with_the_daemon() {
    let docs = kubernetes();
    let configmap = kind(&docs, "ConfigMap");
    let data: BTreeMap<String, String> = configmap["data"]
        .as_mapping()
        .expect("ConfigMap data")
        .iter()
        .map(|(k, v)| (yaml_str(k), yaml_str(v)))
        .collect();
    for secret in ["DATABASE_URL", "FORKQ_DATABASE_URL"] {
        assert!(
            !data.contains_key(secret),
            "{secret} belongs in the Secret, not the ConfigMap"
        );
    }
    let config = parse_deployment_env("kubernetes ConfigMap", &data);
    assert!(
        !config.crash_loop_exit,
        "under Kubernetes the liveness probe restarts a crash-looping pod"
    );

    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = deployment_container(&docs);
    assert_eq!(string_list(&container["args"]), ["run"]);
    assert_configured_from_configmap_and_secret("Deployment", &container, &docs);
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));

    // Probes: the daemon's paths, on the port FORKQ_HEALTH_ADDR binds.
    let ports = container["ports"].as_sequence().expect("ports");
    let resolve_port = |port: &Yaml| -> u16 {
        match port {
            Yaml::Number(n) => n.as_u64().unwrap() as u16,
            Yaml::String(name) => ports
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no container port named {name}"))
                as u16,
            other => panic!("probe port {other:?}"),
        }
    };
    for (probe, path) in [
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/livez"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        let port = resolve_port(&get["port"]);
        assert_eq!(port, HEALTH_PORT, "{probe} port");
        assert_eq!(
            port,
            config.health_addr.port(),
            "{probe} port = FORKQ_HEALTH_ADDR's port"
        );
    }
    assert!(
        config.health_addr.ip().is_unspecified(),
        "the kubelet probes the pod IP"
    );

    let termination = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    assert_numbers_agree("kubernetes Deployment", &config, termination);

    // Resources follow FORKQ_CONCURRENCY (C) and FORKQ_MAX_CHILD_RSS_MB (M), the rule of the
    // manifest's header and docs/deploying.md: limits.cpu = C cores; C x 100m <= requests.cpu <= limits.cpu;
    // limits.memory >= 32Mi + C x M Mi; requests.memory <= limits.memory.
    assert!(
        data.contains_key("FORKQ_CONCURRENCY"),
        "set FORKQ_CONCURRENCY explicitly: the default follows the node's CPUs"
    );
    let c = config.concurrency as u64;
    let m = config
        .max_child_rss_mb
        .expect("FORKQ_MAX_CHILD_RSS_MB: a child budget keeps the pod inside its memory limit");
    let resources = &container["resources"];
    let (cpu_req, cpu_lim) = (
        millicores(&resources["requests"]["cpu"]),
        millicores(&resources["limits"]["cpu"]),
    );
    let (mem_req, mem_lim) = (
        mebibytes(&resources["requests"]["memory"]),
        mebibytes(&resources["limits"]["memory"]),
    );
    assert_eq!(cpu_lim, c * 1000, "limits.cpu = FORKQ_CONCURRENCY cores");
    assert!(
        (c * 100..=cpu_lim).contains(&cpu_req),
        "requests.cpu {cpu_req}m must be in C x 100m ..= limits.cpu"
    );
    assert!(
        mem_lim >= 32 + c * m,
        "limits.memory {mem_lim}Mi must hold 32Mi + C ({c}) x FORKQ_MAX_CHILD_RSS_MB ({m})"
    );
    assert!(mem_req <= mem_lim, "requests.memory <= limits.memory");

    // The migration Job: same image, same configuration, `forkq migrate`.
    let job = kind(&docs, "Job");
    let job_pod = &job["spec"]["template"]["spec"];
    let job_container = &job_pod["containers"][0];
    assert_eq!(string_list(&job_container["args"]), ["migrate"]);
    assert_eq!(
        job_container["image"], container["image"],
        "the Job migrates with the same image"
    );
    assert_configured_from_configmap_and_secret("migration Job", job_container, &docs);
    assert!(matches!(
        job_pod["restartPolicy"].as_str(),
        Some("OnFailure" | "Never")
    ));

    // The PodDisruptionBudget covers exactly the worker pods and lets at least one go.
    let pdb = kind(&docs, "PodDisruptionBudget");
    let selector = pdb["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("PDB selector");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &deployment["spec"]["selector"]["matchLabels"], &pdb["spec"]["selector"]["matchLabels"],
        "the PDB selects the Deployment's pods"
    );
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "pod template label {k:?}");
    }
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    let may_go = match (
        pdb["spec"]["maxUnavailable"].as_u64(),
        pdb["spec"]["minAvailable"].as_u64(),
    ) {
        (Some(n), None) => n,
        (None, Some(min)) => replicas.saturating_sub(min),
        other => panic!("the PDB needs exactly one of maxUnavailable, minAvailable: {other:?}"),
    };
    assert!(
        may_go >= 1,
        "a PDB that allows no eviction blocks every node drain"
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration documentation

#[test]
fn every_setting_the_code_reads_is_documented_and_every_documented_one_is_read() {
    let in_source = settings_in_source();
    let example: BTreeSet<String> = example_env().into_iter().map(|v| v.name).collect();
    let table: BTreeSet<String> = documented_config_table().into_keys().collect();
    println!("settings read by src/: {in_source:?}");

    let undocumented: Vec<_> = in_source.difference(&example).collect();
    assert!(
        undocumented.is_empty(),
        "read in src/ but missing from config.example.env: {undocumented:?} \
         (handler metadata goes in HANDLER_METADATA in tests/ops.rs instead)"
    );
    let untabled: Vec<_> = in_source.difference(&table).collect();
    assert!(
        untabled.is_empty(),
        "read in src/ but missing from the table in docs/configuration.md: {untabled:?}"
    );
    let source = source_text();
    let unread: Vec<_> = example
        .union(&table)
        .filter(|n| !source.contains(&format!("\"{n}\"")))
        .collect();
    assert!(
        unread.is_empty(),
        "documented but never read (no \"NAME\" literal in src/): {unread:?}"
    );
}

#[test]
fn config_example_states_default_range_and_reason_for_each_variable() {
    let vars = example_env();
    let table = documented_config_table();
    let mut seen = BTreeSet::new();
    for var in &vars {
        assert!(seen.insert(&var.name), "{} appears twice", var.name);
        for needle in ["Allowed:", "Change it:"] {
            assert!(
                var.doc.contains(needle),
                "{}: its comment lacks {needle:?}",
                var.name
            );
        }
        assert!(
            var.doc.contains("Default:") || var.doc.contains("Required"),
            "{}: its comment states no default",
            var.name
        );
        // Only the required setting is active; defaults stay commented out so copying the file
        // pins nothing.
        assert_eq!(
            var.active,
            UNPREFIXED_SETTINGS.contains(&var.name.as_str()),
            "{}: defaults are commented out (#NAME=default), only DATABASE_URL is set",
            var.name
        );
        if !var.active && !var.default.is_empty() {
            let row = &table[&var.name];
            assert!(
                row[0].contains(&format!("`{}`", var.default)),
                "docs/configuration.md default of {} is {:?}, config.example.env says {:?}",
                var.name,
                row[0],
                var.default
            );
        }
    }
}

#[test]
fn config_example_defaults_are_the_parsers_defaults() {
    let vars = example_env();
    let baseline: HashMap<String, String> = vars
        .iter()
        .filter(|v| v.active)
        .map(|v| (v.name.clone(), v.default.clone()))
        .collect();
    let everything: HashMap<String, String> = vars
        .iter()
        .map(|v| (v.name.clone(), v.default.clone()))
        .collect();
    let defaults = Config::from_vars(baseline).expect("config.example.env as shipped");
    let uncommented = Config::from_vars(everything).expect("config.example.env, all uncommented");
    assert_eq!(
        format!("{uncommented:#?}"),
        format!("{defaults:#?}"),
        "uncommenting every default of config.example.env must change nothing"
    );
}
