//! The supervisor's signals: a self-pipe that wakes `poll()`, and a flag per signal.
//!
//! signal-hook installs the handlers; they only set a flag and write a byte, which is
//! async-signal-safe, and start no thread. Forked children must not keep any of it: they would
//! run the supervisor's handlers and write into its pipe. [`SignalPipe::forget_in_child`] undoes
//! everything after a fork.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

/// The signals the supervisor acts on.
pub const HANDLED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGCHLD,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// Handlers installed, and the pipe they write to.
pub struct SignalPipe {
    read: UnixStream,
    write: UnixStream,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
}

impl SignalPipe {
    /// Installs the handlers for [`HANDLED`].
    pub fn install() -> std::io::Result<SignalPipe> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut flags = Vec::new();
        for sig in HANDLED {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig as i32, Arc::clone(&flag))?;
            signal_hook::low_level::pipe::register_raw(sig as i32, write.as_raw_fd())?;
            flags.push((sig, flag));
        }
        Ok(SignalPipe { read, write, flags })
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The signals received since the last call, in [`HANDLED`] order.
    pub fn drain(&self) -> Vec<Signal> {
        let mut buf = [0u8; 64];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
        self.flags
            .iter()
            .filter(|(_, flag)| flag.swap(false, Ordering::SeqCst))
            .map(|(sig, _)| *sig)
            .collect()
    }

    /// In a freshly forked child (signals still blocked, see [`block`]): restores default
    /// dispositions and closes the inherited pipe ends, so nothing of the supervisor's signal
    /// handling remains. The caller installs its own handlers, then calls [`unblock_all`].
    pub fn forget_in_child(&self) {
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        for sig in HANDLED {
            // SAFETY: installing SIG_DFL is always sound.
            let _ = unsafe { signal::sigaction(sig, &default) };
        }
        for fd in [self.read.as_raw_fd(), self.write.as_raw_fd()] {
            // SAFETY: the child never uses these descriptors; the UnixStreams that own them are
            // the supervisor's, so closing here cannot double-close anything in this process.
            unsafe { libc::close(fd) };
        }
    }
}

/// Blocks every signal in [`HANDLED`] (around a fork); returns the mask to restore.
pub fn block() -> nix::Result<SigSet> {
    let mut previous = SigSet::empty();
    let set: SigSet = HANDLED.iter().copied().collect();
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut previous))?;
    Ok(previous)
}

/// Restores the mask [`block`] returned (in the supervisor, right after the fork).
pub fn restore(previous: &SigSet) {
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(previous), None);
}

/// Unblocks every signal (in a forked process, once its own handlers are installed); signals
/// that arrived since the fork are delivered now.
pub fn unblock_all() {
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}
