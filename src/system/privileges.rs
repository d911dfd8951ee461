//! Becoming an ordinary user for good: the one way every process the helper starts for a user
//! (`exec --user`, the port-forward hook, the desktop exec service) or for untrusted input (the
//! relays) leaves root.

use std::io;

use anyhow::{Context, Result, bail};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

/// Who to become. `groups` are the supplementary groups, complete (the primary group is not
/// added to them).
pub struct Credentials<'a> {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: &'a [Gid],
}

/// Becomes `who` with no capability in any set (not even the bounding set, so no setuid or
/// file-capability program can give one back), `no_new_privs` set, and `/` as working
/// directory (the caller's directory may be one `who` could never have opened). Fails, leaving
/// the process unusable for anything but exiting, when any step fails: it never half-drops.
///
/// Needs CAP_SETPCAP (to empty the bounding set), CAP_SETGID and CAP_SETUID.
pub fn become_user(who: &Credentials<'_>) -> Result<()> {
    // SAFETY: plain prctl calls with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("setting no_new_privs");
    }
    empty_bounding_set()?;
    // SAFETY: as above.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error()).context("clearing the ambient capabilities");
    }
    clear_inheritable()?;
    setgroups(who.groups).context("setting the supplementary groups")?;
    setresgid(who.gid, who.gid, who.gid).context("setting the group")?;
    // Leaving uid 0 clears the permitted, effective and ambient capabilities.
    setresuid(who.uid, who.uid, who.uid).context("setting the user")?;
    if !who.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("could become root again after dropping privileges");
    }
    std::env::set_current_dir("/").context("changing to /")?;
    Ok(())
}

/// Drops every capability the kernel knows from the bounding set; one still there afterwards
/// is an error (a service manager that withheld CAP_SETPCAP, say), never silently kept.
fn empty_bounding_set() -> Result<()> {
    for capability in 0..64 {
        // SAFETY: plain prctl calls with integer arguments.
        match unsafe { libc::prctl(libc::PR_CAPBSET_READ, capability, 0, 0, 0) } {
            0 => continue,
            // Past the last capability this kernel knows.
            -1 if nix::errno::Errno::last() == nix::errno::Errno::EINVAL => break,
            _ => {}
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!("dropping capability {capability} from the bounding set")
            });
        }
    }
    Ok(())
}

/// Empties the inheritable set, which a change of uid leaves as it was.
fn clear_inheritable() -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version 3 header and the two data words it takes.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error()).context("reading the capabilities");
        }
        for word in &mut data {
            word.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error())
                .context("clearing the inheritable capabilities");
        }
    }
    Ok(())
}
