//! What `up` made, on disk: `/run/wg-namespace/<ns>.json` (mode 0600).
//!
//! The file is a journal. `up` records each resource *before* it creates it, so whatever
//! happens to `up` (an error, a panic, SIGKILL) the record covers everything that may exist,
//! and undoing a record is safe even when the resource never came to be. Rollback, `down` and
//! the recovery of a killed `up` all run the same [`Resource::undo`].
//!
//! A per-namespace lock file serialises `up` and `down` of one namespace.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::system::files::{self, Dir};
use crate::system::process::ProcessId;

pub const STATE_DIR: &str = "/run/wg-namespace";
const FORMAT_VERSION: u32 = 1;

pub fn state_path(namespace: &str) -> PathBuf {
    Path::new(STATE_DIR).join(state_name(namespace))
}

fn state_name(namespace: &str) -> String {
    format!("{namespace}.json")
}

fn lock_name(namespace: &str) -> String {
    format!("{namespace}.lock")
}

/// The state directory, checked to be root's own real directory (see [`files::Dir`]);
/// `None` when it does not exist and `create` is false. Every file under it is made, read and
/// removed through this.
pub fn state_dir(create: bool) -> Result<Option<Dir>> {
    let path = Path::new(STATE_DIR);
    let dir = if create {
        Dir::create(path, 0o755)
    } else {
        Dir::open(path)
    };
    match dir {
        Ok(dir) => Ok(Some(dir)),
        Err(e) if e.not_found() && !create => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// `up` is at work, or died at work.
    Building,
    Up,
}

/// Something `up` creates, with what it takes to remove it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Resource {
    Namespace {
        name: String,
    },
    /// `/etc/netns/<ns>`; `created_parent` when `/etc/netns` itself was made too.
    #[serde(rename_all = "camelCase")]
    EtcDir {
        path: PathBuf,
        created_parent: bool,
    },
    /// The WireGuard link: in the host namespace until `moved` (a userspace daemon makes it
    /// there), then in `namespace`; a kernel link is born in `namespace` (`moved` from the start).
    Link {
        name: String,
        namespace: String,
        #[serde(default)]
        moved: bool,
    },
    /// The userspace WireGuard daemon serving `interface`.
    Daemon {
        process: ProcessId,
        interface: String,
    },
    /// The relay for `publishPorts`.
    Publisher {
        process: ProcessId,
    },
}

impl Resource {
    /// Removes the resource. Errors are reported but never stop the rest of a teardown.
    pub fn undo(&self) -> Result<()> {
        match self {
            Resource::Namespace { name } => crate::system::netns::delete(name),
            Resource::EtcDir {
                path,
                created_parent,
            } => crate::system::dns::remove(path, *created_parent),
            Resource::Link {
                name,
                namespace,
                moved,
            } => crate::system::wireguard::delete_link(name, namespace, *moved),
            Resource::Daemon { process, interface } => {
                process.terminate(Duration::from_secs(2))?;
                crate::system::wireguard::remove_stale_socket(interface);
                Ok(())
            }
            Resource::Publisher { process } => process.terminate(Duration::from_secs(2)),
        }
    }
}

/// A peer as `status` and `refresh` need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    pub public_key: String,
    /// As configured: a host name stays a host name.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    pub namespace: String,
    pub phase: Phase,
    /// The `up` that wrote this file.
    pub owner: ProcessId,
    /// Seconds since the Unix epoch when `up` started.
    pub started_at: u64,
    pub config_path: Option<PathBuf>,
    /// "kernel" or "userspace", once chosen.
    pub backend: Option<String>,
    pub dns_server: String,
    /// DNS is pinned to dns_server by the firewall.
    #[serde(default)]
    pub strict_dns: bool,
    /// IPv6 may leave through the tunnel.
    #[serde(default)]
    pub ipv6: bool,
    pub peers: Vec<PeerRecord>,
    pub publish_ports: Vec<PublishRecord>,
    /// In creation order.
    pub resources: Vec<Resource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishRecord {
    pub protocol: String,
    pub host_address: String,
    pub host_port: u16,
    pub namespace_port: u16,
}

impl State {
    pub fn new(namespace: &str) -> State {
        State {
            version: FORMAT_VERSION,
            namespace: namespace.to_string(),
            phase: Phase::Building,
            owner: ProcessId::current(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            config_path: None,
            backend: None,
            dns_server: String::new(),
            strict_dns: true,
            ipv6: false,
            peers: Vec::new(),
            publish_ports: Vec::new(),
            resources: Vec::new(),
        }
    }

    pub fn load(namespace: &str) -> Result<Option<State>> {
        let path = state_path(namespace);
        let Some(dir) = state_dir(false)? else {
            return Ok(None);
        };
        let Some(text) = dir.read(&state_name(namespace), files::STATE_LIMIT)? else {
            return Ok(None);
        };
        let state: State = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a wg-namespace state file", path.display()))?;
        if state.version != FORMAT_VERSION {
            bail!(
                "{} has format version {}, this wg-namespace reads version {FORMAT_VERSION}",
                path.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    /// Writes the file atomically (temporary file, then rename), readable by root only.
    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).context("encoding the state")?;
        let dir = state_dir(true)?.context("the state directory vanished")?;
        dir.write_atomically(&state_name(&self.namespace), &text, 0o600)?;
        Ok(())
    }

    /// Undoes every resource, newest first, then removes the state file. When something
    /// could not be undone, the file keeps just those resources so a later `down` can retry,
    /// and the first error is returned.
    pub fn teardown(&self) -> Result<()> {
        let mut left = Vec::new();
        let mut first_error = None;
        for resource in self.resources.iter().rev() {
            if let Err(e) = resource.undo() {
                first_error.get_or_insert(e);
                left.insert(0, resource.clone());
            }
        }
        match first_error {
            None => match state_dir(false)? {
                Some(dir) => Ok(dir.remove_file(&state_name(&self.namespace))?),
                None => Ok(()),
            },
            Some(e) => {
                let mut rest = self.clone();
                rest.resources = left;
                rest.phase = Phase::Building;
                let _ = rest.save();
                Err(e)
            }
        }
    }
}

/// Namespaces that have a state file.
pub fn recorded_namespaces() -> Vec<String> {
    let Ok(Some(dir)) = state_dir(false) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .names()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|name| name.strip_suffix(".json").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Exclusive right to change one namespace. Dropping it (or dying) releases it; [`Lock::remove`]
/// also deletes the lock file so that nothing stays behind after `down`.
pub struct Lock {
    dir: Dir,
    name: String,
    file: Flock<File>,
}

pub enum LockError {
    /// Another process holds the lock.
    Busy,
    Other(anyhow::Error),
}

impl Lock {
    pub fn try_acquire(namespace: &str) -> std::result::Result<Lock, LockError> {
        let name = lock_name(namespace);
        loop {
            let dir = state_dir(true)
                .and_then(|dir| dir.context("the state directory vanished"))
                .map_err(LockError::Other)?;
            let file = match dir.open_lock(&name) {
                Ok(file) => file,
                // A `down` of another namespace removed the empty directory just now.
                Err(e) if e.not_found() => continue,
                Err(e) => return Err(LockError::Other(e.into())),
            };
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(file) => file,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(LockError::Busy),
                Err((_, e)) => {
                    return Err(LockError::Other(
                        anyhow::Error::new(e)
                            .context(format!("locking {}", dir.path().join(&name).display())),
                    ));
                }
            };
            // The holder before us may have removed the file after we opened it; a lock on a
            // deleted file protects nothing, so start over with the file now at the path.
            if dir.holds(&name, &file) {
                return Ok(Lock { dir, name, file });
            }
        }
    }

    /// Waits up to `timeout` for the lock.
    pub fn acquire(namespace: &str, timeout: Duration) -> Result<Lock> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match Lock::try_acquire(namespace) {
                Ok(lock) => return Ok(lock),
                Err(LockError::Other(e)) => return Err(e),
                Err(LockError::Busy) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(LockError::Busy) => bail!(
                    "another wg-namespace has been working on namespace {namespace:?} for over {}s",
                    timeout.as_secs()
                ),
            }
        }
    }

    /// Deletes the lock file (while still holding it), then releases the lock. Also removes
    /// the state directory when this leaves it empty.
    pub fn remove(self) {
        let _ = self.dir.remove_file(&self.name);
        drop(self.file);
        if let Some(parent) = Path::new(STATE_DIR).parent()
            && let Ok(parent) = Dir::open(parent)
        {
            let _ = parent.remove_dir("wg-namespace");
        }
    }
}
