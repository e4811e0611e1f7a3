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
-- starting them (they run once), a concurrent lease renewal holds a running one (requeue() then
-- refuses its retry, since the batch is no longer open). Waiting on them instead could deadlock
-- with a retire() that holds them and waits for this batch's row lock.
CREATE FUNCTION {s}.batch_stop_children(p_batch bigint, p_reason text, p_retain boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    waiting bigint[];
BEGIN
    UPDATE {s}.jobs j SET cancel_requested = true
    WHERE j.id IN (SELECT r.id FROM {s}.jobs r
                   WHERE r.batch_id = p_batch AND r.state = 'running' AND NOT r.cancel_requested
                   FOR UPDATE SKIP LOCKED);
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

-- requeue() as in 001, plus: a child of a batch that is no longer open is not sent back (settle
-- then retires it). Fail-fast marks the running siblings it can lock; this catches the ones it
-- could not (a lease renewal held the row at that moment), so no child of a failed batch retries.
CREATE OR REPLACE FUNCTION {s}.requeue(
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
          AND j.id = ANY(p_ids)
          AND j.state = 'running' AND NOT j.cancel_requested
          AND (j.batch_id IS NULL
               OR NOT EXISTS (SELECT 1 FROM {s}.batches b
                              WHERE b.id = j.batch_id AND b.state <> 'open'))
        RETURNING j.id
    )
    SELECT coalesce(array_agg(r.id), '{}') FROM r;
$$;

-- retire() as in 001, plus: children of batches are always archived (even with retention 0, so an
-- open batch's counters can be recomputed from its rows), and each batch's counters are updated
-- here, in the transaction of the terminal ack. Batches are locked in id order (no deadlocks).
CREATE OR REPLACE FUNCTION {s}.retire(
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
                                      result)
        SELECT g.id, g.queue, g.task, g.payload, g.priority, g.final_state, g.attempt,
               g.max_attempts, g.unique_key, g.batch_id, g.created_at, g.final_error,
               g.final_result
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

-- retry() as in 001, plus: a revived batch child counts as pending again (and no longer as failed
-- or cancelled). A batch that already finished stays finished; its completion job is not sent again.
CREATE OR REPLACE FUNCTION {s}.retry(p_id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
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
                              max_attempts, unique_key, batch_id, created_at, last_error)
        OVERRIDING SYSTEM VALUE
        SELECT r.id, r.queue, r.task, r.payload, r.priority, 'available', now(), 0,
               r.max_attempts, r.unique_key, r.batch_id, r.created_at, r.last_error
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
-- "queue": ..} (only task is required; queue defaults to the batch's). Parent and children commit
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
    PERFORM {s}.enqueue(coalesce(x.queue, p_queue), x.task, coalesce(x.payload, '{}'),
                        coalesce(x.priority, 0), x.run_at, coalesce(x.max_attempts, 25),
                        x.unique_key, new_id)
    FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(job, n),
         jsonb_to_record(e.job) AS x(queue text, task text, payload jsonb, priority int,
                                     run_at timestamptz, max_attempts int, unique_key text)
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
