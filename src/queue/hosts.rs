//! Hosts in the database: each daemon boot's row, the list the CLI and the dashboard show, and
//! the early return of the jobs of hosts that are provably gone.
//!
//! Why the early return cannot take a live host's jobs (docs/fleet.md has the long form): every
//! connection of a boot (its probe's and each child's) holds the boot's shared session advisory
//! lock, which PostgreSQL drops only when that session ends. Another host may expire the boot's
//! leases only when it can take that lock exclusively (no session of the boot is left), the boot
//! has not written its row for [`GONE_AFTER_INTERVALS`] intervals, and its own session is older
//! than the boot's last write (the server did not restart or fail over meanwhile, which would have
//! closed every session). A slow writer still has its sessions, so it keeps its leases. A
//! network partition leaves the vanished host's sessions open until the server's dead-client
//! timeout closes them; the caller refuses to expire anything while that timeout is shorter than
//! one lease, so a partition never returns jobs sooner than lease expiry would.

use std::time::Duration;

use postgres::types::{ToSql, Type};
use postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use super::sql::{self, advisory_key, render};
use super::QueueError;

/// A host not seen for this many of its intervals is gone.
pub const GONE_AFTER_INTERVALS: u32 = 3;
/// Rows of hosts not seen for this long are deleted.
pub const PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// The key of a boot's session lock in `schema`.
pub fn lock_key(schema: &str, boot: &str) -> i64 {
    advisory_key(&format!("boot {boot}"), schema)
}

/// The statement that takes a boot's shared session lock, with the key written in (a number
/// computed here, never input), so a connection can send it with its other session settings in
/// the round trip it makes anyway.
pub fn hold_lock_statement(schema: &str, boot: &str) -> String {
    sql::HOLD_BOOT_LOCK.replace("$1", &lock_key(schema, boot).to_string())
}

/// What a host is doing, as it last said: written every interval, shown by `forkq hosts`.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// The queues it consumes.
    pub queues: Vec<String>,
    /// Children it should have.
    pub concurrency: i32,
    /// Children alive.
    pub alive: i32,
    /// Children running a job.
    pub busy: i32,
    /// Slots that are crash-looping.
    pub crash_looping: Vec<i32>,
    /// Each slot as `/livez` shows it.
    pub slots: Value,
    /// Jobs that succeeded since the boot.
    pub succeeded: i64,
    /// Jobs that failed for good since the boot.
    pub failed: i64,
    /// Jobs finished per second over the last interval.
    pub jobs_per_second: f64,
}

/// What a daemon writes about itself every interval.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// The boot id (16 hex digits).
    pub boot: String,
    /// The host name.
    pub host: String,
    /// The prefix of every lease owner of this boot.
    pub lease_prefix: String,
    /// The supervisor's pid.
    pub pid: i32,
    /// The forkq version.
    pub version: String,
    /// What it is doing.
    pub workload: Workload,
    /// How often the row is written.
    pub interval: Duration,
    /// Every connection of this boot holds its session lock (`FORKQ_HOST_RELEASE=1`).
    pub holds_lock: bool,
    /// The daemon is shutting down.
    pub stopping: bool,
    /// When the supervisor started, in seconds since the Unix epoch.
    pub started_unix: f64,
}

/// Writes `report` and deletes the rows of hosts gone for [`PRUNE_AFTER`]; returns how many hosts
/// serve the schema now (not gone, not stopping; this one included).
pub fn record(
    client: &mut impl GenericClient,
    schema: &str,
    report: &HostReport,
) -> Result<i64, QueueError> {
    let r = report;
    let w = &r.workload;
    let key = lock_key(schema, &r.boot);
    let params: [(&(dyn ToSql + Sync), Type); 19] = [
        (&r.boot, Type::TEXT),
        (&r.host, Type::TEXT),
        (&r.lease_prefix, Type::TEXT),
        (&r.pid, Type::INT4),
        (&r.version, Type::TEXT),
        (&w.queues, Type::TEXT_ARRAY),
        (&w.concurrency, Type::INT4),
        (&w.alive, Type::INT4),
        (&w.busy, Type::INT4),
        (&w.crash_looping, Type::INT4_ARRAY),
        (&w.slots, Type::JSONB),
        (&w.succeeded, Type::INT8),
        (&w.failed, Type::INT8),
        (&w.jobs_per_second, Type::FLOAT8),
        (&r.interval.as_secs_f64(), Type::FLOAT8),
        (&r.holds_lock, Type::BOOL),
        (&key, Type::INT8),
        (&r.stopping, Type::BOOL),
        (&r.started_unix, Type::FLOAT8),
    ];
    client.query_typed(&render(sql::HOST_UPSERT, schema), &params)?;
    client.query_typed(
        &render(sql::HOST_PRUNE, schema),
        &[(&PRUNE_AFTER.as_secs_f64(), Type::FLOAT8)],
    )?;
    let gone_after = r.interval * GONE_AFTER_INTERVALS;
    Ok(client
        .query_typed_one(
            &render(sql::HOSTS_SERVING, schema),
            &[(&gone_after.as_secs_f64(), Type::FLOAT8)],
        )?
        .get(0))
}

/// A host whose leases were expired early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Its boot id.
    pub boot: String,
    /// Its host name.
    pub host: String,
    /// How many running jobs it held.
    pub jobs: i32,
}

/// Brings back the jobs of every provably gone host (see the module doc) at once, in one
/// transaction: their leases are expired and `rescue_expired` returns them to the queue as
/// lease expiry would (charged, or dead-lettered without attempts left). Returns the hosts.
pub fn expire_gone(
    client: &mut postgres::Client,
    schema: &str,
    gone_after: Duration,
    retain: bool,
) -> Result<Vec<Expired>, QueueError> {
    let mut tx = client.transaction()?;
    let expired: Vec<Expired> = tx
        .query_typed(
            &render(sql::EXPIRE_GONE_HOSTS, schema),
            &[(&gone_after.as_secs_f64(), Type::FLOAT8)],
        )?
        .iter()
        .map(|row| Expired {
            boot: row.get(0),
            host: row.get(1),
            jobs: row.get(2),
        })
        .collect();
    if expired.iter().any(|e| e.jobs > 0) {
        tx.query_typed_one(
            &render(sql::RESCUE_EXPIRED, schema),
            &[(&retain, Type::BOOL)],
        )?;
    }
    tx.commit()?;
    Ok(expired)
}

/// The least time the server needs to close the session of a client that vanished from the
/// network; `None` over a Unix socket, where that cannot happen.
pub fn dead_client_timeout(
    client: &mut impl GenericClient,
) -> Result<Option<Duration>, QueueError> {
    Ok(client
        .query_typed_one(sql::DEAD_CLIENT_SECONDS, &[])?
        .get::<_, Option<f64>>(0)
        .map(Duration::from_secs_f64))
}

/// One host as `forkq hosts` and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    /// Its boot id.
    pub boot: String,
    /// Its host name.
    pub host: String,
    /// `running`, `stopping`, `gone` (not seen for [`GONE_AFTER_INTERVALS`] intervals) or
    /// `stopped` (gone after it said it was stopping).
    pub status: String,
    /// The supervisor's pid.
    pub pid: i32,
    /// The forkq version.
    pub version: String,
    /// What it was doing at its last write.
    #[serde(flatten)]
    pub workload: Workload,
    /// When the supervisor started.
    pub started_at: String,
    /// When the row was last written.
    pub last_seen: String,
    /// Seconds since then.
    pub seconds_since_seen: f64,
    /// When another host brought its jobs back early, if one did.
    pub released_at: Option<String>,
}

/// Every recorded host (gone ones until they are pruned).
pub fn list(client: &mut impl GenericClient, schema: &str) -> Result<Vec<HostRow>, QueueError> {
    Ok(client
        .query_typed(&render(sql::HOSTS_LIST, schema), &[])?
        .iter()
        .map(|row| {
            let interval: f64 = row.get(13);
            let stopping: bool = row.get(14);
            let since: f64 = row.get(17);
            let gone = since > interval * f64::from(GONE_AFTER_INTERVALS);
            let status = match (gone, stopping) {
                (false, false) => "running",
                (false, true) => "stopping",
                (true, false) => "gone",
                (true, true) => "stopped",
            };
            HostRow {
                boot: row.get(0),
                host: row.get(1),
                status: status.into(),
                pid: row.get(2),
                version: row.get(3),
                workload: Workload {
                    queues: row.get(4),
                    concurrency: row.get(5),
                    alive: row.get(6),
                    busy: row.get(7),
                    crash_looping: row.get(8),
                    slots: row.get(9),
                    succeeded: row.get(10),
                    failed: row.get(11),
                    jobs_per_second: row.get(12),
                },
                started_at: row.get(15),
                last_seen: row.get(16),
                seconds_since_seen: since,
                released_at: row.get(18),
            }
        })
        .collect())
}
