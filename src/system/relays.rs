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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// Connections (TCP) or clients (UDP) relayed at once per entry. Beyond it a new TCP connection
/// is accepted and closed at once, and a datagram from a new UDP client is dropped, so that one
/// entry cannot exhaust the relay's threads and descriptors.
pub const MAX_SESSIONS: usize = 256;

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
    ];
    let gated = process::start_detached(Detached {
        argv: &argv,
        envs: &[],
        netns: match entry.direction {
            Direction::Publish => Some(ns_fd),
            Direction::HostService => None,
        },
        keep: &[listener.as_raw_fd()],
    })
    .with_context(|| format!("{entry}: starting its relay"))?;
    let process = gated.process;
    record(Resource::Relay {
        process,
        executables: gated.executables.clone(),
        entry: *entry,
    })?;
    gated.release()?;
    Ok(process)
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
}

/// The relay process. Returns only on failure.
pub fn serve(args: &RelayArgs) -> Result<()> {
    drop_privileges(args.uid, args.gid)?;
    // SAFETY: `start` passed this descriptor to us for exactly this purpose.
    let listener = unsafe { OwnedFd::from_raw_fd(args.listen_fd) };
    match args.protocol {
        Protocol::Tcp => relay_tcp(&TcpListener::from(listener), args.to, args.idle_timeout),
        Protocol::Udp => relay_udp(&UdpSocket::from(listener), args.to, args.idle_timeout),
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

fn relay_tcp(listener: &TcpListener, to: SocketAddr, idle: Duration) -> Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors, say: wait rather than spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        let done = Release(Arc::clone(&active));
        // A thread that cannot be made drops the connection (and `done` with it).
        let _ = std::thread::Builder::new().spawn(move || {
            let _done = done;
            match TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) {
                Ok(service) => splice(&client, &service, idle),
                Err(e) => eprintln!("relay: connecting to {to}: {e}"),
            }
        });
    }
}

/// Counts a session as finished when dropped.
struct Release(Arc<AtomicUsize>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies both ways until each side has finished sending, or nothing moved either way for
/// `idle`; a peer that stops reading counts as idle too.
fn splice(a: &TcpStream, b: &TcpStream, idle: Duration) {
    let timeout = PollTimeout::try_from(idle).unwrap_or(PollTimeout::MAX);
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
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
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
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

struct UdpSession {
    client: SocketAddr,
    socket: UdpSocket,
    last: Instant,
}

/// One thread for all of an entry's UDP clients: each client gets a socket connected to `to`,
/// kept until neither side sent anything for `idle`.
fn relay_udp(outside: &UdpSocket, to: SocketAddr, idle: Duration) -> Result<()> {
    outside
        .set_nonblocking(true)
        .context("making the UDP listener non-blocking")?;
    let mut sessions: Vec<UdpSession> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if sessions.iter().any(|s| now.duration_since(s.last) >= idle) {
            sessions.retain(|s| now.duration_since(s.last) < idle);
            by_client = sessions
                .iter()
                .enumerate()
                .map(|(i, s)| (s.client, i))
                .collect();
        }
        let wait = sessions
            .iter()
            .map(|s| idle.saturating_sub(now.duration_since(s.last)))
            .min()
            .unwrap_or(idle)
            .max(Duration::from_millis(10));
        let mut fds = vec![PollFd::new(outside.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            sessions
                .iter()
                .map(|s| PollFd::new(s.socket.as_fd(), PollFlags::POLLIN)),
        );
        match poll(
            &mut fds,
            PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e).context("waiting for datagrams"),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);

        for (i, session) in sessions.iter_mut().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            // A refusal (ICMP port unreachable: the service is not up yet) is reported here once
            // and cleared; the session stays, so replies flow as soon as the service answers.
            while let Ok(len) = session.socket.recv(&mut buf) {
                session.last = Instant::now();
                let _ = outside.send_to(&buf[..len], session.client);
            }
        }
        if ready[0] {
            while let Ok((len, client)) = outside.recv_from(&mut buf) {
                let index = match by_client.get(&client) {
                    Some(&index) => index,
                    None if sessions.len() >= MAX_SESSIONS => continue,
                    None => match udp_session(to) {
                        Ok(socket) => {
                            sessions.push(UdpSession {
                                client,
                                socket,
                                last: Instant::now(),
                            });
                            by_client.insert(client, sessions.len() - 1);
                            sessions.len() - 1
                        }
                        Err(e) => {
                            eprintln!("relay: udp socket for {to}: {e}");
                            continue;
                        }
                    },
                };
                let session = &mut sessions[index];
                session.last = Instant::now();
                send_once_more_if_refused(&session.socket, &buf[..len]);
            }
        }
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
