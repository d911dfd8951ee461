//! `status`: what is up, and a verdict per namespace.
//!
//! `down` means the namespace cannot safely carry traffic (a part is missing); `degraded`
//! means it is whole but a peer looks unhealthy. The JSON form is a stable interface; see the
//! README for its shape.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde::Serialize;

use crate::config::{Endpoint, EndpointHost, Key, Protocol};
use crate::exit::code;
use crate::system::firewall;
use crate::system::link::Listing;
use crate::system::relays::{self, Direction, Entry};
use crate::system::state::{Phase, Resource, State, StateReader};
use crate::system::wireguard;

/// A peer without a handshake for this long makes the namespace degraded.
pub const HANDSHAKE_STALE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    Healthy,
    Degraded,
    Down,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Down => "down",
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Healthy => code::OK,
            Verdict::Degraded => code::DEGRADED,
            Verdict::Down => code::DOWN,
        }
    }
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    pub name: String,
    pub present: bool,
    pub up: bool,
    pub addresses: Vec<String>,
    pub routes: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub public_key: String,
    /// The address WireGuard uses now.
    pub endpoint: Option<String>,
    /// As configured (a host name stays a host name).
    pub configured_endpoint: Option<String>,
    pub latest_handshake_seconds_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    #[serde(rename = "allowedIPs")]
    pub allowed_ips: Vec<String>,
    /// Which of the peer's servers is in use; none for a peer without alternatives.
    pub failover: Option<FailoverStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    /// 0: the peer itself; n: its alternative n (counted from 1).
    pub active: usize,
    pub active_public_key: String,
    /// As configured.
    pub active_endpoint: Option<String>,
    /// Seconds since the Unix epoch.
    pub last_switch_at: Option<u64>,
    pub last_switch_reason: Option<String>,
    /// Set while no server has answered since then (seconds since the Unix epoch).
    pub all_down_since: Option<u64>,
    /// Switches since the interface was made.
    pub switches: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceStatus {
    pub namespace: String,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub backend: Option<String>,
    pub daemon_pid: Option<u32>,
    pub interface: InterfaceStatus,
    pub firewall: FirewallStatus,
    pub dns: DnsStatus,
    pub peers: Vec<PeerStatus>,
    pub publish_ports: Vec<crate::system::state::PublishRecord>,
    pub host_services: Vec<HostServiceStatus>,
    /// One per publishPorts and hostServices entry.
    pub relays: Vec<RelayStatus>,
    pub up_since: Option<u64>,
    /// The ports the VPN provider forwards now (portForwarding), open in the firewall.
    pub forwarded_ports: Vec<ForwardedPortStatus>,
    /// Present when portForwarding is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_forwarding: Option<PortForwardingStatus>,
    /// The latest `reload`: when (seconds since the epoch) and what it changed.
    pub last_reload: Option<crate::system::state::Event>,
    /// The latest repairs `heal` made, oldest first.
    pub heals: Vec<crate::system::state::Event>,
    /// Heals that changed something, and reloads, since `up`.
    pub heals_total: u64,
    pub reloads_total: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedPortStatus {
    pub protocol: crate::config::Protocol,
    pub port: u16,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
    pub expires_in_seconds: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardingStatus {
    pub gateway: String,
    /// "requesting", "mapped" or "retrying"; null when no port-forward process reports.
    pub phase: Option<crate::system::forwarding::Phase>,
    /// The port handed to onPortChange.
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub reason: Option<String>,
}

/// A host service reachable from inside at 127.0.0.1:namespacePort.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostServiceStatus {
    pub protocol: Protocol,
    pub namespace_port: u16,
    pub host_address: IpAddr,
    pub host_port: u16,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    #[serde(flatten)]
    pub entry: Entry,
    pub pid: u32,
    pub running: bool,
    /// Sessions the relay holds now; null when it cannot be asked (not running, or started by
    /// an older version).
    pub sessions_open: Option<u64>,
    /// New sessions it turned away since it started (over a cap, or out of sockets).
    pub sessions_refused: Option<u64>,
    /// UDP sessions it ended to make room for new clients since it started.
    pub sessions_evicted: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FirewallStatus {
    pub loaded: bool,
    /// The leak guard as loaded is the one rendered for this namespace (see the reasons when
    /// it is not).
    pub guard_intact: bool,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsStatus {
    pub server: Option<String>,
    /// Every server in resolv.conf, `server` first.
    pub servers: Vec<String>,
    pub resolv_conf: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub namespaces: Vec<NamespaceStatus>,
}

/// Collects the status of one namespace. Never fails: whatever cannot be read is a reason.
pub fn inspect(namespace: &str) -> NamespaceStatus {
    Inspector::new(namespace).inspect()
}

/// [`inspect`] again and again for one namespace, as the companion does for every scrape.
/// Everything a verdict rests on is looked at anew each time; what is kept is only what can be
/// shown not to have changed: the parsed record while the state file's bytes are the same
/// ([`StateReader`]), and an intact leak guard while the ruleset's generation is the same
/// ([`firewall::Judge`]).
pub struct Inspector {
    namespace: String,
    states: StateReader,
    guard: firewall::Judge,
}

impl Inspector {
    pub fn new(namespace: &str) -> Inspector {
        Inspector {
            namespace: namespace.to_string(),
            states: StateReader::new(namespace),
            guard: firewall::Judge::default(),
        }
    }

    pub fn inspect(&mut self) -> NamespaceStatus {
        let namespace = self.namespace.as_str();
        let mut status = NamespaceStatus {
            namespace: namespace.to_string(),
            verdict: Verdict::Healthy,
            reasons: Vec::new(),
            backend: None,
            daemon_pid: None,
            interface: InterfaceStatus {
                name: namespace.to_string(),
                ..Default::default()
            },
            firewall: FirewallStatus::default(),
            dns: DnsStatus::default(),
            peers: Vec::new(),
            publish_ports: Vec::new(),
            host_services: Vec::new(),
            relays: Vec::new(),
            up_since: None,
            forwarded_ports: Vec::new(),
            port_forwarding: None,
            last_reload: None,
            heals: Vec::new(),
            heals_total: 0,
            reloads_total: 0,
        };
        let down = |status: &mut NamespaceStatus, reason: String| {
            status.verdict = Verdict::Down;
            status.reasons.push(reason);
        };
        let state = match self.states.load() {
            Ok(Some(state)) if state.phase == Phase::Up => state,
            Ok(Some(state)) => {
                let reason = if state.owner.is_alive() {
                    format!("being built by wg-namespace up (pid {})", state.owner.pid)
                } else {
                    "half-built: an interrupted `up` left it (`up` or `down` clears it)".into()
                };
                down(&mut status, reason);
                return status;
            }
            Ok(None) => {
                down(&mut status, "not up".into());
                return status;
            }
            Err(e) => {
                down(&mut status, format!("{e:#}"));
                return status;
            }
        };
        status.backend = state.backend.map(|b| b.as_str().to_string());
        status.up_since = Some(state.started_at);
        status.dns.server = Some(state.dns_server.to_string());
        status.dns.servers = if state.dns_servers.is_empty() {
            vec![state.dns_server.to_string()]
        } else {
            state.dns_servers.iter().map(ToString::to_string).collect()
        };
        status.publish_ports = state.publish_ports.clone();
        status.last_reload = state.last_reload.clone();
        status.heals = state.heals.clone();
        status.heals_total = state.heals_total;
        status.reloads_total = state.reloads_total;

        let resolv = crate::system::dns::dir(namespace).join("resolv.conf");
        status.dns.resolv_conf =
            crate::system::files::read_text(&resolv, crate::system::files::CONFIG_LIMIT).is_ok_and(
                |text| {
                    text.lines()
                        .any(|l| l.trim() == format!("nameserver {}", state.dns_server))
                },
            );
        if !status.dns.resolv_conf {
            down(
                &mut status,
                format!(
                    "{} is missing or does not name {}",
                    resolv.display(),
                    state.dns_server
                ),
            );
        }

        for resource in &state.resources {
            match resource {
                Resource::Daemon { process, .. } => status.daemon_pid = Some(process.pid),
                Resource::Publisher { process, .. } if !process.is_alive() => {
                    status.verdict = status.verdict.max(Verdict::Degraded);
                    status
                        .reasons
                        .push(format!("the port relay (pid {}) is gone", process.pid));
                }
                Resource::Relay { process, entry, .. } => {
                    let stopped = process.is_stopped();
                    let running = process.is_alive() && !stopped;
                    if !running {
                        status.verdict = status.verdict.max(Verdict::Degraded);
                        // A stopped relay still holds its port: connections are accepted and never
                        // answered, which is worse than gone.
                        let what = if stopped {
                            "is stopped (by a signal or a tracer): it takes connections and answers none"
                        } else {
                            "is gone"
                        };
                        status.reasons.push(format!(
                            "the relay for {entry} (pid {}) {what}",
                            process.pid
                        ));
                    }
                    if entry.direction == Direction::HostService {
                        status.host_services.push(HostServiceStatus {
                            protocol: entry.protocol,
                            namespace_port: entry.namespace_port,
                            host_address: entry.host_address,
                            host_port: entry.host_port,
                        });
                    }
                    let counts = running
                        .then(|| relays::session_counts(namespace, entry, process).ok())
                        .flatten();
                    status.relays.push(RelayStatus {
                        entry: *entry,
                        pid: process.pid,
                        running,
                        sessions_open: counts.map(|c| c.open),
                        sessions_refused: counts.map(|c| c.refused),
                        sessions_evicted: counts.map(|c| c.evicted),
                    });
                }
                _ => {}
            }
        }

        let recorded_netns = state.resources.iter().find_map(|r| match r {
            Resource::Namespace { id, .. } => Some(*id),
            _ => None,
        });
        let Some((fd, netns)) = recorded_netns.and_then(|netns| {
            let fd = crate::system::netns::open_matching(namespace, netns)?;
            Some((fd, netns))
        }) else {
            down(
                &mut status,
                "the network namespace is gone (or is no longer the one `up` made)".into(),
            );
            return status;
        };
        // A guard that is there but flushed, dormant or opened up leaks as if it were not.
        match self.guard.judge(&fd, netns, state.leak_guard.as_ref()) {
            Ok(judgement) => {
                status.firewall.loaded = judgement.loaded;
                if !judgement.loaded {
                    down(&mut status, "the firewall ruleset is not loaded".into());
                }
                status.firewall.guard_intact = judgement.differences.is_empty();
                for difference in judgement.differences {
                    down(&mut status, difference);
                }
            }
            Err(e) => down(&mut status, format!("cannot verify the leak guard: {e:#}")),
        }

        match Listing::inside(&fd).and_then(|mut nl| interface_status(&mut nl, namespace)) {
            Ok(Some(interface)) => {
                if !interface.up {
                    down(&mut status, "the WireGuard interface is down".into());
                }
                status.interface = interface;
            }
            Ok(None) => down(&mut status, "the WireGuard interface is gone".into()),
            Err(e) => down(&mut status, format!("reading the interface: {e:#}")),
        }

        if let Some(configured) = &state.port_forwarding {
            forwarding_status(&mut status, namespace, configured);
        }

        // A daemon that is gone or stopped cannot answer; asking would only wait. Looked at once,
        // right before asking, so that the verdict and the question agree.
        let mut daemon_answers = true;
        for resource in &state.resources {
            if let Resource::Daemon { process, .. } = resource {
                let problem = if !process.is_alive() {
                    "gone"
                } else if process.is_stopped() {
                    "stopped"
                } else {
                    continue;
                };
                daemon_answers = false;
                down(
                    &mut status,
                    format!(
                        "the userspace WireGuard daemon (pid {}) is {problem}",
                        process.pid
                    ),
                );
            }
        }
        let backend = state.backend;
        if let (Some(backend), true, true) = (backend, status.interface.present, daemon_answers) {
            match wireguard::show_peers(namespace, backend, &fd, &state) {
                Ok(device) => peer_status(&mut status, &state, &device),
                Err(e) => down(&mut status, format!("{e:#}")),
            }
        }
        status
    }
}

/// The forwarding process's record, checked: a record whose process is gone says nothing.
fn forwarding_status(
    status: &mut NamespaceStatus,
    namespace: &str,
    configured: &crate::system::state::PortForwardingRecord,
) {
    use crate::system::forwarding::{Phase, Record, unix_now};
    let mut report = PortForwardingStatus {
        gateway: configured.gateway.to_string(),
        phase: None,
        port: None,
        pid: None,
        reason: None,
    };
    let problem = match Record::load(namespace) {
        Ok(Some(record)) if record.namespace == namespace && record.process.is_alive() => {
            let now = unix_now();
            status.forwarded_ports = record
                .live_ports(now)
                .into_iter()
                .map(|p| ForwardedPortStatus {
                    protocol: p.protocol,
                    port: p.port,
                    expires_at: p.expires_at,
                    expires_in_seconds: p.expires_at - now,
                })
                .collect();
            report.phase = Some(record.phase);
            report.port = record.port;
            report.pid = Some(record.process.pid);
            report.reason = record.reason.clone();
            match (record.phase, record.reason) {
                (Phase::Mapped, None) => None,
                (_, Some(reason)) => Some(reason),
                (Phase::Requesting, None) => Some("no mapping yet".into()),
                (phase, None) => Some(format!("{phase:?}")),
            }
        }
        Ok(Some(record)) => Some(format!(
            "the port-forward process (pid {}) is gone",
            record.process.pid
        )),
        Ok(None) => Some("no port-forward process reports".into()),
        Err(e) => Some(format!("{e:#}")),
    };
    if let Some(problem) = problem {
        report.reason.get_or_insert_with(|| problem.clone());
        status.verdict = status.verdict.max(Verdict::Degraded);
        status.reasons.push(format!("port forwarding: {problem}"));
    }
    status.port_forwarding = Some(report);
}

fn interface_status(nl: &mut Listing, name: &str) -> Result<Option<InterfaceStatus>> {
    let Some(link) = nl.link_named(name)? else {
        return Ok(None);
    };
    let addresses = nl
        .addresses(link.index)?
        .iter()
        .map(ToString::to_string)
        .collect();
    let routes = nl
        .routes()?
        .into_iter()
        .filter(|r| r.interface == link.index)
        .map(|r| {
            if r.destination.is_default() {
                if r.destination.is_ipv6() {
                    "default (IPv6)".into()
                } else {
                    "default".into()
                }
            } else {
                r.destination.to_string()
            }
        })
        .collect();
    Ok(Some(InterfaceStatus {
        name: name.to_string(),
        present: true,
        up: link.up,
        addresses,
        routes,
    }))
}

fn peer_status(status: &mut NamespaceStatus, state: &State, device: &wireguard::DeviceInfo) {
    let now = SystemTime::now();
    let learned = std::cell::OnceCell::new();
    let up_for = now
        .duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(state.started_at))
        .unwrap_or_default();
    for record in &state.peers {
        // The device holds the server in use: the recorded one, or else whichever of the
        // peer's servers it has (a switch may have failed half-way).
        let servers: Vec<(&str, Option<&String>)> =
            std::iter::once((record.public_key.as_str(), record.endpoint.as_ref()))
                .chain(
                    record
                        .alternatives
                        .iter()
                        .map(|a| (a.public_key.as_str(), Some(&a.endpoint))),
                )
                .collect();
        let on_device = |text: &str| {
            let key = Key::from_base64(text)?;
            device.peers.iter().find(|p| p.config.public_key.0 == key.0)
        };
        let found = on_device(record.active_public_key()).and_then(|info| {
            let index = servers
                .iter()
                .position(|(k, _)| *k == record.active_public_key())?;
            Some((index, info))
        });
        let found = found.or_else(|| {
            servers
                .iter()
                .enumerate()
                .find_map(|(i, (k, _))| on_device(k).map(|info| (i, info)))
        });
        let Some((active, info)) = found else {
            status.verdict = Verdict::Down;
            status.reasons.push(format!(
                "peer {} is missing from the device",
                record.public_key
            ));
            continue;
        };
        let (active_key, active_endpoint) = servers[active];
        let failover = (!record.alternatives.is_empty()).then(|| {
            let last = record.failover.as_ref();
            FailoverStatus {
                active,
                active_public_key: active_key.to_string(),
                active_endpoint: active_endpoint.cloned(),
                last_switch_at: last.and_then(|f| f.last_switch_at),
                last_switch_reason: last.and_then(|f| f.last_switch_reason.clone()),
                all_down_since: last.and_then(|f| f.all_down_since),
                switches: last.map_or(0, |f| f.switches),
            }
        });
        if let Some(since) = failover.as_ref().and_then(|f| f.all_down_since) {
            status.verdict = status.verdict.max(Verdict::Degraded);
            status.reasons.push(format!(
                "peer {}: none of its {} servers has answered since {since} (Unix time); \
                 refresh keeps trying them in order, waiting longer each round",
                record.public_key,
                servers.len()
            ));
        }
        let handshake_age = info
            .stats
            .last_handshake_time
            .and_then(|t| now.duration_since(t).ok());
        if let Some(problem) = handshake_problem(handshake_age, up_for) {
            status.verdict = status.verdict.max(Verdict::Degraded);
            status
                .reasons
                .push(format!("peer {}: {problem}", record.public_key));
        }
        if let Some(configured) = active_endpoint {
            // What the running `refresh` learned, or else a lookup now.
            let unresolvable = Endpoint::parse(configured)
                .map(|e| {
                    if let EndpointHost::Ip(_) = e.host {
                        // An address is its own answer: nothing to look up or to have learned.
                        return false;
                    }
                    let learned = learned
                        .get_or_init(|| crate::system::endpoints::Learned::load(&state.namespace));
                    match learned
                        .as_ref()
                        .and_then(|l| l.resolves.get(&e.to_string()))
                    {
                        Some(resolved) => !resolved,
                        None => wireguard::resolve(&e).is_err(),
                    }
                })
                .unwrap_or(true);
            if unresolvable {
                status.verdict = status.verdict.max(Verdict::Degraded);
                status.reasons.push(format!(
                    "peer {}: endpoint {configured} does not resolve",
                    record.public_key
                ));
            }
        }
        status.peers.push(PeerStatus {
            public_key: record.public_key.clone(),
            endpoint: info.config.endpoint.map(|e| e.to_string()),
            configured_endpoint: record.endpoint.clone(),
            latest_handshake_seconds_ago: handshake_age.map(|a| a.as_secs()),
            rx_bytes: info.stats.rx_bytes,
            tx_bytes: info.stats.tx_bytes,
            allowed_ips: info
                .config
                .allowed_ips
                .iter()
                .map(|a| format!("{}/{}", a.address, a.cidr))
                .collect(),
            failover,
        });
    }
}

/// Why a peer's handshake makes the namespace degraded, if it does. A namespace gets
/// [`HANDSHAKE_STALE`] after `up` for its first handshake.
fn handshake_problem(age: Option<Duration>, up_for: Duration) -> Option<String> {
    match age {
        Some(age) if age > HANDSHAKE_STALE => Some(format!("no handshake for {}s", age.as_secs())),
        None if up_for > HANDSHAKE_STALE => Some(format!(
            "no handshake in the {}s since up",
            up_for.as_secs()
        )),
        _ => None,
    }
}

fn print_text(status: &NamespaceStatus) {
    println!(
        "namespace {}: {}",
        status.namespace,
        status.verdict.as_str()
    );
    if let Some(backend) = &status.backend {
        match status.daemon_pid {
            Some(pid) => println!("  backend:   {backend} (daemon pid {pid})"),
            None => println!("  backend:   {backend}"),
        }
    }
    let i = &status.interface;
    if i.present {
        println!(
            "  interface: {} {}, addresses {}",
            i.name,
            if i.up { "up" } else { "down" },
            if i.addresses.is_empty() {
                "none".into()
            } else {
                i.addresses.join(", ")
            }
        );
        println!(
            "  routes:    {}",
            if i.routes.is_empty() {
                "none".into()
            } else {
                i.routes.join(", ")
            }
        );
    }
    if status.backend.is_some() {
        println!(
            "  firewall:  {}",
            match (status.firewall.loaded, status.firewall.guard_intact) {
                (true, true) => "loaded",
                (true, false) => "loaded, but the leak guard is ALTERED",
                (false, _) => "MISSING",
            }
        );
        if status.dns.server.is_some() {
            println!(
                "  dns:       {}{}",
                status.dns.servers.join(", "),
                if status.dns.resolv_conf {
                    ""
                } else {
                    " (resolv.conf MISSING)"
                }
            );
        }
    }
    for p in &status.publish_ports {
        println!(
            "  publish:   {} {}:{} -> namespace port {}",
            p.protocol.as_str(),
            p.host_address,
            p.host_port,
            p.namespace_port
        );
    }
    for s in &status.host_services {
        println!(
            "  to host:   {} 127.0.0.1:{} inside -> {}",
            s.protocol.as_str(),
            s.namespace_port,
            SocketAddr::new(s.host_address, s.host_port)
        );
    }
    if let Some(forwarding) = &status.port_forwarding {
        let ports = status
            .forwarded_ports
            .iter()
            .map(|p| {
                format!(
                    "{} {} (expires in {}s)",
                    p.protocol.as_str(),
                    p.port,
                    p.expires_in_seconds
                )
            })
            .collect::<Vec<_>>();
        println!(
            "  forwarded: {} via NAT-PMP gateway {}",
            if ports.is_empty() {
                "none".into()
            } else {
                ports.join(", ")
            },
            forwarding.gateway
        );
    }
    for peer in &status.peers {
        println!("  peer {}", peer.public_key);
        let endpoint = match (&peer.endpoint, &peer.configured_endpoint) {
            (Some(now), Some(conf)) if now != conf => format!("{now} ({conf})"),
            (Some(now), _) => now.clone(),
            (None, Some(conf)) => format!("none yet ({conf})"),
            (None, None) => "none".into(),
        };
        println!("    endpoint:    {endpoint}");
        match peer.latest_handshake_seconds_ago {
            Some(s) => println!("    handshake:   {s}s ago"),
            None => println!("    handshake:   none"),
        }
        println!(
            "    transfer:    {} B received, {} B sent",
            peer.rx_bytes, peer.tx_bytes
        );
        println!("    allowed IPs: {}", peer.allowed_ips.join(", "));
        if let Some(f) = &peer.failover {
            let which = match f.active {
                0 => "the peer itself".to_string(),
                n => format!("alternative {n}"),
            };
            println!("    server:      {which}, {}", f.active_public_key);
            if let (Some(at), Some(reason)) = (f.last_switch_at, &f.last_switch_reason) {
                println!("    switched:    at {at} (Unix time): {reason}");
            }
        }
    }
    let when = |at: u64| {
        let ago = crate::system::state::now_secs().saturating_sub(at);
        format!("{ago}s ago")
    };
    if let Some(reload) = &status.last_reload {
        let what = if reload.changes.is_empty() {
            "nothing to change".to_string()
        } else {
            reload.changes.join("; ")
        };
        println!("  reloaded:  {} ({what})", when(reload.at));
    }
    for heal in &status.heals {
        println!(
            "  healed:    {} ({})",
            when(heal.at),
            heal.changes.join("; ")
        );
    }
    for reason in &status.reasons {
        println!("  reason:    {reason}");
    }
}

pub fn run(namespace: Option<&str>, json: bool) -> Result<i32> {
    let names = match namespace {
        Some(name) => vec![name.to_string()],
        None => crate::system::state::recorded_namespaces(),
    };
    let report = Report {
        namespaces: names.iter().map(|n| inspect(n)).collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.namespaces.is_empty() {
        println!("no namespace is up");
    } else {
        for status in &report.namespaces {
            print_text(status);
        }
    }
    Ok(report
        .namespaces
        .iter()
        .map(|s| s.verdict)
        .max()
        .unwrap_or(Verdict::Healthy)
        .exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_go_stale_after_three_minutes() {
        let secs = Duration::from_secs;
        assert_eq!(handshake_problem(Some(secs(10)), secs(1000)), None);
        assert_eq!(handshake_problem(None, secs(60)), None);
        assert_eq!(
            handshake_problem(Some(secs(181)), secs(1000)).as_deref(),
            Some("no handshake for 181s")
        );
        assert_eq!(
            handshake_problem(None, secs(200)).as_deref(),
            Some("no handshake in the 200s since up")
        );
    }
}
