//! What a child holds of the queue's jobs: the one running, the ones claimed ahead and not
//! started yet, and the finished ones whose acknowledgement waits to be sent.
//!
//! A lease renewal, and the first statement on a connection that replaces a lost one, renews
//! what is listed here (of the prefetched jobs, those the renewal keeps) and gives back anything
//! else found under the child's name. So a job is listed from the round that claims it until its
//! acknowledgement is sent; the only gap is between taking a prefetched job and starting it (see
//! [`Holdings::next_prefetched`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::queue::consumer::{Ack, Claimed};

/// The jobs a child holds a lease on, and the acknowledgements it still owes the queue.
pub(super) struct Holdings {
    /// The job running now: its id, lease token, and when it started.
    running: Option<(i64, i64, Instant)>,
    /// Whether the running job's cancel was requested (confirmed by the database).
    cancel_requested: bool,
    /// Claimed jobs not started yet: the buffer of prefetched jobs, first to run first.
    prefetched: VecDeque<Claimed>,
    /// Finished jobs whose acknowledgement has not been sent.
    acks: Vec<Ack>,
    /// When the oldest pending ack was queued, which bounds how long acks wait for a round.
    oldest_ack: Option<Instant>,
    /// When the last renewal began, which says when the next is due.
    last_renewal: Instant,
}

impl Holdings {
    /// Nothing held; the first renewal falls due a third of a lease from now.
    pub(super) fn new() -> Self {
        Holdings {
            running: None,
            cancel_requested: false,
            prefetched: VecDeque::new(),
            acks: Vec::new(),
            oldest_ack: None,
            last_renewal: Instant::now(),
        }
    }

    /// Notes the job that starts running now (its cancel not requested yet).
    pub(super) fn start(&mut self, id: i64, lease_token: i64, started: Instant) {
        self.running = Some((id, lease_token, started));
        self.cancel_requested = false;
    }

    /// Notes that the running job ended. It is held again only once its ack is pushed (or it is
    /// put back), which the caller does before its next round trip.
    pub(super) fn finish(&mut self) {
        self.running = None;
    }

    /// The job running now: its id, lease token, and when it started.
    pub(super) fn running(&self) -> Option<(i64, i64, Instant)> {
        self.running
    }

    /// Whether the running job's cancel was requested, as the database confirmed it.
    pub(super) fn cancel_requested(&self) -> bool {
        self.cancel_requested
    }

    /// The jobs claimed and not started yet, in the order they run.
    pub(super) fn prefetched(&self) -> &VecDeque<Claimed> {
        &self.prefetched
    }

    /// Adds the jobs a round just claimed, at once: any later round trip then counts them as held.
    pub(super) fn add_claimed(&mut self, claimed: impl IntoIterator<Item = Claimed>) {
        self.prefetched.extend(claimed);
    }

    /// Takes the next prefetched job to run. The caller renews before this (see
    /// `Worker::work`): once taken, the job is held only when it starts.
    pub(super) fn next_prefetched(&mut self) -> Option<Claimed> {
        self.prefetched.pop_front()
    }

    /// Puts a job back first in line (one abandoned by an immediate stop, handed back at
    /// shut-down with the rest).
    pub(super) fn put_back(&mut self, claimed: Claimed) {
        self.prefetched.push_front(claimed);
    }

    /// Forgets the prefetched jobs among `ids` (ended cancelled before they started).
    pub(super) fn drop_prefetched(&mut self, ids: &[i64]) {
        self.prefetched.retain(|c| !ids.contains(&c.job.id));
    }

    /// Queues the acknowledgement of a job that finished `at`; it stays held until sent.
    pub(super) fn push_ack(&mut self, ack: Ack, at: Instant) {
        self.acks.push(ack);
        self.oldest_ack.get_or_insert(at);
    }

    /// Whether acknowledgements wait to be sent.
    pub(super) fn owes_acks(&self) -> bool {
        !self.acks.is_empty()
    }

    /// Acks are sent early when batching them would only add latency: durable mode, a slow job
    /// (`last_job_took`: batching gains nothing), or the oldest one waited `FORKQ_ACK_DELAY_MS`
    /// by `now`.
    pub(super) fn ack_flush_due(
        &self,
        config: &Config,
        last_job_took: Duration,
        now: Instant,
    ) -> bool {
        match self.oldest_ack {
            None => false,
            Some(oldest) => {
                config.durable
                    || last_job_took >= config.ack_delay
                    || now.saturating_duration_since(oldest) >= config.ack_delay
            }
        }
    }

    /// The acknowledgements for the next round. Copied, not taken: they stay pending (so held,
    /// and keeping a stopping worker waiting for the database) until [`Self::acks_sent`] or
    /// [`Self::ack_sent`] says they went through.
    pub(super) fn acks_for_round(&self) -> Vec<Ack> {
        self.acks.clone()
    }

    /// Every pending acknowledgement was sent.
    pub(super) fn acks_sent(&mut self) {
        self.acks.clear();
        self.oldest_ack = None;
    }

    /// The acknowledgement of job `id` was sent (or given up on) on its own.
    pub(super) fn ack_sent(&mut self, id: i64) {
        self.acks.retain(|a| a.id != id);
    }

    /// How long since the last lease renewal began.
    pub(super) fn since_renewal(&self) -> Duration {
        self.last_renewal.elapsed()
    }

    /// Counts the time to the next renewal from now.
    pub(super) fn renewing(&mut self) {
        self.last_renewal = Instant::now();
    }

    /// What this worker holds, as (id, lease token): the job running, the jobs finished and not
    /// acknowledged yet, and the jobs claimed ahead that `keep` keeps.
    pub(super) fn leases(&self, keep: &dyn Fn(&Claimed) -> bool) -> Vec<(i64, i64)> {
        let ahead = self.prefetched.iter().filter(|c| keep(c));
        self.running
            .iter()
            .map(|&(id, token, _)| (id, token))
            .chain(self.acks.iter().map(|a| (a.id, a.lease_token)))
            .chain(ahead.map(|c| (c.job.id, c.lease_token)))
            .collect()
    }

    /// The running job's id, as a renewal reports its cancel.
    pub(super) fn running_id(&self) -> Option<i64> {
        self.running.map(|(id, _, _)| id)
    }

    /// Drops from the prefetched jobs what a renewal did not renew (taken back by the queue, or
    /// handed back because `keep` did not keep it), and notes a cancel of the running job.
    /// `owner` names this worker in the log.
    pub(super) fn keep_renewed(
        &mut self,
        renewed: &[(i64, bool)],
        keep: &dyn Fn(&Claimed) -> bool,
        owner: &str,
    ) {
        let running = self.running_id();
        if !self.cancel_requested
            && renewed
                .iter()
                .any(|&(id, cancel)| cancel && Some(id) == running)
        {
            log::info!(
                "job {:?}: its cancel was requested; telling the handler",
                running
            );
            self.cancel_requested = true;
        }
        let before = self.prefetched.iter().filter(|c| keep(c)).count();
        self.prefetched
            .retain(|c| keep(c) && renewed.iter().any(|&(id, _)| id == c.job.id));
        if self.prefetched.len() < before {
            log::warn!(
                "worker {owner}: {} prefetched job(s) were taken back by the queue",
                before - self.prefetched.len()
            );
        }
    }
}
