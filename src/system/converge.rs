//! The one way a live namespace changes: `reload` and `heal` (failover and refresh make their
//! one-peer changes through the same [`wireguard::DeviceChange`]) compare what the config wants with what the state file records and what the
//! system shows, and make the smallest set of in-place [`Change`]s.
//!
//! The namespace, its leak guard and the processes inside are never taken away: the ruleset is
//! replaced in one nft transaction (the rendered file starts with `flush ruleset`), the device's
//! peers change in one request that names only the peers that change, and a WireGuard
//! interface that is gone is made again inside the existing namespace.
//!
//! Crash safety follows `up`: whatever a change creates is on record in the state file before
//! it exists, and every change is idempotent, so after a `kill -9` anywhere another `reload` or
//! `heal` finishes the work and `down` removes everything.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::config::{BackendChoice, Cidr, Config, Key};
use crate::render::{self, Rendered};
use crate::system::link::{Link, Netlink};
use crate::system::relays::{self, Entry};
use crate::system::state::{
    Event, FailoverRecord, HEALS_KEPT, Journal, LinkKind, Lock, PeerRecord, Phase,
    PortForwardingRecord, PublishRecord, Resource, ServerRecord, State, Undone,
};
use crate::system::wireguard::{self, Backend, DeviceChange, DeviceView, PeerSettings, Prepared};
use crate::system::{dns, firewall, netns};

/// How long `reload` and `heal` wait for another run on the same namespace.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// A handshake older than this (WireGuard rekeys every 120 s while traffic flows, plus its
/// retry slack) means the peer needs a nudge.
pub const HANDSHAKE_OVERDUE: Duration = Duration::from_secs(135);
/// The discard port: where the nudge that starts a handshake is sent, through the tunnel.
const DISCARD_PORT: u16 = 9;
/// Upper bound for reading the namespace's small files back.
const MAX_FILE: u64 = 64 * 1024;

/// The change cannot be made in place; the namespace has to be brought down and up again.
#[derive(Debug)]
pub struct NeedsRestart(pub String);

impl fmt::Display for NeedsRestart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NeedsRestart {}

fn needs_restart(message: String) -> anyhow::Error {
    anyhow::Error::new(NeedsRestart(message))
}

/// What the config asks for, with key files read, names resolved and files rendered.
pub struct Desired {
    pub config: Config,
    pub prepared: Prepared,
    pub rendered: Rendered,
}

impl Desired {
    /// Reads and resolves everything first; nothing on the system is touched. A name that does
    /// not resolve falls back to its last good address, or leaves the device's as it is.
    pub fn prepare(config: &Config) -> Result<Desired> {
        let prepared = wireguard::prepare(config, wireguard::Unresolved::CacheOrKeep)?;
        let rendered = render::render(config)?;
        for warning in &prepared.warnings {
            eprintln!("warning: {warning}");
        }
        Ok(Desired {
            config: config.clone(),
            prepared,
            rendered,
        })
    }
}

/// Why a run is made: `reload` applies a config, `heal` repairs what went missing and also
/// re-resolves names and nudges overdue handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Reload,
    Heal,
}

/// The live namespace, as far as a plan needs it.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The leak guard is loaded and is the one recorded when it was loaded (see
    /// [`firewall::judge`]).
    pub guard_intact: bool,
    pub policy_loaded: bool,
    pub resolv_conf: Option<String>,
    pub nsswitch_conf: Option<String>,
    pub hosts: Option<String>,
    /// None when the kernel has no IPv6.
    pub ipv6_disabled: Option<bool>,
    pub link: Option<Link>,
    /// The userspace daemon on record is running (true when there is none).
    pub daemon_alive: bool,
    /// None when the device cannot be read.
    pub device: Option<DeviceView>,
    pub addresses: Vec<Cidr>,
    /// Routes through the interface that we made (not the kernel's prefix routes).
    pub routes: Vec<Cidr>,
    /// The relays on record, and whether each still runs.
    pub relays: Vec<(Entry, bool)>,
    /// A relay of every published port at once, as older versions started it.
    pub legacy_relay: bool,
}

/// One in-place step. The order of a plan is the order in which they are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Load the rendered ruleset in one transaction.
    Ruleset,
    /// Replace resolv.conf, nsswitch.conf and hosts (each by an atomic rename).
    EtcFiles,
    /// Set the configured MTU on the WireGuard interface.
    Mtu(u16),
    Ipv6 {
        enable: bool,
    },
    /// Make the WireGuard interface (and its daemon) again inside the namespace, configured.
    Interface,
    LinkUp,
    Peers(DeviceChange),
    Addresses {
        add: Vec<Cidr>,
        remove: Vec<Cidr>,
    },
    Routes {
        add: Vec<Cidr>,
        remove: Vec<Cidr>,
    },
    /// Stop the relays of entries no longer configured (or dead), start those missing. A relay
    /// whose entry is unchanged keeps running, with its sessions.
    Relays {
        stop: Vec<Entry>,
        start: Vec<Entry>,
        /// Also stop the all-ports relay of an older version.
        legacy: bool,
    },
    /// Start a new session with each of these peers now: the peer is replaced by itself (see
    /// [`wireguard::rehandshake`]) and one datagram is sent through the tunnel to it.
    Rehandshake(Vec<Key>),
}

impl Change {
    /// The name the pause hook and messages use.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Ruleset => "ruleset",
            Change::EtcFiles => "etc",
            Change::Mtu(_) => "mtu",
            Change::Ipv6 { .. } => "ipv6",
            Change::Interface => "interface",
            Change::LinkUp => "link-up",
            Change::Peers(_) => "peers",
            Change::Addresses { .. } => "addresses",
            Change::Routes { .. } => "routes",
            Change::Relays { .. } => "relay",
            Change::Rehandshake(_) => "rehandshake",
        }
    }

    /// One line for logs, `status` and the state file. Never shows a key's secret.
    pub fn describe(&self) -> String {
        let list = |items: &[Cidr]| {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let both = |what: &str, add: &[Cidr], remove: &[Cidr]| {
            let mut parts = Vec::new();
            if !add.is_empty() {
                parts.push(format!("+{}", list(add)));
            }
            if !remove.is_empty() {
                parts.push(format!("-{}", list(remove)));
            }
            format!("{what} {}", parts.join(" "))
        };
        match self {
            Change::Ruleset => "ruleset reloaded".into(),
            Change::EtcFiles => "resolv.conf, nsswitch.conf and hosts rewritten".into(),
            Change::Mtu(mtu) => format!("MTU set to {mtu}"),
            Change::Ipv6 { enable: true } => "IPv6 enabled".into(),
            Change::Ipv6 { enable: false } => "IPv6 disabled".into(),
            Change::Interface => "WireGuard interface recreated".into(),
            Change::LinkUp => "WireGuard interface set up".into(),
            Change::Peers(change) => {
                let mut parts = Vec::new();
                if change.private_key.is_some() {
                    parts.push("new private key".to_string());
                }
                for key in &change.remove {
                    parts.push(format!("-{}", key.to_base64()));
                }
                for peer in &change.peers {
                    parts.push(format!("~{}", peer.public_key.to_base64()));
                }
                format!("peers {}", parts.join(" "))
            }
            Change::Addresses { add, remove } => both("addresses", add, remove),
            Change::Routes { add, remove } => both("routes", add, remove),
            Change::Relays {
                stop,
                start,
                legacy,
            } => {
                let mut parts: Vec<String> = stop.iter().map(|e| format!("-{e}")).collect();
                parts.extend(start.iter().map(|e| format!("+{e}")));
                if *legacy {
                    parts.push("-the relay of all published ports".into());
                }
                format!("relays {}", parts.join("; "))
            }
            Change::Rehandshake(keys) => format!(
                "handshake started with {}",
                keys.iter()
                    .map(Key::to_base64)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

/// The prefixes routed into the tunnel: every peer's allowed IPs (host bits cleared), IPv6
/// ones only when the interface has an IPv6 address (the kernel refuses them otherwise).
pub fn routes_for(config: &Config) -> Vec<Cidr> {
    let mut seen = BTreeSet::new();
    config
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().map(Cidr::network))
        .filter(|prefix| config.ipv6_enabled() || !prefix.is_ipv6())
        .filter(|prefix| seen.insert((prefix.addr, prefix.prefix)))
        .collect()
}

fn publish_records(config: &Config) -> Vec<PublishRecord> {
    config
        .publish_ports
        .iter()
        .map(|p| PublishRecord {
            protocol: p.protocol,
            host_address: p.host_address,
            host_port: p.host_port,
            namespace_port: p.namespace_port,
        })
        .collect()
}

/// What the state records of each configured peer. A failover already made for a peer that is
/// configured as before (same endpoint, same alternatives) stays on record; one for a changed
/// peer goes, as the peer is configured anew.
fn peer_records(config: &Config, before: &[PeerRecord]) -> Vec<PeerRecord> {
    config
        .peers
        .iter()
        .map(|p| {
            let mut record = PeerRecord {
                public_key: p.public_key_text.clone(),
                endpoint: p.endpoint.as_ref().map(ToString::to_string),
                alternatives: p
                    .alternatives
                    .iter()
                    .map(|a| ServerRecord {
                        public_key: a.public_key_text.clone(),
                        endpoint: a.endpoint.to_string(),
                    })
                    .collect(),
                failover: None,
            };
            record.failover = standing_failover(&record, before);
            record
        })
        .collect()
}

/// The failover on record for the peer `wanted` describes, when the peer is unchanged and an
/// alternative stands in for it.
fn standing_failover(wanted: &PeerRecord, before: &[PeerRecord]) -> Option<FailoverRecord> {
    let recorded = before.iter().find(|r| r.public_key == wanted.public_key)?;
    let unchanged =
        recorded.endpoint == wanted.endpoint && recorded.alternatives == wanted.alternatives;
    recorded
        .failover
        .clone()
        .filter(|f| unchanged && f.active != 0)
}

/// Writes what `up` and a finished `reload` know about the config into the state.
pub fn record_config(state: &mut State, config: &Config) {
    state.dns_server = config.dns_server;
    state.dns_servers = config.dns_servers.clone();
    state.strict_dns = config.strict_dns;
    state.ipv6 = config.ipv6_enabled();
    state.peers = peer_records(config, &state.peers);
    state.publish_ports = publish_records(config);
    state.userspace_command = Some(config.userspace_command.clone());
    state.port_forwarding = config
        .port_forwarding
        .as_ref()
        .map(|f| PortForwardingRecord {
            gateway: f.gateway,
            protocols: f.protocols.clone(),
        });
    state.allowed_users = config.allowed_users.clone();
    state.allowed_groups = config.allowed_groups.clone();
}

/// Whether a running namespace built with `recorded` can take `wanted` in place.
pub fn backend_fits(wanted: BackendChoice, recorded: Backend) -> bool {
    matches!(
        (wanted, recorded),
        (BackendChoice::Auto, _)
            | (BackendChoice::Kernel, Backend::Kernel)
            | (BackendChoice::Userspace, Backend::Userspace)
    )
}

/// The smallest set of changes that brings `observed` (as `state` records it) to `desired`.
pub fn plan(
    state: &State,
    desired: &Desired,
    observed: &Observed,
    mode: Mode,
    now: SystemTime,
) -> Vec<Change> {
    let config = &desired.config;
    let rendered = &desired.rendered;
    let mut changes = Vec::new();

    let ruleset_changed = state.ruleset_digest.as_deref() != Some(&rendered.ruleset_digest);
    if ruleset_changed || !observed.guard_intact || !observed.policy_loaded {
        changes.push(Change::Ruleset);
    }
    if observed.resolv_conf.as_deref() != Some(&rendered.resolv_conf)
        || observed.nsswitch_conf.as_deref() != Some(&rendered.nsswitch_conf)
        || observed.hosts.as_deref() != Some(&rendered.hosts)
    {
        changes.push(Change::EtcFiles);
    }
    let want_ipv6 = config.ipv6_enabled();
    if observed.ipv6_disabled == Some(want_ipv6) {
        changes.push(Change::Ipv6 { enable: want_ipv6 });
    }

    let command_changed = state
        .userspace_command
        .as_ref()
        .is_some_and(|recorded| *recorded != config.userspace_command)
        && state.backend == Some(Backend::Userspace);
    let recreate = observed.link.is_none()
        || !observed.daemon_alive
        || observed.device.is_none()
        || command_changed;
    let nothing = DeviceView::default();
    let (device, addresses, routes): (&DeviceView, &[Cidr], &[Cidr]) = if recreate {
        changes.push(Change::Interface);
        (&nothing, &[], &[])
    } else {
        if observed.link.as_ref().is_some_and(|l| !l.up) {
            changes.push(Change::LinkUp);
        }
        // Only a configured MTU is enforced; without one the backend's choice stands.
        if let Some(mtu) = config.mtu
            && observed
                .link
                .as_ref()
                .is_some_and(|l| l.mtu != Some(u32::from(mtu)))
        {
            changes.push(Change::Mtu(mtu));
        }
        let device = observed.device.as_ref().unwrap_or(&nothing);
        let change = peer_change(state, desired, device, mode);
        if change != DeviceChange::default() {
            changes.push(Change::Peers(change));
        }
        (
            observed.device.as_ref().unwrap_or(&nothing),
            &observed.addresses,
            &observed.routes,
        )
    };

    let (add, remove) = difference(&config.ips, addresses);
    if !add.is_empty() || !remove.is_empty() {
        changes.push(Change::Addresses { add, remove });
    }
    let (add, remove) = difference(&routes_for(config), routes);
    if !add.is_empty() || !remove.is_empty() {
        changes.push(Change::Routes { add, remove });
    }

    let wanted = relays::entries(config);
    let stop: Vec<Entry> = observed
        .relays
        .iter()
        .filter(|(entry, alive)| !alive || !wanted.contains(entry))
        .map(|(entry, _)| *entry)
        .collect();
    let start: Vec<Entry> = wanted
        .into_iter()
        .filter(|entry| {
            !observed
                .relays
                .iter()
                .any(|(running, alive)| *alive && running == entry)
        })
        .collect();
    if !stop.is_empty() || !start.is_empty() || observed.legacy_relay {
        changes.push(Change::Relays {
            stop,
            start,
            legacy: observed.legacy_relay,
        });
    }

    if mode == Mode::Heal {
        // The key on the device for each peer: a new device holds every peer's own.
        let standing = if recreate {
            vec![None; desired.prepared.peers.len()]
        } else {
            standing_alternatives(state, desired, device)
        };
        let overdue: Vec<Key> = desired
            .prepared
            .peers
            .iter()
            .zip(standing)
            .map(|(p, active)| (p, active.unwrap_or_else(|| p.public_key.clone())))
            .filter(|(p, key)| p.endpoint.is_some() || device_endpoint(device, key).is_some())
            .filter(|(_, key)| {
                recreate
                    || device
                        .peers
                        .iter()
                        .find(|d| d.public_key == *key)
                        .and_then(|d| d.last_handshake)
                        .and_then(|t| now.duration_since(t).ok())
                        .is_none_or(|age| age > HANDSHAKE_OVERDUE)
            })
            .map(|(_, key)| key)
            .collect();
        if !overdue.is_empty() {
            changes.push(Change::Rehandshake(overdue));
        }
    }
    changes
}

/// Per configured peer, the key of the alternative that stands in for it on the device (see
/// [`standing_failover`]), if one does.
fn standing_alternatives(
    state: &State,
    desired: &Desired,
    device: &DeviceView,
) -> Vec<Option<Key>> {
    peer_records(&desired.config, &state.peers)
        .iter()
        .map(|record| {
            record
                .failover
                .as_ref()
                .and_then(|f| Key::from_base64(&f.active_public_key))
                .filter(|active| device.peers.iter().any(|d| d.public_key == *active))
        })
        .collect()
}

fn device_endpoint(device: &DeviceView, key: &Key) -> Option<SocketAddr> {
    device
        .peers
        .iter()
        .find(|d| d.public_key == *key)
        .and_then(|d| d.endpoint)
}

/// What is in `want` and not in `have`, and what is in `have` and not in `want`.
fn difference(want: &[Cidr], have: &[Cidr]) -> (Vec<Cidr>, Vec<Cidr>) {
    let add = want.iter().filter(|c| !have.contains(c)).copied().collect();
    let remove = have.iter().filter(|c| !want.contains(c)).copied().collect();
    (add, remove)
}

/// The device change that makes the device's peers those of the config. It names only the
/// peers that are added, removed or differ; a peer set anew with its own values keeps its
/// session, so the handshakes of all other peers (and of a changed one) stay.
fn peer_change(state: &State, desired: &Desired, device: &DeviceView, mode: Mode) -> DeviceChange {
    let mut change = DeviceChange::default();
    let private = &desired.prepared.private_key;
    if device.public_key != Some(wireguard::public_key_of(private)) {
        change.private_key = Some(private.clone());
    }
    let sorted = |ips: &[Cidr]| {
        let mut ips: Vec<Cidr> = ips.iter().map(Cidr::network).collect();
        ips.sort_by_key(|c| (c.addr, c.prefix));
        ips.dedup();
        ips
    };
    // Keys that belong on the device: each peer's own, or that of the alternative standing in
    // for it (refresh's failover), which is then left alone.
    let mut wanted: Vec<Key> = Vec::new();
    let standing = standing_alternatives(state, desired, device);
    for (prepared, active) in desired.prepared.peers.iter().zip(standing) {
        if let Some(active) = active {
            wanted.push(active);
            continue;
        }
        wanted.push(prepared.public_key.clone());
        let peer = &prepared.peer;
        let keepalive = peer.persistent_keepalive.filter(|&k| k != 0);
        // Zero turns a preshared key or the keepalive off, in the kernel and over UAPI alike.
        let settings = |endpoint| PeerSettings {
            public_key: prepared.public_key.clone(),
            preshared_key: Some(prepared.preshared_key.clone().unwrap_or(Key([0; 32]))),
            endpoint,
            persistent_keepalive: Some(keepalive.unwrap_or(0)),
            allowed_ips: peer.allowed_ips.clone(),
        };
        let Some(current) = device
            .peers
            .iter()
            .find(|d| d.public_key == prepared.public_key)
        else {
            change.peers.push(settings(prepared.endpoint));
            continue;
        };
        let mut endpoint = None;
        if let Some(address) = prepared.endpoint.filter(|a| current.endpoint != Some(*a)) {
            let configured = peer.endpoint.as_ref().map(ToString::to_string);
            let recorded = state
                .peers
                .iter()
                .find(|r| r.public_key == peer.public_key_text)
                .and_then(|r| r.endpoint.clone());
            let is_name = peer
                .endpoint
                .as_ref()
                .is_some_and(|e| matches!(e.host, crate::config::EndpointHost::Name(_)));
            // A peer that roamed keeps its new address unless the config changed it; a name
            // follows its resolution when healing, as `refresh` does.
            if current.endpoint.is_none()
                || configured != recorded
                || (mode == Mode::Heal && is_name)
            {
                endpoint = Some(address);
            }
        }
        let differs = current.preshared_key != prepared.preshared_key
            || current.keepalive != keepalive
            || sorted(&current.allowed_ips) != sorted(&peer.allowed_ips)
            || endpoint.is_some();
        if differs {
            change.peers.push(settings(endpoint));
        }
    }
    change.remove = device
        .peers
        .iter()
        .filter(|d| !wanted.contains(&d.public_key))
        .map(|d| d.public_key.clone())
        .collect();
    change
}

/// Loads the rendered ruleset into the namespace and records its digest and the leak guard as
/// the kernel holds it.
pub fn load_ruleset(fd: &OwnedFd, rendered: &Rendered, state: &mut State) -> Result<()> {
    firewall::load(fd, &rendered.ruleset)?;
    state.ruleset_digest = Some(rendered.ruleset_digest.clone());
    state.leak_guard = Some(firewall::guard_record(fd)?);
    Ok(())
}

/// Makes the WireGuard link with the backend `choice` allows, its UDP socket in the host
/// namespace: a kernel link is born inside the namespace; a userspace daemon makes its link in
/// the host namespace and [`place_interface`] moves it in. The record covers the link (and the
/// daemon) before they exist.
pub fn create_interface(
    config: &Config,
    choice: BackendChoice,
    host: &Netlink,
    ns_fd: &OwnedFd,
    journal: &mut Journal,
) -> Result<Backend> {
    let interface = config.interface();
    let link = |born_inside: bool, link_kind| Resource::Link {
        name: interface.into(),
        namespace: config.namespace.clone(),
        moved: born_inside,
        index: None,
        link_kind,
    };
    if choice == BackendChoice::Userspace {
        // The daemon makes the link; the record covers it from the start.
        journal.record(link(false, LinkKind::Tun))?;
    } else {
        let made = journal.create(link(true, LinkKind::Wireguard), || {
            host.add_wireguard_in(interface, ns_fd)
                .map_err(anyhow::Error::from)
        });
        let error = match made {
            Ok(()) => {
                let index = Netlink::inside(ns_fd)?
                    .index_of(interface)?
                    .context("the WireGuard link vanished right after creation")?;
                journal.link_at(Some(index), true)?;
                return Ok(Backend::Kernel);
            }
            Err(e) => e,
        };
        let unsupported = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(wireguard::is_unsupported);
        match choice {
            BackendChoice::Auto if unsupported => {
                // The failed attempt made nothing; the userspace link gets its own record.
                journal.forget_last()?;
                journal.record(link(false, LinkKind::Tun))?;
            }
            _ if unsupported => {
                bail!(
                    "the kernel has no WireGuard support (backend \"kernel\" was asked for): {error}"
                )
            }
            _ => return Err(error.context("creating the WireGuard link")),
        }
    }
    // A daemon serving an interface of this name elsewhere (another namespace) holds the
    // socket: ours could not listen there, and nothing of ours may go to that one.
    if wireguard::socket_answers(interface) {
        bail!(
            "{} is served by a WireGuard daemon wg-namespace did not start (an interface named \
             {interface} elsewhere?); stop it or choose another namespace_name",
            wireguard::uapi_socket(interface).display()
        );
    }
    wireguard::remove_stale_socket(interface);
    let (command, program) = daemon_command(&config.userspace_command, &journal.state)
        .with_context(|| {
            format!(
                "starting the userspace WireGuard daemon ({})",
                config.userspace_command.join(" ")
            )
        })?;
    let daemon = wireguard::spawn_daemon(&command, interface)?;
    crate::system::pause_point("daemon-unrecorded");
    let process = daemon.process;
    journal.state.userspace_program = Some(program);
    journal.record(Resource::Daemon {
        process,
        executables: daemon.executables.clone(),
        interface: interface.into(),
    })?;
    daemon.release()?;
    wireguard::wait_for_daemon(process, &command, interface, host)?;
    let executable = process.executable();
    let index = host
        .index_of(interface)?
        .context("the WireGuard daemon's link disappeared")?;
    journal.daemon_started(executable, index)?;
    Ok(Backend::Userspace)
}

/// The daemon's command with its program as a path, and that path: the file the same command
/// started last time (so that `heal` from a unit whose PATH lacks it starts the same daemon),
/// else what PATH finds now. The state file is untrusted input: the recorded file is run only
/// when it has the program's name and only root can change it or the directories above it
/// (the path is the daemon's `/proc/<pid>/exe`: absolute, without links).
fn daemon_command(command: &[String], state: &State) -> Result<(Vec<String>, PathBuf)> {
    let (program, args) = command.split_first().context("userspaceCommand is empty")?;
    let recorded = state.userspace_program.as_ref().filter(|path| {
        state.userspace_command.as_deref() == Some(command)
            && path.file_name() == std::path::Path::new(program).file_name()
            && crate::system::process::runnable(path)
            && crate::system::process::only_root_can_change(path)
    });
    let path = match recorded {
        Some(path) => path.clone(),
        None => crate::system::process::find_program(program)?,
    };
    let text = path
        .to_str()
        .with_context(|| format!("{} is not a UTF-8 path", path.display()))?;
    let argv = std::iter::once(text.to_string())
        .chain(args.iter().cloned())
        .collect();
    Ok((argv, path))
}

/// Sets the private key and all peers of a new device.
pub fn configure_device(
    interface: &str,
    backend: Backend,
    ns_fd: &OwnedFd,
    prepared: &Prepared,
) -> Result<()> {
    match backend {
        // The kernel's configuration interface answers in the namespace the link is in.
        Backend::Kernel => {
            netns::within(ns_fd, || wireguard::configure(interface, backend, prepared))?
        }
        Backend::Userspace => wireguard::configure(interface, backend, prepared),
    }
}

/// Brings the configured link into the namespace (a userspace daemon's is moved in from the
/// host) and sets it up; returns its index inside.
pub fn place_interface(
    interface: &str,
    mtu: Option<u16>,
    backend: Backend,
    host: &Netlink,
    ns_fd: &OwnedFd,
    inner: &Netlink,
    journal: &mut Journal,
) -> Result<u32> {
    if backend == Backend::Userspace {
        let index = host
            .index_of(interface)?
            .context("the WireGuard link disappeared")?;
        host.move_to(index, ns_fd)?;
        crate::system::pause_point("move-unrecorded");
        // Until the new index is on record, the one from the host stands: the kernel keeps an
        // index across a move when it is free in the new namespace, as in ours.
        journal.link_at(Some(index), true)?;
        // A daemon that opens its interface by name again after this point makes a twin here,
        // which would take part of the tunnel's traffic. Better no tunnel than that.
        if host.index_of(interface)?.is_some() {
            bail!(
                "the WireGuard daemon made a second {interface} link in the host namespace \
                 after the first was moved; it must open all its queues at start"
            );
        }
    }
    let index = inner
        .index_of(interface)?
        .context("the WireGuard link did not arrive in the namespace")?;
    journal.link_at(Some(index), true)?;
    if let Some(mtu) = mtu {
        inner.set_mtu(index, mtu)?;
    }
    inner.set_up(index)?;
    Ok(index)
}

/// Undoes the recorded resources `which` selects and takes them off the record; what is not
/// provably ours any more only goes off the record.
fn undo_recorded(journal: &mut Journal, which: impl Fn(&Resource) -> bool) -> Result<()> {
    let scope = journal.state.scope();
    for resource in journal.state.resources.iter().filter(|r| which(r)) {
        if let Undone::LeftAlone(why) = resource.undo(&scope)? {
            eprintln!("warning: {why}; left alone");
        }
    }
    journal.forget(which)
}

/// Reads a small file whole, or None when it is missing, unreadable, not a regular file (a FIFO
/// would block) or larger than [`MAX_FILE`].
fn read_small(path: &std::path::Path) -> Option<String> {
    crate::system::files::read_text(path, MAX_FILE).ok()
}

/// A namespace that is up, locked for one `reload` or `heal`.
pub struct Session {
    journal: Journal,
    /// The record as it was read, so that a commit that changes nothing writes nothing.
    loaded: State,
    _lock: Lock,
    fd: OwnedFd,
    inner: Netlink,
    backend: Backend,
}

impl Session {
    /// Locks `namespace` and loads its record. A namespace that is not (fully) up, or whose
    /// network namespace is gone, cannot be changed in place: [`NeedsRestart`].
    pub fn open(namespace: &str) -> Result<Session> {
        let lock = Lock::acquire(namespace, LOCK_TIMEOUT)?;
        let state = match State::load(namespace)? {
            Some(state) if state.phase == Phase::Up => state,
            Some(_) => {
                return Err(needs_restart(format!(
                    "namespace {namespace:?} is half-built (an interrupted `up`); bring it up again"
                )));
            }
            None => {
                lock.remove();
                return Err(needs_restart(format!("namespace {namespace:?} is not up")));
            }
        };
        // Only the namespace `up` made: one made under the same name since is someone else's.
        let fd = state.open_netns().ok_or_else(|| {
            needs_restart(format!(
                "the network namespace {namespace:?} is gone or is not the one wg-namespace made"
            ))
        })?;
        let backend = state.backend.context("the state file names no backend")?;
        let inner = Netlink::inside(&fd)?;
        Ok(Session {
            loaded: state.clone(),
            journal: Journal { state },
            _lock: lock,
            fd,
            inner,
            backend,
        })
    }

    pub fn state(&self) -> &State {
        &self.journal.state
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Looks at the live namespace.
    pub fn observe(&self, desired: &Desired) -> Result<Observed> {
        let interface = desired.config.interface();
        let state = &self.journal.state;
        let dir = dns::dir(&state.namespace);
        let ipv6_disabled = netns::within(&self.fd, || {
            read_small(std::path::Path::new(
                "/proc/sys/net/ipv6/conf/all/disable_ipv6",
            ))
        })?
        .map(|v| v.trim() == "1");
        let link = self
            .inner
            .links()?
            .into_iter()
            .find(|l| l.name == interface);
        let daemon_alive = state.resources.iter().all(|r| match r {
            Resource::Daemon { process, .. } => process.is_alive() && !process.is_stopped(),
            _ => true,
        });
        let relays = state
            .resources
            .iter()
            .filter_map(|r| match r {
                // A stopped relay holds its port and answers nothing: it is replaced.
                Resource::Relay { process, entry, .. } => {
                    Some((*entry, process.is_alive() && !process.is_stopped()))
                }
                _ => None,
            })
            .collect();
        let legacy_relay = state
            .resources
            .iter()
            .any(|r| matches!(r, Resource::Publisher { .. }));
        let firewall = firewall::judge(&self.fd, state.leak_guard.as_ref())?;
        let mut observed = Observed {
            guard_intact: firewall.differences.is_empty(),
            policy_loaded: firewall.policy_loaded,
            resolv_conf: read_small(&dir.join("resolv.conf")),
            nsswitch_conf: read_small(&dir.join("nsswitch.conf")),
            hosts: read_small(&dir.join("hosts")),
            ipv6_disabled,
            link: link.clone(),
            daemon_alive,
            device: None,
            addresses: Vec::new(),
            routes: Vec::new(),
            relays,
            legacy_relay,
        };
        if let (Some(link), true) = (link, daemon_alive) {
            observed.device = wireguard::show(interface, self.backend, &self.fd)
                .ok()
                .map(|d| DeviceView::of(&d));
            observed.addresses = self
                .inner
                .addresses(link.index)?
                .into_iter()
                .filter(|a| !is_link_local(a.addr))
                .collect();
            observed.routes = self
                .inner
                .routes()?
                .into_iter()
                .filter(|r| r.interface == link.index && !r.kernel)
                .map(|r| r.destination.network())
                .collect();
        }
        Ok(observed)
    }

    /// Makes `changes` in order. Each is announced on stderr before it is made.
    pub fn apply(&mut self, desired: &Desired, changes: &[Change]) -> Result<()> {
        for change in changes {
            crate::system::pause_point(change.name());
            eprintln!("wg-namespace: {}", change.describe());
            self.apply_one(desired, change)
                .with_context(|| change.describe())?;
        }
        Ok(())
    }

    fn apply_one(&mut self, desired: &Desired, change: &Change) -> Result<()> {
        let config = &desired.config;
        let interface = config.interface();
        let index = || -> Result<u32> {
            self.inner
                .index_of(interface)?
                .context("the WireGuard interface is gone")
        };
        match change {
            Change::Ruleset => {
                load_ruleset(&self.fd, &desired.rendered, &mut self.journal.state)?;
                self.journal.state.save()
            }
            Change::EtcFiles => dns::install(&config.namespace, &desired.rendered),
            Change::Ipv6 { enable } => netns::within(&self.fd, || {
                let value = if *enable { "0" } else { "1" };
                for scope in ["all", "default"] {
                    netns::write_sysctl(&format!("net/ipv6/conf/{scope}/disable_ipv6"), value)?;
                }
                Ok(())
            })?,
            Change::Interface => self.recreate_interface(desired),
            Change::LinkUp => self.inner.set_up(index()?),
            Change::Mtu(mtu) => self.inner.set_mtu(index()?, *mtu),
            Change::Peers(delta) => wireguard::apply(interface, self.backend, &self.fd, delta)
                .map_err(anyhow::Error::from),
            Change::Addresses { add, remove } => {
                let index = index()?;
                self.inner.add_addresses(index, add)?;
                self.inner.delete_addresses(index, remove)
            }
            Change::Routes { add, remove } => {
                let index = index()?;
                self.inner.add_routes(index, add)?;
                self.inner.delete_routes(index, remove)
            }
            Change::Relays {
                stop,
                start,
                legacy,
            } => {
                undo_recorded(&mut self.journal, |r| match r {
                    Resource::Relay { entry, .. } => stop.contains(entry),
                    Resource::Publisher { .. } => *legacy,
                    _ => false,
                })?;
                let journal = &mut self.journal;
                for entry in start {
                    relays::start(entry, &config.namespace, self.fd.as_fd(), &mut |r| {
                        journal.record(r)
                    })?;
                }
                Ok(())
            }
            Change::Rehandshake(keys) => {
                for key in keys {
                    // A session the server dropped would otherwise be used until WireGuard's
                    // timers give up on it; without keepalive nothing would be sent at once.
                    wireguard::rehandshake(interface, self.backend, &self.fd, key, None)?;
                    if let Some(target) = nudge_target(config, key)
                        && let Err(e) = netns::within(&self.fd, || nudge(target))?
                    {
                        eprintln!("warning: cannot send through the tunnel to {target}: {e}");
                    }
                }
                Ok(())
            }
        }
    }

    /// The interface (or its daemon) is gone, or the daemon's command changed: what is left of
    /// the old one goes, and a new one is made and configured in the host namespace and moved
    /// in, as `up` does. The namespace and everything else in it stay.
    fn recreate_interface(&mut self, desired: &Desired) -> Result<()> {
        let config = &desired.config;
        let interface = config.interface();
        // What is left of the old interface goes first, with its record: its daemon, and a
        // link that lost its daemon. The record of the new one is made as `up` makes it.
        undo_recorded(&mut self.journal, |r| {
            matches!(r, Resource::Daemon { .. } | Resource::Link { .. })
        })?;
        if let Some(index) = self.inner.index_of(interface)? {
            self.inner.delete(index)?;
        }
        let host = Netlink::here()?;
        if host.index_of(interface)?.is_some() {
            bail!(
                "a link named {interface:?} exists in the host namespace, so the interface cannot \
                 be made again"
            );
        }
        let choice = match self.backend {
            Backend::Kernel => BackendChoice::Kernel,
            Backend::Userspace => BackendChoice::Userspace,
        };
        let backend = create_interface(config, choice, &host, &self.fd, &mut self.journal)?;
        configure_device(interface, backend, &self.fd, &desired.prepared)?;
        place_interface(
            interface,
            config.mtu,
            backend,
            &host,
            &self.fd,
            &self.inner,
            &mut self.journal,
        )?;
        Ok(())
    }

    /// Records the config as applied and what was done, and releases the namespace.
    pub fn commit(
        mut self,
        desired: &Desired,
        config_path: Option<&std::path::Path>,
        mode: Mode,
        changes: &[Change],
    ) -> Result<()> {
        let state = &mut self.journal.state;
        record_config(state, &desired.config);
        if changes.contains(&Change::Interface) {
            // The new device was configured with every peer's own server.
            for peer in &mut state.peers {
                peer.failover = None;
            }
        }
        if let Some(path) = config_path {
            state.config_path =
                Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
        }
        let event = Event {
            at: crate::system::state::now_secs(),
            changes: changes.iter().map(Change::describe).collect(),
        };
        match mode {
            Mode::Reload => {
                state.last_reload = Some(event);
                state.reloads_total += 1;
            }
            Mode::Heal if !changes.is_empty() => {
                state.heals.push(event);
                state.heals_total += 1;
                let excess = state.heals.len().saturating_sub(HEALS_KEPT);
                state.heals.drain(..excess);
            }
            Mode::Heal => {}
        }
        // `heal` with nothing to repair, every health tick: rewriting the same record would
        // cost a sync (a journal commit with everything else pending on a disk-backed /run,
        // which grows with the number of namespaces) and wake the companions that watch it.
        if *state == self.loaded {
            return Ok(());
        }
        state.save()
    }

    /// Whether the interface is there and its device answers: what `heal` checks at the end.
    pub fn tunnel_present(&self, interface: &str) -> bool {
        self.inner.index_of(interface).ok().flatten().is_some()
            && wireguard::show(interface, self.backend, &self.fd).is_ok()
    }
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(a) => a.is_link_local(),
    }
}

/// Where to send the datagram that makes WireGuard start a handshake with peer `key`: the
/// DNS server when this peer routes it, else the first address of its first allowed prefix.
fn nudge_target(config: &Config, key: &Key) -> Option<SocketAddr> {
    let peer = config
        .peers
        .iter()
        .find(|p| p.public_key == *key || p.alternatives.iter().any(|a| a.public_key == *key))?;
    let covers = |c: &Cidr, ip: IpAddr| {
        c.addr.is_ipv4() == ip.is_ipv4()
            && Cidr {
                addr: ip,
                prefix: c.prefix,
            }
            .network()
                == c.network()
    };
    let usable = |ip: &IpAddr| ip.is_ipv4() || config.ipv6_enabled();
    if peer
        .allowed_ips
        .iter()
        .any(|c| covers(c, config.dns_server))
        && usable(&config.dns_server)
    {
        return Some(SocketAddr::new(config.dns_server, DISCARD_PORT));
    }
    let prefix = peer.allowed_ips.iter().find(|c| usable(&c.addr))?.network();
    let addr = match prefix.addr {
        IpAddr::V4(a) if prefix.prefix < 31 => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 1)),
        IpAddr::V6(a) if prefix.prefix < 127 => IpAddr::V6(Ipv6Addr::from(u128::from(a) + 1)),
        other => other,
    };
    Some(SocketAddr::new(addr, DISCARD_PORT))
}

/// One empty datagram from inside the namespace (call it there): WireGuard has something to
/// send and starts a handshake if it has no session.
fn nudge(target: SocketAddr) -> std::io::Result<()> {
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(bind)?.send_to(&[], target).map(drop)
}

/// For the command layer: the reason behind an error when it is a [`NeedsRestart`].
pub fn restart_reason(error: &anyhow::Error) -> Option<&NeedsRestart> {
    error.chain().find_map(|e| e.downcast_ref::<NeedsRestart>())
}

/// What `reload` and `heal` start with: the namespace's session (its lock held), the check that
/// `config` can be applied in place, what is wanted, and the changes that get there.
pub fn prepare(
    namespace: &str,
    config: &Config,
    mode: Mode,
) -> Result<(Session, Desired, Vec<Change>)> {
    let session = Session::open(namespace)?;
    check_in_place(session.state(), config, session.backend())?;
    let desired = Desired::prepare(config)?;
    let observed = session.observe(&desired)?;
    let changes = plan(
        session.state(),
        &desired,
        &observed,
        mode,
        std::time::SystemTime::now(),
    );
    Ok((session, desired, changes))
}

/// Refuses what cannot change in place: another namespace, another backend.
pub fn check_in_place(state: &State, config: &Config, backend: Backend) -> Result<()> {
    if state.namespace != config.namespace {
        return Err(needs_restart(format!(
            "namespace_name changed from {:?} to {:?}; that needs a restart (down, then up)",
            state.namespace, config.namespace
        )));
    }
    if !backend_fits(config.backend, backend) {
        return Err(needs_restart(format!(
            "backend changed from {:?} (running) to {:?}; that needs a restart (down, then up)",
            backend.as_str(),
            config.backend.as_str()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::wireguard::{DevicePeer, PreparedPeer};

    const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const OTHER: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    /// The recorded daemon program is run only for the command it was recorded with, when it
    /// has the program's name and only root can change it; else PATH decides (here: nothing).
    #[test]
    fn a_recorded_daemon_program_is_run_only_when_it_fits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wgns-daemon-program-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let program = dir.join("wgns-no-such-daemon");
        std::fs::write(&program, "").unwrap();
        let command = vec!["wgns-no-such-daemon".to_string(), "-v".to_string()];
        let mut state = State::new("vpn", "10.0.0.1".parse().unwrap());
        state.userspace_command = Some(command.clone());
        state.userspace_program = Some(program.clone());
        let run = |state: &State, command: &[String]| daemon_command(command, state).ok();

        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        if nix::unistd::geteuid().is_root() {
            let (argv, path) = run(&state, &command).expect("the recorded program");
            assert_eq!(argv, [program.to_str().unwrap(), "-v"]);
            assert_eq!(path, program);
        }
        let other = vec!["wgns-no-such-daemon".to_string()];
        assert_eq!(run(&state, &other), None, "another command");
        let mut renamed = state.clone();
        renamed.userspace_program = Some(dir.join("sh"));
        assert_eq!(run(&renamed, &command), None, "another name");
        // Reached through a link, or in a directory others can write to: someone else could
        // put another file there.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let mut linked = state.clone();
        linked.userspace_program = Some(link.join("wgns-no-such-daemon"));
        assert_eq!(run(&linked, &command), None, "through a symbolic link");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            run(&state, &command),
            None,
            "in a directory writable by everyone"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(run(&state, &command), None, "writable by everyone");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn config(keepalive: u16, peers: &[&str]) -> Config {
        let peers: Vec<_> = peers
            .iter()
            .enumerate()
            .map(|(i, key)| {
                serde_json::json!({
                    "publicKey": key,
                    "allowedIPs": [format!("10.9.{i}.0/24")],
                    "endpoint": format!("192.0.2.{}:51820", i + 1),
                    "persistentKeepalive": keepalive,
                })
            })
            .collect();
        Config::parse(
            &serde_json::json!({
                "namespace_name": "t", "dns_server": "10.9.0.1", "ips": ["10.9.0.2/32"],
                "privateKeyFile": "/k", "peers": peers,
            })
            .to_string(),
        )
        .unwrap()
    }

    fn desired(config: &Config) -> Desired {
        Desired {
            prepared: Prepared {
                private_key: Key([7; 32]),
                peers: config
                    .peers
                    .iter()
                    .map(|p| PreparedPeer {
                        public_key: p.public_key.clone(),
                        preshared_key: None,
                        endpoint: Some(wireguard::resolve(p.endpoint.as_ref().unwrap()).unwrap()),
                        peer: p.clone(),
                    })
                    .collect(),
                warnings: Vec::new(),
            },
            rendered: render::render(config).unwrap(),
            config: config.clone(),
        }
    }

    /// A namespace in which `applied` is exactly what runs.
    fn live(applied: &Desired, handshake: SystemTime) -> (State, Observed) {
        let mut state = State::new("t", "10.9.0.1".parse().unwrap());
        record_config(&mut state, &applied.config);
        state.backend = Some(Backend::Userspace);
        state.ruleset_digest = Some(applied.rendered.ruleset_digest.clone());
        let observed = Observed {
            guard_intact: true,
            policy_loaded: true,
            resolv_conf: Some(applied.rendered.resolv_conf.clone()),
            nsswitch_conf: Some(applied.rendered.nsswitch_conf.clone()),
            hosts: Some(applied.rendered.hosts.clone()),
            ipv6_disabled: Some(true),
            link: Some(Link {
                index: 5,
                name: "t".into(),
                up: true,
                kind: Some("tun".into()),
                mtu: Some(1420),
            }),
            daemon_alive: true,
            device: Some(DeviceView {
                public_key: Some(wireguard::public_key_of(&Key([7; 32]))),
                peers: applied
                    .prepared
                    .peers
                    .iter()
                    .map(|p| DevicePeer {
                        public_key: p.public_key.clone(),
                        preshared_key: None,
                        endpoint: p.endpoint,
                        keepalive: p.peer.persistent_keepalive.filter(|&k| k != 0),
                        allowed_ips: p.peer.allowed_ips.clone(),
                        last_handshake: Some(handshake),
                    })
                    .collect(),
            }),
            addresses: applied.config.ips.clone(),
            routes: routes_for(&applied.config),
            relays: relays::entries(&applied.config)
                .into_iter()
                .map(|e| (e, true))
                .collect(),
            legacy_relay: false,
        };
        (state, observed)
    }

    #[test]
    fn the_applied_config_plans_nothing() {
        let now = SystemTime::now();
        let applied = desired(&config(0, &[PEER]));
        let (state, observed) = live(&applied, now);
        assert_eq!(plan(&state, &applied, &observed, Mode::Reload, now), []);
        assert_eq!(plan(&state, &applied, &observed, Mode::Heal, now), []);
    }

    #[test]
    fn a_configured_mtu_and_a_lost_hosts_file_are_put_back_in_place() {
        let now = SystemTime::now();
        let applied = desired(&config(0, &[PEER]));
        let (state, mut observed) = live(&applied, now);
        // The backend's own MTU stands while none is configured.
        assert_eq!(plan(&state, &applied, &observed, Mode::Reload, now), []);
        let mut with_mtu = config(0, &[PEER]);
        with_mtu.mtu = Some(1380);
        let wanted = desired(&with_mtu);
        assert_eq!(
            plan(&state, &wanted, &observed, Mode::Reload, now),
            [Change::Mtu(1380)]
        );
        observed.hosts = None;
        assert_eq!(
            plan(&state, &applied, &observed, Mode::Heal, now),
            [Change::EtcFiles]
        );
    }

    #[test]
    fn a_changed_keepalive_touches_that_field_only() {
        let now = SystemTime::now();
        let (state, observed) = live(&desired(&config(0, &[PEER])), now);
        let wanted = desired(&config(25, &[PEER]));
        let changes = plan(&state, &wanted, &observed, Mode::Reload, now);
        let peer = &wanted.config.peers[0];
        assert_eq!(
            changes,
            [Change::Peers(DeviceChange {
                peers: vec![PeerSettings {
                    public_key: peer.public_key.clone(),
                    preshared_key: Some(Key([0; 32])),
                    endpoint: None,
                    persistent_keepalive: Some(25),
                    allowed_ips: peer.allowed_ips.clone(),
                }],
                ..DeviceChange::default()
            })]
        );
    }

    #[test]
    fn an_added_peer_is_one_update_naming_only_it_plus_its_route() {
        let now = SystemTime::now();
        let (state, observed) = live(&desired(&config(0, &[PEER])), now);
        let wanted = desired(&config(0, &[PEER, OTHER]));
        let changes = plan(&state, &wanted, &observed, Mode::Reload, now);
        let [Change::Peers(delta), Change::Routes { add, remove }] = changes.as_slice() else {
            panic!("unexpected plan {changes:?}");
        };
        assert_eq!(delta.peers.len(), 1);
        assert_eq!(delta.peers[0].public_key, Key::from_base64(OTHER).unwrap());
        assert!(delta.remove.is_empty() && delta.private_key.is_none());
        assert_eq!(add, &["10.9.1.0/24".parse().unwrap()]);
        assert!(remove.is_empty());
        // And back: the peer goes, its route too.
        let (state, observed) = live(&wanted, now);
        let changes = plan(
            &state,
            &desired(&config(0, &[PEER])),
            &observed,
            Mode::Reload,
            now,
        );
        assert!(
            matches!(&changes[0], Change::Peers(d) if d.remove.len() == 1 && d.peers.is_empty())
        );
    }

    #[test]
    fn a_missing_interface_is_recreated_with_its_addresses_and_routes() {
        let now = SystemTime::now();
        let applied = desired(&config(0, &[PEER]));
        let (state, mut observed) = live(&applied, now);
        observed.link = None;
        observed.device = None;
        observed.addresses.clear();
        observed.routes.clear();
        let changes = plan(&state, &applied, &observed, Mode::Heal, now);
        assert_eq!(changes[0], Change::Interface);
        assert!(matches!(&changes[1], Change::Addresses { add, .. } if add.len() == 1));
        assert!(matches!(&changes[2], Change::Routes { add, .. } if add.len() == 1));
        assert!(matches!(&changes[3], Change::Rehandshake(keys) if keys.len() == 1));
    }

    #[test]
    fn a_standing_failover_is_left_alone_until_the_peer_changes() {
        let now = SystemTime::now();
        let with_alternative = |endpoint: &str| {
            let json = serde_json::json!({
                "namespace_name": "t", "dns_server": "10.9.0.1", "ips": ["10.9.0.2/32"],
                "privateKeyFile": "/k",
                "peers": [{ "publicKey": PEER, "allowedIPs": ["10.9.0.0/24"], "endpoint": endpoint,
                    "alternatives": [{ "publicKey": OTHER, "endpoint": "192.0.2.9:51820" }] }],
            });
            Config::parse(&json.to_string()).unwrap()
        };
        let applied = desired(&with_alternative("192.0.2.1:51820"));
        let (mut state, mut observed) = live(&applied, now);
        // refresh has switched to the alternative.
        let device = observed.device.as_mut().unwrap();
        device.peers[0].public_key = Key::from_base64(OTHER).unwrap();
        state.peers[0].failover = Some(FailoverRecord {
            active: 1,
            active_public_key: OTHER.into(),
            last_switch_at: None,
            last_switch_reason: None,
            all_down_since: None,
            switches: 1,
        });
        assert_eq!(plan(&state, &applied, &observed, Mode::Reload, now), []);
        // The peer's endpoint changes: its own server comes back, the alternative goes.
        let changed = desired(&with_alternative("192.0.2.2:51820"));
        let changes = plan(&state, &changed, &observed, Mode::Reload, now);
        let [Change::Peers(change)] = changes.as_slice() else {
            panic!("unexpected plan {changes:?}");
        };
        assert_eq!(change.peers[0].public_key, Key::from_base64(PEER).unwrap());
        assert_eq!(change.remove, [Key::from_base64(OTHER).unwrap()]);
    }

    #[test]
    fn heal_nudges_an_overdue_handshake_and_reloads_an_altered_guard() {
        let now = SystemTime::now();
        let applied = desired(&config(0, &[PEER]));
        let (state, mut observed) = live(&applied, now - Duration::from_secs(600));
        assert_eq!(plan(&state, &applied, &observed, Mode::Reload, now), []);
        observed.guard_intact = false;
        let changes = plan(&state, &applied, &observed, Mode::Heal, now);
        assert_eq!(changes[0], Change::Ruleset);
        assert!(matches!(&changes[1], Change::Rehandshake(_)));
    }
}
