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
    lease_owner      text,
    lease_token      bigint,
    lease_expires_at timestamptz,
    unique_key       text,
    batch_id         bigint,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_error       text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);

-- Serves the claim: equality on queue, then exactly the claim's ORDER BY, only claimable rows.
CREATE INDEX jobs_claim_idx ON {s}.jobs (queue, priority, run_at, id) WHERE state <> 'running';
-- Serves lease renewal and release by owner, and the rescue of expired leases.
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
    result       jsonb
);
CREATE INDEX jobs_archive_queue_state_idx ON {s}.jobs_archive (queue, state);
CREATE INDEX jobs_archive_retention_idx ON {s}.jobs_archive (finished_at) WHERE state <> 'failed';
CREATE INDEX jobs_archive_batch_idx ON {s}.jobs_archive (batch_id) WHERE batch_id IS NOT NULL;

-- Enqueues one job and returns its id; with a live unique key already present, returns that job's
-- id instead. Notifies idle workers (delivered only when the caller's transaction commits).
CREATE FUNCTION {s}.enqueue(
    queue        text,
    task         text,
    payload      jsonb DEFAULT '{}',
    priority     int DEFAULT 0,
    run_at       timestamptz DEFAULT NULL,
    max_attempts int DEFAULT 25,
    unique_key   text DEFAULT NULL,
    batch_id     bigint DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF queue IS NULL OR queue = '' OR task IS NULL OR task = '' THEN
        RAISE EXCEPTION 'forkq: queue and task must be non-empty' USING ERRCODE = '22023';
    END IF;
    LOOP
        INSERT INTO {s}.jobs AS j (queue, task, payload, priority, state, run_at, max_attempts,
                                   unique_key, batch_id)
        VALUES (enqueue.queue, enqueue.task, coalesce(enqueue.payload, '{}'), enqueue.priority,
                CASE WHEN enqueue.run_at > now() THEN 'scheduled' ELSE 'available' END,
                coalesce(enqueue.run_at, now()), coalesce(enqueue.max_attempts, 25),
                enqueue.unique_key, enqueue.batch_id)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO new_id;
        IF new_id IS NOT NULL THEN
            IF enqueue.run_at IS NULL OR enqueue.run_at <= now() THEN
                PERFORM pg_notify('{c}', enqueue.queue);
            END IF;
            RETURN new_id;
        END IF;
        SELECT j.id INTO new_id FROM {s}.jobs j WHERE j.unique_key = enqueue.unique_key;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        -- The conflicting job finished between the insert and the select: insert again.
    END LOOP;
END
$$;

-- The one way a job leaves the hot table: deleted and, unless it completed with retention 0,
-- archived with its final state. A non-null token fences the removal to that lease. Returns the ids
-- removed. A job marked for cancellation that did not complete ends cancelled.
CREATE FUNCTION {s}.retire(
    p_ids     bigint[],
    p_tokens  bigint[],
    p_states  text[],
    p_errors  text[],
    p_results jsonb[],
    p_retain  boolean
) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
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
                                      result)
        SELECT g.id, g.queue, g.task, g.payload, g.priority, g.final_state, g.attempt,
               g.max_attempts, g.unique_key, g.batch_id, g.created_at, g.final_error,
               g.final_result
        FROM gone g
        WHERE p_retain OR g.final_state <> 'completed'
    )
    SELECT g.id FROM gone g;
END
$$;

-- Claims up to p_limit jobs from p_queues, strictly in the order the queues are given, each queue
-- by (priority, run_at, id). Sets the lease and bumps the attempt.
CREATE FUNCTION {s}.claim(p_queues text[], p_limit int, p_owner text, p_lease_seconds float8)
RETURNS TABLE (id bigint, queue text, task text, payload jsonb, priority smallint, attempt int,
               max_attempts int, lease_token bigint, batch_id bigint, refused bigint[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q         text;
    got       int;
    remaining int := p_limit;
BEGIN
    FOREACH q IN ARRAY p_queues LOOP
        EXIT WHEN remaining <= 0;
        -- RETURNING follows the join, not the pick: sort again so jobs run in claim order.
        RETURN QUERY
        WITH claimed AS (
            UPDATE {s}.jobs j
            SET state = 'running',
                attempt = j.attempt + 1,
                lease_owner = p_owner,
                lease_token = (random() * 9.2e18)::bigint,
                lease_expires_at = now() + make_interval(secs => p_lease_seconds)
            FROM (
                SELECT c.id FROM {s}.jobs c
                WHERE c.queue = q AND c.state <> 'running' AND c.run_at <= now()
                ORDER BY c.priority, c.run_at, c.id
                LIMIT remaining
                FOR UPDATE SKIP LOCKED
            ) picked
            WHERE j.id = picked.id
            RETURNING j.*
        )
        SELECT c.id, c.queue, c.task, c.payload, c.priority, c.attempt, c.max_attempts,
               c.lease_token, c.batch_id, NULL::bigint[]
        FROM claimed c
        ORDER BY c.priority, c.run_at, c.id;
        GET DIAGNOSTICS got = ROW_COUNT;
        remaining := remaining - got;
    END LOOP;
END
$$;

-- Sends the jobs whose outcome is 'retry' back to the queue after their delay, fenced by lease
-- token; a job marked for cancellation is not sent back (settle then retires it). Returns the ids
-- sent back. Its own function so the batches migration can add its condition here alone.
CREATE FUNCTION {s}.requeue(
    p_ids      bigint[],
    p_tokens   bigint[],
    p_outcomes text[],
    p_errors   text[],
    p_delays   float8[]
) RETURNS bigint[] LANGUAGE sql AS $$
    WITH r AS (
        UPDATE {s}.jobs j
        SET state = 'retryable',
            run_at = now() + make_interval(secs => a.delay),
            last_error = coalesce(a.error, j.last_error),
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
        FROM unnest(p_ids, p_tokens, p_outcomes, p_errors, p_delays)
            AS a(id, token, outcome, error, delay)
        WHERE a.outcome = 'retry' AND j.id = a.id AND j.lease_token = a.token
          -- Reach the rows through the primary key, whatever the planner thinks of unnest().
          AND j.id = ANY(p_ids)
          AND j.state = 'running' AND NOT j.cancel_requested
        RETURNING j.id
    )
    SELECT coalesce(array_agg(r.id), '{}') FROM r;
$$;

-- Settles finished jobs, fenced by lease token: 'completed' and 'failed' retire them, 'retry'
-- sends them back after p_delays seconds. Returns the ids it refused (stale leases).
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
    IF NOT 'retry' = ANY(p_outcomes) THEN
        -- The common case, every job finished: one retire, no array rebuilding.
        SELECT coalesce(array_agg(x), '{}') INTO retired
        FROM {s}.retire(p_ids, p_tokens,
                        ARRAY(SELECT CASE WHEN o = 'completed' THEN 'completed' ELSE 'failed' END
                              FROM unnest(p_outcomes) WITH ORDINALITY u(o, n) ORDER BY n),
                        p_errors, p_results, p_retain) AS x;
        RETURN ARRAY(SELECT a.id FROM unnest(p_ids) a(id) WHERE a.id <> ALL(retired));
    END IF;
    retried := {s}.requeue(p_ids, p_tokens, p_outcomes, p_errors, p_delays);

    SELECT coalesce(array_agg(x), '{}') INTO retired
    FROM {s}.retire(
        ARRAY(SELECT a.id FROM unnest(p_ids) WITH ORDINALITY a(id, n) WHERE a.id <> ALL(retried) ORDER BY n),
        ARRAY(SELECT p_tokens[n] FROM unnest(p_ids) WITH ORDINALITY a(id, n) WHERE a.id <> ALL(retried) ORDER BY n),
        ARRAY(SELECT CASE WHEN p_outcomes[n] = 'completed' THEN 'completed' ELSE 'failed' END
              FROM unnest(p_ids) WITH ORDINALITY a(id, n) WHERE a.id <> ALL(retried) ORDER BY n),
        ARRAY(SELECT p_errors[n] FROM unnest(p_ids) WITH ORDINALITY a(id, n) WHERE a.id <> ALL(retried) ORDER BY n),
        ARRAY(SELECT p_results[n] FROM unnest(p_ids) WITH ORDINALITY a(id, n) WHERE a.id <> ALL(retried) ORDER BY n),
        p_retain) AS x;

    RETURN ARRAY(SELECT a.id FROM unnest(p_ids) a(id)
                 WHERE a.id <> ALL(retried) AND a.id <> ALL(retired));
END
$$;

-- Settles the previous round's jobs and claims the next in one round trip. When nothing is claimed
-- but some acks were refused, returns one row with a null id carrying them.
CREATE FUNCTION {s}.settle_and_claim(
    p_ids bigint[], p_tokens bigint[], p_outcomes text[], p_results jsonb[], p_errors text[],
    p_delays float8[], p_retain boolean,
    p_queues text[], p_limit int, p_owner text, p_lease_seconds float8
)
RETURNS TABLE (id bigint, queue text, task text, payload jsonb, priority smallint, attempt int,
               max_attempts int, lease_token bigint, batch_id bigint, refused bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    stale bigint[];
    got   int;
BEGIN
    stale := {s}.settle(p_ids, p_tokens, p_outcomes, p_results, p_errors, p_delays, p_retain);
    IF p_limit > 0 THEN
        RETURN QUERY SELECT c.id, c.queue, c.task, c.payload, c.priority, c.attempt,
                            c.max_attempts, c.lease_token, c.batch_id,
                            CASE WHEN cardinality(stale) > 0 THEN stale END
                     FROM {s}.claim(p_queues, p_limit, p_owner, p_lease_seconds) c;
        GET DIAGNOSTICS got = ROW_COUNT;
    ELSE
        got := 0;
    END IF;
    IF got = 0 AND cardinality(stale) > 0 THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::jsonb, NULL::smallint,
                            NULL::int, NULL::int, NULL::bigint, NULL::bigint, stale;
    END IF;
END
$$;

-- Gives back the jobs held by every lease owner that starts with p_owner: one worker (owners end
-- with '/', so a whole owner names only itself), or every past occupant of a slot (the slot's
-- prefix), so jobs of a child that died before it could release its own predecessor's come back
-- too. The job in flight (p_in_flight, 0 for none) keeps the attempt
-- it was charged and is dead-lettered with p_error when it has no attempts left; jobs that were
-- claimed but never started go back uncharged, except those cancelled meanwhile, which end
-- cancelled instead of running later. Returns how many jobs went back to the queue.
CREATE FUNCTION {s}.release(p_owner text, p_in_flight bigint, p_error text, p_retain boolean)
RETURNS int LANGUAGE plpgsql AS $$
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
        WHERE starts_with(j.lease_owner, p_owner) AND j.state = 'running'
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
    UPDATE {s}.jobs j
    SET state = 'available',
        run_at = least(j.run_at, now()),
        attempt = CASE WHEN j.id = p_in_flight THEN j.attempt ELSE greatest(j.attempt - 1, 0) END,
        last_error = CASE WHEN j.id = p_in_flight THEN coalesce(p_error, j.last_error)
                          ELSE j.last_error END,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
    WHERE starts_with(j.lease_owner, p_owner) AND j.state = 'running';
    GET DIAGNOSTICS released = ROW_COUNT;
    IF released > 0 THEN
        PERFORM pg_notify('{c}', '');
    END IF;
    RETURN released;
END
$$;

-- Returns jobs whose lease expired (their worker or its host died) to the queue, charged one
-- attempt, or to the dead letter when none is left. Rows locked by a concurrent ack or renewal are
-- skipped, and the expiry is re-checked under the row lock, so a job renewed or finished between
-- the read and the write is never touched.
CREATE FUNCTION {s}.rescue_expired(p_retain boolean) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    dead_ids    bigint[];
    dead_tokens bigint[];
    back        int;
BEGIN
    WITH expired AS (
        SELECT j.id, j.lease_token, j.attempt >= j.max_attempts OR j.cancel_requested AS exhausted
        FROM {s}.jobs j
        WHERE j.state = 'running' AND j.lease_expires_at < clock_timestamp()
        FOR UPDATE SKIP LOCKED
    ), revived AS (
        UPDATE {s}.jobs j
        SET state = 'available', run_at = now(),
            last_error = 'lease expired: the worker holding this job stopped renewing it',
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
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
                           array_fill('lease expired and no attempts are left'::text, ARRAY[cardinality(dead_ids)]),
                           array_fill(NULL::jsonb, ARRAY[cardinality(dead_ids)]),
                           p_retain);
    END IF;
    IF back > 0 THEN
        PERFORM pg_notify('{c}', '');
    END IF;
    RETURN back + cardinality(dead_ids);
END
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
-- Returns false when there is no such job or a live job holds its unique key.
CREATE FUNCTION {s}.retry(p_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    moved int;
BEGIN
    WITH revived AS (
        DELETE FROM {s}.jobs_archive a
        WHERE a.id = p_id AND a.state IN ('failed', 'cancelled')
          AND (a.unique_key IS NULL
               OR NOT EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.unique_key = a.unique_key))
        RETURNING a.*
    )
    INSERT INTO {s}.jobs (id, queue, task, payload, priority, state, run_at, attempt,
                          max_attempts, unique_key, batch_id, created_at, last_error)
    OVERRIDING SYSTEM VALUE
    SELECT r.id, r.queue, r.task, r.payload, r.priority, 'available', now(), 0,
           r.max_attempts, r.unique_key, r.batch_id, r.created_at, r.last_error
    FROM revived r;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved > 0 THEN
        PERFORM pg_notify('{c}', '');
    END IF;
    RETURN moved > 0;
END
$$;
