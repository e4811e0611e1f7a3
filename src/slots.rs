//! The shared-memory slot table: how the supervisor, its children and the probe see each other.
//!
//! One anonymous `MAP_SHARED` mapping created by the supervisor before it forks anything, so every
//! child and the probe inherit the same physical pages. Every field is an atomic: no locks (a child
//! killed while holding one would wedge the fleet) and no pointers (addresses mean nothing across
//! processes). The supervisor owns a slot's lifecycle fields (generation, pid, state, restarts,
//! crash counters); the child owns its progress fields (heartbeat, current job, counters).

use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering,
};

use crate::config::MAX_CONCURRENCY;

/// Upper bounds (in milliseconds) of the job duration histogram buckets; the last bucket is +Inf.
pub const LATENCY_BUCKETS_MS: [u64; 11] = [1, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 30_000];

/// Milliseconds on the system-wide monotonic clock, comparable between processes of one boot.
pub fn monotonic_ms() -> u64 {
    monotonic_ns() / 1_000_000
}

/// Nanoseconds on the clock of [`monotonic_ms`].
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// [`monotonic_ms`] at `at`, without reading the clock again: on Linux `Instant` reads the same
/// clock, and the offset between the two is taken once per process (two reads nanoseconds
/// apart, so a result may be a millisecond off when `at` falls that close to a millisecond's
/// edge).
pub fn monotonic_ms_at(at: std::time::Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let &(origin, origin_ns) = ORIGIN.get_or_init(|| (std::time::Instant::now(), monotonic_ns()));
    let ns = match at.checked_duration_since(origin) {
        Some(after) => origin_ns + after.as_nanos() as u64,
        None => origin_ns.saturating_sub(origin.duration_since(at).as_nanos() as u64),
    };
    ns / 1_000_000
}

/// Takes the turn recorded in `last` when at least `interval` has passed since it was last taken
/// (and records now): how processes of one host share a periodic task without a lock.
pub fn take_turn(last: &AtomicU64, interval: std::time::Duration) -> bool {
    let now = monotonic_ms();
    let previous = last.load(Ordering::Acquire);
    now.saturating_sub(previous) >= interval.as_millis() as u64
        && last
            .compare_exchange(previous, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
}

/// The lifecycle state of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotState {
    /// Not part of the fleet (above the current concurrency).
    Unused = 0,
    /// Forked, connecting to the database.
    Starting = 1,
    /// Waiting for jobs.
    Idle = 2,
    /// Running a job.
    Running = 3,
    /// Finishing its work before exiting.
    Stopping = 4,
    /// Dead; a replacement is scheduled after a backoff.
    BackingOff = 5,
    /// Dead too often too fast; still restarted, but the fleet is reported unhealthy.
    CrashLooping = 6,
    /// Between jobs, or woken from idle: about to claim or run its next job (not woken again
    /// until it is idle again).
    Claiming = 7,
}

impl SlotState {
    fn from_u8(v: u8) -> SlotState {
        match v {
            1 => SlotState::Starting,
            2 => SlotState::Idle,
            3 => SlotState::Running,
            4 => SlotState::Stopping,
            5 => SlotState::BackingOff,
            6 => SlotState::CrashLooping,
            7 => SlotState::Claiming,
            _ => SlotState::Unused,
        }
    }

    /// The lower-case name used in logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Unused => "unused",
            SlotState::Starting => "starting",
            SlotState::Idle => "idle",
            SlotState::Running => "running",
            SlotState::Stopping => "stopping",
            SlotState::BackingOff => "backing_off",
            SlotState::CrashLooping => "crash_looping",
            SlotState::Claiming => "claiming",
        }
    }

    /// Whether a process is supposed to be alive in a slot with this state.
    pub fn is_alive(self) -> bool {
        matches!(
            self,
            SlotState::Starting
                | SlotState::Idle
                | SlotState::Claiming
                | SlotState::Running
                | SlotState::Stopping
        )
    }
}

/// One child's slot. Aligned to a cache line so children never write to each other's lines.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Slot {
    /// Bumped by the supervisor at every fork into this slot; part of the child's lease owner.
    pub generation: AtomicU64,
    /// The pid of the current occupant (0 when none).
    pub pid: AtomicI32,
    state: AtomicU8,
    /// When the current occupant was forked.
    pub forked_at_ms: AtomicU64,
    /// The futex word an idle child sleeps on; bumped to wake it (see [`crate::wakeup`]).
    pub wake: AtomicU32,
    /// The last time a child in this slot showed progress. Never reseeded at a fork, so a slot
    /// whose children never get to poll keeps ageing.
    pub heartbeat_ms: AtomicU64,
    /// While the child is blocked in a database call (or a connection attempt), the time by which
    /// that call must have returned, 0 otherwise. A single-threaded child cannot beat while a
    /// synchronous call blocks, but every such call is bounded (see
    /// [`crate::queue::WorkerTimeouts`]): until this deadline the child is waiting, not stuck.
    /// Cleared by the supervisor at every fork and death: it speaks for one occupant only.
    pub waiting_until_ms: AtomicU64,
    /// The process group of the handler program running this child's job (0 when none). Set by
    /// the child when it hands the job to an exec or coproc program, cleared when the job is over;
    /// the supervisor kills this group when it reaps the child, before anything can give the job
    /// to another worker, so no grandchild of a dead worker runs beside the job's next attempt.
    pub handler_pgid: AtomicI32,
    /// The job being run (0 when none). Left behind by a child that dies mid-job, so its successor
    /// knows which job was in flight.
    pub job_id: AtomicI64,
    /// When the current job started.
    pub job_started_ms: AtomicU64,
    /// The current job's own timeout in milliseconds (0: `FORKQ_JOB_TIMEOUT_SECONDS` applies).
    pub job_timeout_ms: AtomicU64,
    /// Jobs that succeeded in this slot (all generations).
    pub succeeded: AtomicU64,
    /// Jobs that failed (retried or dead-lettered) in this slot.
    pub failed: AtomicU64,
    /// Jobs sent back for a later retry in this slot.
    pub retried: AtomicU64,
    /// Claim round trips sent to the database from this slot (busy or idle polling).
    pub claims: AtomicU64,
    /// Claim round trips from this slot that found every claim turn of the fleet taken
    /// (`FORKQ_CLAIMERS`, shared between the hosts) and so claimed nothing.
    pub turns_missed: AtomicU64,
    /// Set while this slot's child waits on a claim round trip (see [`crate::claim_gate::enter`]).
    pub in_claim: AtomicBool,
    /// Deaths in a row that came before the healthy uptime.
    pub fast_crashes: AtomicU32,
    /// Times the supervisor re-forked this slot.
    pub restarts: AtomicU64,
    /// How the last occupant ended: exit code when >= 0, minus the signal number when < 0.
    pub last_exit: AtomicI32,
    /// Job duration histogram, one counter per [`LATENCY_BUCKETS_MS`] bucket plus +Inf.
    pub duration_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// Sum of job durations, in microseconds.
    pub duration_sum_us: AtomicU64,
}

impl Slot {
    /// The slot's lifecycle state.
    pub fn state(&self) -> SlotState {
        SlotState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the lifecycle state.
    pub fn set_state(&self, state: SlotState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Moves the slot from `from` to `to` if it is still in `from`; false if it was not, so of
    /// several processes racing for one idle child only one wins it.
    pub fn swap_state(&self, from: SlotState, to: SlotState) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The supervisor's part before it forks a child into this slot. The state is set here, not
    /// after the fork: the child then owns it, and a fast child's own state (idle, claiming) must
    /// never be overwritten by the parent. The slot ages from the fork, never from a fresh
    /// heartbeat (only a slot's first child gets one), and the previous occupant's database wait
    /// does not carry over.
    pub fn prepare_fork(&self) {
        let now = monotonic_ms();
        self.forked_at_ms.store(now, Ordering::Release);
        self.waiting_until_ms.store(0, Ordering::Release);
        if self.generation.load(Ordering::Acquire) == 0 {
            self.heartbeat_ms.store(now, Ordering::Release);
        }
        self.set_state(SlotState::Starting);
    }

    /// The supervisor's part once the child `pid` of `generation` runs: lifecycle fields only,
    /// never the state, which is the child's by now.
    pub fn forked(&self, pid: i32, generation: u64) {
        if generation > 1 {
            self.restarts.fetch_add(1, Ordering::Relaxed);
        }
        self.generation.store(generation, Ordering::Release);
        self.pid.store(pid, Ordering::Release);
    }

    /// Records progress now.
    pub fn beat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Release);
    }

    /// Announces a database call that must return within `bound`: until then the child counts
    /// as alive although it cannot beat.
    pub fn wait_on_database(&self, bound: std::time::Duration) {
        let until = monotonic_ms() + bound.as_millis() as u64;
        self.waiting_until_ms.store(until, Ordering::Release);
    }

    /// The database call announced by [`Slot::wait_on_database`] returned: that is progress.
    pub fn database_returned(&self) {
        self.beat();
        self.waiting_until_ms.store(0, Ordering::Release);
    }

    /// The later of the last heartbeat and the deadline of the database call in progress. The
    /// deadline counts only once the occupant has beaten since its fork: a new child that hangs
    /// in its very first connection attempt has proved nothing yet, and letting its promise stand
    /// for a heartbeat would reseed the slot at every re-fork (a slot whose children never get to
    /// poll must keep ageing).
    fn alive_until_ms(&self) -> u64 {
        let beat = self.heartbeat_ms.load(Ordering::Acquire);
        if beat > self.forked_at_ms.load(Ordering::Acquire) {
            beat.max(self.waiting_until_ms.load(Ordering::Acquire))
        } else {
            beat
        }
    }

    /// Milliseconds since any occupant of this slot last showed progress, or since the deadline
    /// of the database call its child is blocked in (0 before that deadline). A re-fork does not
    /// reset it: a slot whose children keep dying or hanging before their first poll keeps
    /// ageing, and liveness turns red (this is what `/livez` reports).
    pub fn heartbeat_age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.alive_until_ms())
    }

    /// As [`Slot::heartbeat_age_ms`], counted at the earliest from the current occupant's fork:
    /// the window the supervisor grants each new child before it counts as wedged. The same
    /// clock as `/livez` otherwise, so the supervisor never kills a child liveness calls alive.
    pub fn life_heartbeat_age_ms(&self, now_ms: u64) -> u64 {
        let last = self
            .alive_until_ms()
            .max(self.forked_at_ms.load(Ordering::Acquire));
        now_ms.saturating_sub(last)
    }

    /// Marks the start of `job_id` at `at`, with its own timeout if it has one.
    pub fn start_job(
        &self,
        job_id: i64,
        timeout: Option<std::time::Duration>,
        at: std::time::Instant,
    ) {
        let now = monotonic_ms_at(at);
        self.job_started_ms.store(now, Ordering::Release);
        self.job_timeout_ms.store(
            timeout.map_or(0, |t| (t.as_millis() as u64).max(1)),
            Ordering::Release,
        );
        self.job_id.store(job_id, Ordering::Release);
        self.heartbeat_ms.store(now, Ordering::Release);
        self.set_state(SlotState::Running);
    }

    /// Marks the end of the current job at `at` and records its duration.
    pub fn finish_job(&self, duration_us: u64, at: std::time::Instant) {
        self.job_id.store(0, Ordering::Release);
        let ms = duration_us / 1000;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|&upper| ms < upper)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(duration_us, Ordering::Relaxed);
        self.heartbeat_ms
            .store(monotonic_ms_at(at), Ordering::Release);
        // Between jobs a child is busy, not idle: the waker must not spend a wake-up on it.
        self.set_state(SlotState::Claiming);
    }
}

/// Fleet-wide fields.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Header {
    /// The supervisor loop's last turn; a stale value means the supervisor itself is wedged.
    pub supervisor_heartbeat_ms: AtomicU64,
    /// Number of slots that make up the fleet now (changed by TTIN/TTOU).
    pub concurrency: AtomicU32,
    /// Set once a shutdown has begun; readiness turns 503.
    pub shutting_down: AtomicBool,
    /// Bumped (and woken, see [`crate::futex`]) by the supervisor when a shutdown begins and when
    /// it stops the probe: the probe's presence service sleeps on it between two writes, so it
    /// records "stopping" and exits at once without polling.
    pub presence_wake: AtomicU32,
    /// Last time any child of this host ran the maintenance pass, so only one does per interval.
    pub maintenance_ms: AtomicU64,
    /// Last time any child of this host polled for jobs, so idle children poll one at a time.
    pub poll_ms: AtomicU64,
    /// Bumped when a claim round trip ends, to wake children waiting for their turn to claim.
    pub claim_done: AtomicU32,
    /// How many hosts serve this schema, as the probe last counted them (0 until it has): the
    /// children's share of the fleet's claim turns (see [`crate::claim_gate`]).
    pub hosts_serving: AtomicU32,
    /// Pid of the probe process.
    pub probe_pid: AtomicI32,
    /// This boot's id (see [`crate::host`]), set by the supervisor before it forks anything.
    pub boot: AtomicU64,
    /// Wall-clock time the supervisor started, in milliseconds since the epoch: the daemon's age
    /// (`forkq hosts`), and for rules between daemons (the schedules of the daemon started last
    /// win).
    pub started_unix_ms: AtomicU64,
    /// The latest cancels of jobs the wake-up listener heard of (see [`CancelRing::push`]).
    pub cancels: CancelRing,
}

/// How many of the latest cancels the ring remembers; a child that falls further behind checks
/// its jobs with the database instead.
pub const CANCEL_RING: usize = 64;

/// The ids of the latest jobs whose cancel was requested, as the wake-up listener heard them, so
/// a child learns within a heartbeat that the job it runs (or has claimed ahead) was cancelled.
/// One writer (the listener); readers compare sequence numbers, so each looks only at the cancels
/// that arrived since it last looked. A hint: children confirm with the database before acting.
#[repr(C, align(64))]
pub struct CancelRing {
    /// How many cancels were pushed so far; entry `n` is at `ids[n % CANCEL_RING]`.
    pub seq: AtomicU64,
    ids: [AtomicI64; CANCEL_RING],
}

impl Default for CancelRing {
    fn default() -> Self {
        CancelRing {
            seq: AtomicU64::new(0),
            ids: std::array::from_fn(|_| AtomicI64::new(0)),
        }
    }
}

impl CancelRing {
    /// Records the cancel of job `id` (the listener is the only writer).
    pub fn push(&self, id: i64) {
        let n = self.seq.load(Ordering::Acquire);
        self.ids[(n % CANCEL_RING as u64) as usize].store(id, Ordering::Release);
        self.seq.store(n + 1, Ordering::Release);
    }

    /// The cancels pushed since sequence number `seen`, and the sequence number to pass next
    /// time; `None` instead of the ids when more arrived than the ring holds (some were lost).
    pub fn since(&self, seen: u64) -> (Option<Vec<i64>>, u64) {
        let now = self.seq.load(Ordering::Acquire);
        if now.saturating_sub(seen) > CANCEL_RING as u64 {
            return (None, now);
        }
        let ids = (seen..now)
            .map(|n| self.ids[(n % CANCEL_RING as u64) as usize].load(Ordering::Acquire))
            .collect();
        (Some(ids), now)
    }
}

/// The whole table: a header and [`MAX_CONCURRENCY`] slots.
#[repr(C)]
pub struct SlotTable {
    /// Fleet-wide fields.
    pub header: Header,
    /// One slot per possible child.
    pub slots: [Slot; MAX_CONCURRENCY],
}

impl SlotTable {
    /// Maps a zeroed table shared with every process forked afterwards. It lives until the
    /// process exits; it is never unmapped because children hold references to it.
    pub fn create_shared() -> std::io::Result<&'static SlotTable> {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let len = std::num::NonZeroUsize::new(std::mem::size_of::<SlotTable>())
            .expect("the slot table has a size");
        // SAFETY: a fresh anonymous mapping is zero-filled, and all-zero bytes are a valid value
        // for every atomic in the table. The mapping is never unmapped, so 'static holds.
        let ptr: NonNull<std::ffi::c_void> = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(unsafe { &*(ptr.as_ptr() as *const SlotTable) })
    }

    /// The slots that currently make up the fleet.
    pub fn active(&self) -> &[Slot] {
        let n = self.header.concurrency.load(Ordering::Acquire) as usize;
        &self.slots[..n.min(MAX_CONCURRENCY)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<Slot>(), 64);
        assert_eq!(std::mem::size_of::<Slot>() % 64, 0);
    }

    #[test]
    fn shared_table_starts_zeroed_and_unused() {
        let table = SlotTable::create_shared().unwrap();
        assert!(table.slots.iter().all(|s| s.state() == SlotState::Unused));
        assert!(table.active().is_empty());
    }

    #[test]
    fn a_database_wait_counts_as_alive_until_its_deadline() {
        let slot = Slot::default();
        let now = monotonic_ms();
        slot.forked_at_ms.store(now - 20_000, Ordering::Release);
        slot.heartbeat_ms.store(now - 10_000, Ordering::Release);
        assert!(slot.heartbeat_age_ms(now) >= 10_000);
        slot.wait_on_database(std::time::Duration::from_secs(4));
        assert_eq!(slot.heartbeat_age_ms(now), 0);
        assert_eq!(slot.life_heartbeat_age_ms(now), 0);
        // Past the deadline the slot ages from the deadline, not from the old heartbeat.
        let later = monotonic_ms() + 6_000;
        assert!((1_900..=2_100).contains(&slot.heartbeat_age_ms(later)));
        slot.database_returned();
        assert_eq!(slot.waiting_until_ms.load(Ordering::Acquire), 0);
        assert!(slot.heartbeat_age_ms(monotonic_ms()) < 1_000);
    }

    #[test]
    fn a_new_child_stuck_in_its_first_database_call_keeps_ageing() {
        let slot = Slot::default();
        let now = monotonic_ms();
        slot.heartbeat_ms.store(now - 10_000, Ordering::Release);
        // Re-forked after that last beat, and waiting on the database ever since.
        slot.forked_at_ms.store(now - 5_000, Ordering::Release);
        slot.wait_on_database(std::time::Duration::from_secs(60));
        assert!(slot.heartbeat_age_ms(now) >= 10_000);
        assert!((5_000..6_000).contains(&slot.life_heartbeat_age_ms(now)));
    }

    #[test]
    fn the_supervisor_never_overwrites_the_state_of_a_child_it_forked() {
        let slot = Slot::default();
        slot.prepare_fork();
        assert_eq!(slot.state(), SlotState::Starting);
        // The child runs first and is already waiting for work when the parent records the fork.
        slot.set_state(SlotState::Idle);
        slot.forked(4242, 1);
        assert_eq!(slot.state(), SlotState::Idle);
        assert_eq!(slot.pid.load(Ordering::Acquire), 4242);
        assert_eq!(slot.restarts.load(Ordering::Relaxed), 0);
        slot.prepare_fork();
        slot.forked(4343, 2);
        assert_eq!(slot.restarts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_cancel_ring_shows_each_reader_what_is_new_and_says_when_it_fell_behind() {
        let ring = CancelRing::default();
        assert_eq!(ring.since(0), (Some(vec![]), 0));
        ring.push(7);
        ring.push(9);
        assert_eq!(ring.since(0), (Some(vec![7, 9]), 2));
        assert_eq!(ring.since(1), (Some(vec![9]), 2));
        for id in 0..CANCEL_RING as i64 {
            ring.push(100 + id);
        }
        assert_eq!(ring.since(1), (None, 2 + CANCEL_RING as u64));
        assert_eq!(ring.since(2).0.unwrap().len(), CANCEL_RING);
    }

    #[test]
    fn an_instant_reads_as_the_monotonic_clock() {
        let before = monotonic_ms();
        let at = std::time::Instant::now();
        let after = monotonic_ms();
        // A millisecond either side: the two clocks' offset is taken from two reads.
        assert!((before.saturating_sub(1)..=after + 1).contains(&monotonic_ms_at(at)));
        let earlier = at - std::time::Duration::from_millis(1500);
        assert_eq!(monotonic_ms_at(at) - monotonic_ms_at(earlier), 1500);
    }

    #[test]
    fn histogram_buckets_by_duration() {
        let slot = Slot::default();
        let now = std::time::Instant::now();
        slot.finish_job(500, now); // 0.5 ms
        slot.finish_job(60_000_000, now); // 60 s
        assert_eq!(slot.duration_buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(
            slot.duration_buckets[LATENCY_BUCKETS_MS.len()].load(Ordering::Relaxed),
            1
        );
    }
}
