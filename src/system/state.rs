//! What `up` made, on disk: `/run/wg-namespace/<ns>.json` (mode 0600).
//!
//! The file is a journal. `up` records each resource *before* it creates it, so whatever
//! happens to `up` (an error, a panic, SIGKILL) the record covers everything that may exist,
//! and undoing a record is safe even when the resource never came to be. Rollback, `down` and
//! the recovery of a killed `up` all run the same [`Resource::undo`].
//!
//! A per-namespace lock file serialises `up` and `down` of one namespace.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Protocol;
use crate::system::files::{self, Dir};
use crate::system::netns::{self, NetnsId};
use crate::system::process::ProcessId;
use crate::system::wireguard::Backend;

pub const STATE_DIR: &str = "/run/wg-namespace";
const FORMAT_VERSION: u32 = 2;

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

/// This boot's id: PIDs, namespace cookies and link indexes mean nothing in another boot.
pub fn boot_id() -> String {
    use std::io::Read;
    let mut text = String::new();
    let _ = File::open("/proc/sys/kernel/random/boot_id")
        .and_then(|f| f.take(64).read_to_string(&mut text));
    text.trim().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// `up` is at work, or died at work.
    Building,
    Up,
}

/// What made the WireGuard link, and so its kind as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LinkKind {
    /// `ip link add type wireguard`.
    Wireguard,
    /// A userspace daemon's TUN device.
    Tun,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Wireguard => "wireguard",
            LinkKind::Tun => "tun",
        }
    }
}

/// Something `up` creates, with what it takes to remove it again. Every name and path in a
/// record must be the one `up` derives from the namespace name, and every identity must still
/// match, or [`Resource::undo`] leaves the thing alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Resource {
    /// Recorded after the namespace exists (unnamed) and before it gets its name.
    Namespace { name: String, id: NetnsId },
    /// `/etc/netns/<ns>`; `created_parent` when `/etc/netns` itself was made too.
    #[serde(rename_all = "camelCase")]
    EtcDir { path: PathBuf, created_parent: bool },
    /// The WireGuard link: in the host namespace until `moved` (a userspace daemon makes it
    /// there), then in `namespace`; a kernel link is born in `namespace` (`moved` from the
    /// start). `index` is known once the link exists (and again after a move).
    #[serde(rename_all = "camelCase")]
    Link {
        name: String,
        namespace: String,
        #[serde(default)]
        moved: bool,
        index: Option<u32>,
        link_kind: LinkKind,
    },
    /// The userspace WireGuard daemon serving `interface`.
    Daemon {
        process: ProcessId,
        /// What it may run (resolved paths); anything else at its PID is not it.
        executables: Vec<PathBuf>,
        interface: String,
    },
    /// The relay of every `publishPorts` entry at once, as versions before per-entry relays
    /// wrote it; kept so that their state files still tear down.
    Publisher {
        process: ProcessId,
        executables: Vec<PathBuf>,
    },
    /// The relay of one `publishPorts` or `hostServices` entry.
    Relay {
        process: ProcessId,
        executables: Vec<PathBuf>,
        entry: crate::system::relays::Entry,
    },
}

/// What a teardown may act on: the namespace the record is for, and the identity it recorded.
pub struct Scope {
    pub namespace: String,
    /// From the record's `Namespace` resource.
    pub netns: Option<NetnsId>,
    /// The record was written during this boot; otherwise only files are ours to remove.
    pub this_boot: bool,
}

impl Scope {
    /// The recorded namespace, when its name still stands for it.
    pub fn open_netns(&self) -> Option<std::os::fd::OwnedFd> {
        netns::open_matching(&self.namespace, self.netns?)
    }
}

/// Takes a link inside the recorded namespace down (see [`State::teardown`]).
fn disable_link(scope: &Scope, name: &str, index: Option<u32>, kind: LinkKind) -> Result<Undone> {
    let Some(fd) = scope.open_netns() else {
        return Ok(Undone::Done);
    };
    Ok(
        match crate::system::wireguard::disable_link(fd, name, index, kind)? {
            crate::system::wireguard::LinkDeleted::Done => Undone::Done,
            crate::system::wireguard::LinkDeleted::NotOurs(what) => Undone::LeftAlone(format!(
                "link {name:?} is not the one wg-namespace made ({what})"
            )),
        },
    )
}

/// The outcome of [`Resource::undo`] that is not an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Undone {
    /// Removed, or already gone.
    Done,
    /// Not provably ours (any more): left as it is, for this reason.
    LeftAlone(String),
}

impl Resource {
    /// Removes the resource when it is still provably the one recorded. Errors are reported
    /// but never stop the rest of a teardown.
    pub fn undo(&self, scope: &Scope) -> Result<Undone> {
        let ns = scope.namespace.as_str();
        let left = |why: String| Ok(Undone::LeftAlone(why));
        if let Some(problem) = self.foreign_name(ns) {
            return left(problem);
        }
        if !scope.this_boot && !matches!(self, Resource::EtcDir { .. }) {
            return left(format!(
                "{} was recorded in an earlier boot",
                self.describe()
            ));
        }
        match self {
            Resource::Namespace { name, id } => match netns::delete_matching(name, *id)? {
                netns::Deleted::Done => Ok(Undone::Done),
                netns::Deleted::NotOurs => left(format!(
                    "network namespace {name:?} is not the one wg-namespace made (it was deleted and made again since)"
                )),
            },
            Resource::EtcDir {
                path,
                created_parent,
            } => match crate::system::dns::remove(path, *created_parent)? {
                None => Ok(Undone::Done),
                Some(why) => left(why),
            },
            Resource::Link {
                name,
                moved,
                index,
                link_kind,
                ..
            } => {
                let found = if *moved {
                    // A moved link is never looked for on the host, where its name is free
                    // again and may belong to someone else by now. When the namespace is gone
                    // or another, the link went with ours.
                    match scope.open_netns() {
                        Some(fd) => {
                            crate::system::wireguard::delete_link(fd, name, *index, *link_kind)?
                        }
                        None => return Ok(Undone::Done),
                    }
                } else {
                    crate::system::wireguard::delete_link_here(name, *index, *link_kind)?
                };
                match found {
                    crate::system::wireguard::LinkDeleted::Done => Ok(Undone::Done),
                    crate::system::wireguard::LinkDeleted::NotOurs(what) => left(format!(
                        "link {name:?} is not the one wg-namespace made ({what})"
                    )),
                }
            }
            Resource::Daemon {
                process,
                executables,
                interface,
            } => {
                // Started as `<command> -f <interface>` (behind the gate or not).
                let started_as = |argv: &[String]| {
                    argv.len() >= 2 && argv[argv.len() - 2..] == ["-f", interface.as_str()]
                };
                let undone = stop_process(
                    process,
                    executables,
                    started_as,
                    "userspace WireGuard daemon",
                    Stop::Now,
                )?;
                if undone == Undone::Done {
                    crate::system::wireguard::remove_stale_socket(interface);
                }
                Ok(undone)
            }
            Resource::Publisher {
                process,
                executables,
            } => stop_process(
                process,
                executables,
                |argv| started_for(argv, "publish", ns),
                "port relay",
                Stop::Politely,
            ),
            Resource::Relay {
                process,
                executables,
                entry,
            } => {
                let undone = stop_process(
                    process,
                    executables,
                    |argv| started_for(argv, "relay", ns),
                    &format!("relay for {entry}"),
                    Stop::Politely,
                )?;
                if undone == Undone::Done {
                    crate::system::relays::remove_counters(ns, entry)?;
                }
                Ok(undone)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Resource::Namespace { name, .. } => format!("network namespace {name:?}"),
            Resource::EtcDir { path, .. } => path.display().to_string(),
            Resource::Link { name, .. } => format!("link {name:?}"),
            Resource::Daemon { process, .. } => {
                format!("the userspace WireGuard daemon (pid {})", process.pid)
            }
            Resource::Publisher { process, .. } => format!("the port relay (pid {})", process.pid),
            Resource::Relay { process, entry, .. } => {
                format!("the relay for {entry} (pid {})", process.pid)
            }
        }
    }

    /// A name or path other than the one `up` derives from `namespace`, described.
    fn foreign_name(&self, namespace: &str) -> Option<String> {
        let expected_dir = crate::system::dns::dir(namespace);
        let problem = match self {
            Resource::Namespace { name, .. } if name != namespace => {
                format!("names network namespace {name:?}")
            }
            Resource::EtcDir { path, .. } if *path != expected_dir => {
                format!("names directory {}", path.display())
            }
            Resource::Link {
                name, namespace: n, ..
            } if name != namespace || n != namespace => {
                format!("names link {name:?} in namespace {n:?}")
            }
            Resource::Daemon { interface, .. } if interface != namespace => {
                format!("names a daemon for interface {interface:?}")
            }
            _ => return None,
        };
        Some(format!(
            "the record of namespace {namespace:?} {problem}, which is not its own"
        ))
    }
}

/// How a recorded process is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM, then SIGKILL after a grace time.
    Politely,
    /// SIGKILL: nothing is lost by it, and the polite way costs time.
    Now,
}

/// Whether `argv` is our own `<subcommand> --namespace <namespace> ...` (behind the gate or not).
fn started_for(argv: &[String], subcommand: &str, namespace: &str) -> bool {
    argv.windows(3)
        .any(|w| w[0] == subcommand && w[1] == "--namespace" && w[2] == namespace)
}

/// Ends a recorded process when the PID still holds the very process (start time) running
/// what it was recorded to run, with the arguments `up` gives such a process for this
/// namespace (`started_as`). The record's list of executables alone proves nothing: the
/// record may be forged.
fn stop_process(
    process: &ProcessId,
    executables: &[PathBuf],
    started_as: impl Fn(&[String]) -> bool,
    what: &str,
    how: Stop,
) -> Result<Undone> {
    if process.pid <= 1 {
        return Ok(Undone::LeftAlone(format!(
            "the {what} is recorded as pid {}, which is never wg-namespace's",
            process.pid
        )));
    }
    if !process.is_alive() {
        // It is ending on its own (a daemon whose TUN went with the namespace): a zombie leader
        // may still have threads whose descriptors are open. Nothing is sent to it.
        process.wait_exited(Duration::from_secs(2))?;
        return Ok(Undone::Done);
    }
    if !process.runs_one_of(executables) {
        let running = process
            .executable()
            .map_or_else(|| "something else".into(), |e| e.display().to_string());
        return Ok(Undone::LeftAlone(format!(
            "the {what} recorded as pid {} runs {running}, not what wg-namespace started",
            process.pid
        )));
    }
    if !process.arguments().is_some_and(|argv| started_as(&argv)) {
        return Ok(Undone::LeftAlone(format!(
            "the {what} recorded as pid {} was not started by wg-namespace for this namespace \
             (its arguments differ)",
            process.pid
        )));
    }
    // A stopped process cannot act on SIGTERM: waiting for it would only cost the grace time.
    let how = if process.is_stopped() { Stop::Now } else { how };
    match how {
        Stop::Politely => process.terminate(Duration::from_secs(2))?,
        Stop::Now => process.kill(Duration::from_secs(2))?,
    }
    Ok(Undone::Done)
}

/// A peer as `status` and `refresh` need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    pub public_key: String,
    /// As configured: a host name stays a host name.
    pub endpoint: Option<String>,
    /// The servers that can stand in for this peer, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<ServerRecord>,
    /// Which server carries the peer, once `refresh` has switched; none means the peer itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerRecord {
    pub public_key: String,
    /// As configured.
    pub endpoint: String,
}

/// The server on the device in the peer's place, and the last switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// 0: the peer itself; n: `alternatives[n - 1]`.
    pub active: usize,
    /// The key the device holds for this peer.
    pub active_public_key: String,
    /// Seconds since the Unix epoch.
    pub last_switch_at: Option<u64>,
    pub last_switch_reason: Option<String>,
    /// Set while no server has answered since then (seconds since the Unix epoch).
    pub all_down_since: Option<u64>,
    /// Switches made since this record began (a new interface starts a new one).
    #[serde(default)]
    pub switches: u64,
}

impl PeerRecord {
    /// The key the device holds for this peer: the active alternative's, or its own.
    pub fn active_public_key(&self) -> &str {
        self.failover
            .as_ref()
            .map_or(&self.public_key, |f| &f.active_public_key)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    pub namespace: String,
    /// [`boot_id`] when `up` ran.
    pub boot_id: String,
    pub phase: Phase,
    /// The `up` that wrote this file.
    pub owner: ProcessId,
    /// Seconds since the Unix epoch when `up` started.
    pub started_at: u64,
    pub config_path: Option<PathBuf>,
    /// Once chosen.
    pub backend: Option<Backend>,
    pub dns_server: IpAddr,
    /// Every DNS server in resolv.conf, dns_server first (absent in files of older versions).
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
    /// DNS is pinned to dns_server by the firewall.
    #[serde(default)]
    pub strict_dns: bool,
    /// IPv6 may leave through the tunnel.
    #[serde(default)]
    pub ipv6: bool,
    pub peers: Vec<PeerRecord>,
    pub publish_ports: Vec<PublishRecord>,
    /// Set when a `port-forward` process is to keep a forwarded port for this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_forwarding: Option<PortForwardingRecord>,
    /// In creation order.
    pub resources: Vec<Resource>,
    /// The userspace daemon's command as last applied; a change recreates the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace_command: Option<Vec<String>>,
    /// The file `userspace_command`'s program was when its daemon last started (found in the
    /// PATH of that run when the command names no path): repairs start that same file, whatever
    /// PATH their caller has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace_program: Option<PathBuf>,
    /// Digest of the ruleset text last loaded, so that `reload` of the same config leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ruleset_digest: Option<String>,
    /// The leak guard as the kernel held it right after it was loaded: what `status` and `heal`
    /// compare the live one with (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leak_guard: Option<crate::system::nf_tables::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<Event>,
    /// The latest repairs `heal` made, oldest first, at most [`HEALS_KEPT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heals: Vec<Event>,
    /// Heals that changed something, since `up` (for counters; `heals` keeps only the latest).
    #[serde(default)]
    pub heals_total: u64,
    /// Reloads since `up`.
    #[serde(default)]
    pub reloads_total: u64,
    /// `allowedUsers` and `allowedGroups` as last applied: whom the exec service serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_groups: Vec<String>,
}

/// How many heal events the state file keeps.
pub const HEALS_KEPT: usize = 10;

/// A `reload` or `heal` that changed something: when, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub changes: Vec<String>,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishRecord {
    pub protocol: Protocol,
    pub host_address: IpAddr,
    pub host_port: u16,
    pub namespace_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardingRecord {
    pub gateway: std::net::Ipv4Addr,
    pub protocols: Vec<crate::config::Protocol>,
}

impl State {
    pub fn new(namespace: &str, dns_server: IpAddr) -> State {
        State {
            version: FORMAT_VERSION,
            namespace: namespace.to_string(),
            boot_id: boot_id(),
            phase: Phase::Building,
            owner: ProcessId::current(),
            started_at: now_secs(),
            config_path: None,
            backend: None,
            dns_server,
            dns_servers: Vec::new(),
            strict_dns: true,
            ipv6: false,
            peers: Vec::new(),
            publish_ports: Vec::new(),
            port_forwarding: None,
            resources: Vec::new(),
            userspace_command: None,
            userspace_program: None,
            ruleset_digest: None,
            leak_guard: None,
            last_reload: None,
            heals: Vec::new(),
            heals_total: 0,
            reloads_total: 0,
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
        }
    }

    /// Reads the record of `namespace`. The file is untrusted input: it must be for that
    /// namespace, and [`State::teardown`] checks every resource again before acting.
    pub fn load(namespace: &str) -> Result<Option<State>> {
        match read_record(namespace)? {
            Some(text) => parse_record(namespace, &text).map(Some),
            None => Ok(None),
        }
    }

    /// Writes the file atomically (temporary file, then rename), readable by root only.
    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).context("encoding the state")?;
        let dir = state_dir(true)?.context("the state directory vanished")?;
        dir.write_atomically(&state_name(&self.namespace), &text, 0o600)?;
        Ok(())
    }

    /// What a teardown of this record may act on.
    pub fn scope(&self) -> Scope {
        Scope {
            namespace: self.namespace.clone(),
            netns: self.resources.iter().find_map(|r| match r {
                Resource::Namespace { id, .. } => Some(*id),
                _ => None,
            }),
            this_boot: self.boot_id == boot_id(),
        }
    }

    /// The recorded namespace, when its name still stands for it.
    pub fn open_netns(&self) -> Option<std::os::fd::OwnedFd> {
        self.scope().open_netns()
    }

    /// Undoes every resource, newest first, then removes the state file. What is not (any
    /// more) provably ours is reported on stderr and left alone. When something could not be
    /// undone, the file keeps just those resources so a later `down` can retry, and the first
    /// error is returned.
    pub fn teardown(&self) -> Result<()> {
        let scope = self.scope();
        // Links inside a namespace that is about to be deleted go with it: the kernel destroys
        // them in the background, where deleting them first would make `down` wait for
        // WireGuard's teardown of every peer (over 10 s with 1,000 peers under qemu TCG). They
        // are only taken down (see `wireguard::disable_link`).
        let namespace_goes = scope.open_netns().is_some()
            && self
                .resources
                .iter()
                .any(|r| matches!(r, Resource::Namespace { .. }));
        let mut left = Vec::new();
        let mut first_error = None;
        for index in self.teardown_order(namespace_goes) {
            let resource = &self.resources[index];
            let outcome = match resource {
                Resource::Link {
                    name,
                    moved: true,
                    index,
                    link_kind,
                    ..
                } if namespace_goes => disable_link(&scope, name, *index, *link_kind),
                _ => resource.undo(&scope),
            };
            match outcome {
                Ok(Undone::Done) => {}
                Ok(Undone::LeftAlone(why)) => eprintln!("warning: {why}; left alone"),
                Err(e) => {
                    first_error.get_or_insert(e);
                    left.push(index);
                }
            }
        }
        left.sort_unstable();
        let left: Vec<Resource> = left.iter().map(|&i| self.resources[i].clone()).collect();
        match first_error {
            None => match state_dir(false)? {
                Some(dir) => {
                    // The companions' reports outlive neither the namespace nor its port.
                    crate::system::forwarding::remove_record(&self.namespace)?;
                    crate::system::endpoints::Learned::forget(&self.namespace)?;
                    Ok(dir.remove_file(&state_name(&self.namespace))?)
                }
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

    /// The indexes of the resources in the order a teardown undoes them: newest first, except
    /// that a namespace which is going is deleted before a userspace daemon is ended (after the
    /// relays, which live inside and would keep it alive), and its `/etc/netns` files go in
    /// between. The daemon's TUN device is torn down by whoever lets go of it last. Killed
    /// first, the daemon does that in its exit, which `down` waits for: 15-30 ms of RCU grace
    /// periods here. With the namespace deleted first, the kernel's cleanup of the namespace
    /// does it in the background (the files' removal gives it a head start) and the killed
    /// daemon exits sooner, or has already exited, its TUN gone. While something else still
    /// holds the namespace (a process inside, or sockets closed by `up` a moment ago, freed
    /// after a grace period), the daemon's exit does the teardown as before. Either way the
    /// daemon has exited when the teardown returns.
    fn teardown_order(&self, namespace_goes: bool) -> Vec<usize> {
        let newest_first = (0..self.resources.len()).rev();
        let daemon = self
            .resources
            .iter()
            .any(|r| matches!(r, Resource::Daemon { .. }));
        if !(namespace_goes && daemon) {
            return newest_first.collect();
        }
        let rank = |r: &Resource| match r {
            Resource::Relay { .. } | Resource::Publisher { .. } => 0,
            Resource::Namespace { .. } => 1,
            Resource::EtcDir { .. } => 2,
            _ => 3,
        };
        let mut order: Vec<usize> = newest_first.collect();
        // Stable: newest first within each rank.
        order.sort_by_key(|&i| rank(&self.resources[i]));
        order
    }
}

/// Changes the state file of a namespace that is up, under the namespace's lock, on the state as
/// it is then. False, and nothing changed or left behind, when the namespace is not up.
pub fn update_up(
    namespace: &str,
    timeout: Duration,
    change: impl FnOnce(&mut State),
) -> Result<bool> {
    if !State::load(namespace)?.is_some_and(|s| s.phase == Phase::Up) {
        return Ok(false);
    }
    let lock = Lock::acquire(namespace, timeout)?;
    match State::load(namespace)? {
        Some(mut state) if state.phase == Phase::Up => {
            change(&mut state);
            state.save()?;
            Ok(true)
        }
        Some(_) => Ok(false),
        // `down` came first and removed its lock file; ours must go too.
        None => {
            lock.remove();
            Ok(false)
        }
    }
}

/// The journal of a change in progress: each resource is on record in the state file before
/// it is made, and off the record only after it is gone.
pub struct Journal {
    pub state: State,
}

impl Journal {
    /// Records a resource that is about to be created.
    pub fn record(&mut self, resource: Resource) -> Result<()> {
        self.state.resources.push(resource);
        self.state.save()
    }

    /// Records `resource`, then makes it with `make`. When `make` finds the name taken (someone
    /// else got there between our check and now), the record goes again: undoing it would
    /// remove what is not ours.
    pub fn create<T>(&mut self, resource: Resource, make: impl FnOnce() -> Result<T>) -> Result<T> {
        self.record(resource)?;
        make().inspect_err(|e| {
            let taken = e.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::AlreadyExists)
            });
            if taken {
                self.state.resources.pop();
                let _ = self.state.save();
            }
        })
    }

    /// Drops the newest record: its resource was never made.
    pub fn forget_last(&mut self) -> Result<()> {
        self.state.resources.pop();
        self.state.save()
    }

    /// Notes the WireGuard link's index (None: not made yet), and whether it lives in the
    /// namespace (else in the host namespace, where a userspace daemon makes it). Writes only
    /// when that changes the record.
    pub fn link_at(&mut self, index: Option<u32>, in_namespace: bool) -> Result<()> {
        if self.note_link(index, in_namespace) {
            self.state.save()?;
        }
        Ok(())
    }

    /// Notes, in one write, what the started daemon runs (a wrapper may have become another
    /// program) and the index of the link it made in the host namespace.
    pub fn daemon_started(&mut self, executable: Option<PathBuf>, link_index: u32) -> Result<()> {
        for resource in &mut self.state.resources {
            if let Resource::Daemon { executables, .. } = resource
                && let Some(executable) = &executable
                && !executables.contains(executable)
            {
                executables.push(executable.clone());
            }
        }
        self.note_link(Some(link_index), false);
        self.state.save()
    }

    /// Updates the link's record in memory; true when it changed.
    fn note_link(&mut self, new_index: Option<u32>, in_namespace: bool) -> bool {
        let mut changed = false;
        for resource in &mut self.state.resources {
            if let Resource::Link { moved, index, .. } = resource
                && (*moved, *index) != (in_namespace, new_index)
            {
                (*moved, *index) = (in_namespace, new_index);
                changed = true;
            }
        }
        changed
    }

    /// Takes resources off the record once they are gone.
    pub fn forget(&mut self, gone: impl Fn(&Resource) -> bool) -> Result<()> {
        self.state.resources.retain(|r| !gone(r));
        self.state.save()
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

    /// Deletes the lock file (while still holding it) and a temporary state file left by a
    /// killed save, then releases the lock. Also removes the state directory when this leaves
    /// it empty.
    pub fn remove(self) {
        if let Some(namespace) = self.name.strip_suffix(".lock") {
            // A save killed between its write and its rename leaves this behind.
            let _ = self
                .dir
                .remove_file(&format!(".{}.tmp", state_name(namespace)));
        }
        let _ = self.dir.remove_file(&self.name);
        drop(self.file);
        remove_state_dir_if_unused(&self.dir);
    }
}

/// With no namespace left (no state or lock file), the directories of the companions' and
/// relays' records go, those that are empty, and then the state directory itself.
fn remove_state_dir_if_unused(dir: &Dir) {
    let names = dir.names().unwrap_or_default();
    if names
        .iter()
        .any(|n| n.ends_with(".json") || n.ends_with(".lock"))
    {
        return;
    }
    for name in &names {
        let _ = dir.remove_dir(name);
    }
    if let Some(parent) = Path::new(STATE_DIR).parent()
        && let Ok(parent) = Dir::open(parent)
    {
        let _ = parent.remove_dir("wg-namespace");
    }
}

/// [`remove_state_dir_if_unused`] for whoever removed records of their own after `down`.
pub fn tidy_state_dir() {
    if let Ok(dir) = Dir::open(Path::new(STATE_DIR)) {
        remove_state_dir_if_unused(&dir);
    }
}

/// The bytes of the state file of `namespace`; `None` when there is none.
fn read_record(namespace: &str) -> Result<Option<Vec<u8>>> {
    let Some(dir) = state_dir(false)? else {
        return Ok(None);
    };
    Ok(dir.read(&state_name(namespace), files::STATE_LIMIT)?)
}

/// The record in `text`, checked to be a state file of this format for `namespace`.
fn parse_record(namespace: &str, text: &[u8]) -> Result<State> {
    let path = state_path(namespace);
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let not_ours = || format!("{} is not a wg-namespace state file", path.display());
    let version: Version = serde_json::from_slice(text).with_context(not_ours)?;
    if version.version != FORMAT_VERSION {
        bail!(
            "{} has format version {}, this wg-namespace reads version {FORMAT_VERSION}",
            path.display(),
            version.version
        );
    }
    let state: State = serde_json::from_slice(text).with_context(not_ours)?;
    if state.namespace != namespace {
        bail!(
            "{} records namespace {:?}, not {namespace:?}; left alone",
            path.display(),
            state.namespace
        );
    }
    Ok(state)
}

/// [`State::load`] for a reader that asks again and again (the companion, per scrape): the
/// file is read every time, and parsed again only when its bytes differ from the last ones.
/// Parsing (with the recorded ruleset's bytes) is most of what a load costs; comparing the
/// bytes is what keeps the answer exactly what the file says now.
#[derive(Debug)]
pub struct StateReader {
    namespace: String,
    last: Option<(Vec<u8>, std::sync::Arc<State>)>,
}

impl StateReader {
    pub fn new(namespace: &str) -> StateReader {
        StateReader {
            namespace: namespace.to_string(),
            last: None,
        }
    }

    pub fn load(&mut self) -> Result<Option<std::sync::Arc<State>>> {
        let Some(text) = read_record(&self.namespace)? else {
            self.last = None;
            return Ok(None);
        };
        if let Some((bytes, state)) = &self.last
            && *bytes == text
        {
            return Ok(Some(state.clone()));
        }
        self.last = None;
        let state = std::sync::Arc::new(parse_record(&self.namespace, &text)?);
        self.last = Some((text, state.clone()));
        Ok(Some(state))
    }
}

#[cfg(test)]
mod tests {
    use super::{Undone, stop_process};
    use crate::system::process::ProcessId;

    #[test]
    fn pid_1_is_never_signalled_whatever_the_record_says() {
        let Some(init) = ProcessId::of(1) else {
            return;
        };
        // Even a record that matches init's start time and program leaves it alone.
        let executables = init.executable().into_iter().collect::<Vec<_>>();
        let undone = stop_process(&init, &executables, |_| true, "daemon", super::Stop::Now)
            .expect("no error");
        assert!(matches!(undone, Undone::LeftAlone(_)), "{undone:?}");
        let zero = ProcessId {
            pid: 0,
            start_time: 0,
        };
        let undone =
            stop_process(&zero, &[], |_| true, "daemon", super::Stop::Now).expect("no error");
        assert!(matches!(undone, Undone::LeftAlone(_)), "{undone:?}");
    }
}
