//! A child's own signal handling: flags set by SIGTERM/SIGINT (stop after the current job) and
//! SIGQUIT (stop now), read by the consumer loop and by handlers through their job context; and
//! the signals meant for the supervisor alone, ignored.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Set by SIGTERM/SIGINT: finish the current job, hand back the rest, exit.
static STOP: AtomicBool = AtomicBool::new(false);
/// Set by SIGQUIT: abandon the current job too (it goes back to the queue uncharged).
static IMMEDIATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_immediate(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    IMMEDIATE.store(true, Ordering::SeqCst);
}

/// Signals a child (or the probe) ignores: they are the supervisor's commands (rolling restart,
/// one child more or less), and they also reach the whole process group when sent to it (a
/// terminal's hang-up, `kill -HUP -PGID`), where their default actions would end or stop every
/// child. Handler programs get the default dispositions back (see `handler::process`).
pub const SUPERVISOR_ONLY: [Signal; 3] = [Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU];

/// Installs the child's own signal handlers. Called right after the fork, once the supervisor's
/// dispositions have been reset, so a child never runs the supervisor's handlers.
pub fn install_signal_handlers() {
    let stop = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let immediate = SigAction::new(
        SigHandler::Handler(on_immediate),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handlers only store to atomics, which is async-signal-safe.
    unsafe {
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            let _ = signal::sigaction(sig, &stop);
        }
        let _ = signal::sigaction(Signal::SIGQUIT, &immediate);
        let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        for sig in SUPERVISOR_ONLY {
            let _ = signal::sigaction(sig, &ignore);
        }
    }
}

/// Whether this child was asked to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Whether this child was asked to stop at once, abandoning its job.
pub fn immediate_stop_requested() -> bool {
    IMMEDIATE.load(Ordering::SeqCst)
}
