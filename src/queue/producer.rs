//! Producers: validated jobs into the queue, one at a time, in bulk, or inside the caller's
//! own transaction.

use std::time::Duration;

use postgres::types::{ToSql, Type};
use postgres::GenericClient;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::sql::{self, render};
use super::QueueError;
use crate::config::is_valid_queue_name;

/// A job to enqueue. Build with [`NewJob::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// The queue; taken from the command line for JSON-lines input when absent.
    #[serde(default)]
    pub queue: String,
    /// The task name, which picks the handler.
    pub task: String,
    /// Any JSON value.
    #[serde(default = "empty_object")]
    pub payload: Value,
    /// Lower runs first (-32768..=32767, default 0).
    #[serde(default)]
    pub priority: i16,
    /// Run no earlier than this RFC 3339 time.
    #[serde(default)]
    pub run_at: Option<String>,
    /// Run no earlier than this many seconds from now (instead of `run_at`).
    #[serde(default)]
    pub delay: Option<f64>,
    /// Attempts before the dead letter; the daemon's `FORKQ_MAX_ATTEMPTS` when absent.
    #[serde(default)]
    pub max_attempts: Option<i32>,
    /// While a live job has this key, enqueueing another returns the existing job's id.
    #[serde(default)]
    pub unique_key: Option<String>,
    /// With `unique_key`: the key stays taken this long after this job took it, whatever becomes
    /// of the job (in JSON: seconds, or a text such as "1h" or "90s").
    #[serde(default, deserialize_with = "duration_from_json")]
    pub unique_for: Option<Duration>,
    /// With `unique_key`: a waiting job holding the key gets this job's payload and run time
    /// instead of a second job being added (a running one gives the key up to this job).
    #[serde(default)]
    pub replace: bool,
    /// The key a per-key cap of its queue counts running jobs by (docs/flow-control.md).
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// This job's timeout in seconds, overriding `FORKQ_JOB_TIMEOUT_SECONDS`.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// This job's retry backoff base in seconds, overriding `FORKQ_RETRY_BACKOFF_BASE_SECONDS`.
    #[serde(default)]
    pub backoff_seconds: Option<f64>,
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The job: the new one, or the one that holds the unique key.
    pub id: i64,
    /// Whether a job was created; false when the key was taken, or a waiting job was replaced.
    pub created: bool,
    /// Whether the waiting job holding the key got the new payload and run time.
    pub replaced: bool,
}

/// What a bulk enqueue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Jobs created.
    pub created: u64,
    /// Jobs not created because their unique key was taken.
    pub duplicate: u64,
    /// Waiting jobs that got a new payload and run time (`replace`).
    pub replaced: u64,
}

/// Reads a duration as seconds (a JSON number) or as a text such as "1h", "30m" or "1h30m".
fn duration_from_json<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Seconds(f64),
        Text(String),
    }
    match Option::<Given>::deserialize(d)? {
        None => Ok(None),
        Some(Given::Seconds(s)) => Duration::try_from_secs_f64(s)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s} is not a duration in seconds"))),
        Some(Given::Text(text)) => parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Parses a duration such as "90s", "30m", "1h30m", "1d" (24 hours), "1w" or "PT1H" (ISO 8601).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<jiff::Span>()
        .ok()
        .and_then(|span| {
            span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
                .ok()
        })
        .and_then(|d| Duration::try_from(d).ok())
        .ok_or_else(|| format!("{text:?} is not a duration; use one such as 90s, 30m, 1h30m or 1d"))
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl NewJob {
    /// A job for `task` on `queue` with `payload` and default options.
    pub fn new(queue: impl Into<String>, task: impl Into<String>, payload: Value) -> NewJob {
        NewJob {
            queue: queue.into(),
            task: task.into(),
            payload,
            priority: 0,
            run_at: None,
            delay: None,
            max_attempts: None,
            unique_key: None,
            unique_for: None,
            replace: false,
            concurrency_key: None,
            timeout_seconds: None,
            backoff_seconds: None,
        }
    }

    /// Sets the priority (lower runs first).
    pub fn with_priority(mut self, priority: i16) -> NewJob {
        self.priority = priority;
        self
    }

    /// Delays the first run by `seconds`.
    pub fn with_delay(mut self, seconds: f64) -> NewJob {
        self.delay = Some(seconds);
        self
    }

    /// Sets the first run time (RFC 3339).
    pub fn with_run_at(mut self, run_at: impl Into<String>) -> NewJob {
        self.run_at = Some(run_at.into());
        self
    }

    /// Sets the number of attempts.
    pub fn with_max_attempts(mut self, max_attempts: i32) -> NewJob {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// Sets a unique key.
    pub fn with_unique_key(mut self, key: impl Into<String>) -> NewJob {
        self.unique_key = Some(key.into());
        self
    }

    /// Keeps the unique key taken for `window` after this job takes it, whatever becomes of the
    /// job meanwhile (needs a unique key).
    pub fn with_unique_for(mut self, window: Duration) -> NewJob {
        self.unique_for = Some(window);
        self
    }

    /// Replaces the payload and run time of the waiting job holding the unique key instead of
    /// adding a job (debounce; needs a unique key).
    pub fn with_replace(mut self) -> NewJob {
        self.replace = true;
        self
    }

    /// Sets the concurrency key: a per-key cap of the queue (`forkq queue set Q --per-key N`)
    /// limits how many jobs with the same key run at once across the fleet.
    pub fn with_concurrency_key(mut self, key: impl Into<String>) -> NewJob {
        self.concurrency_key = Some(key.into());
        self
    }

    /// Sets this job's own timeout (instead of `FORKQ_JOB_TIMEOUT_SECONDS`).
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> NewJob {
        self.timeout_seconds = Some(timeout.as_secs_f64());
        self
    }

    /// Sets this job's own retry backoff base (instead of `FORKQ_RETRY_BACKOFF_BASE_SECONDS`):
    /// the first retry waits about this long, each further one twice as long.
    pub fn with_backoff(mut self, base: std::time::Duration) -> NewJob {
        self.backoff_seconds = Some(base.as_secs_f64());
        self
    }
}

/// Limits applied to every job before it reaches the database.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload, in bytes of compact JSON.
    pub max_payload_bytes: usize,
    /// Attempts for jobs that do not say.
    pub default_max_attempts: i32,
}

/// A job that passed validation, in the shape the SQL wants.
struct Row {
    queue: String,
    task: String,
    payload: Value,
    priority: i16,
    run_at: Option<String>,
    delay: Option<f64>,
    max_attempts: i32,
    unique_key: Option<String>,
    unique_for: Option<f64>,
    replace: bool,
    concurrency_key: Option<String>,
    timeout_seconds: Option<f64>,
    backoff_seconds: Option<f64>,
    /// The payload's size as compact JSON.
    payload_bytes: usize,
}

impl Row {
    /// Whether the row needs `enqueue_job` itself (a unique window or a replace) rather than the
    /// bulk insert.
    fn needs_function(&self) -> bool {
        self.unique_for.is_some() || self.replace
    }
}

fn check_text(what: &str, value: &str, max: usize) -> Result<(), QueueError> {
    if value.is_empty() {
        return Err(QueueError::InvalidJob(format!("the {what} is empty")));
    }
    if value.len() > max {
        return Err(QueueError::InvalidJob(format!(
            "the {what} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(QueueError::InvalidJob(format!(
            "the {what} contains a NUL character, which PostgreSQL text cannot store"
        )));
    }
    Ok(())
}

/// PostgreSQL's jsonb cannot hold `\u0000` in strings; find one before the database refuses.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// Whether `text` has the shape of an RFC 3339 date-time with an explicit offset, so that
/// PostgreSQL's far looser input syntax ('tomorrow', 'infinity', a time without a zone read in the
/// server's time zone) never decides when a job runs. PostgreSQL still checks the calendar.
fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |from: usize, to: usize| {
        b.get(from..to)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let shape = digits(0, 4)
        && b.get(4) == Some(&b'-')
        && digits(5, 7)
        && b.get(7) == Some(&b'-')
        && digits(8, 10)
        && matches!(b.get(10), Some(b'T' | b't' | b' '))
        && digits(11, 13)
        && b.get(13) == Some(&b':')
        && digits(14, 16)
        && b.get(16) == Some(&b':')
        && digits(17, 19);
    if !shape {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn validate(job: &NewJob, limits: &Limits) -> Result<Row, QueueError> {
    if !is_valid_queue_name(&job.queue) {
        return Err(QueueError::InvalidJob(format!(
            "queue name {:?} is not allowed: use 1-128 bytes without spaces, commas or control characters",
            job.queue
        )));
    }
    check_text("task name", &job.task, 256)?;
    if job.task.chars().any(char::is_control) {
        return Err(QueueError::InvalidJob(format!(
            "task name {:?} contains control characters",
            job.task
        )));
    }
    let size = serde_json::to_vec(&job.payload)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limits.max_payload_bytes {
        return Err(QueueError::InvalidJob(format!(
            "the payload is {size} bytes; the limit is {} (FORKQ_MAX_PAYLOAD_BYTES). \
             Store large data elsewhere and enqueue a reference to it",
            limits.max_payload_bytes
        )));
    }
    if contains_nul(&job.payload) {
        return Err(QueueError::InvalidJob(
            "the payload contains \\u0000, which PostgreSQL jsonb cannot store".into(),
        ));
    }
    if let Some(key) = &job.unique_key {
        check_text("unique key", key, 1024)?;
    }
    if job.unique_key.is_none() && (job.unique_for.is_some() || job.replace) {
        return Err(QueueError::InvalidJob(
            "unique_for and replace need a unique_key".into(),
        ));
    }
    if job.unique_for.is_some() && job.replace {
        return Err(QueueError::InvalidJob(
            "give unique_for or replace, not both: a window keeps the first job, replace the last"
                .into(),
        ));
    }
    if let Some(window) = job.unique_for {
        if window < Duration::from_secs(1) || window > Duration::from_secs(10 * 365 * 86_400) {
            return Err(QueueError::InvalidJob(format!(
                "unique_for is {window:?}; use one second to ten years"
            )));
        }
    }
    let max_attempts = job.max_attempts.unwrap_or(limits.default_max_attempts);
    if !(1..=1000).contains(&max_attempts) {
        return Err(QueueError::InvalidJob(format!(
            "max_attempts is {max_attempts}; use 1 to 1000"
        )));
    }
    if let Some(at) = &job.run_at {
        if !is_rfc3339(at) {
            return Err(QueueError::InvalidJob(format!(
                "run_at {at:?} is not an RFC 3339 time; use one such as 2030-01-31T09:00:00Z \
                 (Z or an offset like +02:00)"
            )));
        }
    }
    if job.run_at.is_some() && job.delay.is_some() {
        return Err(QueueError::InvalidJob(
            "give either run_at or delay, not both".into(),
        ));
    }
    if let Some(delay) = job.delay {
        if !(0.0..=10.0 * 365.0 * 86_400.0).contains(&delay) {
            return Err(QueueError::InvalidJob(format!(
                "delay is {delay} seconds; use 0 to ten years"
            )));
        }
    }
    if let Some(key) = &job.concurrency_key {
        check_text("concurrency key", key, 256)?;
    }
    // The same bounds as check_job_options() in the schema.
    if let Some(t) = job.timeout_seconds {
        if !(0.001..=604_800.0).contains(&t) {
            return Err(QueueError::InvalidJob(format!(
                "timeout is {t} seconds; use more than 0 and at most 604800 (7 days)"
            )));
        }
    }
    if let Some(b) = job.backoff_seconds {
        if !(0.0..=2_592_000.0).contains(&b) {
            return Err(QueueError::InvalidJob(format!(
                "backoff is {b} seconds; use 0 to 2592000 (30 days)"
            )));
        }
    }
    Ok(Row {
        queue: job.queue.clone(),
        task: job.task.clone(),
        payload: job.payload.clone(),
        priority: job.priority,
        run_at: job.run_at.clone(),
        delay: job.delay,
        max_attempts,
        unique_key: job.unique_key.clone(),
        unique_for: job.unique_for.map(|d| d.as_secs_f64()),
        replace: job.replace,
        concurrency_key: job.concurrency_key.clone(),
        timeout_seconds: job.timeout_seconds,
        backoff_seconds: job.backoff_seconds,
        payload_bytes: size,
    })
}

/// Checks `job` against `limits` exactly as the enqueue paths do, without enqueueing it (the batch
/// module checks a completion job up front this way).
pub(crate) fn check(job: &NewJob, limits: &Limits) -> Result<(), QueueError> {
    validate(job, limits).map(|_| ())
}

/// Enqueues one job through `client`, which may be the caller's own transaction: then the job
/// is committed with the caller's rows or not at all, and workers are woken only after commit.
/// Returns the job id (the existing job's id when its unique key is taken).
pub fn enqueue(
    client: &mut impl GenericClient,
    schema: &str,
    limits: &Limits,
    job: &NewJob,
) -> Result<i64, QueueError> {
    enqueue_with_outcome(client, schema, limits, job).map(|e| e.id)
}

/// [`enqueue`], saying also whether the job was created, or which job holds its unique key.
pub fn enqueue_with_outcome(
    client: &mut impl GenericClient,
    schema: &str,
    limits: &Limits,
    job: &NewJob,
) -> Result<Enqueued, QueueError> {
    let row = validate(job, limits)?;
    let priority = i32::from(row.priority);
    let batch_id: Option<i64> = None;
    // Typed parameters let the statement go out with its values in one round trip, without a
    // separate prepare: a single enqueue is latency-bound, and the caller's client (often a
    // transaction) has nowhere to cache a prepared statement.
    let params: [(&(dyn ToSql + Sync), Type); 14] = [
        (&row.queue, Type::TEXT),
        (&row.task, Type::TEXT),
        (&row.payload, Type::JSONB),
        (&priority, Type::INT4),
        (&row.run_at, Type::TEXT),
        (&row.delay, Type::FLOAT8),
        (&row.max_attempts, Type::INT4),
        (&row.unique_key, Type::TEXT),
        (&batch_id, Type::INT8),
        (&row.unique_for, Type::FLOAT8),
        (&row.replace, Type::BOOL),
        (&row.concurrency_key, Type::TEXT),
        (&row.timeout_seconds, Type::FLOAT8),
        (&row.backoff_seconds, Type::FLOAT8),
    ];
    client
        .query_typed_one(&render(sql::ENQUEUE, schema), &params)
        .and_then(|r| {
            Ok(Enqueued {
                id: r.try_get(0)?,
                created: r.try_get(1)?,
                replaced: r.try_get(2)?,
            })
        })
        .map_err(|e| bad_time(e, &row.run_at))
}

/// Turns PostgreSQL's refusal of a run_at text into a clear error about that value.
fn bad_time(e: postgres::Error, run_at: &Option<String>) -> QueueError {
    let is_datetime_error = e
        .as_db_error()
        .is_some_and(|db| db.code().code().starts_with("22007") || db.code().code() == "22008");
    match run_at {
        Some(at) if is_datetime_error => QueueError::InvalidJob(format!(
            "run_at {at:?} is not a time PostgreSQL understands; use RFC 3339 such as 2030-01-31T09:00:00Z"
        )),
        _ => QueueError::Db(e),
    }
}

/// A JSON-lines input that was refused, with the line at fault. Nothing of it was enqueued.
#[derive(Debug)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

/// Reads JSON-lines jobs (`{"task":..,"payload":..}` plus the optional [`NewJob`] fields) one line
/// at a time and validates each, so an input of any size is read in bounded memory. Blank lines
/// are skipped; jobs that name no queue get the default queue. Yields the first refused line as
/// an error and nothing after it.
pub struct JsonLines<R> {
    reader: R,
    default_queue: String,
    limits: Limits,
    line: usize,
    bytes_read: u64,
    buffer: String,
    failed: bool,
}

impl<R: std::io::BufRead> JsonLines<R> {
    /// Jobs from `reader`; `default_queue` fills in jobs that name none.
    pub fn new(reader: R, default_queue: &str, limits: &Limits) -> JsonLines<R> {
        JsonLines {
            reader,
            default_queue: default_queue.to_string(),
            limits: *limits,
            line: 0,
            bytes_read: 0,
            buffer: String::new(),
            failed: false,
        }
    }

    /// Bytes read so far (for progress against the input's size).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    fn next_job(&mut self) -> Result<Option<NewJob>, LineError> {
        loop {
            self.buffer.clear();
            let fail = |line, reason: String| LineError { line, reason };
            let n = self
                .reader
                .read_line(&mut self.buffer)
                .map_err(|e| fail(self.line + 1, format!("cannot read: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.bytes_read += n as u64;
            if self.buffer.trim().is_empty() {
                continue;
            }
            let mut job: NewJob =
                serde_json::from_str(&self.buffer).map_err(|e| fail(self.line, e.to_string()))?;
            if job.queue.is_empty() {
                job.queue.clone_from(&self.default_queue);
            }
            validate(&job, &self.limits).map_err(|e| fail(self.line, e.to_string()))?;
            return Ok(Some(job));
        }
    }
}

impl<R: std::io::BufRead> Iterator for JsonLines<R> {
    type Item = Result<NewJob, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_job().transpose();
        self.failed = matches!(next, Some(Err(_)));
        next
    }
}

/// Parses and validates JSON lines held in memory (see [`JsonLines`]).
pub fn parse_jsonl(input: &str, queue: &str, limits: &Limits) -> Result<Vec<NewJob>, LineError> {
    JsonLines::new(input.as_bytes(), queue, limits).collect()
}

/// Rows per insert statement of [`BulkInsert`].
const CHUNK_ROWS: usize = 5_000;
/// Payload bytes per insert statement of [`BulkInsert`], so a chunk of large payloads stays small.
const CHUNK_BYTES: usize = 4 << 20;

/// Many jobs inserted in one transaction, a chunk of rows per statement, so the memory it holds
/// is bounded by one chunk however many jobs go through it. Nothing is visible to anyone until
/// [`BulkInsert::commit`]; dropped without it, everything is rolled back.
pub struct BulkInsert<'a> {
    tx: postgres::Transaction<'a>,
    /// The bulk insert ([`sql::ENQUEUE_MANY`]).
    insert: String,
    /// `enqueue_job` row by row ([`sql::ENQUEUE_EACH`]), for unique windows and `replace`.
    each: String,
    schema: String,
    limits: Limits,
    batch_id: Option<i64>,
    chunk: Vec<Row>,
    chunk_bytes: usize,
    pushed: u64,
    counts: Counts,
}

impl<'a> BulkInsert<'a> {
    /// Opens the transaction inside `client` (a connection, or the caller's own transaction:
    /// then the jobs are committed with the caller's rows or not at all).
    pub fn begin(
        client: &'a mut impl GenericClient,
        schema: &str,
        limits: &Limits,
        batch_id: Option<i64>,
    ) -> Result<BulkInsert<'a>, QueueError> {
        Ok(BulkInsert {
            tx: client.transaction()?,
            insert: render(sql::ENQUEUE_MANY, schema),
            each: render(sql::ENQUEUE_EACH, schema),
            schema: schema.to_string(),
            limits: *limits,
            batch_id,
            chunk: Vec::new(),
            chunk_bytes: 0,
            pushed: 0,
            counts: Counts::default(),
        })
    }

    /// Validates `job` and adds it; a full chunk is sent to the database.
    pub fn push(&mut self, job: &NewJob) -> Result<(), QueueError> {
        let row = validate(job, &self.limits)?;
        self.chunk_bytes += row.payload_bytes;
        self.chunk.push(row);
        self.pushed += 1;
        if self.chunk.len() >= CHUNK_ROWS || self.chunk_bytes >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Jobs pushed so far.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Sends the chunk: each run of rows without a unique window or `replace` by the bulk insert,
    /// each run of rows with either through `enqueue_job` one by one (still one statement).
    fn flush(&mut self) -> Result<(), QueueError> {
        let chunk = std::mem::take(&mut self.chunk);
        self.chunk_bytes = 0;
        for run in chunk.chunk_by(|a, b| a.needs_function() == b.needs_function()) {
            let queues: Vec<&str> = run.iter().map(|r| r.queue.as_str()).collect();
            let tasks: Vec<&str> = run.iter().map(|r| r.task.as_str()).collect();
            let payloads: Vec<&Value> = run.iter().map(|r| &r.payload).collect();
            let priorities: Vec<i16> = run.iter().map(|r| r.priority).collect();
            let run_ats: Vec<Option<&str>> = run.iter().map(|r| r.run_at.as_deref()).collect();
            let delays: Vec<Option<f64>> = run.iter().map(|r| r.delay).collect();
            let attempts: Vec<i32> = run.iter().map(|r| r.max_attempts).collect();
            let keys: Vec<Option<&str>> = run.iter().map(|r| r.unique_key.as_deref()).collect();
            let batches: Vec<Option<i64>> = vec![self.batch_id; run.len()];
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
                (&queues, Type::TEXT_ARRAY),
                (&tasks, Type::TEXT_ARRAY),
                (&payloads, Type::JSONB_ARRAY),
                (&priorities, Type::INT2_ARRAY),
                (&run_ats, Type::TEXT_ARRAY),
                (&delays, Type::FLOAT8_ARRAY),
                (&attempts, Type::INT4_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&batches, Type::INT8_ARRAY),
            ];
            let windows: Vec<Option<f64>> = run.iter().map(|r| r.unique_for).collect();
            let replaces: Vec<bool> = run.iter().map(|r| r.replace).collect();
            let each = run[0].needs_function();
            if each {
                params.extend([
                    (&windows as &(dyn ToSql + Sync), Type::FLOAT8_ARRAY),
                    (&replaces, Type::BOOL_ARRAY),
                ]);
            }
            let concurrency_keys: Vec<Option<&str>> =
                run.iter().map(|r| r.concurrency_key.as_deref()).collect();
            let timeouts: Vec<Option<f64>> = run.iter().map(|r| r.timeout_seconds).collect();
            let backoffs: Vec<Option<f64>> = run.iter().map(|r| r.backoff_seconds).collect();
            params.extend([
                (&concurrency_keys as &(dyn ToSql + Sync), Type::TEXT_ARRAY),
                (&timeouts, Type::FLOAT8_ARRAY),
                (&backoffs, Type::FLOAT8_ARRAY),
            ]);
            let row = self
                .tx
                .query_typed_one(if each { &self.each } else { &self.insert }, &params)
                .map_err(|e| bad_time(e, &run.iter().find_map(|r| r.run_at.clone())))?;
            let created = row.get::<_, i64>(0) as u64;
            // The bulk insert never replaces: it answers only the jobs it created.
            let replaced = if each { row.get::<_, i64>(1) as u64 } else { 0 };
            self.counts.created += created;
            self.counts.replaced += replaced;
            self.counts.duplicate += run.len() as u64 - created - replaced;
        }
        Ok(())
    }

    /// Sends the last chunk, wakes the workers (on commit) and commits. Returns how many jobs
    /// were created, how many were not because their unique key was taken, and how many waiting
    /// jobs were replaced.
    pub fn commit(mut self) -> Result<Counts, QueueError> {
        self.flush()?;
        if self.counts.created + self.counts.replaced > 0 {
            self.tx
                .query_typed(&render(sql::NOTIFY, &self.schema), &[(&"", Type::TEXT)])?;
        }
        self.tx.commit()?;
        Ok(self.counts)
    }
}

/// Inserts `jobs` (built in code, or read with [`JsonLines`]) in one transaction owned by
/// `client` (which may itself be the caller's transaction) through a [`BulkInsert`]. Jobs whose
/// unique key is taken are skipped. Returns how many were created.
pub fn enqueue_many(
    client: &mut impl GenericClient,
    schema: &str,
    limits: &Limits,
    jobs: &[NewJob],
    batch_id: Option<i64>,
) -> Result<u64, QueueError> {
    let mut bulk = BulkInsert::begin(client, schema, limits, batch_id)?;
    for job in jobs {
        bulk.push(job)?;
    }
    Ok(bulk.commit()?.created)
}

#[cfg(test)]
mod tests {
    use super::{is_rfc3339, parse_duration, NewJob};
    use std::time::Duration;

    #[test]
    fn durations_read_as_people_write_them() {
        for (text, seconds) in [
            ("90s", 90),
            ("30m", 1800),
            ("1h30m", 5400),
            ("1.5h", 5400),
            ("2 hours", 7200),
            ("1d", 86_400),
            ("1w", 604_800),
            ("PT1H", 3600),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for bad in ["", "soon", "1", "-5m", "1 fortnight"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let line = r#"{"task":"t","unique_key":"k","unique_for":"1h"}"#;
        let job: NewJob = serde_json::from_str(line).unwrap();
        assert_eq!(job.unique_for, Some(Duration::from_secs(3600)));
        let job: NewJob =
            serde_json::from_str(r#"{"task":"t","unique_key":"k","unique_for":90}"#).unwrap();
        assert_eq!(job.unique_for, Some(Duration::from_secs(90)));
        assert!(serde_json::from_str::<NewJob>(r#"{"task":"t","unique_for":"soon"}"#).is_err());
    }

    #[test]
    fn run_at_must_be_rfc3339_with_an_offset() {
        for ok in [
            "2030-01-31T09:00:00Z",
            "2030-01-31t09:00:00z",
            "2030-01-31 09:00:00+02:00",
            "2030-01-31T09:00:00.123456-05:30",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "tomorrow",
            "infinity",
            "now",
            "2030-01-31T09:00:00",
            "2030-01-31",
            "2030-01-31T09:00Z",
            "2030-01-31T09:00:00.Z",
            "2030-01-31T09:00:00+0200",
            "2030-01-31T09:00:00Z trailing",
            "",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
