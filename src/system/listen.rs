//! Sockets handed over by a service manager at start (socket activation, sd_listen_fds(3)):
//! descriptors 3, 4, … as many as `LISTEN_FDS` says, when `LISTEN_PID` is this process.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{Result, bail};

/// The first descriptor passed (SD_LISTEN_FDS_START).
const FIRST: RawFd = 3;
/// More than any unit of ours passes; a larger count is a mistake, not a request.
const MOST: usize = 64;

/// Takes the sockets passed to this process, close-on-exec, and removes the variables that
/// announced them so that no child mistakes them for its own. None passed (or passed to
/// another process, whose variables we inherited) gives an empty list.
///
/// Call while the process has a single thread: it changes the environment.
pub fn take() -> Result<Vec<OwnedFd>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    // SAFETY: the caller runs this before starting any thread, so nothing reads the
    // environment concurrently.
    unsafe {
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let Some(count) = count.parse::<usize>().ok().filter(|&n| n <= MOST) else {
        bail!("LISTEN_FDS={count:?} is not a count of passed sockets");
    };
    (FIRST..FIRST + count as RawFd)
        .map(|fd| {
            // SAFETY: F_SETFD on a descriptor number; fails harmlessly when it is not open.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
                bail!("LISTEN_FDS names descriptor {fd}, which is not open");
            }
            // SAFETY: the service manager passed this descriptor to us to own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect()
}
