-- Time: unique windows. Nothing here is read or written by the claim and
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
