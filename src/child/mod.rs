//! The consumer loop each forked child runs: claim a batch, run each job, acknowledge, heartbeat.
//!
//! One job at a time per child. Acknowledgements of finished jobs are sent together with the next
//! claim in one round trip, or on their own once they have waited `FORKQ_ACK_DELAY_MS`. The
//! connection is re-opened with backoff when it drops; the slot heartbeat keeps going meanwhile,
//! because liveness must not depend on the database. An idle child sleeps on its slot's futex
//! word until the wake-up listener or a busy sibling rouses it ([`crate::wakeup`]), or until the
//! poll interval passes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::backoff;
use crate::config::Config;
use crate::handler::{process, Handler, Job, JobContext, Outcome};
use crate::logging::{self, Activity};
use crate::queue::consumer::{Ack, Claimed, Consumer, Flow, Round, Settlement};
use crate::queue::sql::TURN_WAIT;
use crate::queue::{maintenance, QueueError, WorkerTimeouts};
use crate::slots::{monotonic_ms, take_turn, Header, Slot, SlotState, SlotTable};
use crate::{claim_gate, futex, wakeup};

mod acks;
mod connection;
mod signals;

use acks::Holdings;
use connection::Connection;

pub use signals::{
    immediate_stop_requested, install_signal_handlers, stop_requested, SUPERVISOR_ONLY,
};

/// Who this child is and what it inherits from its slot.
pub struct ChildSpec<'a> {
    /// The validated configuration.
    pub config: &'a Config,
    /// The fleet's shared table (this child's slot, maintenance coordination, idle siblings).
    pub table: &'a SlotTable,
    /// This child's slot in the table.
    pub index: usize,
    /// This child's lease owner: host, supervisor boot, slot, generation.
    pub owner: String,
    /// The lease owner of the previous occupant of this slot, whose jobs are released at once.
    pub predecessor: Option<Predecessor>,
    /// Exit cleanly after this many jobs (recycling); `None` never.
    pub recycle_after_jobs: Option<u64>,
}

/// The previous occupant of a slot, as its successor needs to know it.
pub struct Predecessor {
    /// Its lease owner, or the prefix shared by every past occupant of the slot (owners end
    /// with '/', so a prefix never matches a longer generation number).
    pub owner: String,
    /// The job it was running when it died, if any.
    pub in_flight: Option<i64>,
    /// How it ended, for the error recorded on that job.
    pub how_it_ended: String,
}

/// Runs the consumer loop until asked to stop; returns the process exit code.
pub fn run(spec: ChildSpec<'_>, handler: &mut dyn Handler) -> i32 {
    let slot = &spec.table.slots[spec.index];
    let mut worker = Worker {
        config: spec.config,
        table: spec.table,
        index: spec.index,
        slot,
        header: &spec.table.header,
        owner: &spec.owner,
        recycle_after_jobs: spec.recycle_after_jobs,
        conn: Connection::new(spec.config, slot, &spec.owner),
        held: Holdings::new(),
        job_timeout: None,
        progress: Progress::default(),
        cancels_seen: spec.table.header.cancels.seq.load(Ordering::Acquire),
        changes_seen: None,
        last_job_took: Duration::ZERO,
        average_job: None,
        jobs_done: 0,
        recycling: false,
        looked_ahead: false,
        turn_waits: 0,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    worker.slot.set_state(SlotState::Starting);
    match worker.work(spec.predecessor, handler) {
        Ok(()) => 0,
        Err(e @ QueueError::Unavailable(_)) => {
            log::warn!("worker {}: {e}", worker.owner);
            0
        }
        Err(e) => {
            log::error!(
                "worker {} stopping on an error it cannot recover from: {e}",
                worker.owner
            );
            1
        }
    }
}

/// A claim takes about this much work, judged by recent job durations: enough tiny jobs to make
/// the round trip worth it, but never a pile of slow jobs that idle siblings could have run.
const CLAIM_WORTH: Duration = Duration::from_millis(50);

/// How many jobs to claim next: [`CLAIM_WORTH`] of jobs of the recent average duration, between
/// one and `prefetch`; one while nothing is known yet.
fn claim_size(average_job: Option<Duration>, prefetch: usize) -> usize {
    match average_job {
        None => 1,
        Some(avg) => {
            let fits = CLAIM_WORTH.as_secs_f64() / avg.as_secs_f64().max(1e-6);
            (fits as usize).clamp(1, prefetch)
        }
    }
}

/// What one round trip brought.
struct Brought {
    /// Jobs claimed (now in the buffer).
    claimed: usize,
    /// Due scheduled jobs made claimable, for the next round.
    promoted: i64,
    /// Due scheduled jobs wait; the next round that claims makes them claimable.
    due: bool,
    /// When a rate-limited queue allows its next start, if it refused this claim.
    retry_in: Option<Duration>,
    /// No claim turn was free across the hosts (see [`crate::queue::consumer::Round::no_turn`]).
    no_turn: bool,
}

/// How long one idle wait lasts at most, so the heartbeat and stop flags stay fresh.
const IDLE_SLICE: Duration = Duration::from_millis(1000);
/// A job's progress is written at most this often; the latest value wins, the last is flushed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The largest progress value kept, as compact JSON; a larger one is dropped with a warning.
pub const MAX_PROGRESS_BYTES: usize = 8 * 1024;
/// Resident memory is checked after every this many jobs (reading /proc costs a little).
const RSS_CHECK_EVERY: u64 = 64;

struct Worker<'a> {
    config: &'a Config,
    table: &'a SlotTable,
    index: usize,
    slot: &'a Slot,
    header: &'a Header,
    owner: &'a str,
    recycle_after_jobs: Option<u64>,
    /// The connection to the queue, re-opened whenever it drops.
    conn: Connection<'a>,
    /// The jobs this worker holds (running, prefetched, awaiting their ack) and the acks it owes.
    held: Holdings,
    /// The running job's timeout: its own, else `FORKQ_JOB_TIMEOUT_SECONDS`.
    job_timeout: Option<Duration>,
    /// The running job's progress reports.
    progress: Progress,
    /// The sequence number of the last cancel read from the slot table's ring.
    cancels_seen: u64,
    /// The queue's count of changes (cancels, stopped batches, queue settings) this worker has
    /// checked its prefetched jobs and its queues' settings against; `None` before the first
    /// round.
    changes_seen: Option<i64>,
    last_job_took: Duration,
    /// Moving average of recent job durations, which sizes the next claim.
    average_job: Option<Duration>,
    jobs_done: u64,
    /// Set once this child has done its share (see `note_recycling`).
    recycling: bool,
    /// Set once the job at hand has claimed its successor (see `look_ahead`).
    looked_ahead: bool,
    /// Claims in a row that found no claim turn, even queued for one (see `wait_for_turn`).
    turn_waits: u32,
    /// CPUs this process may use: without a fleet-wide limit, two claimers per CPU of the host.
    cpus: usize,
}

impl Worker<'_> {
    fn work(
        &mut self,
        predecessor: Option<Predecessor>,
        handler: &mut dyn Handler,
    ) -> Result<(), QueueError> {
        if let Some(p) = predecessor {
            let back = self.db(|db| db.release(&p.owner, p.in_flight, Some(&p.how_it_ended)))?;
            if back > 0 || p.in_flight.is_some() {
                let in_flight = p
                    .in_flight
                    .map_or(String::new(), |id| format!("; job {id} was in flight"));
                log::info!(
                    "released {back} job(s) of the previous worker(s) in this slot ({}){in_flight}",
                    p.how_it_ended
                );
            }
        }
        // Until here the slot still named the predecessor's job in flight, so that if this child
        // died before releasing, its successor would still charge the right job.
        self.slot.job_id.store(0, Ordering::Release);
        let mut woken = false;
        while !stop_requested() && !self.recycling {
            // A child woken for new work claims it first; idle children do the chores.
            if !woken {
                self.maybe_run_maintenance();
            }
            // Read before the claim: a wake-up that arrives during an empty claim then cuts the
            // idle wait short instead of being lost.
            let wake_seen = self.slot.wake.load(Ordering::Acquire);
            let limit = claim_size(self.average_job, self.config.prefetch);
            let brought = self.send_acks_and_claim(limit, false)?;
            if self.held.prefetched().is_empty() && (brought.promoted > 0 || brought.due) {
                // Due scheduled jobs were just made claimable, or are due and the next round
                // makes them so: claim them now.
                woken = true;
                continue;
            }
            if self.held.prefetched().is_empty() && brought.no_turn {
                // Other hosts hold every claim turn: jobs may be waiting, so not idle.
                self.wait_for_turn();
                continue;
            }
            self.turn_waits = 0;
            if self.held.prefetched().is_empty() {
                // An empty claim is this host's latest poll.
                self.header.poll_ms.store(monotonic_ms(), Ordering::Release);
                woken = self.wait_idle(wake_seen, brought.retry_in);
                continue;
            }
            woken = false;
            if brought.claimed == limit {
                // More work is probably waiting: pass the wake-up on to an idle sibling.
                wakeup::wake_one_idle(self.table, Some(self.index));
            }
            while !stop_requested() && !self.recycling {
                // Renewed while the next job is still in the buffer: whatever a renewal does not
                // count as held, it gives back.
                self.renew_if_due();
                self.notice_cancels()?;
                let Some(claimed) = self.held.next_prefetched() else {
                    break;
                };
                if claimed.suspect && !self.report_start(&claimed)? {
                    continue;
                }
                let ended = self.run_job(claimed, handler);
                // After the last buffered job the next claim is one step away and carries the
                // acks: flushing them alone would cost a second round trip (and, in durable mode,
                // a second commit) per batch. Likewise after a job that claimed its successor
                // while it ran: that successor's own look-ahead carries them, while it runs.
                let carried = self.looked_ahead && !self.config.durable;
                if !self.held.prefetched().is_empty() && !carried && self.ack_flush_due(ended) {
                    self.flush_acks()?;
                }
            }
        }
        self.shut_down()
    }

    /// Sends pending acks and gives back the jobs not started (and, on an immediate stop, the one
    /// abandoned), uncharged.
    fn shut_down(&mut self) -> Result<(), QueueError> {
        self.slot.set_state(SlotState::Stopping);
        if self.held.owes_acks() {
            self.flush_acks()?;
        }
        let holds_jobs = !self.held.prefetched().is_empty() || immediate_stop_requested();
        if holds_jobs && self.conn.is_open() {
            let owner = self.owner;
            let back = self.db(|db| db.release(owner, None, None))?;
            log::info!(
                "worker {} handed back {back} job(s) it had not finished",
                self.owner
            );
        }
        Ok(())
    }

    /// After each job: decides (once, and says so) whether this child has done its share and
    /// should exit cleanly to be replaced: `FORKQ_MAX_JOBS_PER_CHILD` or `FORKQ_MAX_CHILD_RSS_MB`.
    fn note_recycling(&mut self) {
        if self.recycling {
            return;
        }
        let reason = if self
            .recycle_after_jobs
            .is_some_and(|max| self.jobs_done >= max)
        {
            Some(format!("after {} jobs", self.jobs_done))
        } else {
            self.config
                .max_child_rss_mb
                .filter(|_| self.jobs_done % RSS_CHECK_EVERY == 0)
                .and_then(|limit| {
                    resident_mb()
                        .filter(|&rss| rss > limit)
                        .map(|rss| (rss, limit))
                })
                .map(|(rss, limit)| format!("resident memory {rss} MiB is above {limit} MiB"))
        };
        if let Some(reason) = reason {
            log::info!("worker {} recycling: {reason}", self.owner);
            self.recycling = true;
        }
    }

    /// Runs one job through the handler and queues its acknowledgement; returns when it ended.
    fn run_job(&mut self, claimed: Claimed, handler: &mut dyn Handler) -> Instant {
        let job = claimed.job;
        let _running = logging::activity(Activity::Job(job.id));
        let started = Instant::now();
        self.slot.start_job(job.id, claimed.timeout, started);
        self.held.start(job.id, claimed.lease_token, started);
        self.job_timeout = claimed.timeout.or(self.config.job_timeout);
        self.progress = Progress::default();
        self.looked_ahead = false;
        let outcome = {
            let mut ctx = Context { worker: self };
            let outcome = catch_unwind(AssertUnwindSafe(|| handler.handle(&job, &mut ctx)))
                .unwrap_or_else(|panic| {
                    Outcome::Failure(format!("handler panicked: {}", panic_message(&panic)))
                });
            // Whatever a handler (or its panic message) says must be storable, or the ack
            // would fail again at every re-run.
            process::storable(outcome)
        };
        // The handler is done with its programs for this job (see runs_in_process_group).
        self.slot.handler_pgid.store(0, Ordering::Release);
        let ended = Instant::now();
        let elapsed = ended - started;
        self.send_progress(true);
        self.held.finish();
        self.last_job_took = elapsed;
        self.average_job = Some(match self.average_job {
            None => elapsed,
            // 0.8 avg + 0.2 elapsed, in integers: no float conversions per job.
            Some(avg) => (avg * 4 + elapsed) / 5,
        });
        self.slot.finish_job(elapsed.as_micros() as u64, ended);
        self.jobs_done += 1;
        self.note_recycling();
        let cancelled = self.held.cancel_requested() && !matches!(outcome, Outcome::Success(_));
        if !cancelled && immediate_stop_requested() && !matches!(outcome, Outcome::Success(_)) {
            // Abandoned by an immediate stop: released uncharged at shut-down, not failed.
            self.held.put_back(Claimed { job, ..claimed });
            return ended;
        }
        let settlement = if cancelled {
            log::info!(
                "job {} ({}) was cancelled while it ran; it stopped: {outcome}",
                job.id,
                job.task
            );
            Settlement::Cancelled(format!("cancelled while it ran; the handler {outcome}"))
        } else {
            self.settlement_for(&job, claimed.backoff, outcome, elapsed)
        };
        self.held.push_ack(
            Ack {
                id: job.id,
                lease_token: claimed.lease_token,
                batch_id: job.batch_id,
                settlement,
            },
            ended,
        );
        ended
    }

    /// Turns a handler's outcome into what the queue should do, and counts it. `backoff` is the
    /// job's own retry backoff base, if it has one.
    fn settlement_for(
        &self,
        job: &Job,
        backoff: Option<Duration>,
        outcome: Outcome,
        elapsed: Duration,
    ) -> Settlement {
        let exhausted = job.attempt >= job.max_attempts;
        let retry_delay = || {
            let base = backoff.unwrap_or(self.config.retry_backoff_base);
            backoff::retry_delay(job.attempt, base, self.config.retry_backoff_max.max(base))
        };
        let counters = &self.slot;
        match outcome {
            Outcome::Success(result) => {
                counters.succeeded.fetch_add(1, Ordering::Relaxed);
                log::debug!("job {} ({}) succeeded in {elapsed:?}", job.id, job.task);
                Settlement::Completed(result)
            }
            Outcome::Failure(error) if !exhausted => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                let delay = retry_delay();
                log::warn!(
                    "job {} ({}) failed on attempt {}/{}, retrying in {delay:.1?}: {error}",
                    job.id,
                    job.task,
                    job.attempt,
                    job.max_attempts
                );
                Settlement::Retry {
                    error: Some(error),
                    delay,
                }
            }
            Outcome::Retry(reason) if !exhausted => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                let delay = retry_delay();
                log::info!(
                    "job {} ({}) asked to be retried in {delay:.1?}: {reason}",
                    job.id,
                    job.task
                );
                Settlement::Retry { error: None, delay }
            }
            Outcome::Failure(error) | Outcome::Fatal(error) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "job {} ({}) failed for good after attempt {}: {error}",
                    job.id,
                    job.task,
                    job.attempt
                );
                Settlement::Failed(error)
            }
            Outcome::Retry(reason) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let error = format!("gave up after {} attempts; last: {reason}", job.attempt);
                log::warn!("job {} ({}) {error}", job.id, job.task);
                Settlement::Failed(error)
            }
            Outcome::Snooze(delay) => {
                log::debug!("job {} ({}) snoozed for {delay:.1?}", job.id, job.task);
                Settlement::Snooze(delay.min(MAX_SNOOZE))
            }
        }
    }

    /// Whether the pending acks should go now (at `now`) rather than with the next claim (see
    /// [`Holdings::ack_flush_due`]).
    fn ack_flush_due(&self, now: Instant) -> bool {
        self.held
            .ack_flush_due(self.config, self.last_job_took, now)
    }

    fn flush_acks(&mut self) -> Result<(), QueueError> {
        self.send_acks_and_claim(0, false).map(|_| ())
    }

    /// Sends the pending acks and claims up to `limit` jobs in one round trip when it can
    /// (`ahead`: a claim while a job runs, which leaves limited queues alone); the jobs claimed
    /// join the buffer at once (so any later round trip counts them as held). If the database
    /// refuses the statement itself (not a lost connection), the acks are sent one by one and one
    /// it still refuses is dead-lettered with the database's reason, so a single bad result can
    /// neither hold back the others nor crash this child at every re-run.
    fn send_acks_and_claim(&mut self, limit: usize, ahead: bool) -> Result<Brought, QueueError> {
        let hosts = self.header.hosts_serving.load(Ordering::Acquire);
        if limit > 0 {
            self.slot.claims.fetch_add(1, Ordering::Relaxed);
            let turns = claim_gate::share(self.config.claimers, hosts, 2 * self.cpus);
            claim_gate::enter(self.table, self.index, turns);
        }
        let round = self.claim_round(claim_gate::fleet(self.config.claimers, hosts), limit, ahead);
        if limit > 0 {
            claim_gate::leave(self.table, self.index);
        }
        let round = round?;
        self.report_refused(&round.refused);
        let brought = Brought {
            claimed: round.claimed.len(),
            promoted: round.promoted,
            due: round.due,
            retry_in: round.retry_in,
            no_turn: round.no_turn,
        };
        self.held.add_claimed(round.claimed);
        self.notice_changes(round.changes)?;
        Ok(brought)
    }

    /// The round trip of [`Worker::send_acks_and_claim`], under the database's claim gate of
    /// `fleet` turns (see `claim_gate::fleet`). A round the gate refused claims again at once,
    /// queueing in the database for a turn (see `Consumer::claim_in_turn`), still holding this
    /// host's; a claim ahead does not: it is not worth a wait.
    fn claim_round(
        &mut self,
        fleet: usize,
        limit: usize,
        ahead: bool,
    ) -> Result<Round, QueueError> {
        let acks = self.held.acks_for_round();
        let claim = |db: &mut Consumer, acks: &[Ack]| {
            db.set_claim_turns(fleet);
            match ahead {
                true => db.settle_and_claim_ahead(acks, limit),
                false => db.settle_and_claim(acks, limit),
            }
        };
        let round = match self.db(|db| claim(db, &acks)) {
            Ok(round) => {
                self.held.acks_sent();
                round
            }
            Err(e) if acks.is_empty() || matches!(e, QueueError::Unavailable(_)) => return Err(e),
            Err(e) => {
                log::error!(
                    "worker {}: the queue refused {} acknowledgement(s) together ({e}); sending them one by one",
                    self.owner,
                    acks.len()
                );
                // Each stays pending (so held, should the connection drop) until it is sent.
                for ack in acks {
                    let id = ack.id;
                    self.send_one_ack(ack);
                    self.held.ack_sent(id);
                }
                self.held.acks_sent();
                self.db(|db| claim(db, &[]))?
            }
        };
        if round.no_turn {
            self.slot.turns_missed.fetch_add(1, Ordering::Relaxed);
        }
        // A round that claimed anyway (from a limited queue, which takes no turn) keeps what it
        // claimed: those jobs are this worker's now.
        if !round.no_turn || ahead || !round.claimed.is_empty() {
            return Ok(round);
        }
        // Its round trips: the wait (cut at TURN_WAIT), the round, the commit.
        let longer = WorkerTimeouts::new(self.config.health_stale).round_trip() * 2 + TURN_WAIT;
        let waited = self.db_waiting(longer, |db| {
            db.set_claim_turns(fleet);
            db.claim_in_turn(limit)
        })?;
        Ok(match waited.no_turn && waited.claimed.is_empty() {
            true => round,
            false => Round {
                refused: round.refused,
                promoted: round.promoted + waited.promoted,
                ..waited
            },
        })
    }

    /// When the queue's count of changes moved since the last round (a cancel, a batch stopped by
    /// fail-fast or cancel, a queue paused or limited), re-reads this worker's queue settings and
    /// makes sure no prefetched job starts that must not: the ones cancelled end cancelled, and
    /// the ones of a queue paused or limited since their claim go back to the queue.
    fn notice_changes(&mut self, changes: i64) -> Result<(), QueueError> {
        let seen = self.changes_seen.replace(changes);
        // At the first round, against the count the connection read the settings at.
        let settings_read_at = self.conn.open().map(|db| db.flow().changes);
        if seen.or(settings_read_at) == Some(changes) {
            return Ok(());
        }
        let flow = self.db(|db| db.refresh_flow())?;
        if seen.is_some() {
            self.drop_cancelled()?;
        }
        self.give_back_gated(&flow);
        Ok(())
    }

    /// Ends cancelled, uncharged, the prefetched jobs that must no longer run (cancelled, or
    /// children of a stopped batch).
    fn drop_cancelled(&mut self) -> Result<(), QueueError> {
        if self.held.prefetched().is_empty() {
            return Ok(());
        }
        let held: Vec<Claimed> = self.held.prefetched().iter().cloned().collect();
        let dropped = self.db(|db| db.drop_cancelled(&held.iter().collect::<Vec<_>>()))?;
        if !dropped.is_empty() {
            log::info!(
                "worker {}: {} prefetched job(s) were cancelled before they started: {dropped:?}",
                self.owner,
                dropped.len()
            );
            self.held.drop_prefetched(&dropped);
        }
        Ok(())
    }

    /// Gives back the prefetched jobs of queues that are paused now, or limited now while a lean
    /// round claimed them (they would not count against the caps).
    fn give_back_gated(&mut self, flow: &Flow) {
        let gated = |c: &Claimed| {
            flow.paused.contains(&*c.job.queue)
                || (flow.limited.contains(&*c.job.queue) && !c.limited)
        };
        let n = self.held.prefetched().iter().filter(|c| gated(c)).count();
        if n > 0 {
            log::info!(
                "worker {}: handing back {n} prefetched job(s) of queues paused or limited since \
                 they were claimed",
                self.owner
            );
            self.renew_keeping(&|c| !gated(c));
        }
    }

    /// Looks at the cancels the wake-up listener heard since the last look (one atomic load when
    /// there are none): the running job's is confirmed by a lease renewal (which says whether
    /// its cancel was requested), the prefetched ones are dropped. When more cancels came than
    /// the ring holds, every job held is checked.
    fn notice_cancels(&mut self) -> Result<(), QueueError> {
        let ring = &self.header.cancels;
        if ring.seq.load(Ordering::Acquire) == self.cancels_seen {
            return Ok(());
        }
        let (ids, seen) = ring.since(self.cancels_seen);
        self.cancels_seen = seen;
        let hit = |id: i64| ids.as_ref().map_or(true, |ids| ids.contains(&id));
        if self
            .held
            .running_id()
            .is_some_and(|id| !self.held.cancel_requested() && hit(id))
        {
            self.renew_keeping(&|_| true);
        }
        if self.held.prefetched().iter().any(|c| hit(c.job.id)) {
            self.drop_cancelled()?;
        }
        Ok(())
    }

    /// Keeps the running job's latest progress and writes it when [`PROGRESS_EVERY`] has passed
    /// since the last write (at once for the first).
    fn note_progress(&mut self, value: Value) {
        let size = serde_json::to_string(&value).map_or(usize::MAX, |t| {
            if t.contains("\\u0000") {
                usize::MAX
            } else {
                t.len()
            }
        });
        if size > MAX_PROGRESS_BYTES {
            if !self.progress.refused {
                log::warn!(
                    "job {:?}: a progress value was dropped: it must be JSON of at most \
                     {MAX_PROGRESS_BYTES} bytes without NUL characters",
                    self.held.running_id()
                );
                self.progress.refused = true;
            }
            return;
        }
        self.progress.pending = Some(value);
        self.send_progress(false);
    }

    /// Writes the pending progress if it is due (or `now`); a failure is logged, never fatal.
    fn send_progress(&mut self, now: bool) {
        let due = now
            || self
                .progress
                .sent
                .map_or(true, |t| t.elapsed() >= PROGRESS_EVERY);
        let (Some((id, token, _)), true) = (self.held.running(), due) else {
            return;
        };
        let Some(value) = self.progress.pending.take() else {
            return;
        };
        self.progress.sent = Some(Instant::now());
        match self.db(|db| db.report_progress(id, token, &value)) {
            Ok(true) => {}
            Ok(false) => log::warn!("job {id}: progress not recorded: its lease is gone"),
            Err(e) => log::warn!("job {id}: progress not recorded: {e}"),
        }
    }

    /// Reports the start of a suspect job (see [`Claimed::suspect`]); false when the job is no
    /// longer ours and must not run.
    fn report_start(&mut self, claimed: &Claimed) -> Result<bool, QueueError> {
        let ours = self.db(|db| db.mark_started(claimed))?;
        if !ours {
            log::warn!(
                "worker {}: job {} was taken back before it started; skipping it",
                self.owner,
                claimed.job.id
            );
        }
        Ok(ours)
    }

    fn send_one_ack(&mut self, ack: Ack) {
        let refused = match self.db(|db| db.settle_and_claim(std::slice::from_ref(&ack), 0)) {
            Ok(round) => return self.report_refused(&round.refused),
            Err(e) => e,
        };
        let failed = Ack {
            settlement: Settlement::Failed(format!(
                "forkq could not record this job's outcome, the database refused it: {refused}"
            )),
            ..ack
        };
        if let Err(e) = self.db(|db| db.settle_and_claim(std::slice::from_ref(&failed), 0)) {
            log::error!(
                "worker {}: job {} cannot be settled ({e}); it runs again when its lease expires",
                self.owner,
                failed.id
            );
        }
    }

    fn report_refused(&self, refused: &[i64]) {
        if !refused.is_empty() {
            log::warn!(
                "worker {}: the queue refused the result of job(s) {refused:?}: their lease had \
                 expired or was taken over, so another worker runs them again",
                self.owner
            );
        }
    }

    /// Renews leases every third of the lease while this child holds jobs.
    fn renew_if_due(&mut self) {
        if self.held.since_renewal() >= self.config.lease / 3 {
            self.renew_keeping(&|_| true);
        }
    }

    /// Hands the prefetched jobs back to the queue once the job at hand has run longer than its
    /// claim was meant to take, so they do not wait behind it while a sibling could run them.
    fn give_back_if_overdue(&mut self) {
        let Some((id, _, started)) = self.held.running() else {
            return;
        };
        let meant = CLAIM_WORTH.max(self.average_job.unwrap_or_default() * 2);
        if self.held.prefetched().is_empty() || started.elapsed() < meant {
            return;
        }
        log::info!(
            "worker {}: job {id} has run {:.1?}, longer than its claim was meant to take; \
             handing back {} prefetched job(s)",
            self.owner,
            started.elapsed(),
            self.held.prefetched().len()
        );
        self.renew_keeping(&|_| false);
    }

    /// While a short job runs and no sibling is idle to take the next one, claims it (carrying
    /// the pending acknowledgements), so it starts the moment this one ends instead of one round
    /// trip later. Once per job, early in it; a job that then overruns hands it back (see
    /// `give_back_if_overdue`).
    fn look_ahead(&mut self) {
        const SHORT_JOB: Duration = Duration::from_secs(1);
        let (Some((_, _, started)), Some(average)) = (self.held.running(), self.average_job) else {
            return;
        };
        if self.looked_ahead
            || !self.held.prefetched().is_empty()
            || average > SHORT_JOB
            || started.elapsed() > average / 2
            || stop_requested()
            || self.recycling
            || self
                .table
                .active()
                .iter()
                .any(|s| s.state() == SlotState::Idle)
        {
            return;
        }
        self.looked_ahead = true;
        if let Err(e) = self.send_acks_and_claim(1, true) {
            log::warn!("worker {}: could not claim ahead: {e}", self.owner);
        }
    }

    /// Pauses before trying for a claim turn again, after `self.turn_waits` rounds in a row
    /// found none, even queued in the database for `queue::sql::TURN_WAIT` (see
    /// [`Worker::claim_round`]): half to one ms at first, doubling up to 8-16 ms, cut short when
    /// a claim round of this host ends. The doubling keeps many waiting children from spending
    /// the server's time on empty rounds.
    fn wait_for_turn(&mut self) {
        self.turn_waits = self.turn_waits.saturating_add(1);
        let ceiling = 1u64 << (self.turn_waits - 1).min(4);
        let pause = Duration::from_micros(1000 * ceiling / 2 + fastrand::u64(..=500 * ceiling));
        let seen = self.header.claim_done.load(Ordering::Acquire);
        futex::wait(&self.header.claim_done, seen, pause);
        self.slot.beat();
    }

    /// Renews the leases of what this worker holds, of its prefetched jobs only those `keep`
    /// keeps (the others are handed back), and gives back anything else found under its name.
    fn renew_keeping(&mut self, keep: &dyn Fn(&Claimed) -> bool) {
        self.held.renewing();
        let held = self.held.leases(keep);
        let running = self.held.running_id();
        match self.db(|db| db.renew(&held, running)) {
            Ok(renewed) => self.held.keep_renewed(&renewed, keep, self.owner),
            Err(e) => log::warn!("worker {}: lease renewal failed: {e}", self.owner),
        }
    }

    /// Sleeps until woken (an enqueue notification relayed by the listener, or a sibling with
    /// more work than it can take), a signal, or this child's turn to poll; heartbeats meanwhile,
    /// and runs the host's maintenance pass when its turn comes, so a child woken for work never
    /// runs it first. One idle child per host polls the database per `FORKQ_POLL_INTERVAL_MS`
    /// (for scheduled jobs that fell due, which its claim round finds and the next one makes
    /// claimable, and as the fallback when notifications are off), not every child. `retry_in`: a
    /// rate-limited queue allows its next start then, so the wait ends by then. Returns whether a
    /// wake-up ended the wait.
    fn wait_idle(&mut self, wake_seen: u32, retry_in: Option<Duration>) -> bool {
        let _idle = logging::activity(Activity::Idle);
        self.slot.set_state(SlotState::Idle);
        self.slot.beat();
        let slice = self.config.poll_interval.min(IDLE_SLICE);
        let until = retry_in.map(|d| Instant::now() + d);
        loop {
            if self.slot.wake.load(Ordering::Acquire) != wake_seen {
                return true;
            }
            let now = Instant::now();
            if stop_requested()
                || until.is_some_and(|until| now >= until)
                || take_turn(&self.header.poll_ms, self.config.poll_interval)
            {
                return false;
            }
            // Busy meanwhile, so a wake-up goes to a child that can take it at once.
            self.slot.set_state(SlotState::Claiming);
            self.maybe_run_maintenance();
            self.slot.set_state(SlotState::Idle);
            let slice = until.map_or(slice, |until| {
                slice.min(until.saturating_duration_since(Instant::now()))
            });
            futex::wait(&self.slot.wake, wake_seen, slice);
            self.slot.beat();
        }
    }

    /// Runs the maintenance pass when this host's turn has come. Not through [`Self::db`]: a
    /// pass that fails (a statement timed out, the connection dropped) is given up until the next
    /// interval, never retried on the spot, so maintenance cannot keep this child from its jobs;
    /// each of its statements is announced in the slot, so it cannot get the child killed either.
    fn maybe_run_maintenance(&mut self) {
        if !self.conn.is_open() || !take_turn(&self.header.maintenance_ms, maintenance::INTERVAL) {
            return;
        }
        let slot = self.slot;
        let statement = WorkerTimeouts::new(self.config.health_stale).text_statement();
        let db = self.conn.open().expect("checked above");
        // Fleet-wide, at most one pass per three quarters of the interval: each host tries once
        // per interval, and some slack keeps a host from just missing its turn.
        let pass = maintenance::run_pass(
            db.client(),
            &self.config.schema,
            self.config.retention,
            maintenance::INTERVAL * 3 / 4,
            &mut || slot.wait_on_database(statement),
        );
        slot.database_returned();
        // The next turn counts from the end of this pass, so a pass that blocks until its
        // statement timeout still leaves the host an interval of work between two.
        self.header
            .maintenance_ms
            .store(monotonic_ms(), Ordering::Release);
        match pass {
            Ok(Some(report)) if report.changed_jobs() => log::info!("maintenance: {report}"),
            // Vacuums and expired unique windows alone are routine: not worth a line at info level.
            Ok(Some(report)) if !report.vacuumed.is_empty() || report.windows_purged > 0 => {
                log::debug!("maintenance: {report}")
            }
            Ok(_) => {}
            Err(e) => {
                if e.is_connection_lost() {
                    // The next claim reconnects (and gives back what it finds under our name).
                    self.conn.lose();
                }
                log::warn!(
                    "maintenance pass failed, skipped until the next one in {:?}: {e}",
                    maintenance::INTERVAL
                );
            }
        }
    }

    /// Runs `op` (one round trip) on the connection, waiting for the database as long as it is
    /// unreachable (see [`Connection::run`]).
    fn db<T>(
        &mut self,
        op: impl FnMut(&mut Consumer) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.db_waiting(Duration::ZERO, op)
    }

    /// [`Worker::db`] for an `op` that takes longer than one round trip: up to `longer` more.
    fn db_waiting<T>(
        &mut self,
        longer: Duration,
        op: impl FnMut(&mut Consumer) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.conn.run(&mut self.held, longer, op)
    }
}

/// What a handler sees of the worker while it runs a job.
struct Context<'w, 'a> {
    worker: &'w mut Worker<'a>,
}

impl JobContext for Context<'_, '_> {
    fn heartbeat(&mut self) -> bool {
        self.worker.slot.beat();
        self.worker.give_back_if_overdue();
        self.worker.renew_if_due();
        self.worker.look_ahead();
        if self.worker.ack_flush_due(Instant::now()) {
            if let Err(e) = self.worker.flush_acks() {
                log::warn!(
                    "worker {}: could not send acknowledgements: {e}",
                    self.worker.owner
                );
            }
        }
        if let Err(e) = self.worker.notice_cancels() {
            log::warn!("worker {}: could not check cancels: {e}", self.worker.owner);
        }
        self.worker.send_progress(false);
        !immediate_stop_requested() && !self.worker.held.cancel_requested()
    }

    fn timeout(&self) -> Option<Duration> {
        self.worker.job_timeout
    }

    fn cancelled(&self) -> bool {
        self.worker.held.cancel_requested()
    }

    fn progress(&mut self, value: Value) {
        self.worker.note_progress(value);
    }

    fn runs_in_process_group(&mut self, pgid: u32) {
        self.worker
            .slot
            .handler_pgid
            .store(pgid as i32, Ordering::Release);
    }
}

/// The running job's progress reports (see [`Worker::note_progress`]).
#[derive(Default)]
struct Progress {
    /// The latest value not written yet.
    pending: Option<Value>,
    /// When a value was last written.
    sent: Option<Instant>,
    /// Whether a value was dropped already (warned about once per job).
    refused: bool,
}

/// The longest snooze a handler may ask for; longer ones are cut to it.
const MAX_SNOOZE: Duration = Duration::from_secs(10 * 365 * 86_400);

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// This process's resident memory in MiB, from /proc.
fn resident_mb() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * page_size as u64 / (1024 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_about_fifty_milliseconds_of_work() {
        assert_eq!(claim_size(None, 100), 1);
        assert_eq!(claim_size(Some(Duration::from_micros(20)), 100), 100);
        assert_eq!(claim_size(Some(Duration::from_millis(5)), 100), 10);
        assert_eq!(claim_size(Some(Duration::from_millis(50)), 100), 1);
        assert_eq!(claim_size(Some(Duration::from_secs(30)), 100), 1);
        assert_eq!(claim_size(Some(Duration::ZERO), 7), 7);
    }
}
