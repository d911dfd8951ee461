//! `metrics`: every namespace's status as the Prometheus text exposition, and the collection
//! that `serve` shares.
//!
//! The documents come from each namespace's companion (`refresh`, see
//! [`crate::system::companion`]), so that reading them needs no root: no namespace is
//! entered, no netlink or nft request is made by the reader.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::system::companion;

/// How long one companion may take to answer.
pub const ASK_DEADLINE: Duration = Duration::from_secs(10);

/// Where the documents come from when a companion does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Inspect the namespace in this process (needs root).
    Inspect,
    /// Report it down, saying that its companion does not answer.
    Report,
}

/// The status document of every namespace on the host, in name order: those with a state file
/// and those whose companion answers (a configured namespace that is down has one).
pub fn collect(fallback: Fallback) -> Vec<Value> {
    let recorded: BTreeSet<String> = crate::system::state::recorded_namespaces()
        .into_iter()
        .collect();
    let names: BTreeSet<String> = recorded
        .iter()
        .cloned()
        .chain(companion::socket_namespaces())
        .collect();
    documents(&names, &recorded, fallback)
}

/// The documents of the namespaces `names` that the host has (see [`collect`]).
pub fn collect_named(names: &[String], fallback: Fallback) -> Vec<Value> {
    let recorded: BTreeSet<String> = crate::system::state::recorded_namespaces()
        .into_iter()
        .collect();
    documents(&names.iter().cloned().collect(), &recorded, fallback)
}

fn documents(
    names: &BTreeSet<String>,
    recorded: &BTreeSet<String>,
    fallback: Fallback,
) -> Vec<Value> {
    let names: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| crate::config::check_name(n).is_ok())
        .collect();
    let answers = companion::ask_all(&names, ASK_DEADLINE);
    names
        .into_iter()
        .zip(answers)
        .filter_map(|(name, answer)| {
            match answer
                .map_err(|e| format!("{e:#}"))
                .and_then(|b| parse(name, &b))
            {
                Ok(document) => Some(document),
                // A socket left by a companion that ended with its namespace.
                Err(_) if !recorded.contains(name) => None,
                Err(_) if fallback == Fallback::Inspect => {
                    serde_json::to_value(crate::commands::status::inspect(name)).ok()
                }
                Err(problem) => Some(json!({
                    "namespace": name,
                    "verdict": "down",
                    "reasons": [format!(
                        "its companion (wg-namespace refresh) does not answer: {problem}"
                    )],
                })),
            }
        })
        .collect()
}

fn parse(namespace: &str, bytes: &[u8]) -> std::result::Result<Value, String> {
    let document: Value = serde_json::from_slice(bytes).map_err(|e| format!("{e}"))?;
    // The companion answers for its own namespace only.
    if document.get("namespace").and_then(Value::as_str) != Some(namespace) {
        return Err("it answered for another namespace".into());
    }
    Ok(document)
}

/// The parts of a status document the metrics show (see `status --json`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Document {
    namespace: String,
    verdict: String,
    interface: Interface,
    firewall: Firewall,
    peers: Vec<Peer>,
    forwarded_ports: Vec<ForwardedPort>,
    port_forwarding: Option<Value>,
    heals_total: u64,
    reloads_total: u64,
    relays: Vec<Relay>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Relay {
    direction: String,
    protocol: String,
    host_address: String,
    host_port: u16,
    namespace_port: u16,
    running: bool,
    sessions_open: Option<u64>,
    sessions_refused: Option<u64>,
    sessions_evicted: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Interface {
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Firewall {
    guard_intact: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Peer {
    public_key: String,
    latest_handshake_seconds_ago: Option<u64>,
    rx_bytes: u64,
    tx_bytes: u64,
    failover: Option<Failover>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Failover {
    active: u64,
    switches: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ForwardedPort {
    protocol: String,
    port: u16,
    expires_at: u64,
}

const VERDICTS: [&str; 3] = ["healthy", "degraded", "down"];

/// One metric family: its name, type, help text, and samples (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// Every family `render` writes, in order: the README documents each.
pub const FAMILIES: [(&str, &str, &str); 17] = [
    (
        "wireguard_peer_receive_bytes_total",
        "counter",
        "Number of bytes received from a given peer.",
    ),
    (
        "wireguard_peer_transmit_bytes_total",
        "counter",
        "Number of bytes transmitted to a given peer.",
    ),
    (
        "wireguard_peer_last_handshake_seconds",
        "gauge",
        "UNIX timestamp for the last handshake with a given peer.",
    ),
    (
        "wg_namespace_verdict",
        "gauge",
        "1 for the namespace's verdict (healthy, degraded or down), 0 for the others.",
    ),
    (
        "wg_namespace_handshake_age_seconds",
        "gauge",
        "Seconds since the peer's latest handshake (absent before the first).",
    ),
    (
        "wg_namespace_peer_active_server",
        "gauge",
        "Server carrying a peer with alternatives: 0 the peer itself, n its alternative n.",
    ),
    (
        "wg_namespace_peer_switches_total",
        "counter",
        "Switches to another server of a peer with alternatives, since its interface was made.",
    ),
    (
        "wg_namespace_port_forwarding_mapped",
        "gauge",
        "1 while the VPN provider forwards a port (portForwarding configured), else 0.",
    ),
    (
        "wg_namespace_forwarded_port",
        "gauge",
        "The port the VPN provider forwards to the namespace, per protocol.",
    ),
    (
        "wg_namespace_forwarded_port_expiry_timestamp_seconds",
        "gauge",
        "UNIX time at which the forwarded port's mapping expires unless renewed.",
    ),
    (
        "wg_namespace_heals_total",
        "counter",
        "Heals that repaired something in the namespace, since up.",
    ),
    (
        "wg_namespace_reloads_total",
        "counter",
        "Reloads of the namespace, since up.",
    ),
    (
        "wg_namespace_guard_intact",
        "gauge",
        "1 when the namespace's leak guard is loaded exactly as rendered, else 0.",
    ),
    (
        "wg_namespace_relay_running",
        "gauge",
        "1 while the relay of a publishPorts or hostServices entry runs, else 0.",
    ),
    (
        "wg_namespace_relay_sessions_open",
        "gauge",
        "Connections (TCP) or client sessions (UDP) the relay carries now.",
    ),
    (
        "wg_namespace_relay_sessions_refused_total",
        "counter",
        "New sessions the relay turned away (over a cap, or out of sockets) since it started.",
    ),
    (
        "wg_namespace_relay_sessions_evicted_total",
        "counter",
        "UDP sessions the relay ended to make room for new clients since it started.",
    ),
];

/// The Prometheus text exposition (format 0.0.4) of `documents`, taken at `now` (Unix seconds).
pub fn render(documents: &[Value], now: u64) -> String {
    let mut families: Vec<Family> = FAMILIES
        .iter()
        .map(|&(name, kind, help)| Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        })
        .collect();
    let mut add = |name: &str, labels: Vec<(&'static str, String)>, value: f64| {
        if let Some(family) = families.iter_mut().find(|f| f.name == name) {
            family.samples.push((labels, value));
        }
    };
    for value in documents {
        let Ok(document) = Document::deserialize(value) else {
            continue;
        };
        let netns = document.namespace.clone();
        let device = document
            .interface
            .name
            .clone()
            .unwrap_or_else(|| netns.clone());
        for verdict in VERDICTS {
            add(
                "wg_namespace_verdict",
                vec![("netns", netns.clone()), ("verdict", verdict.into())],
                f64::from(u8::from(document.verdict == verdict)),
            );
        }
        let ns = || vec![("netns", netns.clone())];
        add(
            "wg_namespace_guard_intact",
            ns(),
            f64::from(u8::from(document.firewall.guard_intact)),
        );
        add(
            "wg_namespace_heals_total",
            ns(),
            document.heals_total as f64,
        );
        add(
            "wg_namespace_reloads_total",
            ns(),
            document.reloads_total as f64,
        );
        for peer in &document.peers {
            let labels = || {
                vec![
                    ("device", device.clone()),
                    ("netns", netns.clone()),
                    ("public_key", peer.public_key.clone()),
                ]
            };
            add(
                "wireguard_peer_receive_bytes_total",
                labels(),
                peer.rx_bytes as f64,
            );
            add(
                "wireguard_peer_transmit_bytes_total",
                labels(),
                peer.tx_bytes as f64,
            );
            let handshake = peer
                .latest_handshake_seconds_ago
                .map_or(0, |ago| now.saturating_sub(ago));
            add(
                "wireguard_peer_last_handshake_seconds",
                labels(),
                handshake as f64,
            );
            if let Some(ago) = peer.latest_handshake_seconds_ago {
                add("wg_namespace_handshake_age_seconds", labels(), ago as f64);
            }
            if let Some(failover) = &peer.failover {
                add(
                    "wg_namespace_peer_active_server",
                    labels(),
                    failover.active as f64,
                );
                add(
                    "wg_namespace_peer_switches_total",
                    labels(),
                    failover.switches as f64,
                );
            }
        }
        for relay in &document.relays {
            let labels = || {
                vec![
                    ("direction", relay.direction.clone()),
                    ("host_address", relay.host_address.clone()),
                    ("host_port", relay.host_port.to_string()),
                    ("namespace_port", relay.namespace_port.to_string()),
                    ("netns", netns.clone()),
                    ("protocol", relay.protocol.clone()),
                ]
            };
            add(
                "wg_namespace_relay_running",
                labels(),
                f64::from(u8::from(relay.running)),
            );
            for (name, value) in [
                ("wg_namespace_relay_sessions_open", relay.sessions_open),
                (
                    "wg_namespace_relay_sessions_refused_total",
                    relay.sessions_refused,
                ),
                (
                    "wg_namespace_relay_sessions_evicted_total",
                    relay.sessions_evicted,
                ),
            ] {
                if let Some(value) = value {
                    add(name, labels(), value as f64);
                }
            }
        }
        if document.port_forwarding.is_some() {
            add(
                "wg_namespace_port_forwarding_mapped",
                ns(),
                f64::from(u8::from(!document.forwarded_ports.is_empty())),
            );
        }
        for port in &document.forwarded_ports {
            let labels = || {
                vec![
                    ("netns", netns.clone()),
                    ("protocol", port.protocol.clone()),
                ]
            };
            add(
                "wg_namespace_forwarded_port",
                labels(),
                f64::from(port.port),
            );
            add(
                "wg_namespace_forwarded_port_expiry_timestamp_seconds",
                labels(),
                port.expires_at as f64,
            );
        }
    }
    let mut out = String::new();
    for family in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        for (labels, value) in &family.samples {
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
        }
    }
    out
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn run() -> Result<i32> {
    let fallback = if nix::unistd::geteuid().is_root() {
        Fallback::Inspect
    } else {
        Fallback::Report
    };
    let documents = collect(fallback);
    print!("{}", render(&documents, crate::system::state::now_secs()));
    Ok(crate::exit::code::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_verdict_series_per_verdict_and_the_peer_counters() {
        let documents = vec![json!({
            "namespace": "vpn",
            "verdict": "degraded",
            "interface": { "name": "vpn" },
            "firewall": { "loaded": true, "guardIntact": true },
            "peers": [{
                "publicKey": "k\"ey",
                "latestHandshakeSecondsAgo": 10,
                "rxBytes": 5, "txBytes": 7,
                "failover": { "active": 1, "switches": 2 },
            }],
            "portForwarding": { "gateway": "10.2.0.1" },
            "forwardedPorts": [{ "protocol": "tcp", "port": 51413, "expiresAt": 1060 }],
            "healsTotal": 3, "reloadsTotal": 4,
            "relays": [{
                "direction": "publish", "protocol": "tcp", "hostAddress": "127.0.0.1",
                "hostPort": 9091, "namespacePort": 9091, "idleTimeoutSeconds": 300,
                "pid": 1, "running": true,
                "sessionsOpen": 2, "sessionsRefused": 1, "sessionsEvicted": 0,
            }],
        })];
        let text = render(&documents, 1000);
        for line in [
            "wg_namespace_verdict{netns=\"vpn\",verdict=\"healthy\"} 0",
            "wg_namespace_verdict{netns=\"vpn\",verdict=\"degraded\"} 1",
            "wg_namespace_verdict{netns=\"vpn\",verdict=\"down\"} 0",
            "wireguard_peer_receive_bytes_total{device=\"vpn\",netns=\"vpn\",public_key=\"k\\\"ey\"} 5",
            "wireguard_peer_last_handshake_seconds{device=\"vpn\",netns=\"vpn\",public_key=\"k\\\"ey\"} 990",
            "wg_namespace_peer_switches_total{device=\"vpn\",netns=\"vpn\",public_key=\"k\\\"ey\"} 2",
            "wg_namespace_port_forwarding_mapped{netns=\"vpn\"} 1",
            "wg_namespace_forwarded_port{netns=\"vpn\",protocol=\"tcp\"} 51413",
            "wg_namespace_heals_total{netns=\"vpn\"} 3",
            "wg_namespace_relay_sessions_refused_total{direction=\"publish\",host_address=\"127.0.0.1\",host_port=\"9091\",namespace_port=\"9091\",netns=\"vpn\",protocol=\"tcp\"} 1",
            "# TYPE wireguard_peer_receive_bytes_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
