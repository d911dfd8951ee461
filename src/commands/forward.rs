//! `port-forward`: keep the VPN provider's forwarded port mapped, open and known.
//!
//! The process lives inside the namespace, so its NAT-PMP requests (RFC 6886, through the
//! `natpmp` crate) can only leave through the tunnel. It maps each configured protocol,
//! renews at half the granted lifetime (never more than the one asked for), and maps again at
//! once when the gateway restarted (its epoch went backwards) or the tunnel changed under it (a
//! new interface, other peers, a rebuilt namespace). When the port changes it moves the port in
//! the namespace's nft set in one transaction and runs `onPortChange` once, beside the renewals.
//! A port is open only while its mapping lasts, and never one below 1024 or one a relay serves;
//! failures are retried with a backoff and reported in the record `status` reads.
//!
//! It sleeps until something is due: a renewal or retry, the end of a mapping, the hook's exit
//! or deadline, a signal, or a sign that the tunnel changed (a link event in the namespace, a
//! change of the namespace's state file, which heal, reload, failover and up/down all write),
//! with a slow check in case a change came without one.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::{Config, PortForwarding, Protocol};
use crate::system::forwarding::{self, ForwardedPort, Phase, Record, unix_now};
use crate::system::process::{Contained, ProcessId};
use crate::system::state::{self, State};
use crate::system::{stop, wireguard};

/// How often the namespace is looked for while it is not up (no event tells of it then).
const TICK: Duration = Duration::from_secs(1);
/// The tunnel is looked at this often even when no event said it changed: endpoint changes of
/// the same server, say, come with none.
const SAFETY_CHECK: Duration = Duration::from_secs(60);
/// A change of the state file is looked at again this much later: failover records a switch
/// there just before it makes it.
const SETTLE: Duration = Duration::from_secs(2);
/// One request waits at most this long, its retries included (RFC 6886 3.1: 250 ms, doubled
/// per retry; 250 + 500 + 1000 + 2000 ms is four sends).
const REQUEST_DEADLINE: Duration = Duration::from_millis(3750);
/// The longest wait between two attempts while the gateway fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// `onPortChange` gets this long, then it is killed with every process it started.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// A failed `onPortChange` is tried again after this, doubling, at most [`MAX_BACKOFF`].
const COMMAND_RETRY: Duration = Duration::from_secs(5);
/// ProtonVPN's request (`natpmpc -a 1 0 udp 60`): internal port 0 and public port 1 ask for a
/// symmetric mapping, the public port the gateway picks forwarded to the same port inside.
const INTERNAL_PORT: u16 = 0;
const PUBLIC_PORT: u16 = 1;

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
            // A gateway granting more than was asked would be renewed too seldom to notice
            // its restart in time: the lifetime asked for is what counts.
            let lifetime = u32::try_from(mapping.lifetime().as_secs())
                .unwrap_or(u32::MAX)
                .min(settings.lifetime_seconds);
            granted.push(Granted {
                protocol,
                port: mapping.public_port(),
                lifetime,
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

/// Why a granted port is not opened: one below 1024, or one a relay of the namespace serves
/// (publishPorts, hostServices), whatever its protocol. The gateway picks the port; it must not
/// pick which of the namespace's services the tunnel reaches.
fn refused_port(config: &Config, port: u16) -> Option<String> {
    if port < 1024 {
        return Some(format!("port {port} is below 1024"));
    }
    if config
        .publish_ports
        .iter()
        .any(|p| p.namespace_port == port)
    {
        return Some(format!("port {port} is a publishPorts namespacePort"));
    }
    if config
        .host_services
        .iter()
        .any(|s| s.namespace_port == port)
    {
        return Some(format!("port {port} is a hostServices namespacePort"));
    }
    None
}

/// `onPortChange`, running.
struct RunningHook {
    process: Contained,
    port: u16,
    deadline: Instant,
}

/// `onPortChange`'s side: which port it was last told, apart from the mapping, so that a port
/// granted again (after a lapse, a restart that kept it, a tunnel change) is not told twice.
#[derive(Default)]
struct Hook {
    running: Option<RunningHook>,
    /// The port the hook last finished successfully for.
    told: Option<u16>,
    /// Failed runs in a row for `failed_port`, and when to try again.
    failures: u32,
    failed_port: Option<u16>,
    retry_at: Option<Instant>,
}

/// Starts `onPortChange <port>` inside the namespace as its user, through `wg-namespace exec`
/// (the namespace's resolv.conf, the host's resolvers hidden) and without a shell, as PID 1 of
/// a PID namespace of its own, so that whatever it starts dies with it. The port is an argument
/// and in the environment; nothing else of ours is.
fn start_hook(
    config: &Config,
    settings: &PortForwarding,
    program: &std::path::Path,
    port: u16,
    ports: &[ForwardedPort],
) -> Result<Contained> {
    let exe = std::env::current_exe().context("finding wg-namespace's own executable")?;
    let mut args: Vec<OsString> = ["exec", "--namespace", &config.namespace, "--user"]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.push(settings.on_port_change_user.clone().into());
    args.push("--".into());
    args.push(program.into());
    args.push(port.to_string().into());
    let mut env: Vec<(String, OsString)> = vec![
        ("PATH".into(), std::env::var_os("PATH").unwrap_or_default()),
        ("WG_NAMESPACE".into(), config.namespace.clone().into()),
        (
            "WG_NAMESPACE_FORWARDED_PORT".into(),
            port.to_string().into(),
        ),
    ];
    for p in ports {
        env.push((
            format!(
                "WG_NAMESPACE_FORWARDED_{}_PORT",
                p.protocol.as_str().to_ascii_uppercase()
            ),
            p.port.to_string().into(),
        ));
    }
    Contained::spawn(&exe, &args, &env).with_context(|| format!("starting {}", program.display()))
}

/// The process moves into the namespace: every socket it opens, the NAT-PMP ones first of all,
/// can then only leave through the tunnel (the leak guard sees to that).
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
    while !stop::requested() {
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

/// Link notifications (RTMGRP_LINK) of the namespace the process is in: the interface deleted,
/// made anew, taken down.
fn link_events() -> Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )
    .context("opening a netlink socket")?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
    )
    .context("listening to link events")?;
    Ok(fd)
}

/// Reads whatever is queued on `fd` and throws it away; the event is that something came.
fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8192];
    while nix::unistd::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
}

/// Changes of the namespace's state file. Its own inode is watched, not the directory (where
/// every namespace's files come and go): a save replaces it by rename, which the old inode
/// hears of as a change of its links, and then its removal. One event, whatever it is, means
/// looking again; the watch is made anew on the file then at the path.
fn state_events(namespace: &str) -> Result<nix::sys::inotify::Inotify> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .context("making an inotify instance")?;
    let path = state::state_path(namespace);
    inotify
        .add_watch(
            &path,
            AddWatchFlags::IN_ATTRIB
                | AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_DONT_FOLLOW,
        )
        .with_context(|| format!("watching {}", path.display()))?;
    Ok(inotify)
}

/// What woke the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The deadline [`Forwarder::next_wakeup`] gave came.
    Due,
    /// Something in the namespace or its state file changed: look at the tunnel now.
    TunnelMayHaveChanged,
    /// The state file changed: look now, and once more in a moment.
    StateChanged,
    /// `onPortChange` exited.
    HookExited,
}

/// The forwarding of one namespace, as a component: [`Forwarder::next_wakeup`] says when it
/// must be woken at the latest, [`Forwarder::sources`] what else wakes it, and
/// [`Forwarder::handle`] does what is due.
pub struct Forwarder<'a> {
    config: &'a Config,
    settings: &'a PortForwarding,
    fd: OwnedFd,
    /// The tunnel as last seen, kept while it is missing: it is compared with what comes back.
    tunnel: Option<Tunnel>,
    tunnel_up: bool,
    mapping: Option<Mapping>,
    epoch: Option<(u32, Instant)>,
    next_attempt: Instant,
    failures: u32,
    /// The shortest lifetime the gateway granted last time.
    granted_lifetime: Option<u32>,
    reason: Option<String>,
    hook: Hook,
    written: Option<Record>,
    /// When the tunnel is looked at next, and a second look after a state change.
    next_check: Instant,
    settle_at: Option<Instant>,
    links: Option<OwnedFd>,
    states: Option<nix::sys::inotify::Inotify>,
    /// Whether an event since the last turn calls for comparing the nft set with the mapping.
    compare_firewall: bool,
    me: ProcessId,
}

impl<'a> Forwarder<'a> {
    fn new(config: &'a Config, settings: &'a PortForwarding, fd: OwnedFd) -> Forwarder<'a> {
        let now = Instant::now();
        let mut forwarder = Forwarder {
            config,
            settings,
            fd,
            tunnel: None,
            tunnel_up: false,
            mapping: None,
            epoch: None,
            next_attempt: now,
            failures: 0,
            granted_lifetime: None,
            reason: None,
            hook: Hook::default(),
            written: None,
            next_check: now,
            settle_at: None,
            links: None,
            states: None,
            compare_firewall: true,
            me: ProcessId::current(),
        };
        forwarder.watch();
        forwarder
    }

    /// (Re)opens the event sources that are missing; without them the tunnel is looked at
    /// every [`TICK`].
    fn watch(&mut self) {
        if self.links.is_none() {
            self.links = link_events()
                .map_err(|e| eprintln!("port-forward: {e:#}"))
                .ok();
        }
        if self.states.is_none() {
            // Missing while the namespace is not up: looked for again at each check.
            self.states = state_events(&self.config.namespace).ok();
        }
    }

    /// The descriptors whose readiness is an event, with the event.
    pub fn sources(&self) -> Vec<(BorrowedFd<'_>, Event)> {
        let mut sources = Vec::new();
        if let Some(links) = &self.links {
            sources.push((links.as_fd(), Event::TunnelMayHaveChanged));
        }
        if let Some(states) = &self.states {
            sources.push((states.as_fd(), Event::StateChanged));
        }
        if let Some(running) = &self.hook.running {
            sources.push((running.process.exit_fd(), Event::HookExited));
        }
        sources
    }

    /// When [`Forwarder::handle`] must run next at the latest.
    pub fn next_wakeup(&self) -> Instant {
        let mut wake = self.next_check;
        if self.tunnel_up {
            wake = wake.min(self.next_attempt);
        }
        if let Some(mapping) = &self.mapping {
            wake = wake.min(mapping.expires);
        }
        if let Some(running) = &self.hook.running {
            wake = wake.min(running.deadline);
        } else if let Some(retry) = self.hook.retry_at
            && self.hook_wanted().is_some()
        {
            wake = wake.min(retry);
        }
        wake
    }

    /// Takes in `event` (reading what its source queued), then does whatever is due.
    pub fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Due => {}
            Event::TunnelMayHaveChanged => {
                if let Some(links) = &self.links {
                    drain(links.as_fd());
                }
                self.next_check = now;
                self.compare_firewall = true;
            }
            Event::StateChanged => {
                // Watched again (on the file then at the path) when the tunnel is looked at.
                self.states = None;
                self.next_check = now;
                self.settle_at = Some(now + SETTLE);
                self.compare_firewall = true;
            }
            Event::HookExited => self.reap_hook(),
        }
        self.step();
    }

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

    /// One failed attempt: the reason shown, the next one after a backoff.
    fn failed(&mut self, why: String, cap: Duration) {
        self.failures += 1;
        let wait = backoff(self.failures, cap);
        let reason = format!(
            "{why} (attempt {}, next in {}s)",
            self.failures,
            wait.as_secs()
        );
        eprintln!("port-forward: {reason}");
        self.reason = Some(reason);
        self.next_attempt = Instant::now() + wait;
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
            Err(e) => return self.failed(format!("{e:#}"), cap),
        };
        if let Some(refused) = round
            .granted
            .iter()
            .find_map(|g| refused_port(self.config, g.port))
        {
            // Whatever the gateway forwards now is not what we had: nothing stays open.
            self.close("the gateway moved it");
            return self.failed(
                format!(
                    "gateway {} granted {refused}; it is not opened",
                    self.settings.gateway
                ),
                cap,
            );
        }
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
        }
    }

    /// The port `onPortChange` has yet to be told, if any.
    fn hook_wanted(&self) -> Option<u16> {
        self.settings.on_port_change.as_ref()?;
        let port = self.mapping.as_ref()?.primary();
        (self.hook.told != Some(port)).then_some(port)
    }

    /// Starts the hook when the mapped port is one it was not told yet, and deals with it once
    /// past its deadline. It runs beside the loop: renewals go on meanwhile.
    fn drive_hook(&mut self, now: Instant) {
        if let Some(running) = &self.hook.running {
            if now >= running.deadline {
                self.expire_hook();
            }
            return;
        }
        let Some(port) = self.hook_wanted() else {
            return;
        };
        if self.hook.failed_port != Some(port) {
            self.hook.failures = 0;
            self.hook.failed_port = None;
            self.hook.retry_at = None;
        }
        if self.hook.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let (Some(program), Some(mapping)) = (&self.settings.on_port_change, &self.mapping) else {
            return;
        };
        match start_hook(self.config, self.settings, program, port, &mapping.ports) {
            Ok(process) => {
                let deadline = now + COMMAND_DEADLINE;
                // Killed on time even while a request round to a silent gateway holds the
                // loop (up to 3.75 s a request); the loop notes it when it comes back.
                if let Err(e) = process.kill_at(deadline) {
                    eprintln!("port-forward: onPortChange: {e:#}");
                }
                self.hook.running = Some(RunningHook {
                    process,
                    port,
                    deadline,
                })
            }
            Err(e) => self.hook_failed(port, &format!("{e:#}")),
        }
    }

    /// Ends the hook that outlived its deadline (killed already, or now), and says so.
    fn expire_hook(&mut self) {
        let Some(running) = self.hook.running.take() else {
            return;
        };
        // Dropping it kills it, and its PID namespace with all it started, and reaps it.
        drop(running.process);
        self.hook_failed(
            running.port,
            &format!(
                "{} {} did not finish within {}s; killed it and all it started",
                self.hook_program(),
                running.port,
                COMMAND_DEADLINE.as_secs()
            ),
        );
    }

    fn hook_failed(&mut self, port: u16, why: &str) {
        let hook = &mut self.hook;
        hook.failures = if hook.failed_port == Some(port) {
            hook.failures + 1
        } else {
            1
        };
        hook.failed_port = Some(port);
        let wait =
            (COMMAND_RETRY * 2u32.saturating_pow(hook.failures - 1).min(64)).min(MAX_BACKOFF);
        eprintln!(
            "port-forward: onPortChange: {why}; trying again in {}s",
            wait.as_secs()
        );
        hook.retry_at = Some(Instant::now() + wait);
    }

    fn hook_program(&self) -> String {
        self.settings
            .on_port_change
            .as_deref()
            .unwrap_or(std::path::Path::new("onPortChange"))
            .display()
            .to_string()
    }

    /// Collects the hook's exit, if it has exited (its namespace, and all it started, is gone
    /// with it).
    fn reap_hook(&mut self) {
        let Some(running) = self.hook.running.as_mut() else {
            return;
        };
        if Instant::now() >= running.deadline {
            // Killed at its deadline, not ended by itself.
            return self.expire_hook();
        }
        let status = match running.process.try_wait() {
            Ok(None) => return,
            Ok(Some(status)) => Ok(status),
            Err(e) => Err(e),
        };
        let port = running.port;
        self.hook.running = None;
        let program = self.hook_program();
        match status {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => {
                eprintln!("port-forward: {program} {port} succeeded");
                self.hook.told = Some(port);
                self.hook.failures = 0;
                self.hook.failed_port = None;
                self.hook.retry_at = None;
            }
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => self.hook_failed(
                port,
                &format!("{program} {port} failed: exit status {code}"),
            ),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _)) => self.hook_failed(
                port,
                &format!("{program} {port} was killed by {}", signal.as_str()),
            ),
            Ok(other) => self.hook_failed(port, &format!("{program} {port}: {other:?}")),
            Err(e) => self.hook_failed(port, &format!("{e:#}")),
        }
    }

    /// A namespace made anew (down and up again) is entered anew; the application restarted
    /// with it, so the hook tells it the port again.
    fn follow_namespace(&mut self) {
        let identity = namespace_identity(&self.config.namespace).ok();
        let current = nix::sys::stat::fstat(self.fd.as_fd())
            .ok()
            .map(|s| (s.st_dev, s.st_ino));
        if identity.is_none() || identity == current {
            return;
        }
        match enter(&self.config.namespace) {
            Ok(fd) => {
                eprintln!("port-forward: the namespace was made anew; mapping again");
                self.fd = fd;
                self.mapping = None;
                self.epoch = None;
                self.next_attempt = Instant::now();
                if let Some(running) = self.hook.running.take() {
                    // It was telling an application that is gone.
                    drop(running.process);
                }
                self.hook = Hook::default();
                // Link events come from the namespace the socket was made in.
                self.links = None;
                self.watch();
            }
            Err(e) => eprintln!("port-forward: {e:#}"),
        }
    }

    /// Looks at the namespace and the tunnel; false while they are not up.
    fn check_tunnel(&mut self, now: Instant) -> bool {
        self.watch();
        self.follow_namespace();
        let observed = observe(self.config, &self.fd);
        let watched = self.links.is_some() && self.states.is_some();
        self.next_check = now + if watched { SAFETY_CHECK } else { TICK };
        match self.settle_at {
            Some(at) if at > now => self.next_check = self.next_check.min(at),
            _ => self.settle_at = None,
        }
        match observed {
            Ok(tunnel) => {
                if let Some(before) = &self.tunnel
                    && *before != tunnel
                {
                    eprintln!("port-forward: the tunnel changed; mapping again");
                    self.next_attempt = now;
                    self.epoch = None;
                    self.compare_firewall = true;
                }
                self.tunnel = Some(tunnel);
                self.tunnel_up = true;
                true
            }
            Err(e) => {
                if self.reason.is_none() {
                    eprintln!("port-forward: waiting: {e:#}");
                }
                self.reason = Some(format!("waiting: {e:#}"));
                self.tunnel_up = false;
                self.compare_firewall = true;
                // Nothing tells of the namespace coming back but looking.
                self.next_check = now + TICK;
                false
            }
        }
    }

    /// Does what is due now.
    fn step(&mut self) {
        let now = Instant::now();
        if self.mapping.as_ref().is_some_and(|m| now >= m.expires) {
            self.close("its mapping expired");
        }
        if now >= self.next_check && !self.check_tunnel(now) {
            self.drive_hook(now);
            self.publish();
            return;
        }
        if self.tunnel_up && now >= self.next_attempt {
            self.attempt();
        }
        // The set is compared with the mapping after an event only (a reload or heal may have
        // loaded a ruleset from an older record): a renewal changes nothing there, and a
        // listing costs an `nft` process.
        if std::mem::take(&mut self.compare_firewall)
            && let Err(e) = self.enforce_firewall()
        {
            let reason = format!("{e:#}");
            if self.reason.as_deref() != Some(&reason) {
                eprintln!("port-forward: {reason}");
            }
            self.reason = Some(reason);
        }
        // The record first: when the application hears of the port, other units can read it.
        self.publish();
        self.drive_hook(Instant::now());
        self.publish();
    }

    fn record(&self) -> Record {
        let phase = match (&self.mapping, &self.reason) {
            (Some(_), None) => Phase::Mapped,
            (None, None) => Phase::Requesting,
            (_, Some(_)) => Phase::Retrying,
        };
        let mut reason = self.reason.clone();
        if self.hook.failures > 0
            && let Some(port) = self.hook.failed_port
            && self.hook_wanted() == Some(port)
        {
            reason.get_or_insert_with(|| {
                format!(
                    "onPortChange has not succeeded for port {port} ({} failures)",
                    self.hook.failures
                )
            });
        }
        Record {
            namespace: self.config.namespace.clone(),
            gateway: self.settings.gateway,
            process: self.me,
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
}

/// Waits for the first of `forwarder`'s sources, the stop pipe, or its next wake-up.
fn wait(forwarder: &Forwarder<'_>, stop: &OwnedFd) -> Vec<Event> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let sources = forwarder.sources();
    let mut fds: Vec<PollFd<'_>> = sources
        .iter()
        .map(|(fd, _)| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
    let left = forwarder
        .next_wakeup()
        .saturating_duration_since(Instant::now());
    // Rounded up: woken a little late rather than spinning just before the deadline.
    let left = left + Duration::from_micros(999);
    let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
    crate::system::process::return_freed_memory();
    match poll(&mut fds, timeout) {
        Ok(0) | Err(_) => vec![Event::Due],
        Ok(_) => {
            let ready = |fd: &PollFd<'_>| {
                fd.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP)
                })
            };
            let mut events: Vec<Event> = sources
                .iter()
                .zip(&fds)
                .filter(|(_, fd)| ready(fd))
                .map(|((_, event), _)| *event)
                .collect();
            if events.is_empty() {
                events.push(Event::Due);
            }
            events
        }
    }
}

pub fn run(config: &Config) -> Result<()> {
    let settings = config
        .port_forwarding
        .as_ref()
        .context("the config has no portForwarding")?;
    let stop = stop::install()?;
    let Some(fd) = enter_when_there(&config.namespace) else {
        return Ok(());
    };
    let mut forwarder = Forwarder::new(config, settings, fd);
    forwarder.handle(Event::Due);
    while !stop::requested() {
        for event in wait(&forwarder, &stop) {
            if stop::requested() {
                break;
            }
            forwarder.handle(event);
        }
    }
    // Stopping: the hook is killed, the port closes with us, and the record goes.
    drop(forwarder.hook.running.take());
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
