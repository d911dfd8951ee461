//! `exec`: run a command inside the namespace, the way a confined systemd service runs.
//!
//! Like `ip netns exec`, plus what keeps DNS from leaking: the namespace's resolv.conf and
//! nsswitch.conf are bound over `/etc` in a private mount namespace, and the host's resolver
//! sockets (nscd, systemd-resolved, D-Bus) are hidden, since a lookup through them would be
//! answered outside the tunnel.

use std::ffi::CString;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Uid, User};

use crate::exit::{Failure, code};
use crate::system::dns;

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
    let fd = crate::system::netns::open(namespace)?;
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
        hide(Path::new(path))?;
    }
    for path in ["bus", "systemd/private"] {
        hide(&Path::new("/run/user").join(uid.to_string()).join(path))?;
    }
    Ok(())
}

/// Covers a directory with an empty read-only tmpfs, or a socket or file with /dev/null.
fn hide(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,mode=755"),
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.with_context(|| format!("hiding {}", path.display()))
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
    nix::unistd::setgroups(&who.groups).context("setting supplementary groups")?;
    nix::unistd::setgid(who.gid).context("setgid")?;
    nix::unistd::setuid(who.uid).context("setuid")?;
    // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("HOME", &who.home);
        std::env::set_var("USER", &who.name);
        std::env::set_var("LOGNAME", &who.name);
    }
    Ok(())
}

/// Replaces this process with `command` inside the namespace. Returns only on failure, with
/// the exit code a shell would give (126 cannot run, 127 not found).
pub fn run(namespace: &str, user: Option<&str>, command: &[String]) -> Result<i32, Failure> {
    // Look the user up while the host's NSS (and nscd) are still in place.
    let identity = user.map(lookup_user).transpose()?;
    let uid = identity
        .as_ref()
        .map_or_else(nix::unistd::geteuid, |who| who.uid);
    enter(namespace, uid).map_err(|e| anyhow!("exec: {e:#}"))?;
    if let Some(who) = &identity {
        become_user(who).map_err(|e| anyhow!("exec: becoming {}: {e:#}", who.name))?;
    }
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| Failure {
            code: code::USAGE,
            message: "exec: an argument holds a NUL byte".into(),
        })?;
    let error = match nix::unistd::execvp(&args[0], &args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("error: exec: {}: {error}", command[0]);
    Ok(if error == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    })
}
