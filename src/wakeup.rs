//! Waking exactly one idle child when work arrives.
//!
//! Idle children do not LISTEN themselves: each sleeps on a futex word in its own slot of the
//! shared table ([`crate::futex`]). One listener (a thread of the probe process, which has a connection anyway)
//! receives the enqueue notifications and wakes a single idle child per notification, so one job
//! wakes one child instead of the whole fleet. A child that claims a full batch wakes the next idle
//! one, so a burst spreads over the fleet within a few hundred microseconds. The futex wait is also
//! interrupted by signals (unlike a wait inside the PostgreSQL client), so an idle child reacts to
//! SIGTERM at once. When the listener is down (probe re-forking, `FORKQ_LISTEN=0`), children fall
//! back to polling every `FORKQ_POLL_INTERVAL_MS`.

use std::time::Duration;

use crate::backoff;
use crate::config::Config;
use crate::futex;
use crate::queue::listener::Listener;
use crate::slots::{SlotState, SlotTable};

/// How long one listener wait lasts; only bounds how fast a lost connection is noticed.
const LISTEN_SLICE: Duration = Duration::from_secs(5);

/// Wakes one idle child other than `except` (the caller's own slot, if a child calls it).
/// Returns whether one was idle.
pub fn wake_one_idle(table: &SlotTable, except: Option<usize>) -> bool {
    let woken = table
        .active()
        .iter()
        .enumerate()
        .filter(|(index, _)| Some(*index) != except)
        // Taking the slot out of Idle first means each wake-up rouses a different child.
        .find(|(_, slot)| slot.swap_state(SlotState::Idle, SlotState::Claiming));
    match woken {
        Some((_, slot)) => {
            futex::wake(&slot.wake);
            true
        }
        None => false,
    }
}

/// The listener loop: LISTEN on the schema's channel, wake one idle child per notification of
/// work, and record the cancels of jobs in the slot table's cancel ring (children running or
/// holding those jobs see them at their next heartbeat). Reconnects with backoff when the
/// database goes away; never returns.
pub fn run_listener(config: &Config, table: &SlotTable) -> ! {
    let mut failures = 0u32;
    loop {
        let error = match Listener::connect(config) {
            Ok(mut listener) => {
                if failures > 0 {
                    log::info!("wake-up listener reconnected");
                }
                failures = 0;
                loop {
                    match listener.wait(LISTEN_SLICE) {
                        Ok(heard) => {
                            for id in heard.cancels {
                                table.header.cancels.push(id);
                            }
                            for _ in 0..heard.wakeups {
                                if !wake_one_idle(table, None) {
                                    break;
                                }
                            }
                        }
                        Err(e) => break e,
                    }
                }
            }
            Err(e) => e,
        };
        failures += 1;
        let pause =
            backoff::exponential(Duration::from_millis(200), Duration::from_secs(5), failures);
        if failures == 1 || failures % 10 == 0 {
            log::warn!("wake-up listener lost the database ({error}); children poll meanwhile; retrying in {pause:.1?}");
        }
        std::thread::sleep(pause);
    }
}
