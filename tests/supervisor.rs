//! The prefork supervisor against the real binary: real forks, real signals, real kill -9, the
//! real HTTP probe and the real PostgreSQL. Each test has its own schema and daemon.
//!
//! Timings are generous (the machine is shared); fine-grained numbers are printed, never asserted.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{process_alive, wait_until, Daemon, TestSchema};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

fn signal_pid(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap();
}

/// Live (non-zombie) child processes of `pid`, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| process_alive(p))
        .collect()
}

/// The probe's pid: the supervisor's child that is not in any slot.
fn probe_pid(daemon: &Daemon) -> i32 {
    let slots: HashSet<i32> = daemon.child_pids().into_iter().collect();
    let others: Vec<i32> = children_of(daemon.pid())
        .into_iter()
        .filter(|p| !slots.contains(p))
        .collect();
    assert_eq!(
        others.len(),
        1,
        "exactly one non-slot child (the probe): {others:?}"
    );
    others[0]
}

/// Enqueues one job with its own attempt limit through the SQL producer function.
fn enqueue_with_attempts(
    schema: &TestSchema,
    task: &str,
    payload: Value,
    max_attempts: i32,
) -> i64 {
    schema.count(&format!(
        "SELECT {{s}}.enqueue('default', '{task}', '{payload}'::jsonb, 0, NULL, {max_attempts})"
    ))
}

/// The slot currently running job `id`: (slot index, pid).
fn slot_running(daemon: &Daemon, id: i64) -> Option<(usize, i32)> {
    let (_, body) = daemon.livez()?;
    body["slots"]
        .as_array()?
        .iter()
        .enumerate()
        .find_map(|(i, s)| {
            (s["job_id"].as_i64() == Some(id)).then(|| (i, s["pid"].as_i64().unwrap_or(0) as i32))
        })
}

fn healthy_with(daemon: &Daemon, alive: u64) -> bool {
    matches!(daemon.livez(), Some((200, ref b)) if b["alive_children"] == alive && b["concurrency"] == alive)
}

fn threads_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// (RSS kB, PSS kB) from /proc/PID/smaps_rollup.
fn rss_pss_kb(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A raw HTTP request; returns the status code.
fn http_status(addr: SocketAddr, request: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn fleet_of_four_replaces_a_killed_child_and_reruns_its_job() {
    let schema = TestSchema::new("sup_kill");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "4")]);
    let (code, body) = daemon.livez().unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["check"], "ok");
    assert_eq!(body["alive_children"], 4);
    assert_eq!(body["concurrency"], 4);
    assert_eq!(body["crash_looping"], json!([]));
    let pids = daemon.child_pids();
    assert_eq!(pids.len(), 4);
    let children: HashSet<i32> = children_of(daemon.pid()).into_iter().collect();
    assert!(
        pids.iter().all(|p| children.contains(p)),
        "{pids:?} are the supervisor's children {children:?}"
    );

    let id = schema.enqueue("default", "sleep", json!({"ms": 3000}));
    let mut running = None;
    assert!(wait_until(Duration::from_secs(10), || {
        running = slot_running(&daemon, id);
        running.is_some()
    }));
    let (slot, victim) = running.unwrap();
    let killed_at = Instant::now();
    signal_pid(victim, Signal::SIGKILL);

    // The replacement, seen in /proc (fine-grained) and then in the slot table.
    let mut reforked = None;
    wait_until(Duration::from_secs(5), || {
        let fresh = children_of(daemon.pid())
            .into_iter()
            .any(|p| !pids.contains(&p) && p != victim);
        if fresh && reforked.is_none() {
            reforked = Some(killed_at.elapsed());
        }
        fresh
    });
    let mut new_pid = 0;
    assert!(
        wait_until(Duration::from_secs(1), || {
            new_pid = daemon.child_pids().get(slot).copied().unwrap_or(0);
            new_pid != 0 && new_pid != victim && process_alive(new_pid)
        }),
        "slot {slot} got no new pid within 1 s"
    );
    let slot_visible = killed_at.elapsed();

    // The job is re-run: some slot runs it again; seconds_in_job dates its restart.
    let mut rerun = None;
    assert!(wait_until(Duration::from_secs(10), || {
        let Some((_, body)) = daemon.livez() else {
            return false;
        };
        let elapsed = killed_at.elapsed();
        rerun = body["slots"].as_array().unwrap().iter().find_map(|s| {
            (s["job_id"].as_i64() == Some(id) && s["pid"].as_i64() != Some(victim as i64)).then(
                || {
                    elapsed.saturating_sub(Duration::from_secs_f64(
                        s["seconds_in_job"].as_f64().unwrap(),
                    ))
                },
            )
        });
        rerun.is_some()
    }));
    eprintln!(
        "MEASURE kill -9 -> new child process: {:?}; -> new pid visible in /livez: {slot_visible:?}; \
         -> job {id} started again: {:?}",
        reforked.unwrap(),
        rerun.unwrap()
    );
    assert!(wait_until(Duration::from_secs(20), || schema
        .archived("completed")
        == 1));
    let job = schema.job(id).unwrap();
    assert_eq!(job["attempt"], 2, "the killed attempt is charged: {job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{job}"
    );
    assert!(wait_until(Duration::from_secs(5), || healthy_with(
        &daemon, 4
    )));
    assert!(daemon
        .log_text()
        .contains(&format!("(pid {victim}) killed by signal 9")));
    let (_, body) = daemon.livez().unwrap();
    assert_eq!(
        body["slots"][slot]["last_exit"], "killed by signal 9",
        "{body}"
    );
    assert_eq!(body["slots"][slot]["restarts"], 1, "{body}");
    let untouched = (slot + 1) % 4;
    assert_eq!(body["slots"][untouched]["last_exit"], Value::Null, "{body}");
}

#[test]
fn crash_loop_turns_liveness_red_and_heals_after_the_healthy_uptime() {
    let schema = TestSchema::new("sup_loop");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_DEMO_TASKS", "1"),
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_PREFETCH", "1"),
            ("FORKQ_HEALTHY_UPTIME_SECONDS", "2"),
            ("FORKQ_RESTART_BACKOFF_MAX_MS", "300"),
        ],
    );
    // Every job kills the child that runs it, at once.
    for _ in 0..12 {
        enqueue_with_attempts(&schema, "crash", json!({}), 1);
    }
    let mut seen = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            seen = daemon
                .livez()
                .filter(|(c, b)| *c == 503 && b["check"] == "crash_looping");
            seen.is_some()
        }),
        "no 503 crash_looping"
    );
    let (_, body) = seen.unwrap();
    let looping = body["crash_looping"].as_array().unwrap().clone();
    assert!(!looping.is_empty(), "{body}");
    let deaths = daemon.log_text().matches("killed by signal 6").count();
    assert!(deaths >= 3, "crash-looping after {deaths} deaths");
    assert!(daemon.log_text().contains("is crash-looping"));
    // The crash jobs end in the dead letter; the slots live again and, after the healthy uptime,
    // their crash counts are cleared: liveness is green again without a restart of the daemon.
    assert!(wait_until(Duration::from_secs(30), || schema
        .archived("failed")
        == 12));
    assert!(
        wait_until(Duration::from_secs(15), || healthy_with(&daemon, 2)),
        "liveness did not recover: {:?}",
        daemon.livez()
    );
    assert!(daemon.log_text().contains("is healthy again"));
}

#[test]
fn crash_loop_exit_makes_the_supervisor_exit_70() {
    let schema = TestSchema::new("sup_loopexit");
    for _ in 0..10 {
        schema.enqueue("default", "crash", json!({}));
    }
    let mut daemon = Daemon::spawn(
        &schema,
        &[
            ("FORKQ_DEMO_TASKS", "1"),
            ("FORKQ_CONCURRENCY", "1"),
            ("FORKQ_PREFETCH", "1"),
            ("FORKQ_CRASH_LOOP_EXIT", "1"),
        ],
    );
    let code = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(70), "log:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("FORKQ_CRASH_LOOP_EXIT=1"));
    assert!(children_of(daemon.pid()).is_empty());
}

#[test]
fn poison_job_is_dead_lettered_while_the_fleet_keeps_going() {
    let schema = TestSchema::new("sup_poison");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_DEMO_TASKS", "1"),
            ("FORKQ_CONCURRENCY", "4"),
            ("FORKQ_PREFETCH", "1"),
            ("FORKQ_HEALTHY_UPTIME_SECONDS", "2"),
        ],
    );
    let poison = enqueue_with_attempts(&schema, "crash", json!({}), 3);
    schema.enqueue_n("default", "noop", json!({}), 20);
    assert!(wait_until(Duration::from_secs(30), || schema
        .archived("failed")
        == 1));
    let job = schema.job(poison).unwrap();
    assert_eq!(job["state"], "failed");
    assert_eq!(job["attempt"], 3, "{job}");
    assert!(
        job["last_error"].as_str().unwrap().contains("signal 6"),
        "{job}"
    );
    assert!(wait_until(Duration::from_secs(20), || schema
        .archived("completed")
        == 20));
    assert!(
        wait_until(Duration::from_secs(15), || healthy_with(&daemon, 4)),
        "{:?}",
        daemon.livez()
    );
}

/// A TCP proxy to PostgreSQL whose new connections can be black-holed (accepted, never
/// forwarded) while established ones keep flowing, and whose requests to the server can be held
/// back (a slow network or a slow server, as the client sees it).
struct Proxy {
    addr: SocketAddr,
    black_hole: Arc<AtomicBool>,
    /// Milliseconds every chunk sent to the server waits before it is forwarded.
    request_delay_ms: Arc<AtomicU64>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let black_hole = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&black_hole);
        let request_delay_ms = Arc::new(AtomicU64::new(0));
        let delay = Arc::clone(&request_delay_ms);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if flag.load(Ordering::SeqCst) {
                    // Swallow everything: the startup handshake never gets an answer.
                    std::thread::spawn(move || {
                        let mut client = client;
                        let mut sink = [0u8; 1024];
                        while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
                    });
                    continue;
                }
                let Ok(server) = TcpStream::connect("127.0.0.1:5432") else {
                    continue;
                };
                let requests = client.try_clone().unwrap();
                let to_server = server.try_clone().unwrap();
                let delay = Arc::clone(&delay);
                std::thread::spawn(move || delay_line(requests, to_server, &delay));
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy {
            addr,
            black_hole,
            request_delay_ms,
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@{}/test", self.addr)
    }
}

/// Forwards what `from` sends to `to`, each chunk `delay_ms` after it arrived (a latency: chunks
/// in flight overlap, as on a slow network, rather than queue behind each other's delay).
fn delay_line(mut from: TcpStream, to: TcpStream, delay_ms: &AtomicU64) {
    let (sender, receiver) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let mut writer = to.try_clone().unwrap();
    let forward = std::thread::spawn(move || {
        for (due, chunk) in receiver {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
        if sender.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(sender);
    let _ = forward.join();
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_reforked_child_that_never_polls_ages_and_liveness_stays_red() {
    let schema = TestSchema::new("sup_age");
    let proxy = Proxy::start();
    let url = proxy.url();
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "4"),
            ("DATABASE_URL", &url),
            ("FORKQ_HEALTH_STALE_SECONDS", "3"),
            ("FORKQ_HEALTHY_UPTIME_SECONDS", "2"),
            ("FORKQ_RESTART_BACKOFF_MAX_MS", "500"),
        ],
    );
    proxy.black_hole.store(true, Ordering::SeqCst);
    let slot = 1;
    let victim = daemon.child_pids()[slot];
    signal_pid(victim, Signal::SIGKILL);
    // The re-forked child hangs in its connection's handshake and never heartbeats: the slot
    // keeps the age of its last real heartbeat and turns stale.
    let mut body = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            match daemon.livez() {
                Some((503, b)) if b["check"] == "stale" => {
                    body = b;
                    true
                }
                _ => false,
            }
        }),
        "never stale: {:?}",
        daemon.livez()
    );
    assert_eq!(
        body["stale"],
        json!([slot]),
        "only the re-forked slot is stale: {body}"
    );
    assert_eq!(body["stale_after_seconds"], 3);
    assert!(
        body["oldest_child_seconds_since_heartbeat"]
            .as_f64()
            .unwrap()
            > 3.0,
        "{body}"
    );
    // It stays red: the supervisor kills the wedged child and re-forks, and no re-fork reseeds
    // the heartbeat (the check may move on to crash_looping).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let (code, b) = daemon.livez().expect("probe answers");
        assert_eq!(
            code, 503,
            "liveness turned green while slot {slot} cannot poll: {b}"
        );
        assert!(
            b["check"] == "stale" || b["check"] == "crash_looping",
            "{b}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        daemon.log_text().contains("is wedged"),
        "the supervisor killed the wedged child"
    );
    // The database path comes back: the slot heals.
    proxy.black_hole.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(30), || healthy_with(&daemon, 4)),
        "{:?}",
        daemon.livez()
    );
}

/// A database slower than the stale window: every request takes 2.5 s to reach the server, the
/// stale window is 2 s. A child blocked in such a call has announced how long the call may take
/// (its bound is 4 s here), so it is waiting, not wedged: none is killed, `/livez` stays 200, and
/// the jobs still get done.
#[test]
fn a_child_blocked_in_a_slow_database_call_is_not_killed() {
    let schema = TestSchema::new("sup_slowdb");
    let proxy = Proxy::start();
    let url = proxy.url();
    let daemon = Daemon::start(
        &schema,
        &[
            ("DATABASE_URL", &url),
            ("FORKQ_HEALTH_STALE_SECONDS", "2"),
            ("FORKQ_LISTEN", "0"),
        ],
    );
    let pids = daemon.child_pids();
    proxy.request_delay_ms.store(2_500, Ordering::SeqCst);
    schema.enqueue_n("default", "noop", json!({}), 10);
    let started = Instant::now();
    let mut codes = Vec::new();
    let done = wait_until(Duration::from_secs(60), || {
        let answer = daemon.livez();
        if let Some((code, body)) = answer.as_ref().filter(|(c, _)| *c != 200) {
            println!("/livez {code}: {body}");
        }
        codes.extend(answer.map(|(c, _)| c));
        schema.archived("completed") == 10 && started.elapsed() > Duration::from_secs(8)
    });
    proxy.request_delay_ms.store(0, Ordering::SeqCst);
    let red = codes.iter().filter(|&&c| c != 200).count();
    println!(
        "requests delayed 2.5 s, stale window 2 s: 10 jobs done in {:.1?}; /livez not 200 in {red} \
         of {} answers",
        started.elapsed(),
        codes.len()
    );
    assert!(done, "the jobs were not done; log:\n{}", daemon.log_text());
    assert!(
        !daemon.log_text().contains("is wedged"),
        "a child waiting on the database was killed; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        red, 0,
        "liveness failed while children waited on the database"
    );
    assert_eq!(daemon.child_pids(), pids, "children were replaced");
}

#[test]
fn a_stopped_child_is_reported_stale_then_killed_and_its_job_released() {
    let schema = TestSchema::new("sup_stop");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_HEALTH_STALE_SECONDS", "3"),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    let id = schema.enqueue("default", "sleep", json!({"ms": 60_000}));
    let mut running = None;
    assert!(wait_until(Duration::from_secs(10), || {
        running = slot_running(&daemon, id);
        running.is_some()
    }));
    let (slot, victim) = running.unwrap();
    signal_pid(victim, Signal::SIGSTOP);
    // Poll tightly: the supervisor kills the stopped child as soon as it is stale too, so the
    // 503 lasts from the threshold until the replacement's first heartbeat.
    let mut stale = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while stale.is_none() && Instant::now() < deadline {
        stale = daemon
            .livez()
            .filter(|(c, b)| *c == 503 && b["check"] == "stale");
    }
    let (_, body) = stale.expect("a stopped child turns liveness 503 stale");
    assert!(
        body["stale"].as_array().unwrap().contains(&json!(slot)),
        "{body}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(victim)),
        "stopped child killed"
    );
    assert!(wait_until(Duration::from_secs(10), || {
        let p = daemon.child_pids().get(slot).copied().unwrap_or(0);
        p != 0 && p != victim
    }));
    // Released by the successor (charged) and running again in a live child.
    assert!(
        wait_until(Duration::from_secs(10), || {
            schema
                .job(id)
                .is_some_and(|j| j["attempt"] == 2 && j["state"] == "running")
        }),
        "{:?}",
        schema.job(id)
    );
    assert!(schema.job(id).unwrap()["last_error"]
        .as_str()
        .unwrap()
        .contains("no heartbeat"));
    assert!(wait_until(Duration::from_secs(10), || healthy_with(
        &daemon, 2
    )));
}

#[test]
fn a_job_over_its_timeout_kills_its_child_and_is_retried() {
    let schema = TestSchema::new("sup_timeout");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_JOB_TIMEOUT_SECONDS", "1"),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    let id = enqueue_with_attempts(&schema, "sleep", json!({"ms": 60_000}), 2);
    assert!(
        wait_until(Duration::from_secs(30), || schema.archived("failed") == 1),
        "{:?}",
        schema.job(id)
    );
    let job = schema.job(id).unwrap();
    assert_eq!(job["attempt"], 2, "retried once, then dead-lettered: {job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("FORKQ_JOB_TIMEOUT_SECONDS=1"),
        "{job}"
    );
    assert!(
        daemon
            .log_text()
            .matches("exceeded FORKQ_JOB_TIMEOUT_SECONDS")
            .count()
            >= 2
    );
    // The job overran, the children did not crash: no crash loop, the fleet is whole.
    assert!(
        wait_until(Duration::from_secs(10), || healthy_with(&daemon, 2)),
        "{:?}",
        daemon.livez()
    );
}

/// A fleet of `children`, each running one 60 s job, with the given shutdown grace (seconds).
fn fleet_busy_with_minute_long_jobs(schema: &TestSchema, children: usize, grace: &str) -> Daemon {
    let concurrency = children.to_string();
    let daemon = Daemon::start(
        schema,
        &[
            ("FORKQ_CONCURRENCY", &concurrency),
            ("FORKQ_SHUTDOWN_GRACE_SECONDS", grace),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    schema.enqueue_n("default", "sleep", json!({"ms": 60_000}), children);
    assert!(wait_until(Duration::from_secs(15), || schema
        .live("running")
        == children as i64));
    daemon
}

#[test]
fn sigterm_stops_the_fleet_against_one_deadline_and_hands_jobs_back() {
    let schema = TestSchema::new("sup_term");
    let mut daemon = fleet_busy_with_minute_long_jobs(&schema, 4, "3");
    assert!(wait_until(Duration::from_secs(5), || matches!(
        daemon.get("/readyz"),
        Some((200, _))
    )));
    let pids = daemon.child_pids();
    let probe = probe_pid(&daemon);
    let started = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let mut not_ready = false;
    wait_until(Duration::from_secs(2), || {
        not_ready =
            matches!(daemon.get("/readyz"), Some((503, ref b)) if b.contains("shutting_down"));
        not_ready
    });
    assert!(not_ready, "/readyz is 503 while shutting down");
    let code = daemon.wait_exit(Duration::from_secs(15));
    let took = started.elapsed();
    eprintln!("MEASURE SIGTERM with 4 running 60 s jobs, grace 3 s: exit after {took:?}");
    assert_eq!(code, Some(0), "{}", daemon.log_text());
    assert!(
        took < Duration::from_secs(6),
        "one deadline for all: took {took:?}"
    );
    assert_eq!(schema.live("running"), 0, "no job left running");
    assert_eq!(schema.live("available"), 4, "every job back in the queue");
    assert!(pids.iter().chain([&probe]).all(|&p| !process_alive(p)));
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let schema = TestSchema::new("sup_term2");
    let mut daemon = fleet_busy_with_minute_long_jobs(&schema, 2, "60");
    let started = Instant::now();
    daemon.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the jobs"
    );
    daemon.signal(Signal::SIGTERM);
    let code = daemon.wait_exit(Duration::from_secs(15));
    let took = started.elapsed();
    eprintln!("MEASURE second SIGTERM: exit {took:?} after the first");
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(daemon
        .log_text()
        .contains("during a graceful stop: stopping at once"));
    assert_eq!(schema.live("running"), 0);
    assert_eq!(schema.live("available"), 2);
}

#[test]
fn a_taken_health_port_fails_start_up_naming_the_address() {
    let schema = TestSchema::new("sup_port");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut daemon = Daemon::spawn(&schema, &[("FORKQ_HEALTH_ADDR", &addr)]);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)), Some(1));
    let log = daemon.log_text();
    assert!(
        log.contains(&addr) && log.contains("FORKQ_HEALTH_ADDR"),
        "{log}"
    );
    assert!(
        !log.contains("forked child"),
        "nothing forked before the bind: {log}"
    );
}

#[test]
fn sighup_replaces_every_child_one_by_one() {
    let schema = TestSchema::new("sup_hup");
    let n = 3;
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "3")]);
    let before: HashSet<i32> = daemon.child_pids().into_iter().collect();
    let probe = probe_pid(&daemon);
    daemon.signal(Signal::SIGHUP);
    let mut min_alive = usize::MAX;
    let mut livez_codes = HashSet::new();
    let done = wait_until(Duration::from_secs(30), || {
        let alive = children_of(daemon.pid())
            .into_iter()
            .filter(|&p| p != probe)
            .count();
        min_alive = min_alive.min(alive);
        if let Some((code, body)) = daemon.livez() {
            livez_codes.insert(code);
            min_alive = min_alive.min(body["alive_children"].as_u64().unwrap() as usize);
        }
        let now: HashSet<i32> = daemon.child_pids().into_iter().collect();
        now.len() == n
            && now.is_disjoint(&before)
            && !now.contains(&0)
            && daemon.log_text().contains("rolling restart done")
    });
    assert!(
        done,
        "not every child was replaced: {:?} -> {:?}",
        before,
        daemon.child_pids()
    );
    assert!(
        min_alive >= n - 1,
        "at most one child down at a time; saw {min_alive} alive"
    );
    assert_eq!(
        livez_codes,
        HashSet::from([200]),
        "liveness stayed green during the rolling restart"
    );
    assert_eq!(
        daemon
            .log_text()
            .matches("rolling restart: stopping child")
            .count(),
        n
    );
}

/// Signals sent to the daemon's whole process group (a terminal's hang-up, `kill -HUP -PGID`,
/// job control's TTIN and TTOU) are the supervisor's to act on (one child more, one less, a
/// rolling restart): the children and the probe ignore them, so none is stopped and none dies of
/// SIGHUP. Handler programs get the default dispositions back.
#[test]
fn signals_to_the_whole_process_group_are_the_supervisors_alone() {
    let schema = TestSchema::new("sup_pgsig");
    let daemon = Daemon::start(
        &schema,
        &[(
            "FORKQ_ROUTES",
            "sigign=exec:/bin/grep SigIgn /proc/self/status",
        )],
    );
    let group = Pid::from_raw(-daemon.pid());
    let probe = probe_pid(&daemon);
    let stopped = |daemon: &Daemon| -> Vec<i32> {
        children_of(daemon.pid())
            .into_iter()
            .filter(|&p| common::process_state(p) == Some('T'))
            .collect()
    };
    for (signal, fleet) in [(Signal::SIGTTIN, 3), (Signal::SIGTTOU, 2)] {
        kill(group, signal).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || healthy_with(&daemon, fleet)),
            "{signal} to the group: {:?}",
            daemon.livez()
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(stopped(&daemon), Vec::<i32>::new(), "{signal} stopped them");
    }
    kill(group, Signal::SIGHUP).unwrap();
    assert!(
        daemon.wait_for_log("rolling restart done", Duration::from_secs(30)),
        "{}",
        daemon.log_text()
    );
    assert!(
        !daemon.log_text().contains("(SIGHUP)"),
        "a process died of SIGHUP: {}",
        daemon.log_text()
    );
    assert_eq!(probe_pid(&daemon), probe, "the probe was replaced");
    assert!(wait_until(Duration::from_secs(10), || healthy_with(
        &daemon, 2
    )));

    let id = schema.enqueue("default", "sigign", json!({}));
    assert!(wait_until(Duration::from_secs(20), || schema
        .job(id)
        .is_some_and(|j| j["state"] == "completed")));
    let result = schema.job(id).unwrap()["result"].clone();
    let mask = result
        .as_str()
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("not a SigIgn line: {result}"));
    for signal in [Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU] {
        assert_eq!(
            mask & (1 << (signal as u64 - 1)),
            0,
            "the handler program ignores {signal}: {result}"
        );
    }
}

#[test]
fn ttin_and_ttou_change_the_number_of_children_never_below_one() {
    let schema = TestSchema::new("sup_ttin");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    // TTIN and TTOU at once. When the supervisor handles them in separate turns, the new child
    // is told to stop microseconds after its fork, before it has its own handlers: the signal
    // must wait for them, not be lost (when both land in one turn, nothing is forked at all).
    daemon.signal(Signal::SIGTTIN);
    daemon.signal(Signal::SIGTTOU);
    let settled = || children_of(daemon.pid()).len() == 3 && healthy_with(&daemon, 2);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        wait_until(Duration::from_secs(10), settled),
        "no child left over from TTIN+TTOU: {:?}\n{}",
        children_of(daemon.pid()),
        daemon.log_text()
    );
    assert!(healthy_with(&daemon, 2));
    daemon.signal(Signal::SIGTTIN);
    assert!(
        wait_until(Duration::from_secs(10), || healthy_with(&daemon, 3)),
        "{:?}",
        daemon.livez()
    );
    for expected in [2, 1] {
        daemon.signal(Signal::SIGTTOU);
        assert!(
            wait_until(Duration::from_secs(10), || healthy_with(&daemon, expected)),
            "{:?}",
            daemon.livez()
        );
    }
    let survivor = daemon.child_pids()[0];
    daemon.signal(Signal::SIGTTOU);
    assert!(daemon.wait_for_log("SIGTTOU ignored", Duration::from_secs(5)));
    assert!(
        healthy_with(&daemon, 1) && daemon.child_pids() == vec![survivor],
        "{:?}\n{}",
        daemon.livez(),
        daemon.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || children_of(daemon.pid()).len()
            == 2),
        "one child and the probe: {:?}",
        children_of(daemon.pid())
    );
    // A retired slot comes back fresh, without a stale moment.
    daemon.signal(Signal::SIGTTIN);
    assert!(
        wait_until(Duration::from_secs(10), || healthy_with(&daemon, 2)),
        "{:?}",
        daemon.livez()
    );
}

#[test]
fn fork_failure_is_logged_and_retried_without_unwinding_the_supervisor() {
    let schema = TestSchema::new("sup_nproc");
    // Root ignores RLIMIT_NPROC: run the daemon as an unprivileged uid of its own (so no other
    // process counts against its limit), then lower its limit for real.
    const AS_UID: [&str; 4] = [
        "setpriv",
        "--reuid=61001",
        "--regid=61001",
        "--clear-groups",
    ];
    let daemon = Daemon::start_wrapped(&schema, &[("FORKQ_CONCURRENCY", "2")], &AS_UID);
    let sup = daemon.pid().to_string();
    // Without CAP_SYS_RESOURCE (as here) root may not change another uid's limits, nor raise a
    // hard limit: prlimit runs as the daemon's uid and moves only the soft limit.
    let prlimit = |args: &[&str]| {
        let out = Command::new(AS_UID[0])
            .args(&AS_UID[1..])
            .args(["prlimit", "--pid", &sup])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let hard = prlimit(&["--nproc", "--noheadings", "--raw", "--output=HARD"]);
    prlimit(&["--nproc=1:"]);
    let victim = daemon.child_pids()[0];
    signal_pid(victim, Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .log_text()
            .matches("cannot fork child 0")
            .count()
            >= 2),
        "fork failure logged and retried:\n{}",
        daemon.log_text()
    );
    assert!(process_alive(daemon.pid()), "the supervisor survives");
    assert!(daemon.log_text().contains("retrying in 1 s"));
    assert_eq!(
        daemon.child_pids()[0],
        0,
        "slot 0 is empty while fork fails"
    );
    prlimit(&[&format!("--nproc={hard}:")]);
    assert!(
        wait_until(Duration::from_secs(10), || healthy_with(&daemon, 2)),
        "{:?}",
        daemon.livez()
    );
    assert_ne!(daemon.child_pids()[0], victim);
}

#[test]
fn fork_failure_at_start_up_is_a_clear_fatal_error() {
    let schema = TestSchema::new("sup_nproc0");
    // One process allowed for a uid of its own (root ignores the limit): the supervisor may start,
    // but its first fork fails.
    let mut daemon = Daemon::spawn_wrapped(
        &schema,
        &[("FORKQ_CONCURRENCY", "2")],
        &[
            "prlimit",
            "--nproc=1:",
            "setpriv",
            "--reuid=61002",
            "--regid=61002",
            "--clear-groups",
        ],
    );
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)), Some(1));
    let log = daemon.log_text();
    assert!(
        log.contains("cannot fork") && log.contains("EAGAIN"),
        "{log}"
    );
}

#[test]
fn children_are_recycled_after_max_jobs_with_a_clean_exit() {
    let schema = TestSchema::new("sup_recycle");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_MAX_JOBS_PER_CHILD", "5"),
            ("FORKQ_PREFETCH", "1"),
        ],
    );
    schema.enqueue_n("default", "noop", json!({}), 40);
    assert!(wait_until(Duration::from_secs(60), || schema
        .archived("completed")
        == 40));
    let log = daemon.log_text();
    assert!(log.matches("exited cleanly").count() >= 6, "{log}");
    assert!(
        !log.contains("killed by signal") && !log.contains("exited with status"),
        "{log}"
    );
    let (code, body) = daemon.livez().unwrap();
    assert_eq!(code, 200, "recycling is not crashing: {body}");
    let restarts: u64 = body["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["restarts"].as_u64().unwrap())
        .sum();
    assert!(restarts >= 6, "{body}");
}

#[test]
fn children_and_probe_die_with_the_supervisor() {
    let schema = TestSchema::new("sup_pdeath");
    let mut daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "3")]);
    let family = children_of(daemon.pid());
    assert_eq!(family.len(), 4, "3 children and the probe: {family:?}");
    signal_pid(daemon.pid(), Signal::SIGKILL);
    assert!(daemon.wait_exit(Duration::from_secs(5)).is_some());
    assert!(
        wait_until(Duration::from_secs(2), || family
            .iter()
            .all(|&p| !process_alive(p))),
        "survivors: {:?}",
        family
            .iter()
            .filter(|&&p| process_alive(p))
            .collect::<Vec<_>>()
    );
}

#[test]
fn sigterm_to_one_child_replaces_that_child_only() {
    let schema = TestSchema::new("sup_childterm");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    let pids = daemon.child_pids();
    signal_pid(pids[0], Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(10), || {
        let now = daemon.child_pids();
        now[0] != 0 && now[0] != pids[0] && now[1] == pids[1]
    }));
    assert!(!process_alive(pids[0]));
    // A SIGHUP meant for the supervisor but sent to a child must not reach the supervisor
    // through an inherited handler and its pipe (no rolling restart); the child ignores it (the
    // supervisor's commands also reach the whole process group) and lives on.
    signal_pid(pids[1], Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.child_pids()[1], pids[1], "SIGHUP ended a child");
    let log = daemon.log_text();
    assert!(!log.contains("rolling restart"), "{log}");
    assert!(
        log.contains(&format!("(pid {}) exited cleanly", pids[0])),
        "{log}"
    );
    assert!(
        !log.contains("graceful stop"),
        "the child did not run the supervisor's handler: {log}"
    );
    assert!(process_alive(daemon.pid()));
    assert!(wait_until(Duration::from_secs(5), || healthy_with(
        &daemon, 2
    )));
}

#[test]
fn endpoints_cli_health_and_a_single_threaded_supervisor() {
    let schema = TestSchema::new("sup_http");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    assert_eq!(threads_of(daemon.pid()), 1, "right after start");
    for path in ["/livez", "/health", "/healthz"] {
        let (code, body) = daemon.get(path).unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        for key in [
            "status",
            "check",
            "oldest_child_seconds_since_heartbeat",
            "stale_after_seconds",
            "alive_children",
            "concurrency",
            "crash_looping",
            "slots",
        ] {
            assert!(body.get(key).is_some(), "{path} lacks {key}: {body}");
        }
        for key in ["pid", "state", "job_id", "seconds_in_job", "restarts"] {
            assert!(
                body["slots"][0].get(key).is_some(),
                "slot lacks {key}: {body}"
            );
        }
    }
    let (code, body) = daemon.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    schema.enqueue_n("default", "noop", json!({}), 5);
    assert!(wait_until(Duration::from_secs(10), || schema
        .archived("completed")
        == 5));
    let (code, metrics) = daemon.get("/metrics").unwrap();
    assert_eq!(code, 200);
    for series in [
        "forkq_jobs_succeeded_total 5",
        "forkq_jobs_failed_total",
        "forkq_jobs_retried_total",
        "forkq_job_duration_seconds_bucket{le=\"+Inf\"} 5",
        "forkq_child_restarts_total",
        "forkq_crash_looping_slots 0",
        "forkq_children_alive 2",
        "forkq_queue_jobs{queue=\"default\",state=\"available\"}",
        "forkq_queue_oldest_available_seconds",
    ] {
        assert!(metrics.contains(series), "missing {series}:\n{metrics}");
    }
    assert_eq!(daemon.get("/nope").unwrap().0, 404);
    assert_eq!(
        http_status(
            daemon.addr,
            "POST /livez HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
        ),
        Some(405)
    );
    assert_eq!(
        http_status(daemon.addr, "HEAD /livez HTTP/1.0\r\n\r\n"),
        Some(200)
    );
    let health = |addr: &str| {
        Command::new(common::forkq_bin())
            .args(["health", "--addr", addr])
            .envs(schema.env())
            .output()
            .unwrap()
    };
    let out = health(&daemon.addr.to_string());
    assert!(out.status.success(), "{out:?}");
    // Kill a child too, so the supervisor has forked after serving requests.
    let killed = daemon.child_pids()[1];
    signal_pid(killed, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || healthy_with(
        &daemon, 2
    ) && !daemon
        .child_pids()
        .contains(&killed)));
    assert_eq!(threads_of(daemon.pid()), 1, "after requests and a re-fork");
    // The probe is re-forked when it dies; the endpoint comes back on the same address.
    let probe = probe_pid(&daemon);
    signal_pid(probe, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || {
        healthy_with(&daemon, 2) && probe_pid(&daemon) != probe
    }));
    assert!(daemon
        .log_text()
        .contains(&format!("probe process {probe} killed by signal 9")));
    let closed = common::free_port();
    let out = health(&format!("127.0.0.1:{closed}"));
    assert!(!out.status.success(), "nothing listens there: {out:?}");
}

#[test]
fn systemd_notifications_come_from_the_supervisor_only() {
    let schema = TestSchema::new("sup_notify");
    let dir =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.sock", schema.name));
    let _ = std::fs::remove_file(&dir);
    let socket = UnixDatagram::bind(&dir).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let collected = Arc::clone(&messages);
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stopping.load(Ordering::SeqCst) {
            if let Ok(n) = socket.recv(&mut buf) {
                collected
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    let path = dir.to_str().unwrap().to_string();
    let mut daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_DEMO_TASKS", "1"),
            ("FORKQ_CONCURRENCY", "2"),
            ("FORKQ_PREFETCH", "1"),
            ("NOTIFY_SOCKET", &path),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let has = |what: &str| {
        messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with(what)))
    };
    assert!(wait_until(Duration::from_secs(5), || has("READY=1")));
    assert!(
        wait_until(Duration::from_secs(5), || has("STATUS=2/2 children alive")),
        "{:?}",
        messages.lock().unwrap()
    );
    assert!(wait_until(Duration::from_secs(5), || {
        messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .count()
            >= 3
    }));
    // What a handler sees of the environment: no systemd variables.
    let ids: Vec<i64> = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "FORKQ_SCHEMA"]
        .iter()
        .map(|name| schema.enqueue("default", "getenv", json!({"name": name})))
        .collect();
    assert!(wait_until(Duration::from_secs(10), || schema
        .archived("completed")
        == 3));
    let seen: Vec<Value> = ids
        .iter()
        .map(|&id| schema.job(id).unwrap()["result"]["value"].clone())
        .collect();
    assert_eq!(
        seen,
        vec![Value::Null, Value::Null, json!(schema.name)],
        "children never see NOTIFY_SOCKET"
    );
    // A crash-looping fleet stops petting the watchdog, so systemd restarts the service.
    for _ in 0..6 {
        enqueue_with_attempts(&schema, "crash", json!({}), 1);
    }
    assert!(wait_until(Duration::from_secs(20), || {
        matches!(daemon.livez(), Some((503, ref b)) if b["check"] == "crash_looping")
    }));
    let pets = || {
        messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .count()
    };
    let before = pets();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        matches!(daemon.livez(), Some((503, _))),
        "still crash-looping (healthy uptime 10 s)"
    );
    assert_eq!(pets(), before, "no WATCHDOG=1 while liveness fails");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(wait_until(Duration::from_secs(2), || has("STOPPING=1")));
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn measurements_livez_latency_and_memory() {
    let schema = TestSchema::new("sup_measure");
    let daemon = Daemon::start(&schema, &[("FORKQ_CONCURRENCY", "2")]);
    let mut latencies: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            assert!(daemon.livez().is_some());
            t.elapsed()
        })
        .collect();
    latencies.sort();
    eprintln!(
        "MEASURE /livez latency over 200 requests: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    let probe = probe_pid(&daemon);
    let child = daemon.child_pids()[0];
    for (who, pid) in [
        ("supervisor", daemon.pid()),
        ("probe", probe),
        ("idle child", child),
    ] {
        let (rss, pss) = rss_pss_kb(pid);
        eprintln!("MEASURE memory {who} (pid {pid}): RSS {rss} kB, PSS {pss} kB");
        assert!(rss > 0);
    }
}

/// The `forkq_claims_total` counter of a daemon's /metrics.
fn claims_total(daemon: &Daemon) -> u64 {
    let (_, metrics) = daemon.get("/metrics").unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("forkq_claims_total "))
        .and_then(|v| v.parse().ok())
        .expect("forkq_claims_total in /metrics")
}

/// An idle fleet polls the database once per interval per host, not once per child; and one
/// notification wakes one child, not all of them.
#[test]
fn an_idle_fleet_polls_once_per_interval_and_one_job_wakes_one_child() {
    let schema = TestSchema::new("sup_idle");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "8"),
            ("FORKQ_POLL_INTERVAL_MS", "200"),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = claims_total(&daemon);
    std::thread::sleep(Duration::from_secs(2));
    let polls = claims_total(&daemon) - before;
    eprintln!("MEASURE idle: {polls} claims in 2 s by 8 idle children polling every 200 ms");
    // About 10 for the host; 80 would be every child polling.
    assert!(
        polls <= 20,
        "{polls} claims in 2 s: idle children poll one at a time"
    );

    let before = claims_total(&daemon);
    schema.enqueue("default", "noop", json!({}));
    assert!(wait_until(Duration::from_secs(10), || schema
        .archived("completed")
        == 1));
    std::thread::sleep(Duration::from_millis(100));
    let claims = claims_total(&daemon) - before;
    eprintln!("MEASURE one job into an idle fleet of 8: {claims} claims");
    // The woken child's claim and its next (empty) one, plus at most a poll or two.
    assert!(
        claims <= 5,
        "one job cost {claims} claims: the whole fleet was woken"
    );
}

/// Behind PgBouncer in transaction mode LISTEN does not work: with `FORKQ_LISTEN=0` nothing
/// listens, and polling alone still drains the queue.
#[test]
fn without_listen_polling_alone_drains_the_queue() {
    let schema = TestSchema::new("sup_nolisten");
    let daemon = Daemon::start(
        &schema,
        &[
            ("FORKQ_CONCURRENCY", "4"),
            ("FORKQ_LISTEN", "0"),
            ("FORKQ_POLL_INTERVAL_MS", "100"),
        ],
    );
    let listeners = || -> i64 {
        common::connect()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'forkq listener' AND query LIKE '%' || $1 || '%'",
                &[&schema.name],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(listeners(), 0, "FORKQ_LISTEN=0 but something LISTENs");
    let started = Instant::now();
    schema.enqueue("default", "noop", json!({}));
    assert!(wait_until(Duration::from_secs(10), || schema
        .archived("completed")
        == 1));
    eprintln!(
        "MEASURE FORKQ_LISTEN=0, poll 100 ms: one job done {:?} after enqueue",
        started.elapsed()
    );
    schema.enqueue_n("default", "noop", json!({}), 500);
    assert!(
        wait_until(Duration::from_secs(30), || schema.archived("completed")
            == 501),
        "{}",
        daemon.log_text()
    );
}
