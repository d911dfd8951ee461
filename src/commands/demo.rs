//! `demo`: the whole idea in a few seconds, with no outside peer.
//!
//! A throwaway "peer" namespace gets its own WireGuard and a small web service, joined to the
//! host by a veth pair that stands in for the internet. A confined namespace is brought up
//! through the very code path of `up`, a request from inside gets the peer's answer through
//! the tunnel, and the same address is unreachable from the host. Everything is torn down at
//! the end, on error and on Ctrl-C.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wireguard_control::Key as WgKey;

use crate::commands::updown as setup;
use crate::config::{Cidr, Config};
use crate::system::files::Dir;
use crate::system::link::Netlink;
use crate::system::process::ProcessId;
use crate::system::{netns, wireguard};

const CONFINED: &str = "wgdemo";
const PEER_NS: &str = "wgdemo-peer";
const PEER_IF: &str = "wgdemo-p";
const HOST_VETH: &str = "wgdemo-h";
const PEER_VETH: &str = "wgdemo-u";
const HOST_UNDERLAY: &str = "10.200.250.1/30";
const PEER_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 200, 250, 2);
const PEER_PORT: u16 = 51820;
const TUNNEL_NET: &str = "10.200.251.0/24";
const PEER_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 200, 251, 1);
const CONFINED_TUNNEL: &str = "10.200.251.2/32";
const WEB_PORT: u16 = 8080;
const STATE_DIR: &str = "/run/wg-namespace-demo";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Everything the demo made; dropping it removes all of it, newest first.
#[derive(Default)]
struct Rig {
    route_added: bool,
    peer_ns: bool,
    veth: bool,
    peer_daemon: Option<ProcessId>,
    confined_up: bool,
    files: bool,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.confined_up
            && let Err(e) = setup::down(CONFINED)
        {
            eprintln!("warning: {e:#}");
        }
        if let Some(daemon) = self.peer_daemon {
            let _ = daemon.terminate(Duration::from_secs(2));
            wireguard::remove_stale_socket(PEER_IF);
        }
        if self.veth {
            // Deleting one end removes the pair; the peer namespace may live on for a moment
            // (our own sockets in it close when the process ends).
            let _ = ip(&["link", "del", HOST_VETH]);
        }
        if self.peer_ns {
            let _ = netns::delete(PEER_NS);
        }
        if self.route_added
            && let Ok(host) = Netlink::here()
        {
            let _ = host.delete_unreachable(tunnel_net());
        }
        if self.files {
            let _ = std::fs::remove_dir_all(STATE_DIR);
        }
        println!("[teardown] removed the demo namespaces, links, route and files");
    }
}

fn tunnel_net() -> Cidr {
    TUNNEL_NET.parse().expect("constant prefix")
}

fn say(step: &str, text: impl AsRef<str>) {
    println!("[{step}] {}", text.as_ref());
}

fn ip(args: &[&str]) -> Result<()> {
    let mut command = Command::new("ip");
    command.args(args);
    let output = crate::system::process::output_within(&mut command, None, Duration::from_secs(10))
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

pub fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("demo: needs root (it creates network namespaces)");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        let _ = nix::sys::signal::sigaction(nix::sys::signal::SIGINT, &action);
        let _ = nix::sys::signal::sigaction(nix::sys::signal::SIGTERM, &action);
    }
    preflight()?;
    let mut rig = Rig::default();
    let result = demo(&mut rig);
    drop(rig);
    result.context("demo")?;
    println!("demo finished: the confined namespace reached the peer only through WireGuard");
    Ok(())
}

/// Refuses to start when anything the demo would create already exists.
fn preflight() -> Result<()> {
    for ns in [CONFINED, PEER_NS] {
        if netns::path(ns).exists() {
            bail!(
                "a network namespace named {ns} already exists (an earlier demo?); remove it with `ip netns del {ns}`"
            );
        }
    }
    let host = Netlink::here()?;
    for link in [HOST_VETH, CONFINED, PEER_IF] {
        if host.index_of(link)?.is_some() {
            bail!("a link named {link} already exists; remove it with `ip link del {link}`");
        }
    }
    let net = tunnel_net();
    let underlay: Cidr = HOST_UNDERLAY.parse().expect("constant prefix");
    for route in host.routes()? {
        let d = route.destination;
        if d.prefix > 0 && (overlaps(d, net) || overlaps(d, underlay.network())) {
            bail!(
                "the demo uses 10.200.250.0/30 and {TUNNEL_NET}, but this host already routes {d}"
            );
        }
    }
    Ok(())
}

fn overlaps(a: Cidr, b: Cidr) -> bool {
    let shorter = a.prefix.min(b.prefix);
    Cidr {
        addr: a.addr,
        prefix: shorter,
    }
    .network()
        == Cidr {
            addr: b.addr,
            prefix: shorter,
        }
        .network()
}

fn demo(rig: &mut Rig) -> Result<()> {
    let host = Netlink::here()?;
    // Without this, a packet for the tunnel's addresses sent from the host would follow the
    // default route off the machine.
    host.add_unreachable(tunnel_net())?;
    rig.route_added = true;
    say(
        "host",
        format!("added `unreachable {TUNNEL_NET}` so no demo packet can leave this machine"),
    );
    check_interrupt()?;

    let peer_key = WgKey::generate_private();
    let confined_key = WgKey::generate_private();
    let files = Dir::create(std::path::Path::new(STATE_DIR), 0o700)?;
    rig.files = true;
    files.set_mode(0o700)?;

    netns::create(PEER_NS)?;
    rig.peer_ns = true;
    let peer_fd = netns::open(PEER_NS)?;
    rig.veth = true;
    ip(&[
        "link", "add", HOST_VETH, "type", "veth", "peer", "name", PEER_VETH, "netns", PEER_NS,
    ])?;
    ip(&["address", "add", HOST_UNDERLAY, "dev", HOST_VETH])?;
    ip(&["link", "set", HOST_VETH, "up"])?;
    let inside_peer = Netlink::inside(&peer_fd)?;
    let veth = inside_peer.index_of(PEER_VETH)?.context("peer veth")?;
    inside_peer.add_addresses(
        veth,
        &[Cidr {
            addr: PEER_UNDERLAY.into(),
            prefix: 30,
        }],
    )?;
    inside_peer.set_up(veth)?;
    inside_peer.set_up(inside_peer.index_of("lo")?.context("peer lo")?)?;
    let backend = start_peer_wireguard(rig, &peer_fd, &inside_peer)?;
    let wg = inside_peer
        .index_of(PEER_IF)?
        .context("peer WireGuard link")?;
    inside_peer.add_addresses(
        wg,
        &[Cidr {
            addr: PEER_TUNNEL.into(),
            prefix: 24,
        }],
    )?;
    inside_peer.set_up(wg)?;
    let change = wireguard::DeviceChange {
        private_key: Some(crate::config::Key(peer_key.0)),
        listen_port: Some(PEER_PORT),
        peers: vec![wireguard::PeerSettings {
            public_key: crate::config::Key(confined_key.get_public().0),
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: vec![Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(10, 200, 251, 2)),
                prefix: 32,
            }],
        }],
        ..wireguard::DeviceChange::default()
    };
    match (backend, rig.peer_daemon) {
        (wireguard::Backend::Userspace, Some(daemon)) => {
            wireguard::apply_to_daemon(PEER_IF, daemon, &change)
        }
        _ => netns::within(&peer_fd, || wireguard::apply_here(PEER_IF, &change))?,
    }
    .context("configuring the peer's WireGuard")?;
    let web = netns::within(&peer_fd, || TcpListener::bind((PEER_TUNNEL, WEB_PORT)))??;
    std::thread::spawn(move || serve_web(web));
    say(
        "peer",
        format!(
            "namespace {PEER_NS}: WireGuard ({}) listening on {PEER_UNDERLAY}:{PEER_PORT}, web service on {PEER_TUNNEL}:{WEB_PORT}",
            backend.as_str()
        ),
    );
    check_interrupt()?;

    let key_file = PathBuf::from(STATE_DIR).join("confined.key");
    files.write_atomically("confined.key", confined_key.to_base64().as_bytes(), 0o600)?;
    let config_file = PathBuf::from(STATE_DIR).join("wgdemo.json");
    let config_json = serde_json::json!({
        "namespace_name": CONFINED,
        "dns_server": PEER_TUNNEL.to_string(),
        "ips": [CONFINED_TUNNEL],
        "privateKeyFile": key_file,
        "peers": [{
            "publicKey": peer_key.get_public().to_base64(),
            "allowedIPs": ["0.0.0.0/0"],
            "endpoint": format!("{PEER_UNDERLAY}:{PEER_PORT}"),
            "persistentKeepalive": 5
        }]
    });
    files.write_atomically(
        "wgdemo.json",
        serde_json::to_string_pretty(&config_json)?.as_bytes(),
        0o600,
    )?;
    let config = Config::load(&config_file)?;
    rig.confined_up = true;
    setup::up(&config, Some(&config_file))?;
    say(
        "up",
        format!(
            "confined namespace {CONFINED} is up (`wg-namespace up --config {}`)",
            config_file.display()
        ),
    );
    check_interrupt()?;

    let confined_fd = netns::open(CONFINED)?;
    let target = SocketAddr::new(PEER_TUNNEL.into(), WEB_PORT);
    let answer = netns::within(&confined_fd, || http_get(target))?
        .context("a request from inside the confined namespace")?;
    say(
        "inside",
        format!("GET http://{target}/ answered: {answer:?}"),
    );
    check_interrupt()?;

    match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(_) => bail!(
            "the host reached {target}: the peer's service must only be reachable through the tunnel"
        ),
        Err(e) => say(
            "host",
            format!("GET http://{target}/ from the host fails: {e}"),
        ),
    }
    check_interrupt()?;

    let links = Netlink::inside(&confined_fd)?.links()?;
    let names: Vec<_> = links.iter().map(|l| l.name.as_str()).collect();
    say(
        "inside",
        format!(
            "links in {CONFINED}: {}; its WireGuard socket stays in the host namespace",
            names.join(", ")
        ),
    );
    let status = crate::commands::status::inspect(CONFINED);
    say(
        "status",
        format!("{CONFINED} is {}", status.verdict.as_str()),
    );
    Ok(())
}

fn start_peer_wireguard(
    rig: &mut Rig,
    peer_fd: &OwnedFd,
    inside_peer: &Netlink,
) -> Result<wireguard::Backend> {
    match inside_peer.add_wireguard(PEER_IF) {
        Ok(_) => return Ok(wireguard::Backend::Kernel),
        Err(e) if wireguard::is_unsupported(&e) => {}
        Err(e) => return Err(e).context("creating the peer's WireGuard link"),
    }
    wireguard::remove_stale_socket(PEER_IF);
    let argv = vec![
        crate::config::DEFAULT_USERSPACE_COMMAND.to_string(),
        "-f".into(),
        PEER_IF.into(),
    ];
    let gated = crate::system::process::start_detached(crate::system::process::Detached {
        argv: &argv,
        envs: &[("WG_PROCESS_FOREGROUND", "1")],
        netns: Some(peer_fd.as_fd()),
        keep: &[],
    })?;
    let daemon = gated.process;
    rig.peer_daemon = Some(daemon);
    gated.release()?;
    wireguard::wait_for_daemon(daemon, &argv, PEER_IF, inside_peer)?;
    Ok(wireguard::Backend::Userspace)
}

fn serve_web(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        // Closing with part of the request unread would make the kernel answer with a reset,
        // and the client could lose the response to it.
        if read_request_head(&mut stream).is_err() {
            continue;
        }
        let body = "hello from the peer, through the tunnel\n";
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}

/// Reads up to the blank line that ends an HTTP request's head.
fn read_request_head(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn http_get(target: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET / HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string())
}
