//! `refresh`: keep endpoints given as host names pointing where the names point now.
//!
//! WireGuard resolves nothing itself. This loop resolves each such endpoint in the host
//! namespace every `dynamicEndpointRefreshSeconds`, and at once when the peer's latest
//! handshake is overdue, and moves the peer in place when the address changed: the interface,
//! its sessions and the namespace stay as they are. Failures are logged and retried; they
//! never touch a running tunnel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::config::{Config, EndpointHost, Peer};
use crate::state::{Phase, State};
use crate::wireguard::{self, Backend};

/// WireGuard rekeys every 120 s while traffic flows; a handshake older than this (plus the
/// retry slack the protocol allows) means the peer has stopped answering.
const HANDSHAKE_OVERDUE: Duration = Duration::from_secs(135);
/// Re-resolution because of an overdue handshake happens at most this often per peer.
const OVERDUE_RETRY: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_millis(500);

fn refreshable(peer: &Peer, once: bool) -> bool {
    matches!(&peer.endpoint, Some(e) if matches!(e.host, EndpointHost::Name(_)))
        && (once || peer.dynamic_endpoint_refresh_seconds > 0)
}

struct Target {
    backend: Backend,
    fd: std::os::fd::OwnedFd,
}

fn target(config: &Config) -> Result<Target> {
    let ns = &config.namespace;
    let state = State::load(ns)?.filter(|s| s.phase == Phase::Up);
    let Some(state) = state else {
        bail!("namespace {ns:?} is not up");
    };
    let backend = state
        .backend
        .as_deref()
        .and_then(Backend::parse)
        .context("the state file names no backend")?;
    Ok(Target {
        backend,
        fd: crate::netns::open(ns)?,
    })
}

/// Resolves one peer's endpoint and moves the peer when the address changed.
fn refresh_peer(
    config: &Config,
    target: &Target,
    peer: &Peer,
    current: Option<SocketAddr>,
) -> Result<()> {
    let endpoint = peer.endpoint.as_ref().context("peer has no endpoint")?;
    let resolved = wireguard::resolve(endpoint).with_context(|| format!("resolving {endpoint}"))?;
    if current != Some(resolved) {
        wireguard::set_endpoint(
            config.interface(),
            target.backend,
            &target.fd,
            &peer.public_key,
            resolved,
        )?;
        eprintln!(
            "refresh: peer {}: endpoint {endpoint} now {resolved} (was {})",
            peer.public_key_text,
            current.map_or("unset".to_string(), |c| c.to_string())
        );
    }
    Ok(())
}

/// Current endpoint and latest handshake of every peer on the device.
/// A peer's current endpoint and latest handshake, by public key.
type OnDevice = HashMap<[u8; 32], (Option<SocketAddr>, Option<SystemTime>)>;

fn device_peers(config: &Config, target: &Target) -> Result<OnDevice> {
    let device = wireguard::show(config.interface(), target.backend, &target.fd)?;
    Ok(device
        .peers
        .iter()
        .map(|p| {
            (
                p.config.public_key.0,
                (p.config.endpoint, p.stats.last_handshake_time),
            )
        })
        .collect())
}

pub fn run(config: &Config, once: bool) -> Result<()> {
    let peers: Vec<&Peer> = config
        .peers
        .iter()
        .filter(|p| refreshable(p, once))
        .collect();
    if once {
        let target = target(config)?;
        let on_device = device_peers(config, &target)?;
        for peer in peers {
            let current = on_device.get(&peer.public_key.0).and_then(|(e, _)| *e);
            refresh_peer(config, &target, peer, current)
                .with_context(|| format!("refresh: peer {}", peer.public_key_text))?;
        }
        return Ok(());
    }
    if peers.is_empty() {
        eprintln!(
            "refresh: no peer has a host-name endpoint with dynamicEndpointRefreshSeconds > 0; nothing to do"
        );
        return Ok(());
    }

    let mut next_due: Vec<Instant> = vec![Instant::now(); peers.len()];
    let mut last_overdue_try: Vec<Option<Instant>> = vec![None; peers.len()];
    let mut waiting_reported = false;
    loop {
        std::thread::sleep(TICK);
        let target = match target(config) {
            Ok(target) => {
                waiting_reported = false;
                target
            }
            Err(e) => {
                if !waiting_reported {
                    eprintln!("refresh: waiting: {e:#}");
                    waiting_reported = true;
                }
                continue;
            }
        };
        let on_device = match device_peers(config, &target) {
            Ok(map) => map,
            Err(e) => {
                eprintln!("refresh: {e:#}");
                continue;
            }
        };
        let now = Instant::now();
        for (i, peer) in peers.iter().enumerate() {
            let (current, handshake) = on_device
                .get(&peer.public_key.0)
                .copied()
                .unwrap_or((None, None));
            let overdue = handshake
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_none_or(|age| age > HANDSHAKE_OVERDUE);
            let retry_allowed =
                last_overdue_try[i].is_none_or(|t| now.duration_since(t) >= OVERDUE_RETRY);
            let due = now >= next_due[i];
            if !(due || (overdue && retry_allowed)) {
                continue;
            }
            if overdue {
                last_overdue_try[i] = Some(now);
            }
            next_due[i] = now + Duration::from_secs(peer.dynamic_endpoint_refresh_seconds);
            if let Err(e) = refresh_peer(config, &target, peer, current) {
                eprintln!(
                    "refresh: peer {}: {e:#}; keeping the current endpoint and retrying",
                    peer.public_key_text
                );
            }
        }
    }
}
