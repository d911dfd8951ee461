//! Processes that outlive `up` (the userspace WireGuard daemon, the port relay), known by PID
//! plus start time so that a recycled PID is never signalled.
//!
//! They start behind a gate: `wg-namespace gate` waits for one byte on an inherited pipe and
//! only then executes the real program (keeping its PID). The caller records the PID first and
//! opens the gate after, so no instant exists in which the program runs and is on no record;
//! if the caller dies first, the pipe closes and the gate exits without running anything.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::system::files::PROC_LIMIT;

/// How long [`ProcessId::arguments`] waits for a process's exec to be through.
const EXEC_LIMIT: Duration = Duration::from_secs(1);

/// Gives the pages of freed heap memory back to the kernel, in every malloc arena. glibc keeps
/// them otherwise: what start-up (arguments, the config) or a round of work freed would count
/// against a process that then sleeps for as long as the namespace lives. Called by the
/// long-lived processes before they sleep; it costs a walk over the free chunks, no wake-up.
pub fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory that malloc holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessId {
    pub pid: u32,
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
}

/// State letter and start time from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let path = format!("/proc/{pid}/stat");
    let text = crate::system::files::read_text(Path::new(&path), PROC_LIMIT).ok()?;
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

    fn state(&self) -> Option<char> {
        stat(self.pid)
            .filter(|(_, start)| *start == self.start_time)
            .map(|(state, _)| state)
    }

    /// Running (or stopped), and still the same process.
    pub fn is_alive(&self) -> bool {
        self.state().is_some_and(|s| s != 'Z' && s != 'X')
    }

    /// Stopped by a signal (a stopped daemon answers nothing).
    pub fn is_stopped(&self) -> bool {
        self.state().is_some_and(|s| s == 'T' || s == 't')
    }

    /// The program the process runs now, as `/proc/<pid>/exe` names it; a binary replaced
    /// on disk since keeps its old path here.
    pub fn executable(&self) -> Option<PathBuf> {
        let link = std::fs::read_link(format!("/proc/{}/exe", self.pid)).ok()?;
        // Checked after reading: the link was this very process's.
        if !self.is_alive() {
            return None;
        }
        let text = link.to_string_lossy();
        Some(PathBuf::from(
            text.strip_suffix(" (deleted)").unwrap_or(&text).to_string(),
        ))
    }

    /// The process's arguments (`/proc/<pid>/cmdline`), when it is still this very process.
    /// A process in the middle of an exec (a relay or daemon just let out of its gate) has its
    /// new program's memory but not yet its arguments, and reads as having none: those are
    /// read again until the exec is through, for at most [`EXEC_LIMIT`].
    pub fn arguments(&self) -> Option<Vec<String>> {
        let path = PathBuf::from(format!("/proc/{}/cmdline", self.pid));
        let deadline = Instant::now() + EXEC_LIMIT;
        loop {
            let bytes =
                crate::system::files::read_regular(&path, crate::system::files::PROC_LIMIT).ok()?;
            // Checked after reading: the arguments were this very process's.
            if !self.is_alive() {
                return None;
            }
            let arguments: Vec<String> = bytes
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            // Nothing signals the end of an exec; it takes microseconds unless the process is
            // preempted in it. One that emptied its own arguments stays empty past the limit.
            if !arguments.is_empty() || Instant::now() >= deadline {
                return Some(arguments);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether this process runs one of `executables` (compared after resolving symlinks).
    pub fn runs_one_of(&self, executables: &[PathBuf]) -> bool {
        self.executable().is_some_and(|running| {
            executables
                .iter()
                .any(|e| std::fs::canonicalize(e).unwrap_or_else(|_| e.clone()) == running)
        })
    }

    /// A pidfd pinning this very process (not whatever holds the PID later), or None when it
    /// is gone or the PID now belongs to another process. PIDs 0 and 1 are never ours. A zombie
    /// leader is still pinned: its other threads may not have exited yet, and they may hold the
    /// process's descriptors (a daemon's TUN queues and configuration socket).
    fn pin(&self) -> Option<OwnedFd> {
        if self.pid <= 1 {
            return None;
        }
        let pidfd = pidfd_open(self.pid)?;
        // Checked after pinning: if the identity matches now, the pidfd is this process.
        self.state().is_some().then_some(pidfd)
    }

    fn signal(pidfd: &OwnedFd, signal: Signal) {
        // SAFETY: plain system call on a descriptor we hold.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// Asks the process to stop, waits up to `grace`, then kills it. Reaps it when it is our
    /// own child. Fails when it is still there after all that (stuck in the kernel, say), so
    /// that its record is kept for a later `down`.
    pub fn terminate(&self, grace: Duration) -> Result<()> {
        let Some(pidfd) = self.pin() else {
            self.reap();
            return Ok(());
        };
        ProcessId::signal(&pidfd, Signal::SIGTERM);
        if self.wait_gone(&pidfd, grace) {
            return Ok(());
        }
        ProcessId::signal(&pidfd, Signal::SIGCONT);
        ProcessId::signal(&pidfd, Signal::SIGKILL);
        if self.wait_gone(&pidfd, grace) {
            return Ok(());
        }
        bail!("process {} does not end", self.pid)
    }

    /// Kills the process at once and waits up to `limit` for it to be gone. For a process whose
    /// orderly exit buys nothing: a WireGuard daemon whose tunnel is being taken down keeps no
    /// state, and wireguard-go's close on SIGTERM alone takes ~45 ms, most of `down`.
    pub fn kill(&self, limit: Duration) -> Result<()> {
        let Some(pidfd) = self.pin() else {
            self.reap();
            return Ok(());
        };
        ProcessId::signal(&pidfd, Signal::SIGKILL);
        if self.wait_gone(&pidfd, limit) {
            return Ok(());
        }
        bail!("process {} does not end", self.pid)
    }

    /// Waits up to `limit`, sending nothing, for a process that is ending on its own to be
    /// gone: a zombie leader whose other threads are still exiting.
    pub fn wait_exited(&self, limit: Duration) -> Result<()> {
        let Some(pidfd) = self.pin() else {
            return Ok(());
        };
        if self.wait_gone(&pidfd, limit) {
            return Ok(());
        }
        bail!("process {} does not end", self.pid)
    }

    /// Waits for the exit, woken by the pidfd.
    fn wait_gone(&self, pidfd: &OwnedFd, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if wait_exit(pidfd, deadline.saturating_duration_since(Instant::now())) {
                self.reap();
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    fn reap(&self) {
        if self.pid <= 1 {
            return;
        }
        let _ = waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG));
    }

    /// The exit status when the process is our child and has ended.
    pub fn exit_status(&self) -> Option<String> {
        if self.pid <= 1 {
            return None;
        }
        match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, 0)) => Some("exited".into()),
            Ok(WaitStatus::Exited(_, code)) => Some(format!("exited with status {code}")),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("was killed by {sig}")),
            _ => None,
        }
    }
}

/// A pidfd for `pid`: whatever process holds the PID now (see [`ProcessId::pin`]).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor we own, or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor from pidfd_open.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Waits up to `limit` (at most a second per call) for the process of `pidfd` to exit; true
/// once it has. The pidfd is readable once the whole thread group has exited. A zombie leader
/// alone is not enough: its other threads may still hold the process's descriptors (a daemon's
/// configuration socket would still answer).
fn wait_exit(pidfd: &OwnedFd, limit: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let timeout = PollTimeout::from(limit.as_millis().min(1000) as u16);
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, timeout).is_ok_and(|ready| ready > 0)
}

/// A `Command` whose process starts inside the network namespace `netns`.
pub fn command_in(program: impl AsRef<std::ffi::OsStr>, netns: BorrowedFd<'_>) -> Command {
    let mut command = Command::new(program);
    let raw = netns.as_raw_fd();
    // SAFETY: setns is a plain system call, safe between fork and exec; the caller holds the
    // namespace descriptor until the process has started.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(
                BorrowedFd::borrow_raw(raw),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .map_err(std::io::Error::from)
        });
    }
    command
}

/// A process waiting at its gate; see the module documentation.
pub struct Gated {
    pub process: ProcessId,
    /// What it may run: the gate (this program) until released, then the program.
    pub executables: Vec<PathBuf>,
    gate: Option<File>,
}

impl Gated {
    /// Lets the program run.
    pub fn release(mut self) -> Result<()> {
        let mut gate = self.gate.take().context("the gate was already opened")?;
        gate.write_all(b"1")
            .with_context(|| format!("starting process {}", self.process.pid))
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        // Never released: closing the pipe makes the gate exit; collect it.
        if self.gate.take().is_some() {
            let _ = self.process.terminate(Duration::from_secs(1));
        }
    }
}

/// What a detached process is started with.
pub struct Detached<'a> {
    pub argv: &'a [String],
    pub envs: &'a [(&'a str, &'a str)],
    /// Start inside this network namespace instead of ours.
    pub netns: Option<BorrowedFd<'a>>,
    /// Descriptors the program inherits (at the same numbers).
    pub keep: &'a [RawFd],
}

/// Starts a process in a session of its own, so that it outlives us and our terminal, held at
/// its gate. Its output goes to the journal when we run under systemd, and nowhere otherwise.
pub fn start_detached(spec: Detached<'_>) -> Result<Gated> {
    let program = spec.argv.first().context("empty command")?;
    // The gate would only find out after we let go; say it now, while it is clear.
    let found = find_program(program)?;
    let exe = std::env::current_exe().context("finding our own executable")?;
    let executables = [exe.clone(), found]
        .into_iter()
        .map(|e| std::fs::canonicalize(&e).unwrap_or(e))
        .collect();
    let (gate_read, gate_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the start gate")?;
    let quiet = std::env::var_os("JOURNAL_STREAM").is_none();
    let output = || {
        if quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        }
    };
    let mut command = match spec.netns {
        Some(fd) => command_in(&exe, fd),
        None => Command::new(&exe),
    };
    command
        .args(["gate", "--fd", &gate_read.as_raw_fd().to_string(), "--"])
        .args(spec.argv)
        .envs(spec.envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(output())
        .stderr(output());
    let mut inherited = spec.keep.to_vec();
    inherited.push(gate_read.as_raw_fd());
    // SAFETY: fcntl and setsid are async-signal-safe; the descriptors stay open in this
    // process until the child has started.
    unsafe {
        command.pre_exec(move || {
            for &fd in &inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    drop(gate_read);
    let pid = child.id();
    let process = ProcessId::of(pid).with_context(|| format!("{program} ended at once"))?;
    Ok(Gated {
        process,
        executables,
        gate: Some(File::from(gate_write)),
    })
}

/// Where `program` would be run from: itself when it holds a slash, else the first match in
/// PATH. Fails naming the program when there is none.
pub fn find_program(program: &str) -> Result<std::path::PathBuf> {
    if program.contains('/') {
        let path = std::path::PathBuf::from(program);
        return if runnable(&path) {
            Ok(path)
        } else {
            bail!("{program} is not an executable file")
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|path| runnable(path))
        .with_context(|| format!("{program} is not installed (not found in PATH)"))
}

/// Whether `path` is an executable file.
pub fn runnable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether only root can change the file at `path`, or make the path name another file: the
/// path is absolute, without `..` and without symbolic links; the file and every directory
/// above it are root's; none is writable by group or others, except a sticky directory (where
/// no one else can rename or remove root's entries).
pub fn only_root_can_change(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    use std::path::Component;
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return false;
    }
    path.ancestors().enumerate().all(|(depth, place)| {
        place.symlink_metadata().is_ok_and(|m| {
            let others_write = m.mode() & 0o022 != 0;
            let sticky_directory = depth > 0 && m.mode() & 0o1000 != 0;
            m.uid() == 0 && !m.file_type().is_symlink() && (!others_write || sticky_directory)
        })
    })
}

/// The hidden `gate` command: waits for the go-ahead on `fd`, then becomes `command`.
/// Returns only on failure.
pub fn gate(fd: RawFd, command: &[String]) -> Result<()> {
    // SAFETY: the descriptor was passed to us for exactly this purpose.
    let mut pipe = unsafe { File::from_raw_fd(fd) };
    let mut byte = [0u8; 1];
    if pipe.read(&mut byte).context("waiting at the start gate")? != 1 {
        bail!(
            "the process that started us is gone; not starting {}",
            command[0]
        );
    }
    drop(pipe);
    let error = Command::new(&command[0]).args(&command[1..]).exec();
    Err(error).with_context(|| format!("running {}", command[0]))
}

/// Most output kept from a child run by [`output_within`]; the rest is read and dropped, so
/// that the child never blocks on a full pipe.
const OUTPUT_LIMIT: u64 = 16 << 20;

/// Runs `command` to completion, but for at most `limit`: a child still running then is killed
/// and the result is a `TimedOut` error. `stdin` is written while stdout and stderr are read,
/// each on a thread of its own, so a child that stops reading (or exits early with a complaint)
/// can neither deadlock us nor hide what it said on stderr.
pub fn output_within(
    command: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> std::io::Result<Output> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    if let (Some(mut pipe), Some(input)) = (child.stdin.take(), stdin) {
        let input = input.to_vec();
        // A child that exits without reading all of it makes this fail (EPIPE); what it said
        // on stderr is what matters then, so the write's own outcome is not.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.by_ref().take(OUTPUT_LIMIT).read_to_end(&mut kept);
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            }
            kept
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    // Our unreaped child: its PID cannot pass to another process while we hold it. Woken by
    // its exit, not by polling in steps (5 ms steps cost 2.5 ms per `nft` on average).
    let pidfd = pidfd_open(child.id());
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("did not finish within {}s and was killed", limit.as_secs()),
            ));
        }
        match &pidfd {
            Some(pidfd) => {
                wait_exit(pidfd, left);
            }
            None => std::thread::sleep(left.min(Duration::from_millis(5))),
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// A child started as PID 1 of a new PID namespace. When it dies, however it dies, the kernel
/// kills every process left in that namespace: nothing it started outlives it. (A process group
/// or session can be left by any descendant, with `setsid`; a PID namespace cannot.)
#[derive(Debug)]
pub struct Contained {
    pid: u32,
    /// Readable once it has exited; reaped through it, so never confused with another process.
    pidfd: OwnedFd,
    reaped: bool,
}

impl Contained {
    /// Starts `program` with `args` and exactly the environment `env`, its standard input
    /// `/dev/null`, its output ours.
    pub fn spawn(
        program: &Path,
        args: &[std::ffi::OsString],
        env: &[(String, std::ffi::OsString)],
    ) -> Result<Contained> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |bytes: &[u8]| CString::new(bytes).context("a NUL byte in an argument");
        let path = c(program.as_os_str().as_bytes())?;
        let argv: Vec<CString> = std::iter::once(Ok(path.clone()))
            .chain(args.iter().map(|a| c(a.as_bytes())))
            .collect::<Result<_>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<Result<_>>()?;
        let pointers = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
        let stdin = File::open("/dev/null").context("opening /dev/null")?;
        let mut pidfd: libc::c_int = -1;
        // The clone system call, not clone3: systemd's RestrictNamespaces= can only check the
        // flags of the former, and makes the latter fail with ENOSYS. With no stack of its own
        // it behaves as fork; CLONE_PIDFD stores the pidfd where the parent's TID would go.
        // The child only makes system calls on memory prepared above (async-signal-safe), then
        // executes or exits.
        let flags = libc::CLONE_NEWPID | libc::CLONE_PIDFD | libc::SIGCHLD;
        // SAFETY: see above.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags as libc::c_ulong,
                0 as libc::c_ulong,
                std::ptr::addr_of_mut!(pidfd),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if ret == 0 {
            // SAFETY: see above; dup2 clears close-on-exec on descriptor 0.
            unsafe {
                libc::dup2(stdin.as_raw_fd(), 0);
                libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
                libc::_exit(127);
            }
        }
        if ret < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("starting {} in a PID namespace", program.display()));
        }
        Ok(Contained {
            pid: ret as u32,
            // SAFETY: clone (CLONE_PIDFD) stored a new descriptor for the child there.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
            reaped: false,
        })
    }

    /// Readable once the process has exited.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Kills it, and everything it started, at `deadline` if it still runs then: from a thread
    /// of its own, so that the deadline holds whatever the owner is busy with meanwhile. The
    /// thread sleeps until the exit or the deadline, whichever comes first, and then ends.
    pub fn kill_at(&self, deadline: Instant) -> Result<()> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let pidfd = self.pidfd.try_clone().context("duplicating a pidfd")?;
        std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || {
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // Through the pidfd: never another process that got the PID since.
                        ProcessId::signal(&pidfd, Signal::SIGKILL);
                        return;
                    }
                    // Rounded up: late by a millisecond rather than woken just before.
                    let timeout = PollTimeout::try_from(left + Duration::from_micros(999))
                        .unwrap_or(PollTimeout::MAX);
                    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, timeout) {
                        Ok(0) | Err(nix::errno::Errno::EINTR) => {}
                        // It exited (or the pidfd cannot be watched: then the owner's own
                        // check of the deadline is all there is).
                        Ok(_) | Err(_) => return,
                    }
                }
            })
            .context("starting the thread that keeps its deadline")?;
        Ok(())
    }

    /// Kills it, and with it everything it started.
    pub fn kill(&self) {
        if !self.reaped {
            ProcessId::signal(&self.pidfd, Signal::SIGKILL);
        }
    }

    /// Its exit status once it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<WaitStatus>> {
        self.wait(WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG)
    }

    fn wait(&mut self, flags: WaitPidFlag) -> Result<Option<WaitStatus>> {
        use nix::sys::wait::{Id, waitid};
        if self.reaped {
            bail!("process {} was already reaped", self.pid);
        }
        match waitid(Id::PIDFd(self.pidfd.as_fd()), flags)
            .with_context(|| format!("waiting for process {}", self.pid))?
        {
            WaitStatus::StillAlive => Ok(None),
            status => {
                self.reaped = true;
                Ok(Some(status))
            }
        }
    }
}

/// How long dropping a [`Contained`] waits for it to end after SIGKILL. It is its PID
/// namespace's init, which ends only once every process in that namespace has; one stuck in
/// the kernel (on a hung mount) may never end, and the owner must not wait with it.
const KILLED_EXIT_LIMIT: Duration = Duration::from_secs(5);

impl Drop for Contained {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        self.kill();
        let deadline = Instant::now() + KILLED_EXIT_LIMIT;
        loop {
            if wait_exit(
                &self.pidfd,
                deadline.saturating_duration_since(Instant::now()),
            ) {
                // It has exited, so reaping it does not wait.
                let _ = self.wait(WaitPidFlag::WEXITED);
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "process {} has not ended {}s after SIGKILL; it is left unreaped",
                    self.pid,
                    KILLED_EXIT_LIMIT.as_secs()
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a process executes another program, the kernel has already given it the new
    /// program's memory but not yet its arguments: read then, they are empty. `down` checks a
    /// relay's arguments the moment `up` has let it out of its gate, which is such an exec;
    /// it must see the relay's arguments (or none, once it has ended), never nothing.
    #[test]
    fn arguments_of_a_process_that_executes_itself_again_and_again_are_never_empty() {
        // Each round executes the shell anew, with the same arguments but the count.
        let script = r#"n=$1; [ "$n" -gt 0 ] && exec sh -c "$0" "$0" $((n - 1)); exit 0"#;
        let mut child = Command::new("sh")
            .args(["-c", script, script, "300"])
            .spawn()
            .expect("starting sh");
        let process = ProcessId::of(child.id()).expect("sh runs");
        let (mut reads, mut empty) = (0u64, 0u64);
        while let Some(argv) = process.arguments() {
            reads += 1;
            if argv.is_empty() {
                empty += 1;
            }
        }
        child.wait().expect("waiting for sh");
        assert!(reads > 1000, "only {reads} reads while sh ran");
        assert_eq!(empty, 0, "{empty} of {reads} reads found no arguments");
    }
}
