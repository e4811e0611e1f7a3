//! The fleet: hosts in the database, the early return of a dead host's jobs (and never of a live
//! one's), the job browser over a big archive, and `forkq jobs`/`retry`/`cancel`/`hosts`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use forkq::queue::browse::{self, Cursor, Filter};
use forkq::queue::{migrations, QueueError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The hosts table as `forkq hosts --json` prints it.
fn hosts_json(schema: &TestSchema) -> Vec<Value> {
    let (code, out, err) = forkq_cli(schema, &[], &["hosts", "--json"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The boot id a daemon recorded (waits for its first write).
fn boot_of(schema: &TestSchema, daemon: &Daemon) -> String {
    let mut boot = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            boot = hosts_json(schema)
                .into_iter()
                .find(|h| h["pid"] == daemon.pid())
                .map(|h| h["boot"].as_str().unwrap().to_string());
            boot.is_some()
        }),
        "daemon {} never recorded itself; log:\n{}",
        daemon.pid(),
        daemon.log_text()
    );
    boot.unwrap()
}

/// (state, lease_owner, lease_token) of a live job.
fn lease(schema: &TestSchema, id: i64) -> Option<(String, Option<String>, Option<i64>)> {
    schema
        .client()
        .query_opt(
            &format!(
                "SELECT state, lease_owner, lease_token FROM \"{}\".jobs WHERE id = $1",
                schema.name
            ),
            &[&id],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// The probe of a daemon: the supervisor's child that is not in a slot.
fn probe_pid(daemon: &Daemon) -> i32 {
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.pid())).unwrap();
    let slots = daemon.child_pids();
    children
        .split_whitespace()
        .map(|p| p.parse::<i32>().unwrap())
        .find(|p| !slots.contains(p))
        .expect("a probe process")
}

/// A daemon that records itself every second; long leases, so only an early return can bring a
/// job back within the test.
fn fleet_daemon(schema: &TestSchema, queues: &str, extra: &[(&str, &str)]) -> Daemon {
    let mut env = extra.to_vec();
    for default in [
        ("FORKQ_QUEUES", queues),
        ("FORKQ_CONCURRENCY", "1"),
        ("FORKQ_HOST_INTERVAL_SECONDS", "1"),
        ("FORKQ_LEASE_SECONDS", "120"),
        ("FORKQ_HEALTH_STALE_SECONDS", "60"),
    ] {
        if !env.iter().any(|(k, _)| *k == default.0) {
            env.push(default);
        }
    }
    Daemon::start(schema, &env)
}

fn running_job(schema: &TestSchema, ms: u64) -> (i64, String) {
    let id = schema.enqueue("default", "sleep", json!({ "ms": ms }));
    let mut owner = None;
    assert!(wait_until(Duration::from_secs(10), || {
        owner =
            lease(schema, id).and_then(|(state, owner, _)| (state == "running").then_some(owner?));
        owner.is_some()
    }));
    (id, owner.unwrap())
}

#[test]
fn a_dead_hosts_jobs_come_back_long_before_their_lease() {
    let schema = TestSchema::new("fleet_dead");
    // The observer connects first: the server has been up, for its session, since before the
    // dying host's last write. It serves another queue, so only the early return can move the job.
    let observer = fleet_daemon(&schema, "elsewhere", &[]);
    // A second observer whose server drops vanished clients after 5 s, less than a lease: it
    // must refuse to return anyone's jobs early.
    let options = "-c tcp_keepalives_idle=2 -c tcp_keepalives_count=1 -c tcp_keepalives_interval=3";
    let url = database_url();
    let short_keepalive = if url.contains("://") {
        let join = if url.contains('?') { '&' } else { '?' };
        format!(
            "{url}{join}options={}",
            options.replace(' ', "%20").replace('=', "%3D")
        )
    } else {
        format!("{url} options='{options}'")
    };
    let cautious = fleet_daemon(&schema, "elsewhere", &[("DATABASE_URL", &short_keepalive)]);
    let dying = fleet_daemon(&schema, "default", &[]);
    let boot = boot_of(&schema, &dying);
    let (id, owner) = running_job(&schema, 600_000);
    assert!(owner.contains(&boot), "{owner} is not of boot {boot}");

    // The whole host dies at once: the kernel closes every socket, so PostgreSQL ends its
    // sessions (and their locks) at once; nothing of it releases anything.
    let killed = Instant::now();
    kill(Pid::from_raw(-dying.pid()), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || lease(&schema, id)
            .is_some_and(|(state, _, _)| state == "available")),
        "the job did not come back; observer log:\n{}",
        observer.log_text()
    );
    let took = killed.elapsed();
    println!("a dead host's job came back after {took:.1?} (lease 120 s, gone after 3 s)");
    assert!(took < Duration::from_secs(20));
    // The observer writes its line once the statement that moved the job has returned.
    assert!(
        observer.wait_for_log("is gone: no session of it is left", Duration::from_secs(5)),
        "observer log:\n{}",
        observer.log_text()
    );
    let row = hosts_json(&schema)
        .into_iter()
        .find(|h| h["boot"] == boot.as_str())
        .unwrap();
    assert_eq!(row["status"], "gone");
    assert!(row["released_at"].is_string(), "{row}");
    let cautious_log = cautious.log_text();
    assert!(
        cautious_log.contains("not bringing back gone hosts' jobs early")
            && cautious_log.contains("less than FORKQ_LEASE_SECONDS=120")
            && !cautious_log.contains("is gone"),
        "{cautious_log}"
    );
    drop(dying);
}

#[test]
fn a_slow_or_frozen_host_keeps_its_leases() {
    let schema = TestSchema::new("fleet_slow");
    let observer = fleet_daemon(&schema, "elsewhere", &[]);
    let slow = fleet_daemon(&schema, "default", &[]);
    let boot = boot_of(&schema, &slow);
    let (id, _) = running_job(&schema, 14_000);
    let held = lease(&schema, id).unwrap();
    let still_held = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            assert_eq!(
                lease(&schema, id).unwrap(),
                held,
                "{what}: the job lost its lease; observer log:\n{}",
                observer.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // A slow writer: its probe stops writing (frozen), so its row goes stale and it shows as
    // gone, but its sessions are open: nobody may touch its jobs.
    let probe = Pid::from_raw(probe_pid(&slow));
    kill(probe, Signal::SIGSTOP).unwrap();
    still_held("probe frozen");
    let row = hosts_json(&schema)
        .into_iter()
        .find(|h| h["boot"] == boot.as_str())
        .unwrap();
    assert_eq!(row["status"], "gone", "{row}");
    kill(probe, Signal::SIGCONT).unwrap();

    // A frozen host (as a partition looks to PostgreSQL before its dead-client timeout): every
    // process stopped, every session still open.
    kill(Pid::from_raw(-slow.pid()), Signal::SIGSTOP).unwrap();
    still_held("whole host frozen");
    kill(Pid::from_raw(-slow.pid()), Signal::SIGCONT).unwrap();

    assert!(
        wait_until(Duration::from_secs(30), || schema
            .job(id)
            .is_some_and(|j| j["state"] == "completed")),
        "log:\n{}",
        slow.log_text()
    );
    assert_eq!(schema.job(id).unwrap()["attempt"], 1, "it ran once");
    assert!(!observer.log_text().contains("is gone"));
    assert!(hosts_json(&schema)
        .iter()
        .all(|h| h["released_at"].is_null()));
}

#[test]
fn hosts_show_what_each_daemon_runs_and_say_when_it_stopped() {
    let schema = TestSchema::new("fleet_hosts");
    let mut daemon = fleet_daemon(&schema, "default,mail", &[("FORKQ_CONCURRENCY", "2")]);
    let boot = boot_of(&schema, &daemon);
    let row = hosts_json(&schema).into_iter().next().unwrap();
    assert_eq!(row["status"], "running");
    assert_eq!(row["queues"], json!(["default", "mail"]));
    assert_eq!(
        (row["concurrency"].as_i64(), row["alive"].as_i64()),
        (Some(2), Some(2))
    );
    assert_eq!(row["slots"].as_array().unwrap().len(), 2);
    assert_eq!(row["version"], env!("CARGO_PKG_VERSION"));
    let (_, table, _) = forkq_cli(&schema, &[], &["hosts"]);
    assert!(
        table.contains(&boot) && table.contains("default,mail"),
        "{table}"
    );

    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        wait_until(Duration::from_secs(10), || hosts_json(&schema)[0]["status"]
            == "stopped"),
        "hosts: {:?}; log:\n{}",
        hosts_json(&schema),
        daemon.log_text()
    );
}

// ---------------------------------------------------------------------------------------------
// The job browser

/// Fills the archive with `n` jobs (ids 1..=n): 95 % completed, 4 % failed, 1 % cancelled; queue
/// `rare` gets 0.3 % (failed, cancelled, completed), `mail` 10 %; a few live jobs above them.
fn big_archive(schema: &TestSchema, n: i64) {
    let mut client = schema.client();
    let s = &schema.name;
    client
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".jobs_archive (id, queue, task, payload, priority, state, attempt,
                                               max_attempts, created_at, finished_at, last_error)
             SELECT g,
                    CASE WHEN g % 1000 IN (3, 504, 777) THEN 'rare' WHEN g % 10 = 0 THEN 'mail' ELSE 'default' END,
                    CASE WHEN g % 3 = 0 THEN 'resize' ELSE 'send' END,
                    jsonb_build_object('n', g), 0,
                    CASE WHEN g % 100 < 4 THEN 'failed' WHEN g % 100 = 4 THEN 'cancelled'
                         ELSE 'completed' END,
                    1, 1, now(), now(),
                    CASE WHEN g % 100 < 5 THEN 'boom' END
             FROM generate_series(1, {n}) g;
             SELECT setval(pg_get_serial_sequence('\"{s}\".jobs', 'id'), {n});"
        ))
        .unwrap();
    // Autovacuum is off on the shared server: statistics and the visibility map by hand.
    client
        .batch_execute(&format!("VACUUM ANALYZE \"{s}\".jobs_archive"))
        .unwrap();
    for queue in ["rare", "default", "rare"] {
        schema.enqueue(queue, "send", json!({}));
    }
}

/// The largest buffer count (hit + read) of any node of each plan auto_explain reported.
fn max_buffers(notices: &[String]) -> Vec<i64> {
    fn walk(plan: &Value, best: &mut i64) {
        let n = plan["Shared Hit Blocks"].as_i64().unwrap_or(0)
            + plan["Shared Read Blocks"].as_i64().unwrap_or(0);
        *best = (*best).max(n);
        for child in plan["Plans"].as_array().into_iter().flatten() {
            walk(child, best);
        }
    }
    notices
        .iter()
        .filter_map(|n| n.split_once("plan:").map(|(_, p)| p))
        .map(|p| {
            let v: Value = serde_json::from_str(p.trim()).unwrap();
            let mut best = 0;
            walk(&v["Plan"], &mut best);
            best
        })
        .collect()
}

#[test]
fn browse_pages_cost_the_same_on_a_big_archive() {
    // FORKQ_BROWSE_ROWS=10000000 measures the real thing (docs/fleet.md); the suite runs 400k.
    let n: i64 = std::env::var("FORKQ_BROWSE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let schema = TestSchema::new("fleet_browse");
    big_archive(&schema, n);
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&notices);
    let mut config: postgres::Config = database_url().parse().unwrap();
    config.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    let mut client = config.connect(postgres::NoTls).unwrap();
    client
        .batch_execute(
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on;
             SET auto_explain.log_format = json; SET auto_explain.log_level = notice",
        )
        .unwrap();
    let cases = [
        (None, None, None),
        (None, Some("failed"), None),
        (Some("rare"), Some("failed"), None),
        (Some("rare"), None, None),
        (None, Some("completed"), Some("resize")),
        (Some("rare"), Some("cancelled"), Some("send")),
        (Some("nosuchqueue"), None, None),
        (None, Some("available"), None),
    ];
    for (queue, state, task) in cases {
        let filter = Filter::parse(queue, state, task).unwrap();
        notices.lock().unwrap().clear();
        let started = Instant::now();
        let page = browse::page(
            &mut client,
            &schema.name,
            &filter,
            Cursor::new(None, 50).unwrap(),
        )
        .unwrap();
        let took = started.elapsed();
        let buffers = max_buffers(&notices.lock().unwrap());
        println!(
            "{n} archived, filter {queue:?}/{state:?}/{task:?}: {} jobs, next {:?}, partial {}, \
             {took:.1?}, buffers per walk {buffers:?}",
            page.jobs.len(),
            page.next,
            page.partial
        );
        assert!(!buffers.is_empty(), "auto_explain reported nothing");
        assert!(
            buffers.iter().all(|&b| b < browse::SCAN_BUDGET + 300),
            "a page touched {buffers:?} buffers: it is not walking an index within its budget"
        );
    }

    // Following `next` finds exactly the matching jobs, live and archived, newest first.
    let filter = Filter::parse(Some("rare"), None, None).unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = browse::page(
            &mut client,
            &schema.name,
            &filter,
            Cursor::new(after, 50).unwrap(),
        )
        .unwrap();
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<i64> = client
        .query(
            &format!(
                "SELECT id FROM \"{0}\".jobs WHERE queue = 'rare' UNION ALL
                 SELECT id FROM \"{0}\".jobs_archive WHERE queue = 'rare' ORDER BY 1 DESC",
                schema.name
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn jobs_retry_and_cancel_by_filter() {
    let schema = TestSchema::new("fleet_cli");
    let mut client = schema.client();
    let ids: Vec<i64> = (0..3)
        .map(|_| schema.enqueue("q", "fail", json!({})))
        .collect();
    let other = schema.enqueue("other", "fail", json!({}));
    client
        .execute(
            &format!(
                "SELECT \"{0}\".retire(array_agg(id), array_agg(NULL::bigint), array_agg('failed'::text),
                                       array_agg('boom'::text), array_agg(NULL::jsonb), true)
                 FROM \"{0}\".jobs",
                schema.name
            ),
            &[],
        )
        .unwrap();

    let (code, out, _) = forkq_cli(
        &schema,
        &[],
        &["jobs", "--state", "failed", "--queue", "q", "--json"],
    );
    assert_eq!(code, 0);
    let page: Value = serde_json::from_str(&out).unwrap();
    let listed: Vec<i64> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, ids.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(page["jobs"][0]["error"], "boom");
    let (_, out, _) = forkq_cli(&schema, &[], &["jobs", "--limit", "2"]);
    assert!(
        out.contains(&format!("(more: --after {})", ids[2])),
        "{out}"
    );

    for (args, needle) in [
        (vec!["jobs", "--state", "done"], "unknown state \"done\""),
        (vec!["jobs", "--queue", "a,b"], "is not a queue name"),
        (vec!["jobs", "--limit", "0"], "limit 0 is out of range"),
        (
            vec!["retry", "--state", "running"],
            "only failed or cancelled jobs can be retried",
        ),
        (vec!["cancel", "--state", "failed"], "cannot be cancelled"),
    ] {
        let (code, _, err) = forkq_cli(&schema, &[], &args);
        assert_eq!(code, 65, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }

    let (code, _, err) = forkq_cli(&schema, &[], &["retry", "--queue", "q"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("3 jobs match; nothing was changed: add --yes"),
        "{err}"
    );
    assert_eq!(schema.archived("failed"), 4);
    let (code, out, _) = forkq_cli(
        &schema,
        &[],
        &["retry", "--queue", "q", "--task", "fail", "--yes"],
    );
    assert_eq!((code, out.trim()), (0, "3 job(s) back in their queue"));
    assert_eq!(
        schema.archived("failed"),
        1,
        "job {other} of another queue stays"
    );

    let (code, out, _) = forkq_cli(
        &schema,
        &[],
        &["cancel", "--queue", "q", "--state", "available", "--yes"],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "3 job(s) cancelled (running ones are told to stop)")
    );
    assert_eq!(schema.archived("cancelled"), 3);
}

#[test]
fn every_migration_must_be_applied_whatever_the_gaps() {
    let schema = TestSchema::new("fleet_gaps");
    let mut client = schema.client();
    let s = &schema.name;
    migrations::require_current(&mut client, s).unwrap();
    // A version it lists and the schema lacks is outdated, even below the newest applied: a
    // schema migrated by a binary without migration 2 (issue 14's) has 1 and 3...
    client
        .execute(
            &format!("DELETE FROM \"{s}\".schema_migrations WHERE version = 2"),
            &[],
        )
        .unwrap();
    let err = migrations::require_current(&mut client, s).unwrap_err();
    assert!(
        matches!(err, QueueError::SchemaOutdated { found: 1, .. }),
        "{err}"
    );
    // ...and one without 1 is complete up to nothing.
    client
        .execute(
            &format!("DELETE FROM \"{s}\".schema_migrations WHERE version = 1"),
            &[],
        )
        .unwrap();
    let err = migrations::require_current(&mut client, s).unwrap_err();
    assert!(
        matches!(err, QueueError::SchemaOutdated { found: 0, .. }),
        "{err}"
    );
    client
        .execute(&format!("INSERT INTO \"{s}\".schema_migrations (version, name) VALUES (1, 'x'), (2, 'y'), (99, 'newer')"), &[])
        .unwrap();
    let err = migrations::require_current(&mut client, s).unwrap_err();
    assert!(
        matches!(err, QueueError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}
