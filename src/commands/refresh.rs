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
//!
//! For peers with alternatives it puts the next server in place of one that stopped answering
//! (see [`crate::commands::failover`]).
//!
//! Between these it sleeps: until a change of the host's network, or the earliest of what is
//! due (a name's next resolution, a handshake becoming overdue, failover's next look). While
//! nothing is, it wakes every [`HORIZON`] only to see whether the machine slept, and looks at
//! nothing else.
//!
//! SIGTERM (systemd stopping the unit) or SIGINT wakes it too: it finishes the step it is in,
//! removes its snapshot socket (if that is still its own) and exits 0, leaving the namespace
//! as it is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};

use crate::commands::failover::{Counters, Decision, Watch};
use crate::config::{Config, Endpoint, EndpointHost, Key, Peer, PresharedKey};
use crate::system::files::FileIdentity;
use crate::system::state::{self, FailoverRecord, Phase, State};
use crate::system::wireguard::{self, Backend, PeerSettings};
use crate::system::{companion, stop};

/// WireGuard rekeys every 120 s while traffic flows; a handshake older than this (plus the
/// retry slack the protocol allows) means the peer has stopped answering.
const HANDSHAKE_OVERDUE: Duration = Duration::from_secs(135);
/// Re-resolution because of an overdue handshake happens at most this often per peer.
const OVERDUE_RETRY: Duration = Duration::from_secs(15);
/// The longest the loop sleeps while nothing is due. The sleep runs on CLOCK_BOOTTIME: a
/// suspend longer than what was left of it ends it at resume, and a shorter one is noticed
/// within this long.
const HORIZON: Duration = Duration::from_secs(60);
/// How soon a look is made again when the namespace is not up (yet) or its device cannot be
/// read, and at a server just put in place.
const SOON: Duration = Duration::from_millis(500);
/// How soon a peer none of whose servers is on the device is looked at again.
const RECHECK: Duration = Duration::from_secs(5);
/// How long a failover waits for the namespace's lock to record a switch.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// A change of the host's network is acted on once it has been quiet this long...
const SETTLE: Duration = Duration::from_millis(500);
/// ...or this long after the first change of a storm that does not settle.
const SETTLE_MAX: Duration = Duration::from_secs(3);
/// Two re-handshakes for network changes are at least this far apart.
const MIN_GAP: Duration = Duration::from_secs(2);
/// CLOCK_BOOTTIME ran this much further than CLOCK_MONOTONIC between two looks: the machine
/// was asleep in between.
const RESUME_JUMP: Duration = Duration::from_secs(2);

/// Whether a peer has a server whose endpoint is a name to keep resolved.
fn refreshable(peer: &Peer, once: bool) -> bool {
    (0..peer.server_count())
        .any(|i| matches!(peer.server(i).2, Some(e) if matches!(e.host, EndpointHost::Name(_))))
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
    let fd = state.open_netns().with_context(|| {
        format!("network namespace {ns:?} is gone or is not the one wg-namespace made")
    })?;
    Ok(Target { backend, fd })
}

/// What this process learned about its names, for `status` (see
/// [`crate::system::endpoints::Learned`]); None in `refresh --once`, which ends at once.
static LEARNED: std::sync::Mutex<Option<crate::system::endpoints::Learned>> =
    std::sync::Mutex::new(None);

/// Resolves `endpoint` now, and notes the outcome for `status`.
fn resolve(endpoint: &Endpoint) -> std::io::Result<SocketAddr> {
    let resolved = wireguard::resolve(endpoint);
    if let EndpointHost::Name(_) = endpoint.host
        && let Some(learned) = LEARNED.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
    {
        learned.note(&endpoint.to_string(), resolved.is_ok());
    }
    resolved
}

/// Resolves one server's endpoint and moves its peer when the address changed.
fn refresh_server(
    config: &Config,
    target: &Target,
    (key, key_text, endpoint): (&Key, &str, Option<&Endpoint>),
    current: Option<SocketAddr>,
) -> Result<()> {
    let endpoint = endpoint.context("peer has no endpoint")?;
    let resolved = resolve(endpoint).with_context(|| format!("resolving {endpoint}"))?;
    if let Err(e) =
        crate::system::endpoints::remember(&config.namespace, &[(endpoint.to_string(), resolved)])
    {
        eprintln!("refresh: cannot keep the address of {endpoint}: {e:#}");
    }
    if current != Some(resolved) {
        wireguard::set_endpoint(
            config.interface(),
            target.backend,
            &target.fd,
            key,
            resolved,
        )?;
        eprintln!(
            "refresh: peer {key_text}: endpoint {endpoint} now {resolved} (was {})",
            current.map_or("unset".to_string(), |c| c.to_string())
        );
    }
    Ok(())
}

/// What the device says about one of its peers.
#[derive(Debug, Clone, Copy)]
struct DevicePeer {
    endpoint: Option<SocketAddr>,
    counters: Counters,
}

/// The device's peers by public key.
type OnDevice = HashMap<[u8; 32], DevicePeer>;

fn device_peers(config: &Config, target: &Target) -> Result<OnDevice> {
    let device = wireguard::show(config.interface(), target.backend, &target.fd)?;
    Ok(device
        .peers
        .iter()
        .map(|p| {
            let counters = Counters {
                rx: p.stats.rx_bytes,
                tx: p.stats.tx_bytes,
                handshake: p.stats.last_handshake_time,
            };
            (
                p.config.public_key.0,
                DevicePeer {
                    endpoint: p.config.endpoint,
                    counters,
                },
            )
        })
        .collect())
}

/// One configured peer as the loop follows it.
struct Tracked<'c> {
    peer: &'c Peer,
    /// When the name of its server's endpoint is resolved again.
    schedule: Option<Schedule>,
    /// Its servers, when it has alternatives.
    failover: Option<Watch>,
    /// What the state file says about "no server answers".
    recorded_all_down: bool,
}

impl<'c> Tracked<'c> {
    fn new(peer: &'c Peer, start: Instant, once: bool) -> Tracked<'c> {
        Tracked {
            peer,
            schedule: refreshable(peer, once).then(|| {
                Schedule::new(
                    start,
                    Duration::from_secs(peer.dynamic_endpoint_refresh_seconds),
                )
            }),
            failover: (!peer.alternatives.is_empty()).then(|| {
                Watch::new(
                    peer.server_count(),
                    0,
                    Duration::from_secs(peer.failover_after_seconds),
                )
            }),
            recorded_all_down: false,
        }
    }

    /// The server the device holds for this peer: the one the loop follows, or else whichever
    /// of the peer's servers is there (after a switch that failed half-way, after `up`).
    fn sync(&mut self, on_device: &OnDevice) -> Option<usize> {
        let on = |i: usize| on_device.contains_key(&self.peer.server(i).0.0);
        let active = self.failover.as_ref().map_or(0, Watch::active);
        if on(active) {
            return Some(active);
        }
        let found = (0..self.peer.server_count()).find(|&i| on(i))?;
        if let Some(watch) = &mut self.failover {
            watch.set_active(found);
        }
        Some(found)
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Changes this peer's failover record in the state file, under the namespace's lock.
fn record(config: &Config, peer: &Peer, change: impl FnOnce(&mut FailoverRecord)) -> Result<()> {
    let recorded = state::update_up(&config.namespace, LOCK_WAIT, |state| {
        if let Some(record) = state
            .peers
            .iter_mut()
            .find(|r| r.public_key == peer.public_key_text)
        {
            change(record.failover.get_or_insert_with(|| FailoverRecord {
                active: 0,
                active_public_key: peer.public_key_text.clone(),
                last_switch_at: None,
                last_switch_reason: None,
                all_down_since: None,
                switches: 0,
            }));
        }
    })?;
    ensure!(recorded, "namespace {:?} is not up", config.namespace);
    Ok(())
}

/// Server `index` of `peer` as it goes on the device: with the peer's allowed IPs and
/// keepalive, its endpoint resolved and its preshared key read now.
fn server_settings(peer: &Peer, index: usize) -> Result<PeerSettings> {
    let (key, _, endpoint) = peer.server(index);
    let endpoint = endpoint.context("no endpoint")?;
    let address = resolve(endpoint).with_context(|| format!("resolving {endpoint}"))?;
    let (field, preshared_key) = match index.checked_sub(1) {
        None => ("presharedKeyFile".to_string(), &peer.preshared_key),
        Some(i) => (
            format!("alternatives[{i}].presharedKeyFile"),
            &peer.alternatives[i].preshared_key,
        ),
    };
    let preshared_key = match preshared_key {
        None => None,
        Some(PresharedKey::Inline(key)) => Some(key.clone()),
        Some(PresharedKey::File(path)) => Some(wireguard::read_key_file(&field, path)?.0),
    };
    Ok(PeerSettings {
        public_key: key.clone(),
        preshared_key,
        endpoint: Some(address),
        persistent_keepalive: peer.persistent_keepalive,
        allowed_ips: peer.allowed_ips.clone(),
    })
}

/// Puts the first server from `to` on that can be reached (its name resolves, its key file
/// reads) in the place of server `from`: recorded in the state file first, then one device
/// update. On failure `from` stays, and is watched again.
fn switch(
    config: &Config,
    target: &Target,
    tracked: &mut Tracked,
    from: usize,
    to: usize,
    silent: Duration,
) {
    let peer = tracked.peer;
    let Some(watch) = tracked.failover.as_mut() else {
        return;
    };
    let count = peer.server_count();
    let (old_key, old_text, old_endpoint) = peer.server(from);
    let reason = format!(
        "{old_text} ({}) left what the tunnel sent unanswered for {}s",
        old_endpoint.map_or("no endpoint".to_string(), |e| e.to_string()),
        silent.as_secs()
    );
    let all_down = watch.all_down();
    for candidate in (0..count)
        .map(|step| (to + step) % count)
        .filter(|&c| c != from)
    {
        let (_, text, endpoint) = peer.server(candidate);
        let settings = match server_settings(peer, candidate) {
            Ok(settings) => settings,
            Err(e) => {
                eprintln!(
                    "refresh: peer {}: skipping server {text}: {e:#}",
                    peer.public_key_text
                );
                continue;
            }
        };
        let recorded = record(config, peer, |f| {
            f.active = candidate;
            f.active_public_key = text.to_string();
            f.last_switch_at = Some(unix_now());
            f.last_switch_reason = Some(reason.clone());
            f.switches += 1;
            f.all_down_since = if all_down {
                f.all_down_since.or(Some(unix_now()))
            } else {
                None
            };
        });
        let switched = recorded.and_then(|()| {
            wireguard::replace_peer(
                config.interface(),
                target.backend,
                &target.fd,
                old_key,
                &settings,
            )
        });
        match switched {
            Ok(()) => {
                watch.set_active(candidate);
                tracked.recorded_all_down = all_down;
                eprintln!(
                    "refresh: peer {}: switched to server {text} ({}) because {reason}",
                    peer.public_key_text,
                    endpoint.map_or("no endpoint".to_string(), |e| e.to_string()),
                );
            }
            Err(e) => {
                watch.set_active(from);
                eprintln!(
                    "refresh: peer {}: switching to server {text}: {e:#}; keeping {old_text}",
                    peer.public_key_text
                );
            }
        }
        return;
    }
    watch.set_active(from);
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

    /// When [`Schedule::take`] will say yes next, given the handshake's age `now`: the next
    /// turn, or the moment the handshake becomes overdue (then every [`OVERDUE_RETRY`]).
    fn next(&self, now: Instant, handshake_age: Option<Duration>) -> Instant {
        // `take` wants the age past HANDSHAKE_OVERDUE, not at it.
        let overdue_at = match handshake_age {
            Some(age) => now + HANDSHAKE_OVERDUE.saturating_sub(age) + Duration::from_millis(1),
            None => now,
        };
        let retry_at = self
            .last_overdue_try
            .map_or(overdue_at, |tried| overdue_at.max(tried + OVERDUE_RETRY));
        self.next_due.min(retry_at)
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

    /// When [`Debounce::take`] will say yes, if changes are waiting.
    fn due(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        let settled = (last + SETTLE).min(first + SETTLE_MAX);
        Some(
            self.fired
                .map_or(settled, |fired| settled.max(fired + MIN_GAP)),
        )
    }

    /// Whether to act now; if so, the changes noted so far count as handled.
    fn take(&mut self, now: Instant) -> bool {
        if self.due().is_none_or(|due| now < due) {
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
fn rehandshake(
    config: &Config,
    target: &Target,
    server: (&Key, &str, Option<&Endpoint>),
    current: Option<SocketAddr>,
) {
    let (key, key_text, endpoint) = server;
    let Some(endpoint) = endpoint else {
        return;
    };
    let resolved = match resolve(endpoint) {
        Ok(address) => Some(address),
        Err(e) => {
            eprintln!(
                "refresh: peer {key_text}: resolving {endpoint}: {e}; keeping {}",
                current.map_or("no endpoint".to_string(), |c| c.to_string())
            );
            None
        }
    };
    match wireguard::rehandshake(
        config.interface(),
        target.backend,
        &target.fd,
        key,
        resolved,
    ) {
        Ok(()) => eprintln!(
            "refresh: peer {key_text}: handshaking again with {}",
            resolved
                .or(current)
                .map_or("no endpoint".to_string(), |a| a.to_string())
        ),
        Err(e) => eprintln!("refresh: peer {key_text}: {e:#}"),
    }
}

/// Answers the namespace's snapshot socket from a thread of its own (see
/// [`crate::system::companion`]); returns the socket file's identity, to remove it when
/// stopping. `None` when the socket cannot be made, which leaves the rest of refresh's work
/// unharmed.
fn answer_snapshots(namespace: &str, access: companion::Access) -> Option<FileIdentity> {
    let (listener, identity) = match companion::listen(namespace, access) {
        Ok(made) => made,
        Err(e) => {
            eprintln!("refresh: no snapshot socket: {e:#}");
            return None;
        }
    };
    let name = namespace.to_string();
    let serving = std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let mut inspector = crate::commands::status::Inspector::new(&name);
            companion::serve(listener, access, || {
                serde_json::to_vec(&inspector.inspect()).unwrap_or_default()
            })
        });
    match serving {
        Ok(_) => Some(identity),
        Err(e) => {
            eprintln!("refresh: no snapshot thread: {e}");
            // Nothing answers on it: no one should find it.
            let _ = companion::remove(namespace, identity);
            None
        }
    }
}

/// Waits, with no timeout, until a stop is asked for.
fn wait_for_stop(stop: &OwnedFd) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    while !stop::requested() {
        let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::NONE);
    }
}

pub fn run(config: &Config, once: bool, access: companion::Access) -> Result<()> {
    let start = Instant::now();
    if once {
        let target = target(config)?;
        let on_device = device_peers(config, &target)?;
        for peer in config.peers.iter().filter(|p| refreshable(p, true)) {
            let mut tracked = Tracked::new(peer, start, true);
            let Some(active) = tracked.sync(&on_device) else {
                continue;
            };
            let server = peer.server(active);
            let current = on_device.get(&server.0.0).and_then(|d| d.endpoint);
            refresh_server(config, &target, server, current)
                .with_context(|| format!("refresh: peer {}", peer.public_key_text))?;
        }
        return Ok(());
    }
    let mut tracked: Vec<Tracked> = config
        .peers
        .iter()
        .filter(|p| p.endpoint.is_some())
        .map(|p| Tracked::new(p, start, false))
        .collect();
    *LEARNED.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(crate::system::endpoints::Learned::new(&config.namespace));
    // Before the socket is made: a stop from then on removes it.
    let stop = stop::install()?;
    let snapshots = answer_snapshots(&config.namespace, access);
    let result = if tracked.is_empty() {
        if snapshots.is_none() {
            eprintln!("refresh: no peer has an endpoint and there is no snapshot socket");
            return Ok(());
        }
        eprintln!("refresh: no peer has an endpoint; answering the snapshot socket only");
        wait_for_stop(&stop);
        Ok(())
    } else {
        follow(config, &mut tracked, &stop)
    };
    // Stopped (SIGTERM from systemd) or failed: the socket goes with the process that answers
    // it. Only our own: another refresh may have put its socket in its place since.
    if let Some(identity) = snapshots
        && let Err(e) = companion::remove(&config.namespace, identity)
    {
        eprintln!("refresh: {e:#}");
    }
    result
}

/// The loop: follows the peers until a stop is asked for.
fn follow(config: &Config, tracked: &mut [Tracked], stop: &OwnedFd) -> Result<()> {
    // An outage on record from before a restart is cleared by the first answer, too.
    if let Ok(Some(state)) = State::load(&config.namespace) {
        for t in tracked.iter_mut() {
            t.recorded_all_down = state.peers.iter().any(|r| {
                r.public_key == t.peer.public_key_text
                    && r.failover
                        .as_ref()
                        .is_some_and(|f| f.all_down_since.is_some())
            });
        }
    }
    // Where this process runs is the host's network: its changes are what matter.
    let mut watcher = crate::system::link::ChangeWatcher::here()
        .context("watching the host's routes and addresses")?;
    let mut debounce = Debounce::default();
    let mut sleep = SleepDetector::new();

    let mut waiting_reported = false;
    // When the peers are looked at next: at once, then when the earliest thing is due; None
    // while nothing is (the loop still wakes every HORIZON, to notice a sleep).
    let mut planned = Some(Instant::now());
    while !stop::requested() {
        let horizon = Instant::now() + HORIZON;
        let wake = [debounce.due(), planned]
            .into_iter()
            .flatten()
            .fold(horizon, Instant::min);
        crate::system::process::return_freed_memory();
        let changed = watcher.wait(wake.saturating_duration_since(Instant::now()), stop.as_fd())?;
        if stop::requested() {
            break;
        }
        let now = Instant::now();
        if changed {
            debounce.note(now);
        }
        if sleep.slept(boot_offset()) {
            eprintln!("refresh: the machine woke from sleep");
            debounce.note(now);
        }
        let network_changed = debounce.take(now);
        if !network_changed && planned.is_none_or(|at| now < at) {
            continue;
        }
        planned = Some(now + SOON);
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
        planned = tracked
            .iter_mut()
            .filter_map(|t| visit(config, &target, t, &on_device, now, network_changed))
            .min();
    }
    Ok(())
}

/// Looks at one peer: handshakes anew after a network change, lets failover decide, resolves
/// its name when due. Returns when it needs the next look.
fn visit(
    config: &Config,
    target: &Target,
    t: &mut Tracked,
    on_device: &OnDevice,
    now: Instant,
    network_changed: bool,
) -> Option<Instant> {
    let Some(active) = t.sync(on_device) else {
        // None of its servers is on the device (being made again by heal, say): look again
        // before long if there is anything to watch.
        return (t.failover.is_some() || t.schedule.is_some()).then_some(now + RECHECK);
    };
    let server = t.peer.server(active);
    let device = on_device[&server.0.0];
    let handshake_age = device
        .counters
        .handshake
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    let named = matches!(server.2, Some(e) if matches!(e.host, EndpointHost::Name(_)));
    let next = |t: &Tracked| -> Option<Instant> {
        let look = t
            .failover
            .as_ref()
            .map(|w| w.next_look().unwrap_or(now + SOON));
        let resolve = t
            .schedule
            .as_ref()
            .filter(|_| named)
            .map(|s| s.next(now, handshake_age));
        look.into_iter().chain(resolve).min()
    };
    if network_changed {
        rehandshake(config, target, server, device.endpoint);
        return next(t);
    }
    if let Some(watch) = &mut t.failover {
        match watch.observe(now, device.counters) {
            Decision::Wait => {}
            Decision::Probe => {
                eprintln!(
                    "refresh: peer {}: no answer for {}s; asking for a handshake",
                    server.1,
                    watch.dwell().as_secs()
                );
                rehandshake(config, target, server, device.endpoint);
                return next(t);
            }
            Decision::Switch { from, to, silent } => {
                switch(config, target, t, from, to, silent);
                return next(t);
            }
        }
        if t.recorded_all_down && !watch.all_down() {
            match record(config, t.peer, |f| f.all_down_since = None) {
                Ok(()) => t.recorded_all_down = false,
                Err(e) => eprintln!("refresh: {e:#}"),
            }
        }
    }
    if let Some(schedule) = t.schedule.as_mut().filter(|_| named)
        && schedule.take(now, handshake_age)
        && let Err(e) = refresh_server(config, target, server, device.endpoint)
    {
        eprintln!(
            "refresh: peer {}: {e:#}; keeping the current endpoint and retrying",
            server.1
        );
    }
    next(t)
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
    fn sleeps_until_the_next_resolution_or_the_handshake_going_overdue() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut s = Schedule::new(t0, secs(600));
        assert!(s.take(t0, Some(secs(10))));
        // Fresh handshake: until it is overdue (135 s after it), before the next turn.
        let next = s.next(t0, Some(secs(10)));
        assert!(
            next > t0 + secs(125) && next < t0 + secs(126),
            "{:?}",
            next - t0
        );
        assert!(!s.take(next - Duration::from_millis(2), Some(secs(135))));
        assert!(s.take(next, Some(secs(136))));
        // Overdue: every 15 s after the last try.
        assert_eq!(s.next(next, Some(secs(136))), next + OVERDUE_RETRY);
        // A name resolved every minute with a fresh handshake: the next turn.
        let mut s = Schedule::new(t0, secs(60));
        assert!(s.take(t0, Some(secs(1))));
        assert_eq!(s.next(t0, Some(secs(1))), t0 + secs(60));
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
        assert_eq!(d.due(), Some(t0 + ms(6000)), "MIN_GAP after the last one");
        assert!(d.take(t0 + ms(6000)));
        assert_eq!(d.due(), None, "nothing waits");
        d.note(t0 + ms(9000));
        assert_eq!(d.due(), Some(t0 + ms(9500)), "once quiet for SETTLE");
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
