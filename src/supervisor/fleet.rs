//! Per-slot bookkeeping of the supervisor: when to re-fork, and when a slot is crash-looping.
//!
//! Pure logic on plain values (no processes, no clock reads) so it can be unit-tested.

use std::time::{Duration, Instant};

use crate::backoff;

/// The supervisor's private view of one slot.
#[derive(Debug, Clone)]
pub struct SlotPlan {
    /// The live occupant, if any.
    pub pid: Option<i32>,
    /// When the occupant was forked.
    pub forked_at: Instant,
    /// When a replacement is due (set after a death, cleared by the fork).
    pub restart_at: Option<Instant>,
    /// Deaths in a row that came before the healthy uptime.
    pub fast_crashes: u32,
    /// Why the supervisor signalled the occupant, if it did: recorded on its in-flight job.
    pub kill_reason: Option<String>,
    /// When a SIGKILL follows the SIGTERM already sent (job timeout).
    pub kill_at: Option<Instant>,
    /// The occupant was asked to exit (shutdown, rolling restart, recycling): not a crash.
    pub exit_expected: bool,
    /// The slot is being retired (TTOU): no replacement after the exit.
    pub retiring: bool,
}

impl SlotPlan {
    /// A slot with no occupant and a fork due at `now`.
    pub fn new(now: Instant) -> SlotPlan {
        SlotPlan {
            pid: None,
            forked_at: now,
            restart_at: Some(now),
            fast_crashes: 0,
            kill_reason: None,
            kill_at: None,
            exit_expected: false,
            retiring: false,
        }
    }
}

/// Restart policy from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// A life shorter than this (or one that never heartbeated) counts as a fast crash.
    pub healthy_uptime: Duration,
    /// Fast crashes in a row that make the slot crash-looping.
    pub crash_loop_threshold: u32,
    /// Second restart delay; doubles after that.
    pub backoff_base: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
}

/// What the supervisor learned from one death.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeathVerdict {
    /// When the replacement is due, or `None` when the slot is not to be refilled.
    pub restart_in: Option<Duration>,
    /// Whether the slot is now crash-looping.
    pub crash_looping: bool,
}

impl RestartPolicy {
    /// Records the death of the occupant of `plan` at `now`. `heartbeated` tells whether it ever
    /// showed progress: a child that never polled did not live "healthily", however long it ran.
    /// The first fast crash is restarted at once (a kill -9 costs one fork, about a millisecond);
    /// consecutive ones back off exponentially.
    pub fn on_death(&self, plan: &mut SlotPlan, now: Instant, heartbeated: bool) -> DeathVerdict {
        plan.pid = None;
        plan.kill_at = None;
        let uptime = now.saturating_duration_since(plan.forked_at);
        let expected = std::mem::take(&mut plan.exit_expected);
        if plan.retiring {
            return DeathVerdict {
                restart_in: None,
                crash_looping: false,
            };
        }
        if expected || (uptime >= self.healthy_uptime && heartbeated) {
            plan.fast_crashes = 0;
        } else {
            plan.fast_crashes += 1;
        }
        let delay = backoff::exponential(
            self.backoff_base,
            self.backoff_max,
            plan.fast_crashes.saturating_sub(1),
        );
        plan.restart_at = Some(now + delay);
        DeathVerdict {
            restart_in: Some(delay),
            crash_looping: plan.fast_crashes >= self.crash_loop_threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            healthy_uptime: Duration::from_secs(10),
            crash_loop_threshold: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }

    #[test]
    fn first_crash_restarts_at_once_then_backs_off() {
        let t0 = Instant::now();
        let mut plan = SlotPlan::new(t0);
        let delays: Vec<(Duration, bool)> = (0..5)
            .map(|_| {
                let v = policy().on_death(&mut plan, t0, true);
                (v.restart_in.unwrap(), v.crash_looping)
            })
            .collect();
        assert_eq!(
            delays,
            vec![
                (Duration::ZERO, false),
                (Duration::from_millis(100), false),
                (Duration::from_millis(200), true),
                (Duration::from_millis(400), true),
                (Duration::from_millis(800), true),
            ]
        );
    }

    #[test]
    fn a_healthy_life_resets_the_count() {
        let t0 = Instant::now();
        let mut plan = SlotPlan::new(t0);
        policy().on_death(&mut plan, t0, true);
        policy().on_death(&mut plan, t0, true);
        plan.forked_at = t0;
        let v = policy().on_death(&mut plan, t0 + Duration::from_secs(11), true);
        assert_eq!(
            v,
            DeathVerdict {
                restart_in: Some(Duration::ZERO),
                crash_looping: false
            }
        );
    }

    #[test]
    fn a_long_life_without_heartbeat_is_not_healthy() {
        let t0 = Instant::now();
        let mut plan = SlotPlan::new(t0);
        for _ in 0..3 {
            plan.forked_at = t0;
            policy().on_death(&mut plan, t0 + Duration::from_secs(60), false);
        }
        assert_eq!(plan.fast_crashes, 3);
    }

    #[test]
    fn expected_exits_and_retired_slots() {
        let t0 = Instant::now();
        let mut plan = SlotPlan::new(t0);
        plan.exit_expected = true;
        assert_eq!(
            policy().on_death(&mut plan, t0, true).restart_in,
            Some(Duration::ZERO)
        );
        assert_eq!(plan.fast_crashes, 0);
        plan.retiring = true;
        assert_eq!(policy().on_death(&mut plan, t0, true).restart_in, None);
    }
}
