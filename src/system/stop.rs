//! How a long-running companion (`refresh`, `port-forward`) learns that it is asked to stop:
//! systemd sends SIGTERM, a terminal SIGINT. The handler only notes it and writes to a pipe
//! that the process's wait watches, so that a stop wakes it like any other event and it ends
//! its work cleanly at the next wait, never in the middle of a step. Nothing wakes it on a
//! clock for this.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{Context, Result};

static STOP: AtomicBool = AtomicBool::new(false);
/// The write end of the pipe that wakes the waiting process when a stop is asked for.
static STOP_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let fd = STOP_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe already holds a wake-up.
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// Installs the handlers of SIGTERM and SIGINT; the descriptor returned (non-blocking) becomes
/// readable when one of them came.
pub fn install() -> Result<OwnedFd> {
    use nix::fcntl::OFlag;
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let (read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).context("making the stop pipe")?;
    // The write end lives as long as the process.
    STOP_PIPE.store(std::os::fd::IntoRawFd::into_raw_fd(write), Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(request_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to atomics and writes to a pipe.
        unsafe { sigaction(signal, &action) }.context("installing a signal handler")?;
    }
    Ok(read)
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
