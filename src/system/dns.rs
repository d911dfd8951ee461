//! Name resolution inside the namespace: `/etc/netns/<ns>/{resolv.conf,nsswitch.conf}`, which
//! `ip netns exec`, `wg-namespace exec` and confined services bind over `/etc`, and the host
//! sockets that would resolve names outside the tunnel.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::render::Rendered;

pub const ETC_NETNS: &str = "/etc/netns";

/// The files `up` writes into the namespace's `/etc` directory.
pub const FILES: [&str; 2] = ["resolv.conf", "nsswitch.conf"];

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

/// Writes resolv.conf and nsswitch.conf, each atomically and mode 0644.
pub fn install(namespace: &str, rendered: &Rendered) -> Result<()> {
    let dir = dir(namespace);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    write_atomically(&dir.join("resolv.conf"), &rendered.resolv_conf)?;
    write_atomically(&dir.join("nsswitch.conf"), &rendered.nsswitch_conf)
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        // The umask may have narrowed the mode given at creation.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Removes our files and the directory, and `/etc/netns` too when we created it and it is
/// empty. Files someone else put there are left alone (and so is the directory holding them).
pub fn remove(dir: &Path, created_parent: bool) -> Result<()> {
    for name in FILES {
        crate::system::state::remove_file_if_present(&dir.join(name))?;
        crate::system::state::remove_file_if_present(&dir.join(format!(".{name}.tmp")))?;
    }
    let _ = std::fs::remove_dir(dir);
    if created_parent {
        let _ = std::fs::remove_dir(ETC_NETNS);
    }
    Ok(())
}
