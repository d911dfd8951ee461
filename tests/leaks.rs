//! Leak tests ("leak-proof by default, and proven"): DNS, IPv6, nscd, tunnel down, and during
//! up/down. Each test asserts what a user would see (a packet got through or not, a query was
//! seen or not) and carries a control that shows the check could fail.
//!
//! Rig ids 20..=28 and 170..=171. The helper always runs in the rig's host namespace; the host's nscd runs
//! there too, in a private mount namespace of its own (see [`HostNscd`]).

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sched::CloneFlags;
use serde_json::{Value, json};

/// Set in the environment of the test binary when it runs as the prober (see [`prober`]).
const PROBER_ENV: &str = "WGNS_LEAK_PROBER";

fn main() {
    if let Ok(spec) = std::env::var(PROBER_ENV) {
        std::process::exit(prober::run(&spec));
    }
    run(vec![
        trial(
            "exec_lookup_goes_only_to_dns_server_never_to_nscd_or_another_server",
            exec_lookup_only_reaches_dns_server,
        ),
        trial(
            "dns_to_another_resolver_and_mdns_llmnr_are_dropped",
            dns_elsewhere_is_dropped,
        ),
        trial(
            "ipv6_goes_nowhere_without_an_ipv6_address",
            ipv6_goes_nowhere,
        ),
        trial(
            "ipv6_goes_through_the_tunnel_with_an_ipv6_address",
            ipv6_goes_through_the_tunnel,
        ),
        trial(
            "nothing_leaves_when_the_helpers_daemon_is_killed",
            nothing_leaves_when_the_daemon_is_killed,
        ),
        trial(
            "up_down_loop_never_lets_a_probe_past_the_tunnel",
            up_down_loop_leaks_nothing,
        ),
        trial(
            "underlay_carries_only_wireguard_to_the_endpoint_while_traffic_flows",
            underlay_carries_only_wireguard,
        ),
        trial("check_leaks_passes_on_a_live_namespace", check_leaks_passes),
        trial(
            "check_leaks_fails_when_the_guard_table_is_deleted",
            check_leaks_fails_without_the_guard,
        ),
        trial(
            "a_conf_file_alone_carries_traffic_with_its_dns_servers_and_mtu",
            conf_file_alone,
        ),
        trial(
            "localhost_inside_is_answered_without_any_dns_query",
            localhost_without_dns,
        ),
    ])
}

const NAME: &str = "leak.wgns.test";
const REPLY: &str = "hello from the peer";
/// The port of the catcher's own cleartext datagram (discard).
const CANARY_PORT: u16 = 9;

/// The peer's second underlay address: the other resolver, reachable from the host namespace
/// over the underlay and from inside through the tunnel (the peer owns it).
fn other_resolver(rig: &Rig) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, rig.id, 3)
}

fn peer_v6(rig: &Rig) -> Result<Ipv6Addr> {
    Ok(format!("fd77:{}::1", rig.id).parse()?)
}

fn confined_v6(rig: &Rig) -> Result<Ipv6Addr> {
    Ok(format!("fd77:{}::2", rig.id).parse()?)
}

fn sockaddr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Queries (`query[...]` lines) in a dnsmasq log.
fn queries(log: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(log)
        .with_context(|| format!("reading {}", log.display()))?
        .lines()
        .filter(|l| l.contains("query["))
        .map(str::to_string)
        .collect())
}

/// A listener in some namespace that records who reached it.
struct Sink {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<SocketAddr>>>,
    _worker: Worker,
}

impl Sink {
    fn udp(fd: &OwnedFd, addr: SocketAddr) -> Result<Sink> {
        let socket = Rig::within(fd, || UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let hits = Arc::new(Mutex::new(Vec::new()));
        let hits2 = Arc::clone(&hits);
        let worker = Worker::spawn(move || {
            let mut buf = [0u8; 2048];
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                hits2.lock().unwrap().push(from);
            }
        });
        Ok(Sink {
            addr,
            hits,
            _worker: worker,
        })
    }

    /// Answers every connection with `reply`.
    fn tcp(fd: &OwnedFd, addr: SocketAddr, reply: &'static str) -> Result<Sink> {
        let listener = Rig::within(fd, || TcpListener::bind(addr))?
            .with_context(|| format!("binding TCP {addr}"))?;
        listener.set_nonblocking(true)?;
        let hits = Arc::new(Mutex::new(Vec::new()));
        let hits2 = Arc::clone(&hits);
        let worker = Worker::spawn(move || match listener.accept() {
            Ok((mut stream, from)) => {
                hits2.lock().unwrap().push(from);
                let _ = stream.set_nonblocking(false);
                let _ = stream.write_all(reply.as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        });
        Ok(Sink {
            addr,
            hits,
            _worker: worker,
        })
    }

    fn hits(&self) -> Vec<SocketAddr> {
        self.hits.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal DNS client (A queries), to talk to any resolver from inside without the libc
// resolver deciding where the query goes.

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    // Recursion desired; one question.
    query.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    query
}

fn skip_name(message: &[u8], mut pos: usize) -> Result<usize> {
    loop {
        let len = *message.get(pos).context("truncated name")?;
        match len {
            0 => return Ok(pos + 1),
            l if l & 0xc0 == 0xc0 => return Ok(pos + 2),
            l => pos += 1 + usize::from(l),
        }
    }
}

/// The first A record of the reply to query `id`.
fn dns_answer(reply: &[u8], id: u16) -> Result<Ipv4Addr> {
    let word = |pos: usize| -> Result<u16> {
        Ok(u16::from_be_bytes([
            *reply.get(pos).context("truncated")?,
            *reply.get(pos + 1).context("truncated")?,
        ]))
    };
    ensure!(
        reply.len() >= 12 && word(0)? == id && reply[2] & 0x80 != 0,
        "not a reply to our query"
    );
    ensure!(reply[3] & 0x0f == 0, "rcode {}", reply[3] & 0x0f);
    let mut pos = 12;
    for _ in 0..word(4)? {
        pos = skip_name(reply, pos)? + 4;
    }
    for _ in 0..word(6)? {
        pos = skip_name(reply, pos)?;
        let (kind, len) = (word(pos)?, usize::from(word(pos + 8)?));
        pos += 10;
        if kind == 1 && len == 4 {
            let a = reply.get(pos..pos + 4).context("truncated")?;
            return Ok(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        }
        pos += len;
    }
    bail!("no A record in the reply")
}

/// Asks `server` over UDP from inside `fd`.
fn udp_dns(fd: &OwnedFd, server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    Rig::within(fd, || -> Result<Ipv4Addr> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(&dns_query(0x5701, name), server)?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        dns_answer(&buf[..n], 0x5701)
    })?
}

/// Asks `server` over TCP from inside `fd`.
fn tcp_dns(fd: &OwnedFd, server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    Rig::within(fd, || -> Result<Ipv4Addr> {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_millis(1500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let query = dns_query(0x5702, name);
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend(query);
        stream.write_all(&framed)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply)?;
        dns_answer(&reply, 0x5702)
    })?
}

/// One UDP datagram from inside `fd`.
fn udp_send(fd: &OwnedFd, to: SocketAddr) -> Result<std::io::Result<()>> {
    Rig::within(fd, || {
        let bind: SocketAddr = if to.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        UdpSocket::bind(bind)?
            .send_to(b"wg-namespace leak test", to)
            .map(|_| ())
    })
}

// ---------------------------------------------------------------------------------------------
// The host's nscd.

/// How many tests use `/run/nscd`, and whether we had to create it.
static RUN_NSCD: Mutex<(usize, bool)> = Mutex::new((0, false));

/// A real nscd (Debian's) on the "host": in the rig's host network namespace and in a private
/// mount namespace of its own, with a tmpfs on /run/nscd (so its socket is seen only there), a
/// resolv.conf naming `nameserver` and `hosts: files dns`. Commands started through
/// [`HostNscd::command`] see the host as a confined service would: nscd answering on its
/// socket. Dropping it ends nscd, by PID.
struct HostNscd {
    child: Option<Child>,
    mnt: Option<OwnedFd>,
}

impl HostNscd {
    fn start(rig: &Rig, nameserver: Ipv4Addr) -> Result<HostNscd> {
        let dir = rig.dir.join("nscd");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )?;
        std::fs::write(
            dir.join("nsswitch.conf"),
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
        )?;
        // Only the hosts cache, not persistent: nothing is written outside the tmpfs.
        std::fs::write(
            dir.join("nscd.conf"),
            "enable-cache hosts yes\npersistent hosts no\nshared hosts yes\n\
             positive-time-to-live hosts 3600\nnegative-time-to-live hosts 20\n\
             enable-cache passwd no\nenable-cache group no\nenable-cache services no\n\
             enable-cache netgroup no\n",
        )?;
        {
            let mut users = RUN_NSCD.lock().unwrap();
            if users.0 == 0 && !Path::new("/run/nscd").exists() {
                std::fs::create_dir("/run/nscd").context("creating /run/nscd")?;
                users.1 = true;
            }
            users.0 += 1;
        }
        let mut nscd = HostNscd {
            child: None,
            mnt: None,
        };
        let d = dir.display();
        let cache = if Path::new("/var/cache/nscd").is_dir() {
            "mount -t tmpfs -o size=1m wgns-nscd /var/cache/nscd\n"
        } else {
            ""
        };
        let script = format!(
            "set -e\n\
             mount -t tmpfs -o mode=0755,size=1m wgns-nscd /run/nscd\n\
             {cache}\
             mount --bind {d}/resolv.conf /etc/resolv.conf\n\
             mount --bind {d}/nsswitch.conf /etc/nsswitch.conf\n\
             mount --bind {d}/nscd.conf /etc/nscd.conf\n\
             exec nscd -F\n"
        );
        let argv = [
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sh",
            "-c",
            &script,
        ];
        let child = rig
            .command_in(rig.host_fd(), &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nscd (Debian package nscd)")?;
        let pid = child.id();
        nscd.child = Some(child);
        let socket = format!("/proc/{pid}/root/run/nscd/socket");
        wait_for(Duration::from_secs(10), "nscd's socket", || {
            Path::new(&socket).exists()
        })?;
        let ours = std::fs::metadata("/proc/self/ns/mnt")?.ino();
        ensure!(
            std::fs::metadata(format!("/proc/{pid}/ns/mnt"))?.ino() != ours,
            "nscd is not in a mount namespace of its own"
        );
        nscd.mnt = Some(File::open(format!("/proc/{pid}/ns/mnt"))?.into());
        Ok(nscd)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A command in nscd's mount namespace and the rig's host network namespace.
    fn command(&self, rig: &Rig, argv: &[&str]) -> Command {
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        let mnt = self.mnt.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let net = rig.host_fd().as_raw_fd();
        // SAFETY: setns is a plain system call; both descriptors outlive the spawn.
        unsafe {
            command.pre_exec(move || {
                for (fd, kind) in [
                    (mnt, CloneFlags::CLONE_NEWNS),
                    (net, CloneFlags::CLONE_NEWNET),
                ] {
                    nix::sched::setns(BorrowedFd::borrow_raw(fd), kind)
                        .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        command
    }

    /// The helper, run where nscd is reachable.
    fn helper(&self, rig: &Rig, args: &[&str]) -> Result<Output> {
        let mut argv = vec![BIN];
        argv.extend_from_slice(args);
        self.command(rig, &argv)
            .output()
            .context("running wg-namespace next to nscd")
    }

    /// Host lookups nscd has served (hits and misses), from `nscd -g`.
    fn hosts_lookups(&self, rig: &Rig) -> Result<u64> {
        let out = self
            .command(rig, &["nscd", "-g"])
            .output()
            .context("nscd -g")?;
        ensure!(out.status.success(), "nscd -g failed: {}", text(&out));
        let stats = String::from_utf8_lossy(&out.stdout);
        let section: Vec<&str> = stats
            .lines()
            .skip_while(|l| l.trim() != "hosts cache:")
            .skip(1)
            .take_while(|l| !l.trim_end().ends_with("cache:"))
            .map(str::trim)
            .collect();
        ensure!(
            section.contains(&"yes  cache is enabled"),
            "nscd's hosts cache is not enabled: {stats}"
        );
        let counters: Vec<u64> = section
            .iter()
            .filter(|l| l.contains("cache hits on") || l.contains("cache misses on"))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        ensure!(counters.len() == 4, "unexpected nscd -g output: {stats}");
        Ok(counters.iter().sum())
    }
}

impl Drop for HostNscd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.mnt = None;
        let mut users = RUN_NSCD.lock().unwrap();
        users.0 = users.0.saturating_sub(1);
        if users.0 == 0 && users.1 {
            let _ = std::fs::remove_dir("/run/nscd");
            users.1 = false;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The leak catcher on the underlay.

/// Both ends of the underlay veth, captured.
struct Underlay {
    host: Capture,
    peer: Capture,
}

impl Underlay {
    fn start(rig: &Rig) -> Result<Underlay> {
        Ok(Underlay {
            host: Capture::start_underlay(rig.host_fd(), &rig.host_veth)?,
            peer: Capture::start_underlay(rig.peer_fd(), &rig.peer_veth)?,
        })
    }

    /// Sends one cleartext datagram across the underlay (host namespace to peer) and waits
    /// until both ends have it, classified as a leak: the catcher is armed.
    fn prove_armed(&self, rig: &Rig) -> Result<()> {
        let sink = Sink::udp(rig.peer_fd(), sockaddr(rig.peer_underlay(), CANARY_PORT))?;
        Rig::within(rig.host_fd(), || -> Result<()> {
            UdpSocket::bind(sockaddr(rig.host_underlay(), 0))?.send_to(b"canary", sink.addr)?;
            Ok(())
        })??;
        for (side, capture) in [("host", &self.host), ("peer", &self.peer)] {
            wait_for(
                Duration::from_secs(3),
                &format!("the canary on the {side} side"),
                || {
                    capture
                        .frames()
                        .iter()
                        .any(|f| is_canary(rig, f) && !allowed_on_underlay(rig, f))
                },
            )?;
        }
        Ok(())
    }

    fn stop(self) -> (Vec<Frame>, Vec<Frame>) {
        (self.host.stop(), self.peer.stop())
    }
}

fn is_canary(rig: &Rig, f: &Frame) -> bool {
    f.protocol == 17
        && f.dport == CANARY_PORT
        && f.src == Some(rig.host_underlay().into())
        && f.dst == Some(rig.peer_underlay().into())
}

/// What may cross the underlay: ARP, WireGuard's UDP between the host and the peer's
/// endpoint, and ICMP errors about that UDP.
fn allowed_on_underlay(rig: &Rig, f: &Frame) -> bool {
    let (host, peer) = (
        Some(IpAddr::from(rig.host_underlay())),
        Some(IpAddr::from(rig.peer_underlay())),
    );
    match f.kind {
        FrameKind::Arp => true,
        FrameKind::Ipv4 => {
            let between = (f.src == host && f.dst == peer) || (f.src == peer && f.dst == host);
            let to_endpoint = f.protocol == 17
                && ((f.dst == peer && f.dport == WG_PORT) || (f.src == peer && f.sport == WG_PORT));
            between && (to_endpoint || f.about_wireguard)
        }
        _ => false,
    }
}

/// Frames that are neither allowed nor the catcher's own canary.
fn underlay_leaks(rig: &Rig, side: &str, frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| !allowed_on_underlay(rig, f) && !is_canary(rig, f))
        .map(|f| format!("{side} side: {}", f.describe()))
        .collect()
}

fn wireguard_frames(rig: &Rig, frames: &[Frame]) -> usize {
    frames
        .iter()
        .filter(|f| f.kind == FrameKind::Ipv4 && allowed_on_underlay(rig, f) && f.protocol == 17)
        .count()
}

/// Asserts that neither end of the underlay saw anything but ARP and WireGuard.
fn assert_underlay_clean(rig: &Rig, host: &[Frame], peer: &[Frame]) -> Result<()> {
    let mut leaks = underlay_leaks(rig, "host", host);
    leaks.extend(underlay_leaks(rig, "peer", peer));
    let count = leaks.len();
    leaks.dedup();
    let more = leaks.len().saturating_sub(12);
    leaks.truncate(12);
    ensure!(
        count == 0,
        "{count} frame(s) on the underlay that are not WireGuard to the endpoint: {}{}",
        leaks.join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. exec lookups go to dns_server only.

fn exec_lookup_only_reaches_dns_server() -> Result<()> {
    let mut rig = Rig::new(20)?;
    let good = format!("10.200.{}.77", rig.id);
    let bad = format!("10.200.{}.66", rig.id);
    let dns_log = rig.dnsmasq(&[(NAME, &good)])?;
    let decoy_log = rig.dnsmasq_at(other_resolver(&rig), "decoy", &[(NAME, &bad)])?;
    let nscd = HostNscd::start(&rig, other_resolver(&rig))?;
    rig.up_with(&rig.config()?)?;
    ensure!(
        nscd.hosts_lookups(&rig)? == 0,
        "nscd served lookups before the test"
    );

    // gethostbyname (getent hosts) and getaddrinfo (getent ahosts): glibc asks nscd first on
    // both paths when its socket is there.
    for database in ["hosts", "ahosts"] {
        let out = nscd.helper(
            &rig,
            &[
                "exec",
                "--namespace",
                &rig.confined,
                "--",
                "getent",
                database,
                NAME,
            ],
        )?;
        ensure!(
            out.status.success(),
            "getent {database} inside failed: {}",
            text(&out)
        );
        let answer = String::from_utf8_lossy(&out.stdout);
        ensure!(
            answer.split_whitespace().next() == Some(good.as_str()),
            "getent {database} {NAME} inside resolved to {answer:?}, not dns_server's {good} \
             ({bad} is the answer of the host's nscd and the other server)"
        );
    }
    let seen = queries(&dns_log)?;
    ensure!(
        seen.iter().any(|q| q.contains(&format!("query[A] {NAME}"))),
        "dns_server never saw the lookup: {seen:?}"
    );
    let decoy = queries(&decoy_log)?;
    ensure!(
        decoy.is_empty(),
        "the other DNS server (nscd's) was asked: {decoy:?}"
    );
    let lookups = nscd.hosts_lookups(&rig)?;
    ensure!(
        lookups == 0,
        "the host's nscd served {lookups} host lookup(s) for a process inside"
    );

    // Control: the same lookup on the host side of exec does go to nscd and the other server,
    // so the two assertions above could fail.
    let out = nscd.command(&rig, &["getent", "hosts", NAME]).output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer.split_whitespace().next() == Some(bad.as_str()),
        "control: outside exec, nscd should answer {bad}: {}",
        text(&out)
    );
    ensure!(
        nscd.hosts_lookups(&rig)? > 0 && !queries(&decoy_log)?.is_empty(),
        "control: the lookup outside exec did not go through nscd to the other server"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. DNS anywhere but dns_server, and mDNS/LLMNR, are dropped.

/// Frames arriving at the peer that the DNS rules forbid: DNS or DoT to anything but
/// `dns_server`, mDNS, LLMNR.
fn forbidden_dns(rig: &Rig, frames: &[Frame]) -> Vec<String> {
    let dns_server = Some(IpAddr::from(rig.peer_tunnel_ip()));
    frames
        .iter()
        .filter(|f| f.src == Some(rig.confined_ip().into()) && matches!(f.protocol, 6 | 17))
        .filter(|f| {
            (matches!(f.dport, 53 | 853) && f.dst != dns_server) || matches!(f.dport, 5353 | 5355)
        })
        .map(Frame::describe)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn dns_elsewhere_is_dropped() -> Result<()> {
    let mut rig = Rig::new(21)?;
    let good: Ipv4Addr = format!("10.200.{}.77", rig.id).parse()?;
    let bad: Ipv4Addr = format!("10.200.{}.66", rig.id).parse()?;
    rig.dnsmasq(&[(NAME, &good.to_string())])?;
    let other = other_resolver(&rig);
    let decoy_log = rig.dnsmasq_at(other, "decoy", &[(NAME, &bad.to_string())])?;
    let peer = rig.peer_fd();
    let dot_other = Sink::tcp(peer, sockaddr(other, 853), "other DoT")?;
    let dot_server = Sink::tcp(peer, sockaddr(rig.peer_tunnel_ip(), 853), "server DoT")?;
    let plain = Sink::tcp(peer, sockaddr(other, 8053), "plain")?;
    let mdns = Sink::udp(peer, sockaddr(other, 5353))?;
    let llmnr = Sink::udp(peer, sockaddr(other, 5355))?;
    let llmnr_tcp = Sink::tcp(peer, sockaddr(other, 5355), "llmnr")?;

    rig.up_with(&rig.config()?)?;
    let inside = rig.confined_fd()?;
    let server = sockaddr(rig.peer_tunnel_ip(), 53);
    let wait = Duration::from_millis(1500);
    // Controls: dns_server answers over UDP and TCP and its DoT port is open; the other
    // resolver's address is reachable through the tunnel on a port that is not DNS.
    ensure!(
        udp_dns(&inside, server, NAME).context("UDP DNS to dns_server")? == good,
        "dns_server gave a wrong answer over UDP"
    );
    ensure!(
        tcp_dns(&inside, server, NAME).context("TCP DNS to dns_server")? == good,
        "dns_server gave a wrong answer over TCP"
    );
    Rig::tcp_request(&inside, dot_server.addr, wait).context("DoT to dns_server")?;
    Rig::tcp_request(&inside, plain.addr, wait).context("the other resolver's address")?;

    let tunnel = Capture::start_tunnel_only(rig.peer_fd(), &rig.peer_if, Direction::Received)?;
    let mut through = Vec::new();
    for target in [sockaddr(other, 53), "198.51.100.53:53".parse()?] {
        if let Ok(a) = udp_dns(&inside, target, NAME) {
            through.push(format!("UDP DNS to {target} answered {a}"));
        }
        if let Ok(a) = tcp_dns(&inside, target, NAME) {
            through.push(format!("TCP DNS to {target} answered {a}"));
        }
    }
    for target in [dot_other.addr, llmnr_tcp.addr] {
        if let Ok(a) = Rig::tcp_request(&inside, target, wait) {
            through.push(format!("TCP to {target} answered {a:?}"));
        }
    }
    for target in [
        mdns.addr,
        llmnr.addr,
        "224.0.0.251:5353".parse()?,
        "224.0.0.252:5355".parse()?,
    ] {
        udp_send(&inside, target)?.ok();
    }
    std::thread::sleep(Duration::from_millis(500));
    let arrived = forbidden_dns(&rig, &tunnel.stop());
    for sink in [&dot_other, &mdns, &llmnr, &llmnr_tcp] {
        for from in sink.hits() {
            through.push(format!("{} reached from {from}", sink.addr));
        }
    }
    let decoy = queries(&decoy_log)?;
    ensure!(
        through.is_empty() && arrived.is_empty() && decoy.is_empty(),
        "DNS went past dns_server: {through:?}; arrived at the peer: {arrived:?}; the other \
         resolver logged {decoy:?}"
    );

    // strictDns: false turns the pinning off: the same queries now reach the other resolver,
    // so the probes above would have seen a missing pin. mDNS and LLMNR stay dropped.
    rig.down()?;
    let mut loose = rig.config()?;
    loose["strictDns"] = json!(false);
    rig.up_with(&loose)?;
    let inside = rig.confined_fd()?;
    let target = sockaddr(other, 53);
    ensure!(
        udp_dns(&inside, target, NAME).context("strictDns false: UDP DNS elsewhere")? == bad,
        "strictDns false: wrong UDP answer"
    );
    ensure!(
        tcp_dns(&inside, target, NAME).context("strictDns false: TCP DNS elsewhere")? == bad,
        "strictDns false: wrong TCP answer"
    );
    Rig::tcp_request(&inside, dot_other.addr, wait).context("strictDns false: DoT elsewhere")?;
    ensure!(
        !queries(&decoy_log)?.is_empty(),
        "strictDns false: the other resolver logged nothing"
    );
    udp_send(&inside, mdns.addr)?.ok();
    udp_send(&inside, llmnr.addr)?.ok();
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        mdns.hits().is_empty() && llmnr.hits().is_empty(),
        "strictDns false: mDNS/LLMNR got through: {:?} {:?}",
        mdns.hits(),
        llmnr.hits()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. IPv6.

/// The config with ::/0 routed into the tunnel as well.
fn dual_stack_routes(rig: &Rig) -> Result<Value> {
    let mut config = rig.config()?;
    config["peers"][0]["allowedIPs"] = json!(["0.0.0.0/0", "::/0"]);
    Ok(config)
}

fn ipv6_goes_nowhere() -> Result<()> {
    let rig = Rig::new(22)?;
    let peer6 = peer_v6(&rig)?;
    let service = Sink::tcp(rig.peer_fd(), sockaddr(rig.peer_tunnel_ip(), 8000), REPLY)?;
    let tcp6 = Sink::tcp(rig.peer_fd(), sockaddr(peer6, 8000), REPLY)?;
    let udp6 = Sink::udp(rig.peer_fd(), sockaddr(peer6, 9000))?;
    // No IPv6 address in `ips`, but ::/0 in allowedIPs (as VPN providers' configs often have
    // it).
    rig.up_with(&dual_stack_routes(&rig)?)?;
    let inside = rig.confined_fd()?;
    Rig::tcp_request(&inside, service.addr, Duration::from_secs(5)).context("IPv4 tunnel")?;

    let leaving = Capture::start_tunnel_only(&inside, &rig.confined, Direction::Sent)?;
    let arriving = Capture::start_tunnel_only(rig.peer_fd(), &rig.peer_if, Direction::Received)?;
    let mut through = Vec::new();
    let mut attempt = |phase: &str| -> Result<()> {
        for target in [udp6.addr, "[2001:db8::53]:443".parse()?] {
            if let Ok(()) = udp_send(&inside, target)? {
                through.push(format!("{phase}: UDP to {target} was sent"));
            }
        }
        if let Ok(answer) = Rig::tcp_request(&inside, tcp6.addr, Duration::from_secs(1)) {
            through.push(format!("{phase}: TCP to {} answered {answer:?}", tcp6.addr));
        }
        let ping = rig.exec(&["ping", "-6", "-c", "1", "-W", "1", &peer6.to_string()])?;
        if ping.status.success() {
            through.push(format!("{phase}: ping {peer6} answered"));
        }
        Ok(())
    };
    attempt("as up left it")?;
    // up also switches IPv6 off inside and routes none of it. A root process inside can undo
    // that: IPv6 back on, an address the peer accepts, a route into the tunnel. Then only the
    // firewall stands between IPv6 and the tunnel, and it must still go nowhere.
    let (wg, mine6) = (rig.confined.as_str(), confined_v6(&rig)?.to_string());
    for argv in [
        vec!["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0"],
        vec!["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=0"],
        vec!["ip", "address", "add", &mine6, "dev", wg, "nodad"],
        vec!["ip", "-6", "route", "add", "::/0", "dev", wg],
    ] {
        let out = rig.command_in(&inside, &argv).output()?;
        ensure!(out.status.success(), "{}: {}", argv.join(" "), text(&out));
    }
    attempt("IPv6 re-enabled from inside")?;
    // The captures work: IPv4 is seen leaving and arriving.
    Rig::tcp_request(&inside, service.addr, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(300));
    let (left, arrived) = (leaving.stop(), arriving.stop());
    for (where_, frames) in [
        ("leaving through the tunnel", &left),
        ("arriving at the peer", &arrived),
    ] {
        ensure!(
            frames.iter().any(|f| f.kind == FrameKind::Ipv4),
            "the capture {where_} saw no IPv4 either, so it proves nothing"
        );
        through.extend(
            frames
                .iter()
                .filter(|f| f.kind == FrameKind::Ipv6)
                .map(|f| format!("IPv6 {where_}: {}", f.describe())),
        );
    }
    through.extend(
        tcp6.hits()
            .iter()
            .map(|f| format!("TCP [{peer6}] from {f}")),
    );
    through.extend(
        udp6.hits()
            .iter()
            .map(|f| format!("UDP [{peer6}] from {f}")),
    );
    through.dedup();
    ensure!(
        through.is_empty(),
        "IPv6 went out without an IPv6 address in ips: {}",
        through.join("; ")
    );
    Ok(())
}

fn ipv6_goes_through_the_tunnel() -> Result<()> {
    let rig = Rig::new(23)?;
    let (peer6, mine6) = (peer_v6(&rig)?, confined_v6(&rig)?);
    let tcp6 = Sink::tcp(rig.peer_fd(), sockaddr(peer6, 8000), REPLY)?;
    let udp6 = Sink::udp(rig.peer_fd(), sockaddr(peer6, 9000))?;
    let mut config = dual_stack_routes(&rig)?;
    config["ips"] = json!([format!("{}/32", rig.confined_ip()), format!("{mine6}/128")]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let answer = Rig::tcp_request(&inside, tcp6.addr, Duration::from_secs(5))
        .context("TCP over IPv6 through the tunnel")?;
    ensure!(answer == REPLY, "unexpected answer {answer:?}");
    udp_send(&inside, udp6.addr)??;
    wait_for(
        Duration::from_secs(3),
        "the UDP datagram at the peer",
        || !udp6.hits().is_empty(),
    )?;
    let ping = rig.exec(&["ping", "-6", "-c", "1", "-W", "3", &peer6.to_string()])?;
    ensure!(ping.status.success(), "ping -6 failed: {}", text(&ping));
    let sources: BTreeSet<IpAddr> = tcp6
        .hits()
        .iter()
        .chain(udp6.hits().iter())
        .map(SocketAddr::ip)
        .collect();
    ensure!(
        sources == BTreeSet::from([IpAddr::from(mine6)]),
        "the peer saw IPv6 from {sources:?}, not only from {mine6}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. The helper's daemon killed.

/// The userspace daemon `up` recorded in the state file.
fn daemon_pid(rig: &Rig) -> Result<u32> {
    let path = format!("/run/wg-namespace/{}.json", rig.confined);
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let pid = state["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["kind"] == "daemon")
        .and_then(|r| r["process"]["pid"].as_u64())
        .with_context(|| format!("no daemon recorded in {path}"))?;
    let pid = u32::try_from(pid)?;
    let command = cmdline(pid);
    ensure!(
        command.contains("wireguard-go") && command.contains(&rig.confined),
        "process {pid} is not our daemon: {command:?}"
    );
    Ok(pid)
}

fn link_names(fd: &OwnedFd) -> Result<Vec<String>> {
    let mut names: Vec<String> = wg_namespace::system::link::Netlink::inside(fd)?
        .links()?
        .into_iter()
        .map(|l| l.name)
        .collect();
    names.sort();
    Ok(names)
}

fn flood_targets(rig: &Rig) -> Result<Vec<IpAddr>> {
    Ok(vec![
        rig.peer_tunnel_ip().into(),
        rig.peer_underlay().into(),
        rig.host_underlay().into(),
        other_resolver(rig).into(),
        "198.51.100.7".parse()?,
        "203.0.113.9".parse()?,
        peer_v6(rig)?.into(),
        "2001:db8::1".parse()?,
    ])
}

fn nothing_leaves_when_the_daemon_is_killed() -> Result<()> {
    let rig = Rig::new(24)?;
    let service = Sink::tcp(rig.peer_fd(), sockaddr(rig.peer_tunnel_ip(), 8000), REPLY)?;
    rig.up_with(&rig.config()?)?;
    let inside = rig.confined_fd()?;
    Rig::tcp_request(&inside, service.addr, Duration::from_secs(5)).context("tunnel")?;

    let pid = daemon_pid(&rig)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(
        Duration::from_secs(5),
        "the WireGuard link to go with its daemon",
        || link_names(&inside).is_ok_and(|names| !names.contains(&rig.confined)),
    )?;

    let underlay = Underlay::start(&rig)?;
    underlay.prove_armed(&rig)?;
    rig.flood(&inside, &flood_targets(&rig)?)?;
    let answer = Rig::tcp_request(&inside, service.addr, Duration::from_secs(1));
    ensure!(
        answer.is_err(),
        "the peer answered with the daemon dead: {answer:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (host, peer) = underlay.stop();
    assert_underlay_clean(&rig, &host, &peer)?;
    ensure!(
        service.hits().len() == 1,
        "the peer's service was reached after the daemon died: {:?}",
        service.hits()
    );
    let left = link_names(&inside)?;
    ensure!(
        left == ["lo"],
        "links inside after the daemon died: {left:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. up/down in a loop, with a prober inside each fresh namespace.

mod prober {
    //! The test binary, run with `WGNS_LEAK_PROBER=<dns_server>;<target>,<target>...` inside a
    //! namespace: sends UDP, TCP SYNs and ICMP echo to every target until its stdin closes,
    //! then prints what became of the sends (a send the kernel accepted has left the
    //! namespace; one the firewall dropped fails with EPERM; without a route, ENETUNREACH).

    use std::collections::BTreeSet;
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    const UDP_PORTS: [u16; 5] = [53, 80, 853, 5353, 5355];
    const TCP_PORTS: [u16; 3] = [53, 443, 853];

    #[derive(Default)]
    struct Tally {
        rounds: u64,
        left: u64,
        dropped: u64,
        unrouted: u64,
        other: u64,
        /// Rounds in which nothing could even be routed, before anything left.
        early: u64,
        forbidden: BTreeSet<String>,
    }

    impl Tally {
        fn count(&mut self, result: io::Result<()>, what: impl FnOnce() -> Option<String>) {
            match result {
                Ok(()) => {
                    self.left += 1;
                    if let Some(what) = what() {
                        self.forbidden.insert(what);
                    }
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EPERM) => self.dropped += 1,
                    Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => self.unrouted += 1,
                    _ => self.other += 1,
                },
            }
        }
    }

    pub fn run(spec: &str) -> i32 {
        let (dns, targets) = spec.split_once(';').unwrap_or((spec, ""));
        let dns: Option<IpAddr> = dns.parse().ok();
        let targets: Vec<IpAddr> = targets.split(',').filter_map(|t| t.parse().ok()).collect();
        // What the namespace must never let out (its config has no IPv6 address).
        let forbidden = |ip: IpAddr, port: Option<u16>| {
            ip.is_ipv6()
                || matches!(port, Some(5353) | Some(5355))
                || (matches!(port, Some(53) | Some(853)) && Some(ip) != dns)
        };
        let mut tally = Tally::default();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stdin_closed() && Instant::now() < deadline {
            let left_before = tally.left;
            let unrouted_before = tally.unrouted;
            for &ip in &targets {
                for port in UDP_PORTS {
                    let to = SocketAddr::new(ip, port);
                    tally.count(udp(to), || {
                        forbidden(ip, Some(port)).then(|| format!("udp {to}"))
                    });
                }
                for port in TCP_PORTS {
                    tcp_syn(SocketAddr::new(ip, port));
                }
                tally.count(icmp_echo(ip, tally.rounds as u16), || {
                    forbidden(ip, None).then(|| format!("icmp {ip}"))
                });
            }
            for group in ["224.0.0.251:5353", "224.0.0.252:5355"] {
                let to: SocketAddr = group.parse().expect("a socket address");
                tally.count(udp(to), || Some(format!("udp {to}")));
            }
            tally.rounds += 1;
            if tally.left == 0 && left_before == 0 && tally.unrouted > unrouted_before {
                tally.early += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        println!(
            "rounds={} left={} dropped={} unrouted={} other={} early={}",
            tally.rounds, tally.left, tally.dropped, tally.unrouted, tally.other, tally.early
        );
        for what in &tally.forbidden {
            println!("forbidden {what}");
        }
        0
    }

    /// The test closes our stdin (it never writes) to stop us.
    fn stdin_closed() -> bool {
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one descriptor we own.
        unsafe { libc::poll(&mut pfd, 1, 0) != 0 }
    }

    fn udp(to: SocketAddr) -> io::Result<()> {
        let bind: SocketAddr = if to.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        UdpSocket::bind(bind)?
            .send_to(b"wg-namespace leak probe", to)
            .map(|_| ())
    }

    fn raw_socket(family: i32, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
        // SAFETY: a plain socket call; the descriptor is owned from here on.
        let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn with_sockaddr<T>(to: SocketAddr, f: impl FnOnce(*const libc::sockaddr, u32) -> T) -> T {
        match to {
            SocketAddr::V4(a) => {
                // SAFETY: all-zero is a valid sockaddr_in.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_port = a.port().to_be();
                sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                f(
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            }
            SocketAddr::V6(a) => {
                // SAFETY: all-zero is a valid sockaddr_in6.
                let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as u16;
                sa.sin6_port = a.port().to_be();
                sa.sin6_addr.s6_addr = a.ip().octets();
                f(
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            }
        }
    }

    /// A SYN, without waiting for anything (a dropped SYN does not fail connect()).
    fn tcp_syn(to: SocketAddr) {
        let family = if to.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        if let Ok(fd) = raw_socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) {
            with_sockaddr(to, |sa, len| {
                // SAFETY: sa points at a sockaddr of len bytes that lives for the call.
                unsafe { libc::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), sa, len) }
            });
        }
    }

    fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(c.get(1).copied().unwrap_or(0)))
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn icmp_echo(to: IpAddr, seq: u16) -> io::Result<()> {
        let (family, protocol, kind) = match to {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
        };
        let mut packet = vec![kind, 0, 0, 0, 0x77, 0x6e];
        packet.extend(seq.to_be_bytes());
        packet.extend(b"wg-namespace leak probe");
        if to.is_ipv4() {
            // The kernel fills in the ICMPv6 checksum, not the ICMP one.
            let sum = checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        let fd = raw_socket(family, libc::SOCK_RAW, protocol)?;
        let rc = with_sockaddr(SocketAddr::new(to, 0), |sa, len| {
            // SAFETY: the buffer and the address live for the call.
            unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    sa,
                    len,
                )
            }
        });
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The probers started so far; each is ended (by PID) when this goes.
#[derive(Default, Clone)]
struct Probers(Arc<Mutex<Vec<Child>>>);

impl Probers {
    /// Starts a prober inside the namespace `fd`.
    fn start(&self, fd: &OwnedFd, spec: &str) -> Result<()> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(PROBER_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let raw = fd.as_raw_fd();
        // SAFETY: setns is a plain system call; fd outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(BorrowedFd::borrow_raw(raw), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().context("starting a prober")?;
        self.0.lock().unwrap().push(child);
        Ok(())
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Closes each prober's stdin and collects its report.
    fn finish(&self) -> Vec<String> {
        let children: Vec<Child> = self.0.lock().unwrap().drain(..).collect();
        children
            .into_iter()
            .map(|mut child| {
                drop(child.stdin.take());
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
                let mut report = String::new();
                if let Some(mut out) = child.stdout.take() {
                    let _ = out.read_to_string(&mut report);
                }
                report
            })
            .collect()
    }
}

impl Drop for Probers {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) > 1 {
            return;
        }
        for mut child in self.0.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a prober in every fresh namespace named `name`, as soon as it exists.
fn watch_for_namespaces(name: String, spec: String, probers: Probers) -> Worker {
    let mut last: Option<(u64, u64)> = None;
    Worker::spawn(move || {
        if let Ok(fd) = wg_namespace::system::netns::open(&name)
            && let Ok(meta) = fd.try_clone().map(File::from).and_then(|f| f.metadata())
            && last != Some((meta.dev(), meta.ino()))
            && probers.start(&fd, &spec).is_ok()
        {
            last = Some((meta.dev(), meta.ino()));
        }
        std::thread::sleep(Duration::from_millis(1));
    })
}

const CYCLES: usize = 10;

/// What the probers send to: the underlay and host addresses, the other resolver, documentation
/// addresses, IPv6; DNS is allowed only to dns_server.
fn prober_spec(rig: &Rig) -> Result<String> {
    let targets: Vec<String> = flood_targets(rig)?
        .into_iter()
        .filter(|ip| *ip != IpAddr::from(rig.peer_tunnel_ip()))
        .map(|ip| ip.to_string())
        .collect();
    Ok(format!("{};{}", rig.peer_tunnel_ip(), targets.join(",")))
}

/// The value of `key=` in a prober's report.
fn field(report: &str, key: &str) -> u64 {
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0)
}

/// What each prober reports having sent that the namespace must not let out.
fn forbidden_sends(reports: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, report) in reports.iter().enumerate() {
        if field(report, "rounds") == 0 {
            problems.push(format!("prober {} never ran: {report:?}", i + 1));
        }
        for line in report.lines().filter(|l| l.starts_with("forbidden ")) {
            problems.push(format!("prober {}: {line} left the namespace", i + 1));
        }
    }
    problems
}

fn up_down_loop_leaks_nothing() -> Result<()> {
    let mut rig = Rig::new(25)?;
    let other = other_resolver(&rig);
    let bad = format!("10.200.{}.66", rig.id);
    let decoy_log = rig.dnsmasq_at(other, "decoy", &[(NAME, &bad)])?;
    let config = dual_stack_routes(&rig)?;
    let spec = prober_spec(&rig)?;

    let underlay = Underlay::start(&rig)?;
    underlay.prove_armed(&rig)?;
    let tunnel = Capture::start_tunnel_only(rig.peer_fd(), &rig.peer_if, Direction::Received)?;
    let probers = Probers::default();
    let watcher = watch_for_namespaces(rig.confined.clone(), spec, probers.clone());
    for cycle in 1..=CYCLES {
        rig.up_with(&config)
            .with_context(|| format!("up, cycle {cycle}"))?;
        wait_for(Duration::from_secs(5), "this cycle's prober", || {
            probers.count() >= cycle
        })?;
        std::thread::sleep(Duration::from_millis(300));
        rig.down().with_context(|| format!("down, cycle {cycle}"))?;
    }
    drop(watcher);
    std::thread::sleep(Duration::from_millis(300));
    let reports = probers.finish();
    let (host, peer) = underlay.stop();
    let arrived = tunnel.stop();

    ensure!(
        reports.len() == CYCLES,
        "{} probers for {CYCLES} cycles",
        reports.len()
    );
    let mut problems = forbidden_sends(&reports);
    ensure!(
        reports.iter().any(|r| field(r, "left") > 0),
        "no probe ever went through the tunnel, so the probers prove nothing: {reports:?}"
    );
    ensure!(
        reports.iter().any(|r| field(r, "early") > 0),
        "no prober was inside before its tunnel came up, so up was not probed: {reports:?}"
    );
    let confined = Some(IpAddr::from(rig.confined_ip()));
    ensure!(
        arrived.iter().any(|f| f.src == confined),
        "no probe arrived at the peer through the tunnel"
    );
    problems.extend(
        forbidden_dns(&rig, &arrived)
            .into_iter()
            .map(|f| format!("arrived at the peer: {f}")),
    );
    problems.extend(
        arrived
            .iter()
            .filter(|f| f.kind == FrameKind::Ipv6)
            .map(|f| format!("IPv6 arrived at the peer: {}", f.describe())),
    );
    problems.extend(
        queries(&decoy_log)?
            .into_iter()
            .map(|q| format!("decoy: {q}")),
    );
    problems.dedup();
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(
        wireguard_frames(&rig, &host) > 0 && wireguard_frames(&rig, &peer) > 0,
        "no WireGuard on the underlay at all"
    );
    assert_underlay_clean(&rig, &host, &peer)
}

// ---------------------------------------------------------------------------------------------
// 6. While traffic flows inside, the underlay carries WireGuard to the endpoint only.

const UPLOAD: usize = 128 * 1024;
const DOWNLOAD: usize = 256 * 1024;

/// A TCP service in the peer that reads UPLOAD bytes, then sends DOWNLOAD bytes back.
fn bulk_service(rig: &Rig, addr: SocketAddr) -> Result<std::thread::JoinHandle<Result<()>>> {
    let listener = Rig::within(rig.peer_fd(), || TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).context("nobody connected"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut upload = vec![0u8; UPLOAD];
        stream.read_exact(&mut upload)?;
        stream.write_all(&vec![0x5a; DOWNLOAD])?;
        Ok(())
    }))
}

fn underlay_carries_only_wireguard() -> Result<()> {
    let rig = Rig::new(26)?;
    let underlay = Underlay::start(&rig)?;
    underlay.prove_armed(&rig)?;
    let addr = sockaddr(rig.peer_tunnel_ip(), 8001);
    let service = bulk_service(&rig, addr)?;
    rig.up_with(&rig.config()?)?;
    let inside = rig.confined_fd()?;
    // While the transfer runs, a process inside also sends everywhere else.
    let probers = Probers::default();
    let heard = Sink::udp(rig.peer_fd(), sockaddr(rig.peer_underlay(), 80))?;
    probers.start(&inside, &prober_spec(&rig)?)?;
    wait_for(
        Duration::from_secs(5),
        "the prober's traffic at the peer",
        || !heard.hits().is_empty(),
    )?;
    let received = Rig::within(&inside, || -> Result<usize> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&vec![0xa5; UPLOAD])?;
        let mut download = Vec::new();
        stream.read_to_end(&mut download)?;
        Ok(download.len())
    })??;
    service
        .join()
        .map_err(|_| anyhow!("the service panicked"))??;
    ensure!(
        received == DOWNLOAD,
        "got {received} of {DOWNLOAD} bytes back"
    );
    let reports = probers.finish();
    std::thread::sleep(Duration::from_millis(300));
    let (host, peer) = underlay.stop();
    assert_underlay_clean(&rig, &host, &peer)?;
    let problems = forbidden_sends(&reports);
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(
        reports.iter().any(|r| field(r, "left") > 0),
        "the prober sent nothing into the tunnel: {reports:?}"
    );
    // The traffic was carried on this link, encrypted: at least one datagram per 1500 bytes.
    let least = (UPLOAD + DOWNLOAD) / 1500;
    for (side, frames) in [("host", &host), ("peer", &peer)] {
        let seen = wireguard_frames(&rig, frames);
        ensure!(
            seen >= least,
            "only {seen} WireGuard datagrams on the {side} side for {} bytes",
            UPLOAD + DOWNLOAD
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. check-leaks.

/// The probes `check-leaks` runs on a namespace with strictDns and without IPv6.
const PROBES: [&str; 12] = [
    "interfaces",
    "ruleset",
    "dns-udp-elsewhere",
    "dns-tcp-elsewhere",
    "dot-elsewhere",
    "mdns",
    "llmnr",
    "ipv6",
    "resolv-conf",
    "nsswitch-hosts",
    "hosts-file",
    "host-resolver-sockets",
];

struct LeakReport {
    code: Option<i32>,
    /// (passed, probe name)
    probes: Vec<(bool, String)>,
    text: String,
}

impl LeakReport {
    fn parse(out: &Output) -> LeakReport {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let probes = stdout
            .lines()
            .filter_map(|l| {
                let (verdict, rest) = l.split_once(' ')?;
                let name = rest.split(':').next()?.to_string();
                match verdict {
                    "PASS" => Some((true, name)),
                    "FAIL" => Some((false, name)),
                    _ => None,
                }
            })
            .collect();
        LeakReport {
            code: out.status.code(),
            probes,
            text: text(out),
        }
    }

    fn failed(&self) -> Vec<&str> {
        self.probes
            .iter()
            .filter(|(passed, _)| !passed)
            .map(|(_, n)| n.as_str())
            .collect()
    }

    fn missing(&self) -> Vec<&str> {
        PROBES
            .into_iter()
            .filter(|p| !self.probes.iter().any(|(_, n)| n == p))
            .collect()
    }
}

fn check_leaks_passes() -> Result<()> {
    let rig = Rig::new(27)?;
    let nscd = HostNscd::start(&rig, other_resolver(&rig))?;
    rig.up_with(&rig.config()?)?;
    // Control: where check-leaks runs, the host's nscd answers on its socket, so the
    // host-resolver-sockets probe has something to find.
    std::os::unix::net::UnixStream::connect(format!("/proc/{}/root/run/nscd/socket", nscd.pid()))
        .context("nscd's socket")?;
    let out = nscd.helper(&rig, &["check-leaks", "--namespace", &rig.confined])?;
    let report = LeakReport::parse(&out);
    ensure!(
        report.missing().is_empty(),
        "probes missing: {:?}\n{}",
        report.missing(),
        report.text
    );
    ensure!(
        report.failed().is_empty() && report.code == Some(0),
        "check-leaks found leaks in a healthy namespace: {:?}\n{}",
        report.failed(),
        report.text
    );
    ensure!(
        report.text.contains("verdict: no leak found"),
        "no verdict: {}",
        report.text
    );
    Ok(())
}

fn check_leaks_fails_without_the_guard() -> Result<()> {
    let rig = Rig::new(28)?;
    rig.up_with(&rig.config()?)?;
    let check = || -> Result<LeakReport> {
        Ok(LeakReport::parse(&rig.helper(&[
            "check-leaks",
            "--namespace",
            &rig.confined,
        ])?))
    };
    let before = check()?;
    ensure!(
        !before.failed().contains(&"ruleset") && before.missing().is_empty(),
        "before: {}",
        before.text
    );
    let inside = rig.confined_fd()?;
    let out = rig
        .command_in(
            &inside,
            &["nft", "delete", "table", "inet", "wg_namespace_guard"],
        )
        .output()?;
    ensure!(out.status.success(), "deleting the guard: {}", text(&out));
    let after = check()?;
    ensure!(
        after.code == Some(1),
        "check-leaks must exit 1 without the guard: {}",
        after.text
    );
    // Without the guard these packets go into the tunnel: each probe must say so.
    let expected = [
        "ruleset",
        "dns-udp-elsewhere",
        "dns-tcp-elsewhere",
        "dot-elsewhere",
        "mdns",
        "llmnr",
    ];
    let unnoticed: Vec<&str> = expected
        .into_iter()
        .filter(|p| !after.failed().contains(p))
        .collect();
    ensure!(
        unnoticed.is_empty(),
        "with the guard table deleted, check-leaks still passes {unnoticed:?}:\n{}",
        after.text
    );
    ensure!(
        after.text.contains("probes found a leak"),
        "no verdict: {}",
        after.text
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. A provider's wg-quick file, several DNS servers, localhost.

/// The namespace's whole config from a wg-quick file in a provider's shape (BOM, CRLF,
/// comments, two DNS servers, MTU); the JSON names only the file, as the module writes it.
fn conf_file_alone() -> Result<()> {
    let mut rig = Rig::new(170)?;
    let first: Ipv4Addr = format!("10.200.{}.77", rig.id).parse()?;
    let second: Ipv4Addr = format!("10.200.{}.78", rig.id).parse()?;
    let bad: Ipv4Addr = format!("10.200.{}.66", rig.id).parse()?;
    let first_log = rig.dnsmasq(&[(NAME, &first.to_string())])?;
    let other = other_resolver(&rig);
    let second_log = rig.dnsmasq_at(other, "second", &[(NAME, &second.to_string())])?;
    // A third resolver the file does not list, on an address the tunnel reaches.
    let unlisted = Ipv4Addr::new(10, 200, rig.id, 4);
    sh(&[
        "ip",
        "-n",
        &rig.peer,
        "addr",
        "add",
        &format!("{unlisted}/29"),
        "dev",
        &rig.peer_veth,
    ])?;
    let unlisted_log = rig.dnsmasq_at(unlisted, "unlisted", &[(NAME, &bad.to_string())])?;
    let plain = Sink::tcp(rig.peer_fd(), sockaddr(unlisted, 8053), "plain")?;

    let conf = format!(
        "\u{feff}# Generated by the provider's config generator\r\n\
         [Interface]\r\n\
         PrivateKey = {key}\r\n\
         Address = {address}/32\r\n\
         DNS = {dns1}, {dns2}\r\n\
         MTU = 1360\r\n\
         \r\n\
         [Peer]\r\n\
         # the peer\r\n\
         PublicKey = {peer}\r\n\
         AllowedIPs = 0.0.0.0/0, ::/0\r\n\
         Endpoint = {endpoint}:{WG_PORT}\r\n\
         PersistentKeepalive = 25\r\n",
        key = rig.confined_key.to_base64(),
        address = rig.confined_ip(),
        dns1 = rig.peer_tunnel_ip(),
        dns2 = other,
        peer = rig.peer_key.get_public().to_base64(),
        endpoint = rig.peer_underlay(),
    );
    let conf_path = rig.write_secret("provider.conf", &conf)?;
    let service = rig.peer_service(REPLY)?;
    // What the module writes when only configFile is set.
    rig.up_with(&json!({
        "namespace_name": rig.confined,
        "configFile": conf_path,
        "dns_server": null,
        "dnsServers": [],
        "privateKeyFile": null,
        "ips": [],
        "peers": [],
        "mtu": null,
        "extraFirewallRules": "",
        "backend": "auto",
        "userspaceCommand": null,
        "strictDns": true,
        "publishPorts": []
    }))?;
    let inside = rig.confined_fd()?;
    let wait = Duration::from_secs(3);

    let answer = Rig::tcp_request(&inside, service, wait).context("TCP through the tunnel")?;
    ensure!(answer == REPLY, "unexpected answer {answer:?}");
    let link = sh(&["ip", "-n", &rig.confined, "link", "show", &rig.confined])?;
    ensure!(
        link.contains(" mtu 1360 "),
        "the file's MTU is not on the link: {link}"
    );
    let resolv = rig.exec(&["cat", "/etc/resolv.conf"])?;
    let nameservers: Vec<String> = String::from_utf8_lossy(&resolv.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(str::to_string)
        .collect();
    ensure!(
        nameservers == [rig.peer_tunnel_ip().to_string(), other.to_string()],
        "resolv.conf inside names {nameservers:?}: {}",
        text(&resolv)
    );
    let lookup = rig.exec(&["getent", "ahostsv4", NAME])?;
    ensure!(
        String::from_utf8_lossy(&lookup.stdout)
            .split_whitespace()
            .next()
            == Some(first.to_string().as_str()),
        "a lookup inside did not use the file's first DNS server: {}",
        text(&lookup)
    );
    ensure!(
        !queries(&first_log)?.is_empty(),
        "the first DNS server logged nothing"
    );

    // The guard lets DNS go to both listed servers and to no other, though the unlisted one
    // is reachable through the tunnel (control: a plain TCP port on its address answers).
    ensure!(
        udp_dns(&inside, sockaddr(other, 53), NAME).context("UDP DNS to the second server")?
            == second,
        "the second DNS server gave a wrong answer"
    );
    ensure!(
        tcp_dns(&inside, sockaddr(other, 53), NAME).context("TCP DNS to the second server")?
            == second,
        "the second DNS server gave a wrong answer over TCP"
    );
    ensure!(
        !queries(&second_log)?.is_empty(),
        "the second DNS server logged nothing"
    );
    Rig::tcp_request(&inside, plain.addr, wait).context("control: the unlisted address")?;
    let through: Vec<String> = [
        udp_dns(&inside, sockaddr(unlisted, 53), NAME).map(|a| format!("UDP answered {a}")),
        tcp_dns(&inside, sockaddr(unlisted, 53), NAME).map(|a| format!("TCP answered {a}")),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .collect();
    let logged = queries(&unlisted_log)?;
    ensure!(
        through.is_empty() && logged.is_empty(),
        "DNS reached a server the file does not list: {through:?} {logged:?}"
    );
    let status = rig.helper(&["status", "--namespace", &rig.confined, "--json"])?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    ensure!(
        status["namespaces"][0]["dns"]["servers"]
            == json!([rig.peer_tunnel_ip().to_string(), other.to_string()]),
        "status --json dns: {}",
        status["namespaces"][0]["dns"]
    );
    // check-leaks knows both servers are the namespace's own (resolv-conf probe).
    let out = rig.helper(&["check-leaks", "--namespace", &rig.confined])?;
    let report = LeakReport::parse(&out);
    ensure!(
        report.failed().is_empty() && report.code == Some(0),
        "check-leaks on a namespace from a file: {:?}\n{}",
        report.failed(),
        report.text
    );
    rig.down()?;
    rig.assert_clean()
}

/// `localhost` inside comes from the namespace's own hosts file: no DNS query leaves, even
/// though the tunnel's DNS server would answer the name (with another address).
fn localhost_without_dns() -> Result<()> {
    let mut rig = Rig::new(171)?;
    let good = format!("10.200.{}.77", rig.id);
    let dns_log = rig.dnsmasq(&[(NAME, &good), ("localhost", "10.200.171.99")])?;
    rig.up_with(&rig.config()?)?;
    let tunnel = Capture::start_tunnel(&rig.confined_fd()?, &rig.confined)?;
    let dns_frames = |frames: &[Frame]| -> Vec<String> {
        frames
            .iter()
            .filter(|f| matches!(f.protocol, 6 | 17) && matches!(f.dport, 53 | 853))
            .map(Frame::describe)
            .collect()
    };

    for database in ["hosts", "ahosts"] {
        let out = rig.exec(&["getent", database, "localhost"])?;
        let first = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        ensure!(
            out.status.success() && (first == "127.0.0.1" || first == "::1"),
            "getent {database} localhost inside: {}",
            text(&out)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let seen = dns_frames(&tunnel.frames());
    ensure!(
        seen.is_empty(),
        "looking up localhost sent DNS into the tunnel: {seen:?}"
    );
    ensure!(
        queries(&dns_log)?.is_empty(),
        "the DNS server was asked: {:?}",
        queries(&dns_log)?
    );

    // Control: any other name does go to DNS, and the capture sees it.
    let out = rig.exec(&["getent", "ahostsv4", NAME])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            == Some(good.as_str()),
        "control: {NAME} inside: {}",
        text(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        !dns_frames(&tunnel.stop()).is_empty() && !queries(&dns_log)?.is_empty(),
        "control: the lookup of {NAME} was not seen"
    );

    // The host's /etc/hosts is not what processes inside read.
    let inside = rig.exec(&["cat", "/etc/hosts"])?;
    let ours = std::fs::read_to_string(Path::new("/etc/netns").join(&rig.confined).join("hosts"))?;
    ensure!(
        String::from_utf8_lossy(&inside.stdout) == ours,
        "/etc/hosts inside is not the namespace's own: {}",
        text(&inside)
    );
    let names: Vec<&str> = ours
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    ensure!(
        names == ["127.0.0.1", "::1"],
        "the namespace's hosts file holds more than loopback: {ours}"
    );
    Ok(())
}
