//! The WireGuard configuration protocol (the cross-platform "UAPI" text protocol that
//! wireguard-go and boringtun speak on `/var/run/wireguard/<interface>.sock`), spoken only with
//! the daemon `up` started and recorded.
//!
//! Our own client rather than wireguard-control's, for three reasons: its userspace backend
//! starts a `wireguard-go` of its own when the socket does not answer (a daemon nobody
//! records); it speaks to whoever listens on the socket path, which may be another daemon
//! serving an interface of the same name in another namespace; and it has no deadline.
//! Here the socket's peer (SO_PEERCRED) must be the recorded process, and connect, write and
//! read share one deadline.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect as raw_connect, getsockopt, socket,
    sockopt,
};
use wireguard_control::{AllowedIp, Key, PeerInfo};

use crate::system::process::ProcessId;
use crate::system::wireguard::DeviceInfo;

/// How long one exchange with a daemon (connect, request, answer) may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The most an answer may hold: ample for thousands of peers with many allowed IPs each.
const ANSWER_LIMIT: u64 = 32 << 20;

fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the userspace WireGuard daemon did not {what} within {}s",
            TIMEOUT.as_secs()
        ),
    )
}

/// Whether any process listens on `socket_path` (a connection is made, or the backlog is full).
pub fn answers(socket_path: &Path) -> bool {
    let Ok(address) = UnixAddr::new(socket_path) else {
        return false;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    matches!(
        raw_connect(fd.as_raw_fd(), &address),
        Ok(()) | Err(nix::errno::Errno::EAGAIN)
    )
}

/// Connects to `socket` and checks that `daemon` is the process serving it.
pub fn connect(socket_path: &Path, daemon: ProcessId, deadline: Instant) -> io::Result<UnixStream> {
    let address = UnixAddr::new(socket_path).map_err(io::Error::from)?;
    let stream = loop {
        // Non-blocking: a daemon that is stopped, or whose backlog is full, would block a
        // plain connect for ever.
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        match raw_connect(fd.as_raw_fd(), &address) {
            Ok(()) => break UnixStream::from(fd),
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(nix::errno::Errno::EAGAIN) => return Err(timed_out("accept the connection")),
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("connecting to {}: {e}", socket_path.display()),
                ));
            }
        }
    };
    let peer = getsockopt(&stream, sockopt::PeerCredentials).map_err(io::Error::from)?;
    if u32::try_from(peer.pid()).ok() != Some(daemon.pid) || !daemon.is_alive() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by process {}, not by the WireGuard daemon wg-namespace started \
                 (pid {}); not talking to it",
                socket_path.display(),
                peer.pid(),
                daemon.pid
            ),
        ));
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends `request` (ending in an empty line) and reads the answer up to its empty line.
fn exchange(socket_path: &Path, daemon: ProcessId, request: &[u8]) -> io::Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    };
    let mut stream = connect(socket_path, daemon, deadline)?;
    stream.set_write_timeout(Some(left().ok_or_else(|| timed_out("take the request"))?))?;
    stream.write_all(request).map_err(|e| {
        if is_timeout(&e) {
            timed_out("take the request")
        } else {
            e
        }
    })?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    while !answer.ends_with(b"\n\n") {
        stream.set_read_timeout(Some(left().ok_or_else(|| timed_out("answer"))?))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => return Err(timed_out("answer")),
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.len() as u64 > ANSWER_LIMIT {
            return Err(io::Error::other(
                "the userspace WireGuard daemon's answer is too long",
            ));
        }
    }
    String::from_utf8(answer)
        .map_err(|_| io::Error::other("the userspace WireGuard daemon's answer is not text"))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The `errno=N` that ends every answer.
fn check_errno(answer: &str) -> io::Result<()> {
    let errno = answer
        .lines()
        .find_map(|line| line.strip_prefix("errno="))
        .ok_or_else(|| io::Error::other("the userspace WireGuard daemon's answer has no errno"))?;
    match errno.trim().parse::<i32>() {
        Ok(0) => Ok(()),
        Ok(code) => Err(io::Error::from_raw_os_error(code)),
        Err(_) => Err(io::Error::other(format!(
            "the userspace WireGuard daemon answered errno={errno}"
        ))),
    }
}

/// Applies `body` (key=value lines, as [`set_body`] builds them).
pub fn set(socket_path: &Path, daemon: ProcessId, body: &str) -> io::Result<()> {
    let request = format!("set=1\n{body}\n");
    check_errno(&exchange(socket_path, daemon, request.as_bytes())?)
}

/// Reads the device.
pub fn get(socket_path: &Path, daemon: ProcessId) -> io::Result<DeviceInfo> {
    read_device(socket_path, daemon, PublicKey::Derive)
}

/// Reads the device without its own public key (`public_key` stays `None`): the daemon
/// answers with the private key only, and deriving the public one is a curve multiplication,
/// the largest part of reading a device with a peer or two. For readers that look at the
/// peers only (`status`, per scrape).
pub fn get_peers(socket_path: &Path, daemon: ProcessId) -> io::Result<DeviceInfo> {
    read_device(socket_path, daemon, PublicKey::Skip)
}

fn read_device(socket_path: &Path, daemon: ProcessId, key: PublicKey) -> io::Result<DeviceInfo> {
    let answer = exchange(socket_path, daemon, b"get=1\n\n")?;
    check_errno(&answer)?;
    parse_device(&answer, key)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublicKey {
    Derive,
    Skip,
}

fn bad(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the userspace WireGuard daemon answered an unreadable line {line:?}"),
    )
}

fn parse_device(answer: &str, public_key: PublicKey) -> io::Result<DeviceInfo> {
    let mut device = DeviceInfo::default();
    let mut handshake_sec: Option<u64> = None;
    let mut handshake_nsec: u32 = 0;
    let finish = |peer: Option<&mut PeerInfo>, sec: Option<u64>, nsec: u32| {
        if let (Some(peer), Some(sec)) = (peer, sec) {
            peer.stats.last_handshake_time = (sec != 0 || nsec != 0).then(|| {
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(sec)
                    + Duration::from_nanos(nsec.into())
            });
        }
    };
    for line in answer.lines() {
        if line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| bad(line))?;
        let number = || value.parse::<u64>().map_err(|_| bad(line));
        let wg_key = || Key::from_hex(value).map_err(|_| bad(line));
        match key {
            "private_key" if public_key == PublicKey::Derive => {
                device.public_key = Some(wg_key()?.get_public())
            }
            "private_key" => {}
            "listen_port" => device.listen_port = Some(value.parse().map_err(|_| bad(line))?),
            "public_key" => {
                finish(
                    device.peers.last_mut(),
                    handshake_sec.take(),
                    handshake_nsec,
                );
                handshake_nsec = 0;
                device.peers.push(PeerInfo::from_public_key(wg_key()?));
            }
            "errno" | "protocol_version" | "fwmark" => {}
            _ => {
                let peer = device.peers.last_mut().ok_or_else(|| bad(line))?;
                match key {
                    "preshared_key" => peer.config.preshared_key = Some(wg_key()?),
                    "endpoint" => {
                        peer.config.endpoint =
                            Some(value.parse::<SocketAddr>().map_err(|_| bad(line))?)
                    }
                    "persistent_keepalive_interval" => {
                        peer.config.persistent_keepalive_interval =
                            Some(value.parse().map_err(|_| bad(line))?)
                    }
                    "allowed_ip" => {
                        let (address, cidr) = value.split_once('/').ok_or_else(|| bad(line))?;
                        peer.config.allowed_ips.push(AllowedIp {
                            address: address.parse().map_err(|_| bad(line))?,
                            cidr: cidr.parse().map_err(|_| bad(line))?,
                        });
                    }
                    "rx_bytes" => peer.stats.rx_bytes = number()?,
                    "tx_bytes" => peer.stats.tx_bytes = number()?,
                    "last_handshake_time_sec" => handshake_sec = Some(number()?),
                    "last_handshake_time_nsec" => {
                        handshake_nsec = value.parse().map_err(|_| bad(line))?
                    }
                    // Newer daemons may say more; what we do not know we do not need.
                    _ => {}
                }
            }
        }
    }
    finish(device.peers.last_mut(), handshake_sec, handshake_nsec);
    Ok(device)
}

pub fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_answer_is_read_into_a_device() {
        let private = Key::generate_private();
        let peer = Key::generate_private().get_public();
        let answer = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint=[fd77::1]:51820\n\
             persistent_keepalive_interval=25\nallowed_ip=0.0.0.0/0\nallowed_ip=::/0\n\
             rx_bytes=10\ntx_bytes=20\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\nprotocol_version=1\nerrno=0\n\n",
            hex(&private.0),
            hex(&peer.0)
        );
        let device = parse_device(&answer, PublicKey::Derive).unwrap();
        assert_eq!(device.public_key, Some(private.get_public()));
        assert_eq!(device.listen_port, Some(51820));
        assert_eq!(device.peers.len(), 1);
        let p = &device.peers[0];
        assert_eq!(p.config.public_key, peer);
        assert_eq!(p.config.endpoint, Some("[fd77::1]:51820".parse().unwrap()));
        assert_eq!(p.config.persistent_keepalive_interval, Some(25));
        assert_eq!(p.config.allowed_ips.len(), 2);
        assert_eq!((p.stats.rx_bytes, p.stats.tx_bytes), (10, 20));
        assert_eq!(
            p.stats.last_handshake_time,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert!(check_errno(&answer).is_ok());
        assert_eq!(
            check_errno("errno=22\n\n").unwrap_err().raw_os_error(),
            Some(22)
        );
        assert!(parse_device("endpoint=1.2.3.4:5\n", PublicKey::Derive).is_err());
    }

    #[test]
    fn only_the_recorded_process_is_spoken_to() {
        use std::os::unix::fs::DirBuilderExt;
        // A new directory of our own (creating it fails if the name exists, so nothing planted
        // in /tmp is followed), with the socket made in it.
        let dir = std::env::temp_dir().join(format!("wgns-uapi-{}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let path = dir.join("wgx.sock");
        // This test process serves the socket; a record naming another process is refused.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let someone_else = ProcessId::of(1).unwrap();
        let refused = connect(&path, someone_else, Instant::now() + TIMEOUT).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
        // The right process, which never answers: the exchange ends at its deadline.
        let started = Instant::now();
        let silent = exchange(&path, ProcessId::current(), b"get=1\n\n").unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut, "{silent}");
        assert!(started.elapsed() < TIMEOUT + Duration::from_secs(2));
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
