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
use crate::system::state::{Phase, State};
use crate::system::wireguard::{self, Backend};

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
        fd: crate::system::netns::open(ns)?,
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

/// When one peer's name is resolved again: every `every`, and at once (but at most every
/// [`OVERDUE_RETRY`]) while its handshake is overdue.
struct Schedule {
    every: Duration,
    next_due: Instant,
    last_overdue_try: Option<Instant>,
}

impl Schedule {
    fn new(start: Instant, every: Duration) -> Schedule {
        Schedule {
            every,
            next_due: start,
            last_overdue_try: None,
        }
    }

    /// Whether to resolve now; if so, the next turn is planned.
    fn take(&mut self, now: Instant, handshake_age: Option<Duration>) -> bool {
        let overdue = handshake_age.is_none_or(|age| age > HANDSHAKE_OVERDUE);
        let retry_allowed = self
            .last_overdue_try
            .is_none_or(|t| now.duration_since(t) >= OVERDUE_RETRY);
        if !(now >= self.next_due || (overdue && retry_allowed)) {
            return false;
        }
        if overdue {
            self.last_overdue_try = Some(now);
        }
        self.next_due = now + self.every;
        true
    }
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

    let start = Instant::now();
    let mut schedules: Vec<Schedule> = peers
        .iter()
        .map(|p| {
            Schedule::new(
                start,
                Duration::from_secs(p.dynamic_endpoint_refresh_seconds),
            )
        })
        .collect();
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
        for (peer, schedule) in peers.iter().zip(&mut schedules) {
            let (current, handshake) = on_device
                .get(&peer.public_key.0)
                .copied()
                .unwrap_or((None, None));
            let handshake_age = handshake.and_then(|t| SystemTime::now().duration_since(t).ok());
            if !schedule.take(now, handshake_age) {
                continue;
            }
            if let Err(e) = refresh_peer(config, &target, peer, current) {
                eprintln!(
                    "refresh: peer {}: {e:#}; keeping the current endpoint and retrying",
                    peer.public_key_text
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_schedule_and_early_when_the_handshake_is_overdue() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let fresh = Some(secs(10));
        let mut s = Schedule::new(t0, secs(60));
        assert!(s.take(t0, fresh), "first turn at once");
        assert!(!s.take(t0 + secs(30), fresh), "not before the period");
        assert!(s.take(t0 + secs(60), fresh), "after the period");
        // The handshake goes stale (over 135 s): resolve at once, then at most every 15 s.
        let stale = Some(secs(136));
        assert!(s.take(t0 + secs(70), stale));
        assert!(!s.take(t0 + secs(80), stale));
        assert!(s.take(t0 + secs(85), stale));
        // Never a handshake counts as overdue too.
        let mut s = Schedule::new(t0, secs(3600));
        assert!(s.take(t0, None));
        assert!(s.take(t0 + secs(15), None));
    }
}
