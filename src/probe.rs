//! The probe process: the fleet's `/livez`, `/readyz` and `/metrics` over HTTP, the wake-up
//! listener that rouses one idle child per enqueue notification ([`crate::wakeup`]), the
//! presence service that records the daemon in the hosts table ([`crate::presence`]) and, when
//! the daemon has schedules, the ticker that enqueues them ([`crate::ticker`]).
//!
//! A forked child of the supervisor answers on the listener the supervisor bound (tiny_http
//! starts threads, which the supervisor must never have). Liveness is computed from the shared
//! slot table only, so a database outage never makes an orchestrator kill healthy workers;
//! readiness and queue metrics use the probe's own connection, guarded so a slow database can
//! delay only them.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::config::Config;
use crate::queue::{self, admin, migrations, queues};
use crate::slots::{monotonic_ms, SlotState, SlotTable, LATENCY_BUCKETS_MS};
use crate::{presence, ticker, wakeup};

/// Request threads: liveness stays answerable while others wait on the database.
const THREADS: usize = 4;
/// Queue depth for `/metrics` is queried at most this often.
const QUEUE_STATS_TTL: Duration = Duration::from_secs(1);

/// The probe's database state, shared by its request threads.
struct Database {
    client: Option<postgres::Client>,
    stats: Option<(Instant, String)>,
}

/// Serves until the process is killed; returns an exit code if the server cannot start.
pub fn serve(listener: &TcpListener, table: &'static SlotTable, config: &Config) -> i32 {
    let listener = match listener.try_clone() {
        Ok(l) => l,
        Err(e) => {
            log::error!("probe: cannot use the health listener: {e}");
            return 1;
        }
    };
    let server = match Server::from_listener(listener, None) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            log::error!("probe: cannot start the HTTP server: {e}");
            return 1;
        }
    };
    if config.listen {
        let config = config.clone();
        std::thread::spawn(move || wakeup::run_listener(&config, table));
    }
    {
        let config = config.clone();
        std::thread::spawn(move || presence::run(&config, table));
    }
    if !config.schedules.is_empty() {
        let config = config.clone();
        std::thread::spawn(move || ticker::run(&config, table));
    }
    let db = Arc::new(Mutex::new(Database {
        client: None,
        stats: None,
    }));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let server = Arc::clone(&server);
            let db = Arc::clone(&db);
            let config = config.clone();
            std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    respond(request, table, &config, &db);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    0
}

fn respond(request: Request, table: &SlotTable, config: &Config, db: &Mutex<Database>) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let is_head = *request.method() == Method::Head;
    if !matches!(request.method(), Method::Get | Method::Head) {
        let _ = request.respond(
            text(405, "only GET and HEAD are allowed\n").with_header(header("Allow", "GET, HEAD")),
        );
        return;
    }
    let (code, body, content_type) = match path.as_str() {
        "/livez" | "/health" | "/healthz" => {
            let (ok, body) = liveness(table, config);
            (
                if ok { 200 } else { 503 },
                body.to_string(),
                "application/json",
            )
        }
        "/readyz" => {
            let (ok, body) = readiness(table, config, db);
            (
                if ok { 200 } else { 503 },
                body.to_string(),
                "application/json",
            )
        }
        "/metrics" => (200, metrics(table, config, db), "text/plain; version=0.0.4"),
        _ => (
            404,
            "not found: try /livez, /readyz or /metrics\n".to_string(),
            "text/plain",
        ),
    };
    let mut response = Response::from_string(if is_head { String::new() } else { body })
        .with_status_code(code)
        .with_header(header("Content-Type", content_type));
    if is_head {
        response = response.with_header(header("Cache-Control", "no-store"));
    }
    let _ = request.respond(response);
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn text(code: u16, body: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body).with_status_code(code)
}

/// Liveness from shared memory only: the supervisor loop turns, and every slot is progressing or
/// backing off after a crash within the stale window; it fails when a slot is crash-looping or
/// stale (DESIGN.md "Liveness semantics"). Returns (healthy, JSON body).
pub fn liveness(table: &SlotTable, config: &Config) -> (bool, Value) {
    let now = monotonic_ms();
    let stale_ms = config.health_stale.as_millis() as u64;
    let supervisor_age =
        now.saturating_sub(table.header.supervisor_heartbeat_ms.load(Ordering::Acquire));
    let mut alive = 0;
    let mut oldest_ms = 0u64;
    let mut crash_looping = Vec::new();
    let mut stale = Vec::new();
    let mut slots = Vec::new();
    for (index, slot) in table.active().iter().enumerate() {
        let state = slot.state();
        let age = slot.heartbeat_age_ms(now);
        let job = slot.job_id.load(Ordering::Acquire);
        if state.is_alive() {
            alive += 1;
        }
        // Backing off after a crash is legitimate only within the stale window: the age is that of
        // the slot's last real heartbeat (a re-fork never reseeds it), so a slot whose children
        // die or hang before their first poll turns red whatever state it is in between.
        oldest_ms = oldest_ms.max(age);
        if age > stale_ms {
            stale.push(index);
        }
        if slot.fast_crashes.load(Ordering::Acquire) >= config.crash_loop_threshold {
            crash_looping.push(index);
        }
        slots.push(json!({
            "slot": index,
            "pid": slot.pid.load(Ordering::Acquire),
            "state": state.name(),
            "seconds_since_heartbeat": age as f64 / 1000.0,
            "job_id": (job != 0).then_some(job),
            "seconds_in_job": (job != 0).then(|| now.saturating_sub(slot.job_started_ms.load(Ordering::Acquire)) as f64 / 1000.0),
            "restarts": slot.restarts.load(Ordering::Relaxed),
            "jobs_succeeded": slot.succeeded.load(Ordering::Relaxed),
            "claims": slot.claims.load(Ordering::Relaxed),
            "claim_turns_missed": slot.turns_missed.load(Ordering::Relaxed),
            "last_exit": last_exit(slot),
            "generation": slot.generation.load(Ordering::Acquire),
        }));
    }
    let check = if supervisor_age > stale_ms {
        "supervisor_stale"
    } else if !crash_looping.is_empty() {
        "crash_looping"
    } else if !stale.is_empty() {
        "stale"
    } else {
        "ok"
    };
    let healthy = check == "ok";
    (
        healthy,
        json!({
            "status": if healthy { "ok" } else { "fail" },
            "check": check,
            "oldest_child_seconds_since_heartbeat": oldest_ms as f64 / 1000.0,
            "stale_after_seconds": config.health_stale.as_secs(),
            "alive_children": alive,
            "concurrency": table.active().len(),
            "crash_looping": crash_looping,
            "stale": stale,
            "supervisor_seconds_since_heartbeat": supervisor_age as f64 / 1000.0,
            "slots": slots,
        }),
    )
}

/// How the previous occupant of a slot ended, for operators reading `/livez`; null before the
/// first death.
fn last_exit(slot: &crate::slots::Slot) -> Option<String> {
    let never_died = slot.generation.load(Ordering::Acquire) == 0
        || (slot.restarts.load(Ordering::Relaxed) == 0 && slot.pid.load(Ordering::Acquire) != 0);
    match slot.last_exit.load(Ordering::Acquire) {
        _ if never_died => None,
        code if code >= 0 => Some(format!("exited with status {code}")),
        signal => Some(format!("killed by signal {}", -signal)),
    }
}

/// Runs `f` with the probe's connection, opening it when needed and dropping it on failure.
/// Returns `None` at once when another request holds the connection, so a slow database makes
/// readiness fail fast instead of piling up requests.
fn with_database<T>(
    db: &Mutex<Database>,
    config: &Config,
    f: impl FnOnce(&mut postgres::Client, &mut Option<(Instant, String)>) -> Result<T, String>,
) -> Result<T, String> {
    let mut guard = db
        .try_lock()
        .map_err(|_| "another request is using the database connection".to_string())?;
    let state = &mut *guard;
    if state.client.as_ref().map_or(true, |c| c.is_closed()) {
        state.client = Some(
            queue::connect_with_timeout(
                &config.database_url,
                "forkq probe",
                Duration::from_secs(2),
            )
            .map_err(|e| e.to_string())?,
        );
    }
    let client = state.client.as_mut().expect("connected above");
    let result = f(client, &mut state.stats);
    if result.is_err() {
        state.client = None;
    }
    result
}

/// Readiness: not shutting down, the database answers and the schema is current.
fn readiness(table: &SlotTable, config: &Config, db: &Mutex<Database>) -> (bool, Value) {
    if table.header.shutting_down.load(Ordering::Acquire) {
        return (false, json!({"status": "fail", "check": "shutting_down"}));
    }
    match with_database(db, config, |client, _| {
        migrations::require_current(client, &config.schema).map_err(|e| e.to_string())
    }) {
        Ok(()) => (true, json!({"status": "ok", "check": "ok"})),
        Err(e) => (
            false,
            json!({"status": "fail", "check": "database", "error": e}),
        ),
    }
}

/// Prometheus text: fleet counters from shared memory, queue depth from the database (cached).
fn metrics(table: &SlotTable, config: &Config, db: &Mutex<Database>) -> String {
    let mut out = String::new();
    let slots = table.active();
    let sum = |f: &dyn Fn(&crate::slots::Slot) -> u64| slots.iter().map(f).sum::<u64>();
    let counters = [
        (
            "forkq_jobs_succeeded_total",
            "Jobs that succeeded.",
            sum(&|s| s.succeeded.load(Ordering::Relaxed)),
        ),
        (
            "forkq_jobs_failed_total",
            "Jobs that failed for good (dead-lettered).",
            sum(&|s| s.failed.load(Ordering::Relaxed)),
        ),
        (
            "forkq_jobs_retried_total",
            "Job runs that ended in a retry.",
            sum(&|s| s.retried.load(Ordering::Relaxed)),
        ),
        (
            "forkq_claims_total",
            "Claim round trips to the database (an idle fleet makes one per poll interval).",
            sum(&|s| s.claims.load(Ordering::Relaxed)),
        ),
        (
            "forkq_claim_turns_missed_total",
            "Claim round trips that found every claim turn of the fleet taken (FORKQ_CLAIMERS).",
            sum(&|s| s.turns_missed.load(Ordering::Relaxed)),
        ),
        (
            "forkq_child_restarts_total",
            "Children re-forked after they exited.",
            sum(&|s| s.restarts.load(Ordering::Relaxed)),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let alive = slots.iter().filter(|s| s.state().is_alive()).count();
    let looping = slots
        .iter()
        .filter(|s| s.fast_crashes.load(Ordering::Acquire) >= config.crash_loop_threshold)
        .count();
    let busy = slots
        .iter()
        .filter(|s| s.state() == SlotState::Running)
        .count();
    let stale = liveness(table, config).1["stale"]
        .as_array()
        .map_or(0, Vec::len);
    for (name, help, value) in [
        ("forkq_children_alive", "Children alive now.", alive),
        ("forkq_children_busy", "Children running a job now.", busy),
        (
            "forkq_concurrency",
            "Children the fleet should have.",
            slots.len(),
        ),
        (
            "forkq_crash_looping_slots",
            "Slots that are crash-looping.",
            looping,
        ),
        (
            "forkq_stale_slots",
            "Slots whose heartbeat is older than FORKQ_HEALTH_STALE_SECONDS.",
            stale,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let _ = writeln!(out, "# HELP forkq_job_duration_seconds Time handlers spent on jobs.\n# TYPE forkq_job_duration_seconds histogram");
    let mut cumulative = 0u64;
    for (bucket, upper) in LATENCY_BUCKETS_MS.iter().enumerate() {
        cumulative += sum(&|s| s.duration_buckets[bucket].load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "forkq_job_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *upper as f64 / 1000.0
        );
    }
    cumulative += sum(&|s| s.duration_buckets[LATENCY_BUCKETS_MS.len()].load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "forkq_job_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "forkq_job_duration_seconds_sum {}",
        sum(&|s| s.duration_sum_us.load(Ordering::Relaxed)) as f64 / 1e6
    );
    let _ = writeln!(out, "forkq_job_duration_seconds_count {cumulative}");
    let _ = writeln!(
        out,
        "# HELP forkq_queue_consumers Children of this host consuming the queue.\n# TYPE forkq_queue_consumers gauge"
    );
    for queue in &config.queues {
        let _ = writeln!(
            out,
            "forkq_queue_consumers{{queue=\"{}\"}} {alive}",
            escape_label(queue)
        );
    }
    match with_database(db, config, |client, cache| {
        queue_metrics(client, config, cache)
    }) {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(out, "# queue metrics unavailable: {}", e.replace('\n', " "));
        }
    }
    out
}

fn queue_metrics(
    client: &mut postgres::Client,
    config: &Config,
    cache: &mut Option<(Instant, String)>,
) -> Result<String, String> {
    if let Some((at, text)) = cache {
        if at.elapsed() < QUEUE_STATS_TTL {
            return Ok(text.clone());
        }
    }
    let mut status = admin::status(client, &config.schema, false).map_err(|e| e.to_string())?;
    // The queues this daemon serves keep their series (at 0) when they hold nothing: a gauge
    // that vanishes reads as "no data", not as "empty".
    for queue in &config.queues {
        status.entry(queue.clone()).or_default();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP forkq_queue_jobs Jobs per queue and state (completed jobs are not counted here: \
         see forkq_jobs_succeeded_total).\n# TYPE forkq_queue_jobs gauge"
    );
    for (queue, counts) in &status {
        for state in admin::STATES.iter().filter(|&&s| s != "completed") {
            let _ = writeln!(
                out,
                "forkq_queue_jobs{{queue=\"{}\",state=\"{state}\"}} {}",
                escape_label(queue),
                counts.count(state)
            );
        }
    }
    let _ = writeln!(out, "# HELP forkq_queue_oldest_available_seconds Age of the oldest job that could run now.\n# TYPE forkq_queue_oldest_available_seconds gauge");
    for (queue, counts) in &status {
        let _ = writeln!(
            out,
            "forkq_queue_oldest_available_seconds{{queue=\"{}\"}} {}",
            escape_label(queue),
            counts.oldest_available_seconds
        );
    }
    let settings = queues::settings(client, &config.schema).map_err(|e| e.to_string())?;
    let _ = writeln!(out, "# HELP forkq_queue_paused Whether the queue is paused (1) or not (0); only queues with settings are listed.\n# TYPE forkq_queue_paused gauge");
    for (queue, s) in &settings {
        let _ = writeln!(
            out,
            "forkq_queue_paused{{queue=\"{}\"}} {}",
            escape_label(queue),
            u8::from(s.paused)
        );
    }
    *cache = Some((Instant::now(), out.clone()));
    Ok(out)
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
