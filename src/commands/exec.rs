//! `exec`: run a command inside the namespace, the way a confined systemd service runs.
//!
//! Like `ip netns exec`, plus what keeps DNS from leaking: the namespace's resolv.conf and
//! nsswitch.conf are bound over `/etc` in a private mount namespace, and the host's resolver
//! sockets (nscd, systemd-resolved, D-Bus) are hidden, since a lookup through them would be
//! answered outside the tunnel.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigHandler, Signal};
use nix::sys::stat::{Mode, SFlag, fstat};
use nix::unistd::{Gid, Uid, User};

use crate::exit::{Failure, code};
use crate::system::{dns, privileges, terminal};

/// Enters the namespace for the rest of this process's life: network namespace, a private
/// mount namespace with the namespace's `/etc` files, the host resolvers hidden, and the
/// session bus of `uid` hidden too (through it, `systemd-run --user` or a running browser
/// would start things outside the namespace).
pub fn enter(namespace: &str, uid: Uid) -> Result<()> {
    let etc = dns::dir(namespace);
    if !etc.join("resolv.conf").is_file() {
        bail!(
            "{} is missing; refusing to run with the host's resolver (is namespace {namespace:?} up?)",
            etc.join("resolv.conf").display()
        );
    }
    // Only the namespace `up` made and recorded: one made under the same name since has no
    // leak guard.
    let fd = crate::system::state::State::load(namespace)?
        .and_then(|state| state.open_netns())
        .with_context(|| {
            format!(
                "network namespace {namespace:?} is not up, or is not the one wg-namespace made"
            )
        })?;
    setns(&fd, CloneFlags::CLONE_NEWNET).context("entering the network namespace")?;
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    // Our mounts must not propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("making / a slave mount")?;
    // A fresh sysfs shows the namespace's own interfaces under /sys/class/net.
    if umount2("/sys", MntFlags::MNT_DETACH).is_ok() {
        let _ = mount(
            Some("sysfs"),
            "/sys",
            Some("sysfs"),
            MsFlags::empty(),
            None::<&str>,
        );
    }
    for entry in std::fs::read_dir(&etc).with_context(|| format!("reading {}", etc.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let target = Path::new("/etc").join(&name);
        mount(
            Some(&entry.path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "binding {} over {}",
                entry.path().display(),
                target.display()
            )
        })?;
    }
    for path in dns::HOST_RESOLVER_PATHS {
        hide_host(Path::new(path))?;
    }
    for path in ["bus", "systemd/private"] {
        hide_users_socket(
            &Path::new("/run/user").join(uid.to_string()).join(path),
            uid,
        )?;
    }
    Ok(())
}

/// Hides one of the host's resolver paths. They lie in directories only root can change, so a
/// symlink among them is root's own choice and is followed.
fn hide_host(path: &Path) -> Result<()> {
    let Ok(fd) = open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) else {
        return Ok(());
    };
    cover(&fd, path)
}

/// Hides a socket in the user's runtime directory. The user owns that directory and can put
/// anything there, so nothing is followed: a symlink, or anything that is not a socket of the
/// user's (or root's), is left alone rather than having whatever it names masked in a mount
/// namespace where setuid programs then run.
fn hide_users_socket(path: &Path, uid: Uid) -> Result<()> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let Ok(fd) = openat2(AT_FDCWD, path, how) else {
        return Ok(());
    };
    let stat = fstat(&fd).with_context(|| format!("examining {}", path.display()))?;
    let is_socket = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK;
    if !is_socket || (stat.st_uid != uid.as_raw() && stat.st_uid != 0) {
        return Ok(());
    }
    cover(&fd, path)
}

/// Covers what `fd` (opened with O_PATH) is: a directory with an empty read-only tmpfs, a
/// socket or file with /dev/null. Mounting onto /proc/self/fd/N covers the very object that
/// was checked, whatever its path names by now.
fn cover(fd: &OwnedFd, shown_as: &Path) -> Result<()> {
    let stat = fstat(fd).with_context(|| format!("examining {}", shown_as.display()))?;
    let target = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    let result = if is_dir {
        mount(
            Some("tmpfs"),
            target.as_str(),
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,mode=755"),
        )
    } else {
        mount(
            Some("/dev/null"),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.with_context(|| format!("hiding {}", shown_as.display()))
}

struct Identity {
    name: String,
    uid: Uid,
    gid: Gid,
    /// Looked up before entering: inside, the namespace's nsswitch.conf and the hidden nscd
    /// may no longer see the groups that come from LDAP, sss or NixOS' nscd-only modules.
    groups: Vec<Gid>,
    home: String,
}

fn lookup_user(user: &str) -> Result<Identity, Failure> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    let user_record = found
        .map_err(|e| Failure::from(anyhow!("exec: looking up user {user:?}: {e}")))?
        .ok_or_else(|| Failure {
            code: code::USAGE,
            message: format!("--user: no user {user:?} on this system"),
        })?;
    let name = CString::new(user_record.name.as_str())
        .map_err(|_| Failure::from(anyhow!("exec: user name {user:?} holds a NUL byte")))?;
    let groups = nix::unistd::getgrouplist(&name, user_record.gid)
        .map_err(|e| Failure::from(anyhow!("exec: looking up the groups of {user:?}: {e}")))?;
    Ok(Identity {
        name: user_record.name,
        uid: user_record.uid,
        gid: user_record.gid,
        groups,
        home: user_record.dir.to_string_lossy().into_owned(),
    })
}

fn become_user(who: &Identity) -> Result<()> {
    privileges::become_user(&privileges::Credentials {
        uid: who.uid,
        gid: who.gid,
        groups: &who.groups,
    })?;
    // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("HOME", &who.home);
        std::env::set_var("USER", &who.name);
        std::env::set_var("LOGNAME", &who.name);
    }
    Ok(())
}

/// Runs `command` inside the namespace and returns its exit status, or the one a shell would
/// give (126 cannot run, 127 not found). As root it replaces this process. As another user it
/// runs in a session of its own, on a pseudo-terminal of its own when ours is a terminal (see
/// [`terminal`]), with no descriptor but 0-2 and no capability: root's terminal and whatever
/// root had open are out of its reach.
pub fn run(namespace: &str, user: Option<&str>, command: &[String]) -> Result<i32, Failure> {
    if !nix::unistd::geteuid().is_root() {
        if user.is_some() {
            return Err(Failure {
                code: code::USAGE,
                message: "exec: --user needs root; without it the command runs as you".into(),
            });
        }
        return ask_service(namespace, command);
    }
    // Look the user up while the host's NSS (and nscd) are still in place.
    let identity = user.map(lookup_user).transpose()?;
    let uid = identity
        .as_ref()
        .map_or_else(nix::unistd::geteuid, |who| who.uid);
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| Failure {
            code: code::USAGE,
            message: "exec: an argument holds a NUL byte".into(),
        })?;
    enter(namespace, uid).map_err(|e| anyhow!("exec: {e:#}"))?;
    let Some(who) = identity else {
        return Ok(replace_with(&args));
    };
    let relay = nix::unistd::getpid();
    let status = terminal::run_in_own_session(who.uid, || {
        // What root had open (including descriptors it let us inherit) stays with root.
        // SAFETY: close_range only closes descriptors; nothing after this uses them.
        if unsafe { libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) } == -1 {
            eprintln!(
                "error: exec: closing inherited descriptors: {}",
                std::io::Error::last_os_error()
            );
            return 126;
        }
        if let Err(e) = become_user(&who) {
            eprintln!("error: exec: becoming {}: {e:#}", who.name);
            return 126;
        }
        // The command lives no longer than this exec. In a session of its own it is out of
        // reach of a kill of exec's process group (a deadline's SIGKILL, say), so it gets one
        // when exec dies. Set after the change of uid, which clears it.
        if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
            || nix::unistd::getppid() != relay
        {
            return 126;
        }
        replace_with(&args)
    })
    .map_err(|e| anyhow!("exec: {e:#}"))?;
    Ok(status)
}

/// Becomes the command; returns only when that fails, with the shell's status for it.
pub(crate) fn replace_with(args: &[CString]) -> i32 {
    // We ignore SIGPIPE (as every Rust program does); an ignored signal stays ignored across
    // exec, and `yes | head` in the namespace should end as it does outside.
    // SAFETY: restoring a default disposition.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let error = match nix::unistd::execvp(&args[0], args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("error: exec: {}: {error}", args[0].to_string_lossy());
    if error == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    }
}

/// `exec` by an ordinary user: the exec service runs the command as this user, if the
/// namespace allows it, and reports its exit status. Ending this process ends the command.
fn ask_service(namespace: &str, command: &[String]) -> Result<i32, Failure> {
    use crate::system::exec_socket::{self, Reply, Request};
    let path = std::env::var_os(exec_socket::SOCKET_ENV)
        .map_or_else(|| exec_socket::SOCKET.into(), std::path::PathBuf::from);
    let request = Request {
        namespace: namespace.to_string(),
        command: command.to_vec(),
        cwd: std::env::current_dir()
            .ok()
            .and_then(|dir| dir.to_str().map(str::to_string)),
        env: std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| exec_socket::kept(k))
            .collect(),
    };
    let socket = connect(&path).map_err(|e| {
        Failure::from(anyhow!(
            "exec: {e:#}; without root, a command runs in a namespace only through the exec service, for users its allowedUsers or allowedGroups name"
        ))
    })?;
    // A closed standard descriptor goes over as /dev/null, as a shell would give it.
    let null = std::fs::File::open("/dev/null").map_err(|e| anyhow!("exec: /dev/null: {e}"))?;
    let fds: Vec<i32> = [0, 1, 2]
        .into_iter()
        .map(|fd| {
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
                fd
            } else {
                null.as_raw_fd()
            }
        })
        .collect();
    // A service that refuses at once (too many commands running) may have answered and
    // gone before the request arrived: its answer still waits to be read.
    let sent = exec_socket::send(socket.as_fd(), &request, &fds);
    drop(null);
    if let Err(e) = sent {
        return match exec_socket::receive::<Reply>(socket.as_fd()) {
            Ok(Some((Reply::Refused(why), _))) => Err(Failure {
                code: code::FAILURE,
                message: format!("exec: {why}"),
            }),
            _ => Err(Failure::from(anyhow!("exec: {e:#}"))),
        };
    }
    // The command may run for hours: only the exchange before it had a deadline.
    exec_socket::set_deadline(socket.as_fd(), None).map_err(|e| anyhow!("exec: {e:#}"))?;
    match exec_socket::receive::<Reply>(socket.as_fd()).map_err(|e| anyhow!("exec: {e:#}"))? {
        Some((Reply::Exited(status), _)) => Ok(status),
        Some((Reply::Refused(why), _)) => Err(Failure {
            code: code::FAILURE,
            message: format!("exec: {why}"),
        }),
        None => Err(Failure::from(anyhow!(
            "exec: the exec service ended without reporting how the command ended"
        ))),
    }
}

fn connect(path: &Path) -> Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, socket};
    let socket = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("making a socket")?;
    // Also bounds connect(), which waits while the service's queue is full.
    crate::system::exec_socket::set_deadline(
        socket.as_fd(),
        Some(crate::system::exec_socket::EXCHANGE_DEADLINE),
    )?;
    let address = UnixAddr::new(path).with_context(|| format!("{}", path.display()))?;
    nix::sys::socket::connect(socket.as_raw_fd(), &address)
        .with_context(|| format!("connecting to the exec service at {}", path.display()))?;
    Ok(socket)
}
