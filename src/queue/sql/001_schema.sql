-- The hot table: live work only (available, scheduled, running, retryable). Terminal jobs move to
-- jobs_archive, so this table stays small and the claim stays an index walk.
CREATE TABLE {s}.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text NOT NULL CHECK (queue <> '' AND octet_length(queue) <= 128),
    task             text NOT NULL CHECK (task <> '' AND octet_length(task) <= 256),
    payload          jsonb NOT NULL DEFAULT '{}',
    priority         smallint NOT NULL DEFAULT 0,
    state            text NOT NULL DEFAULT 'available'
                     CHECK (state IN ('available', 'scheduled', 'running', 'retryable')),
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempt          int NOT NULL DEFAULT 0,
    max_attempts     int NOT NULL DEFAULT 25 CHECK (max_attempts >= 1),
    -- Compared byte by byte (see leased_under): owners are names forkq makes, never sorted for people.
    lease_owner      text COLLATE "C",
    lease_token      bigint,
    lease_expires_at timestamptz,
    unique_key       text,
    batch_id         bigint,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    -- How many times a lease on this job expired (its worker vanished without a word). A job
    -- with expiries is a suspect: its next worker reports the start (sets `started`) before
    -- running it, so a job that takes its whole host down is charged and cannot loop forever.
    expiries         smallint NOT NULL DEFAULT 0,
    -- Set when the worker holding the lease reported that this run started: a suspect before it
    -- runs, any job when a lease renewal finds it running.
    started          boolean NOT NULL DEFAULT false,
    -- Flow control (migration 004, docs/flow-control.md), all null for a job that uses none of it:
    -- the key a per-key cap counts running jobs by; set (true) by the limited claim, so only
    -- its jobs count against a queue's caps (jobs_limited_idx); per-job overrides of the timeout
    -- and of the retry backoff's base, in seconds.
    concurrency_key  text,
    limited          boolean,
    timeout_seconds  float8,
    backoff_seconds  float8
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);

-- Serves the claim: equality on queue, then exactly the claim's ORDER BY, only rows that can run
-- now. Waiting rows are in jobs_due_idx instead, so a million jobs scheduled for tomorrow cost the
-- claim nothing: every claim round (ROUND in sql.rs) moves the due ones here.
CREATE INDEX jobs_claim_idx ON {s}.jobs (queue, priority, run_at, id) WHERE state = 'available';
-- Serves the claim round's promotion: scheduled and retryable rows by the time they fall due.
CREATE INDEX jobs_due_idx ON {s}.jobs (run_at) WHERE state IN ('scheduled', 'retryable');
-- Serves lease renewal and release by owner (see leased_under), and the rescue of expired leases.
CREATE INDEX jobs_running_idx ON {s}.jobs (lease_owner) WHERE state = 'running';
-- A live unique key: a second enqueue returns the existing job.
CREATE UNIQUE INDEX jobs_unique_key_idx ON {s}.jobs (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX jobs_batch_idx ON {s}.jobs (batch_id) WHERE batch_id IS NOT NULL;

-- Terminal jobs: completed (kept for FORKQ_RETENTION_SECONDS), failed (the dead letter, kept until
-- retried or purged) and cancelled.
CREATE TABLE {s}.jobs_archive (
    id           bigint PRIMARY KEY,
    queue        text NOT NULL,
    task         text NOT NULL,
    payload      jsonb NOT NULL,
    priority     smallint NOT NULL,
    state        text NOT NULL CHECK (state IN ('completed', 'failed', 'cancelled')),
    attempt      int NOT NULL,
    max_attempts int NOT NULL,
    unique_key   text,
    batch_id     bigint,
    created_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    last_error   text,
    result       jsonb,
    -- Kept for a job that may come back (retry of a failed or cancelled job); see jobs.
    concurrency_key text,
    timeout_seconds float8,
    backoff_seconds float8
);
-- Every completed job is archived at full drain rate, so the archive carries only what that insert
-- must pay for: the primary key, and the index the retention purge walks oldest first, which stops
-- at the first row still kept, however big the archive (a BRIN index, cheaper per insert, left the
-- purge to the planner's estimate: with nothing expired yet it read the whole archive at every
-- pass). The dead letter is not in it: the purge never takes failed jobs, and would walk past them
-- all at every pass. Failed and cancelled jobs, few and browsed by queue, have a btree of their
-- own; so do batch children.
CREATE INDEX jobs_archive_finished_idx ON {s}.jobs_archive (finished_at) WHERE state <> 'failed';
CREATE INDEX jobs_archive_kept_idx ON {s}.jobs_archive (queue, state, id) WHERE state <> 'completed';
CREATE INDEX jobs_archive_batch_idx ON {s}.jobs_archive (batch_id) WHERE batch_id IS NOT NULL;

-- Batches: a parent row whose counters are kept by retire() in the same transaction as each
-- child's terminal ack, so they cannot drift. The UPDATE that takes a batch out of 'open' happens
-- under the batch's row lock, after a re-read of the row (READ COMMITTED), so exactly one
-- transaction sees the transition and enqueues the completion job.
CREATE TABLE {s}.batches (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue             text NOT NULL CHECK (queue <> '' AND octet_length(queue) <= 128),
    state             text NOT NULL DEFAULT 'open'
                      CHECK (state IN ('open', 'completed', 'failed', 'cancelled')),
    total             int NOT NULL DEFAULT 0,
    pending           int NOT NULL DEFAULT 0,
    succeeded         int NOT NULL DEFAULT 0,
    failed            int NOT NULL DEFAULT 0,
    cancelled         int NOT NULL DEFAULT 0,
    fail_fast         boolean NOT NULL DEFAULT false,
    on_complete_task  text CHECK (on_complete_task <> '' AND octet_length(on_complete_task) <= 256),
    on_complete_queue text CHECK (on_complete_queue <> '' AND octet_length(on_complete_queue) <= 128),
    completion_job_id bigint,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
-- Serves `batch list --state` and the repair pass's scan of open batches.
CREATE INDEX batches_state_idx ON {s}.batches (state, id);

-- Refuses per-job options that cannot be used: an empty or overlong concurrency key, a timeout
-- that is not positive, a negative backoff (limits as in producer.rs).
CREATE FUNCTION {s}.check_job_options(p_key text, p_timeout float8, p_backoff float8)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_key = '' OR octet_length(p_key) > 256 THEN
        RAISE EXCEPTION 'forkq: a concurrency key must be 1 to 256 bytes' USING ERRCODE = '22023';
    ELSIF NOT p_timeout BETWEEN 0.001 AND 604800 THEN
        RAISE EXCEPTION 'forkq: timeout_seconds must be above 0 and at most 604800 (7 days)'
            USING ERRCODE = '22023';
    ELSIF NOT p_backoff BETWEEN 0 AND 2592000 THEN
        RAISE EXCEPTION 'forkq: backoff_seconds must be 0 to 2592000 (30 days)'
            USING ERRCODE = '22023';
    END IF;
END
$$;

-- Enqueues one job and says what happened: (id, created, replaced). Without a unique key it
-- inserts, notifies and returns (new id, true, false): nothing else is looked at. With a key:
-- * a live job holding the key wins: its id comes back, created = false;
-- * unique_for also refuses the key for that long after a job took it, whatever became of that
--   job since (the window is a row of unique_windows, created by migration 002);
-- * replace gives the waiting job that holds the key the new payload and run time instead
--   (replaced = true); a running one keeps running and gives the key up to a new job.
-- Idle workers are notified of a job that can run now, when the caller's transaction commits.
-- concurrency_key, timeout_seconds and backoff_seconds are the flow-control options of
-- docs/flow-control.md (not changed by a replace).
CREATE FUNCTION {s}.enqueue_job(
    queue        text,
    task         text,
    payload      jsonb DEFAULT '{}',
    priority     int DEFAULT 0,
    run_at       timestamptz DEFAULT NULL,
    max_attempts int DEFAULT 25,
    unique_key   text DEFAULT NULL,
    batch_id     bigint DEFAULT NULL,
    unique_for   interval DEFAULT NULL,
    replace      boolean DEFAULT false,
    concurrency_key text DEFAULT NULL,
    timeout_seconds float8 DEFAULT NULL,
    backoff_seconds float8 DEFAULT NULL,
    OUT id       bigint,
    OUT created  boolean,
    OUT replaced boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    found_id    bigint;
    found_state text;
    found_queue text;
BEGIN
    IF queue IS NULL OR queue = '' OR task IS NULL OR task = '' THEN
        RAISE EXCEPTION 'forkq: queue and task must be non-empty' USING ERRCODE = '22023';
    END IF;
    PERFORM {s}.check_job_options(enqueue_job.concurrency_key, enqueue_job.timeout_seconds,
                                  enqueue_job.backoff_seconds);
    created := false;
    replaced := false;
    IF unique_for IS NOT NULL OR replace THEN
        IF unique_key IS NULL THEN
            RAISE EXCEPTION 'forkq: unique_for and replace need a unique_key' USING ERRCODE = '22023';
        ELSIF unique_for IS NOT NULL AND replace THEN
            RAISE EXCEPTION 'forkq: give unique_for or replace, not both' USING ERRCODE = '22023';
        ELSIF unique_for <= interval '0' THEN
            RAISE EXCEPTION 'forkq: unique_for must be positive' USING ERRCODE = '22023';
        END IF;
    END IF;
    IF unique_for IS NOT NULL THEN
        -- Open the key's window unless one is open; a concurrent opener's insert waits for this
        -- transaction, then finds the window open and returns its job.
        INSERT INTO {s}.unique_windows AS w (key, job_id, expires_at)
        VALUES (enqueue_job.unique_key, NULL, now() + enqueue_job.unique_for)
        ON CONFLICT (key) DO UPDATE SET job_id = NULL, expires_at = EXCLUDED.expires_at
            WHERE w.expires_at <= now()
        RETURNING w.job_id INTO found_id;
        IF NOT FOUND THEN
            SELECT w.job_id INTO id FROM {s}.unique_windows w WHERE w.key = enqueue_job.unique_key;
            RETURN;
        END IF;
    END IF;
    LOOP
        IF replace THEN
            SELECT j.id, j.state, j.queue INTO found_id, found_state, found_queue
            FROM {s}.jobs j WHERE j.unique_key = enqueue_job.unique_key FOR UPDATE;
            IF found_state = 'running' THEN
                -- It may have read the old payload: it runs on, and the key moves to a new job.
                UPDATE {s}.jobs j SET unique_key = NULL WHERE j.id = found_id;
            ELSIF found_id IS NOT NULL THEN
                UPDATE {s}.jobs j
                SET payload = coalesce(enqueue_job.payload, '{}'),
                    run_at = coalesce(enqueue_job.run_at, now()),
                    -- Only runnable rows are 'available' (the claim reads no run_at).
                    state = CASE WHEN enqueue_job.run_at <= now() OR enqueue_job.run_at IS NULL
                                     THEN 'available'
                                 WHEN j.state = 'retryable' THEN 'retryable'
                                 ELSE 'scheduled' END
                WHERE j.id = found_id;
                IF enqueue_job.run_at IS NULL OR enqueue_job.run_at <= now() THEN
                    PERFORM pg_notify('{c}', found_queue);
                END IF;
                id := found_id;
                replaced := true;
                RETURN;
            END IF;
        END IF;
        INSERT INTO {s}.jobs AS j (queue, task, payload, priority, state, run_at, max_attempts,
                                   unique_key, batch_id, concurrency_key, timeout_seconds,
                                   backoff_seconds)
        VALUES (enqueue_job.queue, enqueue_job.task, coalesce(enqueue_job.payload, '{}'),
                enqueue_job.priority,
                CASE WHEN enqueue_job.run_at > now() THEN 'scheduled' ELSE 'available' END,
                coalesce(enqueue_job.run_at, now()), coalesce(enqueue_job.max_attempts, 25),
                enqueue_job.unique_key, enqueue_job.batch_id, enqueue_job.concurrency_key,
                enqueue_job.timeout_seconds, enqueue_job.backoff_seconds)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO found_id;
        IF found_id IS NULL AND NOT replace THEN
            SELECT j.id INTO found_id FROM {s}.jobs j WHERE j.unique_key = enqueue_job.unique_key;
        ELSE
            created := found_id IS NOT NULL;
        END IF;
        IF found_id IS NOT NULL THEN
            IF unique_for IS NOT NULL THEN
                UPDATE {s}.unique_windows w SET job_id = found_id
                WHERE w.key = enqueue_job.unique_key;
            END IF;
            IF created AND (enqueue_job.run_at IS NULL OR enqueue_job.run_at <= now()) THEN
                PERFORM pg_notify('{c}', enqueue_job.queue);
            END IF;
            id := found_id;
            RETURN;
        END IF;
        -- The conflicting job finished between the insert and the select, or (replace) a
        -- concurrent producer inserted it and it can now be replaced: go round again.
    END LOOP;
END
$$;

-- The SQL producer API: enqueue_job() answering only the id (of the new job, or of the job that
-- holds the unique key). `SELECT * FROM enqueue_job(...)` says whether it was created as well.
-- PL/pgSQL, not SQL: a SQL function that cannot be inlined is planned again at every call.
CREATE FUNCTION {s}.enqueue(
    queue        text,
    task         text,
    payload      jsonb DEFAULT '{}',
    priority     int DEFAULT 0,
    run_at       timestamptz DEFAULT NULL,
    max_attempts int DEFAULT 25,
    unique_key   text DEFAULT NULL,
    batch_id     bigint DEFAULT NULL,
    unique_for   interval DEFAULT NULL,
    replace      boolean DEFAULT false,
    concurrency_key text DEFAULT NULL,
    timeout_seconds float8 DEFAULT NULL,
    backoff_seconds float8 DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN ({s}.enqueue_job(queue, task, payload, priority, run_at, max_attempts, unique_key,
                            batch_id, unique_for, replace, concurrency_key, timeout_seconds,
                            backoff_seconds)).id;
END
$$;

-- The one way a job leaves the hot table: deleted and, unless it completed with retention 0,
-- archived with its final state. A non-null token fences the removal to that lease. Returns the ids
-- removed. A job marked for cancellation that did not complete ends cancelled. Children of batches
-- are always archived (even with retention 0, so an open batch's counters can be recomputed from
-- its rows), and each batch's counters are updated here, in the transaction of the terminal ack;
-- batches are locked in id order (no deadlocks).
CREATE FUNCTION {s}.retire(
    p_ids     bigint[],
    p_tokens  bigint[],
    p_states  text[],
    p_errors  text[],
    p_results jsonb[],
    p_retain  boolean
) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    gone_ids     bigint[];
    gone_batches bigint[];
    gone_states  text[];
    t            record;
BEGIN
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_states, p_errors, p_results)
            AS a(id, token, state, error, result)
    ), gone AS (
        DELETE FROM {s}.jobs j USING input a
        WHERE j.id = a.id AND j.id = ANY(p_ids)
          AND (a.token IS NULL OR (j.lease_token = a.token AND j.state = 'running'))
        RETURNING j.*,
            CASE WHEN j.cancel_requested AND a.state <> 'completed' THEN 'cancelled'
                 ELSE a.state END AS final_state,
            coalesce(a.error, j.last_error) AS final_error,
            a.result AS final_result
    ), archived AS (
        INSERT INTO {s}.jobs_archive (id, queue, task, payload, priority, state, attempt,
                                      max_attempts, unique_key, batch_id, created_at, last_error,
                                      result, concurrency_key, timeout_seconds, backoff_seconds)
        SELECT g.id, g.queue, g.task, g.payload, g.priority, g.final_state, g.attempt,
               g.max_attempts, g.unique_key, g.batch_id, g.created_at, g.final_error,
               g.final_result, g.concurrency_key, g.timeout_seconds, g.backoff_seconds
        FROM gone g
        WHERE p_retain OR g.final_state <> 'completed' OR g.batch_id IS NOT NULL
    )
    SELECT array_agg(g.id), array_agg(g.batch_id), array_agg(g.final_state)
    INTO gone_ids, gone_batches, gone_states
    FROM gone g;

    FOR t IN
        SELECT u.batch_id,
               count(*) FILTER (WHERE u.state = 'completed')::int AS succeeded,
               count(*) FILTER (WHERE u.state = 'failed')::int AS failed,
               count(*) FILTER (WHERE u.state = 'cancelled')::int AS cancelled
        FROM unnest(gone_batches, gone_states) AS u(batch_id, state)
        WHERE u.batch_id IS NOT NULL
        GROUP BY u.batch_id
        ORDER BY u.batch_id
    LOOP
        PERFORM {s}.batch_tally(t.batch_id, t.succeeded, t.failed, t.cancelled, p_retain);
    END LOOP;

    RETURN QUERY SELECT unnest(coalesce(gone_ids, '{}'));
END
$$;

-- Sends the jobs whose outcome is 'retry' back to the queue after their delay, fenced by lease
-- token. Not sent back (settle then retires them): a job marked for cancellation, and a child of a
-- batch that is no longer open (fail-fast marks the running siblings it can lock; this catches the
-- ones it could not, because a lease renewal held the row), so no child of a failed batch retries.
-- Returns the ids sent back.
CREATE FUNCTION {s}.requeue(
    p_ids      bigint[],
    p_tokens   bigint[],
    p_outcomes text[],
    p_errors   text[],
    p_delays   float8[]
) RETURNS bigint[] LANGUAGE sql AS $$
    WITH r AS (
        UPDATE {s}.jobs j
        SET state = CASE WHEN a.delay > 0 THEN 'retryable' ELSE 'available' END,
            run_at = now() + make_interval(secs => a.delay),
            last_error = coalesce(a.error, j.last_error),
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, started = false
        FROM unnest(p_ids, p_tokens, p_outcomes, p_errors, p_delays)
            AS a(id, token, outcome, error, delay)
        WHERE a.outcome = 'retry' AND j.id = a.id AND j.lease_token = a.token
          -- Reach the rows through the primary key, whatever the planner thinks of unnest().
          AND j.id = ANY(p_ids)
          AND j.state = 'running' AND NOT j.cancel_requested
          AND (j.batch_id IS NULL
               OR NOT EXISTS (SELECT 1 FROM {s}.batches b
                              WHERE b.id = j.batch_id AND b.state <> 'open'))
        RETURNING j.id
    )
    SELECT coalesce(array_agg(r.id), '{}') FROM r;
$$;

-- Settles finished jobs, fenced by lease token: 'completed', 'failed' and 'cancelled' retire them,
-- 'retry' sends them back after p_delays seconds. Returns the ids it refused (stale leases). The
-- lean round (ROUND in sql.rs) settles plain completed jobs itself; this takes everything else.
CREATE FUNCTION {s}.settle(
    p_ids      bigint[],
    p_tokens   bigint[],
    p_outcomes text[],
    p_results  jsonb[],
    p_errors   text[],
    p_delays   float8[],
    p_retain   boolean
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    retried bigint[];
    retired bigint[];
BEGIN
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN '{}';
    END IF;
    retried := CASE WHEN 'retry' = ANY(p_outcomes)
                    THEN {s}.requeue(p_ids, p_tokens, p_outcomes, p_errors, p_delays)
                    ELSE '{}' END;
    -- Everything else retires. The jobs just sent back no longer hold their lease, so the fence
    -- in retire() leaves them alone; a 'retry' that was not sent back ends as a failure.
    SELECT coalesce(array_agg(x), '{}') INTO retired
    FROM {s}.retire(p_ids, p_tokens,
                    ARRAY(SELECT CASE WHEN o IN ('completed', 'cancelled') THEN o ELSE 'failed' END
                          FROM unnest(p_outcomes) WITH ORDINALITY u(o, n) ORDER BY n),
                    p_errors, p_results, p_retain) AS x;

    RETURN ARRAY(SELECT a.id FROM unnest(p_ids) a(id)
                 WHERE a.id <> ALL(retried) AND a.id <> ALL(retired));
END
$$;

-- Whether lease owner o is p or begins with it, as starts_with(o, p) for a non-empty p, but
-- written as a range of the C-collated lease_owner (up to p with its last character's successor)
-- so that jobs_running_idx serves it: the function is inlined into the statements that call it,
-- and the range reaches their generic plans, where starts_with() is no index condition. With
-- starts_with(), a renewal read every running row of the schema, twice: 60 ms for a worker's 100
-- rows among 80,000 running, against 3 ms.
CREATE FUNCTION {s}.leased_under(o text, p text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT o COLLATE "C" >= p AND o COLLATE "C" < left(p, -1) || chr(ascii(right(p, 1)) + 1)
$$;

-- Gives back the running jobs of every lease owner that starts with p_owner, except those in
-- p_keep: one worker (owners end with '/', so a whole owner names only itself), or every past
-- occupant of a slot (the slot's prefix), so jobs of a child that died before it could release its
-- own predecessor's come back too. The job in flight (p_in_flight, 0 for none) keeps the attempt it
-- was charged and is dead-lettered with p_error when it has no attempts left, else queued behind
-- the jobs already waiting at its priority; the others never
-- started (or finished and their acknowledgement was lost) and go back uncharged, except those
-- cancelled meanwhile, which end cancelled instead of running later. Returns how many jobs went back
-- to the queue.
-- Planned once per session (plan_cache_mode): the plan cache kept planning its statements anew
-- for each owner, and that cost more the more rows were running: beside 80,000 rows running under
-- other owners a renewal of one job took 1.0-1.2 ms against 0.6 with none, and 0.74-0.82 with the
-- generic plan, which walks the same index (pgbench, the renewal alone).
CREATE FUNCTION {s}.release(p_owner text, p_in_flight bigint, p_error text, p_retain boolean,
                            p_keep bigint[] DEFAULT '{}')
RETURNS int LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    done_ids    bigint[];
    done_tokens bigint[];
    done_errors text[];
    released    int;
BEGIN
    SELECT coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.lease_token), '{}'),
           coalesce(array_agg(CASE WHEN d.id = p_in_flight THEN p_error
                                   ELSE 'cancelled by request' END), '{}')
    INTO done_ids, done_tokens, done_errors
    FROM (
        SELECT j.id, j.lease_token
        FROM {s}.jobs j
        WHERE {s}.leased_under(j.lease_owner, p_owner) AND j.state = 'running'
          AND j.id <> ALL(p_keep)
          AND (j.cancel_requested OR (j.id = p_in_flight AND j.attempt >= j.max_attempts))
        FOR UPDATE
    ) d;
    IF cardinality(done_ids) > 0 THEN
        PERFORM {s}.retire(done_ids, done_tokens,
                           array_fill('failed'::text, ARRAY[cardinality(done_ids)]),
                           done_errors,
                           array_fill(NULL::jsonb, ARRAY[cardinality(done_ids)]),
                           p_retain);
    END IF;
    -- The job in flight goes behind the jobs already waiting at its priority (it may be what
    -- killed its worker; others should not wait on it); the rest keep their place.
    UPDATE {s}.jobs j
    SET state = 'available',
        run_at = CASE WHEN j.id = p_in_flight THEN now() ELSE least(j.run_at, now()) END,
        attempt = CASE WHEN j.id = p_in_flight THEN j.attempt ELSE greatest(j.attempt - 1, 0) END,
        last_error = CASE WHEN j.id = p_in_flight THEN coalesce(p_error, j.last_error)
                          ELSE j.last_error END,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, started = false
    WHERE {s}.leased_under(j.lease_owner, p_owner) AND j.state = 'running' AND j.id <> ALL(p_keep);
    GET DIAGNOSTICS released = ROW_COUNT;
    IF released > 0 THEN
        PERFORM pg_notify('{c}', '');
    END IF;
    RETURN released;
END
$$;

-- Renews the leases a worker holds (p_ids with their tokens) and gives back at once anything else
-- found under its name (p_owner): acknowledgements lost with an asynchronous commit in a database
-- crash, claims whose reply was lost with the connection, and prefetched jobs the worker chose to
-- hand back (see release()). The job running now (p_running, 0 for none) is recorded as started,
-- so an expiry of this run charges it. Returns the held jobs still leased to it, and whether each
-- was asked to stop.
CREATE FUNCTION {s}.renew(p_owner text, p_ids bigint[], p_tokens bigint[], p_lease_seconds float8,
                          p_retain boolean, p_running bigint)
RETURNS TABLE (id bigint, cancel_requested boolean) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM {s}.release(p_owner, 0, NULL, p_retain, p_ids);
    RETURN QUERY
    UPDATE {s}.jobs j SET lease_expires_at = now() + make_interval(secs => p_lease_seconds),
                          started = j.started OR j.id = p_running
    FROM unnest(p_ids, p_tokens) AS h(id, token)
    WHERE j.id = h.id AND j.lease_token = h.token AND j.id = ANY(p_ids) AND j.state = 'running'
    RETURNING j.id, j.cancel_requested;
END
$$;

-- Records that the worker holding a suspect job (one whose lease expired before) is starting it,
-- so that if this run takes the host down too, the rescue charges it an attempt.
CREATE FUNCTION {s}.mark_started(p_id bigint, p_token bigint) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE {s}.jobs SET started = true
    WHERE id = p_id AND lease_token = p_token AND state = 'running'
    RETURNING true;
$$;

-- Among jobs a worker claimed but has not started (p_ids, fenced by p_tokens), ends cancelled,
-- uncharged, those that must not run any more: cancelled by request, or children of a batch that
-- is no longer open (fail-fast or batch cancel). Returns their ids, so the worker drops them.
CREATE FUNCTION {s}.drop_cancelled(p_ids bigint[], p_tokens bigint[], p_retain boolean)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    gone   bigint[];
    tokens bigint[];
BEGIN
    WITH doomed AS (
        UPDATE {s}.jobs j SET attempt = greatest(j.attempt - 1, 0)
        FROM unnest(p_ids, p_tokens) AS h(id, token)
        WHERE j.id = h.id AND j.lease_token = h.token AND j.id = ANY(p_ids)
          AND j.state = 'running'
          AND (j.cancel_requested
               OR (j.batch_id IS NOT NULL
                   AND EXISTS (SELECT 1 FROM {s}.batches b
                               WHERE b.id = j.batch_id AND b.state <> 'open')))
        RETURNING j.id, j.lease_token
    )
    SELECT coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.lease_token), '{}')
    INTO gone, tokens FROM doomed d;
    IF cardinality(gone) > 0 THEN
        PERFORM {s}.retire(gone, tokens,
                           array_fill('cancelled'::text, ARRAY[cardinality(gone)]),
                           array_fill('cancelled before it started'::text, ARRAY[cardinality(gone)]),
                           array_fill(NULL::jsonb, ARRAY[cardinality(gone)]),
                           p_retain);
    END IF;
    RETURN gone;
END
$$;

-- Returns jobs whose lease expired (their worker or its whole host died) to the queue. A job is
-- charged the attempt only if its worker reported the start (see `started`: a suspect before it
-- runs, any job at a lease renewal while it runs): a prefetched job that never ran goes back as it
-- was. Each expiry makes the job a suspect; a suspect that keeps taking
-- its host down is charged at every later expiry and reaches the dead letter after at most
-- max_attempts + 1 host deaths. A job marked for cancellation ends cancelled. Rows locked by a
-- concurrent ack or renewal are skipped, and the expiry is re-checked under the row lock, so a job
-- renewed or finished between the read and the write is never touched. Reaches the rows through
-- jobs_running_idx, never by a scan of the whole table.
CREATE FUNCTION {s}.rescue_expired(p_retain boolean) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    dead_ids    bigint[];
    dead_tokens bigint[];
    back        int;
BEGIN
    WITH expired AS (
        SELECT j.id, j.lease_token,
               j.cancel_requested OR (j.started AND j.attempt >= j.max_attempts) AS exhausted
        FROM {s}.jobs j
        WHERE j.state = 'running' AND j.lease_owner IS NOT NULL
          AND j.lease_expires_at < clock_timestamp()
        FOR UPDATE SKIP LOCKED
    ), revived AS (
        UPDATE {s}.jobs j
        SET state = 'available', run_at = least(j.run_at, now()),
            attempt = CASE WHEN j.started THEN j.attempt ELSE greatest(j.attempt - 1, 0) END,
            expiries = least(j.expiries + 1, 32767),
            last_error = 'lease expired: the worker holding this job stopped renewing it',
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, started = false
        FROM expired e
        WHERE j.id = e.id AND NOT e.exhausted
        RETURNING j.id
    )
    SELECT (SELECT count(*) FROM revived),
           coalesce(array_agg(e.id) FILTER (WHERE e.exhausted), '{}'),
           coalesce(array_agg(e.lease_token) FILTER (WHERE e.exhausted), '{}')
    INTO back, dead_ids, dead_tokens
    FROM expired e;
    IF cardinality(dead_ids) > 0 THEN
        PERFORM {s}.retire(dead_ids, dead_tokens,
                           array_fill('failed'::text, ARRAY[cardinality(dead_ids)]),
                           array_fill('lease expired while it ran and no attempts are left'::text,
                                      ARRAY[cardinality(dead_ids)]),
                           array_fill(NULL::jsonb, ARRAY[cardinality(dead_ids)]),
                           p_retain);
    END IF;
    IF back > 0 THEN
        PERFORM pg_notify('{c}', '');
    END IF;
    RETURN back + cardinality(dead_ids);
END
$$;

-- When the last maintenance pass began, fleet-wide: a host runs the pass only if it can move this
-- forward by the pass interval (see TAKE_TURN_AND_RESCUE in sql.rs), so a hundred hosts run one
-- pass per interval between them, not a hundred.
CREATE TABLE {s}.maintenance_turn (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO {s}.maintenance_turn DEFAULT VALUES;

-- Changes that workers must notice before they start a job they claimed ahead (a cancel, a batch
-- stopped by fail-fast or cancel). Insert-only, so noting a change never waits on a lock; every
-- lean round reads the sum of the weights, which grows by one with every change committed, in
-- whatever order they commit. compact_changes() folds the rows into one without changing the sum.
CREATE TABLE {s}.changes (
    at     timestamptz NOT NULL DEFAULT now(),
    weight bigint NOT NULL DEFAULT 1
);

-- Notes a change (see the changes table).
CREATE FUNCTION {s}.note_change() RETURNS void LANGUAGE sql AS $$
    INSERT INTO {s}.changes DEFAULT VALUES;
$$;

-- Folds the committed changes into one row of the same total weight (when there is more than
-- one), so the sum every round reads stays a read of one row. Readers see the rows before or
-- after, never between; changes committed meanwhile are neither deleted nor counted here.
CREATE FUNCTION {s}.compact_changes() RETURNS void LANGUAGE sql AS $$
    WITH old AS (
        SELECT count(*) AS n FROM {s}.changes
    ), gone AS (
        DELETE FROM {s}.changes WHERE (SELECT n FROM old) > 1 RETURNING weight
    )
    INSERT INTO {s}.changes (at, weight)
    SELECT now(), sum(weight) FROM gone HAVING count(*) > 0;
$$;

-- Cancels a job: at once when it waits, by marking it when it runs (it is then not retried).
-- Returns the job's state afterwards ('cancelled', 'cancelling', or its terminal state), or null
-- when no such job exists.
CREATE FUNCTION {s}.cancel(p_id bigint, p_retain boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    current text;
BEGIN
    SELECT j.state INTO current FROM {s}.jobs j WHERE j.id = p_id FOR UPDATE;
    IF current = 'running' THEN
        UPDATE {s}.jobs j SET cancel_requested = true WHERE j.id = p_id;
        -- The job may be claimed ahead and not started yet: its worker drops it at its next round.
        PERFORM {s}.note_change();
        -- If it runs, its handler is told at once (the wake-up listener flags its worker's slot;
        -- the payload has a space, which no queue name has); lease renewals are the fallback.
        PERFORM pg_notify('{c}', 'cancel ' || p_id);
        RETURN 'cancelling';
    ELSIF current IS NOT NULL THEN
        PERFORM {s}.retire(ARRAY[p_id], ARRAY[NULL::bigint], ARRAY['cancelled'],
                           ARRAY['cancelled by request'], ARRAY[NULL::jsonb], p_retain);
        RETURN 'cancelled';
    END IF;
    SELECT a.state INTO current FROM {s}.jobs_archive a WHERE a.id = p_id;
    RETURN current;
END
$$;

-- Moves a failed or cancelled job from the archive back to the queue with fresh attempts.
-- Returns false when there is no such job or a live job holds its unique key. A revived batch
-- child counts as pending again (and no longer as failed or cancelled); a batch that already
-- finished stays finished, and its completion job is not sent again.
CREATE FUNCTION {s}.retry(p_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    moved_batch bigint;
    moved_state text;
BEGIN
    WITH revived AS (
        DELETE FROM {s}.jobs_archive a
        WHERE a.id = p_id AND a.state IN ('failed', 'cancelled')
          AND (a.unique_key IS NULL
               OR NOT EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.unique_key = a.unique_key))
        RETURNING a.*
    ), inserted AS (
        INSERT INTO {s}.jobs (id, queue, task, payload, priority, state, run_at, attempt,
                              max_attempts, unique_key, batch_id, created_at, last_error,
                              concurrency_key, timeout_seconds, backoff_seconds)
        OVERRIDING SYSTEM VALUE
        SELECT r.id, r.queue, r.task, r.payload, r.priority, 'available', now(), 0,
               r.max_attempts, r.unique_key, r.batch_id, r.created_at, r.last_error,
               r.concurrency_key, r.timeout_seconds, r.backoff_seconds
        FROM revived r
    )
    SELECT r.batch_id, r.state INTO moved_batch, moved_state FROM revived r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF moved_batch IS NOT NULL THEN
        PERFORM 1 FROM {s}.batches WHERE id = moved_batch FOR UPDATE;
        UPDATE {s}.batches b
        SET pending = b.pending + 1,
            failed = b.failed - (moved_state = 'failed')::int,
            cancelled = b.cancelled - (moved_state = 'cancelled')::int
        WHERE b.id = moved_batch;
    END IF;
    PERFORM pg_notify('{c}', '');
    RETURN true;
END
$$;

-- Enqueues the batch's completion job (if it has one and has not got one yet). The caller holds
-- the batch's row lock and has just taken the batch out of 'open'.
CREATE FUNCTION {s}.batch_finish(p_batch bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    b      {s}.batches;
    job_id bigint;
BEGIN
    SELECT * INTO b FROM {s}.batches WHERE id = p_batch;
    IF b.on_complete_task IS NULL OR b.completion_job_id IS NOT NULL THEN
        RETURN;
    END IF;
    job_id := {s}.enqueue(coalesce(b.on_complete_queue, b.queue), b.on_complete_task,
                          jsonb_build_object('batch_id', b.id, 'state', b.state,
                                             'total', b.total, 'pending', b.pending,
                                             'succeeded', b.succeeded, 'failed', b.failed,
                                             'cancelled', b.cancelled));
    UPDATE {s}.batches SET completion_job_id = job_id WHERE id = p_batch;
END
$$;

-- Stops a batch's children: marks the running ones so they are not retried (they finish their
-- current run) and cancels the waiting ones through retire(). Rows locked by someone else are
-- skipped: a concurrent retire() is finishing them (and will count them), a concurrent claim is
-- taking them (its worker drops them at its next round, see drop_cancelled()), a concurrent lease
-- renewal holds a running one (requeue() then refuses its retry, since the batch is no longer
-- open). Waiting on them instead could deadlock with a retire() that holds them and waits for this
-- batch's row lock.
CREATE FUNCTION {s}.batch_stop_children(p_batch bigint, p_reason text, p_retain boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    running bigint[];
    waiting bigint[];
BEGIN
    WITH marked AS (
        UPDATE {s}.jobs j SET cancel_requested = true
        WHERE j.id IN (SELECT r.id FROM {s}.jobs r
                       WHERE r.batch_id = p_batch AND r.state = 'running' AND NOT r.cancel_requested
                       FOR UPDATE SKIP LOCKED)
        RETURNING j.id
    )
    SELECT coalesce(array_agg(m.id), '{}') INTO running FROM marked m;
    -- Their handlers are told to stop, as for a cancel (see cancel()).
    PERFORM pg_notify('{c}', 'cancel ' || r) FROM unnest(running) r;
    SELECT coalesce(array_agg(w.id ORDER BY w.id), '{}') INTO waiting
    FROM (SELECT c.id FROM {s}.jobs c
          WHERE c.batch_id = p_batch AND c.state <> 'running'
          FOR UPDATE SKIP LOCKED) w;
    IF cardinality(waiting) > 0 THEN
        PERFORM {s}.retire(waiting,
                           array_fill(NULL::bigint, ARRAY[cardinality(waiting)]),
                           array_fill('cancelled'::text, ARRAY[cardinality(waiting)]),
                           array_fill(p_reason, ARRAY[cardinality(waiting)]),
                           array_fill(NULL::jsonb, ARRAY[cardinality(waiting)]),
                           p_retain);
    END IF;
    -- Siblings claimed ahead and not started yet are dropped by their workers at their next
    -- round (drop_cancelled() also catches the ones whose rows were locked above).
    PERFORM {s}.note_change();
END
$$;

-- The state a batch with these counts ends in: failed if any child failed, else cancelled if any
-- was cancelled, else completed.
CREATE FUNCTION {s}.batch_outcome(p_failed int, p_cancelled int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_failed > 0 THEN 'failed'
                WHEN p_cancelled > 0 THEN 'cancelled'
                ELSE 'completed' END
$$;

-- Counts children that reached a terminal state (called by retire() only). The row lock and the
-- re-read make this the only transaction that can see the batch leave 'open'; that one enqueues
-- the completion job, and on a fail-fast batch's first failure stops the siblings.
CREATE FUNCTION {s}.batch_tally(p_batch bigint, p_succeeded int, p_failed int, p_cancelled int,
                                p_retain boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    old_row {s}.batches;
    new_row {s}.batches;
BEGIN
    SELECT * INTO old_row FROM {s}.batches WHERE id = p_batch FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE {s}.batches b
    SET pending = b.pending - (p_succeeded + p_failed + p_cancelled),
        succeeded = b.succeeded + p_succeeded,
        failed = b.failed + p_failed,
        cancelled = b.cancelled + p_cancelled,
        state = CASE WHEN b.state <> 'open' THEN b.state
                     WHEN b.fail_fast AND p_failed > 0 THEN 'failed'
                     WHEN b.pending - (p_succeeded + p_failed + p_cancelled) <= 0
                         THEN {s}.batch_outcome(b.failed + p_failed, b.cancelled + p_cancelled)
                     ELSE 'open' END
    WHERE b.id = p_batch
    RETURNING b.* INTO new_row;
    IF old_row.state = 'open' AND new_row.state <> 'open' THEN
        UPDATE {s}.batches SET finished_at = now() WHERE id = p_batch;
        IF new_row.fail_fast AND new_row.state = 'failed' THEN
            PERFORM {s}.batch_stop_children(p_batch, 'cancelled by fail-fast: a sibling failed',
                                            p_retain);
        END IF;
        PERFORM {s}.batch_finish(p_batch);
    END IF;
END
$$;

-- Creates an open, empty batch; its children are inserted next in the same transaction, then
-- batch_seal() counts them.
CREATE FUNCTION {s}.batch_open(p_queue text, p_fail_fast boolean, p_on_complete_task text,
                               p_on_complete_queue text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    IF p_queue IS NULL OR p_queue = '' THEN
        RAISE EXCEPTION 'forkq: a batch needs a queue' USING ERRCODE = '22023';
    END IF;
    INSERT INTO {s}.batches (queue, fail_fast, on_complete_task, on_complete_queue)
    VALUES (p_queue, coalesce(p_fail_fast, false), p_on_complete_task, p_on_complete_queue)
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- Counts the children inserted since batch_open() (in the same, uncommitted transaction, so no
-- child can have finished yet) and sets total and pending. A batch without children completes here
-- and enqueues its completion job.
CREATE FUNCTION {s}.batch_seal(p_batch bigint) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    SELECT count(*) INTO n FROM {s}.jobs WHERE batch_id = p_batch;
    UPDATE {s}.batches
    SET total = n, pending = n,
        state = CASE WHEN n = 0 THEN 'completed' ELSE 'open' END,
        finished_at = CASE WHEN n = 0 THEN now() END
    WHERE id = p_batch AND state = 'open';
    IF n = 0 THEN
        PERFORM {s}.batch_finish(p_batch);
    END IF;
    RETURN n;
END
$$;

-- Creates a batch from plain SQL, for producers in any language: p_jobs is a JSON array of
-- {"task": .., "payload": .., "priority": .., "run_at": .., "max_attempts": .., "unique_key": ..,
-- "queue": .., "concurrency_key": .., "timeout_seconds": .., "backoff_seconds": ..} (only task is
-- required; queue defaults to the batch's). Parent and children commit
-- together with the caller's transaction; workers are notified at commit. Returns the batch id.
CREATE FUNCTION {s}.enqueue_batch(
    p_queue             text,
    p_jobs              jsonb,
    p_fail_fast         boolean DEFAULT false,
    p_on_complete_task  text DEFAULT NULL,
    p_on_complete_queue text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    IF jsonb_typeof(p_jobs) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'forkq: the jobs of a batch must be a JSON array' USING ERRCODE = '22023';
    END IF;
    new_id := {s}.batch_open(p_queue, p_fail_fast, p_on_complete_task, p_on_complete_queue);
    PERFORM {s}.enqueue_job(coalesce(x.queue, p_queue), x.task, coalesce(x.payload, '{}'),
                            coalesce(x.priority, 0), x.run_at, coalesce(x.max_attempts, 25),
                            x.unique_key, new_id, concurrency_key => x.concurrency_key,
                            timeout_seconds => x.timeout_seconds,
                            backoff_seconds => x.backoff_seconds)
    FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(job, n),
         jsonb_to_record(e.job) AS x(queue text, task text, payload jsonb, priority int,
                                     run_at timestamptz, max_attempts int, unique_key text,
                                     concurrency_key text, timeout_seconds float8,
                                     backoff_seconds float8)
    ORDER BY e.n;
    PERFORM {s}.batch_seal(new_id);
    RETURN new_id;
END
$$;

-- Cancels an open batch: it becomes 'cancelled', its waiting children are cancelled, its running
-- children finish their current run without retries, and its completion job is enqueued. Returns
-- the batch's state afterwards and whether this call changed it (false for a batch that had
-- finished already); no row when there is no such batch.
CREATE FUNCTION {s}.batch_cancel(p_batch bigint, p_retain boolean,
                                 OUT state text, OUT changed boolean)
RETURNS SETOF record LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    current text;
BEGIN
    SELECT b.state INTO current FROM {s}.batches b WHERE b.id = p_batch FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF current <> 'open' THEN
        state := current;
        changed := false;
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE {s}.batches b SET state = 'cancelled', finished_at = now() WHERE b.id = p_batch;
    PERFORM {s}.batch_stop_children(p_batch, 'cancelled with its batch', p_retain);
    PERFORM {s}.batch_finish(p_batch);
    state := 'cancelled';
    changed := true;
    RETURN NEXT;
END
$$;

-- Repairs open batches whose counters disagree with their children's rows, or whose children are
-- all terminal: recomputes the counters from the rows (exact for open batches, whose children are
-- always archived and never purged), finishes the batch when nothing is pending (completion job
-- once), and returns what it changed. A batch locked by a concurrent ack is skipped until the next
-- pass: the ack keeps it consistent. Finished batches are history and are not rechecked (their
-- children may have been purged).
CREATE FUNCTION {s}.batch_repair(p_limit int, p_retain boolean)
RETURNS TABLE (batch_id bigint, old_counts jsonb, new_counts jsonb) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    candidate bigint;
    b         {s}.batches;
    fixed     {s}.batches;
    live      int;
    s_count   int;
    f_count   int;
    c_count   int;
    new_state text;
BEGIN
    FOR candidate IN
        SELECT o.id FROM {s}.batches o WHERE o.state = 'open' ORDER BY o.id LIMIT p_limit
    LOOP
        SELECT * INTO b FROM {s}.batches o WHERE o.id = candidate AND o.state = 'open'
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        SELECT count(*) INTO live FROM {s}.jobs j WHERE j.batch_id = candidate;
        SELECT count(*) FILTER (WHERE a.state = 'completed'),
               count(*) FILTER (WHERE a.state = 'failed'),
               count(*) FILTER (WHERE a.state = 'cancelled')
        INTO s_count, f_count, c_count
        FROM {s}.jobs_archive a WHERE a.batch_id = candidate;
        new_state := CASE WHEN b.fail_fast AND f_count > 0 THEN 'failed'
                          WHEN live > 0 THEN 'open'
                          ELSE {s}.batch_outcome(f_count, c_count) END;
        CONTINUE WHEN (b.total, b.pending, b.succeeded, b.failed, b.cancelled, b.state)
            = (live + s_count + f_count + c_count, live, s_count, f_count, c_count, new_state);
        UPDATE {s}.batches o
        SET total = live + s_count + f_count + c_count, pending = live,
            succeeded = s_count, failed = f_count, cancelled = c_count, state = new_state,
            finished_at = CASE WHEN new_state <> 'open' THEN now() END
        WHERE o.id = candidate
        RETURNING o.* INTO fixed;
        IF new_state <> 'open' THEN
            IF fixed.fail_fast AND new_state = 'failed' THEN
                PERFORM {s}.batch_stop_children(candidate,
                                                'cancelled by fail-fast: a sibling failed',
                                                p_retain);
            END IF;
            PERFORM {s}.batch_finish(candidate);
            SELECT * INTO fixed FROM {s}.batches o WHERE o.id = candidate;
        END IF;
        batch_id := candidate;
        old_counts := jsonb_build_object('state', b.state, 'total', b.total, 'pending', b.pending,
                                         'succeeded', b.succeeded, 'failed', b.failed,
                                         'cancelled', b.cancelled);
        new_counts := jsonb_build_object('state', fixed.state, 'total', fixed.total,
                                         'pending', fixed.pending, 'succeeded', fixed.succeeded,
                                         'failed', fixed.failed, 'cancelled', fixed.cancelled,
                                         'completion_job_id', fixed.completion_job_id);
        RETURN NEXT;
    END LOOP;
END
$$;
