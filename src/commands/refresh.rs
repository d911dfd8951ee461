//! `refresh`: keep endpoints given as host names pointing where the names point now, and bring
//! the tunnel back at once when the host's network changes or the machine wakes up.
//!
//! WireGuard resolves nothing itself. This loop resolves each such endpoint in the host
//! namespace every `dynamicEndpointRefreshSeconds`, and at once when the peer's latest
//! handshake is overdue, and moves the peer in place when the address changed: the interface,
//! its sessions and the namespace stay as they are. Failures are logged and retried; they
//! never touch a running tunnel.
//!
//! It also listens to rtnetlink in the namespace it runs in (the host's): when a default route
//! or an address comes or goes, or when CLOCK_BOOTTIME has run ahead of CLOCK_MONOTONIC (the
//! machine slept), every peer's endpoint is resolved again and the peer handshakes anew. A
//! session from before the change may be dead on the server's side while the client still
//! trusts it; WireGuard's own timers would notice only 15 s or more later, or, for wireguard-go,
//! whose timers stop during sleep, later still.

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
/// A change of the host's network is acted on once it has been quiet this long...
const SETTLE: Duration = Duration::from_millis(500);
/// ...or this long after the first change of a storm that does not settle.
const SETTLE_MAX: Duration = Duration::from_secs(3);
/// Two re-handshakes for network changes are at least this far apart.
const MIN_GAP: Duration = Duration::from_secs(2);
/// CLOCK_BOOTTIME ran this much further than CLOCK_MONOTONIC between two looks: the machine
/// was asleep in between.
const RESUME_JUMP: Duration = Duration::from_secs(2);

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
    let backend = state.backend.context("the state file names no backend")?;
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

/// Coalesces the host's network changes (a storm of route and address messages when a link
/// comes up) into one re-handshake, and keeps re-handshakes apart.
#[derive(Default)]
struct Debounce {
    first: Option<Instant>,
    last: Option<Instant>,
    fired: Option<Instant>,
}

impl Debounce {
    fn note(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// Whether to act now; if so, the changes noted so far count as handled.
    fn take(&mut self, now: Instant) -> bool {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return false;
        };
        let settled = now.duration_since(last) >= SETTLE || now.duration_since(first) >= SETTLE_MAX;
        let spaced = self
            .fired
            .is_none_or(|fired| now.duration_since(fired) >= MIN_GAP);
        if !(settled && spaced) {
            return false;
        }
        *self = Debounce {
            fired: Some(now),
            ..Debounce::default()
        };
        true
    }
}

/// Notices a suspend: CLOCK_MONOTONIC stands still while the machine sleeps, CLOCK_BOOTTIME
/// does not.
struct SleepDetector {
    offset: Duration,
}

impl SleepDetector {
    fn new() -> SleepDetector {
        SleepDetector {
            offset: boot_offset(),
        }
    }

    /// Whether the machine slept since the last call, given the current offset.
    fn slept(&mut self, offset: Duration) -> bool {
        let jumped = offset.saturating_sub(self.offset) >= RESUME_JUMP;
        self.offset = offset;
        jumped
    }
}

/// How far CLOCK_BOOTTIME is ahead of CLOCK_MONOTONIC: the time spent asleep since boot.
fn boot_offset() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    let read = |clock| clock_gettime(clock).map_or(Duration::ZERO, Duration::from);
    read(ClockId::CLOCK_BOOTTIME).saturating_sub(read(ClockId::CLOCK_MONOTONIC))
}

/// After a change of the host's network: resolve again where the endpoint is a name, and
/// handshake anew through the network as it is now.
fn rehandshake_all(config: &Config, target: &Target, peers: &[&Peer], on_device: &OnDevice) {
    for peer in peers {
        let Some(endpoint) = &peer.endpoint else {
            continue;
        };
        let current = on_device.get(&peer.public_key.0).and_then(|(e, _)| *e);
        let resolved = match wireguard::resolve(endpoint) {
            Ok(address) => Some(address),
            Err(e) => {
                eprintln!(
                    "refresh: peer {}: resolving {endpoint}: {e}; keeping {}",
                    peer.public_key_text,
                    current.map_or("no endpoint".to_string(), |c| c.to_string())
                );
                None
            }
        };
        match wireguard::rehandshake(
            config.interface(),
            target.backend,
            &target.fd,
            &peer.public_key,
            resolved,
        ) {
            Ok(()) => eprintln!(
                "refresh: peer {}: handshaking again with {}",
                peer.public_key_text,
                resolved
                    .or(current)
                    .map_or("no endpoint".to_string(), |a| a.to_string())
            ),
            Err(e) => eprintln!("refresh: peer {}: {e:#}", peer.public_key_text),
        }
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
    let with_endpoint: Vec<&Peer> = config
        .peers
        .iter()
        .filter(|p| p.endpoint.is_some())
        .collect();
    if with_endpoint.is_empty() {
        eprintln!("refresh: no peer has an endpoint; nothing to do");
        return Ok(());
    }
    // Where this process runs is the host's network: its changes are what matter.
    let mut watcher = crate::system::link::ChangeWatcher::here()
        .context("watching the host's routes and addresses")?;
    let mut debounce = Debounce::default();
    let mut sleep = SleepDetector::new();

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
        let changed = watcher.wait(TICK)?;
        let now = Instant::now();
        if changed {
            debounce.note(now);
        }
        if sleep.slept(boot_offset()) {
            eprintln!("refresh: the machine woke from sleep");
            debounce.note(now);
        }
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
        if debounce.take(now) {
            rehandshake_all(config, &target, &with_endpoint, &on_device);
            continue;
        }
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

    #[test]
    fn network_changes_are_coalesced_and_spaced() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debounce::default();
        assert!(!d.take(t0), "nothing noted, nothing to do");
        d.note(t0);
        d.note(t0 + ms(200));
        assert!(!d.take(t0 + ms(400)), "not settled yet");
        assert!(d.take(t0 + ms(700)), "quiet for 500 ms");
        assert!(!d.take(t0 + ms(1300)), "handled");
        // A storm that never settles is acted on after SETTLE_MAX, then no sooner than MIN_GAP.
        for n in 0..=29 {
            d.note(t0 + ms(1000 + n * 100));
        }
        assert!(!d.take(t0 + ms(3900)));
        assert!(d.take(t0 + ms(4000)), "three seconds into the storm");
        d.note(t0 + ms(4100));
        assert!(!d.take(t0 + ms(5000)), "too soon after the last one");
        assert!(d.take(t0 + ms(6000)));
    }

    #[test]
    fn sleep_is_a_jump_of_boottime_over_monotonic() {
        let secs = Duration::from_secs;
        let mut s = SleepDetector { offset: secs(100) };
        assert!(!s.slept(secs(100)));
        assert!(!s.slept(Duration::from_millis(101_500)), "clock noise");
        assert!(s.slept(secs(3700)), "an hour asleep");
        assert!(!s.slept(secs(3700)));
    }
}
