//! The consumer loop each forked child runs: claim a batch, run each job, acknowledge, heartbeat.
//!
//! One job at a time per child. Acknowledgements of finished jobs are sent together with the next
//! claim in one round trip, or on their own once they have waited `FORKQ_ACK_DELAY_MS`. The
//! connection is re-opened with backoff when it drops; the slot heartbeat keeps going meanwhile,
//! because liveness must not depend on the database. An idle child sleeps on its slot's futex
//! word until the wake-up listener or a busy sibling rouses it ([`crate::wakeup`]), or until the
//! poll interval passes.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backoff;
use crate::config::Config;
use crate::handler::{process, Handler, Job, JobContext, Outcome};
use crate::logging::{self, Activity};
use crate::queue::consumer::{Ack, Claimed, Consumer, Settlement};
use crate::queue::{maintenance, QueueError, WorkerTimeouts};
use crate::slots::{monotonic_ms, take_turn, Header, Slot, SlotState, SlotTable};
use crate::{claim_gate, futex, wakeup};

mod signals;

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
    let mut worker = Worker {
        config: spec.config,
        table: spec.table,
        index: spec.index,
        slot: &spec.table.slots[spec.index],
        header: &spec.table.header,
        owner: spec.owner,
        recycle_after_jobs: spec.recycle_after_jobs,
        db: None,
        buffer: VecDeque::new(),
        current: None,
        changes_seen: None,
        lost_connection: false,
        acks: Vec::new(),
        oldest_ack: None,
        last_renewal: Instant::now(),
        last_job_took: Duration::ZERO,
        average_job: None,
        jobs_done: 0,
        recycling: false,
        looked_ahead: false,
        max_claimers: std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
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
}

/// How long one idle wait lasts at most, so the heartbeat and stop flags stay fresh.
const IDLE_SLICE: Duration = Duration::from_millis(1000);
/// Resident memory is checked after every this many jobs (reading /proc costs a little).
const RSS_CHECK_EVERY: u64 = 64;

struct Worker<'a> {
    config: &'a Config,
    table: &'a SlotTable,
    index: usize,
    slot: &'a Slot,
    header: &'a Header,
    owner: String,
    recycle_after_jobs: Option<u64>,
    db: Option<Consumer>,
    /// Claimed jobs not started yet.
    buffer: VecDeque<Claimed>,
    /// The job running now: its id, lease token, and when it started.
    current: Option<(i64, i64, Instant)>,
    /// The queue's count of changes (cancels, stopped batches) this worker has checked its
    /// prefetched jobs against; `None` before the first round.
    changes_seen: Option<i64>,
    /// Set when the connection dropped; the next connection starts by giving back strays.
    lost_connection: bool,
    /// Finished jobs whose acknowledgement has not been sent.
    acks: Vec<Ack>,
    oldest_ack: Option<Instant>,
    last_renewal: Instant,
    last_job_took: Duration,
    /// Moving average of recent job durations, which sizes the next claim.
    average_job: Option<Duration>,
    jobs_done: u64,
    /// Set once this child has done its share (see `note_recycling`).
    recycling: bool,
    /// Set once the job at hand has claimed its successor (see `look_ahead`).
    looked_ahead: bool,
    /// How many children of the host may be in a claim round trip at once: two per CPU.
    max_claimers: usize,
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
            let brought = self.send_acks_and_claim(limit)?;
            if self.buffer.is_empty() && brought.promoted > 0 {
                // Due scheduled jobs were just made claimable: claim them now.
                woken = true;
                continue;
            }
            if self.buffer.is_empty() {
                // An empty claim is this host's latest poll.
                self.header.poll_ms.store(monotonic_ms(), Ordering::Release);
                woken = self.wait_idle(wake_seen);
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
                let Some(claimed) = self.buffer.pop_front() else {
                    break;
                };
                if claimed.suspect && !self.report_start(&claimed)? {
                    continue;
                }
                self.run_job(claimed, handler);
                // After the last buffered job the next claim is one step away and carries the
                // acks: flushing them alone would cost a second round trip (and, in durable mode,
                // a second commit) per batch. Likewise after a job that claimed its successor
                // while it ran: that successor's own look-ahead carries them, while it runs.
                let carried = self.looked_ahead && !self.config.durable;
                if !self.buffer.is_empty() && !carried && self.ack_flush_due() {
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
        if !self.acks.is_empty() {
            self.flush_acks()?;
        }
        let holds_jobs = !self.buffer.is_empty() || immediate_stop_requested();
        if holds_jobs && self.db.is_some() {
            let owner = self.owner.clone();
            let back = self.db(|db| db.release(&owner, None, None))?;
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

    /// Runs one job through the handler and queues its acknowledgement.
    fn run_job(&mut self, claimed: Claimed, handler: &mut dyn Handler) {
        let job = claimed.job;
        let _running = logging::activity(Activity::Job(job.id));
        self.slot.start_job(job.id);
        let started = Instant::now();
        self.current = Some((job.id, claimed.lease_token, started));
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
        let elapsed = started.elapsed();
        self.current = None;
        self.last_job_took = elapsed;
        self.average_job = Some(match self.average_job {
            None => elapsed,
            Some(avg) => avg.mul_f64(0.8) + elapsed.mul_f64(0.2),
        });
        self.slot.finish_job(elapsed.as_micros() as u64);
        self.jobs_done += 1;
        self.note_recycling();
        if immediate_stop_requested() && !matches!(outcome, Outcome::Success(_)) {
            // Abandoned by an immediate stop: released uncharged at shut-down, not failed.
            self.buffer.push_front(Claimed { job, ..claimed });
            return;
        }
        let settlement = self.settlement_for(&job, outcome, elapsed);
        self.acks.push(Ack {
            id: job.id,
            lease_token: claimed.lease_token,
            batch_id: job.batch_id,
            settlement,
        });
        self.oldest_ack.get_or_insert_with(Instant::now);
    }

    /// Turns a handler's outcome into what the queue should do, and counts it.
    fn settlement_for(&self, job: &Job, outcome: Outcome, elapsed: Duration) -> Settlement {
        let exhausted = job.attempt >= job.max_attempts;
        let retry_delay = || {
            backoff::retry_delay(
                job.attempt,
                self.config.retry_backoff_base,
                self.config.retry_backoff_max,
            )
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
        }
    }

    /// Acks are sent early when batching them would only add latency: durable mode, a slow job
    /// (batching gains nothing), or the oldest one waited `FORKQ_ACK_DELAY_MS`.
    fn ack_flush_due(&self) -> bool {
        match self.oldest_ack {
            None => false,
            Some(oldest) => {
                self.config.durable
                    || self.last_job_took >= self.config.ack_delay
                    || oldest.elapsed() >= self.config.ack_delay
            }
        }
    }

    fn flush_acks(&mut self) -> Result<(), QueueError> {
        self.send_acks_and_claim(0).map(|_| ())
    }

    /// Sends the pending acks and claims up to `limit` jobs in one round trip; the jobs claimed
    /// join the buffer at once (so any later round trip counts them as held). If the database refuses the statement itself (not a lost connection), the acks
    /// are sent one by one and one it still refuses is dead-lettered with the database's reason,
    /// so a single bad result can neither hold back the others nor crash this child at every
    /// re-run.
    fn send_acks_and_claim(&mut self, limit: usize) -> Result<Brought, QueueError> {
        // Cloned, not taken: while the database is away, pending acks keep a stopping worker
        // trying until its deadline (see reconnect_pause).
        let acks = self.acks.clone();
        if limit > 0 {
            self.slot.claims.fetch_add(1, Ordering::Relaxed);
            claim_gate::enter(self.table, self.index, self.max_claimers);
        }
        let sent = self.db(|db| db.settle_and_claim(&acks, limit));
        if limit > 0 {
            claim_gate::leave(self.table, self.index);
        }
        let round = match sent {
            Ok(round) => {
                self.acks.clear();
                self.oldest_ack = None;
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
                    self.acks.retain(|a| a.id != id);
                }
                self.oldest_ack = None;
                self.db(|db| db.settle_and_claim(&[], limit))?
            }
        };
        self.report_refused(&round.refused);
        let brought = Brought {
            claimed: round.claimed.len(),
            promoted: round.promoted,
        };
        self.buffer.extend(round.claimed);
        self.drop_cancelled_if_changed(round.changes)?;
        Ok(brought)
    }

    /// When the queue's count of changes moved since the last round (a cancel, a batch stopped by
    /// fail-fast or cancel), ends cancelled the prefetched jobs that must no longer run, so no
    /// such job starts after this round.
    fn drop_cancelled_if_changed(&mut self, changes: i64) -> Result<(), QueueError> {
        let seen = self.changes_seen.replace(changes);
        if seen.map_or(true, |seen| seen == changes) || self.buffer.is_empty() {
            return Ok(());
        }
        let held: Vec<Claimed> = self.buffer.iter().cloned().collect();
        let dropped = self.db(|db| db.drop_cancelled(&held.iter().collect::<Vec<_>>()))?;
        if !dropped.is_empty() {
            log::info!(
                "worker {}: {} prefetched job(s) were cancelled before they started: {dropped:?}",
                self.owner,
                dropped.len()
            );
            self.buffer.retain(|c| !dropped.contains(&c.job.id));
        }
        Ok(())
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
        if self.last_renewal.elapsed() >= self.config.lease / 3 {
            self.renew(true);
        }
    }

    /// Hands the prefetched jobs back to the queue once the job at hand has run longer than its
    /// claim was meant to take, so they do not wait behind it while a sibling could run them.
    fn give_back_if_overdue(&mut self) {
        let Some((id, _, started)) = self.current else {
            return;
        };
        let meant = CLAIM_WORTH.max(self.average_job.unwrap_or_default() * 2);
        if self.buffer.is_empty() || started.elapsed() < meant {
            return;
        }
        log::info!(
            "worker {}: job {id} has run {:.1?}, longer than its claim was meant to take; \
             handing back {} prefetched job(s)",
            self.owner,
            started.elapsed(),
            self.buffer.len()
        );
        self.renew(false);
    }

    /// While a short job runs and no sibling is idle to take the next one, claims it (carrying
    /// the pending acknowledgements), so it starts the moment this one ends instead of one round
    /// trip later. Once per job, early in it; a job that then overruns hands it back (see
    /// `give_back_if_overdue`).
    fn look_ahead(&mut self) {
        const SHORT_JOB: Duration = Duration::from_secs(1);
        let (Some((_, _, started)), Some(average)) = (self.current, self.average_job) else {
            return;
        };
        if self.looked_ahead
            || !self.buffer.is_empty()
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
        if let Err(e) = self.send_acks_and_claim(1) {
            log::warn!("worker {}: could not claim ahead: {e}", self.owner);
        }
    }

    /// What this worker holds, as (id, lease token): the job running, the jobs finished and not
    /// acknowledged yet, and (with `buffer`) the jobs claimed ahead.
    fn held(&self, buffer: bool) -> Vec<(i64, i64)> {
        let ahead = self.buffer.iter().filter(|_| buffer);
        self.current
            .iter()
            .map(|&(id, token, _)| (id, token))
            .chain(self.acks.iter().map(|a| (a.id, a.lease_token)))
            .chain(ahead.map(|c| (c.job.id, c.lease_token)))
            .collect()
    }

    /// Renews the leases of what this worker holds (without the buffer when `keep_buffer` is
    /// false, which hands it back) and gives back anything else found under its name.
    fn renew(&mut self, keep_buffer: bool) {
        self.last_renewal = Instant::now();
        let held = self.held(keep_buffer);
        let running = self.current.map(|(id, _, _)| id);
        match self.db(|db| db.renew(&held, running)) {
            Ok(renewed) => self.keep_renewed(&renewed, keep_buffer),
            Err(e) => log::warn!("worker {}: lease renewal failed: {e}", self.owner),
        }
    }

    /// Drops from the buffer what a renewal did not renew (taken back by the queue, or handed
    /// back when `keep_buffer` is false).
    fn keep_renewed(&mut self, renewed: &[i64], keep_buffer: bool) {
        let before = self.buffer.len();
        self.buffer
            .retain(|c| keep_buffer && renewed.contains(&c.job.id));
        if keep_buffer && self.buffer.len() < before {
            log::warn!(
                "worker {}: {} prefetched job(s) were taken back by the queue",
                self.owner,
                before - self.buffer.len()
            );
        }
    }

    /// Sleeps until woken (an enqueue notification relayed by the listener, or a sibling with
    /// more work than it can take), a signal, or this child's turn to poll; heartbeats meanwhile,
    /// and runs the host's maintenance pass when its turn comes, so a child woken for work never
    /// runs it first. One idle child per host polls the database per `FORKQ_POLL_INTERVAL_MS`
    /// (for scheduled jobs that fell due, whose claim round makes them claimable, and as the
    /// fallback when notifications are off), not every child. Returns whether a wake-up ended
    /// the wait.
    fn wait_idle(&mut self, wake_seen: u32) -> bool {
        let _idle = logging::activity(Activity::Idle);
        self.slot.set_state(SlotState::Idle);
        self.slot.beat();
        let slice = self.config.poll_interval.min(IDLE_SLICE);
        loop {
            if self.slot.wake.load(Ordering::Acquire) != wake_seen {
                return true;
            }
            if stop_requested() || take_turn(&self.header.poll_ms, self.config.poll_interval) {
                return false;
            }
            // Busy meanwhile, so a wake-up goes to a child that can take it at once.
            self.slot.set_state(SlotState::Claiming);
            self.maybe_run_maintenance();
            self.slot.set_state(SlotState::Idle);
            futex::wait(&self.slot.wake, wake_seen, slice);
            self.slot.beat();
        }
    }

    /// Runs the maintenance pass when this host's turn has come. Not through [`Self::db`]: a
    /// pass that fails (a statement timed out, the connection dropped) is given up until the next
    /// interval, never retried on the spot, so maintenance cannot keep this child from its jobs;
    /// each of its statements is announced in the slot, so it cannot get the child killed either.
    fn maybe_run_maintenance(&mut self) {
        if self.db.is_none() || !take_turn(&self.header.maintenance_ms, maintenance::INTERVAL) {
            return;
        }
        let slot = self.slot;
        let statement = WorkerTimeouts::new(self.config.health_stale).text_statement();
        let db = self.db.as_mut().expect("checked above");
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
                    self.db = None;
                    self.lost_connection = true;
                }
                log::warn!(
                    "maintenance pass failed, skipped until the next one in {:?}: {e}",
                    maintenance::INTERVAL
                );
            }
        }
    }

    /// Runs `op` (one round trip) on the connection, opening or re-opening it with backoff while
    /// the database is unreachable (heartbeating meanwhile). Errors other than a lost connection
    /// are returned. Each blocking call is announced in the slot with its bound.
    fn db<T>(
        &mut self,
        mut op: impl FnMut(&mut Consumer) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let timeouts = WorkerTimeouts::new(self.config.health_stale);
        let mut failures = 0u32;
        loop {
            if self.db.is_none() {
                self.slot
                    .wait_on_database(timeouts.connect() + timeouts.text_statement());
                let connected = self.reconnect();
                self.slot.database_returned();
                match connected {
                    Ok(db) => {
                        if failures > 0 {
                            log::info!("worker {} reconnected to the database", self.owner);
                        }
                        self.db = Some(db);
                    }
                    Err(e) if e.is_connection_lost() => {
                        failures += 1;
                        self.reconnect_pause(&e, failures)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let db = self.db.as_mut().expect("connected above");
            self.slot.wait_on_database(timeouts.round_trip());
            let done = op(db);
            self.slot.database_returned();
            match done {
                Ok(v) => return Ok(v),
                Err(e) if e.is_connection_lost() => {
                    self.db = None;
                    self.lost_connection = true;
                    failures += 1;
                    self.reconnect_pause(&e, failures)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the connection. After a lost one, first renews what this worker holds and gives back
    /// everything else under its name: acknowledgements lost with an asynchronous commit when the
    /// database crashed, and claims whose reply was lost with the connection, would otherwise stay
    /// `running` until their lease expired.
    fn reconnect(&mut self) -> Result<Consumer, QueueError> {
        let mut db = Consumer::connect(self.config, &self.owner)?;
        if self.lost_connection {
            let renewed = db.renew(&self.held(true), self.current.map(|(id, _, _)| id))?;
            self.keep_renewed(&renewed, true);
            self.last_renewal = Instant::now();
            self.lost_connection = false;
        }
        Ok(db)
    }

    fn reconnect_pause(&self, error: &QueueError, failures: u32) -> Result<(), QueueError> {
        let _waiting = logging::activity(Activity::WaitingForDatabase);
        let pause = backoff::with_jitter(
            backoff::exponential(Duration::from_millis(100), Duration::from_secs(5), failures),
            fastrand::f64(),
        );
        if failures == 1 || failures % 10 == 0 {
            log::warn!(
                "worker {}: database unavailable ({error}); retrying in {pause:.1?}",
                self.owner
            );
        }
        let deadline = Instant::now() + pause;
        while Instant::now() < deadline {
            if immediate_stop_requested() || (stop_requested() && self.acks.is_empty()) {
                return Err(QueueError::Unavailable(
                    "told to stop while waiting for the database; the jobs this worker held run \
                     again once their lease expires"
                        .into(),
                ));
            }
            self.slot.beat();
            std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
        }
        Ok(())
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
        if self.worker.ack_flush_due() {
            if let Err(e) = self.worker.flush_acks() {
                log::warn!(
                    "worker {}: could not send acknowledgements: {e}",
                    self.worker.owner
                );
            }
        }
        !immediate_stop_requested()
    }

    fn timeout(&self) -> Option<Duration> {
        self.worker.config.job_timeout
    }

    fn runs_in_process_group(&mut self, pgid: u32) {
        self.worker
            .slot
            .handler_pgid
            .store(pgid as i32, Ordering::Release);
    }
}

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
