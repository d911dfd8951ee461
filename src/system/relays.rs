//! `publishPorts`: a port inside the namespace made reachable on a host address.
//!
//! A relay process holds listening sockets in the host namespace and, for each connection
//! (or UDP client), opens a socket inside the namespace to 127.0.0.1:<namespacePort>. Traffic
//! is copied between the two. There is no forwarding, no NAT and no route between the
//! namespace and the host, so the namespace gains no way out: the relay only ever connects
//! *into* it.
//!
//! `up` binds the listeners itself (so a port in use fails `up` with a clear message) and
//! hands them to the relay as inherited file descriptors.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::config::{Protocol, PublishPort};
use crate::system::netns;
use crate::system::process::{self, Detached, Gated};

/// A UDP client that sends nothing for this long loses its relay socket.
const UDP_IDLE: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections (TCP) or clients (UDP) relayed at once per published port; more are turned
/// away rather than let one port exhaust the relay's threads and descriptors.
const MAX_SESSIONS: usize = 256;

pub enum Listener {
    Tcp(TcpListener, u16),
    Udp(UdpSocket, u16),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l, _) => l.as_raw_fd(),
            Listener::Udp(s, _) => s.as_raw_fd(),
        }
    }

    fn spec(&self) -> String {
        match self {
            Listener::Tcp(l, port) => format!("{}=tcp:{port}", l.as_raw_fd()),
            Listener::Udp(s, port) => format!("{}=udp:{port}", s.as_raw_fd()),
        }
    }
}

/// Binds every published port on the host, or fails naming the one that could not be bound.
pub fn bind(ports: &[PublishPort]) -> Result<Vec<Listener>> {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let address = SocketAddr::new(p.host_address, p.host_port);
            let what = || {
                format!(
                    "publishPorts[{i}]: binding {} {address}",
                    p.protocol.as_str()
                )
            };
            Ok(match p.protocol {
                Protocol::Tcp => Listener::Tcp(
                    TcpListener::bind(address).with_context(what)?,
                    p.namespace_port,
                ),
                Protocol::Udp => Listener::Udp(
                    UdpSocket::bind(address).with_context(what)?,
                    p.namespace_port,
                ),
            })
        })
        .collect()
}

/// Starts the relay, held at its gate, with the listeners as inherited descriptors.
pub fn spawn(namespace: &str, listeners: &[Listener]) -> Result<Gated> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut argv = vec![
        exe.to_string_lossy().into_owned(),
        "publish".into(),
        "--namespace".into(),
        namespace.into(),
    ];
    for listener in listeners {
        argv.push("--relay".into());
        argv.push(listener.spec());
    }
    let fds: Vec<RawFd> = listeners.iter().map(Listener::fd).collect();
    process::start_detached(Detached {
        argv: &argv,
        envs: &[],
        netns: None,
        keep: &fds,
    })
    .context("starting the port relay")
}

/// The relay process: `publish --namespace N --relay FD=PROTO:PORT ...`.
pub fn serve(namespace: &str, relays: &[String]) -> Result<()> {
    let ns_fd = Arc::new(netns::open(namespace)?);
    let mut threads = Vec::new();
    for spec in relays {
        let (fd, rest) = spec
            .split_once('=')
            .context("--relay takes FD=PROTO:PORT")?;
        let (protocol, port) = rest
            .split_once(':')
            .context("--relay takes FD=PROTO:PORT")?;
        let fd: RawFd = fd.parse().context("--relay: bad descriptor")?;
        let port: u16 = port.parse().context("--relay: bad port")?;
        // SAFETY: `up` passed this descriptor to us for exactly this purpose.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let ns_fd = Arc::clone(&ns_fd);
        threads.push(match protocol {
            "tcp" => {
                let listener = TcpListener::from(owned);
                std::thread::spawn(move || relay_tcp(listener, port, ns_fd))
            }
            "udp" => {
                let socket = UdpSocket::from(owned);
                std::thread::spawn(move || relay_udp(socket, port, ns_fd))
            }
            other => bail!("--relay: unknown protocol {other:?}"),
        });
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn target(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

fn relay_tcp(listener: TcpListener, port: u16, ns_fd: Arc<OwnedFd>) {
    let active = Arc::new(AtomicUsize::new(0));
    for client in listener.incoming() {
        let client = match client {
            Ok(client) => client,
            Err(_) => {
                // Out of descriptors, say: wait rather than spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let ns_fd = Arc::clone(&ns_fd);
        let active = Arc::clone(&active);
        std::thread::spawn(move || {
            let _done = Release(active);
            let inside = netns::within(&*ns_fd, || {
                TcpStream::connect_timeout(&target(port), CONNECT_TIMEOUT)
            });
            match inside {
                Ok(Ok(inside)) => splice(client, inside),
                Ok(Err(e)) => eprintln!("publish: connecting to port {port} in the namespace: {e}"),
                Err(e) => eprintln!("publish: {e:#}"),
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

/// Copies both ways until each side has finished sending.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forward = std::thread::spawn(move || copy_then_shutdown(a2, b2));
    copy_then_shutdown(b, a);
    let _ = forward.join();
}

fn copy_then_shutdown(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

struct UdpSession {
    id: u64,
    inside: UdpSocket,
    last_seen: Instant,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, UdpSession>>>;

fn relay_udp(outside: UdpSocket, port: u16, ns_fd: Arc<OwnedFd>) {
    let outside = Arc::new(outside);
    let sessions: Sessions = Arc::default();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((len, client)) = outside.recv_from(&mut buf) else {
            continue;
        };
        let mut table = sessions.lock().unwrap_or_else(|e| e.into_inner());
        table.retain(|_, s| s.last_seen.elapsed() < UDP_IDLE);
        let full = table.len() >= MAX_SESSIONS;
        let session = match table.entry(client) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if full => continue,
            Entry::Vacant(entry) => {
                let made = netns::within(&*ns_fd, || -> io::Result<UdpSocket> {
                    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                    socket.connect(target(port))?;
                    Ok(socket)
                });
                let inside = match made {
                    Ok(Ok(socket)) => socket,
                    Ok(Err(e)) => {
                        eprintln!("publish: udp port {port} in the namespace: {e}");
                        continue;
                    }
                    Err(e) => {
                        eprintln!("publish: {e:#}");
                        continue;
                    }
                };
                let Ok(replies) = inside.try_clone() else {
                    continue;
                };
                next_id += 1;
                let (id, outside, sessions) =
                    (next_id, Arc::clone(&outside), Arc::clone(&sessions));
                std::thread::spawn(move || udp_replies(replies, outside, client, id, sessions));
                entry.insert(UdpSession {
                    id,
                    inside,
                    last_seen: Instant::now(),
                })
            }
        };
        session.last_seen = Instant::now();
        let _ = session.inside.send(&buf[..len]);
    }
}

/// Carries a UDP client's replies back until its session expires or is replaced.
fn udp_replies(
    inside: UdpSocket,
    outside: Arc<UdpSocket>,
    client: SocketAddr,
    id: u64,
    sessions: Sessions,
) {
    let _ = inside.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = vec![0u8; 65536];
    loop {
        match inside.recv(&mut buf) {
            Ok(len) => {
                let _ = outside.send_to(&buf[..len], client);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let table = sessions.lock().unwrap_or_else(|e| e.into_inner());
                let current = table
                    .get(&client)
                    .is_some_and(|s| s.id == id && s.last_seen.elapsed() < UDP_IDLE);
                if !current {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
