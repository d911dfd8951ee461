//! The test rig: real namespaces, a real WireGuard peer, and a packet counter.
//!
//! Layout for test number `id` (1..=250), all names and addresses unique to it:
//!
//! ```text
//!   wgt<id>h  "host": the helper runs here, as it would in the root namespace
//!     wgt<id>a 10.200.<id>.1/29  ── veth (the underlay) ──  wgt<id>b 10.200.<id>.2/29 (+ .3)
//!                                                            wgt<id>p  "peer": wireguard-go
//!                                                              wgt<id>w 10.200.<id>.129/25, fd77:<id>::1/64
//!   wgt<id>c  the confined namespace `up` builds; its tunnel address is 10.200.<id>.130
//!
//!   with Rig::add_second_peer (failover tests), a second server with a key of its own:
//!     wgt<id>d 10.200.<id>.17/29 ── veth ── wgt<id>e 10.200.<id>.18/29
//!                                             wgt<id>q  "second peer": wireguard-go
//!                                               wgt<id>v 10.200.<id>.129/25, fd77:<id>::1/64
//! ```
//!
//! The root namespace only gets `unreachable` routes for 10.200.<id>.0/24 and fd77:<id>::/32,
//! so even a broken test cannot send a packet off the machine. Dropping the rig removes
//! everything it made, on failure too.

#![allow(dead_code)] // each test binary uses a different part of the rig

pub mod natpmp;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use wg_namespace::system::netns;
use wg_namespace::system::wireguard::uapi_socket;
use wireguard_control::{Backend, DeviceUpdate, Key, PeerConfigBuilder};

pub const BIN: &str = env!("CARGO_BIN_EXE_wg-namespace");
pub const WG_PORT: u16 = 51820;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// One integration test: run when root, reported as ignored (and said so) otherwise.
pub fn trial(name: &str, test: fn() -> Result<()>) -> libtest_mimic::Trial {
    libtest_mimic::Trial::test(name, move || test().map_err(|e| format!("{e:#}").into()))
        .with_ignored_flag(!is_root())
}

/// Runs the trials; explains loudly when they cannot run.
pub fn run(trials: Vec<libtest_mimic::Trial>) -> ! {
    if !is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: these {} integration tests build network namespaces and need root; run them as root (CI does)",
            trials.len()
        );
    }
    libtest_mimic::run(&libtest_mimic::Arguments::from_args(), trials).exit()
}

/// Runs a command, returning its output whatever the exit status.
pub fn run_cmd(argv: &[&str]) -> Result<Output> {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))
}

/// Runs a command that must succeed.
pub fn sh(argv: &[&str]) -> Result<String> {
    let out = run_cmd(argv)?;
    ensure!(
        out.status.success(),
        "{} failed: {}{}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {}s waiting for {what}", timeout.as_secs())
}

pub struct Rig {
    pub id: u8,
    pub host: String,
    pub peer: String,
    pub confined: String,
    pub host_veth: String,
    pub peer_veth: String,
    pub peer_if: String,
    pub dir: PathBuf,
    pub peer_key: Key,
    pub confined_key: Key,
    host_fd: OwnedFd,
    peer_fd: OwnedFd,
    peer_wg: Option<Child>,
    second: Option<SecondPeer>,
    children: Vec<Child>,
    /// A field drops after `Drop::drop` has run, so the routes outlast the rest of the rig.
    _guard_routes: GuardRoutes,
}

impl Rig {
    pub fn new(id: u8) -> Result<Rig> {
        ensure!((1..=250).contains(&id), "rig ids are 1..=250");
        let host = format!("wgt{id}h");
        let peer = format!("wgt{id}p");
        for ns in [&host, &peer, &format!("wgt{id}c")] {
            ensure!(
                !netns::path(ns).exists(),
                "namespace {ns} already exists: another run of this test?"
            );
        }
        // The guard routes come first: from here on nothing for these prefixes leaves.
        let guard_routes = GuardRoutes::add(id)?;
        let dir = PathBuf::from(format!("/tmp/wgns-test-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;

        // Partially built rigs are cleaned by Drop, so build the struct early.
        netns::create(&host)?;
        let host_fd = netns::open(&host)?;
        let peer_fd = match netns::create(&peer).and_then(|_| netns::open(&peer)) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = netns::delete(&host);
                return Err(e);
            }
        };
        let mut rig = Rig {
            id,
            confined: format!("wgt{id}c"),
            host_veth: format!("wgt{id}a"),
            peer_veth: format!("wgt{id}b"),
            peer_if: format!("wgt{id}w"),
            host,
            peer,
            dir,
            peer_key: Key::generate_private(),
            confined_key: Key::generate_private(),
            host_fd,
            peer_fd,
            peer_wg: None,
            second: None,
            children: Vec::new(),
            _guard_routes: guard_routes,
        };
        rig.build_underlay()?;
        rig.start_peer_wg()?;
        Ok(rig)
    }

    fn build_underlay(&self) -> Result<()> {
        let (h, p, id) = (&self.host, &self.peer, self.id);
        underlay_link(
            (h, &self.host_veth, &format!("10.200.{id}.1/29")),
            (p, &self.peer_veth, &format!("10.200.{id}.2/29")),
        )?;
        // Deleting .2 (to move the peer) must not take its sibling .3 along.
        let promote = format!("net.ipv4.conf.{}.promote_secondaries=1", self.peer_veth);
        sh(&["ip", "netns", "exec", p, "sysctl", "-q", "-w", &promote])?;
        add_address(p, &format!("10.200.{id}.3/29"), &self.peer_veth)?;
        Ok(())
    }

    /// (Re)starts the peer's WireGuard daemon and configures it for the confined side.
    pub fn start_peer_wg(&mut self) -> Result<()> {
        let child = self.start_server_wg(
            &self.peer_fd,
            &self.peer,
            &self.peer_if,
            &self.peer_key,
            None,
        )?;
        self.peer_wg = Some(child);
        Ok(())
    }

    /// wireguard-go as a server for the confined side in the namespace `fd` (named `ns`), on
    /// the interface `interface` with the peer's tunnel addresses (10.200.<id>.129/25,
    /// fd77:<id>::1/64), listening on [`WG_PORT`].
    fn start_server_wg(
        &self,
        fd: &OwnedFd,
        ns: &str,
        interface: &str,
        key: &Key,
        preshared_key: Option<&Key>,
    ) -> Result<Child> {
        let _ = std::fs::remove_file(uapi_socket(interface));
        let mut child = self
            .command_in(fd, &["wireguard-go", "-f", interface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wireguard-go for a server")?;
        let configured = (|| -> Result<()> {
            let socket = uapi_socket(interface);
            wait_for(Duration::from_secs(10), "a server's wireguard-go", || {
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            })?;
            let id = self.id;
            add_address(ns, &format!("10.200.{id}.129/25"), interface)?;
            add_address(ns, &format!("fd77:{id}::1/64"), interface)?;
            sh(&["ip", "-n", ns, "link", "set", interface, "up"])?;
            let mut peer = PeerConfigBuilder::new(&self.confined_key.get_public())
                .add_allowed_ip(self.confined_ip().into(), 32)
                .add_allowed_ip(format!("fd77:{id}::2").parse::<IpAddr>()?, 128);
            if let Some(psk) = preshared_key {
                peer = peer.set_preshared_key(psk.clone());
            }
            DeviceUpdate::new()
                .set_private_key(key.clone())
                .set_listen_port(WG_PORT)
                .replace_peers()
                .add_peer(peer)
                .apply(
                    &interface.parse().map_err(|e| anyhow!("{e:?}"))?,
                    Backend::Userspace,
                )
                .context("configuring a server's WireGuard")
        })();
        if let Err(e) = configured {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(child)
    }

    /// Builds the second server (see the layout above). Its preshared key, when given, is
    /// what the confined side must use with it.
    pub fn add_second_peer(&mut self, preshared_key: Option<Key>) -> Result<()> {
        let id = self.id;
        let ns = format!("wgt{id}q");
        ensure!(
            !netns::path(&ns).exists(),
            "namespace {ns} already exists: another run of this test?"
        );
        netns::create(&ns)?;
        let fd = match netns::open(&ns) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = netns::delete(&ns);
                return Err(e);
            }
        };
        // From here on Drop cleans up.
        self.second = Some(SecondPeer {
            ns: ns.clone(),
            fd,
            host_veth: format!("wgt{id}d"),
            peer_veth: format!("wgt{id}e"),
            wg_if: format!("wgt{id}v"),
            key: Key::generate_private(),
            preshared_key,
            wg: None,
        });
        let second = self.second.as_ref().context("second peer")?;
        underlay_link(
            (&self.host, &second.host_veth, &format!("10.200.{id}.17/29")),
            (&ns, &second.peer_veth, &format!("10.200.{id}.18/29")),
        )?;
        self.start_second_peer_wg()
    }

    pub fn second_peer(&self) -> &SecondPeer {
        self.second.as_ref().expect("add_second_peer first")
    }

    pub fn second_peer_underlay(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.id, 18)
    }

    /// (Re)starts the second server's WireGuard.
    pub fn start_second_peer_wg(&mut self) -> Result<()> {
        let second = self.second.as_ref().context("add_second_peer first")?;
        let child = self.start_server_wg(
            &second.fd,
            &second.ns,
            &second.wg_if,
            &second.key,
            second.preshared_key.as_ref(),
        )?;
        self.second.as_mut().context("second peer")?.wg = Some(child);
        Ok(())
    }

    /// Stops the second server's WireGuard.
    pub fn stop_second_peer_wg(&mut self) {
        if let Some(second) = &mut self.second {
            if let Some(mut child) = second.wg.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_file(uapi_socket(&second.wg_if));
        }
    }

    /// Stops the peer's WireGuard: the tunnel is down from then on.
    pub fn stop_peer_wg(&mut self) {
        if let Some(mut child) = self.peer_wg.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(uapi_socket(&self.peer_if));
    }

    pub fn peer_underlay(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.id, 2)
    }

    pub fn peer_tunnel_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.id, 129)
    }

    pub fn confined_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.id, 130)
    }

    pub fn host_underlay(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.id, 1)
    }

    /// A key file only root can read.
    pub fn write_secret(&self, name: &str, content: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(content.as_bytes())?;
        Ok(path)
    }

    /// A working config for the confined namespace: everything to the peer.
    pub fn config(&self) -> Result<Value> {
        let key = self.write_secret("confined.key", &self.confined_key.to_base64())?;
        Ok(json!({
            "namespace_name": self.confined,
            "dns_server": self.peer_tunnel_ip().to_string(),
            "ips": [format!("{}/32", self.confined_ip())],
            "privateKeyFile": key,
            "backend": "userspace",
            "peers": [{
                "publicKey": self.peer_key.get_public().to_base64(),
                "allowedIPs": ["0.0.0.0/0", "::/0"],
                "endpoint": format!("{}:{WG_PORT}", self.peer_underlay()),
            }]
        }))
    }

    pub fn write_config(&self, name: &str, config: &Value) -> Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(config)?)?;
        Ok(path)
    }

    /// A command that will run in the namespace `fd` (a fresh process, so the test's own
    /// threads stay where they are).
    pub fn command_in(&self, fd: &OwnedFd, argv: &[&str]) -> Command {
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        let raw = fd.as_raw_fd();
        // SAFETY: setns is a plain system call; the fd is owned by the rig and outlives spawn.
        unsafe {
            command.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        command
    }

    pub fn host_fd(&self) -> &OwnedFd {
        &self.host_fd
    }

    pub fn peer_fd(&self) -> &OwnedFd {
        &self.peer_fd
    }

    /// The helper, run in the rig's host namespace.
    /// Starts `wg-namespace COMMAND --config CONFIG` in the test's host namespace with the
    /// test-only pause switch set to `step`, and returns once it has stopped itself there.
    pub fn paused(&self, command: &str, config: &str, step: &str) -> Result<Child> {
        let mut child = self
            .command_in(self.host_fd(), &[BIN, command, "--config", config])
            .env(wg_namespace::commands::updown::PAUSE_ENV, step)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let stopped = wait_for(
            Duration::from_secs(10),
            &format!("{command} to pause before {step}"),
            || wg_namespace::system::process::ProcessId::of(pid).is_some_and(|p| p.is_stopped()),
        );
        if let Err(e) = stopped {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(child)
    }

    pub fn helper(&self, args: &[&str]) -> Result<Output> {
        let mut argv = vec![BIN];
        argv.extend_from_slice(args);
        self.command_in(&self.host_fd, &argv)
            .output()
            .context("running wg-namespace")
    }

    pub fn up_with(&self, config: &Value) -> Result<PathBuf> {
        let path = self.write_config("config.json", config)?;
        let out = self.helper(&["up", "--config", path.to_str().context("path")?])?;
        ensure!(out.status.success(), "up failed: {}", text(&out));
        Ok(path)
    }

    pub fn down(&self) -> Result<()> {
        let out = self.helper(&["down", "--namespace", &self.confined])?;
        ensure!(out.status.success(), "down failed: {}", text(&out));
        Ok(())
    }

    /// `wg-namespace exec` in the confined namespace.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", "--namespace", &self.confined, "--"];
        args.extend_from_slice(argv);
        self.helper(&args)
    }

    pub fn confined_fd(&self) -> Result<OwnedFd> {
        netns::open(&self.confined)
    }

    /// Runs `f` on this thread inside the namespace `fd`.
    pub fn within<T>(fd: &OwnedFd, f: impl FnOnce() -> T) -> Result<T> {
        netns::within(fd, f)
    }

    /// Keeps a child to be killed (by PID) when the rig goes.
    pub fn track(&mut self, child: Child) -> u32 {
        let pid = child.id();
        self.children.push(child);
        pid
    }

    pub fn kill_tracked(&mut self, pid: u32) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// dnsmasq in the peer, on its tunnel address: dns_server. Answers `names` and logs each
    /// query to dnsmasq.log.
    pub fn dnsmasq(&mut self, names: &[(&str, &str)]) -> Result<PathBuf> {
        self.dnsmasq_at(self.peer_tunnel_ip(), "dnsmasq", names)
    }

    /// A service on the peer's tunnel address (port 8000) that answers with `reply`: what a
    /// process inside reaches only through the tunnel.
    pub fn peer_service(&self, reply: &'static str) -> Result<SocketAddr> {
        Rig::serve_tcp(
            &self.peer_fd,
            SocketAddr::new(self.peer_tunnel_ip().into(), 8000),
            reply,
        )
    }

    /// A TCP listener in the namespace `fd` that answers every connection with `reply`.
    pub fn serve_tcp(fd: &OwnedFd, addr: SocketAddr, reply: &'static str) -> Result<SocketAddr> {
        let listener = Rig::within(fd, || TcpListener::bind(addr))??;
        let bound = listener.local_addr()?;
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Ok(bound)
    }

    /// Connects from inside `fd` and reads what the other side says.
    pub fn tcp_request(fd: &OwnedFd, addr: SocketAddr, timeout: Duration) -> Result<String> {
        Rig::within(fd, || -> Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })?
    }

    /// What `up` may have left: namespaces, links, state, /etc/netns, processes.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let c = &self.confined;
        if netns::path(c).exists() {
            found.push(format!("namespace {c}"));
        }
        if Path::new("/etc/netns").join(c).exists() {
            found.push(format!("/etc/netns/{c}"));
        }
        for name in [
            format!("{c}.json"),
            format!("{c}.lock"),
            format!(".{c}.json.tmp"),
            format!("forwarding/{c}.json"),
            format!("forwarding/.{c}.json.tmp"),
        ] {
            let path = format!("/run/wg-namespace/{name}");
            if Path::new(&path).exists() {
                found.push(path);
            }
        }
        if let Ok(Some(_)) =
            wg_namespace::system::link::Netlink::inside(&self.host_fd).and_then(|nl| nl.index_of(c))
        {
            found.push(format!("link {c} in the host namespace"));
        }
        let counters = format!("/run/wg-namespace/relays/{c}");
        if Path::new(&counters).exists() {
            found.push(counters);
        }
        if uapi_socket(c).exists() {
            found.push(uapi_socket(c).display().to_string());
        }
        for pid in processes_mentioning(c) {
            found.push(format!("process {pid} ({})", cmdline(pid)));
        }
        found
    }

    pub fn assert_clean(&self) -> Result<()> {
        let left = self.leftovers();
        ensure!(left.is_empty(), "left behind: {}", left.join(", "));
        Ok(())
    }
}

/// A second server for the confined namespace; see [`Rig::add_second_peer`].
pub struct SecondPeer {
    pub ns: String,
    pub fd: OwnedFd,
    pub host_veth: String,
    pub peer_veth: String,
    pub wg_if: String,
    pub key: Key,
    pub preshared_key: Option<Key>,
    wg: Option<Child>,
}

/// A veth pair from one test namespace to another, each end up with its address and without
/// IPv6 (its neighbour discovery would only be noise in captures). Each end is
/// (namespace, link, address).
fn underlay_link(a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
    sh(&[
        "ip", "-n", a.0, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
    ])?;
    for (ns, link, address) in [a, b] {
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{link}.disable_ipv6=1"),
        ])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", ns, "link", "set", link, "up"])?;
        add_address(ns, address, link)?;
    }
    Ok(())
}

/// Voluntary context switches of a process, summed over its threads: how often it went to
/// sleep, and so woke up again. A thread that ends meanwhile counts as none.
pub fn wakeups(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `ip -n <ns> address add <address> dev <link>`.
fn add_address(ns: &str, address: &str, link: &str) -> Result<()> {
    // `nodad`: an IPv6 address is usable at once, not after the kernel's DAD work has run,
    // which a busy machine delays (binding it failed with EADDRNOTAVAIL meanwhile).
    sh(&[
        "ip", "-n", ns, "address", "add", address, "dev", link, "nodad",
    ])
    .map(drop)
}

/// PIDs (other than ours) of the processes for which `keep` holds.
fn pids_where(keep: impl Fn(u32) -> bool) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && keep(pid))
        .collect()
}

/// PIDs whose command line names `word` as a whole argument.
pub fn processes_mentioning(word: &str) -> Vec<u32> {
    pids_where(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|b| b.split(|&c| c == 0).any(|arg| arg == word.as_bytes()))
    })
}

/// PIDs of processes in the network namespace `fd` (by namespace inode).
fn processes_in(fd: &OwnedFd) -> Vec<u32> {
    let Ok(meta) = std::fs::File::from(fd.try_clone().expect("dup")).metadata() else {
        return Vec::new();
    };
    pids_where(|pid| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
    })
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Companions first, asked to stop as systemd asks them (port-forward then removes its
        // record), so that none writes a record again after `down`.
        for child in &self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for mut child in self.children.drain(..) {
            while child.try_wait().is_ok_and(|s| s.is_none()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.helper(&["down", "--namespace", &self.confined]);
        self.stop_peer_wg();
        self.stop_second_peer_wg();
        // Anything still running in our namespaces was started for this test; end it by PID.
        let mut fds = vec![&self.host_fd, &self.peer_fd];
        fds.extend(self.second.as_ref().map(|s| &s.fd));
        let confined = netns::open(&self.confined).ok();
        fds.extend(confined.as_ref());
        for fd in fds {
            for pid in processes_in(fd) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if confined.is_some()
            && !Path::new(&format!("/run/wg-namespace/{}.json", self.confined)).exists()
        {
            let _ = netns::delete(&self.confined);
        }
        let _ = sh(&["ip", "-n", &self.host, "link", "del", &self.host_veth]);
        if let Some(second) = &self.second {
            let _ = sh(&["ip", "-n", &self.host, "link", "del", &second.host_veth]);
            let _ = netns::delete(&second.ns);
        }
        let _ = netns::delete(&self.peer);
        let _ = netns::delete(&self.host);
        let _ = std::fs::remove_file(uapi_socket(&self.confined));
        // What a companion the test ran leaves when it is killed: its snapshot socket and its
        // records; then the state directory goes if no other namespace uses it.
        for record in [
            format!("companion/{}.sock", self.confined),
            format!("forwarding/{}.json", self.confined),
            format!("resolution/{}.json", self.confined),
        ] {
            let _ = std::fs::remove_file(Path::new("/run/wg-namespace").join(record));
        }
        wg_namespace::system::state::tidy_state_dir();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The endpoint cache `up` keeps for names (outside /run, so that it survives reboots).
        let _ = std::fs::remove_dir_all(format!("/var/lib/wg-namespace/{}", self.confined));
        let _ = std::fs::remove_dir("/var/lib/wg-namespace");
    }
}

/// The root namespace's `unreachable` routes for one rig's prefixes; removed on drop.
struct GuardRoutes(Vec<String>);

impl GuardRoutes {
    fn add(id: u8) -> Result<GuardRoutes> {
        let mut added = GuardRoutes(Vec::new());
        for prefix in [format!("10.200.{id}.0/24"), format!("fd77:{id}::/32")] {
            sh(&["ip", "route", "add", "unreachable", &prefix])?;
            added.0.push(prefix);
        }
        Ok(added)
    }
}

impl Drop for GuardRoutes {
    fn drop(&mut self) {
        for prefix in &self.0 {
            let _ = sh(&["ip", "route", "del", "unreachable", prefix]);
        }
    }
}

/// One frame seen on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    /// An ICMP error about a WireGuard datagram (the peer saying its port is closed).
    pub about_wireguard: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Arp,
    Ipv4,
    Ipv6,
    Other(u16),
}

impl Frame {
    /// WireGuard's own UDP between the host and the peer's endpoint port.
    pub fn is_wireguard(&self) -> bool {
        (self.protocol == 17 && (self.sport == WG_PORT || self.dport == WG_PORT))
            || self.about_wireguard
    }

    pub fn describe(&self) -> String {
        format!(
            "{:?} proto {} {}:{} -> {}:{}",
            self.kind,
            self.protocol,
            self.src.map_or("-".into(), |a| a.to_string()),
            self.sport,
            self.dst.map_or("-".into(), |a| a.to_string()),
            self.dport
        )
    }
}

fn parse_frame(buf: &[u8]) -> Option<Frame> {
    if buf.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([buf[12], buf[13]]);
    let ip = &buf[14..];
    let ports = |l4: &[u8]| {
        if l4.len() >= 4 {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        } else {
            (0, 0)
        }
    };
    Some(match ethertype {
        0x0806 => Frame {
            kind: FrameKind::Arp,
            src: None,
            dst: None,
            protocol: 0,
            sport: 0,
            dport: 0,
            about_wireguard: false,
        },
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let protocol = ip[9];
            let (sport, dport) = if matches!(protocol, 6 | 17) {
                ports(ip.get(ihl..)?)
            } else {
                (0, 0)
            };
            // ICMP destination unreachable quotes the offending IP header and 8 bytes after it.
            let about_wireguard = protocol == 1
                && ip.get(ihl) == Some(&3)
                && ip.get(ihl + 8..).is_some_and(|quoted| {
                    let qihl = usize::from(quoted.first().copied().unwrap_or(0) & 0x0f) * 4;
                    quoted.get(9) == Some(&17)
                        && quoted.get(qihl..).is_some_and(|l4| ports(l4).1 == WG_PORT)
                });
            Frame {
                about_wireguard,
                kind: FrameKind::Ipv4,
                src: Some(IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?)),
                dst: Some(IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?)),
                protocol,
                sport,
                dport,
            }
        }
        0x86dd if ip.len() >= 40 => {
            let protocol = ip[6];
            let (sport, dport) = if matches!(protocol, 6 | 17) {
                ports(&ip[40..])
            } else {
                (0, 0)
            };
            Frame {
                about_wireguard: false,
                kind: FrameKind::Ipv6,
                src: Some(IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?)),
                dst: Some(IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?)),
                protocol,
                sport,
                dport,
            }
        }
        other => Frame {
            kind: FrameKind::Other(other),
            src: None,
            dst: None,
            protocol: 0,
            sport: 0,
            dport: 0,
            about_wireguard: false,
        },
    })
}

/// Counts every frame on one interface of one namespace until stopped (the leak catcher).
pub struct Capture {
    frames: Arc<Mutex<Vec<Frame>>>,
    worker: Worker,
}

impl Capture {
    pub fn start(fd: &OwnedFd, interface: &str) -> Result<Capture> {
        capture_with(fd, interface, libc::SOCK_RAW, Direction::Both, parse_frame)
    }

    pub fn frames(&self) -> Vec<Frame> {
        self.frames.lock().unwrap().clone()
    }

    /// Frames that are neither ARP nor WireGuard's own UDP.
    pub fn leaks(&self) -> Vec<Frame> {
        self.frames()
            .into_iter()
            .filter(|f| f.kind != FrameKind::Arp && !f.is_wireguard())
            .collect()
    }

    pub fn stop(mut self) -> Vec<Frame> {
        self.worker.stop();
        self.frames()
    }
}

/// A thread that runs `step` over and over until stopped (explicitly, or when dropped).
pub struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(mut step: impl FnMut() + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                step();
            }
        });
        Worker {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Rig {
    /// Sends TCP SYNs, UDP datagrams and pings from inside `fd` toward `targets`. Failures
    /// (dropped, unreachable) are what a protected namespace gives, and are ignored.
    pub fn flood(&self, fd: &OwnedFd, targets: &[IpAddr]) -> Result<()> {
        Rig::within(fd, || {
            for &ip in targets {
                for port in [22u16, 53, 80, 443, 853, 5353, WG_PORT] {
                    let addr = SocketAddr::new(ip, port);
                    let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(100));
                    let bind: SocketAddr = if ip.is_ipv6() {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    } else {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    };
                    if let Ok(socket) = UdpSocket::bind(bind) {
                        let _ = socket.send_to(b"leak probe", addr);
                    }
                }
            }
        })?;
        for &ip in targets {
            let _ = self
                .command_in(fd, &["ping", "-c", "1", "-W", "1", &ip.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        Ok(())
    }
}

/// Mounts private to one command: the given hosts file over /etc/hosts, `hosts: files` as the
/// only lookup method, and no nscd. Names the test maps resolve from the file; nothing reaches
/// the host's resolver. /run/netns keeps its propagation, so namespaces made inside are seen
/// by the test.
const PRIVATE_RESOLVER: &str = r#"set -e
mount --make-private /
if mountpoint -q /run; then mount --make-private /run; fi
mount --bind "$WGNS_HOSTS" /etc/hosts
mount --bind "$WGNS_NSSWITCH" /etc/nsswitch.conf
if [ -n "${WGNS_RESOLV:-}" ]; then mount --bind "$WGNS_RESOLV" /etc/resolv.conf; fi
if [ -d /run/nscd ]; then mount -t tmpfs -o ro,size=4k tmpfs /run/nscd; fi
exec "$@""#;

impl Rig {
    /// The helper in the rig's host namespace, resolving names only from `hosts`.
    pub fn helper_with_hosts(&self, hosts: &Path, args: &[&str]) -> Result<Command> {
        let nsswitch = self.dir.join("nsswitch.files-only");
        std::fs::write(&nsswitch, "hosts: files\n")?;
        let mut argv = vec![
            "unshare",
            "--mount",
            "--propagation",
            "unchanged",
            "--",
            "sh",
            "-c",
            PRIVATE_RESOLVER,
            "sh",
            BIN,
        ];
        argv.extend_from_slice(args);
        let mut command = self.command_in(&self.host_fd, &argv);
        command
            .env("WGNS_HOSTS", hosts)
            .env("WGNS_NSSWITCH", &nsswitch);
        Ok(command)
    }
}

impl Rig {
    /// Another dnsmasq in the peer, on `listen` (e.g. the peer's second underlay address
    /// 10.200.<id>.3), answering `names` and logging each query to `<tag>.log` in the rig's
    /// directory. For a resolver that must never be asked.
    pub fn dnsmasq_at(
        &mut self,
        listen: Ipv4Addr,
        tag: &str,
        names: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let log = self.dir.join(format!("{tag}.log"));
        let mut argv: Vec<String> = vec![
            "dnsmasq".into(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={listen}"),
            "--port=53".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
            format!(
                "--pid-file={}",
                self.dir.join(format!("{tag}.pid")).display()
            ),
            "--user=root".into(),
        ];
        argv.extend(
            names
                .iter()
                .map(|(name, addr)| format!("--address=/{name}/{addr}")),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let child = self
            .command_in(&self.peer_fd, &argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        self.track(child);
        let addr = SocketAddr::new(listen.into(), 53);
        wait_for(Duration::from_secs(10), "dnsmasq", || {
            Rig::within(&self.peer_fd, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .unwrap_or(false)
        })?;
        Ok(log)
    }
}

/// Which frames a capture keeps, by the kernel's packet type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Both,
    /// Only what this end sent.
    Sent,
    /// Only what this end received.
    Received,
}

impl Capture {
    /// Like [`Capture::start`], for links without an Ethernet header (WireGuard, tun): every IP
    /// packet sent or received on `interface` in the namespace `fd`.
    pub fn start_tunnel(fd: &OwnedFd, interface: &str) -> Result<Capture> {
        Capture::start_tunnel_only(fd, interface, Direction::Both)
    }

    /// Like [`Capture::start_tunnel`], keeping only the packets this end sent or received: on
    /// the peer's side of a tunnel, `Received` is what came out of it, without the peer's own
    /// traffic (IPv6 router solicitations, say).
    pub fn start_tunnel_only(fd: &OwnedFd, interface: &str, keep: Direction) -> Result<Capture> {
        capture_with(fd, interface, libc::SOCK_DGRAM, keep, decode_tunnel)
    }

    /// Like [`Capture::start`], where an ICMP error about a WireGuard datagram is recognised
    /// whichever way the datagram went: also the host saying that the port of a daemon that
    /// is gone is closed, when the peer's keepalive or reply arrives there.
    pub fn start_underlay(fd: &OwnedFd, interface: &str) -> Result<Capture> {
        capture_with(
            fd,
            interface,
            libc::SOCK_RAW,
            Direction::Both,
            decode_underlay,
        )
    }
}

/// A packet without link header, given the Ethernet header parse_frame reads.
fn decode_tunnel(packet: &[u8]) -> Option<Frame> {
    let ethertype: u16 = match packet.first()? >> 4 {
        4 => 0x0800,
        6 => 0x86dd,
        _ => 0,
    };
    let mut framed = vec![0u8; 14];
    framed[12..14].copy_from_slice(&ethertype.to_be_bytes());
    framed.extend_from_slice(packet);
    parse_frame(&framed)
}

/// An Ethernet frame, where an ICMP error also counts as about WireGuard when the datagram
/// it quotes came from WireGuard's port.
fn decode_underlay(buf: &[u8]) -> Option<Frame> {
    let mut frame = parse_frame(buf)?;
    if frame.kind == FrameKind::Ipv4 && frame.protocol == 1 && !frame.about_wireguard {
        let ip = buf.get(14..)?;
        let icmp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
        frame.about_wireguard = icmp.first() == Some(&3)
            && icmp.get(8..).is_some_and(|quoted| {
                let qihl = usize::from(quoted.first().copied().unwrap_or(0) & 0x0f) * 4;
                quoted.get(9) == Some(&17)
                    && quoted
                        .get(qihl..qihl + 2)
                        .is_some_and(|sport| u16::from_be_bytes([sport[0], sport[1]]) == WG_PORT)
            });
    }
    Some(frame)
}

/// A packet socket of `kind` (SOCK_RAW: with link header; SOCK_DGRAM: without) on `interface`
/// in the namespace `fd`, read by a thread of its own through `decode`.
fn capture_with(
    fd: &OwnedFd,
    interface: &str,
    kind: i32,
    keep: Direction,
    decode: fn(&[u8]) -> Option<Frame>,
) -> Result<Capture> {
    let socket = Rig::within(fd, || -> Result<OwnedFd> {
        let index = nix::net::if_::if_nametoindex(interface)
            .with_context(|| format!("no interface {interface}"))?;
        // SAFETY: plain socket calls on a descriptor we own.
        unsafe {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            let raw = libc::socket(libc::AF_PACKET, kind, i32::from(protocol));
            ensure!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let owned = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = index as i32;
            let rc = libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            ensure!(
                rc == 0,
                "binding the capture: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(owned)
        }
    })??;
    let frames = Arc::new(Mutex::new(Vec::new()));
    let found = Arc::clone(&frames);
    let mut buf = vec![0u8; 65536];
    // One receive per turn; the socket's timeout lets the worker notice when it must stop.
    let worker = Worker::spawn(move || {
        // SAFETY: reading into a buffer and an address we own.
        let (n, from) = unsafe {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            let n = libc::recvfrom(
                socket.as_fd().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            );
            (n, from)
        };
        if n <= 0 {
            return;
        }
        let sent = from.sll_pkttype == libc::PACKET_OUTGOING;
        let wanted = match keep {
            Direction::Both => true,
            Direction::Sent => sent,
            Direction::Received => !sent,
        };
        if wanted && let Some(frame) = decode(&buf[..n as usize]) {
            found.lock().unwrap().push(frame);
        }
    });
    Ok(Capture { frames, worker })
}

impl Rig {
    /// The helper in the rig's host namespace, resolving names only through DNS at the
    /// resolver that `resolv_conf` names (which must be a test address).
    pub fn helper_with_resolver(&self, resolv_conf: &str, args: &[&str]) -> Result<Command> {
        let hosts = self.dir.join("hosts.empty");
        std::fs::write(&hosts, "")?;
        let resolv = self.dir.join("resolv.test");
        std::fs::write(&resolv, resolv_conf)?;
        let nsswitch = self.dir.join("nsswitch.dns-only");
        std::fs::write(&nsswitch, "hosts: dns\n")?;
        let mut command = self.helper_with_hosts(&hosts, args)?;
        command
            .env("WGNS_NSSWITCH", &nsswitch)
            .env("WGNS_RESOLV", &resolv);
        Ok(command)
    }
}

/// Waits for `child` at most `limit`; a child still running then is killed and reported.
pub fn output_within(mut child: Child, limit: Duration) -> Result<Output> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return child.wait_with_output().context("collecting output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output()?;
    bail!(
        "still running after {}s (killed): {}",
        limit.as_secs(),
        text(&out)
    )
}

/// The error line of a failed helper run: exactly one `error:` line on stderr (warnings aside)
/// and the expected exit code.
pub fn one_error_line(out: &Output, code: i32) -> Result<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("warning:"))
        .collect();
    ensure!(
        out.status.code() == Some(code) && lines.len() == 1 && lines[0].starts_with("error: "),
        "expected exit {code} and one error line, got {}",
        text(out)
    );
    Ok(lines[0].to_string())
}
