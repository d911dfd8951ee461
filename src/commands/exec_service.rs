//! `exec-service`: the root service behind `wg-namespace exec` for ordinary users (the NixOS
//! module's `wg-namespace-exec.socket`), so that the users a namespace's `allowedUsers` or
//! `allowedGroups` name can start programs in it without sudo and without a setuid binary.
//!
//! Socket-activated: it takes the listening socket the service manager passes, serves, and
//! exits once nothing has happened for a while. Each connection gets a process of its own
//! (forked from this single-threaded loop), which learns who asks from the socket's peer
//! credentials and nothing else, checks that user against the lists recorded in the
//! namespace's state, and forks the command: that process enters the namespace as root (the
//! only thing done as root for the user) and then becomes exactly that user, for good
//! ([`privileges::become_user`]), before it touches anything the user named: the working
//! directory, the program. The connection's process then becomes the user too, and waits for
//! either end: the command's exit (its status goes back) or the client's (the command ends).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{MsgFlags, SockFlag, UnixCredentials, accept4, getsockopt, sockopt};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Group, Pid, Uid, User};

use crate::exit::{Failure, code};
use crate::system::exec_socket::{self, Reply, Request};
use crate::system::privileges::{self, Credentials};
use crate::system::{listen, state::State};

/// Most connections served at once (each may be a running program), and per user: a flood of
/// requests meets a refusal, not a pile of processes.
pub const MAX_RUNNING: usize = 32;
pub const MAX_PER_USER: usize = 8;
/// From accepting a connection to the command's start: receiving the request, the user
/// database, the namespace's state. A connection's process still there after it is killed.
const SETUP_DEADLINE_SECS: u32 = 15;
/// How long a command whose client went away gets to end after SIGTERM before SIGKILL.
const END_GRACE: Duration = Duration::from_secs(3);
/// The PATH a command gets when the caller had none.
const DEFAULT_PATH: &str =
    "/run/wrappers/bin:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin";

/// Serves the passed socket until idle for `idle`.
pub fn run(idle: Duration) -> Result<i32, Failure> {
    let mut sockets = listen::take()?;
    let listener = match (sockets.pop(), sockets.is_empty()) {
        (Some(listener), true) => listener,
        _ => {
            return Err(Failure {
                code: code::USAGE,
                message: "exec-service: expected exactly one listening socket from the service manager (LISTEN_FDS=1); it is started by wg-namespace-exec.socket".into(),
            });
        }
    };
    let kind = getsockopt(&listener, sockopt::SockType).context("examining the passed socket")?;
    let listening = getsockopt(&listener, sockopt::AcceptConn).unwrap_or(false);
    if kind != nix::sys::socket::SockType::SeqPacket || !listening {
        return Err(Failure::from(anyhow!(
            "exec-service: the passed socket is not a listening SOCK_SEQPACKET socket"
        )));
    }
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&chld), Some(&mut old_mask))
        .context("blocking SIGCHLD")?;
    let signals = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("opening a signalfd")?;
    let mut running: HashMap<Pid, Uid> = HashMap::new();
    loop {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            match status.pid() {
                Some(pid) => {
                    running.remove(&pid);
                }
                None => break,
            }
        }
        let timeout = if running.is_empty() {
            PollTimeout::try_from(idle).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        let ready = match poll(&mut fds, timeout) {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(anyhow!("exec-service: poll: {e}").into()),
        };
        if ready == 0 && running.is_empty() {
            return Ok(code::OK);
        }
        let connection_waits = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        while signals.read_signal().ok().flatten().is_some() {}
        if !connection_waits {
            continue;
        }
        let Ok(connection) = accept4(&listener, SockFlag::SOCK_CLOEXEC) else {
            // Out of descriptors, say: wait rather than spin.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let Ok(peer) = getsockopt(&connection, sockopt::PeerCredentials) else {
            continue;
        };
        let uid = Uid::from_raw(peer.uid());
        let theirs = running.values().filter(|&&u| u == uid).count();
        if running.len() >= MAX_RUNNING || theirs >= MAX_PER_USER {
            let _ = exec_socket::set_deadline(connection.as_fd(), Some(Duration::from_millis(100)));
            let _ = exec_socket::send(
                connection.as_fd(),
                &Reply::Refused(format!(
                    "the exec service is running as many commands as it may ({} in all, {} per user); try again later",
                    MAX_RUNNING, MAX_PER_USER
                )),
                &[],
            );
            // A request already queued is read (without waiting) and dropped: closing with
            // it unread would reset the connection and lose the refusal on its way.
            let mut sink = [0u8; 1];
            let _ =
                nix::sys::socket::recv(connection.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT);
            eprintln!("exec-service: uid {uid}: refused, too many commands running");
            continue;
        }
        // SAFETY: this loop is single-threaded, so the child may do anything.
        match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Child) => {
                drop(listener);
                drop(signals);
                let status = match sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None) {
                    Ok(()) => serve(connection, &peer),
                    Err(_) => 1,
                };
                // SAFETY: leaving the forked child without running the parent's destructors.
                unsafe { libc::_exit(status) }
            }
            Ok(ForkResult::Parent { child }) => {
                running.insert(child, uid);
            }
            Err(e) => eprintln!("exec-service: fork: {e}"),
        }
    }
}

/// What a request turned into once checked.
struct Job {
    namespace: String,
    user: String,
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    argv: Vec<CString>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    /// The caller's standard input, output and error.
    stdio: Vec<OwnedFd>,
}

/// One connection, in a process of its own; returns its exit status.
fn serve(connection: OwnedFd, peer: &UnixCredentials) -> i32 {
    // SAFETY: alarm only arms a timer. Its signal, left at its default, ends this process,
    // whatever it is stuck in (a silent client, a user database that does not answer).
    unsafe { libc::alarm(SETUP_DEADLINE_SECS) };
    let job = match check(&connection, peer) {
        Ok(Some(job)) => job,
        Ok(None) => return 0,
        Err(why) => {
            eprintln!("exec-service: uid {}: refused: {why}", peer.uid());
            let _ = exec_socket::send(connection.as_fd(), &Reply::Refused(why), &[]);
            return 1;
        }
    };
    eprintln!(
        "exec-service: uid {} ({}), pid {}: running {:?} in namespace {:?}",
        peer.uid(),
        job.user,
        peer.pid(),
        job.argv[0],
        job.namespace
    );
    match supervise(&connection, job) {
        Ok(Some(status)) => {
            let _ =
                exec_socket::set_deadline(connection.as_fd(), Some(exec_socket::EXCHANGE_DEADLINE));
            let _ = exec_socket::send(connection.as_fd(), &Reply::Exited(status), &[]);
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!("exec-service: uid {}: {e:#}", peer.uid());
            let _ = exec_socket::send(connection.as_fd(), &Reply::Refused(format!("{e:#}")), &[]);
            1
        }
    }
}

/// Receives and checks the request; Ok(None) when the client left without asking. The error
/// is the one line the client shows.
fn check(connection: &OwnedFd, peer: &UnixCredentials) -> Result<Option<Job>, String> {
    exec_socket::set_deadline(connection.as_fd(), Some(exec_socket::EXCHANGE_DEADLINE))
        .map_err(|e| format!("{e:#}"))?;
    let Some((request, stdio)) = exec_socket::receive::<Request>(connection.as_fd())
        .map_err(|e| format!("the exec service cannot take this request: {e:#}"))?
    else {
        return Ok(None);
    };
    let uid = Uid::from_raw(peer.uid());
    if uid.is_root() {
        return Err("root runs commands in namespaces without the exec service".into());
    }
    let Request {
        namespace,
        command,
        cwd,
        env,
    } = request;
    crate::config::check_name(&namespace).map_err(|problem| format!("--namespace: {problem}"))?;
    if stdio.len() != exec_socket::DESCRIPTORS {
        return Err(format!(
            "expected the caller's {} standard descriptors, got {}",
            exec_socket::DESCRIPTORS,
            stdio.len()
        ));
    }
    let user = User::from_uid(uid)
        .ok()
        .flatten()
        .ok_or_else(|| format!("uid {uid} is not in the user database"))?;
    let name = CString::new(user.name.as_str()).map_err(|_| "a user name with a NUL byte")?;
    let groups = nix::unistd::getgrouplist(&name, user.gid)
        .map_err(|e| format!("looking up the groups of {}: {e}", user.name))?;
    let state = State::load(&namespace)
        .map_err(|e| format!("namespace {namespace:?}: {e:#}"))?
        .ok_or_else(|| format!("namespace {namespace:?} is not up"))?;
    let by_name = state.allowed_users.contains(&user.name);
    let by_group = state.allowed_groups.iter().any(|group| {
        Group::from_name(group)
            .ok()
            .flatten()
            .is_some_and(|g| groups.contains(&g.gid))
    });
    if !by_name && !by_group {
        return Err(format!(
            "user {} may not run commands in namespace {namespace:?}: neither its allowedUsers nor its allowedGroups name them",
            user.name
        ));
    }
    if command.is_empty() {
        return Err("no command given".into());
    }
    let argv = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "an argument holds a NUL byte")?;
    let mut kept: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, v)| exec_socket::kept(k) && !v.contains('\0'))
        .collect();
    if !kept.iter().any(|(k, _)| k == "PATH") {
        kept.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let home = user.dir.to_string_lossy().into_owned();
    let shell = user.shell.to_string_lossy().into_owned();
    for (k, v) in [
        ("HOME", home.as_str()),
        ("USER", user.name.as_str()),
        ("LOGNAME", user.name.as_str()),
        ("SHELL", shell.as_str()),
    ] {
        kept.push((k.into(), v.into()));
    }
    Ok(Some(Job {
        namespace,
        user: user.name,
        uid,
        gid: user.gid,
        groups,
        argv,
        env: kept,
        cwd,
        stdio,
    }))
}

/// Starts the command and waits for its end or the client's: Some(status) when the command
/// ended, None when the client went away first (the command is ended then).
fn supervise(connection: &OwnedFd, job: Job) -> Result<Option<i32>> {
    // SAFETY: this process is single-threaded (forked from the single-threaded loop).
    let command = match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Child => {
            let status = start(&job);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(status) }
        }
        ForkResult::Parent { child } => child,
    };
    // SAFETY: the command has started; nothing here can get stuck any more but the wait for
    // an end, which has none by design (a browser runs for hours).
    unsafe { libc::alarm(0) };
    let Job {
        uid,
        gid,
        groups,
        stdio,
        ..
    } = job;
    drop(stdio);
    // Nothing more needs root here: waiting, and ending a process of the user's own.
    privileges::become_user(&Credentials {
        uid,
        gid,
        groups: &groups,
    })?;
    let pidfd = pidfd(command)?;
    let mut fds = [
        // Readable at the client's end (and hangup is always reported).
        PollFd::new(connection.as_fd(), PollFlags::POLLIN),
        PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("poll: {e}"),
        }
    }
    let command_ended = fds[1].revents().is_some_and(|r| !r.is_empty());
    if command_ended {
        return Ok(Some(shell_status(
            waitpid(command, None).context("waitpid")?,
        )));
    }
    // The client ended (or broke the protocol by sending more): so does the command, with
    // everything in its session.
    let group = Pid::from_raw(-command.as_raw());
    let _ = kill(group, Signal::SIGTERM);
    let deadline = Instant::now() + END_GRACE;
    while Instant::now() < deadline {
        if matches!(
            waitpid(command, Some(WaitPidFlag::WNOHANG)),
            Ok(status) if status.pid().is_some()
        ) {
            let _ = kill(group, Signal::SIGKILL);
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(group, Signal::SIGKILL);
    let _ = waitpid(command, None);
    Ok(None)
}

fn shell_status(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        _ => 1,
    }
}

fn pidfd(pid: Pid) -> Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor we own, or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: a fresh descriptor from pidfd_open.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) })
}

/// In the command's process: the caller's descriptors, a session of its own, the namespace
/// (as root), then the user for good, the working directory as that user, the program.
/// Returns only on failure, with the shell's status for it; the reason goes to the caller's
/// standard error.
fn start(job: &Job) -> i32 {
    let supervisor = nix::unistd::getppid();
    for (number, fd) in job.stdio.iter().enumerate() {
        // SAFETY: dup2 onto a standard descriptor number; the old one is closed.
        if unsafe { libc::dup2(fd.as_raw_fd(), number as i32) } == -1 {
            return 126;
        }
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("error: exec: {what}: {e}");
        126
    };
    if let Err(e) = nix::unistd::setsid() {
        return failed("setsid", &e);
    }
    if let Err(e) = super::exec::enter(&job.namespace, job.uid) {
        return failed("entering the namespace", &format!("{e:#}"));
    }
    // What the service had open (the connection, the listener's copy) stays with it.
    // SAFETY: close_range only closes descriptors; nothing after this uses them.
    if unsafe { libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) } == -1 {
        return failed("closing descriptors", &std::io::Error::last_os_error());
    }
    let credentials = Credentials {
        uid: job.uid,
        gid: job.gid,
        groups: &job.groups,
    };
    if let Err(e) = privileges::become_user(&credentials) {
        return failed(&format!("becoming {}", job.user), &format!("{e:#}"));
    }
    // From here on as the user: a directory it cannot enter, or a symlink to one, fails as it
    // would for the user at a shell, and the command starts in / instead.
    if let Some(cwd) = &job.cwd
        && let Err(e) = std::env::set_current_dir(cwd)
    {
        eprintln!(
            "wg-namespace: cannot enter {cwd} as {}: {e}; starting in /",
            job.user
        );
    }
    // SAFETY: single-threaded; nothing reads the environment concurrently.
    unsafe {
        for (key, _) in std::env::vars_os() {
            std::env::remove_var(key);
        }
        for (key, value) in &job.env {
            std::env::set_var(key, value);
        }
    }
    if let Some(why) = takeover(&job.argv) {
        eprintln!("error: exec: {why}");
        return 126;
    }
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
        || nix::unistd::getppid() != supervisor
    {
        return 126;
    }
    super::exec::replace_with(&job.argv)
}

/// Why starting `argv` would only hand the request to the same program already running outside
/// the namespace (which would then open the window there, out of the tunnel), when it would.
/// Browsers keep one instance per profile: a second start finds the first through the profile's
/// lock and its socket (Chromium) or its remote protocol (Firefox) and exits.
pub fn takeover(argv: &[CString]) -> Option<String> {
    let program = argv[0].to_str().ok()?;
    let name = program.rsplit('/').next().unwrap_or(program);
    let args: Vec<&str> = argv[1..].iter().filter_map(|a| a.to_str().ok()).collect();
    let home = std::path::PathBuf::from(std::env::var_os("HOME")?);
    let hostname = crate::system::files::read_text(
        std::path::Path::new("/proc/sys/kernel/hostname"),
        crate::system::files::PROC_LIMIT,
    )
    .map(|h| h.trim().to_string())
    .unwrap_or_default();
    let held = |path: &std::path::Path| {
        std::fs::read_link(path).is_ok_and(|target| {
            lock_is_held(&target.to_string_lossy(), &hostname, |pid| {
                std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
        })
    };
    let chromium_dir = match name {
        "chromium" | "chromium-browser" => Some(".config/chromium"),
        "chrome" | "google-chrome" | "google-chrome-stable" => Some(".config/google-chrome"),
        _ => None,
    };
    if let Some(dir) = chromium_dir {
        let own_profile = args.iter().any(|a| a.starts_with("--user-data-dir"));
        let lock = home.join(dir).join("SingletonLock");
        if !own_profile && held(&lock) {
            return Some(format!(
                "{name} is already running with this profile ({} is held), and would open this window there, outside the namespace; give it a profile of its own: --user-data-dir=DIR",
                lock.display()
            ));
        }
    }
    if name.starts_with("firefox") {
        let no_remote = args
            .iter()
            .any(|a| *a == "--no-remote" || *a == "-no-remote");
        let profiles = home.join(".mozilla/firefox");
        let locked = std::fs::read_dir(&profiles)
            .ok()?
            .flatten()
            .any(|entry| held(&entry.path().join("lock")));
        if !no_remote && locked {
            return Some(format!(
                "{name} is already running (a profile under {} is locked), and would open this window there, outside the namespace; run it with --no-remote -P PROFILE (another profile)",
                profiles.display()
            ));
        }
    }
    None
}

/// Whether a browser's lock symlink still names a live process. Chromium's `SingletonLock`
/// points to `HOST-PID`, Firefox's `lock` to `ADDRESS:+PID`; a lock from this host whose
/// process is gone was left by a crash and holds nothing. A lock from another host (a shared
/// home) or one that cannot be read counts as held.
fn lock_is_held(target: &str, hostname: &str, alive: impl Fn(u32) -> bool) -> bool {
    let own = |pid: &str| pid.parse::<u32>().ok().map(&alive);
    if let Some((_, pid)) = target.rsplit_once(":+") {
        return own(pid).unwrap_or(true);
    }
    match target.rsplit_once('-') {
        Some((host, pid)) if host == hostname => own(pid).unwrap_or(true),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::lock_is_held;

    #[test]
    fn browser_locks_left_by_a_crash_hold_nothing() {
        let alive = |pid| pid == 42;
        assert!(lock_is_held("laptop-42", "laptop", alive));
        assert!(!lock_is_held("laptop-43", "laptop", alive));
        assert!(lock_is_held("other-host-43", "laptop", alive));
        assert!(lock_is_held("my-laptop-42", "my-laptop", alive));
        assert!(!lock_is_held("my-laptop-7", "my-laptop", alive));
        assert!(lock_is_held("127.0.1.1:+42", "laptop", alive));
        assert!(!lock_is_held("127.0.1.1:+43", "laptop", alive));
        assert!(lock_is_held("garbage", "laptop", alive));
    }
}
