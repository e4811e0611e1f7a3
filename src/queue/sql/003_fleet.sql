-- The fleet: hosts in the database, and the archive indexes the job browser walks.

-- One row per daemon boot, written every FORKQ_HOST_INTERVAL_SECONDS by that daemon's probe (which
-- holds a connection anyway; the supervisor never connects). A row not written for
-- three intervals is shown as gone; gone rows are pruned an hour after they were last seen.
CREATE TABLE {s}.hosts (
    boot             text PRIMARY KEY,
    host             text NOT NULL,
    -- Every lease owner of this boot starts with it: 'host/boot/'.
    lease_prefix     text NOT NULL,
    pid              int NOT NULL,
    version          text NOT NULL,
    queues           text[] NOT NULL,
    concurrency      int NOT NULL,
    alive            int NOT NULL DEFAULT 0,
    busy             int NOT NULL DEFAULT 0,
    crash_looping    int[] NOT NULL DEFAULT '{}',
    slots            jsonb NOT NULL DEFAULT '[]',
    succeeded        bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    jobs_per_second  float8 NOT NULL DEFAULT 0,
    interval_seconds float8 NOT NULL,
    -- Whether every connection of this boot holds the boot's shared session advisory lock
    -- (lock_key), so that another host can tell when none is left (see expire_gone_hosts).
    holds_lock       boolean NOT NULL,
    lock_key         bigint NOT NULL,
    stopping         boolean NOT NULL DEFAULT false,
    started_at       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL DEFAULT now(),
    -- When another host expired this boot's leases because it was gone.
    released_at      timestamptz
);

-- Expires the leases of hosts that are provably gone, so rescue_expired() brings their jobs back
-- at once instead of one lease later. A host qualifies only when all of these hold:
--  * it has not written its row for p_gone_after seconds, and did not say it was stopping;
--  * it declared that every connection of its boot holds the boot's shared advisory lock, and
--    this transaction can take that lock exclusively: no session of the boot exists any more
--    (a host that is only slow to write still has its sessions, so it is never touched);
--  * this session began before the host's last write: the server has run without a break since
--    the host was last connected to it, so its sessions were closed by their processes' exit (or
--    by the server's dead-client timeout, which the caller requires to be at least one lease),
--    not by a restart or a failover of the database that every live host is still recovering from.
-- The exclusive lock is held until commit, so no process of that boot can reconnect halfway.
-- Returns the hosts and how many leases each lost.
CREATE FUNCTION {s}.expire_gone_hosts(p_gone_after float8)
RETURNS TABLE (boot text, host text, expired int) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    h        {s}.hosts;
    observed timestamptz;
    n        int;
BEGIN
    -- This session's row alone: pg_stat_activity would read every session's.
    SELECT a.backend_start INTO observed FROM pg_stat_get_activity(pg_backend_pid()) a;
    FOR h IN
        SELECT * FROM {s}.hosts x
        WHERE x.holds_lock AND NOT x.stopping AND x.released_at IS NULL
          AND x.last_seen < now() - make_interval(secs => p_gone_after)
          AND x.last_seen > observed
        ORDER BY x.last_seen
        FOR UPDATE SKIP LOCKED
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(h.lock_key);
        UPDATE {s}.jobs j SET lease_expires_at = '-infinity'
        WHERE {s}.leased_under(j.lease_owner, h.lease_prefix) AND j.state = 'running';
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE {s}.hosts x SET released_at = now() WHERE x.boot = h.boot;
        boot := h.boot;
        host := h.host;
        expired := n;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The dead letter (failed and cancelled jobs) in id order, for the job browser's keyset pages over
-- all queues and per queue, and for the dashboard's per-queue counts. Partial: completed jobs, the
-- archive's bulk, pay nothing for them.
CREATE INDEX jobs_archive_dead_idx ON {s}.jobs_archive (id) WHERE state <> 'completed';
CREATE INDEX jobs_archive_dead_queue_idx ON {s}.jobs_archive (queue, id) WHERE state <> 'completed';
