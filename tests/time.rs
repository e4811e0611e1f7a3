//! Time: unique windows, debounce (replace) and periodic schedules, against the real PostgreSQL,
//! the real `forkq` binary and real daemons.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use forkq::queue::consumer::{Ack, Consumer, Settlement};
use forkq::queue::producer::{self, Enqueued, Limits};
use forkq::NewJob;
use serde_json::{json, Value};

fn limits() -> Limits {
    Limits {
        max_payload_bytes: 1 << 20,
        default_max_attempts: 25,
    }
}

fn submit(schema: &TestSchema, job: &NewJob) -> Enqueued {
    producer::enqueue_with_outcome(&mut connect(), &schema.name, &limits(), job).expect("enqueue")
}

/// Runs `forkq ARGS` for `schema` with extra environment: (exit code, stdout, stderr).
fn forkq(schema: &TestSchema, extra: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
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

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

// ---------------------------------------------------------------------------------------------
// Unique windows

#[test]
fn unique_window_refuses_the_key_whatever_became_of_the_first_job() {
    let schema = TestSchema::new("window");
    let job = NewJob::new("default", "noop", json!({"n": 1}))
        .with_unique_key("report-7")
        .with_unique_for(Duration::from_secs(3));
    let first = submit(&schema, &job);
    assert!(first.created && !first.replaced, "{first:?}");
    assert_eq!(
        submit(&schema, &job),
        Enqueued {
            id: first.id,
            created: false,
            replaced: false
        },
        "a live job holds the key"
    );

    // The first job completes: the window still refuses the key, and names the job.
    let mut consumer = Consumer::connect(&schema.config(&[]), "test/window/0/").unwrap();
    let claimed = consumer.settle_and_claim(&[], 1).unwrap().claimed;
    assert_eq!(claimed[0].job.id, first.id);
    let ack = Ack {
        id: first.id,
        lease_token: claimed[0].lease_token,
        settlement: Settlement::Completed(json!(null)),
    };
    assert!(consumer
        .settle_and_claim(&[ack], 0)
        .unwrap()
        .refused
        .is_empty());
    assert_eq!(schema.job(first.id).unwrap()["state"], "completed");
    let again = submit(&schema, &job);
    assert_eq!((again.id, again.created), (first.id, false));
    // The SQL API agrees.
    let sql_id: i64 = schema.count(
        "SELECT {s}.enqueue('default', 'noop', unique_key => 'report-7', \
                            unique_for => interval '3 seconds')",
    );
    assert_eq!(sql_id, first.id);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 0);

    // Once the window has passed, the key can be taken again.
    assert!(wait_until(Duration::from_secs(10), || submit(
        &schema, &job
    )
    .created));
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
    let holder = schema.count("SELECT job_id FROM {s}.unique_windows WHERE key = 'report-7'");
    assert_ne!(holder, first.id, "the window names the new job");
}

#[test]
fn racing_producers_get_one_job_per_window() {
    let schema = TestSchema::new("windowrace");
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let name = schema.name.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = connect();
                let job = NewJob::new("default", "noop", json!({}))
                    .with_unique_key("hourly")
                    .with_unique_for(Duration::from_secs(3600));
                barrier.wait();
                (0..20)
                    .map(|_| {
                        producer::enqueue_with_outcome(&mut client, &name, &limits(), &job).unwrap()
                    })
                    .collect::<Vec<Enqueued>>()
            })
        })
        .collect();
    let all: Vec<Enqueued> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let ids: HashSet<i64> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(all.iter().filter(|e| e.created).count(), 1);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
}

// ---------------------------------------------------------------------------------------------
// Debounce (replace)

#[test]
fn replace_updates_the_waiting_job_and_a_running_one_gives_up_its_key() {
    let schema = TestSchema::new("replace");
    let job = |n: i64| {
        NewJob::new("default", "reindex", json!({"user": 7, "n": n}))
            .with_unique_key("reindex-7")
            .with_replace()
    };
    let first = submit(&schema, &job(1).with_delay(60.0));
    assert!(first.created);
    let second = submit(&schema, &job(2).with_delay(120.0));
    assert_eq!(
        second,
        Enqueued {
            id: first.id,
            created: false,
            replaced: true
        }
    );
    let row = schema.job(first.id).unwrap();
    assert_eq!(row["payload"]["n"], 2);
    assert_eq!(row["state"], "scheduled");
    let delay = schema.count(&format!(
        "SELECT extract(epoch FROM run_at - created_at)::bigint FROM {{s}}.jobs WHERE id = {}",
        first.id
    ));
    assert!((118..=122).contains(&delay), "run time moved: {delay}");

    // Due now: a worker takes it; the next replace cannot touch a running job.
    assert!(submit(&schema, &job(3)).replaced);
    let mut consumer = Consumer::connect(&schema.config(&[]), "test/replace/0/").unwrap();
    let claimed = consumer.settle_and_claim(&[], 1).unwrap().claimed;
    assert_eq!(claimed[0].job.id, first.id);
    assert_eq!(claimed[0].job.payload["n"], 3);
    let fourth = submit(&schema, &job(4));
    assert!(fourth.created && fourth.id != first.id, "{fourth:?}");
    let running = schema.job(first.id).unwrap();
    assert_eq!(running["state"], "running");
    assert_eq!(
        running["unique_key"],
        Value::Null,
        "the running job gave up the key"
    );
    assert_eq!(schema.job(fourth.id).unwrap()["unique_key"], "reindex-7");
    // And the running job's ack is unaffected.
    let ack = Ack {
        id: first.id,
        lease_token: claimed[0].lease_token,
        settlement: Settlement::Completed(json!(null)),
    };
    assert!(consumer
        .settle_and_claim(&[ack], 0)
        .unwrap()
        .refused
        .is_empty());
    assert_eq!(schema.job(first.id).unwrap()["state"], "completed");
}

#[test]
fn racing_replacers_leave_one_waiting_job_with_the_last_payload() {
    let schema = TestSchema::new("replacerace");
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let name = schema.name.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = connect();
                barrier.wait();
                (0..20)
                    .map(|n| {
                        let job = NewJob::new("default", "noop", json!({"t": t, "n": n}))
                            .with_delay(60.0)
                            .with_unique_key("burst")
                            .with_replace();
                        producer::enqueue_with_outcome(&mut client, &name, &limits(), &job).unwrap()
                    })
                    .collect::<Vec<Enqueued>>()
            })
        })
        .collect();
    let all: Vec<Enqueued> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(all.iter().filter(|e| e.created).count(), 1, "{all:?}");
    assert_eq!(all.iter().filter(|e| e.replaced).count(), 159);
    assert_eq!(schema.count("SELECT count(*) FROM {s}.jobs"), 1);
    // Every thread's last replace ran after its earlier ones; the survivor is someone's last.
    let n = schema.count("SELECT (payload->>'n')::bigint FROM {s}.jobs");
    assert_eq!(n, 19);
}

#[test]
fn cli_reports_created_duplicate_and_replaced() {
    let schema = TestSchema::new("clidedup");
    let args = [
        "enqueue",
        "--task",
        "noop",
        "--unique-key",
        "k",
        "--unique-for",
        "1h",
        "--json",
    ];
    let (code, out, _) = forkq(&schema, &[], &args);
    assert_eq!(code, 0);
    let first = json_of(&out);
    assert_eq!(first["created"], true);
    let (code, out, err) = forkq(&schema, &[], &args);
    assert_eq!(code, 0, "a duplicate is not an error: {err}");
    assert_eq!(
        json_of(&out),
        json!({"id": first["id"], "created": false, "replaced": false})
    );
    // Without --json: the id on stdout, the verdict on stderr.
    let (code, out, err) = forkq(&schema, &[], &args[..7]);
    assert_eq!((code, out.trim()), (0, first["id"].to_string().as_str()));
    assert!(
        err.contains(&format!(
            "duplicate: job {} holds unique key \"k\"",
            first["id"]
        )),
        "{err}"
    );

    let replace = |payload: &str| {
        forkq(
            &schema,
            &[],
            &[
                "enqueue",
                "--task",
                "noop",
                "--delay",
                "60",
                "--unique-key",
                "r",
                "--replace",
                "--payload",
                payload,
                "--json",
            ],
        )
    };
    let made = json_of(&replace(r#"{"v":1}"#).1);
    let replaced = json_of(&replace(r#"{"v":2}"#).1);
    assert_eq!(
        replaced,
        json!({"id": made["id"], "created": false, "replaced": true})
    );

    // Bulk: counts of each.
    let lines = "{\"task\":\"noop\",\"unique_key\":\"k\",\"unique_for\":\"1h\"}\n\
                 {\"task\":\"noop\",\"unique_key\":\"w\",\"unique_for\":3600}\n\
                 {\"task\":\"noop\"}\n\
                 {\"task\":\"noop\",\"unique_key\":\"r\",\"replace\":true,\"payload\":{\"v\":3}}\n";
    let path = std::env::temp_dir().join(format!("{}.jsonl", schema.name));
    std::fs::write(&path, lines).unwrap();
    let (code, out, err) = forkq(
        &schema,
        &[],
        &["enqueue", "--jsonl", path.to_str().unwrap(), "--json"],
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json_of(&out),
        json!({"created": 2, "duplicate": 1, "replaced": 1})
    );
    let id = made["id"].as_i64().unwrap();
    assert_eq!(schema.job(id).unwrap()["payload"], json!({"v": 3}));

    // Bad combinations are refused before anything is enqueued.
    let (code, _, err) = forkq(&schema, &[], &["enqueue", "--task", "noop", "--replace"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = forkq(
        &schema,
        &[],
        &[
            "enqueue",
            "--task",
            "noop",
            "--unique-key",
            "x",
            "--unique-for",
            "soon",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a duration"), "{err}");
}
