//! Name resolution inside the namespace: `/etc/netns/<ns>/{resolv.conf,nsswitch.conf,hosts}`, which
//! `ip netns exec`, `wg-namespace exec` and confined services bind over `/etc`, and the host
//! sockets that would resolve names outside the tunnel.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::render::Rendered;
use crate::system::files::{Dir, FileErrorKind};

pub const ETC_NETNS: &str = "/etc/netns";

/// The files `up` writes into the namespace's `/etc` directory.
pub const FILES: [&str; 3] = ["resolv.conf", "nsswitch.conf", "hosts"];

/// Host sockets through which a lookup would be answered in the host namespace: nscd, the
/// varlink socket of systemd-resolved's NSS module, and D-Bus (resolved's D-Bus API). Hidden
/// from `exec`; the NixOS module hides the same paths from confined services.
pub const HOST_RESOLVER_PATHS: [&str; 3] = [
    "/run/nscd",
    "/run/systemd/resolve/io.systemd.Resolve",
    "/run/dbus/system_bus_socket",
];

pub fn dir(namespace: &str) -> PathBuf {
    Path::new(ETC_NETNS).join(namespace)
}

/// Whether `/etc/netns` has to be created first (and so removed again by teardown).
pub fn parent_missing() -> bool {
    !Path::new(ETC_NETNS).exists()
}

/// Writes resolv.conf, nsswitch.conf and hosts, each atomically and mode 0644, into a directory
/// checked to be root's own (never through a symlink). Not synced to disk: they go with the
/// namespace, and the next `up` writes them again.
pub fn install(namespace: &str, rendered: &Rendered) -> Result<()> {
    let dir = Dir::create(&dir(namespace), 0o755)?;
    // Readable by the confined users, whatever mode an earlier directory had.
    dir.set_mode(0o755)?;
    dir.write_atomically_unsynced("resolv.conf", rendered.resolv_conf.as_bytes(), 0o644)?;
    dir.write_atomically_unsynced("nsswitch.conf", rendered.nsswitch_conf.as_bytes(), 0o644)?;
    dir.write_atomically_unsynced("hosts", rendered.hosts.as_bytes(), 0o644)?;
    Ok(())
}

/// Removes our files and the directory, and `/etc/netns` too when we created it and it is
/// empty. Files someone else put there are left alone (and so is the directory holding them).
/// The path comes from the state file: anything but a real directory `/etc/netns/<name>`
/// owned by root is not ours and is left alone; the reason is returned.
pub fn remove(path: &Path, created_parent: bool) -> Result<Option<String>> {
    let name = path.file_name().and_then(|n| n.to_str()).filter(|n| {
        crate::config::check_name(n).is_ok() && path.parent() == Some(Path::new(ETC_NETNS))
    });
    let Some(name) = name else {
        return Ok(Some(format!(
            "{} is not a namespace directory in {ETC_NETNS}",
            path.display()
        )));
    };
    let opened = Dir::open(Path::new(ETC_NETNS))
        .and_then(|parent| parent.subdir(name).map(|dir| (parent, dir)));
    let left_alone = match opened {
        Ok((parent, dir)) => {
            for file in FILES {
                dir.remove_file(file)?;
                dir.remove_file(&format!(".{file}.tmp"))?;
            }
            let _ = parent.remove_dir(name);
            None
        }
        Err(e) if e.not_found() => None,
        Err(e) if e.kind == FileErrorKind::Refused => {
            Some(format!("{e}; not made by wg-namespace"))
        }
        Err(e) => return Err(e.into()),
    };
    if created_parent && let Ok(etc) = Dir::open(Path::new("/etc")) {
        let _ = etc.remove_dir("netns");
    }
    Ok(left_alone)
}
