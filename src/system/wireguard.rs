//! The WireGuard device: backends (kernel module or a userspace daemon), key files, endpoint
//! resolution and the device configuration: through wireguard-control for the kernel, through
//! [`uapi`] for a userspace daemon.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use wireguard_control::{
    Backend as WgBackend, Device, DeviceUpdate, InterfaceName, PeerConfigBuilder,
};

use crate::config::{
    Cidr, Config, Endpoint, EndpointHost, Key, Peer, PresharedKey, PrivateKeySource,
};
use crate::system::files;
use crate::system::link::Netlink;
use crate::system::process::{Detached, Gated, ProcessId};
use crate::system::state::LinkKind;
use crate::system::uapi;

/// Where wireguard-go and boringtun put their configuration sockets.
const UAPI_DIR: &str = "/var/run/wireguard";
/// How long a userspace daemon may take to create its interface and socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Kernel,
    Userspace,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace",
        }
    }

    pub fn parse(text: &str) -> Option<Backend> {
        match text {
            "kernel" => Some(Backend::Kernel),
            "userspace" => Some(Backend::Userspace),
            _ => None,
        }
    }
}

pub fn uapi_socket(interface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{interface}.sock"))
}

fn interface_name(interface: &str) -> Result<InterfaceName> {
    interface
        .parse()
        .map_err(|e| anyhow!("{interface:?} is not a valid interface name: {e:?}"))
}

/// Whether the kernel link could not be made because the kernel has no WireGuard.
pub fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// Starts `command -f <interface>` in a session of its own, held at its gate (see
/// [`crate::system::process`]); record it, release it, then [`wait_for_daemon`].
pub fn spawn_daemon(command: &[String], interface: &str) -> Result<Gated> {
    let mut argv = command.to_vec();
    argv.push("-f".into());
    argv.push(interface.into());
    // wireguard-go wants this to stay in the foreground; WG_SUDO keeps boringtun from
    // switching to a user that could no longer answer on the configuration socket.
    let envs = [("WG_PROCESS_FOREGROUND", "1"), ("WG_SUDO", "true")];
    crate::system::process::start_detached(Detached {
        argv: &argv,
        envs: &envs,
        netns: None,
        keep: &[],
    })
    .with_context(|| {
        format!(
            "starting the userspace WireGuard daemon ({})",
            command.join(" ")
        )
    })
}

/// Waits until the daemon's interface and configuration socket exist and it holds every TUN
/// queue it is going to open (see [`tun_queues_expected`]).
pub fn wait_for_daemon(
    process: ProcessId,
    command: &[String],
    interface: &str,
    host: &Netlink,
) -> Result<()> {
    let program = command.first().map(String::as_str).unwrap_or_default();
    let queues = tun_queues_expected(command, std::env::var("WG_THREADS").ok().as_deref());
    let deadline = Instant::now() + DAEMON_START_TIMEOUT;
    loop {
        let socket_ours = uapi::connect(&uapi_socket(interface), process, Instant::now()).is_ok();
        if socket_ours
            && host.index_of(interface)?.is_some()
            && tun_queues_open(process.pid) >= queues
        {
            return Ok(());
        }
        if !process.is_alive() {
            let how = process
                .exit_status()
                .unwrap_or_else(|| "exited".to_string());
            bail!("the userspace WireGuard daemon {program} {how} before its interface appeared");
        }
        if Instant::now() > deadline {
            bail!(
                "the userspace WireGuard daemon {program} did not make interface {interface} \
                 with {queues} queue(s) within {}s",
                DAEMON_START_TIMEOUT.as_secs()
            );
        }
        // The daemon takes a few milliseconds to start; a coarser step is paid in full by `up`.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// boringtun's default number of worker threads.
const BORINGTUN_THREADS: usize = 4;

/// How many TUN queues the daemon `command` opens. boringtun opens one per worker thread,
/// each by the interface's name, and does so after its configuration socket already answers.
/// A link moved into the namespace before that would get a twin in the host namespace, and the
/// packets those threads decrypt would go into the twin instead of the tunnel.
/// `wg_threads` is the WG_THREADS environment variable the daemon inherits.
fn tun_queues_expected(command: &[String], wg_threads: Option<&str>) -> usize {
    let is_boringtun = command
        .first()
        .and_then(|program| Path::new(program).file_name())
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("boringtun"));
    if !is_boringtun {
        return 1;
    }
    let args = &command[1..];
    if args.iter().any(|arg| arg == "--disable-multi-queue") {
        return 1;
    }
    let mut threads = wg_threads.map(str::to_string);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "-t" || arg == "--threads" {
            threads = rest.next().cloned();
        } else if let Some(value) = arg.strip_prefix("--threads=") {
            threads = Some(value.into());
        } else if let Some(value) = arg.strip_prefix("-t").filter(|v| !v.is_empty()) {
            threads = Some(value.into());
        }
    }
    threads
        .and_then(|t| t.trim().parse::<usize>().ok())
        .unwrap_or(BORINGTUN_THREADS)
        .max(1)
}

/// How many TUN queues (open /dev/net/tun descriptors) process `pid` holds.
fn tun_queues_open(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target == Path::new("/dev/net/tun"))
        })
        .count()
}

/// Removes a daemon's configuration socket when nothing answers on it any more, relative to
/// the checked socket directory like every other removal of root's.
pub fn remove_stale_socket(interface: &str) {
    let socket = uapi_socket(interface);
    if socket.exists()
        && !uapi::answers(&socket)
        && let Ok(dir) = files::Dir::open(Path::new(UAPI_DIR))
    {
        let _ = dir.remove_file(&format!("{interface}.sock"));
    }
}

/// Whether a daemon (any) serves `interface`'s configuration socket.
pub fn socket_answers(interface: &str) -> bool {
    uapi::answers(&uapi_socket(interface))
}

/// What [`delete_link`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkDeleted {
    /// Deleted, or no such link.
    Done,
    /// A link is there but not the recorded one: described, and left alone.
    NotOurs(String),
}

/// Deletes the WireGuard link recorded as `name`, `index` and `kind` inside the namespace
/// `netns`: the link at `index` when it still has that name and kind; without an index (a
/// run killed before it learnt it), the link of that name when it has that kind.
pub fn delete_link(
    netns: impl AsFd,
    name: &str,
    index: Option<u32>,
    kind: LinkKind,
) -> Result<LinkDeleted> {
    delete_matching_link(&Netlink::inside(netns)?, name, index, kind)
}

/// [`delete_link`] in the calling thread's namespace (the host's, before the move).
pub fn delete_link_here(name: &str, index: Option<u32>, kind: LinkKind) -> Result<LinkDeleted> {
    delete_matching_link(&Netlink::here()?, name, index, kind)
}

fn delete_matching_link(
    nl: &Netlink,
    name: &str,
    index: Option<u32>,
    kind: LinkKind,
) -> Result<LinkDeleted> {
    let index = match find_matching_link(nl, name, index, kind)? {
        Ok(Some(index)) => index,
        Ok(None) => return Ok(LinkDeleted::Done),
        Err(not_ours) => return Ok(not_ours),
    };
    match nl.delete(index) {
        // Gone between the listing and the request: a killed daemon's TUN goes by itself.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
                == Some(libc::ENODEV) =>
        {
            Ok(LinkDeleted::Done)
        }
        other => other.map(|()| LinkDeleted::Done),
    }
}

/// Takes the recorded link down inside `netns` instead of deleting it, for a namespace that is
/// deleted right after: the kernel then destroys the link with the namespace, in the
/// background, while nothing can send through it any more in between (a process still in the
/// namespace keeps it alive, but without a way out).
pub fn disable_link(
    netns: impl AsFd,
    name: &str,
    index: Option<u32>,
    kind: LinkKind,
) -> Result<LinkDeleted> {
    let nl = Netlink::inside(netns)?;
    match find_matching_link(&nl, name, index, kind)? {
        Ok(Some(index)) => nl.set_down(index).map(|()| LinkDeleted::Done),
        Ok(None) => Ok(LinkDeleted::Done),
        Err(not_ours) => Ok(not_ours),
    }
}

/// The index of the recorded link: `Ok(None)` when there is none, `Err` when the index now
/// belongs to another link.
fn find_matching_link(
    nl: &Netlink,
    name: &str,
    index: Option<u32>,
    kind: LinkKind,
) -> Result<std::result::Result<Option<u32>, LinkDeleted>> {
    let links = nl.links()?;
    let found = match index {
        Some(index) => links.into_iter().find(|l| l.index == index),
        None => links.into_iter().find(|l| l.name == name),
    };
    let Some(link) = found else {
        return Ok(Ok(None));
    };
    let link_kind = link.kind.as_deref().unwrap_or("none");
    if link.name != name || link_kind != kind.as_str() {
        return Ok(Err(LinkDeleted::NotOurs(format!(
            "index {} is now {:?} of kind {link_kind}",
            link.index, link.name
        ))));
    }
    Ok(Ok(Some(link.index)))
}

/// Reads a key file at run time through [`files::read_secret`] (the file, every directory on
/// its path and every symlink followed to it root's or the caller's, the file writable by no
/// one else). Returns the key and, when the file is readable by everyone, a warning.
pub fn read_key_file(field: &str, path: &Path) -> Result<(Key, Option<String>)> {
    // A key is 44 characters; a much longer file is not one.
    let file = files::read_secret(path, "key", 4096).map_err(|e| anyhow!("{field}: {e}"))?;
    // The content is secret: never quote it.
    let key = std::str::from_utf8(&file.bytes)
        .ok()
        .and_then(Key::from_base64)
        .ok_or_else(|| {
            anyhow!(
                "{field}: {}: does not hold a base64 WireGuard key (as `wg genkey` writes)",
                path.display()
            )
        })?;
    Ok((key, file.warning.map(|w| format!("{field}: {w}"))))
}

/// How long one host-name lookup may take: the C library's own retries can add up to minutes
/// with a resolver that does not answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Resolves an endpoint in the calling thread's namespace (the host's: DNS works there), on a
/// thread of its own (which starts in the same namespace) so that it ends within
/// [`RESOLVE_TIMEOUT`]; a lookup still running then is abandoned.
pub fn resolve(endpoint: &Endpoint) -> io::Result<SocketAddr> {
    let name = match &endpoint.host {
        EndpointHost::Ip(ip) => return Ok(SocketAddr::new(*ip, endpoint.port)),
        EndpointHost::Name(name) => name.clone(),
    };
    let port = endpoint.port;
    let (answer, answered) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("resolve".into())
        .spawn(move || {
            let _ = answer.send(
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|mut a| a.next()),
            );
        })?;
    match answered.recv_timeout(RESOLVE_TIMEOUT) {
        Ok(Ok(Some(address))) => Ok(address),
        Ok(Ok(None)) => Err(io::Error::new(io::ErrorKind::NotFound, "no address")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}s", RESOLVE_TIMEOUT.as_secs()),
        )),
    }
}

/// A peer with its secrets and endpoint resolved, ready to apply.
pub struct PreparedPeer {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub peer: Peer,
}

/// Everything `up` must read or resolve before it touches the system.
pub struct Prepared {
    pub private_key: Key,
    pub peers: Vec<PreparedPeer>,
    pub warnings: Vec<String>,
}

/// How [`prepare`] treats a host name that does not resolve right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    /// Use the last good address from the endpoint cache; fail when there is none (`up`).
    CacheOrFail,
    /// Use the cache, else leave the endpoint unset, which keeps what the device has
    /// (`reload`, `heal`: a passing DNS failure must not stop a repair).
    CacheOrKeep,
}

pub fn prepare(config: &Config, unresolved: Unresolved) -> Result<Prepared> {
    let mut warnings = Vec::new();
    let mut cache: Option<crate::system::endpoints::Cache> = None;
    let mut fresh = Vec::new();
    let private_key = match &config.private_key {
        PrivateKeySource::File(path) => {
            let (key, warning) = read_key_file("privateKeyFile", path)?;
            warnings.extend(warning);
            key
        }
        PrivateKeySource::ConfigFile(key) => key.clone(),
    };
    let mut peers = Vec::with_capacity(config.peers.len());
    for (i, peer) in config.peers.iter().enumerate() {
        let preshared_key = match &peer.preshared_key {
            None => None,
            Some(PresharedKey::Inline(key)) => Some(key.clone()),
            Some(PresharedKey::File(path)) => {
                let (key, warning) = read_key_file(&format!("peers[{i}].presharedKeyFile"), path)?;
                warnings.extend(warning);
                Some(key)
            }
        };
        let endpoint = match &peer.endpoint {
            None => None,
            Some(endpoint) => match resolve(endpoint) {
                Ok(addr) => {
                    if matches!(endpoint.host, EndpointHost::Name(_)) {
                        fresh.push((endpoint.to_string(), addr));
                    }
                    Some(addr)
                }
                Err(e) => {
                    let cache = cache
                        .get_or_insert_with(|| crate::system::endpoints::load(&config.namespace));
                    match (cache.get(&endpoint.to_string()), unresolved) {
                        (Some(last), _) => {
                            warnings.push(format!(
                                "peers[{i}].endpoint: cannot resolve {endpoint} now ({e}); \
                                 using its last good address {last}"
                            ));
                            Some(*last)
                        }
                        (None, Unresolved::CacheOrKeep) => {
                            warnings.push(format!(
                                "peers[{i}].endpoint: cannot resolve {endpoint} now ({e}); \
                                 keeping the address the device has"
                            ));
                            None
                        }
                        (None, Unresolved::CacheOrFail) => {
                            bail!("peers[{i}].endpoint: cannot resolve {endpoint}: {e}")
                        }
                    }
                }
            },
        };
        peers.push(PreparedPeer {
            public_key: peer.public_key.clone(),
            preshared_key,
            endpoint,
            peer: peer.clone(),
        });
    }
    if let Err(e) = crate::system::endpoints::remember(&config.namespace, &fresh) {
        warnings.push(format!("cannot keep the endpoints' addresses: {e:#}"));
    }
    Ok(Prepared {
        private_key,
        peers,
        warnings,
    })
}

fn control_key(key: &Key) -> wireguard_control::Key {
    wireguard_control::Key(key.0)
}

/// A peer as it is put on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSettings {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<Cidr>,
}

/// One change to a device, applied in one request to the kernel or the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceChange {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    /// Every peer not in `peers` goes.
    pub replace_peers: bool,
    pub remove: Vec<Key>,
    /// Added, or set anew with exactly these allowed IPs.
    pub peers: Vec<PeerSettings>,
    /// Only the endpoint of a peer changes.
    pub endpoints: Vec<(Key, SocketAddr)>,
}

impl DeviceChange {
    fn to_update(&self) -> DeviceUpdate {
        let mut update = DeviceUpdate::new();
        if let Some(key) = &self.private_key {
            update = update.set_private_key(control_key(key));
        }
        if let Some(port) = self.listen_port {
            update = update.set_listen_port(port);
        }
        if self.replace_peers {
            update = update.replace_peers();
        }
        for key in &self.remove {
            update = update.remove_peer_by_key(&control_key(key));
        }
        for p in &self.peers {
            let mut peer =
                PeerConfigBuilder::new(&control_key(&p.public_key)).replace_allowed_ips();
            for ip in &p.allowed_ips {
                peer = peer.add_allowed_ip(ip.addr, ip.prefix);
            }
            if let Some(psk) = &p.preshared_key {
                peer = peer.set_preshared_key(control_key(psk));
            }
            if let Some(endpoint) = p.endpoint {
                peer = peer.set_endpoint(endpoint);
            }
            if let Some(keepalive) = p.persistent_keepalive {
                peer = peer.set_persistent_keepalive_interval(keepalive);
            }
            update = update.add_peer(peer);
        }
        for (key, endpoint) in &self.endpoints {
            update =
                update.add_peer(PeerConfigBuilder::new(&control_key(key)).set_endpoint(*endpoint));
        }
        update
    }

    /// The same change as the lines of a UAPI `set=1` request.
    fn to_uapi(&self) -> String {
        use std::fmt::Write;
        let mut body = String::new();
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(body, "{key}={value}");
        };
        if let Some(key) = &self.private_key {
            line("private_key", &uapi::hex(&key.0));
        }
        if let Some(port) = self.listen_port {
            line("listen_port", &port);
        }
        if self.replace_peers {
            line("replace_peers", &"true");
        }
        for key in &self.remove {
            line("public_key", &uapi::hex(&key.0));
            line("remove", &"true");
        }
        for p in &self.peers {
            line("public_key", &uapi::hex(&p.public_key.0));
            if let Some(psk) = &p.preshared_key {
                line("preshared_key", &uapi::hex(&psk.0));
            }
            if let Some(endpoint) = p.endpoint {
                line("endpoint", &endpoint);
            }
            if let Some(keepalive) = p.persistent_keepalive {
                line("persistent_keepalive_interval", &keepalive);
            }
            line("replace_allowed_ips", &"true");
            for ip in &p.allowed_ips {
                line("allowed_ip", &format_args!("{}/{}", ip.addr, ip.prefix));
            }
        }
        for (key, endpoint) in &self.endpoints {
            line("public_key", &uapi::hex(&key.0));
            line("endpoint", endpoint);
        }
        body
    }
}

/// Sets the private key and replaces all peers in one request. A kernel device is configured
/// in the calling thread's namespace.
pub fn configure(interface: &str, backend: Backend, prepared: &Prepared) -> Result<()> {
    let change = DeviceChange {
        private_key: Some(prepared.private_key.clone()),
        replace_peers: true,
        peers: prepared
            .peers
            .iter()
            .map(|p| PeerSettings {
                public_key: p.public_key.clone(),
                preshared_key: p.preshared_key.clone(),
                endpoint: p.endpoint,
                persistent_keepalive: p.peer.persistent_keepalive,
                allowed_ips: p.peer.allowed_ips.clone(),
            })
            .collect(),
        ..DeviceChange::default()
    };
    match backend {
        Backend::Kernel => apply_here(interface, &change),
        Backend::Userspace => apply_to_daemon(interface, recorded_daemon(interface)?, &change),
    }
    .context("configuring the WireGuard device")
}

/// What a device holds, as [`show`] reads it.
#[derive(Debug, Clone, Default)]
pub struct DeviceInfo {
    pub public_key: Option<wireguard_control::Key>,
    pub listen_port: Option<u16>,
    pub peers: Vec<wireguard_control::PeerInfo>,
}

impl From<Device> for DeviceInfo {
    fn from(device: Device) -> DeviceInfo {
        DeviceInfo {
            public_key: device.public_key,
            listen_port: device.listen_port,
            peers: device.peers,
        }
    }
}

/// Reads the device. The kernel device is asked inside the namespace it now lives in; a
/// userspace daemon is asked over its socket, from anywhere.
pub fn show(interface: &str, backend: Backend, namespace: impl AsFd) -> Result<DeviceInfo> {
    show_with(interface, backend, namespace, |socket| {
        uapi::get(socket, recorded_daemon(interface)?)
    })
}

/// [`show`] for `status`, which holds the namespace's record already and looks at the peers
/// only: the daemon is the one `state` names, without reading the record again, and a
/// userspace device's own public key is left out (see [`uapi::get_peers`]).
pub fn show_peers(
    interface: &str,
    backend: Backend,
    namespace: impl AsFd,
    state: &crate::system::state::State,
) -> Result<DeviceInfo> {
    show_with(interface, backend, namespace, |socket| {
        uapi::get_peers(socket, daemon_in(Some(state), interface)?)
    })
}

fn show_with(
    interface: &str,
    backend: Backend,
    namespace: impl AsFd,
    userspace: impl FnOnce(&Path) -> io::Result<DeviceInfo>,
) -> Result<DeviceInfo> {
    let name = interface_name(interface)?;
    match backend {
        Backend::Kernel => crate::system::netns::within(namespace, || {
            with_deadline(move || Device::get(&name, WgBackend::Kernel).map(DeviceInfo::from))
        })?,
        Backend::Userspace => userspace(&uapi_socket(interface)),
    }
    .context("reading the WireGuard device")
}

/// The daemon `up` recorded for `interface` (which carries its namespace's name), the only
/// process whose socket we speak to.
fn recorded_daemon(interface: &str) -> io::Result<ProcessId> {
    let state = crate::system::state::State::load(interface).map_err(io::Error::other)?;
    daemon_in(state.as_ref(), interface)
}

fn daemon_in(
    state: Option<&crate::system::state::State>,
    interface: &str,
) -> io::Result<ProcessId> {
    state
        .into_iter()
        .flat_map(|s| s.resources.iter())
        .find_map(|r| match r {
            crate::system::state::Resource::Daemon {
                process,
                interface: i,
                ..
            } if i == interface => Some(*process),
            _ => None,
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no userspace WireGuard daemon for {interface} is on record"),
            )
        })
}

/// How long the kernel may take to answer a WireGuard netlink request.
const KERNEL_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a blocking wireguard-control request (its netlink socket has no timeout of its own)
/// on a thread of its own, which starts in the calling thread's network namespace, and gives
/// up after [`KERNEL_ANSWER_TIMEOUT`].
fn with_deadline<T: Send + 'static>(
    request: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(request());
    });
    rx.recv_timeout(KERNEL_ANSWER_TIMEOUT).unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the kernel did not answer a WireGuard request within {}s",
                KERNEL_ANSWER_TIMEOUT.as_secs()
            ),
        ))
    })
}

/// Applies `change` to the kernel device `interface` of the calling thread's namespace. The
/// kernel would create a missing device: it is only asked when the device is there.
pub fn apply_here(interface: &str, change: &DeviceChange) -> io::Result<()> {
    let name = interface_name(interface).map_err(io::Error::other)?;
    let update = change.to_update();
    with_deadline(move || {
        Device::get(&name, WgBackend::Kernel)?;
        update.apply(&name, WgBackend::Kernel)
    })
}

/// Applies `change` through the configuration socket of `daemon`, which must be the process
/// serving it.
pub fn apply_to_daemon(
    interface: &str,
    daemon: ProcessId,
    change: &DeviceChange,
) -> io::Result<()> {
    uapi::set(&uapi_socket(interface), daemon, &change.to_uapi())
}

/// Applies one change to the device of a namespace that is up.
pub fn apply(
    interface: &str,
    backend: Backend,
    namespace: impl AsFd,
    change: &DeviceChange,
) -> io::Result<()> {
    match backend {
        Backend::Kernel => {
            crate::system::netns::within(namespace, || apply_here(interface, change))
                .map_err(io::Error::other)?
        }
        Backend::Userspace => apply_to_daemon(interface, recorded_daemon(interface)?, change),
    }
}

/// Points one peer at a new endpoint, leaving everything else as it is.
pub fn set_endpoint(
    interface: &str,
    backend: Backend,
    namespace: impl AsFd,
    public_key: &Key,
    endpoint: SocketAddr,
) -> Result<()> {
    let change = DeviceChange {
        endpoints: vec![(public_key.clone(), endpoint)],
        ..DeviceChange::default()
    };
    apply(interface, backend, namespace, &change).context("updating the peer's endpoint")
}

/// Puts `new` in the place of the peer `old` in ONE device update: `old` is removed and `new`
/// added with its allowed IPs in the same request, so the routes into the interface never
/// change and no packet finds the namespace without a peer for longer than the request takes.
/// `new` starts without a session: its next packet (or the keepalive WireGuard sends when a
/// peer with keepalive is added) starts a handshake at once.
pub fn replace_peer(
    interface: &str,
    backend: Backend,
    namespace: impl AsFd,
    old: &Key,
    new: &PeerSettings,
) -> Result<()> {
    let change = DeviceChange {
        remove: vec![old.clone()],
        peers: vec![new.clone()],
        ..DeviceChange::default()
    };
    apply(interface, backend, namespace, &change).context("replacing the peer on the device")
}

/// Makes a peer handshake again now, at `endpoint` when given: the peer is replaced by itself
/// with the settings it has on the device. Setting the endpoint alone would not do it: neither
/// the kernel nor wireguard-go sends an initiation for that, and a session that died with a
/// suspend or a route change would be used until its timers run out.
pub fn rehandshake(
    interface: &str,
    backend: Backend,
    namespace: impl AsFd,
    public_key: &Key,
    endpoint: Option<SocketAddr>,
) -> Result<()> {
    let device = show(interface, backend, namespace.as_fd())?;
    let info = device
        .peers
        .iter()
        .find(|p| p.config.public_key.0 == public_key.0)
        .context("the peer is not on the device")?;
    let zero = [0u8; 32];
    let settings = PeerSettings {
        public_key: public_key.clone(),
        preshared_key: info
            .config
            .preshared_key
            .as_ref()
            .filter(|k| k.0 != zero)
            .map(|k| Key(k.0)),
        endpoint: endpoint.or(info.config.endpoint),
        persistent_keepalive: info
            .config
            .persistent_keepalive_interval
            .filter(|&k| k != 0),
        allowed_ips: info
            .config
            .allowed_ips
            .iter()
            .map(|a| Cidr {
                addr: a.address,
                prefix: a.cidr,
            })
            .collect(),
    };
    replace_peer(interface, backend, namespace, public_key, &settings)
}

/// A peer as the device has it, in the config's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePeer {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    /// Network addresses (host bits clear), as the device keeps them.
    pub allowed_ips: Vec<Cidr>,
    pub last_handshake: Option<std::time::SystemTime>,
}

/// The parts of the device that `reload` and `heal` compare with the config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceView {
    /// The device's public key: what its private key makes.
    pub public_key: Option<Key>,
    pub peers: Vec<DevicePeer>,
}

impl DeviceView {
    pub fn of(device: &DeviceInfo) -> DeviceView {
        let key = |k: &wireguard_control::Key| Some(Key(k.0)).filter(|k| k.0 != [0; 32]);
        DeviceView {
            public_key: device.public_key.as_ref().and_then(key),
            peers: device
                .peers
                .iter()
                .map(|p| DevicePeer {
                    public_key: Key(p.config.public_key.0),
                    preshared_key: p.config.preshared_key.as_ref().and_then(key),
                    endpoint: p.config.endpoint,
                    keepalive: p.config.persistent_keepalive_interval.filter(|&k| k != 0),
                    allowed_ips: p
                        .config
                        .allowed_ips
                        .iter()
                        .map(|a| {
                            Cidr {
                                addr: a.address,
                                prefix: a.cidr,
                            }
                            .network()
                        })
                        .collect(),
                    last_handshake: p.stats.last_handshake_time,
                })
                .collect(),
        }
    }
}

/// The public key that belongs to `private`.
pub fn public_key_of(private: &Key) -> Key {
    Key(control_key(private).get_public().0)
}
#[cfg(test)]
mod tests {
    use super::tun_queues_expected;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn boringtun_waits_for_one_queue_per_thread() {
        let expect = |line: &str, env: Option<&str>| tun_queues_expected(&words(line), env);
        assert_eq!(expect("wireguard-go", Some("8")), 1);
        assert_eq!(expect("/nix/store/x-boringtun/bin/boringtun-cli", None), 4);
        assert_eq!(expect("boringtun-cli", Some("2")), 2);
        assert_eq!(expect("boringtun-cli --threads 3", Some("2")), 3);
        assert_eq!(expect("boringtun-cli --threads=5", None), 5);
        assert_eq!(expect("boringtun-cli -t 6", None), 6);
        assert_eq!(expect("boringtun-cli -t7", None), 7);
        assert_eq!(expect("boringtun-cli -t 0", None), 1);
        assert_eq!(
            expect("boringtun-cli --threads 8 --disable-multi-queue", None),
            1
        );
        assert_eq!(expect("boringtun-cli --threads lots", None), 4);
    }
}
