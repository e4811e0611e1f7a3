-- Time: unique windows and periodic schedules. Nothing here is read or written by the claim and
-- settle path; a job without a unique key never touches these tables.

-- A unique key taken for a while (`unique_for`): enqueue_job() refuses the key until expires_at,
-- whatever became of the job that took it. An expired row is taken over by the next enqueue of
-- its key, or deleted by the maintenance pass.
CREATE TABLE {s}.unique_windows (
    key        text PRIMARY KEY,
    -- The job that took the window (set in the same transaction that opened it).
    job_id     bigint,
    expires_at timestamptz NOT NULL
);
-- Serves the purge of expired windows.
CREATE INDEX unique_windows_expiry_idx ON {s}.unique_windows (expires_at);

-- Schedules, as declared by the daemons' schedule files (FORKQ_SCHEDULES). The definition is the
-- one of the daemon that started last (declared_at): the others follow it and say so in their log.
--
-- ticks_after is the schedule's tick record: a tick is enqueued by the one transaction that moves
-- ticks_after forward to it, under the row's lock (schedule_fire). It only moves forward, so a tick
-- is enqueued once across every daemon, and a tick at or before it never is. It starts at the
-- schedule's creation, and moves to the present when its timing (cron, time zone, missed-ticks
-- policy) changes, so nothing from before the change is caught up.
CREATE TABLE {s}.schedules (
    name         text PRIMARY KEY CHECK (name <> '' AND octet_length(name) <= 128),
    definition   jsonb NOT NULL,
    -- Bumped whenever the definition changes, so a daemon firing an older one is told.
    revision     int NOT NULL DEFAULT 1,
    declared_by  text NOT NULL,
    -- When the declaring daemon started; a daemon that started earlier does not override it.
    declared_at  timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    ticks_after  timestamptz NOT NULL DEFAULT now(),
    -- The latest tick enqueued, and the latest job the schedule enqueued (tick or manual run).
    last_tick_at timestamptz,
    last_run_at  timestamptz,
    last_job_id  bigint
);

-- The schedules named in p_names (every one when null), as daemons and the CLI read them: times
-- in seconds since the epoch.
CREATE FUNCTION {s}.schedule_state(p_names text[])
RETURNS TABLE (name text, definition jsonb, revision int, declared_by text, declared_at float8,
               ticks_after float8, last_tick_at float8, last_run_at float8, last_job_id bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.name, s.definition, s.revision, s.declared_by,
           extract(epoch FROM s.declared_at)::float8, extract(epoch FROM s.ticks_after)::float8,
           extract(epoch FROM s.last_tick_at)::float8, extract(epoch FROM s.last_run_at)::float8,
           s.last_job_id
    FROM {s}.schedules s
    WHERE p_names IS NULL OR s.name = ANY(p_names)
    ORDER BY s.name
$$;

-- Declares the schedules of one daemon's file. Each name takes the given definition unless a
-- daemon that started later declared it (rows are locked in name order, so concurrent
-- declarations cannot deadlock). Returns what the database holds for those names afterwards,
-- which is what the daemon follows.
CREATE FUNCTION {s}.schedule_declare(p_names text[], p_definitions jsonb[],
                                     p_started_at timestamptz, p_declared_by text)
RETURNS TABLE (name text, definition jsonb, revision int, declared_by text, declared_at float8,
               ticks_after float8, last_tick_at float8, last_run_at float8, last_job_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO {s}.schedules AS s (name, definition, declared_by, declared_at)
    SELECT d.name, d.definition, p_declared_by, p_started_at
    FROM unnest(p_names, p_definitions) AS d(name, definition)
    ORDER BY d.name
    ON CONFLICT ON CONSTRAINT schedules_pkey DO UPDATE
    SET definition = EXCLUDED.definition,
        revision = s.revision + (s.definition IS DISTINCT FROM EXCLUDED.definition)::int,
        declared_by = EXCLUDED.declared_by,
        declared_at = EXCLUDED.declared_at,
        ticks_after = CASE
            WHEN (s.definition - '{queue,task,payload,priority,max_attempts}'::text[])
                 IS DISTINCT FROM
                 (EXCLUDED.definition - '{queue,task,payload,priority,max_attempts}'::text[])
            THEN greatest(s.ticks_after, now())
            ELSE s.ticks_after END
    WHERE s.declared_at <= EXCLUDED.declared_at;
    RETURN QUERY SELECT * FROM {s}.schedule_state(p_names);
END
$$;

-- Enqueues due ticks: (name, tick, revision) triples, in order (the caller sorts them by name,
-- then tick). A tick is enqueued when the schedule is still at that revision and the tick lies
-- after its ticks_after, which then moves to it; the job runs at the tick's time. Returns, per
-- triple, the job enqueued (null when another daemon had enqueued the tick already) and the
-- schedule's current revision (null when it is gone).
CREATE FUNCTION {s}.schedule_fire(p_names text[], p_ticks timestamptz[], p_revisions int[])
RETURNS TABLE (name text, tick timestamptz, job_id bigint, revision int)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    i   int;
    s   {s}.schedules;
    d   jsonb;
    job bigint;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_names), 0) LOOP
        SELECT * INTO s FROM {s}.schedules x WHERE x.name = p_names[i] FOR UPDATE;
        job := NULL;
        IF FOUND AND s.revision = p_revisions[i] AND p_ticks[i] > s.ticks_after THEN
            d := s.definition;
            SELECT e.id INTO job
            FROM {s}.enqueue_job(d->>'queue', d->>'task', d->'payload', (d->>'priority')::int,
                                 p_ticks[i], (d->>'max_attempts')::int) e;
            UPDATE {s}.schedules x
            SET ticks_after = p_ticks[i], last_tick_at = p_ticks[i], last_run_at = now(),
                last_job_id = job
            WHERE x.name = p_names[i];
        END IF;
        name := p_names[i];
        tick := p_ticks[i];
        job_id := job;
        revision := s.revision;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Enqueues one run of a schedule now (`forkq schedule run`), outside its ticks: ticks_after does
-- not move. Returns the job, or null when there is no such schedule.
CREATE FUNCTION {s}.schedule_run(p_name text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    d   jsonb;
    job bigint;
BEGIN
    SELECT x.definition INTO d FROM {s}.schedules x WHERE x.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT e.id INTO job
    FROM {s}.enqueue_job(d->>'queue', d->>'task', d->'payload', (d->>'priority')::int, NULL,
                         (d->>'max_attempts')::int) e;
    UPDATE {s}.schedules x SET last_run_at = now(), last_job_id = job WHERE x.name = p_name;
    RETURN job;
END
$$;
