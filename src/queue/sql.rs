//! Every SQL statement forkq sends, in one place.
//!
//! Statements are templates: `{s}` is the quoted schema and `{c}` the notification channel, both
//! derived from `FORKQ_SCHEMA` (a validated identifier). Values always travel as bind parameters;
//! nothing from a job or a command line is ever spliced into SQL text.

/// Fills in the schema and channel of a template.
pub fn render(template: &str, schema: &str) -> String {
    template
        .replace("{s}", &format!("\"{schema}\""))
        .replace("{c}", &channel(schema))
}

/// A stable advisory-lock key for `purpose` in `schema`, so work on one schema serialises while
/// other schemas (parallel tests, tenants) do not. FNV-1a: stable across builds and platforms.
pub fn advisory_key(purpose: &str, schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"forkq."
        .iter()
        .chain(purpose.as_bytes())
        .chain(b".")
        .chain(schema.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// The LISTEN/NOTIFY channel of a schema.
pub fn channel(schema: &str) -> String {
    format!("forkq_{schema}")
}

/// Enqueues one job through the SQL function that every producer shares; answers its id and
/// whether it was created or replaced (see `enqueue_job` in the migration).
/// `$5` is an RFC 3339 text and `$6` a delay in seconds; at most one of them is non-null.
/// `$10` is a unique window in seconds.
pub const ENQUEUE: &str = "
    SELECT id, created, replaced
    FROM {s}.enqueue_job($1, $2, $3, $4,
                         coalesce($5::text::timestamptz, now() + make_interval(secs => $6::float8)),
                         $7, $8, $9, make_interval(secs => $10::float8), $11)";

/// Enqueues many jobs in one statement; unique keys that are live already are skipped. Answers
/// how many were inserted. Jobs with a unique window or `replace` go through
/// [`ENQUEUE_EACH`] instead.
pub const ENQUEUE_MANY: &str = "
    WITH input AS (
        SELECT queue, task, payload, priority,
               coalesce(run_at_text::timestamptz, now() + make_interval(secs => delay)) AS run_at,
               max_attempts, unique_key, batch_id
        FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[], $5::text[],
                    $6::float8[], $7::int[], $8::text[], $9::bigint[])
            AS a(queue, task, payload, priority, run_at_text, delay, max_attempts, unique_key,
                 batch_id)
    ), inserted AS (
        INSERT INTO {s}.jobs (queue, task, payload, priority, state, run_at, max_attempts,
                              unique_key, batch_id)
        SELECT queue, task, payload, priority,
               CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END,
               coalesce(run_at, now()), max_attempts, unique_key, batch_id
        FROM input
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING queue
    )
    SELECT count(*) FROM inserted";

/// Enqueues many jobs one by one, in order, through `enqueue_job` (for unique windows and
/// `replace`); answers how many were created and how many replaced a waiting job.
pub const ENQUEUE_EACH: &str = "
    SELECT count(*) FILTER (WHERE e.created), count(*) FILTER (WHERE e.replaced)
    FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[], $5::text[],
                $6::float8[], $7::int[], $8::text[], $9::bigint[], $10::float8[], $11::bool[])
            WITH ORDINALITY
            AS a(queue, task, payload, priority, run_at_text, delay, max_attempts, unique_key,
                 batch_id, unique_for, replace, n),
         LATERAL {s}.enqueue_job(a.queue, a.task, a.payload, a.priority,
                                 coalesce(a.run_at_text::timestamptz,
                                          now() + make_interval(secs => a.delay)),
                                 a.max_attempts, a.unique_key, a.batch_id,
                                 make_interval(secs => a.unique_for), a.replace) e";

/// Wakes idle workers once the enqueuing transaction commits.
pub const NOTIFY: &str = "SELECT pg_notify('{c}', $1)";

/// Settles the previous round and claims the next (see `settle_and_claim` in the migration).
pub const SETTLE_AND_CLAIM: &str = "
    SELECT id, queue, task, payload, attempt, max_attempts, lease_token, batch_id, refused
    FROM {s}.settle_and_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Renews every lease `owner` holds; returns the ids still held.
pub const RENEW: &str = "
    UPDATE {s}.jobs SET lease_expires_at = now() + make_interval(secs => $2)
    WHERE lease_owner = $1 AND state = 'running'
    RETURNING id";

/// Gives back the jobs `owner` holds (see `release` in the migration).
pub const RELEASE: &str = "SELECT {s}.release($1, $2, $3, $4)";

/// Returns expired leases to the queue.
pub const RESCUE_EXPIRED: &str = "SELECT {s}.rescue_expired($1)";

/// Marks due scheduled and retryable jobs available, so status shows what can run now.
pub const PROMOTE_DUE: &str = "
    UPDATE {s}.jobs SET state = 'available'
    WHERE id IN (SELECT id FROM {s}.jobs
                 WHERE state IN ('scheduled', 'retryable') AND run_at <= now()
                 LIMIT 10000 FOR UPDATE SKIP LOCKED)";

/// Deletes completed and cancelled jobs older than the retention, a bounded chunk at a time.
/// Children of open batches are kept: they are the rows the batch repair recomputes from.
pub const PURGE_EXPIRED_ARCHIVE: &str = "
    DELETE FROM {s}.jobs_archive
    WHERE id IN (SELECT a.id FROM {s}.jobs_archive a
                 WHERE a.state <> 'failed' AND a.finished_at < now() - make_interval(secs => $1)
                   AND (a.batch_id IS NULL
                        OR NOT EXISTS (SELECT 1 FROM {s}.batches b
                                       WHERE b.id = a.batch_id AND b.state = 'open'))
                 LIMIT 10000)";

/// Deletes unique windows that expired, a bounded chunk at a time (an enqueue of the key takes an
/// expired window over anyway; this keeps keys that never come back from piling up).
pub const PURGE_EXPIRED_WINDOWS: &str = "
    DELETE FROM {s}.unique_windows
    WHERE key IN (SELECT key FROM {s}.unique_windows WHERE expires_at < now()
                  LIMIT 10000 FOR UPDATE SKIP LOCKED)";

/// Takes the maintenance lock for the rest of the transaction, if no one else holds it.
pub const TRY_MAINTENANCE_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// Counts jobs per queue and effective state (a due scheduled job counts as available).
pub const STATUS_COUNTS: &str = "
    SELECT queue,
           CASE WHEN state IN ('scheduled', 'retryable') AND run_at <= now() THEN 'available'
                ELSE state END AS state,
           count(*)
    FROM {s}.jobs GROUP BY 1, 2
    UNION ALL
    SELECT queue, state, count(*) FROM {s}.jobs_archive GROUP BY 1, 2";

/// The age in seconds of the oldest job that could run now, per queue.
pub const OLDEST_AVAILABLE: &str = "
    SELECT queue, extract(epoch FROM now() - min(run_at))::float8
    FROM {s}.jobs WHERE state <> 'running' AND run_at <= now() GROUP BY queue";

/// One job, live or archived, as JSON.
pub const JOB_BY_ID: &str = "
    SELECT to_jsonb(j) - 'lease_token' FROM {s}.jobs j WHERE j.id = $1
    UNION ALL
    SELECT to_jsonb(a) FROM {s}.jobs_archive a WHERE a.id = $1";

/// Cancels a job (see `cancel` in the migration).
pub const CANCEL: &str = "SELECT {s}.cancel($1, $2)";

/// Retries a failed or cancelled job (see `retry` in the migration).
pub const RETRY: &str = "SELECT {s}.retry($1)";

/// Retries every failed job of a queue; returns how many moved.
pub const RETRY_FAILED_IN_QUEUE: &str = "
    SELECT count(*) FILTER (WHERE {s}.retry(id))
    FROM (SELECT id FROM {s}.jobs_archive WHERE queue = $1 AND state = 'failed' ORDER BY id) f";

/// Readiness: the database answers and the schema is at the version the code expects.
pub const SCHEMA_VERSION: &str = "SELECT coalesce(max(version), 0) FROM {s}.schema_migrations";

/// Opens an empty batch (see `batch_open` in the migration); returns its id.
pub const BATCH_OPEN: &str = "SELECT {s}.batch_open($1, $2, $3, $4)";

/// Counts the batch's children, sets its totals, completes it when empty; returns the count.
pub const BATCH_SEAL: &str = "SELECT {s}.batch_seal($1)";

/// One batch's state and counters.
pub const BATCH_STATUS: &str = "
    SELECT id, queue, state, total, pending, succeeded, failed, cancelled, fail_fast,
           completion_job_id, created_at::text, finished_at::text
    FROM {s}.batches WHERE id = $1";

/// The newest batches, optionally in one state.
pub const BATCH_LIST: &str = "
    SELECT id, queue, state, total, pending, succeeded, failed, cancelled, fail_fast,
           completion_job_id, created_at::text, finished_at::text
    FROM {s}.batches WHERE $1::text IS NULL OR state = $1
    ORDER BY id DESC LIMIT $2";

/// Cancels a batch (see `batch_cancel` in the migration).
pub const BATCH_CANCEL: &str = "SELECT state, changed FROM {s}.batch_cancel($1, $2)";

/// Repairs open batches whose counters disagree with their children (see `batch_repair`).
pub const BATCH_REPAIR: &str = "
    SELECT batch_id, old_counts, new_counts FROM {s}.batch_repair($1, $2)";

/// Declares a daemon's schedules (see `schedule_declare` in the migration): $1 names, $2
/// definitions, $3 the daemon's start time (RFC 3339), $4 who declares. Answers what the database
/// holds for those names, in the columns of [`SCHEDULE_STATE`].
pub const SCHEDULE_DECLARE: &str =
    "SELECT * FROM {s}.schedule_declare($1, $2, $3::text::timestamptz, $4)";

/// The schedules named in $1 (every one when null): name, definition, revision, declared_by,
/// declared_at, ticks_after, last_tick_at, last_run_at (seconds since the epoch), last_job_id.
pub const SCHEDULE_STATE: &str = "SELECT * FROM {s}.schedule_state($1)";

/// Enqueues due ticks (see `schedule_fire` in the migration): $1 names, $2 ticks (RFC 3339),
/// $3 revisions, sorted by name then tick. Answers the job enqueued (null when the tick was
/// enqueued already) and the schedule's revision (null when it is gone), per tick.
pub const SCHEDULE_FIRE: &str = "
    SELECT job_id, revision FROM {s}.schedule_fire($1, $2::text[]::timestamptz[], $3)";

/// Enqueues one run of a schedule now; answers the job id, null when there is no such schedule.
pub const SCHEDULE_RUN: &str = "SELECT {s}.schedule_run($1)";
