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

/// The lean round: settles plain completed jobs (fenced by lease token; archived when `$4`) and
/// claims up to `$9` jobs from the queues `$8` in one statement, with no procedural code in the
/// way. Jobs come back in index order per queue, not in claim order: the caller sorts them (by
/// queue position, priority, run_at, id). One extra row with a null id carries the acks refused
/// (stale leases; null when none) and the sum of `changes` (see the migration), which tells the
/// worker when to check its prefetched jobs for a cancel. Built by [`round`] for the number of
/// queues; `$1` ids, `$2` tokens, `$3` results, `$5` owner, `$6` this claim's lease token, `$7`
/// lease seconds.
const ROUND: &str = "
    WITH acked AS (
        SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[]) AS a(id, token, result)
    ), done AS (
        DELETE FROM {s}.jobs j USING acked a
        WHERE j.id = a.id AND j.lease_token = a.token AND j.id = ANY($1::bigint[])
        RETURNING j.id, j.queue, j.task, j.payload, j.priority, j.attempt, j.max_attempts,
                  j.unique_key, j.created_at, j.last_error, a.result
    ), archived AS (
        INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                      max_attempts, unique_key, created_at, last_error, result)
        SELECT id, queue, task, payload, priority, 'completed', attempt, max_attempts,
               unique_key, created_at, last_error, result
        FROM done WHERE $4::boolean
    ), claimed AS (
        UPDATE {s}.jobs j
        SET state = 'running', attempt = j.attempt + 1, lease_owner = $5::text,
            lease_token = $6::bigint,
            lease_expires_at = now() + make_interval(secs => $7::float8)
        WHERE j.id = ANY(ARRAY({pick}))
        RETURNING j.id, j.queue, j.task, j.payload, j.priority, j.run_at, j.attempt,
                  j.max_attempts, j.batch_id, j.expiries
    )
    SELECT id, queue, task, payload, priority, run_at, attempt, max_attempts, batch_id, expiries,
           NULL::bigint[] AS refused, NULL::bigint AS changes
    FROM claimed
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           CASE WHEN (SELECT count(*) FROM done) < cardinality($1::bigint[])
                THEN ARRAY(SELECT id FROM acked EXCEPT SELECT id FROM done) END,
           (SELECT coalesce(sum(weight), 0)::bigint FROM {s}.changes)";

/// One queue's pick: its first `$9` claimable jobs in claim order, locked, skipping rows others
/// hold. Served by `jobs_claim_idx` (equality on queue, then its exact order).
const PICK: &str = "SELECT c.id FROM {s}.jobs c
    WHERE c.queue = ($8::text[])[{n}] AND c.state = 'available'
    ORDER BY c.priority, c.run_at, c.id LIMIT $9::int FOR UPDATE SKIP LOCKED";

/// The lean round for `queues` queues, served strictly in the order given: each queue's pick
/// runs only while the ones before it left room.
pub fn round(queues: usize) -> String {
    let pick = if queues <= 1 {
        PICK.replace("{n}", "1")
    } else {
        let picks: Vec<String> = (1..=queues)
            .map(|n| {
                format!(
                    "SELECT id FROM ({}) q{n}",
                    PICK.replace("{n}", &n.to_string())
                )
            })
            .collect();
        format!("{} LIMIT $9::int", picks.join(" UNION ALL "))
    };
    ROUND.replace("{pick}", &pick)
}

/// Settles what the lean round does not: failures, retries, cancels and batch children (see
/// `settle` in the migration). Returns the ids refused (stale leases).
pub const SETTLE: &str = "SELECT {s}.settle($1, $2, $3, $4, $5, $6, $7)";

/// Renews the leases a worker holds and gives back anything else under its name (see `renew`).
pub const RENEW: &str = "SELECT id FROM {s}.renew($1, $2, $3, $4, $5, $6)";

/// Gives back the jobs `owner` holds (see `release` in the migration).
pub const RELEASE: &str = "SELECT {s}.release($1, $2, $3, $4)";

/// Reports the start of a suspect job (see `mark_started` in the migration).
pub const MARK_STARTED: &str = "SELECT {s}.mark_started($1, $2)";

/// Ends cancelled the prefetched jobs that must no longer run (see `drop_cancelled`).
pub const DROP_CANCELLED: &str = "SELECT {s}.drop_cancelled($1, $2, $3)";

/// Makes due scheduled and retryable jobs claimable (see `promote_due` in the migration).
pub const PROMOTE_DUE: &str = "SELECT {s}.promote_due($1)";

/// Returns expired leases to the queue.
pub const RESCUE_EXPIRED: &str = "SELECT {s}.rescue_expired($1)";

/// Folds old rows of the changes table into one.
pub const COMPACT_CHANGES: &str = "SELECT {s}.compact_changes()";

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
