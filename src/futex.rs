//! Sleeping on a 32-bit word of the shared slot table until another process bumps it (a Linux
//! futex on a `MAP_SHARED` mapping).
//!
//! The one primitive behind every way a process of the fleet waits for another: an idle child
//! waiting to be woken for work ([`crate::wakeup`]), a claimer waiting for its turn
//! ([`crate::claim_gate`]), and the probe's presence service waiting for its next write or the
//! supervisor's shutdown ([`crate::presence`]). A futex wait, unlike a wait inside the PostgreSQL
//! client, is interrupted by signals, so a waiting child reacts to SIGTERM at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SlotTable;
    use std::time::Instant;

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
