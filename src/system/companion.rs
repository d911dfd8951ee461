//! The companion's snapshot socket: how an unprivileged reader (the metrics server) learns a
//! namespace's status without root.
//!
//! The per-namespace `refresh` process (root, running anyway) listens on
//! `/run/wg-namespace/companion/<namespace>.sock`. A thread blocked in `accept` (no wakeups
//! while nobody asks) answers each connection with one status document and closes it: the
//! client sends nothing. Who may connect is decided twice: by the socket file's mode (0660 with
//! the metrics group, or 0600) and by the peer's credentials (root, or a member of that group).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::unistd::Gid;

use crate::system::files::{Dir, FileIdentity};

pub const DIR: &str = "/run/wg-namespace/companion";
/// Largest document read from a companion.
pub const DOCUMENT_LIMIT: u64 = 4 << 20;
/// How long a client may take to take the document off the socket.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);

pub fn socket_name(namespace: &str) -> String {
    format!("{namespace}.sock")
}

pub fn socket_path(namespace: &str) -> PathBuf {
    Path::new(DIR).join(socket_name(namespace))
}

/// The namespaces that have a companion socket (whether or not anything answers on it).
pub fn socket_namespaces() -> Vec<String> {
    let Ok(dir) = Dir::open(Path::new(DIR)) else {
        return Vec::new();
    };
    dir.names()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .filter_map(|n| n.strip_suffix(".sock").map(str::to_string))
        .collect()
}

/// Who may read the snapshots besides root.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub group: Option<Gid>,
}

impl Access {
    /// The socket file's mode: the group's members can connect only when there is a group.
    fn mode(self) -> u32 {
        if self.group.is_some() { 0o660 } else { 0o600 }
    }

    /// Whether the process at the other end of `stream` may read: root, or (by its primary or
    /// any supplementary group, as the kernel recorded them when it connected) the group.
    fn admits(self, stream: &UnixStream) -> bool {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let Ok(credentials) = getsockopt(stream, PeerCredentials) else {
            return false;
        };
        if credentials.uid() == 0 {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        credentials.gid() == group.as_raw() || peer_groups(stream).contains(&group.as_raw())
    }
}

/// The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13), empty when unknown.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: the buffer and its length in bytes are passed together; the kernel writes at
    // most `len` bytes and sets `len` to what it wrote.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// Makes the listening socket of `namespace`: bound under a temporary name in root's own
/// checked directory, given its owner and mode there, then renamed over whatever socket an
/// earlier (dead) companion left, so that the name never points at a half-made socket.
/// Returns the listener and the identity of its socket file, for [`remove`].
pub fn listen(namespace: &str, access: Access) -> Result<(UnixListener, FileIdentity)> {
    let dir = Dir::create(Path::new(DIR), 0o755)?;
    let name = socket_name(namespace);
    Ok(dir.bind_socket(&name, access.mode(), access.group.map(Gid::as_raw))?)
}

/// Removes the socket file of `namespace` that [`listen`] made, when it is still the one there:
/// a companion started since has put its own in its place, and that one stays.
pub fn remove(namespace: &str, identity: FileIdentity) -> Result<()> {
    let dir = match Dir::open(Path::new(DIR)) {
        Ok(dir) => dir,
        Err(e) if e.not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    dir.remove_if_still(&socket_name(namespace), identity)?;
    Ok(())
}

/// Answers every connection with `document()`, one at a time, forever: a client that is not
/// admitted is closed without a word; one that does not read is given up after a deadline.
pub fn serve(listener: UnixListener, access: Access, mut document: impl FnMut() -> Vec<u8>) -> ! {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            // A signal (the stop the main thread acts on) landed in this thread.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("refresh: snapshot socket: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !access.admits(&stream) {
            continue;
        }
        let mut stream = stream;
        let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
        let _ = stream.write_all(&document());
        drop(stream);
        crate::system::process::return_freed_memory();
    }
}

/// A connection to the unix socket at `path`, made non-blocking before it connects: a connect
/// to a listening unix socket then completes at once, or fails with EAGAIN when its backlog is
/// full (a companion that stopped accepting), where a blocking one would wait for room forever.
fn connect_without_waiting(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let socket = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(socket.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(socket))
}

/// Reads the documents the companions of `namespaces` answer, all at once and within
/// `deadline`, in one thread: each connection is made without blocking and read as its answer
/// arrives. One result per namespace, in order.
pub fn ask_all(namespaces: &[&str], deadline: Duration) -> Vec<Result<Vec<u8>>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    struct Pending {
        stream: UnixStream,
        document: Vec<u8>,
    }
    let until = Instant::now() + deadline;
    let mut results: Vec<Option<Result<Vec<u8>>>> = Vec::new();
    let mut pending: Vec<(usize, Pending)> = Vec::new();
    for (i, namespace) in namespaces.iter().enumerate() {
        let path = socket_path(namespace);
        let connected = connect_without_waiting(&path)
            .with_context(|| format!("connecting to {}", path.display()));
        match connected {
            Ok(stream) => {
                results.push(None);
                pending.push((
                    i,
                    Pending {
                        stream,
                        document: Vec::new(),
                    },
                ));
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut buffer = [0u8; 8 << 10];
    while !pending.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = pending
                .iter()
                .map(|(_, p)| PollFd::new(p.stream.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    for (i, _) in pending.drain(..) {
                        results[i] = Some(Err(e).context("waiting for the companions"));
                    }
                    break;
                }
            }
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        let mut still = Vec::new();
        for ((i, mut p), ready) in pending.drain(..).zip(ready) {
            if !ready {
                still.push((i, p));
                continue;
            }
            let finished = loop {
                match p.stream.read(&mut buffer) {
                    Ok(0) => break Some(Ok(())),
                    Ok(n) => {
                        p.document.extend_from_slice(&buffer[..n]);
                        if p.document.len() as u64 > DOCUMENT_LIMIT {
                            break Some(Err(anyhow::anyhow!(
                                "{} answered more than {DOCUMENT_LIMIT} bytes",
                                socket_path(namespaces[i]).display()
                            )));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        break Some(Err(e).with_context(|| {
                            format!("reading from {}", socket_path(namespaces[i]).display())
                        }));
                    }
                }
            };
            match finished {
                None => still.push((i, p)),
                Some(Ok(())) if p.document.is_empty() => {
                    results[i] = Some(Err(anyhow::anyhow!(
                        "{} closed without an answer (not allowed to read it?)",
                        socket_path(namespaces[i]).display()
                    )));
                }
                Some(Ok(())) => results[i] = Some(Ok(p.document)),
                Some(Err(e)) => results[i] = Some(Err(e)),
            }
        }
        pending = still;
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                Err(anyhow::anyhow!(
                    "{} did not answer within {deadline:?}",
                    socket_path(namespaces[i]).display()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A companion that no longer accepts (stopped, or stuck) fills its backlog with the
    /// connections of askers that gave up; the next asker is told so at once instead of
    /// waiting for room that never comes.
    #[test]
    fn a_connection_to_a_full_backlog_fails_at_once() {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
        };
        let dir = std::env::temp_dir().join(format!("wgns-backlog-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("full.sock");
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&listener, Backlog::new(1).unwrap()).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        let asking = path.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let outcome = loop {
                match connect_without_waiting(&asking) {
                    Ok(stream) if held.len() < 16 => held.push(stream),
                    Ok(_) => break Ok(held.len()),
                    Err(e) => break Err(e),
                }
            };
            let _ = sender.send(outcome);
        });
        let outcome = receiver
            .recv_timeout(Duration::from_secs(5))
            .expect("a connect to a full backlog returned within 5 s");
        let error = outcome.expect_err("a backlog of one held 16 connections");
        assert_eq!(error.raw_os_error(), Some(libc::EAGAIN), "{error}");
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
