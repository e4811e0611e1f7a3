//! Processes say who they are: `ps` titles, and log lines (text or JSON) naming the role, the pid,
//! the slot and the job, read from a real daemon's processes and log.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use forkq::queue::producer::{self, Limits};
use forkq::NewJob;
use serde_json::{json, Value};

/// What `ps` shows for `pid`: /proc/PID/cmdline with its NUL separators and padding read as `ps`
/// reads them.
fn cmdline(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    text.trim_end().to_string()
}

/// The short name `top` shows.
fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// The supervisor's children: the probe and the consumer children.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn enqueue_once(schema: &TestSchema, task: &str, payload: Value) -> i64 {
    let limits = Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    };
    let job = NewJob::new("default", task, payload).with_max_attempts(1);
    producer::enqueue(&mut schema.client(), &schema.name, &limits, &job).unwrap()
}

#[test]
fn ps_shows_each_process_role_and_what_a_child_is_doing() {
    let schema = TestSchema::new("titles");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    let supervisor = daemon.pid();
    let slots = daemon.child_pids();
    assert_eq!(cmdline(supervisor), "forkq: supervisor");
    let probe: Vec<i32> = children_of(supervisor)
        .into_iter()
        .filter(|p| !slots.contains(p))
        .collect();
    assert_eq!(probe.len(), 1, "one probe besides the slots {slots:?}");
    assert_eq!(cmdline(probe[0]), "forkq: probe");
    assert_eq!(comm(probe[0]), "forkq: probe");
    for (slot, &pid) in slots.iter().enumerate() {
        let title = cmdline(pid);
        assert!(
            title == format!("forkq: child {slot}") || title == format!("forkq: child {slot} idle"),
            "slot {slot}: {title:?}"
        );
        assert_eq!(comm(pid), format!("forkq: child {slot}"));
    }

    let job = enqueue_once(&schema, "sleep", json!({"ms": 3000}));
    let running = format!("job {job}");
    let mut titles = Vec::new();
    let shown = wait_until(Duration::from_secs(10), || {
        titles = slots.iter().map(|&p| cmdline(p)).collect();
        titles.iter().any(|t| t.ends_with(&running))
    });
    assert!(shown, "no child shows {running:?}: {titles:?}");
    let busy = titles.iter().position(|t| t.ends_with(&running)).unwrap();
    assert_eq!(titles[busy], format!("forkq: child {busy} job {job}"));

    // `ps` itself, when the machine has it, shows the same.
    match Command::new("ps")
        .args(["-o", "args=", "-p", &slots[busy].to_string()])
        .output()
    {
        Ok(out) => assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("forkq: child {busy} job {job}")
        ),
        Err(e) => println!("ps not run ({e}); /proc/PID/cmdline was checked instead"),
    }

    // Text log lines carry the role and the pid.
    let failed = enqueue_once(&schema, "fail", json!({}));
    let mut log = String::new();
    let logged = wait_until(Duration::from_secs(10), || {
        log = daemon.log_text();
        log.contains(&format!("job {failed} (fail) failed for good"))
    });
    assert!(logged, "{log}");
    assert!(
        log.contains(&format!(" supervisor [{supervisor}] forkq supervisor ")),
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains(&format!("job {failed} (fail) failed for good")))
        .unwrap();
    let speaker = slots
        .iter()
        .enumerate()
        .find(|(slot, pid)| line.contains(&format!(" child {slot} [{pid}] ")))
        .unwrap_or_else(|| panic!("the line names no child of {slots:?}: {line}"));
    println!("{line} (from slot {})", speaker.0);
}

#[test]
fn json_log_lines_name_role_pid_slot_and_job() {
    let schema = TestSchema::new("jsonlog");
    let mut daemon = Daemon::start(
        &schema,
        &[("FORKQ_CONCURRENCY", "2"), ("FORKQ_LOG_FORMAT", "json")],
    );
    let supervisor = daemon.pid();
    let slots = daemon.child_pids();
    let failed = enqueue_once(&schema, "fail", json!({}));
    assert!(
        wait_until(Duration::from_secs(10), || schema.archived("failed") == 1),
        "{}",
        daemon.log_text()
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));

    let log = daemon.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let mut roles = BTreeSet::new();
    for line in &lines {
        for key in ["timestamp", "level", "role", "pid", "message", "target"] {
            assert!(!line[key].is_null(), "{key} missing: {line}");
        }
        assert!(
            line["timestamp"].as_str().unwrap().ends_with('Z'),
            "RFC 3339 in UTC: {line}"
        );
        let role = line["role"].as_str().unwrap();
        let pid = line["pid"].as_i64().unwrap() as i32;
        match role {
            "supervisor" => {
                assert_eq!(pid, supervisor, "{line}");
                assert!(line["slot"].is_null() && line["job"].is_null(), "{line}");
            }
            "child" => {
                let slot = line["slot"].as_u64().expect("a child names its slot") as usize;
                assert_eq!(slots[slot], pid, "{line}");
            }
            other => assert!(["probe", "releaser"].contains(&other), "{line}"),
        }
        roles.insert(role.to_string());
    }
    assert!(
        roles.contains("supervisor") && roles.contains("child"),
        "{roles:?}"
    );
    let failure = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .contains(&format!("job {failed} (fail) failed for good"))
        })
        .expect("the failure is logged");
    assert_eq!(failure["job"], json!(failed), "{failure}");
    assert_eq!(failure["level"], "warn");
    assert!(
        lines.iter().any(|l| l["role"] == "supervisor"
            && l["message"]
                .as_str()
                .unwrap()
                .contains("health endpoint on http://")),
        "{log}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_with_exit_78() {
    let schema = TestSchema::new("badlogformat");
    let out = Command::new(forkq_bin())
        .arg("status")
        .env_clear()
        .envs(schema.env())
        .env("FORKQ_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FORKQ_LOG_FORMAT") && stderr.contains("json"),
        "{stderr}"
    );
}
