//! The Grafana board and the Prometheus alert rules under deploy/: the rules pass
//! `promtool check rules` (Debian's prometheus, installed by scripts/ops-tools.sh when missing),
//! the board is valid JSON, and every series either of them queries is one a running daemon's
//! /metrics actually exports.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

/// Every `forkq_*` series name in `expr`.
fn series(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("forkq_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn board_exprs() -> Vec<String> {
    let board: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana-dashboard.json")).unwrap(),
    )
    .expect("the Grafana board is valid JSON");
    let panels = board["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "the board has its panels");
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_string()
        })
        .collect()
}

fn alert_exprs() -> Vec<(String, String)> {
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus-alerts.yaml")).unwrap(),
    )
    .unwrap();
    rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_cover_the_failures_that_matter() {
    if Command::new("promtool").arg("--version").output().is_err() {
        let _ = Command::new("bash")
            .args([&repo("scripts/ops-tools.sh"), "promtool"])
            .status();
    }
    let out = Command::new("promtool")
        .args(["check", "rules", &repo("deploy/prometheus-alerts.yaml")])
        .output()
        .expect(
            "promtool is needed: run scripts/ops-tools.sh promtool (apt-get install prometheus)",
        );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    let names: BTreeSet<String> = alert_exprs().into_iter().map(|(n, _)| n).collect();
    for needed in [
        "ForkqCrashLooping",
        "ForkqStaleChild",
        "ForkqQueueTooOld",
        "ForkqDeadLetterGrowing",
        "ForkqQueueNotServed",
    ] {
        assert!(names.contains(needed), "no {needed} alert in {names:?}");
    }
}

#[test]
fn every_series_the_board_and_the_alerts_query_is_exported() {
    let schema = TestSchema::new("monitoring");
    schema.enqueue("default", "fail", json!({}));
    schema.enqueue("idle", "noop", json!({}));
    let daemon = Daemon::start(&schema, &[]);
    let mut exported = BTreeSet::new();
    assert!(wait_until(Duration::from_secs(20), || {
        let (_, text) = daemon.get("/metrics").unwrap_or_default();
        exported = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();
        exported.contains("forkq_queue_jobs")
    }));
    let mut queried = BTreeSet::new();
    for expr in board_exprs() {
        queried.extend(series(&expr));
    }
    for (_, expr) in alert_exprs() {
        queried.extend(series(&expr));
    }
    println!("queried: {queried:?}");
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported by /metrics: {missing:?} (exported: {exported:?})"
    );
    assert!(
        queried.len() >= 12,
        "the board and alerts query the fleet's series: {queried:?}"
    );
}
