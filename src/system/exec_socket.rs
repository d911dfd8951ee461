//! The exec service's socket: how `wg-namespace exec` run by an ordinary user asks the root
//! service (`exec-service`) to run a command in a namespace.
//!
//! A SOCK_SEQPACKET socket, so that a request is one message whatever its size up to
//! [`MAX_REQUEST`], never a stream to reassemble. The client sends one [`Request`] with its
//! standard descriptors attached (SCM_RIGHTS); the service answers with one [`Reply`] when it
//! refuses or when the command has ended. Who asks is never in the request: the service takes
//! it from the socket's peer credentials.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

/// Where the module's socket unit listens.
pub const SOCKET: &str = "/run/wg-namespace/exec.sock";
/// Another socket for the client to use (the tests' service; a service started by hand). Read
/// by the unprivileged client only: whatever it names, it is the user's own choice.
pub const SOCKET_ENV: &str = "WG_NAMESPACE_EXEC_SOCKET";
/// The largest request: command, working directory and environment together.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Standard input, output and error.
pub const DESCRIPTORS: usize = 3;
/// How long one send or receive of the exchange may take.
pub const EXCHANGE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub namespace: String,
    pub command: Vec<String>,
    /// The caller's working directory, entered as the user when the user can.
    pub cwd: Option<String>,
    /// The caller's environment; the service keeps what a desktop program needs.
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply {
    /// Nothing ran; the one line to show.
    Refused(String),
    /// The command ended with this status, as a shell reports it (128 + signal when killed).
    Exited(i32),
}

/// Sets the deadline of every later send and receive on `socket`.
pub fn set_deadline(socket: BorrowedFd<'_>, deadline: Option<Duration>) -> Result<()> {
    let time = TimeVal::from(libc::timeval {
        tv_sec: deadline.map_or(0, |d| d.as_secs() as libc::time_t),
        tv_usec: deadline.map_or(0, |d| d.subsec_micros() as libc::suseconds_t),
    });
    setsockopt(&socket, sockopt::ReceiveTimeout, &time).context("setting a receive deadline")?;
    setsockopt(&socket, sockopt::SendTimeout, &time).context("setting a send deadline")?;
    Ok(())
}

/// Sends `message` as one packet with `fds` attached.
pub fn send(socket: BorrowedFd<'_>, message: &impl Serialize, fds: &[RawFd]) -> Result<()> {
    let bytes = serde_json::to_vec(message).context("encoding a message")?;
    if bytes.len() > MAX_REQUEST {
        bail!(
            "the request is {} bytes, more than the {MAX_REQUEST} the exec service takes",
            bytes.len()
        );
    }
    let control = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &control };
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .context("sending to the exec service")?;
    if sent != bytes.len() {
        bail!(
            "the exec service's socket took {sent} of {} bytes",
            bytes.len()
        );
    }
    Ok(())
}

/// Receives one packet: its message and the descriptors attached, which are ours from here on
/// (close-on-exec). None at the end of the connection. A packet too long, or with more
/// descriptors than [`DESCRIPTORS`], is an error (and every descriptor that came is closed).
pub fn receive<T: for<'de> Deserialize<'de>>(
    socket: BorrowedFd<'_>,
) -> Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buffer = vec![0u8; MAX_REQUEST + 1];
    let mut control = nix::cmsg_space!([RawFd; DESCRIPTORS]);
    let (length, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EAGAIN => anyhow::anyhow!("nothing came within the deadline"),
            e => anyhow::Error::from(e).context("receiving from the exec socket"),
        })?;
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().context("reading the descriptors passed")? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (message.bytes, message.flags, fds)
    };
    if flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > DESCRIPTORS {
        bail!("more than {DESCRIPTORS} descriptors passed");
    }
    if flags.contains(MsgFlags::MSG_TRUNC) || length > MAX_REQUEST {
        bail!("a message longer than {MAX_REQUEST} bytes");
    }
    if length == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buffer[..length]).context("a malformed message")?;
    Ok(Some((message, fds)))
}

/// Variables a desktop program needs to find its display, sound, locale and programs, taken
/// from the caller. Nothing that changes how a program loads (`LD_*`, `GCONV_PATH`, …) and no
/// session bus address: the session bus is hidden inside, since through it a program already
/// running outside would act for us.
const KEPT: &[&str] = &[
    "PATH",
    "TERM",
    "COLORTERM",
    "NO_COLOR",
    "LANG",
    "LANGUAGE",
    "TZ",
    "DISPLAY",
    "XAUTHORITY",
    "WAYLAND_DISPLAY",
    "XDG_RUNTIME_DIR",
    "XDG_SESSION_TYPE",
    "XDG_SESSION_DESKTOP",
    "XDG_CURRENT_DESKTOP",
    "DESKTOP_SESSION",
    "XDG_DATA_DIRS",
    "XDG_CONFIG_DIRS",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "PULSE_SERVER",
    "PULSE_COOKIE",
    "GDK_BACKEND",
    "GTK_THEME",
    "QT_QPA_PLATFORM",
    "QT_QPA_PLATFORMTHEME",
    "MOZ_ENABLE_WAYLAND",
];
const KEPT_PREFIXES: &[&str] = &["LC_", "PIPEWIRE_"];

/// Whether the command gets the caller's variable `name`.
pub fn kept(name: &str) -> bool {
    KEPT.contains(&name)
        || KEPT_PREFIXES.iter().any(|prefix| {
            name.strip_prefix(prefix).is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            })
        })
}
