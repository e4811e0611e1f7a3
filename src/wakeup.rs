//! Waking exactly one idle child when work arrives.
//!
//! Idle children do not LISTEN themselves: each sleeps on a futex word in its own slot of the
//! shared table. One listener (a thread of the probe process, which has a connection anyway)
//! receives the enqueue notifications and wakes a single idle child per notification, so one job
//! wakes one child instead of the whole fleet. A child that claims a full batch wakes the next idle
//! one, so a burst spreads over the fleet within a few hundred microseconds. The futex wait is also
//! interrupted by signals (unlike a wait inside the PostgreSQL client), so an idle child reacts to
//! SIGTERM at once. When the listener is down (probe re-forking, `FORKQ_LISTEN=0`), children fall
//! back to polling every `FORKQ_POLL_INTERVAL_MS`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::backoff;
use crate::config::Config;
use crate::queue::listener::Listener;
use crate::slots::{SlotState, SlotTable};

/// How long one listener wait lasts; only bounds how fast a lost connection is noticed.
const LISTEN_SLICE: Duration = Duration::from_secs(5);

/// Sleeps while `word` still holds `expected`, at most `timeout`; returns early on a wake, a
/// signal, or when the word changed before the call (no lost wake-ups: read the word before
/// checking for work, then pass that value here).
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; the futex is shared
    // (no FUTEX_PRIVATE_FLAG) because the word lives in a MAP_SHARED mapping used by several
    // processes. Errors (EAGAIN: the value changed; EINTR: a signal; ETIMEDOUT) all mean "go on".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Bumps `word` and wakes whoever sleeps on it.
pub fn wake(word: &AtomicU32) {
    word.fetch_add(1, Ordering::AcqRel);
    // SAFETY: as in `wait`; FUTEX_WAKE only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1i32,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

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
            wake(&slot.wake);
            true
        }
        None => false,
    }
}

/// Waits until fewer than `max` children of the host are in a claim round trip, then marks
/// `index` as one of them; [`claim_gate_leave`] ends the turn. With many children on few cores,
/// claimers that all walk the head of the claim index past each other's locked rows burn the
/// database's CPU; taking turns keeps that walk short. The count is read, not locked, so it may
/// admit one or two more than `max` in a race: it shapes load, it is no correctness bound. The
/// supervisor clears a dead child's flag when it reaps it, so no turn is ever lost.
pub fn claim_gate_enter(table: &SlotTable, index: usize, max: usize) {
    let slot = &table.slots[index];
    loop {
        let seen = table.header.claim_done.load(Ordering::Acquire);
        let busy = table
            .active()
            .iter()
            .filter(|s| s.in_claim.load(Ordering::Acquire))
            .count();
        if busy < max {
            slot.in_claim.store(true, Ordering::Release);
            return;
        }
        wait(&table.header.claim_done, seen, Duration::from_millis(5));
    }
}

/// Ends the claim turn taken by [`claim_gate_enter`] and wakes a child waiting for one.
pub fn claim_gate_leave(table: &SlotTable, index: usize) {
    table.slots[index].in_claim.store(false, Ordering::Release);
    wake(&table.header.claim_done);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn claim_gate_admits_max_then_waits_for_a_turn() {
        let table = SlotTable::create_shared().unwrap();
        table.header.concurrency.store(3, Ordering::Release);
        claim_gate_enter(table, 0, 2);
        claim_gate_enter(table, 1, 2);
        let started = Instant::now();
        let waiter = std::thread::spawn(move || {
            claim_gate_enter(table, 2, 2);
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(200));
        claim_gate_leave(table, 0);
        let waited = waiter.join().unwrap();
        assert!(
            waited >= Duration::from_millis(150),
            "the third claimer did not wait: {waited:?}"
        );
        assert!(table.slots[2].in_claim.load(Ordering::Acquire));
        assert!(!table.slots[0].in_claim.load(Ordering::Acquire));
    }

    #[test]
    fn wait_returns_at_once_when_the_word_moved() {
        let word = AtomicU32::new(5);
        let t = Instant::now();
        wait(&word, 4, Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn wait_times_out() {
        let word = AtomicU32::new(0);
        let t = Instant::now();
        wait(&word, 0, Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn wake_reaches_another_process() {
        let table = SlotTable::create_shared().unwrap();
        let slot = &table.slots[0];
        let before = slot.wake.load(Ordering::Acquire);
        // SAFETY: the test thread forks a child that only sleeps on the futex and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let t = Instant::now();
                wait(&slot.wake, before, Duration::from_secs(10));
                std::process::exit(if t.elapsed() < Duration::from_secs(5) {
                    0
                } else {
                    1
                });
            }
            nix::unistd::ForkResult::Parent { child } => {
                std::thread::sleep(Duration::from_millis(100));
                wake(&slot.wake);
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
