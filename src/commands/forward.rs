//! `port-forward`: keep the VPN provider's forwarded port mapped, open and known.
//!
//! The process lives inside the namespace, so its NAT-PMP requests (RFC 6886, through the
//! `natpmp` crate) can only leave through the tunnel. It maps each configured protocol,
//! renews at half the granted lifetime, and maps again at once when the gateway restarted
//! (its epoch went backwards) or the tunnel changed under it (a new interface, other peers,
//! a rebuilt namespace). When the port changes it moves the port in the namespace's nft set
//! in one transaction and runs `onPortChange` once. A port is open only while its mapping
//! lasts; failures are retried with a backoff and reported in the record `status` reads.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::{Config, PortForwarding, Protocol};
use crate::system::forwarding::{self, ForwardedPort, Phase, Record, unix_now};
use crate::system::process::ProcessId;
use crate::system::state::{self, State};
use crate::system::wireguard;

const TICK: Duration = Duration::from_secs(1);
/// One request waits at most this long, its retries included (RFC 6886 3.1: 250 ms, doubled
/// per retry; 250 + 500 + 1000 + 2000 ms is four sends).
const REQUEST_DEADLINE: Duration = Duration::from_millis(3750);
/// The longest wait between two attempts while the gateway fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// `onPortChange` gets this long, then its process group is killed.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// A failed `onPortChange` is tried again after this, doubling, at most [`MAX_BACKOFF`].
const COMMAND_RETRY: Duration = Duration::from_secs(5);
/// ProtonVPN's request (`natpmpc -a 1 0 udp 60`): internal port 0 and public port 1 ask for a
/// symmetric mapping, the public port the gateway picks forwarded to the same port inside.
const INTERNAL_PORT: u16 = 0;
const PUBLIC_PORT: u16 = 1;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(request_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// What the tunnel is, as far as a mapping depends on it: a change means the gateway that
/// granted the mapping may not be the one we reach now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tunnel {
    /// The namespace's identity (`/run/netns/<ns>`'s device and inode).
    namespace: (u64, u64),
    ifindex: u32,
    /// Public keys and endpoints of the peers, sorted.
    peers: Vec<(String, Option<String>)>,
}

fn namespace_identity(namespace: &str) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(crate::system::netns::path(namespace))
        .with_context(|| format!("namespace {namespace:?} is gone"))?;
    Ok((meta.dev(), meta.ino()))
}

/// The namespace and tunnel as they are now; `None` while the namespace is not up.
fn observe(config: &Config, fd: &OwnedFd) -> Result<Tunnel> {
    let ns = &config.namespace;
    let state = State::load(ns)?
        .filter(|s| s.phase == state::Phase::Up)
        .ok_or_else(|| anyhow!("namespace {ns:?} is not up"))?;
    let backend = state.backend.context("the state file names no backend")?;
    let ifindex = nix::net::if_::if_nametoindex(config.interface())
        .with_context(|| format!("the interface {} is missing", config.interface()))?;
    let device = wireguard::show(config.interface(), backend, fd)?;
    let mut peers: Vec<(String, Option<String>)> = device
        .peers
        .iter()
        .map(|p| {
            (
                p.config.public_key.to_base64(),
                p.config.endpoint.map(|e| e.to_string()),
            )
        })
        .collect();
    peers.sort();
    Ok(Tunnel {
        namespace: namespace_identity(ns)?,
        ifindex,
        peers,
    })
}

/// RFC 6886 3.6: the gateway lost its mappings when its epoch is more than 2 s behind what
/// 7/8 of our elapsed time predicts (its clock may run slower than ours).
fn gateway_restarted(previous: Option<(u32, Instant)>, epoch: u32, now: Instant) -> bool {
    let Some((last_epoch, seen_at)) = previous else {
        return false;
    };
    let elapsed = now.saturating_duration_since(seen_at).as_secs();
    let expected = u64::from(last_epoch) + elapsed * 7 / 8;
    u64::from(epoch) + 2 < expected
}

/// Seconds to wait after `failures` failed attempts in a row: 1, 2, 4, ... at most `cap`.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exponent).min(cap)
}

struct Granted {
    protocol: Protocol,
    port: u16,
    lifetime: u32,
}

/// One mapping request for `protocol`, on a socket of its own (opened here, so in the
/// namespace and answered only from the gateway's address), within `deadline`.
fn request(
    gateway: Ipv4Addr,
    protocol: Protocol,
    lifetime: u32,
    deadline: Duration,
) -> Result<natpmp::MappingResponse> {
    use natpmp::{Error, Natpmp, Response};
    let mut client =
        Natpmp::new_with(gateway).map_err(|e| anyhow!("opening a NAT-PMP socket: {e}"))?;
    let wanted = match protocol {
        Protocol::Udp => natpmp::Protocol::UDP,
        Protocol::Tcp => natpmp::Protocol::TCP,
    };
    client
        .send_port_mapping_request(wanted, INTERNAL_PORT, PUBLIC_PORT, lifetime)
        .map_err(|e| anyhow!("asking gateway {gateway}: {e}"))?;
    let end = Instant::now() + deadline;
    loop {
        match client.read_response_or_retry() {
            Ok(Response::UDP(m)) if protocol == Protocol::Udp => return Ok(m),
            Ok(Response::TCP(m)) if protocol == Protocol::Tcp => return Ok(m),
            // A late answer to an earlier request: not ours to use.
            Ok(_) | Err(Error::NATPMP_TRYAGAIN) => {}
            Err(Error::NATPMP_ERR_NOGATEWAYSUPPORT) => {
                bail!("gateway {gateway} does not answer NAT-PMP (port 5351 closed or silent)")
            }
            Err(e) => bail!(
                "gateway {gateway} refused the {} mapping: {e}",
                protocol.as_str()
            ),
        }
        let now = Instant::now();
        if now >= end {
            bail!(
                "gateway {gateway} did not answer within {:.1}s",
                deadline.as_secs_f32()
            );
        }
        let retry_in = client.get_natpmp_request_timeout().unwrap_or_default();
        std::thread::sleep(retry_in.min(end - now).max(Duration::from_millis(10)));
    }
}

/// The gateway's answers to one round of requests, and whether its epoch showed a restart.
struct Round {
    granted: Vec<Granted>,
    restarted: bool,
}

/// Asks for every protocol in turn, each request within [`REQUEST_DEADLINE`] and all of them
/// before `end`. A restart seen after the first answer means the earlier answers came from the
/// gateway's previous life: the round is asked once more.
fn request_round(
    settings: &PortForwarding,
    epoch: &mut Option<(u32, Instant)>,
    end: Instant,
) -> Result<Round> {
    let mut restarted_any = false;
    for _ in 0..2 {
        let mut granted = Vec::new();
        let mut restarted_late = false;
        for &protocol in &settings.protocols {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("gateway {} did not answer in time", settings.gateway);
            }
            let mapping = request(
                settings.gateway,
                protocol,
                settings.lifetime_seconds,
                left.min(REQUEST_DEADLINE),
            )?;
            if mapping.public_port() == 0 || mapping.lifetime().is_zero() {
                bail!(
                    "gateway {} granted no {} port",
                    settings.gateway,
                    protocol.as_str()
                );
            }
            let now = Instant::now();
            if gateway_restarted(*epoch, mapping.epoch(), now) {
                eprintln!(
                    "port-forward: gateway {} restarted (its epoch went back to {}s); mapping again",
                    settings.gateway,
                    mapping.epoch()
                );
                restarted_any = true;
                restarted_late |= !granted.is_empty();
            }
            *epoch = Some((mapping.epoch(), now));
            granted.push(Granted {
                protocol,
                port: mapping.public_port(),
                lifetime: u32::try_from(mapping.lifetime().as_secs()).unwrap_or(u32::MAX),
            });
        }
        if !restarted_late {
            return Ok(Round {
                granted,
                restarted: restarted_any,
            });
        }
    }
    bail!(
        "gateway {} keeps restarting while being asked",
        settings.gateway
    )
}

/// The mapping in force.
struct Mapping {
    ports: Vec<ForwardedPort>,
    /// When the shortest of its lifetimes ends, on our clock.
    expires: Instant,
}

impl Mapping {
    fn primary(&self) -> u16 {
        self.ports[0].port
    }
}

/// `onPortChange`, waiting to run for `port`.
struct PendingCommand {
    port: u16,
    ports: Vec<ForwardedPort>,
    due: Instant,
    failures: u32,
}

/// Runs `onPortChange <port>` inside the namespace as its user, through `wg-namespace exec`
/// (the namespace's resolv.conf, the host's resolvers hidden) and without a shell. The port is
/// an argument and in the environment; nothing else of ours is.
fn run_command(
    config: &Config,
    settings: &PortForwarding,
    program: &std::path::Path,
    port: u16,
    ports: &[ForwardedPort],
) -> Result<()> {
    let exe = std::env::current_exe().context("finding wg-namespace's own executable")?;
    let mut command = Command::new(exe);
    command
        .args(["exec", "--namespace", &config.namespace, "--user"])
        .arg(&settings.on_port_change_user)
        .arg("--")
        .arg(program)
        .arg(port.to_string())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("WG_NAMESPACE", &config.namespace)
        .env("WG_NAMESPACE_FORWARDED_PORT", port.to_string())
        .stdin(Stdio::null())
        .process_group(0);
    for p in ports {
        command.env(
            format!(
                "WG_NAMESPACE_FORWARDED_{}_PORT",
                p.protocol.as_str().to_ascii_uppercase()
            ),
            p.port.to_string(),
        );
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let deadline = Instant::now() + COMMAND_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().context("waiting for onPortChange")? {
            if status.success() {
                return Ok(());
            }
            bail!("{} {port} failed: {status}", program.display());
        }
        if Instant::now() >= deadline || stopping() {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            bail!(
                "{} {port} did not finish within {}s and was killed",
                program.display(),
                COMMAND_DEADLINE.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole process moves into the namespace: every socket it opens, the NAT-PMP ones
/// first of all, can then only leave through the tunnel (the leak guard sees to that).
fn enter(namespace: &str) -> Result<OwnedFd> {
    let state = State::load(namespace)?
        .filter(|s| s.phase == state::Phase::Up)
        .ok_or_else(|| anyhow!("namespace {namespace:?} is not up"))?;
    let fd = state
        .scope()
        .open_netns()
        .ok_or_else(|| anyhow!("namespace {namespace:?} is not the one wg-namespace recorded"))?;
    nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
        .context("entering the network namespace")?;
    Ok(fd)
}

/// Waits (reporting once) until the namespace exists, then enters it.
fn enter_when_there(namespace: &str) -> Option<OwnedFd> {
    let mut reported = false;
    while !stopping() {
        match enter(namespace) {
            Ok(fd) => return Some(fd),
            Err(e) if !reported => {
                eprintln!("port-forward: waiting: {e:#}");
                reported = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(TICK);
    }
    None
}

struct Forwarder<'a> {
    config: &'a Config,
    settings: &'a PortForwarding,
    fd: OwnedFd,
    tunnel: Option<Tunnel>,
    mapping: Option<Mapping>,
    epoch: Option<(u32, Instant)>,
    next_attempt: Instant,
    failures: u32,
    /// The shortest lifetime the gateway granted last time.
    granted_lifetime: Option<u32>,
    reason: Option<String>,
    command: Option<PendingCommand>,
    written: Option<Record>,
}

impl Forwarder<'_> {
    fn wanted_open(&self) -> Vec<ForwardedPort> {
        self.mapping
            .as_ref()
            .map(|m| m.ports.clone())
            .unwrap_or_default()
    }

    /// Puts the set right when it differs from the mapping: after a reload that loaded an
    /// older record, or when someone else changed it.
    fn enforce_firewall(&mut self) -> Result<()> {
        let wanted = self.wanted_open();
        let mut have = forwarding::open_ports(&self.fd)?;
        let mut want: Vec<(Protocol, u16)> = wanted.iter().map(|p| (p.protocol, p.port)).collect();
        have.sort_by_key(|&(p, port)| (p.as_str(), port));
        want.sort_by_key(|&(p, port)| (p.as_str(), port));
        if have != want {
            forwarding::set_open_ports(&self.fd, &wanted)?;
        }
        Ok(())
    }

    fn close(&mut self, why: &str) {
        if let Some(mapping) = self.mapping.take() {
            eprintln!("port-forward: port {} closed: {why}", mapping.primary());
        }
        if let Err(e) = forwarding::set_open_ports(&self.fd, &[]) {
            eprintln!("port-forward: {e:#}");
        }
    }

    fn attempt(&mut self) {
        let now = Instant::now();
        // Requests must not keep a port open past its mapping's end (give or take a second).
        let round_time = REQUEST_DEADLINE * 2 * self.settings.protocols.len() as u32;
        let end = self.mapping.as_ref().map_or(now + round_time, |m| {
            m.expires
                .max(now + Duration::from_secs(1))
                .min(now + round_time)
        });
        // Retries come at least as often as renewals would, so that a gateway back from a short
        // silence finds us before the mapping it still holds lapses.
        let lifetime = self
            .granted_lifetime
            .unwrap_or(self.settings.lifetime_seconds);
        let cap =
            Duration::from_secs(u64::from(lifetime / 2)).clamp(Duration::from_secs(1), MAX_BACKOFF);
        // Lifetimes count from the request, not the answer: the gateway's clock started first.
        let (asked, asked_wall) = (now, unix_now());
        let round = match request_round(self.settings, &mut self.epoch, end) {
            Ok(round) => round,
            Err(e) => {
                self.failures += 1;
                let wait = backoff(self.failures, cap);
                let reason = format!(
                    "{e:#} (attempt {}, next in {}s)",
                    self.failures,
                    wait.as_secs()
                );
                eprintln!("port-forward: {reason}");
                self.reason = Some(reason);
                self.next_attempt = Instant::now() + wait;
                return;
            }
        };
        self.failures = 0;
        self.reason = None;
        let now = Instant::now();
        let shortest = round.granted.iter().map(|g| g.lifetime).min().unwrap_or(0);
        self.granted_lifetime = Some(shortest);
        let ports: Vec<ForwardedPort> = round
            .granted
            .iter()
            .map(|g| ForwardedPort {
                protocol: g.protocol,
                port: g.port,
                expires_at: asked_wall + u64::from(g.lifetime),
            })
            .collect();
        let previous = self.mapping.as_ref().map(|m| {
            m.ports
                .iter()
                .map(|p| (p.protocol, p.port))
                .collect::<Vec<_>>()
        });
        let changed = previous != Some(ports.iter().map(|p| (p.protocol, p.port)).collect());
        if round.restarted && !changed {
            eprintln!("port-forward: the gateway kept port {}", ports[0].port);
        }
        self.mapping = Some(Mapping {
            ports: ports.clone(),
            expires: asked + Duration::from_secs(u64::from(shortest)),
        });
        // Renew at half the lifetime (RFC 6886 3.3), never sooner than a second from now.
        self.next_attempt = now + Duration::from_secs(u64::from(shortest / 2)).max(TICK);
        if changed {
            let list = ports
                .iter()
                .map(|p| format!("{} {}", p.protocol.as_str(), p.port))
                .collect::<Vec<_>>()
                .join(", ");
            // The set first: when the application hears of the port, it is already open.
            match forwarding::set_open_ports(&self.fd, &ports) {
                Ok(()) => eprintln!("port-forward: forwarded {list}, open in the firewall"),
                Err(e) => eprintln!("port-forward: forwarded {list}, but {e:#}"),
            }
            if self.settings.on_port_change.is_some() {
                self.command = Some(PendingCommand {
                    port: ports[0].port,
                    ports,
                    due: now,
                    failures: 0,
                });
            }
        }
    }

    fn run_pending_command(&mut self) {
        let Some(program) = self.settings.on_port_change.clone() else {
            return;
        };
        let Some(pending) = self.command.as_mut() else {
            return;
        };
        if Instant::now() < pending.due {
            return;
        }
        match run_command(
            self.config,
            self.settings,
            &program,
            pending.port,
            &pending.ports,
        ) {
            Ok(()) => {
                eprintln!(
                    "port-forward: {} {} succeeded",
                    program.display(),
                    pending.port
                );
                self.command = None;
            }
            Err(e) => {
                pending.failures += 1;
                let wait = (COMMAND_RETRY * 2u32.saturating_pow(pending.failures - 1).min(64))
                    .min(MAX_BACKOFF);
                eprintln!(
                    "port-forward: onPortChange: {e:#}; trying again in {}s",
                    wait.as_secs()
                );
                pending.due = Instant::now() + wait;
            }
        }
    }

    fn record(&self) -> Record {
        let phase = match (&self.mapping, &self.reason) {
            (Some(_), None) => Phase::Mapped,
            (None, None) => Phase::Requesting,
            (_, Some(_)) => Phase::Retrying,
        };
        let mut reason = self.reason.clone();
        if let Some(pending) = &self.command.as_ref().filter(|c| c.failures > 0) {
            reason.get_or_insert_with(|| {
                format!(
                    "onPortChange has not succeeded for port {} ({} failures)",
                    pending.port, pending.failures
                )
            });
        }
        Record {
            namespace: self.config.namespace.clone(),
            gateway: self.settings.gateway,
            process: ProcessId::current(),
            phase,
            port: self.mapping.as_ref().map(Mapping::primary),
            ports: self.wanted_open(),
            reason,
            updated_at: unix_now(),
        }
    }

    fn publish(&mut self) {
        let record = self.record();
        let same = self.written.as_ref().is_some_and(|w| {
            Record {
                updated_at: 0,
                ..w.clone()
            } == Record {
                updated_at: 0,
                ..record.clone()
            }
        });
        if same {
            return;
        }
        match record.save() {
            Ok(()) => self.written = Some(record),
            Err(e) => eprintln!("port-forward: {e:#}"),
        }
    }

    /// One turn of the loop.
    fn turn(&mut self) {
        let now = Instant::now();
        if self.mapping.as_ref().is_some_and(|m| now >= m.expires) {
            self.close("its mapping expired");
        }
        match observe(self.config, &self.fd) {
            Ok(tunnel) => {
                if let Some(before) = &self.tunnel
                    && *before != tunnel
                {
                    eprintln!("port-forward: the tunnel changed; mapping again");
                    self.next_attempt = now;
                    self.epoch = None;
                }
                self.tunnel = Some(tunnel);
            }
            Err(e) => {
                if self.reason.is_none() {
                    eprintln!("port-forward: waiting: {e:#}");
                }
                self.reason = Some(format!("waiting: {e:#}"));
                self.tunnel = None;
                return;
            }
        }
        if now >= self.next_attempt {
            self.attempt();
        }
        if let Err(e) = self.enforce_firewall() {
            let reason = format!("{e:#}");
            if self.reason.as_deref() != Some(&reason) {
                eprintln!("port-forward: {reason}");
            }
            self.reason = Some(reason);
        }
        // The record first: when the application hears of the port, other units can read it.
        self.publish();
        self.run_pending_command();
    }
}

pub fn run(config: &Config) -> Result<()> {
    let settings = config
        .port_forwarding
        .as_ref()
        .context("the config has no portForwarding")?;
    install_stop_handlers()?;
    let Some(fd) = enter_when_there(&config.namespace) else {
        return Ok(());
    };
    let mut forwarder = Forwarder {
        config,
        settings,
        fd,
        tunnel: None,
        mapping: None,
        epoch: None,
        next_attempt: Instant::now(),
        failures: 0,
        granted_lifetime: None,
        reason: None,
        command: None,
        written: None,
    };
    while !stopping() {
        // A namespace made anew (down and up again) is entered anew.
        let identity = namespace_identity(&config.namespace).ok();
        let current = nix::sys::stat::fstat(forwarder.fd.as_fd())
            .ok()
            .map(|s| (s.st_dev, s.st_ino));
        if identity.is_some() && identity != current {
            match enter(&config.namespace) {
                Ok(fd) => {
                    eprintln!("port-forward: the namespace was made anew; mapping again");
                    forwarder.fd = fd;
                    forwarder.mapping = None;
                    forwarder.epoch = None;
                    forwarder.next_attempt = Instant::now();
                }
                Err(e) => eprintln!("port-forward: {e:#}"),
            }
        }
        forwarder.turn();
        forwarder.publish();
        let mut wake = forwarder.next_attempt.min(Instant::now() + TICK);
        if let Some(mapping) = &forwarder.mapping {
            wake = wake.min(mapping.expires);
        }
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    // Stopping: the port closes with us, and the record goes.
    forwarder.close("port forwarding stopped");
    forwarding::remove_record(&config.namespace)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_that_went_back_means_a_restart() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        assert!(!gateway_restarted(None, 0, t0), "nothing to compare yet");
        // 100 s later the gateway's epoch should be about 100 s further.
        assert!(!gateway_restarted(Some((1000, t0)), 1100, t0 + secs(100)));
        // A slow gateway clock (7/8 of ours) and 2 s of slack are tolerated.
        assert!(!gateway_restarted(Some((1000, t0)), 1086, t0 + secs(100)));
        assert!(gateway_restarted(Some((1000, t0)), 1080, t0 + secs(100)));
        assert!(gateway_restarted(Some((1000, t0)), 3, t0 + secs(1)));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let cap = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(1000, cap), cap);
    }
}
