//! forkq behind a real PgBouncer 1.18 in transaction mode (`FORKQ_POOLER=transaction`): a fleet
//! drains, batches complete, a killed child's job runs again, long jobs keep their lease, the
//! maintenance pass and every consumer statement work, the CLI works, and a pooler that drops
//! connections (server backends killed, its own `KILL`) loses nothing.
//!
//! Each test starts its own PgBouncer with fewer server connections than forkq has clients, so
//! transactions of different clients really share server connections, and first leaves named
//! prepared statements `s0`..`s99` behind on every one of them (as any session-bound client
//! would): a single named statement sent by forkq behind the pooler then fails the test.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::pgbouncer::PgBouncer;
use common::*;
use forkq::queue::consumer::{Ack, Consumer, Settlement};
use forkq::queue::{admin, maintenance, sql};
use serde_json::{json, Value};

/// Server connections per PgBouncer: fewer than the clients of every test here.
const POOL: u32 = 2;

/// Starts PgBouncer and leaves `s0`..`s99` prepared on each of its server connections.
fn pgbouncer() -> PgBouncer {
    let pgb = PgBouncer::start(POOL);
    // One open transaction per server connection pins each client to a different one.
    let mut clients: Vec<postgres::Client> = (0..POOL)
        .map(|_| postgres::Client::connect(&pgb.url(), postgres::NoTls).unwrap())
        .collect();
    let prepare: String = (0..100)
        .map(|i| format!("PREPARE s{i} AS SELECT {i};"))
        .collect();
    for c in &mut clients {
        c.batch_execute("BEGIN").unwrap();
        c.batch_execute(&prepare).unwrap();
    }
    for c in &mut clients {
        c.batch_execute("COMMIT").unwrap();
    }
    pgb
}

/// The environment of a forkq process going through `pgb`.
fn pooled(pgb: &PgBouncer) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", pgb.url()),
        ("FORKQ_POOLER", "transaction".into()),
    ]
}

/// `extra` as the `&str` pairs the daemon helpers take.
fn pairs<'a>(extra: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    extra.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Runs the forkq CLI on `schema` with `env`, `stdin` as its input.
fn forkq(schema: &TestSchema, env: &[(&str, String)], args: &[&str], stdin: &str) -> Output {
    run_cli(schema, env, args, stdin)
}

/// Enqueues a builtin `sleep` job of `ms` through the CLI; its id.
fn enqueue_sleep(schema: &TestSchema, env: &[(&str, String)], ms: u64) -> i64 {
    let payload = format!("{{\"ms\": {ms}}}");
    ok(forkq(
        schema,
        env,
        &["enqueue", "--task", "sleep", "--payload", &payload],
        "",
    ))
    .parse()
    .unwrap()
}

/// stdout of a command that must have succeeded.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `sql` (`{s}` for the schema) on a direct connection.
fn exec(schema: &TestSchema, sql: &str) {
    connect()
        .batch_execute(&sql.replace("{s}", &format!("\"{}\"", schema.name)))
        .unwrap();
}

/// Restarts of every slot, from /livez.
fn restarts(daemon: &Daemon) -> u64 {
    daemon
        .livez()
        .map(|(_, body)| {
            body["slots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["restarts"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(u64::MAX)
}

/// The archived job `id` once it is archived (waits up to `timeout`).
fn archived(schema: &TestSchema, id: i64, timeout: Duration) -> Value {
    let mut job = None;
    wait_until(timeout, || {
        job = schema.job(id).filter(|j| j["finished_at"].is_string());
        job.is_some()
    });
    job.unwrap_or_else(|| panic!("job {id} did not finish: {:?}", schema.job(id)))
}

#[test]
fn without_the_setting_workers_fail_and_say_to_set_it() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("plnoset");
    let env = [
        ("DATABASE_URL", pgb.url()),
        ("FORKQ_HOST_RELEASE", "0".into()),
    ];
    let daemon = Daemon::spawn(&schema, &pairs(&env));
    assert!(
        daemon.wait_for_log("set FORKQ_POOLER=transaction", Duration::from_secs(20)),
        "no worker named the fix; log:\n{}",
        daemon.log_text()
    );
}

#[test]
fn a_fleet_drains_through_pgbouncer_and_the_probe_answers() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("pldrain");
    let env = pooled(&pgb);
    let n = 3_000;
    let lines = "{\"task\":\"noop\"}\n".repeat(n);
    assert_eq!(
        ok(forkq(&schema, &env, &["enqueue", "--jsonl", "-"], &lines)),
        n.to_string()
    );
    let mut extra = pairs(&env);
    extra.push(("FORKQ_CONCURRENCY", "4"));
    let daemon = Daemon::start(&schema, &extra);
    assert!(
        wait_until(Duration::from_secs(60), || schema.archived("completed")
            == n as i64),
        "drained {} of {n}",
        schema.archived("completed")
    );
    assert_eq!(schema.live("running") + schema.live("available"), 0);
    assert_eq!(restarts(&daemon), 0, "a child died:\n{}", daemon.log_text());
    let (code, _) = daemon.get("/readyz").unwrap();
    assert_eq!(code, 200);
    let (_, metrics) = daemon.get("/metrics").unwrap();
    // Queue gauges come from the probe's own (pooled) connection; a failure would say so.
    assert!(
        metrics.contains("# TYPE forkq_queue_jobs gauge") && !metrics.contains("unavailable"),
        "{metrics}"
    );
    // The probe says what the role lacks (this test role has no statement_timeout of its own).
    assert!(
        daemon.wait_for_log("SET statement_timeout", Duration::from_secs(10)),
        "{}",
        daemon.log_text()
    );
    let hosts = ok(forkq(&schema, &env, &["hosts", "--json"], ""));
    let host: Value = serde_json::from_str(hosts.lines().next().unwrap()).unwrap();
    assert_eq!(host["status"], "running", "{hosts}");
    let log = daemon.log_text();
    assert!(!log.contains("database error"), "{log}");
}

#[test]
fn a_batch_completes_through_pgbouncer() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("plbatch");
    let env = pooled(&pgb);
    let lines = "{\"task\":\"noop\"}\n".repeat(50);
    let id = ok(forkq(
        &schema,
        &env,
        &[
            "batch",
            "create",
            "--queue",
            "pb",
            "--on-complete",
            "noop",
            "--jsonl",
            "-",
        ],
        &lines,
    ));
    let mut extra = pairs(&env);
    extra.push(("FORKQ_QUEUES", "pb"));
    let _daemon = Daemon::start(&schema, &extra);
    let status = || -> Value {
        serde_json::from_str(&ok(forkq(
            &schema,
            &env,
            &["batch", "status", &id, "--json"],
            "",
        )))
        .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(30), || status()["state"] == "completed"),
        "{}",
        status()
    );
    assert_eq!(status()["succeeded"], 50);
    let completion = schema.count(&format!(
        "SELECT completion_job_id FROM {{s}}.batches WHERE id = {id}"
    ));
    archived(&schema, completion, Duration::from_secs(30));
}

#[test]
fn a_killed_childs_job_runs_again_through_pgbouncer() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("plkill");
    let env = pooled(&pgb);
    let mut extra = pairs(&env);
    extra.push(("FORKQ_HEALTHY_UPTIME_SECONDS", "1"));
    let daemon = Daemon::start(&schema, &extra);
    let id = enqueue_sleep(&schema, &env, 1500);
    let mut victim = 0;
    assert!(wait_until(Duration::from_secs(20), || {
        victim = daemon.livez().map_or(0, |(_, body)| {
            body["slots"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["job_id"].as_i64() == Some(id))
                .map_or(0, |s| s["pid"].as_i64().unwrap_or(0) as i32)
        });
        victim > 0
    }));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let job = archived(&schema, id, Duration::from_secs(30));
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["attempt"], 2, "run again after the kill: {job}");
    assert!(
        daemon.log_text().contains("released"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_long_job_keeps_its_lease_through_pgbouncer() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("pllease");
    let env = pooled(&pgb);
    // Enqueued before the fleet starts, so a child claims it in its first round.
    let id = enqueue_sleep(&schema, &env, 7000);
    let mut extra = pairs(&env);
    // Renewed every 1.3 s; without renewals the maintenance pass would take it back after 4.
    extra.push(("FORKQ_LEASE_SECONDS", "4"));
    let daemon = Daemon::start(&schema, &extra);
    let job = archived(&schema, id, Duration::from_secs(40));
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["attempt"], 1, "never taken back: {job}");
    let log = daemon.log_text();
    assert!(
        !log.contains("renewal failed") && !log.contains("refused"),
        "{log}"
    );
}

#[test]
fn every_consumer_statement_and_the_maintenance_pass_work_through_pgbouncer() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("plstmt");
    let env = pooled(&pgb);
    let extra = pairs(&env);
    let config = schema.config(&extra);
    let pooled_client = || postgres::Client::connect(&pgb.url(), postgres::NoTls).unwrap();
    for task in ["a", "b", "c", "d"] {
        schema.enqueue("default", task, json!({}));
    }
    exec(
        &schema,
        "UPDATE {s}.jobs SET max_attempts = 1 WHERE task = 'b'",
    );
    let mut c = Consumer::connect(&config, "pool/w1/").unwrap();
    let claimed = c.settle_and_claim(&[], 4).unwrap().claimed;
    assert_eq!(claimed.len(), 4);
    let by_task = |t: &str| claimed.iter().find(|c| &*c.job.task == t).unwrap().clone();
    let held: Vec<(i64, i64)> = claimed.iter().map(|c| (c.job.id, c.lease_token)).collect();
    assert_eq!(c.renew(&held, Some(by_task("a").job.id)).unwrap().len(), 4);
    assert!(c.mark_started(&by_task("a")).unwrap());
    // A cancel of a claimed job that has not started ends it at the worker's next check.
    let d = by_task("d");
    admin::cancel(&mut pooled_client(), &schema.name, d.job.id, true).unwrap();
    assert_eq!(c.drop_cancelled(&[&d]).unwrap(), vec![d.job.id]);
    // The lean round (a) and the other settlements (b failed, c retried) in one call.
    let acks = vec![
        Ack::new(&by_task("a"), Settlement::Completed(json!({"ok": 1}))),
        Ack::new(&by_task("b"), Settlement::Failed("boom".into())),
        Ack::new(
            &by_task("c"),
            Settlement::Retry {
                error: None,
                delay: Duration::ZERO,
            },
        ),
    ];
    let round = c.settle_and_claim(&acks, 1).unwrap();
    assert!(round.refused.is_empty());
    assert_eq!(schema.archived("completed"), 1);
    assert_eq!(schema.archived("failed"), 1);
    assert_eq!(schema.archived("cancelled"), 1);
    // c came back and was claimed again by that same round or the next (which promotes it).
    let again = round.claimed.len() + c.settle_and_claim(&[], 1).unwrap().claimed.len();
    assert_eq!(again, 1);
    // A worker that died holding c: its jobs are given back, its running job charged.
    assert_eq!(
        c.release("pool/w1/", Some(by_task("c").job.id), Some("killed"))
            .unwrap(),
        1
    );

    // The maintenance pass through the pooler brings back an expired lease.
    let e = schema.enqueue("default", "e", json!({}));
    let mut w2 = Consumer::connect(&config, "pool/w2/").unwrap();
    w2.settle_and_claim(&[], 10).unwrap();
    exec(
        &schema,
        &format!("UPDATE {{s}}.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = {e}"),
    );
    let mut maintainer = pooled_client();
    let report = maintenance::run_pass(
        &mut maintainer,
        &schema.name,
        Duration::from_secs(3600),
        Duration::ZERO,
        &mut || {},
    )
    .unwrap()
    .expect("nobody else holds the maintenance lock");
    assert_eq!(report.rescued, 1, "{report}");
    assert_eq!(schema.job(e).unwrap()["state"], "available");

    // A claim queued for a turn of the claim gate (more hosts than turns) waits and claims in a
    // transaction of its own, which the pooler keeps on one server connection: with the turn
    // held elsewhere it gives up and rolls back, leaving the session clean; then it claims.
    w2.set_claim_turns(1);
    let key = sql::claim_gate_key(&schema.name);
    let mut direct = connect();
    let mut holder = direct.transaction().unwrap();
    holder
        .execute("SELECT pg_advisory_xact_lock($1, 0)", &[&key])
        .unwrap();
    let gave_up = w2.claim_in_turn(10).unwrap();
    assert_eq!((gave_up.no_turn, gave_up.claimed.len()), (true, 0));
    holder.commit().unwrap();
    let queued = w2.claim_in_turn(10).unwrap();
    assert_eq!((queued.no_turn, queued.claimed.len()), (false, 1));
    assert_eq!(schema.job(e).unwrap()["state"], "running");
}

#[test]
fn cli_commands_and_migrate_work_through_pgbouncer() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("plcli");
    let env = pooled(&pgb);
    let id = ok(forkq(
        &schema,
        &env,
        &["enqueue", "--task", "fail", "--max-attempts", "1"],
        "",
    ));
    let two = ok(forkq(
        &schema,
        &env,
        &["enqueue", "--jsonl", "-"],
        "{\"task\":\"noop\"}\n{\"task\":\"noop\",\"queue\":\"other\"}\n",
    ));
    assert_eq!(two, "2");
    let status: Value =
        serde_json::from_str(&ok(forkq(&schema, &env, &["status", "--json"], ""))).unwrap();
    assert_eq!(status["queues"]["default"]["available"], 2, "{status}");
    assert_eq!(status["queues"]["other"]["available"], 1, "{status}");
    let table = ok(forkq(&schema, &env, &["status"], ""));
    assert!(table.contains("other"), "{table}");
    let job: Value =
        serde_json::from_str(&ok(forkq(&schema, &env, &["job", &id, "--json"], ""))).unwrap();
    assert_eq!(job["task"], "fail");
    ok(forkq(&schema, &env, &["cancel", &id], ""));
    assert_eq!(
        schema.job(id.parse().unwrap()).unwrap()["state"],
        "cancelled"
    );
    ok(forkq(&schema, &env, &["retry", &id], ""));
    assert_eq!(
        schema.job(id.parse().unwrap()).unwrap()["state"],
        "available"
    );
    let page: Value =
        serde_json::from_str(&ok(forkq(&schema, &env, &["jobs", "--json"], ""))).unwrap();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 3, "{page}");
    // A migration is one transaction: it works through the pooler too.
    let fresh = FreshSchema::new("plmig");
    let mut fresh_env = env.clone();
    fresh_env.push(("FORKQ_SCHEMA", fresh.0.clone()));
    ok(forkq(&schema, &fresh_env, &["migrate"], ""));
    assert!(ok(forkq(&schema, &fresh_env, &["status"], "")).contains("queue"));
}

#[test]
fn a_pooler_that_drops_connections_mid_drain_loses_nothing() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("pldrop");
    let env = pooled(&pgb);
    let n = 2_000;
    let lines = "{\"task\":\"sleep\",\"payload\":{\"ms\":2}}\n".repeat(n);
    ok(forkq(&schema, &env, &["enqueue", "--jsonl", "-"], &lines));
    let mut extra = pairs(&env);
    extra.push(("FORKQ_CONCURRENCY", "4"));
    let daemon = Daemon::start(&schema, &extra);
    let done = || schema.archived("completed");
    assert!(wait_until(Duration::from_secs(30), || done() >= 200));
    // The server backends die under the pooler, in the middle of whatever they were running.
    let mut direct = connect();
    for pid in pgb.server_pids() {
        direct
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
    }
    let after_terminate = done();
    assert!(wait_until(Duration::from_secs(30), || done() >= after_terminate + 200));
    // The pooler drops every client and server connection of the database at once.
    pgb.admin(&format!("KILL {}", pgb.database));
    std::thread::sleep(Duration::from_millis(500));
    pgb.admin(&format!("RESUME {}", pgb.database));
    assert!(
        wait_until(Duration::from_secs(90), || done() == n as i64),
        "completed {} of {n}; log:\n{}",
        done(),
        daemon.log_text()
    );
    assert_eq!(schema.live("running") + schema.live("available"), 0);
    assert_eq!(schema.archived("failed"), 0);
    let log = daemon.log_text();
    assert!(log.contains("reconnected"), "{log}");
}

#[test]
fn a_direct_listener_wakes_the_pooled_children() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("pllisten");
    let mut env = pooled(&pgb);
    env.push(("FORKQ_LISTEN_DATABASE_URL", database_url()));
    let mut extra = pairs(&env);
    // Polling alone would take a minute to see the job.
    extra.push(("FORKQ_POLL_INTERVAL_MS", "60000"));
    let _daemon = Daemon::start(&schema, &extra);
    std::thread::sleep(Duration::from_millis(500));
    let id: i64 = ok(forkq(&schema, &env, &["enqueue", "--task", "noop"], ""))
        .parse()
        .unwrap();
    archived(&schema, id, Duration::from_secs(20));
}

#[test]
fn session_features_behind_a_transaction_pooler_are_refused_with_exit_78() {
    let schema = TestSchema::new("plrefuse");
    for (name, value) in [("FORKQ_LISTEN", "1"), ("FORKQ_HOST_RELEASE", "1")] {
        let out = Command::new(forkq_bin())
            .arg("run")
            .env_clear()
            .envs(schema.env())
            .env("FORKQ_POOLER", "transaction")
            .env(name, value)
            .env("FORKQ_HEALTH_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(name) && err.contains("FORKQ_POOLER=transaction"),
            "{err}"
        );
    }
}

#[test]
fn the_schedules_ticker_enqueues_through_pgbouncer() {
    let pgb = pgbouncer();
    let schema = TestSchema::new("pltick");
    let env = pooled(&pgb);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/schedules.toml");
    let mut extra = pairs(&env);
    extra.push(("FORKQ_SCHEDULES", file));
    extra.push(("FORKQ_QUEUES", "ticks"));
    let daemon = Daemon::start(&schema, &extra);
    let ticks = || {
        schema.count(
            "SELECT (SELECT count(*) FROM {s}.jobs WHERE queue = 'ticks')
                  + (SELECT count(*) FROM {s}.jobs_archive WHERE queue = 'ticks')",
        )
    };
    assert!(
        wait_until(Duration::from_secs(20), || ticks() >= 3),
        "{} ticks; log:\n{}",
        ticks(),
        daemon.log_text()
    );
    assert!(schema.archived("completed") >= 1, "the ticks ran");
    let log = daemon.log_text();
    assert!(!log.contains("database unavailable"), "{log}");
}
