//! Relays: a service on one side of the namespace boundary made reachable on the other by a
//! process that copies bytes. No route, forwarding or NAT joins host and namespace.
//!
//! - `publishPorts` ([`Direction::Publish`]): `up` binds the listener on the host address; the
//!   relay process runs INSIDE the namespace and connects to 127.0.0.1:namespacePort there, so
//!   every published connection arrives from 127.0.0.1.
//! - `hostServices` ([`Direction::HostService`]): `up` binds the listener on the namespace's
//!   loopback, 127.0.0.1:namespacePort; the relay process runs in the host namespace and connects
//!   to exactly hostAddress:hostPort, nowhere else.
//!
//! Sockets keep the namespace they were made in: each relay holds a listener made on one side
//! and makes its outgoing sockets on the side it runs in, without ever entering a namespace.
//! One process per entry, so that a reload restarts only what changed. Each relay drops to an
//! unprivileged user ([`RELAY_USER`] when /etc/passwd has it, else nobody) with no capabilities
//! and `no_new_privs` before it touches a socket: it parses bytes from anyone who connects.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, Protocol};
use crate::system::process::{self, Detached, ProcessId};
use crate::system::state::Resource;
use crate::system::{files, netns};

/// The system user relays run as, when it exists (the NixOS module creates it).
pub const RELAY_USER: &str = "wg-namespace";
/// The fallback: `nobody`/`nogroup` on Debian and NixOS alike.
const NOBODY: (u32, u32) = (65534, 65534);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections (TCP) or clients (UDP) relayed at once per entry, so that one entry cannot
/// exhaust the relay's threads and descriptors. Beyond it a new TCP connection is accepted and
/// closed at once, and a new UDP client takes the place of the least recently active one.
pub const MAX_SESSIONS: usize = 256;
/// Sessions one source address may hold at once per entry (loopback sources excepted, see
/// [`source_of`]), so that no one source can take all of them: over it a new TCP connection is
/// closed at once, and a new UDP client of that source takes the place of its least recently
/// active one.
pub const MAX_SESSIONS_PER_SOURCE: usize = 64;
/// A UDP session whose service never answered ends after this long without a datagram, so that
/// one-datagram clients (a scan, a flood with forged sources) do not hold sessions for the
/// whole idle timeout. A client that keeps sending keeps its session.
pub const UNANSWERED_UDP_TIMEOUT: Duration = Duration::from_secs(5);
/// A TCP connection on which nothing was sent either way ends after this long.
pub const SILENT_TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Where `up` binds each relay's counters socket (see [`session_counts`]).
pub const COUNTERS_DIR: &str = "/run/wg-namespace/relays";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// publishPorts: host address -> 127.0.0.1:namespacePort inside.
    Publish,
    /// hostServices: 127.0.0.1:namespacePort inside -> host address.
    HostService,
}

/// One relay as configured. The whole entry is its identity: a changed field is another relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub direction: Direction,
    pub protocol: Protocol,
    pub host_address: IpAddr,
    pub host_port: u16,
    pub namespace_port: u16,
    pub idle_timeout_seconds: u32,
}

impl Entry {
    pub fn host(&self) -> SocketAddr {
        SocketAddr::new(self.host_address, self.host_port)
    }

    pub fn inside(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.namespace_port)
    }

    /// Where the relay listens, and where it connects to.
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        match self.direction {
            Direction::Publish => (self.host(), self.inside()),
            Direction::HostService => (self.inside(), self.host()),
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = self.protocol.as_str();
        match self.direction {
            Direction::Publish => write!(
                f,
                "publishPorts {protocol} {} -> namespace port {}",
                self.host(),
                self.namespace_port
            ),
            Direction::HostService => write!(
                f,
                "hostServices {protocol} namespace port {} -> host {}",
                self.namespace_port,
                self.host()
            ),
        }
    }
}

/// Every relay a config asks for: publishPorts, then hostServices, each in config order.
pub fn entries(config: &Config) -> Vec<Entry> {
    let published = config.publish_ports.iter().map(|p| Entry {
        direction: Direction::Publish,
        protocol: p.protocol,
        host_address: p.host_address,
        host_port: p.host_port,
        namespace_port: p.namespace_port,
        idle_timeout_seconds: p.idle_timeout_seconds,
    });
    let services = config.host_services.iter().map(|s| Entry {
        direction: Direction::HostService,
        protocol: s.protocol,
        host_address: s.host_address,
        host_port: s.host_port,
        namespace_port: s.namespace_port,
        idle_timeout_seconds: s.idle_timeout_seconds,
    });
    published.chain(services).collect()
}

/// Binds the entry's listener on its side, starts its relay process on the other side held at
/// its gate, has `record` journal it, and only then lets it run.
pub fn start(
    entry: &Entry,
    namespace: &str,
    ns_fd: BorrowedFd<'_>,
    record: &mut dyn FnMut(Resource) -> Result<()>,
) -> Result<ProcessId> {
    let (listen, to) = entry.ends();
    let bind = || -> io::Result<OwnedFd> {
        Ok(match entry.protocol {
            Protocol::Tcp => TcpListener::bind(listen)?.into(),
            Protocol::Udp => UdpSocket::bind(listen)?.into(),
        })
    };
    let listener = match entry.direction {
        Direction::Publish => bind(),
        Direction::HostService => netns::within(ns_fd, bind)?,
    }
    .with_context(|| format!("{entry}: binding {} {listen}", entry.protocol.as_str()))?;
    let counters = bind_counters(namespace, entry)
        .with_context(|| format!("{entry}: making its counters socket"))?;
    // Once on record, the relay's undo removes its counters socket; until then, this does.
    let started = spawn_recorded(entry, namespace, ns_fd, &listener, &counters, to, record);
    if started.is_err() {
        let _ = remove_counters(namespace, entry);
    }
    let gated = started?;
    let process = gated.process;
    gated.release()?;
    Ok(process)
}

/// Starts the relay of `entry` held at its gate, and has `record` journal it.
fn spawn_recorded(
    entry: &Entry,
    namespace: &str,
    ns_fd: BorrowedFd<'_>,
    listener: &OwnedFd,
    counters: &OwnedFd,
    to: SocketAddr,
    record: &mut dyn FnMut(Resource) -> Result<()>,
) -> Result<process::Gated> {
    let (uid, gid) = relay_user()?;
    let exe = std::env::current_exe().context("finding our own executable")?;
    let argv: Vec<String> = vec![
        exe.to_string_lossy().into_owned(),
        "relay".into(),
        "--namespace".into(),
        namespace.into(),
        "--listen-fd".into(),
        listener.as_raw_fd().to_string(),
        "--protocol".into(),
        entry.protocol.as_str().into(),
        "--to".into(),
        to.to_string(),
        "--idle-timeout".into(),
        entry.idle_timeout_seconds.to_string(),
        "--uid".into(),
        uid.to_string(),
        "--gid".into(),
        gid.to_string(),
        "--counters-fd".into(),
        counters.as_raw_fd().to_string(),
    ];
    let gated = process::start_detached(Detached {
        argv: &argv,
        envs: &[],
        netns: match entry.direction {
            Direction::Publish => Some(ns_fd),
            Direction::HostService => None,
        },
        keep: &[listener.as_raw_fd(), counters.as_raw_fd()],
    })
    .with_context(|| format!("{entry}: starting its relay"))?;
    record(Resource::Relay {
        process: gated.process,
        executables: gated.executables.clone(),
        entry: *entry,
    })?;
    Ok(gated)
}

/// The relay user's uid and gid from /etc/passwd, else nobody's. Read as a file rather than
/// through NSS, so that no directory service can hold `up` up.
fn relay_user() -> Result<(u32, u32)> {
    let text = passwd()?;
    match find_user(&text, RELAY_USER) {
        Some((0, _)) | Some((_, 0)) => {
            bail!(
                "the user {RELAY_USER} in /etc/passwd has uid or gid 0; relays must not run as root"
            )
        }
        Some(ids) => Ok(ids),
        None => Ok(NOBODY),
    }
}

fn passwd() -> Result<String> {
    let bytes = files::read_regular(Path::new("/etc/passwd"), files::CONFIG_LIMIT)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The uid and gid of `name` in the text of /etc/passwd.
fn find_user(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 4 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// Refuses an `onPortChange` hook that would run as the relays' user. Any process of a uid can
/// stop, trace or kill every other process of that uid, and a stopped relay holds its port
/// without answering; the hook runs code that talks to a confined application, so it must not
/// hold that power over the relays. Where /etc/passwd cannot be read, `up` fails on its own.
pub fn hook_user_clash(config: &Config) -> Option<ConfigError> {
    let forwarding = config.port_forwarding.as_ref()?;
    forwarding.on_port_change.as_ref()?;
    if entries(config).is_empty() {
        return None;
    }
    let text = passwd().ok()?;
    let (relay_name, relay_uid) = match find_user(&text, RELAY_USER) {
        Some((uid, _)) => (RELAY_USER, uid),
        None => ("nobody", NOBODY.0),
    };
    let hook = forwarding.on_port_change_user.as_str();
    let hook_uid = hook
        .parse::<u32>()
        .ok()
        .or_else(|| find_user(&text, hook).map(|(uid, _)| uid));
    if hook != relay_name && hook_uid != Some(relay_uid) {
        return None;
    }
    let remedy = if relay_name == RELAY_USER {
        "name another user".to_string()
    } else {
        format!(
            "name another user, or create a system user for the relays: useradd --system \
             --no-create-home --shell /usr/sbin/nologin {RELAY_USER}"
        )
    };
    Some(ConfigError {
        field: "portForwarding.onPortChangeUser".into(),
        problem: format!(
            "{hook:?} is the user the relays of publishPorts and hostServices run as (uid \
             {relay_uid}), so the hook could stop or trace them; {remedy}"
        ),
    })
}

/// How the hidden `relay` command was called.
pub struct RelayArgs {
    pub listen_fd: RawFd,
    pub protocol: Protocol,
    pub to: SocketAddr,
    pub idle_timeout: Duration,
    pub uid: u32,
    pub gid: u32,
    /// The bound, not yet listening, counters socket (relays of older versions have none).
    pub counters_fd: Option<RawFd>,
}

/// The relay process. Returns only on failure.
pub fn serve(args: &RelayArgs) -> Result<()> {
    drop_privileges(args.uid, args.gid)?;
    // SAFETY: `start` passed these descriptors to us for exactly this purpose.
    let listener = unsafe { OwnedFd::from_raw_fd(args.listen_fd) };
    let counters = args
        .counters_fd
        .map(|fd| counters_listener(unsafe { OwnedFd::from_raw_fd(fd) }))
        .transpose()?;
    let limits = Limits {
        idle: args.idle_timeout,
        max: MAX_SESSIONS,
        per_source: MAX_SESSIONS_PER_SOURCE,
    };
    match args.protocol {
        Protocol::Tcp => relay_tcp(
            TcpListener::from(listener),
            args.to,
            limits,
            counters.as_ref(),
        ),
        Protocol::Udp => relay_udp(
            &UdpSocket::from(listener),
            args.to,
            limits,
            counters.as_ref(),
        ),
    }
}

/// Becomes `uid`/`gid` with no supplementary groups, no capabilities (not even in the bounding
/// set) and no way to gain privileges through exec.
fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    if uid == 0 || gid == 0 {
        bail!("a relay must not run as uid or gid 0");
    }
    crate::system::privileges::become_user(&crate::system::privileges::Credentials {
        uid: nix::unistd::Uid::from_raw(uid),
        gid: nix::unistd::Gid::from_raw(gid),
        groups: &[],
    })
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    idle: Duration,
    max: usize,
    per_source: usize,
}

/// The address a session counts against for the per-source cap, or None for a loopback
/// source: every local process has that address (all of a hostServices relay's clients do),
/// so it names no one, and such sessions share only the entry's cap.
fn source_of(client: SocketAddr) -> Option<IpAddr> {
    let ip = client.ip().to_canonical();
    (!ip.is_loopback()).then_some(ip)
}

/// Sessions open per source, and the counters the relay reports.
#[derive(Default)]
struct Tally {
    open: usize,
    per_source: HashMap<IpAddr, usize>,
    refused: u64,
    evicted: u64,
}

impl Tally {
    fn add(&mut self, source: Option<IpAddr>) {
        self.open += 1;
        if let Some(ip) = source {
            *self.per_source.entry(ip).or_default() += 1;
        }
    }

    fn remove(&mut self, source: Option<IpAddr>) {
        self.open -= 1;
        if let Some(ip) = source
            && let Some(count) = self.per_source.get_mut(&ip)
        {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&ip);
            }
        }
    }

    fn of_source(&self, source: Option<IpAddr>) -> usize {
        source.map_or(0, |ip| self.per_source.get(&ip).copied().unwrap_or(0))
    }

    fn counts(&self) -> SessionCounts {
        SessionCounts {
            open: self.open as u64,
            refused: self.refused,
            evicted: self.evicted,
        }
    }
}

/// What a relay reports about its sessions (see [`session_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionCounts {
    /// TCP connections or UDP clients relayed now.
    pub open: u64,
    /// New sessions turned away since the relay started: over the entry's or the source's cap
    /// (TCP), or no socket could be made for them.
    pub refused: u64,
    /// UDP sessions ended to make room for a new client since the relay started.
    pub evicted: u64,
}

/// The counters socket `start` bound: listening is done here, after dropping privileges, so
/// that its peer credentials name the relay itself.
fn counters_listener(fd: OwnedFd) -> Result<UnixListener> {
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(8)?)
        .context("listening on the counters socket")?;
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .context("making the counters socket non-blocking")?;
    Ok(listener)
}

/// Answers whoever connected to the counters socket with one JSON object, and hangs up. The
/// few bytes fit in an empty socket buffer: the write never waits.
fn answer_counters(listener: &UnixListener, counts: SessionCounts) {
    while let Ok((mut stream, _)) = listener.accept() {
        let _ = stream.set_nonblocking(true);
        if let Ok(text) = serde_json::to_vec(&counts) {
            let _ = stream.write_all(&text);
        }
    }
}

/// Whether poll reported anything for this descriptor.
fn is_ready(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// Waits until a descriptor is ready or `deadline` (none: no deadline at all) has come.
fn wait(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> Result<()> {
    let timeout = match deadline {
        None => PollTimeout::NONE,
        // Rounded up: a deadline less than a millisecond away must not become a busy loop.
        Some(at) => {
            let left = at.saturating_duration_since(Instant::now());
            let millis = left.as_micros().div_ceil(1000);
            PollTimeout::try_from(millis.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    match poll(fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e).context("waiting for the sockets"),
    }
}

/// Accepts connections in one thread and relays each in a thread of its own. The accepting
/// thread sleeps in poll until a connection or a counters request comes: no clock wakes it.
fn relay_tcp(
    listener: TcpListener,
    to: SocketAddr,
    limits: Limits,
    counters: Option<&UnixListener>,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    loop {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        fds.extend(counters.map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
        crate::system::process::return_freed_memory();
        wait(&mut fds, None)?;
        let ready: Vec<bool> = fds.iter().map(is_ready).collect();
        drop(fds);
        if ready[0] {
            loop {
                let (client, from) = match listener.accept() {
                    Ok(accepted) => accepted,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // Out of descriptors, say: the connection waits in the backlog, and
                        // poll would report it again at once; wait rather than spin.
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                };
                admit_tcp(client, from, to, limits, &tally);
            }
        }
        if ready.get(1) == Some(&true)
            && let Some(counters) = counters
        {
            let counts = lock(&tally).counts();
            answer_counters(counters, counts);
        }
    }
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    // A session thread that panicked left the counts whole: each change is one statement.
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Relays `client` in a thread of its own, or closes it at once when the entry or its source
/// is at its cap.
fn admit_tcp(
    client: TcpStream,
    from: SocketAddr,
    to: SocketAddr,
    limits: Limits,
    tally: &Arc<Mutex<Tally>>,
) {
    let source = source_of(from);
    {
        let mut tally = lock(tally);
        if tally.open >= limits.max || tally.of_source(source) >= limits.per_source {
            tally.refused += 1;
            return;
        }
        tally.add(source);
    }
    let done = Release {
        tally: Arc::clone(tally),
        source,
    };
    let spawned = std::thread::Builder::new().spawn(move || {
        let _done = done;
        match TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) {
            Ok(service) => splice(&client, &service, limits.idle),
            Err(e) => eprintln!("relay: connecting to {to}: {e}"),
        }
    });
    // A thread that cannot be made dropped the connection, and `done` with it.
    if spawned.is_err() {
        lock(tally).refused += 1;
    }
}

/// Counts a session as finished when dropped.
struct Release {
    tally: Arc<Mutex<Tally>>,
    source: Option<IpAddr>,
}

impl Drop for Release {
    fn drop(&mut self) {
        lock(&self.tally).remove(self.source);
    }
}

/// Copies both ways until each side has finished sending, or nothing moved either way for
/// `idle`; a peer that stops reading counts as idle too. Until the first byte moves, the
/// shorter [`SILENT_TCP_TIMEOUT`] applies: connections that never carry anything cannot hold
/// the entry's sessions for long.
fn splice(a: &TcpStream, b: &TcpStream, idle: Duration) {
    let timeout_of = |d: Duration| PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX);
    let mut timeout = timeout_of(SILENT_TCP_TIMEOUT.min(idle));
    for stream in [a, b] {
        if stream.set_write_timeout(Some(idle)).is_err() {
            return;
        }
    }
    let ends = [a, b];
    let mut open = [true, true];
    let mut buf = vec![0u8; 64 * 1024];
    while open[0] || open[1] {
        let from: Vec<usize> = (0..2).filter(|&i| open[i]).collect();
        let mut fds: Vec<PollFd> = from
            .iter()
            .map(|&i| PollFd::new(ends[i].as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, timeout) {
            Ok(0) => return,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        let ready: Vec<usize> = from
            .iter()
            .zip(&fds)
            .filter(|(_, fd)| is_ready(fd))
            .map(|(&i, _)| i)
            .collect();
        drop(fds);
        for i in ready {
            let (mut source, mut sink) = (ends[i], ends[1 - i]);
            match source.read(&mut buf) {
                Ok(0) => {
                    open[i] = false;
                    let _ = sink.shutdown(Shutdown::Write);
                }
                Ok(n) => {
                    if sink.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    timeout = timeout_of(idle);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

struct UdpSession {
    client: SocketAddr,
    /// Where the client sent its first datagram: its replies leave from there.
    local: Option<LocalEnd>,
    source: Option<IpAddr>,
    socket: UdpSocket,
    last: Instant,
    /// The service has sent something back.
    answered: bool,
}

impl UdpSession {
    /// When the session ends unless a datagram comes first.
    fn deadline(&self, idle: Duration) -> Instant {
        let timeout = if self.answered {
            idle
        } else {
            UNANSWERED_UDP_TIMEOUT.min(idle)
        };
        self.last + timeout
    }
}

/// An entry's UDP clients, each with its own socket connected to the service.
struct UdpSessions {
    list: Vec<UdpSession>,
    by_client: HashMap<SocketAddr, usize>,
    tally: Tally,
}

impl UdpSessions {
    fn remove(&mut self, index: usize) {
        let gone = self.list.swap_remove(index);
        self.by_client.remove(&gone.client);
        self.tally.remove(gone.source);
        if let Some(moved) = self.list.get(index) {
            self.by_client.insert(moved.client, index);
        }
    }

    fn expire(&mut self, now: Instant, idle: Duration) {
        let mut i = 0;
        while i < self.list.len() {
            if self.list[i].deadline(idle) <= now {
                self.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// The least recently active session, among those of `source` when given.
    fn least_recent(&self, source: Option<IpAddr>) -> Option<usize> {
        self.list
            .iter()
            .enumerate()
            .filter(|(_, s)| source.is_none() || s.source == source)
            .min_by_key(|(_, s)| s.last)
            .map(|(i, _)| i)
    }

    /// Makes room for one more session of `source`: a source at its cap gives up its own least
    /// recently active session, and a full entry its least recently active one. A burst of new
    /// clients thus never locks out the entry, and one source never displaces another.
    fn make_room(&mut self, source: Option<IpAddr>, limits: Limits) {
        let victim = if source.is_some() && self.tally.of_source(source) >= limits.per_source {
            self.least_recent(source)
        } else if self.list.len() >= limits.max {
            self.least_recent(None)
        } else {
            None
        };
        if let Some(index) = victim {
            self.remove(index);
            self.tally.evicted += 1;
        }
    }
}

/// One thread for all of an entry's UDP clients: each client gets a socket connected to `to`,
/// kept until neither side sent anything for `idle` (or, until the service first answers, for
/// [`UNANSWERED_UDP_TIMEOUT`]). It sleeps in poll until a datagram comes or the earliest
/// session ends: with no session, nothing but a datagram or a counters request wakes it.
fn relay_udp(
    outside: &UdpSocket,
    to: SocketAddr,
    limits: Limits,
    counters: Option<&UnixListener>,
) -> Result<()> {
    outside
        .set_nonblocking(true)
        .context("making the UDP listener non-blocking")?;
    ask_for_local_ends(outside)?;
    let mut control = nix::cmsg_space!(libc::in_pktinfo, libc::in6_pktinfo);
    let mut sessions = UdpSessions {
        list: Vec::new(),
        by_client: HashMap::new(),
        tally: Tally::default(),
    };
    let mut buf = vec![0u8; 65536];
    loop {
        sessions.expire(Instant::now(), limits.idle);
        let deadline = sessions.list.iter().map(|s| s.deadline(limits.idle)).min();
        let mut fds = vec![PollFd::new(outside.as_fd(), PollFlags::POLLIN)];
        fds.extend(counters.map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
        let first_session = fds.len();
        fds.extend(
            sessions
                .list
                .iter()
                .map(|s| PollFd::new(s.socket.as_fd(), PollFlags::POLLIN)),
        );
        // Only with no session left: a busy relay wakes for every datagram.
        if deadline.is_none() {
            crate::system::process::return_freed_memory();
        }
        wait(&mut fds, deadline)?;
        let ready: Vec<bool> = fds.iter().map(is_ready).collect();
        drop(fds);

        for (i, session) in sessions.list.iter_mut().enumerate() {
            if !ready[first_session + i] {
                continue;
            }
            // A refusal (ICMP port unreachable: the service is not up yet) is reported here once
            // and cleared; the session stays, so replies flow as soon as the service answers.
            while let Ok(len) = session.socket.recv(&mut buf) {
                session.last = Instant::now();
                session.answered = true;
                reply(outside, &buf[..len], session.client, session.local);
            }
        }
        if ready[0] {
            while let Ok((len, client, local)) = receive(outside, &mut buf, &mut control) {
                let index = match sessions.by_client.get(&client) {
                    Some(&index) => index,
                    None => {
                        let source = source_of(client);
                        sessions.make_room(source, limits);
                        match udp_session(to) {
                            Ok(socket) => {
                                sessions.list.push(UdpSession {
                                    client,
                                    local,
                                    source,
                                    socket,
                                    last: Instant::now(),
                                    answered: false,
                                });
                                sessions.tally.add(source);
                                let index = sessions.list.len() - 1;
                                sessions.by_client.insert(client, index);
                                index
                            }
                            Err(e) => {
                                eprintln!("relay: udp socket for {to}: {e}");
                                sessions.tally.refused += 1;
                                continue;
                            }
                        }
                    }
                };
                let session = &mut sessions.list[index];
                session.last = Instant::now();
                send_once_more_if_refused(&session.socket, &buf[..len]);
            }
        }
        if let Some(counters) = counters
            && ready[1]
        {
            answer_counters(counters, sessions.tally.counts());
        }
    }
}

/// The local address a client's datagram was sent to, as the kernel reported it with the
/// datagram. A listener on a wildcard address (0.0.0.0, ::) receives on every address of the
/// host, but a reply sent plainly leaves from the address the route to the client prefers,
/// which a client that connected its socket to another of the host's addresses drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalEnd {
    /// The local address of an IPv4 listener's datagram (`ipi_spec_dst`).
    V4(Ipv4Addr),
    /// The destination of an IPv6 listener's datagram (IPv4-mapped for an IPv4 client), with
    /// the interface it came in on when the address is link-local and so needs it.
    V6(Ipv6Addr, u32),
}

/// Has the kernel report with each datagram the address it was sent to.
fn ask_for_local_ends(outside: &UdpSocket) -> Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let local = outside.local_addr().context("the UDP listener's address")?;
    match local {
        SocketAddr::V4(_) => setsockopt(outside, sockopt::Ipv4PacketInfo, &true),
        SocketAddr::V6(_) => setsockopt(outside, sockopt::Ipv6RecvPacketInfo, &true),
    }
    .context("asking for the destination address of each datagram")
}

/// One datagram from the listener: its length, the client that sent it, and the local address
/// it was sent to.
fn receive(
    outside: &UdpSocket,
    buf: &mut [u8],
    control: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<LocalEnd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    let message = recvmsg::<SockaddrStorage>(
        outside.as_raw_fd(),
        &mut iov,
        Some(control),
        MsgFlags::empty(),
    )?;
    let client = message
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(*v4))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
        })
        .ok_or_else(|| io::Error::other("a datagram without a source address"))?;
    let local = message.cmsgs().ok().and_then(|mut cmsgs| {
        cmsgs.find_map(|cmsg| match cmsg {
            ControlMessageOwned::Ipv4PacketInfo(info) => Some(LocalEnd::V4(Ipv4Addr::from(
                u32::from_be(info.ipi_spec_dst.s_addr),
            ))),
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                let address = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                let interface = if address.is_unicast_link_local() {
                    info.ipi6_ifindex
                } else {
                    0
                };
                usable_as_source(address).then_some(LocalEnd::V6(address, interface))
            }
            _ => None,
        })
    });
    Ok((message.bytes, client, local))
}

/// Whether replies can leave from `address`, a destination an IPv6 listener reported. An IPv4
/// listener reports a local address for broadcasts on its own; an IPv6 one reports the
/// group or broadcast address itself, which no reply can come from.
fn usable_as_source(address: Ipv6Addr) -> bool {
    match address.to_ipv4_mapped() {
        Some(v4) => !v4.is_multicast() && !v4.is_broadcast() && !v4.is_unspecified(),
        None => !address.is_multicast() && !address.is_unspecified(),
    }
}

/// Sends a service's reply to `client` from `local`, the address the client sent to. Where
/// that address cannot be used (it went away, or was a subnet's broadcast address), the reply
/// leaves from the address the route prefers, as it would without it.
fn reply(outside: &UdpSocket, datagram: &[u8], client: SocketAddr, local: Option<LocalEnd>) {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    let to = SockaddrStorage::from(client);
    let iov = [io::IoSlice::new(datagram)];
    let send = |control: &[ControlMessage]| {
        sendmsg(
            outside.as_raw_fd(),
            &iov,
            control,
            MsgFlags::empty(),
            Some(&to),
        )
    };
    let (v4, v6);
    let control = match local {
        None => None,
        Some(LocalEnd::V4(address)) => {
            v4 = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(address).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            Some(ControlMessage::Ipv4PacketInfo(&v4))
        }
        Some(LocalEnd::V6(address, interface)) => {
            v6 = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: address.octets(),
                },
                ipi6_ifindex: interface,
            };
            Some(ControlMessage::Ipv6PacketInfo(&v6))
        }
    };
    let sent = send(control.as_slice());
    if control.is_some() && matches!(sent, Err(Errno::EINVAL | Errno::EADDRNOTAVAIL)) {
        let _ = send(&[]);
    }
}

fn udp_session(to: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match to.ip() {
        // From 127.0.0.1, like a TCP connection to 127.0.0.1.
        IpAddr::V4(ip) if ip.is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(to)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A refusal still pending on the socket fails the next send, which then carried nothing; the
/// failure clears it, so sending again delivers the datagram.
fn send_once_more_if_refused(socket: &UdpSocket, datagram: &[u8]) {
    if let Err(e) = socket.send(datagram)
        && e.kind() == io::ErrorKind::ConnectionRefused
    {
        let _ = socket.send(datagram);
    }
}

/// Where `up` binds the counters socket of `entry`'s relay: in a directory of root's (mode
/// 0700), named by a digest of the whole entry so that the name stays short and no two
/// entries share it.
pub fn counters_path(namespace: &str, entry: &Entry) -> PathBuf {
    Path::new(COUNTERS_DIR)
        .join(namespace)
        // The digest of the entry's JSON form: stable across versions, unlike std's hasher.
        .join(format!(
            "{}.sock",
            crate::system::firewall::digest(&serde_json::to_string(entry).unwrap_or_default())
        ))
}

/// Binds (but does not listen on: the relay does, see [`counters_listener`]) the counters
/// socket of `entry`'s relay, replacing what a relay of the same entry left there.
fn bind_counters(namespace: &str, entry: &Entry) -> Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
    let path = counters_path(namespace, entry);
    let dir = files::Dir::create(
        path.parent()
            .context("the counters socket has a directory")?,
        0o700,
    )?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("the counters socket has a name")?;
    dir.remove_file(name)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("making the counters socket")?;
    bind(fd.as_raw_fd(), &UnixAddr::new(&path)?)
        .with_context(|| format!("binding {}", path.display()))?;
    // Only root may ask, whatever the umask made of it. The name was made just now in a
    // directory only root can write to.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(fd)
}

/// Removes the counters socket of `entry`'s relay, and the namespace's directory of them once
/// empty. Missing is fine.
pub fn remove_counters(namespace: &str, entry: &Entry) -> Result<()> {
    let path = counters_path(namespace, entry);
    let Ok(root) = files::Dir::open(Path::new(COUNTERS_DIR)) else {
        return Ok(());
    };
    let Ok(dir) = root.subdir(namespace) else {
        return Ok(());
    };
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        dir.remove_file(name)?;
    }
    // Other relays of the namespace may still have theirs there.
    let _ = root.remove_dir(namespace);
    Ok(())
}

/// Most bytes of a counters answer read; a few dozen are expected.
const COUNTERS_LIMIT: usize = 4096;
/// How long a relay has to answer.
const COUNTERS_DEADLINE: Duration = Duration::from_secs(1);

/// Asks the running relay `process` of `entry` how many sessions it holds and has turned away.
/// The relay is trusted for nothing but these numbers: the answer is read with a deadline and
/// a size limit, and only from the socket whose listening peer is this very process (its PID
/// and start time), never from whatever else holds that name.
pub fn session_counts(
    namespace: &str,
    entry: &Entry,
    process: &ProcessId,
) -> Result<SessionCounts> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket, sockopt,
    };
    let path = counters_path(namespace, entry);
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .context("making a socket")?;
    // Non-blocking: a relay that stopped accepting makes this fail at once, not wait.
    connect(fd.as_raw_fd(), &UnixAddr::new(&path)?)
        .with_context(|| format!("connecting to {}", path.display()))?;
    let peer = getsockopt(&fd, sockopt::PeerCredentials).context("asking who answers")?;
    let answering = u32::try_from(peer.pid()).ok().and_then(ProcessId::of);
    if answering != Some(*process) || peer.uid() == 0 {
        bail!(
            "{} is answered by pid {} (uid {}), not by the relay (pid {})",
            path.display(),
            peer.pid(),
            peer.uid(),
            process.pid
        );
    }
    let deadline = Instant::now() + COUNTERS_DEADLINE;
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the relay (pid {}) did not answer within {COUNTERS_DEADLINE:?}",
                process.pid
            );
        }
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        wait(&mut fds, Some(deadline))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() > COUNTERS_LIMIT {
                    bail!("the relay (pid {}) answered too much", process.pid);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("reading the relay's answer"),
        }
    }
    serde_json::from_slice(&answer)
        .with_context(|| format!("the relay (pid {}) answered no counts", process.pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_sources_share_only_the_entrys_cap() {
        let source = |text: &str| source_of(text.parse().unwrap());
        assert_eq!(source("127.0.0.1:5000"), None);
        assert_eq!(source("127.3.2.1:5000"), None);
        assert_eq!(source("[::1]:5000"), None);
        assert_eq!(source("[::ffff:127.0.0.1]:5000"), None);
        assert_eq!(
            source("[::ffff:192.0.2.7]:5000"),
            Some("192.0.2.7".parse().unwrap()),
            "an IPv4 client of a dual-stack listener counts as its IPv4 address"
        );
        assert_eq!(source("192.0.2.7:1"), source("192.0.2.7:2"));
    }

    #[test]
    fn replies_never_leave_from_a_group_or_broadcast_address() {
        let usable = |text: &str| usable_as_source(text.parse().unwrap());
        assert!(usable("fd77::5"));
        assert!(usable("fe80::1"));
        assert!(usable("::ffff:10.200.0.5"));
        assert!(!usable("ff02::1"));
        assert!(!usable("::ffff:255.255.255.255"));
        assert!(!usable("::ffff:224.0.0.251"));
        assert!(!usable("::"));
    }

    #[test]
    fn users_are_found_by_exact_name_only() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                      wg-namespace-x:x:990:990::/:/usr/sbin/nologin\n\
                      broken:x:notanumber:1::/:/bin/sh\n";
        assert_eq!(find_user(passwd, "nobody"), Some((65534, 65534)));
        assert_eq!(find_user(passwd, RELAY_USER), None);
        assert_eq!(find_user(passwd, "broken"), None);
    }
}
