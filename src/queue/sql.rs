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

/// What the LISTEN/NOTIFY channel of a schema starts with.
pub const CHANNEL_PREFIX: &str = "forkq_";

/// The LISTEN/NOTIFY channel of a schema: an identifier too, so a schema name is bounded by it
/// (see [`crate::config::MAX_SCHEMA_BYTES`]).
pub fn channel(schema: &str) -> String {
    format!("{CHANNEL_PREFIX}{schema}")
}

/// Enqueues one job through the SQL function that every producer shares.
/// `$5` is an RFC 3339 text and `$6` a delay in seconds; at most one of them is non-null.
pub const ENQUEUE: &str = "
    SELECT {s}.enqueue($1, $2, $3, $4,
                       coalesce($5::text::timestamptz, now() + make_interval(secs => $6::float8)),
                       $7, $8, $9)";

/// Enqueues many jobs in one statement; unique keys that are live already are skipped.
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

/// What a session sees of the server's connections (see `queue::capacity`): the port the server
/// listens on, whether this session's backend was started within the last `$1` seconds (not a
/// pooled one), `max_connections`, the slots this role cannot use, the client connections in use
/// by others, and what the role's and the database's `CONNECTION LIMIT` leave (NULL: none).
/// Superusers may use the reserved slots and ignore the limits.
pub const CONNECTION_HEADROOM: &str = "
    SELECT current_setting('port')::int AS port,
           s.backend_start > now() - make_interval(secs => $1) AS own_session,
           current_setting('max_connections')::int AS max_connections,
           CASE WHEN r.rolsuper THEN 0
                ELSE current_setting('superuser_reserved_connections')::int
                     + coalesce(current_setting('reserved_connections', true), '0')::int
           END AS reserved,
           (SELECT count(*) FROM pg_stat_activity
            WHERE backend_type = 'client backend')::int - 1 AS in_use,
           CASE WHEN r.rolsuper OR r.rolconnlimit < 0 THEN NULL
                ELSE r.rolconnlimit + 1
                     - (SELECT count(*) FROM pg_stat_activity
                        WHERE usesysid = r.oid AND backend_type = 'client backend')::int
           END AS role_free,
           CASE WHEN r.rolsuper OR d.datconnlimit < 0 THEN NULL
                ELSE d.datconnlimit + 1
                     - (SELECT count(*) FROM pg_stat_activity
                        WHERE datid = d.oid AND backend_type = 'client backend')::int
           END AS database_free
    FROM pg_stat_activity s, pg_roles r, pg_database d
    WHERE s.pid = pg_backend_pid() AND r.rolname = current_user
      AND d.datname = current_database()";

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
