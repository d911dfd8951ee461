//! Processes that outlive `up` (the userspace WireGuard daemon, the port relay), known by PID
//! plus start time so that a recycled PID is never signalled.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessId {
    pub pid: u32,
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
}

/// State letter and start time from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

impl ProcessId {
    pub fn of(pid: u32) -> Option<ProcessId> {
        stat(pid).map(|(_, start_time)| ProcessId { pid, start_time })
    }

    pub fn current() -> ProcessId {
        ProcessId::of(std::process::id()).expect("/proc/self/stat is readable")
    }

    /// Running (or stopped), and still the same process.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }

    /// True when the process exists and is stopped by a signal (used by the fault tests).
    pub fn is_stopped(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && (state == 'T' || state == 't'))
    }

    fn signal(&self, signal: Signal) {
        if self.is_alive() {
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Asks the process to stop, waits up to `grace`, then kills it. Reaps it when it is our
    /// own child, so no zombie stays behind while this process lives on.
    pub fn terminate(&self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.is_alive() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.is_alive() {
            self.signal(Signal::SIGCONT);
            self.signal(Signal::SIGKILL);
            while self.is_alive() && Instant::now() < deadline + grace {
                self.reap();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.reap();
    }

    fn reap(&self) {
        let _ = waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG));
    }

    /// The exit status when the process is our child and has ended.
    pub fn exit_status(&self) -> Option<String> {
        use nix::sys::wait::WaitStatus;
        match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(format!("exited with status {code}")),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("was killed by {sig}")),
            _ => None,
        }
    }
}

/// Starts a process in a session of its own so that it outlives us and our terminal. Its
/// output goes to the journal when we run under systemd, and nowhere otherwise.
pub fn spawn_detached(argv: &[String], envs: &[(&str, &str)]) -> Result<ProcessId> {
    spawn_detached_in(argv, envs, None)
}

/// Like [`spawn_detached`], with the process started inside the network namespace `netns`.
pub fn spawn_detached_in(
    argv: &[String],
    envs: &[(&str, &str)],
    netns: Option<BorrowedFd<'_>>,
) -> Result<ProcessId> {
    let netns = netns.map(|fd| fd.as_raw_fd());
    let (program, args) = argv.split_first().context("empty command")?;
    let quiet = std::env::var_os("JOURNAL_STREAM").is_none();
    let output = || {
        if quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        }
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(output())
        .stderr(output());
    // SAFETY: setns and setsid are plain system calls, safe between fork and exec; the
    // namespace descriptor is held by the caller until spawn returns.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns {
                let fd = BorrowedFd::borrow_raw(fd);
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let pid = child.id();
    // The process may already be gone; its identity is then only good for reaping.
    Ok(ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 }))
}
