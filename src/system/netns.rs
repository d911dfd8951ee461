//! Named network namespaces, kept the way `ip netns` keeps them: a bind mount of the namespace
//! at `/run/netns/<name>`, so `ip netns list`, `ip netns exec` and systemd's
//! `NetworkNamespacePath=` all see ours.
//!
//! Entering a namespace is per thread ([`Entered`] switches the calling thread and switches it
//! back on drop); sockets keep the namespace they were created in.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use serde::{Deserialize, Serialize};

pub const RUN_DIR: &str = "/run/netns";

/// `statfs` magic of the nsfs file system that namespace files live on.
const NSFS_MAGIC: i64 = 0x6e73_6673;

pub fn path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

/// True when `/run/netns/<name>` is a live namespace (not just a leftover empty file).
pub fn exists(name: &str) -> bool {
    open(name).is_ok()
}

pub fn open(name: &str) -> Result<OwnedFd> {
    let file =
        File::open(path(name)).with_context(|| format!("opening network namespace {name:?}"))?;
    let magic = nix::sys::statfs::fstatfs(&file)
        .with_context(|| format!("inspecting {}", path(name).display()))?
        .filesystem_type()
        .0;
    if magic != NSFS_MAGIC {
        bail!("{} is not a network namespace", path(name).display());
    }
    Ok(file.into())
}

/// Makes `/run/netns` a shared mount point, as iproute2 does, so that namespaces mounted later
/// propagate into mount namespaces made from this one (services with private mounts).
fn prepare_run_dir() -> Result<()> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let shared = || {
        mount(
            None::<&str>,
            RUN_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not yet a mount point: bind it onto itself first.
        Err(Errno::EINVAL) => {
            mount(
                Some(RUN_DIR),
                RUN_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {RUN_DIR} onto itself"))?;
            shared().with_context(|| format!("making {RUN_DIR} a shared mount"))
        }
        Err(e) => Err(e).with_context(|| format!("making {RUN_DIR} a shared mount")),
    }
}

/// Which namespace a descriptor or name stands for. The nsfs inode number alone is not enough:
/// a namespace deleted and made again can get the same inode, never the same cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetnsId {
    /// `SO_NETNS_COOKIE` of a socket made inside: unique for the whole uptime (0 on Linux
    /// before 5.14, which has none).
    pub cookie: u64,
    pub inode: u64,
}

pub fn identity(fd: impl AsFd) -> Result<NetnsId> {
    let inode = File::from(fd.as_fd().try_clone_to_owned()?)
        .metadata()
        .context("inspecting a network namespace")?
        .ino();
    let cookie = within(fd, cookie_here)??;
    Ok(NetnsId { cookie, inode })
}

/// The cookie of the calling thread's network namespace.
fn cookie_here() -> Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("making a socket to read the namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        // Linux before 5.14 has no cookie: there the inode alone has to do.
        if error.raw_os_error() == Some(libc::ENOPROTOOPT) {
            return Ok(0);
        }
        return Err(error).context("reading the namespace cookie");
    }
    Ok(cookie)
}

/// Creates a new, empty network namespace named `name`. Fails when the name is taken.
pub fn create(name: &str) -> Result<()> {
    attach(&unshare_new()?, name)
}

/// A new network namespace with no name yet, alive as long as the descriptor is.
pub fn unshare_new() -> Result<OwnedFd> {
    // unshare() moves only the calling thread, so do it on a thread of its own, which hands
    // the new namespace back as a descriptor and ends.
    std::thread::spawn(|| -> Result<OwnedFd> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        Ok(File::open("/proc/thread-self/ns/net")
            .context("opening the new network namespace")?
            .into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread creating the namespace panicked"))?
}

/// Gives the namespace `fd` the name `name` (`/run/netns/<name>`). Fails when the name is
/// taken.
pub fn attach(fd: &OwnedFd, name: &str) -> Result<()> {
    prepare_run_dir()?;
    let target = path(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))?;
    let made = mount(
        Some(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str()),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting the namespace onto {}", target.display()));
    if made.is_err() {
        let _ = std::fs::remove_file(&target);
    }
    made
}

/// The namespace named `name` when it is the one `id` describes; None when the name is free
/// or now stands for another namespace.
pub fn open_matching(name: &str, id: NetnsId) -> Option<OwnedFd> {
    let fd = open(name).ok()?;
    (identity(&fd).ok()? == id).then_some(fd)
}

/// What [`delete_matching`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Removed, or there was nothing to remove.
    Done,
    /// The name stands for another namespace, which stays.
    NotOurs,
}

/// Removes the name `name` when it still stands for the namespace `id`; a namespace made
/// under the same name since (by an admin, say) is left alone. An empty file at the name,
/// left by an `attach` that was killed before its mount, goes too.
pub fn delete_matching(name: &str, id: NetnsId) -> Result<Deleted> {
    let target = path(name);
    let meta = match std::fs::symlink_metadata(&target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Deleted::Done),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", target.display())),
    };
    match open(name) {
        Ok(fd) if identity(&fd)? == id => delete(name).map(|()| Deleted::Done),
        Ok(_) => Ok(Deleted::NotOurs),
        Err(_) if meta.is_file() && meta.len() == 0 && meta.uid() == 0 => {
            crate::system::files::Dir::open(Path::new(RUN_DIR))?.remove_file(name)?;
            Ok(Deleted::Done)
        }
        Err(_) => Ok(Deleted::NotOurs),
    }
}

/// Removes the name, whatever namespace it stands for now; only for names the caller made
/// itself in this run (tests, the demo). The namespace itself ends once no process and no
/// socket holds it. Succeeds when there is nothing to remove.
pub fn delete(name: &str) -> Result<()> {
    let target = path(name);
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", target.display())),
    }
}

/// Names under `/run/netns`, as `ip netns list` shows them.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The calling thread's stay in another network namespace; it returns on drop.
struct Entered {
    original: OwnedFd,
}

impl Entered {
    fn new(target: impl AsFd) -> Result<Entered> {
        let original = File::open("/proc/thread-self/ns/net")
            .context("opening the current network namespace")?
            .into();
        setns(target, CloneFlags::CLONE_NEWNET).context("entering the network namespace")?;
        Ok(Entered { original })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        // A thread stuck in the wrong namespace would make later sockets land there: better
        // to stop than to leak.
        if let Err(e) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            eprintln!("error: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

/// Runs `f` on this thread inside the namespace `fd`, then returns to where the thread was.
pub fn within<T>(fd: impl AsFd, f: impl FnOnce() -> T) -> Result<T> {
    let _entered = Entered::new(fd)?;
    Ok(f())
}

/// Turns IPv6 off for every interface of the calling thread's namespace, present and future.
/// A kernel without IPv6 needs nothing done.
pub fn disable_ipv6() -> Result<()> {
    for scope in ["all", "default"] {
        let key = format!("net/ipv6/conf/{scope}/disable_ipv6");
        if std::path::Path::new("/proc/sys").join(&key).exists() {
            write_sysctl(&key, "1")?;
        }
    }
    Ok(())
}

/// Sets a sysctl of the calling thread's network namespace (`key` as a path below
/// /proc/sys, which shows the namespace of the thread that opens it).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).with_context(|| format!("writing {path}"))
}
