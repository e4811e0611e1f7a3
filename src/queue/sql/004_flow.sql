-- Flow control (docs/flow-control.md): queues as rows (pause, fleet-wide caps, per-key caps, rate
-- limits), snoozing, progress and results to wait for. Everything here is opt-in: a queue without
-- a row, or whose row is neither paused nor limited, is served by the lean round (ROUND in sql.rs)
-- exactly as before, at the price of one probe of this table's primary key per queue and round.

-- One row per queue that has a setting; a queue needs no row (no row: not paused, no limits).
-- `gated` says the lean round must leave the queue alone: paused, or limited (a limited queue's
-- jobs are claimed one at a time by claim_limited(), which keeps its caps exact). The token
-- bucket of the rate limit lives here too: `tokens` as of `refilled_at`, refilled at `rate` per
-- second up to `burst`.
CREATE TABLE {s}.queues (
    name        text PRIMARY KEY CHECK (name <> '' AND octet_length(name) <= 128),
    paused      boolean NOT NULL DEFAULT false,
    max_running int CHECK (max_running >= 1),
    per_key     int CHECK (per_key >= 1),
    rate        float8 CHECK (rate > 0),
    burst       int NOT NULL DEFAULT 1 CHECK (burst >= 1),
    tokens      float8 NOT NULL DEFAULT 1,
    refilled_at timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    gated       boolean GENERATED ALWAYS AS (
                    paused OR max_running IS NOT NULL OR per_key IS NOT NULL OR rate IS NOT NULL
                ) STORED
);

-- Counts running jobs against a limited queue's caps: only jobs a limited claim took (or that
-- mark_limited() adopted), so lean claims never insert here (the predicate is false for them).
CREATE INDEX jobs_limited_idx ON {s}.jobs (queue, concurrency_key)
    WHERE state = 'running' AND limited;
-- The head of each concurrency key's waiting jobs, for the per-key claim's walk over keys. Only
-- jobs with a key are in it.
CREATE INDEX jobs_keyed_idx ON {s}.jobs (queue, concurrency_key, priority, run_at, id)
    WHERE state = 'available' AND concurrency_key IS NOT NULL;

-- The running jobs counted against queue p_queue's caps; with p_key, only those of that key.
CREATE FUNCTION {s}.running_limited(p_queue text, p_key text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM {s}.jobs r
    WHERE r.queue = p_queue AND (p_key IS NULL OR r.concurrency_key = p_key)
      AND r.state = 'running' AND r.limited
$$;

-- Counts against their queue's caps the running jobs of limited queues that a lean round took
-- (p_queue: of that queue only; null: of every queue with a cap): those claimed while the cap was
-- being set, whose claim had not yet seen it. queue_set() calls it for its queue at once, and the
-- maintenance pass for all, so the count cannot drift. Costs one probe when no queue has a cap.
-- Returns how many it adopted.
CREATE FUNCTION {s}.mark_limited(p_queue text) RETURNS int LANGUAGE sql AS $$
    WITH adopted AS (
        UPDATE {s}.jobs j SET limited = true
        WHERE j.id = ANY(ARRAY(
            SELECT r.id FROM {s}.jobs r
            JOIN {s}.queues g ON g.name = r.queue
            WHERE r.state = 'running' AND r.limited IS NOT TRUE
              AND (g.max_running IS NOT NULL OR g.per_key IS NOT NULL)
              AND (p_queue IS NULL OR r.queue = p_queue)
              AND EXISTS (SELECT 1 FROM {s}.queues c
                          WHERE c.max_running IS NOT NULL OR c.per_key IS NOT NULL)
            FOR UPDATE OF r SKIP LOCKED))
          AND j.state = 'running'
        RETURNING 1
    )
    SELECT count(*)::int FROM adopted
$$;

-- One setting of queue_set()'s object, checked: null when the key is absent or null (none), else
-- a number from p_min to p_max (a whole one when p_whole).
CREATE FUNCTION {s}.queue_setting(p_settings jsonb, p_key text, p_min float8, p_max float8,
                                  p_whole boolean)
RETURNS float8 LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v jsonb := p_settings -> p_key;
    n float8;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) <> 'number' THEN
        RAISE EXCEPTION 'forkq: queue setting % must be a number or null (none), not %', p_key, v
            USING ERRCODE = '22023';
    END IF;
    n := v::text::float8;
    IF n < p_min OR n > p_max OR (p_whole AND n <> trunc(n)) THEN
        RAISE EXCEPTION 'forkq: queue setting % is %; use % from % to %', p_key, v,
            CASE WHEN p_whole THEN 'a whole number' ELSE 'a number' END, p_min, p_max
            USING ERRCODE = '22023';
    END IF;
    RETURN n;
END
$$;

-- Changes queue p_queue's settings, creating its row if it has none (queues are implicit: naming
-- one is enough). p_settings is a JSON object of the settings to change, each a value or null for
-- none: {"paused": true|false, "max_running": N, "per_key": N, "rate": starts per second,
-- "burst": N}. All or nothing: a bad setting changes nothing. A changed rate or burst refills the
-- bucket. Workers notice at their next round (the changes count moves) and idle ones are woken.
-- Returns the row as it is now.
CREATE FUNCTION {s}.queue_set(p_queue text, p_settings jsonb) RETURNS {s}.queues
LANGUAGE plpgsql AS $$
DECLARE
    unknown text;
    changed {s}.queues;
BEGIN
    IF p_queue IS NULL OR p_queue = '' OR octet_length(p_queue) > 128 THEN
        RAISE EXCEPTION 'forkq: a queue name must be 1 to 128 bytes' USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(p_settings) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'forkq: queue settings must be a JSON object' USING ERRCODE = '22023';
    END IF;
    SELECT k INTO unknown FROM jsonb_object_keys(p_settings) k
    WHERE k NOT IN ('paused', 'max_running', 'per_key', 'rate', 'burst') LIMIT 1;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'forkq: unknown queue setting %: use paused, max_running, per_key, rate or burst',
            unknown USING ERRCODE = '22023';
    END IF;
    IF p_settings ? 'paused' AND jsonb_typeof(p_settings -> 'paused') <> 'boolean' THEN
        RAISE EXCEPTION 'forkq: queue setting paused must be true or false' USING ERRCODE = '22023';
    END IF;
    IF p_settings ? 'burst' AND jsonb_typeof(p_settings -> 'burst') = 'null' THEN
        RAISE EXCEPTION 'forkq: queue setting burst cannot be none: use 1 for no burst'
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO {s}.queues (name) VALUES (p_queue) ON CONFLICT (name) DO NOTHING;
    UPDATE {s}.queues g
    SET paused = CASE WHEN p_settings ? 'paused' THEN (p_settings ->> 'paused')::boolean
                      ELSE g.paused END,
        max_running = CASE WHEN p_settings ? 'max_running'
                           THEN {s}.queue_setting(p_settings, 'max_running', 1, 1e6, true)::int
                           ELSE g.max_running END,
        per_key = CASE WHEN p_settings ? 'per_key'
                       THEN {s}.queue_setting(p_settings, 'per_key', 1, 1e6, true)::int
                       ELSE g.per_key END,
        rate = CASE WHEN p_settings ? 'rate'
                    THEN {s}.queue_setting(p_settings, 'rate', 1.0 / 86400, 1e6, false)
                    ELSE g.rate END,
        burst = CASE WHEN p_settings ? 'burst'
                     THEN {s}.queue_setting(p_settings, 'burst', 1, 1e6, true)::int
                     ELSE g.burst END,
        tokens = CASE WHEN p_settings ?| ARRAY['rate', 'burst']
                      THEN coalesce({s}.queue_setting(p_settings, 'burst', 1, 1e6, true), g.burst)
                      ELSE g.tokens END,
        refilled_at = CASE WHEN p_settings ?| ARRAY['rate', 'burst'] THEN now()
                           ELSE g.refilled_at END,
        updated_at = now()
    WHERE g.name = p_queue
    RETURNING g.* INTO changed;
    PERFORM {s}.mark_limited(p_queue);
    PERFORM {s}.note_change();
    PERFORM pg_notify('{c}', p_queue);
    RETURN changed;
END
$$;

-- The next job of queue p_queue a limited claim may take, locked; null when none may start. With
-- a per-key cap (p_per_key), the first in claim order whose key has room (a job without a key
-- always has room): the first rows in claim order are tried (the usual case: the head has room);
-- when those all belong to full keys, the head of every key with waiting jobs is looked at through
-- jobs_keyed_idx, one probe per key, so a pile of one full key's jobs costs one probe, not one per
-- job. The caller holds the queue's row lock, so no other limited claim of this queue competes.
CREATE FUNCTION {s}.pick_limited(p_queue text, p_per_key int) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    c         record;
    seen      int := 0;
    full_keys text[] := '{}';
    picked    bigint;
BEGIN
    IF p_per_key IS NULL THEN
        SELECT h.id INTO picked FROM {s}.jobs h
        WHERE h.queue = p_queue AND h.state = 'available'
        ORDER BY h.priority, h.run_at, h.id LIMIT 1 FOR UPDATE SKIP LOCKED;
        RETURN picked;
    END IF;
    FOR c IN
        SELECT h.id, h.concurrency_key AS key FROM {s}.jobs h
        WHERE h.queue = p_queue AND h.state = 'available'
        ORDER BY h.priority, h.run_at, h.id LIMIT 32
    LOOP
        seen := seen + 1;
        CONTINUE WHEN c.key = ANY(full_keys);
        IF c.key IS NOT NULL AND {s}.running_limited(p_queue, c.key) >= p_per_key THEN
            full_keys := full_keys || c.key;
            CONTINUE;
        END IF;
        SELECT l.id INTO picked FROM {s}.jobs l
        WHERE l.id = c.id AND l.state = 'available' FOR UPDATE SKIP LOCKED;
        IF picked IS NOT NULL THEN
            RETURN picked;
        END IF;
    END LOOP;
    IF seen < 32 THEN
        RETURN NULL;
    END IF;
    SELECT k.id INTO picked FROM (
        WITH RECURSIVE keys(key) AS (
            (SELECT j.concurrency_key FROM {s}.jobs j
             WHERE j.queue = p_queue AND j.state = 'available' AND j.concurrency_key IS NOT NULL
             ORDER BY j.concurrency_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.concurrency_key FROM {s}.jobs j
                    WHERE j.queue = p_queue AND j.state = 'available'
                      AND j.concurrency_key IS NOT NULL AND j.concurrency_key > keys.key
                    ORDER BY j.concurrency_key LIMIT 1)
            FROM keys WHERE keys.key IS NOT NULL
        )
        SELECT h.id, h.priority, h.run_at FROM keys
        CROSS JOIN LATERAL (
            SELECT j.id, j.priority, j.run_at FROM {s}.jobs j
            WHERE j.queue = p_queue AND j.state = 'available' AND j.concurrency_key = keys.key
            ORDER BY j.priority, j.run_at, j.id LIMIT 1) h
        WHERE keys.key IS NOT NULL AND keys.key <> ALL(full_keys)
          AND {s}.running_limited(p_queue, keys.key) < p_per_key
        UNION ALL
        (SELECT j.id, j.priority, j.run_at FROM {s}.jobs j
         WHERE j.queue = p_queue AND j.state = 'available' AND j.concurrency_key IS NULL
         ORDER BY j.priority, j.run_at, j.id LIMIT 1)
    ) k
    ORDER BY k.priority, k.run_at, k.id LIMIT 1;
    SELECT l.id INTO picked FROM {s}.jobs l
    WHERE l.id = picked AND l.state = 'available' FOR UPDATE SKIP LOCKED;
    RETURN picked;
END
$$;

-- Claims at most one job of limited queue p_queue for p_owner, with the columns of the lean
-- round's claim, or a row whose id is null and whose retry_in says in how many seconds the rate
-- limit gives the next start (no row: paused, at its cap, or nothing waiting). The queue's row is
-- locked first, so limited claims of one queue take turns across the fleet and every cap is
-- exact: the running count (jobs_limited_idx), the per-key counts and the token bucket are read
-- and changed under that lock. Workers claim one job of a limited queue at a time and start it at
-- once, so a claim is a start. A queue without a row (its limits were dropped) is claimed as is.
CREATE FUNCTION {s}.claim_limited(p_queue text, p_owner text, p_token bigint, p_lease float8,
                                  OUT id bigint, OUT queue text, OUT task text, OUT payload jsonb,
                                  OUT priority smallint, OUT run_at timestamptz, OUT attempt int,
                                  OUT max_attempts int, OUT batch_id bigint, OUT expiries smallint,
                                  OUT timeout_seconds float8, OUT backoff_seconds float8,
                                  OUT retry_in float8)
RETURNS SETOF record LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q         {s}.queues;
    looked_at timestamptz;
    in_bucket float8;
    picked    bigint;
BEGIN
    SELECT * INTO q FROM {s}.queues g WHERE g.name = p_queue FOR UPDATE;
    IF q.paused THEN
        RETURN;
    END IF;
    -- After the lock: a claim that waited for it counts the time it waited.
    looked_at := clock_timestamp();
    IF q.rate IS NOT NULL THEN
        in_bucket := least(q.burst,
                           q.tokens + q.rate * extract(epoch FROM looked_at - q.refilled_at));
        IF in_bucket < 1 THEN
            retry_in := (1 - in_bucket) / q.rate;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    IF q.max_running IS NOT NULL
       AND {s}.running_limited(p_queue, NULL) >= q.max_running THEN
        RETURN;
    END IF;
    picked := {s}.pick_limited(p_queue, q.per_key);
    IF picked IS NULL THEN
        RETURN;
    END IF;
    UPDATE {s}.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_owner = p_owner, lease_token = p_token,
        lease_expires_at = now() + make_interval(secs => p_lease), limited = true
    WHERE j.id = picked
    RETURNING j.id, j.queue, j.task, j.payload, j.priority, j.run_at, j.attempt, j.max_attempts,
              j.batch_id, j.expiries, j.timeout_seconds, j.backoff_seconds
    INTO id, queue, task, payload, priority, run_at, attempt, max_attempts, batch_id, expiries,
         timeout_seconds, backoff_seconds;
    IF q.rate IS NOT NULL THEN
        UPDATE {s}.queues g SET tokens = in_bucket - 1, refilled_at = looked_at
        WHERE g.name = p_queue;
    END IF;
    RETURN NEXT;
END
$$;

-- Sends the jobs whose handler asked to snooze back to the queue after p_delays seconds, fenced by
-- lease token, without charging the attempt or recording an error: a snoozed job waits as
-- 'scheduled' (or is available at once for a delay of 0). One that must not run again (cancelled,
-- or a child of a stopped batch) ends cancelled instead (see requeue()). Returns the ids refused
-- (stale leases).
CREATE FUNCTION {s}.snooze(p_ids bigint[], p_tokens bigint[], p_delays float8[],
                           p_retain boolean)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    n    int := coalesce(cardinality(p_ids), 0);
    back bigint[];
    rest record;
BEGIN
    IF n = 0 THEN
        RETURN '{}';
    END IF;
    back := {s}.requeue(p_ids, p_tokens, array_fill('retry'::text, ARRAY[n]),
                        array_fill(NULL::text, ARRAY[n]), p_delays);
    UPDATE {s}.jobs j
    SET attempt = greatest(j.attempt - 1, 0),
        state = CASE WHEN j.state = 'retryable' THEN 'scheduled' ELSE j.state END
    WHERE j.id = ANY(back);
    SELECT coalesce(array_agg(a.id), '{}') AS ids, coalesce(array_agg(a.token), '{}') AS tokens,
           count(*)::int AS n
    INTO rest
    FROM unnest(p_ids, p_tokens) AS a(id, token) WHERE a.id <> ALL(back);
    RETURN {s}.settle(rest.ids, rest.tokens, array_fill('cancelled'::text, ARRAY[rest.n]),
                      array_fill(NULL::jsonb, ARRAY[rest.n]),
                      array_fill('cancelled while it snoozed'::text, ARRAY[rest.n]),
                      array_fill(0::float8, ARRAY[rest.n]), p_retain);
END
$$;

-- The latest progress a job's handler reported (rate-limited by the worker), apart from the hot
-- table so that a chatty handler never bloats it. Kept while the job lives and, after, as long
-- as completed jobs are retained (purge_progress()).
CREATE TABLE {s}.job_progress (
    job_id      bigint PRIMARY KEY,
    attempt     int NOT NULL,
    progress    jsonb NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_progress_reported_idx ON {s}.job_progress (reported_at);

-- Records job p_id's progress, fenced by its lease token; false when the lease is not p_token's.
CREATE FUNCTION {s}.report_progress(p_id bigint, p_token bigint, p_progress jsonb)
RETURNS boolean LANGUAGE sql AS $$
    INSERT INTO {s}.job_progress AS p (job_id, attempt, progress)
    SELECT j.id, j.attempt, p_progress FROM {s}.jobs j
    WHERE j.id = p_id AND j.lease_token = p_token AND j.state = 'running'
    ON CONFLICT (job_id) DO UPDATE
    SET attempt = excluded.attempt, progress = excluded.progress, reported_at = now()
    RETURNING true
$$;

-- Deletes the progress of jobs that are no longer live, reported more than p_retention seconds
-- ago, at most p_limit; returns how many.
CREATE FUNCTION {s}.purge_progress(p_retention float8, p_limit int) RETURNS int
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM {s}.job_progress p
        WHERE p.job_id = ANY(ARRAY(
            SELECT o.job_id FROM {s}.job_progress o
            WHERE o.reported_at < now() - make_interval(secs => p_retention)
              AND NOT EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.id = o.job_id)
            ORDER BY o.reported_at LIMIT p_limit))
        RETURNING 1
    )
    SELECT count(*)::int FROM gone
$$;

-- Where job p_id stands, for producers waiting on it (poll this; never wait inside a transaction,
-- which would hold back the vacuum of the hot table): its state ('available', 'scheduled',
-- 'running', 'retryable' while it lives; 'completed', 'failed', 'cancelled' once it ended), its
-- result, its last error and when it ended. No row: no such job, or it completed with
-- FORKQ_RETENTION_SECONDS=0 (its result was not kept), or its retention passed.
CREATE FUNCTION {s}.job_result(p_id bigint)
RETURNS TABLE (state text, result jsonb, error text, finished_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT a.state, a.result, a.last_error, a.finished_at FROM {s}.jobs_archive a WHERE a.id = p_id
    UNION ALL
    SELECT j.state, NULL, j.last_error, NULL FROM {s}.jobs j WHERE j.id = p_id
$$;
