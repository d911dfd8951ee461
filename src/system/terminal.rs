//! Running a command in a session of its own, on a pseudo-terminal of its own when ours is a
//! terminal, the way `sudo` (use_pty) and `runuser --pty` do.
//!
//! A command that shares its caller's terminal can push keystrokes into it with TIOCSTI (where
//! the kernel still allows that), keep reading what is typed there after it "ended", or change
//! its modes. Here the command gets a new session, so the caller's terminal is never its
//! controlling terminal, and every standard descriptor that was a terminal becomes the slave
//! of a new pty. The caller stays behind as a relay: the terminal's input goes to the pty
//! (raw, so ^C reaches the command through the pty's own line discipline), the pty's output to
//! the terminal, window-size changes and signals are passed on, and the command's exit status
//! becomes ours. ^Z cannot stop the command itself: its process group has no parent in its
//! session, and the kernel discards terminal stop signals for such orphans (a shell run as the
//! command still suspends its own jobs).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::pty::{Winsize, openpty};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, Uid};

/// After the command has ended, how long its last output may take to arrive. Whatever it
/// left running in the background may hold the pty open for ever; we do not wait for that.
const DRAIN_IDLE: Duration = Duration::from_millis(100);
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// Signals the relay passes on to the command rather than dying of them.
const FORWARDED: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn stdio(fd: i32) -> BorrowedFd<'static> {
    // SAFETY: 0, 1 and 2 stay open for the life of the process (at worst on /dev/null).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Which of our standard descriptors are terminals.
struct Outer {
    ttys: [bool; 3],
}

impl Outer {
    fn probe() -> Outer {
        Outer {
            ttys: [0, 1, 2].map(|fd| nix::unistd::isatty(stdio(fd)).unwrap_or(false)),
        }
    }

    /// The descriptor to take modes and window size from, and to write the pty's output to.
    fn terminal(&self) -> Option<BorrowedFd<'static>> {
        [1, 2, 0]
            .into_iter()
            .find(|&fd| self.ttys[fd as usize])
            .map(stdio)
    }

    /// Raw mode only when we read the terminal and it is ours to set: a background job that
    /// changes its terminal's modes gets stopped by SIGTTOU.
    fn may_go_raw(&self) -> bool {
        self.ttys[0]
            && nix::unistd::tcgetpgrp(stdio(0)).is_ok_and(|pgrp| pgrp == nix::unistd::getpgrp())
    }
}

fn window_size(fd: BorrowedFd<'_>) -> Option<Winsize> {
    let mut size = Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (done == 0).then_some(size)
}

fn set_window_size(fd: BorrowedFd<'_>, size: &Winsize) {
    // SAFETY: TIOCSWINSZ reads one winsize from the struct we pass.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, size) };
}

/// The outer terminal in raw mode; its old modes come back on drop, whatever happens.
struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    fn enter(outer: &Outer) -> RawMode {
        let saved = outer
            .may_go_raw()
            .then(|| tcgetattr(stdio(0)).ok())
            .flatten();
        if let Some(saved) = &saved {
            let mut raw = saved.clone();
            cfmakeraw(&mut raw);
            let _ = tcsetattr(stdio(0), SetArg::TCSADRAIN, &raw);
        }
        RawMode { saved }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = tcsetattr(stdio(0), SetArg::TCSADRAIN, &saved);
        }
    }
}

/// Runs `command` in a forked child, in a new session, with a pty of its own (owned by
/// `owner`) in place of every standard descriptor that is a terminal. `command` runs in the
/// child with signals as they were; it must replace the process (exec) or return the exit
/// status to give up with. Returns the command's exit status, 128 + N when signal N ended it.
/// The caller should exit then: the forwarded signals stay blocked in this process.
pub fn run_in_own_session(owner: Uid, command: impl FnOnce() -> i32) -> Result<i32> {
    let outer = Outer::probe();
    let pty = match outer.terminal() {
        Some(terminal) => {
            let modes = tcgetattr(terminal).ok();
            let size = window_size(terminal);
            let pty =
                openpty(size.as_ref(), modes.as_ref()).context("opening a pseudo-terminal")?;
            // Its own terminal, as at a login: programs that reopen it by name must be able to.
            nix::unistd::fchown(&pty.slave, Some(owner), None)
                .context("handing the pseudo-terminal to the user")?;
            Some(pty)
        }
        None => None,
    };

    let mut watched = SigSet::empty();
    for signal in FORWARDED {
        watched.add(signal);
    }
    watched.add(Signal::SIGCHLD);
    watched.add(Signal::SIGWINCH);
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&watched), Some(&mut old_mask))
        .context("blocking signals")?;
    let signals = SignalFd::with_flags(&watched, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("opening a signalfd")?;

    // SAFETY: the helper is single-threaded here (exec runs no threads), so the child may do
    // anything up to exec.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Child => {
            let status = match enter_session(&outer, pty.as_ref().map(|p| &p.slave), &old_mask) {
                Ok(()) => command(),
                Err(e) => {
                    eprintln!("error: exec: {e:#}");
                    126
                }
            };
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(status) }
        }
        ForkResult::Parent { child } => {
            let master = pty.map(|pty| {
                drop(pty.slave);
                pty.master
            });
            let raw = RawMode::enter(&outer);
            let status = relay(child, &outer, master, &signals);
            drop(raw);
            // The signals stay blocked: we exit next, and one that came after the command's
            // end (a second ^C) must not turn its exit status into our death.
            status
        }
    }
}

/// In the child: a new session, the pty as controlling terminal on the descriptors that were
/// terminals, and the caller's signal mask back.
fn enter_session(outer: &Outer, slave: Option<&OwnedFd>, old_mask: &SigSet) -> Result<()> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(old_mask), None).context("restoring signals")?;
    nix::unistd::setsid().context("setsid")?;
    if let Some(slave) = slave {
        // SAFETY: TIOCSCTTY takes an integer argument; 0 means "do not steal".
        if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } == -1 {
            return Err(std::io::Error::last_os_error()).context("TIOCSCTTY");
        }
        for fd in [0, 1, 2] {
            if outer.ttys[fd as usize] {
                // SAFETY: dup2 onto a standard descriptor number; the old one is closed.
                if unsafe { libc::dup2(slave.as_raw_fd(), fd) } == -1 {
                    return Err(std::io::Error::last_os_error()).context("dup2");
                }
            }
        }
    }
    Ok(())
}

/// What the relay does until the command has ended; returns its exit status.
fn relay(child: Pid, outer: &Outer, master: Option<OwnedFd>, signals: &SignalFd) -> Result<i32> {
    if let Some(master) = &master {
        // Our writes to the pty must never block: the command may not be reading.
        fcntl(master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).context("fcntl on the pty")?;
    }
    let output = outer.terminal();
    let mut input = (master.is_some() && outer.ttys[0]).then(|| stdio(0));
    let mut master_readable = master.is_some();
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 4096];
    let status = loop {
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let input_at = match input {
            Some(fd) if pending.is_empty() => {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let master_at = master.as_ref().and_then(|m| {
            let mut events = PollFlags::empty();
            if master_readable {
                events |= PollFlags::POLLIN;
            }
            if !pending.is_empty() {
                events |= PollFlags::POLLOUT;
            }
            (!events.is_empty()).then(|| {
                fds.push(PollFd::new(m.as_fd(), events));
                fds.len() - 1
            })
        });
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let ready = |at: Option<usize>| {
            at.and_then(|i| fds[i].revents())
                .unwrap_or(PollFlags::empty())
        };
        let (signal_events, input_events, master_events) =
            (ready(Some(0)), ready(input_at), ready(master_at));
        drop(fds);

        if !signal_events.is_empty()
            && let Some(status) = handle_signals(child, signals, outer, master.as_ref())?
        {
            break status;
        }
        if !input_events.is_empty() {
            match input.map(|fd| nix::unistd::read(fd, &mut buffer)) {
                Some(Ok(n)) if n > 0 => pending.extend_from_slice(&buffer[..n]),
                Some(Err(Errno::EINTR | Errno::EAGAIN)) => {}
                // End of input or a hung-up terminal: nothing more to pass on.
                _ => input = None,
            }
        }
        if let Some(master) = &master {
            if master_events.contains(PollFlags::POLLOUT) {
                match nix::unistd::write(master, &pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Err(_) => pending.clear(),
                }
            }
            if master_events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                && !copy_out(master, output, &mut buffer)
            {
                // Nobody holds the pty's other end any more; the command's exit is next.
                master_readable = false;
            }
        }
    };
    if let Some(master) = &master {
        drain(master, output, &mut buffer);
    }
    Ok(status)
}

/// Copies one read's worth from the pty to the terminal. False when the pty has nothing more
/// to give (EIO: every holder of the slave has closed it).
fn copy_out(master: &OwnedFd, output: Option<BorrowedFd<'_>>, buffer: &mut [u8]) -> bool {
    match nix::unistd::read(master, buffer) {
        Ok(0) => false,
        Ok(n) => {
            if let Some(output) = output {
                write_all(output, &buffer[..n]);
            }
            true
        }
        Err(Errno::EINTR | Errno::EAGAIN) => true,
        Err(_) => false,
    }
}

fn write_all(fd: BorrowedFd<'_>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// The command's last output, bounded in time: a background process it left behind may keep
/// the pty open and even keep writing.
fn drain(master: &OwnedFd, output: Option<BorrowedFd<'_>>, buffer: &mut [u8]) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let wait = PollTimeout::try_from(left.min(DRAIN_IDLE)).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) => return,
            Ok(_) => {
                if !copy_out(master, output, buffer) {
                    return;
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Handles what the signalfd holds. Returns the exit status once the command has ended.
fn handle_signals(
    child: Pid,
    signals: &SignalFd,
    outer: &Outer,
    master: Option<&OwnedFd>,
) -> Result<Option<i32>> {
    while let Some(info) = signals.read_signal().context("reading the signalfd")? {
        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        match signal {
            Signal::SIGCHLD => {
                if let Some(status) = reap(child)? {
                    return Ok(Some(status));
                }
            }
            Signal::SIGWINCH => {
                if let (Some(terminal), Some(master)) = (outer.terminal(), master)
                    && let Some(size) = window_size(terminal)
                {
                    set_window_size(master.as_fd(), &size);
                }
            }
            other => {
                let _ = kill(child, other);
            }
        }
    }
    Ok(None)
}

/// The command's exit status once it has ended.
fn reap(child: Pid) -> Result<Option<i32>> {
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Some(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(Some(128 + signal as i32)),
            Ok(_) => return Ok(None),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("waiting for the command"),
        }
    }
}
