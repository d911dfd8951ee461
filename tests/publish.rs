//! `publishPorts`: a service inside reachable from the host, and nothing more.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![
        trial(
            "published_ports_reach_in_and_nothing_reaches_out",
            published_ports,
        ),
        trial(
            "relays_run_unprivileged_in_the_namespace_they_connect_from",
            relays_unprivileged,
        ),
        trial(
            "idle_tcp_sessions_close_and_the_session_cap_turns_new_ones_away",
            idle_and_cap,
        ),
        trial(
            "a_udp_client_that_starts_before_the_service_gets_answers_once_it_is_up",
            udp_recovers,
        ),
        trial(
            "a_udp_relay_on_a_wildcard_address_answers_from_the_address_the_client_sent_to",
            udp_wildcard_source,
        ),
        trial(
            "a_udp_client_over_the_session_cap_takes_the_place_of_the_least_recently_active",
            udp_cap,
        ),
        trial(
            "one_datagram_udp_clients_neither_lock_a_relay_nor_hold_sessions_long",
            udp_flood,
        ),
        trial(
            "one_source_holds_at_most_its_share_of_udp_sessions",
            udp_per_source,
        ),
        trial(
            "silent_tcp_connections_close_after_seconds_and_are_counted",
            tcp_silent,
        ),
        trial(
            "one_source_holds_at_most_its_share_of_tcp_connections",
            tcp_per_source,
        ),
        trial(
            "host_services_reach_exactly_the_given_host_service",
            host_services,
        ),
        trial(
            "a_killed_relay_degrades_status_and_heal_brings_it_back",
            killed_relay,
        ),
        trial(
            "a_stopped_relay_degrades_status_and_heal_replaces_it",
            stopped_relay,
        ),
        trial(
            "a_relay_held_by_a_tracer_degrades_status_and_heal_replaces_it",
            traced_relay,
        ),
        trial(
            "an_on_port_change_hook_as_the_relays_user_is_refused",
            hook_as_relay_user,
        ),
        trial("idle_relays_do_not_wake_up", idle_relays_sleep),
    ])
}

const WEB_UI: &str = "web ui inside the namespace";

/// Host-side facts the relay must not change: firewall, forwarding, routes.
fn host_facts(rig: &Rig) -> Result<Vec<String>> {
    let mut facts = Vec::new();
    let nft = rig
        .command_in(rig.host_fd(), &["nft", "list", "ruleset"])
        .output()?;
    facts.push(format!("nft: {}", String::from_utf8_lossy(&nft.stdout)));
    for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
        let value = Rig::within(rig.host_fd(), || {
            std::fs::read_to_string(format!("/proc/sys/{key}"))
        })??;
        facts.push(format!("{key} = {}", value.trim()));
    }
    let routes = rig
        .command_in(rig.host_fd(), &["ip", "route", "show", "table", "all"])
        .output()?;
    facts.push(format!(
        "routes: {}",
        String::from_utf8_lossy(&routes.stdout)
    ));
    Ok(facts)
}

fn published_ports() -> Result<()> {
    let rig = Rig::new(50)?;
    let before = host_facts(&rig)?;
    let (tcp_port, udp_port, hidden_port) = (9091u16, 9092u16, 9093u16);
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"protocol": "tcp", "hostAddress": "0.0.0.0", "hostPort": 19091, "namespacePort": tcp_port},
        {"protocol": "udp", "hostPort": 19092, "namespacePort": udp_port},
    ]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;

    // Services inside, on the namespace's loopback, like a torrent client's web UI.
    Rig::serve_tcp(
        &inside,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), tcp_port),
        WEB_UI,
    )?;
    Rig::serve_tcp(
        &inside,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), hidden_port),
        "unpublished",
    )?;
    let echo = Rig::within(&inside, || UdpSocket::bind((Ipv4Addr::LOCALHOST, udp_port)))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });

    // The host reaches the published ports.
    let answer = Rig::tcp_request(
        rig.host_fd(),
        "127.0.0.1:19091".parse()?,
        Duration::from_secs(5),
    )?;
    ensure!(answer == WEB_UI, "published TCP port answered {answer:?}");
    let echoed = Rig::within(rig.host_fd(), || -> Result<Vec<u8>> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.send_to(b"ping over udp", "127.0.0.1:19092")?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })??;
    ensure!(
        echoed == b"ping over udp",
        "published UDP port echoed {echoed:?}"
    );

    // An unpublished port stays unreachable, from the host's loopback and the underlay.
    for addr in [
        format!("127.0.0.1:{hidden_port}"),
        format!("{}:{hidden_port}", rig.confined_ip()),
    ] {
        let probe = Rig::tcp_request(rig.host_fd(), addr.parse()?, Duration::from_secs(2));
        ensure!(
            probe.is_err(),
            "unpublished port reached at {addr}: {probe:?}"
        );
    }

    // Nothing inside can use the publishing path to get out: a host service on the underlay
    // address, and the relay's own listening address, see nothing from inside.
    let host_service = Rig::within(rig.host_fd(), || {
        TcpListener::bind((rig.host_underlay(), 7777))
    })??;
    host_service.set_nonblocking(true)?;
    let capture = Capture::start(rig.host_fd(), &rig.host_veth)?;
    for target in [
        SocketAddr::new(rig.host_underlay().into(), 7777),
        SocketAddr::new(rig.host_underlay().into(), 19091),
        "127.0.0.1:19091".parse()?,
    ] {
        let attempt = Rig::within(&inside, || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })?;
        ensure!(
            !matches!(&attempt, Ok(t) if t == WEB_UI) && attempt.is_err(),
            "from inside, {target} answered: {attempt:?}"
        );
    }
    ensure!(
        host_service.accept().is_err(),
        "a connection from inside reached the host"
    );
    let leaks: Vec<String> = capture.leaks().iter().map(Frame::describe).collect();
    ensure!(
        leaks.is_empty(),
        "packets on the underlay: {}",
        leaks.join("; ")
    );

    // No forwarding, no NAT, no route on the host, during or after.
    let during = host_facts(&rig)?;
    ensure!(
        during == before,
        "the host changed while publishing:\nbefore {before:?}\nduring {during:?}"
    );
    rig.down()?;
    rig.assert_clean()?;
    let after = host_facts(&rig)?;
    ensure!(
        after == before,
        "the host changed:\nbefore {before:?}\nafter {after:?}"
    );
    let gone = Rig::within(rig.host_fd(), || {
        TcpStream::connect_timeout(&"127.0.0.1:19091".parse().unwrap(), Duration::from_secs(1))
    })?;
    ensure!(gone.is_err(), "the published port still answers after down");
    let rebind = Rig::within(rig.host_fd(), || {
        TcpListener::bind("0.0.0.0:19091").map(|_| ())
    })?;
    ensure!(
        rebind.is_ok(),
        "the published port is still taken after down: {rebind:?}"
    );
    ensure!(
        processes_mentioning("publish")
            .iter()
            .all(|&p| !cmdline(p).contains(&rig.confined)),
        "the relay outlived down"
    );
    Ok(())
}

/// `status --json` for the rig's namespace: its exit code and its one namespace object.
fn status(rig: &Rig) -> Result<(i32, Value)> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status --json: {}", text(&out)))?;
    Ok((
        out.status.code().unwrap_or(-1),
        report["namespaces"][0].clone(),
    ))
}

fn relay_pids(rig: &Rig) -> Result<Vec<(u32, Value)>> {
    let (_, ns) = status(rig)?;
    ns["relays"]
        .as_array()
        .context("status --json has no relays")?
        .iter()
        .map(|r| Ok((r["pid"].as_u64().context("relay pid")? as u32, r.clone())))
        .collect()
}

/// The whitespace-separated values of a `/proc/<pid>/status` line.
fn proc_status(pid: u32, key: &str) -> Result<Vec<String>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .with_context(|| format!("/proc/{pid}/status has no {key}"))
}

fn ns_inode(fd: &OwnedFd) -> Result<u64> {
    Ok(std::fs::File::from(fd.try_clone()?).metadata()?.ino())
}

/// A TCP echo service in the namespace `fd` that notes where each connection came from.
fn serve_echo(fd: &OwnedFd, addr: SocketAddr) -> Result<Arc<Mutex<Vec<SocketAddr>>>> {
    let listener = Rig::within(fd, || TcpListener::bind(addr))??;
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if let Ok(peer) = stream.peer_addr() {
                seen.lock().unwrap().push(peer);
            }
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(peers)
}

/// Sends `message` on `stream` and reads the echo.
fn echo_through(stream: &mut TcpStream, message: &[u8]) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(message)?;
    let mut buf = vec![0u8; message.len()];
    stream.read_exact(&mut buf)?;
    ensure!(buf == message, "echoed {buf:?}");
    Ok(())
}

/// A UDP echo service in the namespace `fd` until the returned socket is shut down.
fn serve_udp_echo(fd: &OwnedFd, addr: SocketAddr) -> Result<Arc<UdpSocket>> {
    let socket = Arc::new(Rig::within(fd, || UdpSocket::bind(addr))??);
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let serving = Arc::clone(&socket);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        // Two owners while serving: the caller dropping its handle ends the service.
        while Arc::strong_count(&serving) > 1 {
            if let Ok((n, from)) = serving.recv_from(&mut buf) {
                let _ = serving.send_to(&buf[..n], from);
            }
        }
    });
    Ok(socket)
}

/// A host with two addresses publishes UDP on the wildcard address. A client that connected
/// its socket to the second address (as DNS and game clients do) accepts only datagrams from
/// that address: the relay must answer from the address each client sent to, not from the one
/// the route to the client prefers. The same for IPv6 and for IPv4 clients of a dual-stack
/// listener.
fn udp_wildcard_source() -> Result<()> {
    let rig = Rig::new(236)?;
    let second_v4: IpAddr = "10.200.236.5".parse()?;
    let second_v6: IpAddr = "fd77:236::5".parse()?;
    sh(&[
        "ip",
        "-n",
        &rig.host,
        "address",
        "add",
        "10.200.236.5/29",
        "dev",
        &rig.host_veth,
    ])?;
    sh(&[
        "ip",
        "-n",
        &rig.host,
        "address",
        "add",
        "fd77:236::5/128",
        "dev",
        "lo",
        "nodad",
    ])?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"protocol": "udp", "hostAddress": "0.0.0.0", "hostPort": 19094, "namespacePort": 9094},
        {"protocol": "udp", "hostAddress": "::", "hostPort": 19095, "namespacePort": 9095},
    ]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let _echo_v4 = serve_udp_echo(&inside, "127.0.0.1:9094".parse()?)?;
    let _echo_v6 = serve_udp_echo(&inside, "127.0.0.1:9095".parse()?)?;

    // Each client sends from an address other than the one it sends to, so that a reply
    // routed back to it would by default leave from the client's own address.
    for (from, to) in [
        (
            SocketAddr::new(rig.host_underlay().into(), 0),
            SocketAddr::new(second_v4, 19094),
        ),
        (
            SocketAddr::new(rig.host_underlay().into(), 0),
            SocketAddr::new(second_v4, 19095),
        ),
        ("[::1]:0".parse()?, SocketAddr::new(second_v6, 19095)),
    ] {
        let echoed = Rig::within(rig.host_fd(), || -> Result<Vec<u8>> {
            let socket = UdpSocket::bind(from)?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 64];
            // The service inside may still be starting: a few tries.
            for _ in 0..3 {
                socket.send(b"to the second address")?;
                if let Ok(n) = socket.recv(&mut buf) {
                    return Ok(buf[..n].to_vec());
                }
            }
            // Where did the answer go? A socket that takes datagrams from anyone says.
            let probe = UdpSocket::bind(from)?;
            probe.set_read_timeout(Some(Duration::from_secs(3)))?;
            probe.send_to(b"to the second address", to)?;
            let source = probe.recv_from(&mut buf).map(|(_, source)| source);
            bail!(
                "a client at {} connected to {to} got no answer; an unconnected one got one \
                 from {source:?}",
                socket.local_addr()?
            )
        })??;
        ensure!(echoed == b"to the second address", "{to} echoed {echoed:?}");
    }
    rig.down()?;
    rig.assert_clean()
}

fn relays_unprivileged() -> Result<()> {
    let rig = Rig::new(180)?;
    let lan = rig.host_underlay();
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"hostAddress": lan.to_string(), "hostPort": 18080, "namespacePort": 8080},
        {"protocol": "udp", "hostPort": 18081, "namespacePort": 8081},
    ]);
    config["hostServices"] = json!([{"namespacePort": 8090, "hostPort": 7090}]);
    let path = rig.write_config("config.json", &config)?;
    let up = rig.helper(&["up", "--config", path.to_str().context("path")?])?;
    ensure!(
        up.status.success()
            && String::from_utf8_lossy(&up.stderr).contains(&format!(
                "warning: publishPorts[0].hostAddress {lan} is not a loopback address"
            )),
        "up with a LAN hostAddress: {}",
        text(&up)
    );
    let inside = rig.confined_fd()?;
    let peers = serve_echo(&inside, "127.0.0.1:8080".parse()?)?;

    let (inside_ino, host_ino) = (ns_inode(&inside)?, ns_inode(rig.host_fd())?);
    // The dedicated user where the machine has one, else nobody.
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let (uid, gid) = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == "wg-namespace")
        .map_or(("65534".to_string(), "65534".to_string()), |f| {
            (f[2].to_string(), f[3].to_string())
        });
    let relays = relay_pids(&rig)?;
    ensure!(relays.len() == 3, "one relay per entry, got {relays:?}");
    for (pid, relay) in &relays {
        for (key, want) in [("Uid", &uid), ("Gid", &gid)] {
            let ids = proc_status(*pid, key)?;
            ensure!(
                ids.len() == 4 && ids.iter().all(|id| id == want),
                "relay {pid} {key}: {ids:?} (want {want} everywhere)"
            );
        }
        ensure!(
            proc_status(*pid, "Groups")?.is_empty(),
            "relay {pid} keeps supplementary groups"
        );
        for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let caps = proc_status(*pid, key)?;
            ensure!(caps == ["0000000000000000"], "relay {pid} {key}: {caps:?}");
        }
        ensure!(
            proc_status(*pid, "NoNewPrivs")? == ["1"],
            "relay {pid} may gain privileges"
        );
        let ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
        let want = if relay["direction"] == "publish" {
            inside_ino
        } else {
            host_ino
        };
        ensure!(
            ino == want,
            "relay {pid} ({relay}) is in network namespace {ino}, want {want}"
        );
    }

    // A connection from the LAN (the peer's side of the underlay) arrives from 127.0.0.1.
    let mut stream = Rig::within(rig.peer_fd(), || {
        TcpStream::connect_timeout(&SocketAddr::new(lan.into(), 18080), Duration::from_secs(5))
    })??;
    echo_through(&mut stream, b"from the lan")?;
    let seen = peers.lock().unwrap().clone();
    ensure!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|p| p.ip() == IpAddr::from(Ipv4Addr::LOCALHOST)),
        "connections inside came from {seen:?}, want 127.0.0.1"
    );
    drop(stream);
    rig.down()?;
    rig.assert_clean()
}

fn idle_and_cap() -> Result<()> {
    const CAP: usize = 256;
    let rig = Rig::new(181)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"hostPort": 18080, "namespacePort": 8080, "idleTimeoutSeconds": 8},
    ]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    serve_echo(&inside, "127.0.0.1:8080".parse()?)?;
    let published: SocketAddr = "127.0.0.1:18080".parse()?;
    let connect = || -> Result<TcpStream> {
        Ok(Rig::within(rig.host_fd(), || {
            TcpStream::connect_timeout(&published, Duration::from_secs(5))
        })??)
    };

    // A session in use stays open past the idle time.
    let mut busy = connect()?;
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::new();
    for i in 0..CAP - 1 {
        let mut stream = connect()?;
        echo_through(&mut stream, b"hi").with_context(|| format!("session {i}"))?;
        idle.push(stream);
    }
    echo_through(&mut busy, b"busy")?;

    // At the cap a new connection is accepted and closed at once, without data.
    let mut over = connect()?;
    over.set_read_timeout(Some(Duration::from_secs(2)))?;
    let _ = over.write_all(b"one too many");
    let mut buf = [0u8; 16];
    let read = over.read(&mut buf);
    ensure!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a connection over the cap of {CAP} was served: {read:?}"
    );

    // After the idle time the silent sessions are closed, the busy one is not.
    // Long enough that every silent session has been idle for over 8 s.
    while started.elapsed() < Duration::from_secs(10) {
        echo_through(&mut busy, b"still here")?;
        std::thread::sleep(Duration::from_millis(500));
    }
    for (i, stream) in idle.iter_mut().enumerate() {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let read = stream.read(&mut buf);
        ensure!(
            matches!(read, Ok(0)),
            "idle session {i} still open after the idle time: {read:?}"
        );
    }
    echo_through(&mut busy, b"busy after the others closed")?;
    // The freed sessions take new connections again.
    echo_through(&mut connect()?, b"a new one")?;
    drop((busy, idle));
    rig.down()?;
    rig.assert_clean()
}

fn udp_recovers() -> Result<()> {
    let rig = Rig::new(182)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([{"protocol": "udp", "hostPort": 18082, "namespacePort": 8082}]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let service: SocketAddr = "127.0.0.1:8082".parse()?;
    let client = Rig::within(rig.host_fd(), || UdpSocket::bind("127.0.0.1:0"))??;
    client.connect("127.0.0.1:18082")?;
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    // Asks until an answer comes; true when one came within `limit`.
    let answered = |limit: Duration| {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            let _ = client.send(b"anyone there?");
            if matches!(client.recv(&mut buf), Ok(n) if &buf[..n] == b"anyone there?") {
                return true;
            }
        }
        false
    };

    // The client starts first: its datagrams meet a closed port inside.
    ensure!(
        !answered(Duration::from_secs(1)),
        "an answer came with no service inside"
    );
    let echo = serve_udp_echo(&inside, service)?;
    ensure!(
        answered(Duration::from_secs(5)),
        "no answer after the service inside came up"
    );
    // The service restarts: answers come again, from the same client socket.
    drop(echo);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        !answered(Duration::from_secs(1)),
        "an answer came while the service was away"
    );
    let _echo = serve_udp_echo(&inside, service)?;
    ensure!(
        answered(Duration::from_secs(5)),
        "no answer after the service inside came back"
    );
    rig.down()?;
    rig.assert_clean()
}

fn udp_cap() -> Result<()> {
    const CAP: usize = 256;
    let rig = Rig::new(185)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"protocol": "udp", "hostPort": 18083, "namespacePort": 8083},
    ]);
    rig.up_with(&config)?;
    let _service = serve_udp_port_echo(&rig.confined_fd()?, "127.0.0.1:8083".parse()?)?;
    let published: SocketAddr = "127.0.0.1:18083".parse()?;
    let client = || udp_client(&rig, Ipv4Addr::LOCALHOST.into(), published);
    let clients: Vec<UdpSocket> = (0..CAP).map(|_| client()).collect::<Result<_>>()?;
    let mut ports = Vec::new();
    for (i, socket) in clients.iter().enumerate() {
        ports.push(ask(socket).with_context(|| format!("client {i} under the cap"))?);
    }
    // Client 0 talks again: client 1 is now the least recently active.
    ensure!(ask(&clients[0])? == ports[0], "client 0 lost its session");
    let late = client()?;
    ask(&late).with_context(|| format!("a client over the cap of {CAP} got no answer"))?;
    let (_, ns) = status(&rig)?;
    ensure!(
        ns["relays"][0]["sessionsOpen"] == CAP && ns["relays"][0]["sessionsEvicted"] == 1,
        "counters after one eviction: {}",
        ns["relays"][0]
    );
    ensure!(
        ask(&clients[0])? == ports[0],
        "the recently active client 0 was evicted"
    );
    ensure!(
        ask(&clients[1])? != ports[1],
        "the least recently active client 1 kept its session"
    );
    rig.down()?;
    rig.assert_clean()
}

/// A UDP service inside that answers each datagram starting with "hello" with the port the
/// datagram came from (the relay's session socket), and ignores all others.
fn serve_udp_port_echo(fd: &OwnedFd, addr: SocketAddr) -> Result<Arc<UdpSocket>> {
    let socket = Arc::new(Rig::within(fd, || UdpSocket::bind(addr))??);
    let serving = Arc::clone(&socket);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = serving.recv_from(&mut buf) {
            if buf[..n].starts_with(b"hello") {
                let _ = serving.send_to(from.port().to_string().as_bytes(), from);
            }
        }
    });
    Ok(socket)
}

/// A UDP client in the rig's host namespace, sending from `source` to `to`.
fn udp_client(rig: &Rig, source: IpAddr, to: SocketAddr) -> Result<UdpSocket> {
    let socket = Rig::within(rig.host_fd(), || UdpSocket::bind((source, 0)))??;
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(socket)
}

/// Sends "hello" (up to four times) and returns the port the service saw it from.
fn ask(socket: &UdpSocket) -> Result<u16> {
    let mut buf = [0u8; 16];
    for _ in 0..4 {
        socket.send(b"hello")?;
        if let Ok(n) = socket.recv(&mut buf) {
            return Ok(std::str::from_utf8(&buf[..n])?.parse()?);
        }
    }
    bail!("no answer")
}

/// One datagram each from more clients than the cap, never answered (a scan, a flood): a
/// client after them is answered at once, and their sessions end after a few seconds, not
/// after the idle timeout.
fn udp_flood() -> Result<()> {
    const CAP: usize = 256;
    let rig = Rig::new(83)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([{"protocol": "udp", "hostPort": 18083, "namespacePort": 8083}]);
    rig.up_with(&config)?;
    let _service = serve_udp_port_echo(&rig.confined_fd()?, "127.0.0.1:8083".parse()?)?;
    let published: SocketAddr = "127.0.0.1:18083".parse()?;
    let flood: Vec<UdpSocket> = (0..CAP)
        .map(|_| udp_client(&rig, Ipv4Addr::LOCALHOST.into(), published))
        .collect::<Result<_>>()?;
    for socket in &flood {
        socket.send(b"x")?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let legit = udp_client(&rig, Ipv4Addr::LOCALHOST.into(), published)?;
    let port = ask(&legit).context("a client after a flood of one-datagram clients")?;
    std::thread::sleep(Duration::from_secs(7));
    let (_, ns) = status(&rig)?;
    ensure!(
        ns["relays"][0]["sessionsOpen"] == 1,
        "the unanswered sessions did not end within 7s: {}",
        ns["relays"][0]
    );
    ensure!(ask(&legit)? == port, "the answered client lost its session");
    rig.down()?;
    rig.assert_clean()
}

/// A second address in the rig's host namespace, to connect from.
fn second_source(rig: &Rig) -> Result<IpAddr> {
    let address = Ipv4Addr::new(10, 200, rig.id, 50);
    sh(&[
        "ip",
        "-n",
        &format!("wgt{}h", rig.id),
        "addr",
        "add",
        &format!("{address}/32"),
        "dev",
        "lo",
    ])?;
    Ok(address.into())
}

/// One source address cannot hold more than its share of an entry's UDP sessions: its newest
/// client takes the place of its own least recently active one, not another source's.
fn udp_per_source() -> Result<()> {
    const PER_SOURCE: usize = 64;
    let rig = Rig::new(84)?;
    let mut config = rig.config()?;
    // On the address itself: a relay bound to 0.0.0.0 answers from whichever address the
    // route to the client prefers, which a second local address would not match.
    config["publishPorts"] = json!([
        {"protocol": "udp", "hostAddress": rig.host_underlay().to_string(), "hostPort": 18083,
         "namespacePort": 8083},
    ]);
    rig.up_with(&config)?;
    let _service = serve_udp_port_echo(&rig.confined_fd()?, "127.0.0.1:8083".parse()?)?;
    let one: IpAddr = rig.host_underlay().into();
    let other = second_source(&rig)?;
    let published = SocketAddr::new(one, 18083);
    let bystander = udp_client(&rig, other, published)?;
    let bystander_port = ask(&bystander)?;
    let clients: Vec<UdpSocket> = (0..PER_SOURCE)
        .map(|_| udp_client(&rig, one, published))
        .collect::<Result<_>>()?;
    let mut ports = Vec::new();
    for (i, socket) in clients.iter().enumerate() {
        ports.push(ask(socket).with_context(|| format!("client {i} of one source"))?);
    }
    ask(&udp_client(&rig, one, published)?).context("one more client of the same source")?;
    ensure!(
        ask(&clients[0])? != ports[0],
        "a source held more than {PER_SOURCE} sessions: its oldest client kept its session"
    );
    ensure!(
        ask(&bystander)? == bystander_port,
        "another source's session was taken"
    );
    rig.down()?;
    rig.assert_clean()
}

/// TCP connections that never carry a byte (256 of them lock the entry) are closed after a
/// few seconds; the counters show the sessions held and the connection turned away.
fn tcp_silent() -> Result<()> {
    const CAP: usize = 256;
    let rig = Rig::new(85)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([{"hostPort": 18080, "namespacePort": 8080}]);
    rig.up_with(&config)?;
    serve_echo(&rig.confined_fd()?, "127.0.0.1:8080".parse()?)?;
    let published: SocketAddr = "127.0.0.1:18080".parse()?;
    let connect = || -> Result<TcpStream> {
        Ok(Rig::within(rig.host_fd(), || {
            TcpStream::connect_timeout(&published, Duration::from_secs(5))
        })??)
    };
    let mut silent: Vec<TcpStream> = (0..CAP).map(|_| connect()).collect::<Result<_>>()?;
    let connected = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "the relay to hold every connection",
        || status(&rig).is_ok_and(|(_, ns)| ns["relays"][0]["sessionsOpen"] == CAP),
    )?;
    let mut over = connect()?;
    over.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = over.write_all(b"one too many");
    let read = over.read(&mut [0u8; 16]);
    ensure!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a connection over the cap was served: {read:?}"
    );
    let (_, ns) = status(&rig)?;
    ensure!(
        ns["relays"][0]["sessionsRefused"] == 1,
        "counters after one refusal: {}",
        ns["relays"][0]
    );
    // Silent for 10 s: closed, long before the idle timeout of 300 s.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(connected.elapsed()));
    for (i, stream) in silent.iter_mut().enumerate() {
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let read = stream.read(&mut [0u8; 16]);
        ensure!(
            matches!(read, Ok(0)),
            "silent connection {i} still open after 11s: {read:?}"
        );
    }
    echo_through(&mut connect()?, b"served again")?;
    rig.down()?;
    rig.assert_clean()
}

/// One source address cannot hold more than its share of an entry's TCP sessions; another
/// source is still served.
fn tcp_per_source() -> Result<()> {
    const PER_SOURCE: usize = 64;
    let rig = Rig::new(86)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"hostAddress": rig.host_underlay().to_string(), "hostPort": 18080, "namespacePort": 8080},
    ]);
    rig.up_with(&config)?;
    serve_echo(&rig.confined_fd()?, "127.0.0.1:8080".parse()?)?;
    let one: IpAddr = rig.host_underlay().into();
    let other = second_source(&rig)?;
    let published = SocketAddr::new(one, 18080);
    let connect = |from: IpAddr| -> Result<TcpStream> {
        Ok(Rig::within(
            rig.host_fd(),
            || -> std::io::Result<TcpStream> {
                let socket = nix::sys::socket::socket(
                    nix::sys::socket::AddressFamily::Inet,
                    nix::sys::socket::SockType::Stream,
                    nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                let IpAddr::V4(from) = from else {
                    unreachable!("IPv4 test addresses")
                };
                nix::sys::socket::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    &nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
                )?;
                let IpAddr::V4(to) = published.ip() else {
                    unreachable!("IPv4 test addresses")
                };
                nix::sys::socket::connect(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    &nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(
                        to,
                        published.port(),
                    )),
                )?;
                Ok(TcpStream::from(socket))
            },
        )??)
    };
    let mut held = Vec::new();
    for i in 0..PER_SOURCE {
        let mut stream = connect(one)?;
        echo_through(&mut stream, b"hi").with_context(|| format!("connection {i}"))?;
        held.push(stream);
    }
    let mut over = connect(one)?;
    over.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = over.write_all(b"one too many");
    let read = over.read(&mut [0u8; 16]);
    ensure!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "connection {} of one source was served: {read:?}",
        PER_SOURCE + 1
    );
    let mut bystander = connect(other)?;
    echo_through(&mut bystander, b"another source").context("another source")?;
    let (_, ns) = status(&rig)?;
    ensure!(
        ns["relays"][0]["sessionsOpen"] == PER_SOURCE + 1
            && ns["relays"][0]["sessionsRefused"] == 1,
        "counters with {} held and one refused: {}",
        PER_SOURCE + 1,
        ns["relays"][0]
    );
    drop((held, bystander));
    rig.down()?;
    rig.assert_clean()
}

const HOST_SERVICE: &str = "a media server on the host";

fn host_services() -> Result<()> {
    let rig = Rig::new(183)?;
    let veth = rig.host_underlay();
    // The service on the host's loopback, and others the namespace must not reach.
    Rig::serve_tcp(rig.host_fd(), "127.0.0.1:7001".parse()?, HOST_SERVICE)?;
    let udp_echo = serve_udp_echo(rig.host_fd(), "127.0.0.1:7001".parse()?)?;
    let others: Vec<TcpListener> = [
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 7002),
        SocketAddr::new(veth.into(), 7001),
        SocketAddr::new(veth.into(), 7002),
    ]
    .iter()
    .map(|addr| Ok(Rig::within(rig.host_fd(), || TcpListener::bind(addr))??))
    .collect::<Result<_>>()?;
    for listener in &others {
        listener.set_nonblocking(true)?;
    }
    let mut config = rig.config()?;
    config["hostServices"] = json!([
        {"namespacePort": 8001, "hostPort": 7001},
        {"protocol": "udp", "namespacePort": 8001, "hostAddress": "127.0.0.1", "hostPort": 7001},
    ]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let capture = Capture::start(rig.host_fd(), &rig.host_veth)?;

    let answer = Rig::tcp_request(&inside, "127.0.0.1:8001".parse()?, Duration::from_secs(5))?;
    ensure!(
        answer == HOST_SERVICE,
        "the host service answered {answer:?}"
    );
    let echoed = Rig::within(&inside, || -> Result<Vec<u8>> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.send_to(b"udp to the host", "127.0.0.1:8001")?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })??;
    ensure!(
        echoed == b"udp to the host",
        "the UDP host service echoed {echoed:?}"
    );

    // Nothing else on the host: its veth address, another port there, another port on the
    // loopback the service uses (the namespace has its own loopback).
    for target in [
        SocketAddr::new(veth.into(), 7001),
        SocketAddr::new(veth.into(), 7002),
        "127.0.0.1:7002".parse()?,
        "127.0.0.1:7001".parse()?,
    ] {
        let probe = Rig::tcp_request(&inside, target, Duration::from_secs(2));
        ensure!(probe.is_err(), "from inside, {target} answered: {probe:?}");
        Rig::within(&inside, || -> std::io::Result<()> {
            UdpSocket::bind("0.0.0.0:0")?
                .send_to(b"probe", target)
                .map(drop)
        })?
        .ok();
    }
    for listener in &others {
        ensure!(
            listener.accept().is_err(),
            "a connection from inside reached {:?}",
            listener.local_addr()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let leaks: Vec<String> = capture.leaks().iter().map(Frame::describe).collect();
    ensure!(
        leaks.is_empty(),
        "packets on the underlay: {}",
        leaks.join("; ")
    );

    // status and check-leaks know the host service.
    let (_, ns) = status(&rig)?;
    ensure!(
        ns["hostServices"]
            == json!([
                {"protocol": "tcp", "namespacePort": 8001, "hostAddress": "127.0.0.1", "hostPort": 7001},
                {"protocol": "udp", "namespacePort": 8001, "hostAddress": "127.0.0.1", "hostPort": 7001},
            ]),
        "status --json hostServices: {}",
        ns["hostServices"]
    );
    let plain = rig.helper(&["status", "--namespace", &rig.confined])?;
    ensure!(
        String::from_utf8_lossy(&plain.stdout)
            .contains("to host:   tcp 127.0.0.1:8001 inside -> 127.0.0.1:7001"),
        "status does not show the host service: {}",
        text(&plain)
    );
    let leaks = rig.helper(&["check-leaks", "--namespace", &rig.confined])?;
    let report = String::from_utf8_lossy(&leaks.stdout);
    ensure!(
        leaks.status.success()
            && report.contains("PASS relays")
            && report.contains("tcp 127.0.0.1:8001 -> 127.0.0.1:7001"),
        "check-leaks: {}",
        text(&leaks)
    );
    drop(udp_echo);
    rig.down()?;
    rig.assert_clean()
}

/// Up with one published web UI, answering through its relay: the published address and the
/// relay's PID.
fn web_ui_with_its_relay(rig: &Rig) -> Result<(SocketAddr, u32)> {
    let mut config = rig.config()?;
    config["publishPorts"] = json!([{"hostPort": 18080, "namespacePort": 8080}]);
    rig.up_with(&config)?;
    Rig::serve_tcp(&rig.confined_fd()?, "127.0.0.1:8080".parse()?, WEB_UI)?;
    let published: SocketAddr = "127.0.0.1:18080".parse()?;
    ensure!(Rig::tcp_request(rig.host_fd(), published, Duration::from_secs(5))? == WEB_UI);
    let (pid, _) = relay_pids(rig)?
        .into_iter()
        .next()
        .context("no relay in status")?;
    Ok((published, pid))
}

fn killed_relay() -> Result<()> {
    let rig = Rig::new(184)?;
    let (published, pid) = web_ui_with_its_relay(&rig)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(Duration::from_secs(5), "the relay to die", || {
        !std::path::Path::new(&format!("/proc/{pid}/status")).exists()
            || proc_status(pid, "State").is_ok_and(|s| s.first().is_some_and(|s| s == "Z"))
    })?;
    let (code, ns) = status(&rig)?;
    let reason = format!(
        "the relay for publishPorts tcp 127.0.0.1:18080 -> namespace port 8080 (pid {pid}) is gone"
    );
    ensure!(
        code == 3
            && ns["verdict"] == "degraded"
            && ns["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == &json!(reason))),
        "status after the relay was killed: exit {code}, {ns}"
    );
    ensure!(
        Rig::tcp_request(rig.host_fd(), published, Duration::from_secs(2)).is_err(),
        "the published port answers with its relay dead"
    );

    // heal brings the relay back in place: the service inside is not restarted.
    let heal = rig.helper(&["heal", "--namespace", &rig.confined])?;
    ensure!(heal.status.success(), "heal: {}", text(&heal));
    ensure!(Rig::tcp_request(rig.host_fd(), published, Duration::from_secs(5))? == WEB_UI);
    let (_, ns) = status(&rig)?;
    ensure!(
        !ns["reasons"].to_string().contains("relay"),
        "status still names a relay: {ns}"
    );
    rig.down()?;
    rig.assert_clean()
}

/// A relay stopped by a process of its uid holds its port and answers nothing: that is not
/// running, and heal replaces it.
fn stopped_relay() -> Result<()> {
    let rig = Rig::new(80)?;
    let (published, pid) = web_ui_with_its_relay(&rig)?;
    let relay = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(relay, nix::sys::signal::Signal::SIGSTOP)?;
    wait_for(Duration::from_secs(5), "the relay to stop", || {
        proc_status(pid, "State").is_ok_and(|s| s.first().is_some_and(|s| s == "T"))
    })?;
    ensure!(
        Rig::tcp_request(rig.host_fd(), published, Duration::from_secs(2)).is_err(),
        "the published port answers with its relay stopped"
    );
    let (code, ns) = status(&rig)?;
    let reason = format!(
        "the relay for publishPorts tcp 127.0.0.1:18080 -> namespace port 8080 (pid {pid}) is \
         stopped (by a signal or a tracer): it takes connections and answers none"
    );
    ensure!(
        code == 3
            && ns["verdict"] == "degraded"
            && ns["relays"][0]["running"] == false
            && ns["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == &json!(reason))),
        "status with the relay stopped: exit {code}, {ns}"
    );

    let heal = rig.helper(&["heal", "--namespace", &rig.confined])?;
    ensure!(heal.status.success(), "heal: {}", text(&heal));
    let (new_pid, _) = relay_pids(&rig)?
        .into_iter()
        .next()
        .context("no relay in status after heal")?;
    ensure!(new_pid != pid, "heal kept the stopped relay (pid {pid})");
    ensure!(
        proc_status(pid, "State").map_or(true, |s| s.first().is_some_and(|s| s == "Z")),
        "the stopped relay (pid {pid}) is still there after heal"
    );
    ensure!(Rig::tcp_request(rig.host_fd(), published, Duration::from_secs(5))? == WEB_UI);
    let (code, ns) = status(&rig)?;
    ensure!(
        code == 0 && !ns["reasons"].to_string().contains("relay"),
        "status after heal: exit {code}, {ns}"
    );
    rig.down()?;
    rig.assert_clean()
}

/// The onPortChange hook must not run as the user the relays run as (here nobody: this
/// machine has no wg-namespace user), by name or by uid; nothing is made.
fn hook_as_relay_user() -> Result<()> {
    let rig = Rig::new(81)?;
    let relay_user = if std::fs::read_to_string("/etc/passwd")?
        .lines()
        .any(|l| l.starts_with("wg-namespace:"))
    {
        "wg-namespace"
    } else {
        "nobody"
    };
    let uid = nix::unistd::User::from_name(relay_user)?
        .context("no relay user")?
        .uid
        .to_string();
    for user in [relay_user, uid.as_str()] {
        let mut config = rig.config()?;
        config["publishPorts"] = json!([{"hostPort": 18080, "namespacePort": 8080}]);
        config["portForwarding"] = json!({
            "gateway": rig.peer_tunnel_ip().to_string(),
            "onPortChange": "/bin/true",
            "onPortChangeUser": user,
        });
        let path = rig.write_config("clash.json", &config)?;
        let out = rig.helper(&["up", "--config", path.to_str().context("path")?])?;
        let line = one_error_line(&out, 2)?;
        ensure!(
            line.starts_with(&format!(
                "error: portForwarding.onPortChangeUser: \"{user}\" is the user the relays"
            )),
            "up with the hook as {user}: {line}"
        );
        ensure!(
            !std::path::Path::new(&format!("/run/netns/{}", rig.confined)).exists(),
            "up made the namespace although it refused the config"
        );
    }
    rig.assert_clean()
}

/// Relays with no session sleep until a socket is ready: no clock wakes them, also after their
/// sessions ended. WG_RELAY_IDLE_SECONDS sets how long they are watched (10 s by default; the
/// numbers in the README are from 60 s).
fn idle_relays_sleep() -> Result<()> {
    let watch = Duration::from_secs(
        std::env::var("WG_RELAY_IDLE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let rig = Rig::new(82)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"hostPort": 18080, "namespacePort": 8080, "idleTimeoutSeconds": 2},
        {"protocol": "udp", "hostPort": 18081, "namespacePort": 8081, "idleTimeoutSeconds": 2},
    ]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    serve_echo(&inside, "127.0.0.1:8080".parse()?)?;
    let _udp = serve_udp_echo(&inside, "127.0.0.1:8081".parse()?)?;
    // One session each, ended (TCP) or left to expire (UDP).
    let mut tcp = Rig::within(rig.host_fd(), || {
        TcpStream::connect_timeout(&"127.0.0.1:18080".parse().unwrap(), Duration::from_secs(5))
    })??;
    echo_through(&mut tcp, b"once")?;
    drop(tcp);
    let udp = Rig::within(rig.host_fd(), || UdpSocket::bind("127.0.0.1:0"))??;
    udp.set_read_timeout(Some(Duration::from_secs(5)))?;
    udp.send_to(b"once", "127.0.0.1:18081")?;
    udp.recv(&mut [0u8; 16])?;
    wait_for(Duration::from_secs(10), "both sessions to end", || {
        status(&rig).is_ok_and(|(_, ns)| {
            ns["relays"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["sessionsOpen"] == 0))
        })
    })?;

    let pids: Vec<u32> = relay_pids(&rig)?.into_iter().map(|(pid, _)| pid).collect();
    ensure!(pids.len() == 2, "expected two relays, got {pids:?}");
    let count = || -> Result<Vec<u64>> { pids.iter().map(|&p| wakeups(p)).collect() };
    // The status calls above asked each relay for its counters; on a busy machine a relay may
    // only now get to see that asker's connection close. Start counting once they are still.
    let mut before = count()?;
    let settling = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = count()?;
        if now == before || settling.elapsed() > Duration::from_secs(5) {
            before = now;
            break;
        }
        before = now;
    }
    std::thread::sleep(watch);
    let after = count()?;
    let woke: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "idle relays over {}s: tcp {} wakeups, udp {} wakeups",
        watch.as_secs(),
        woke[0],
        woke[1]
    );
    ensure!(
        woke.iter().all(|&w| w == 0),
        "idle relays woke up {woke:?} times (tcp, udp) in {}s",
        watch.as_secs()
    );
    rig.down()?;
    rig.assert_clean()
}

/// A relay held in a ptrace stop (state `t`) answers nothing either: status says so and heal
/// replaces it.
fn traced_relay() -> Result<()> {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let rig = Rig::new(87)?;
    let (published, pid) = web_ui_with_its_relay(&rig)?;
    let relay = nix::unistd::Pid::from_raw(pid as i32);
    // This thread is the tracer until the relay is gone.
    for request in [libc::PTRACE_SEIZE, libc::PTRACE_INTERRUPT] {
        // SAFETY: plain ptrace requests on a process of our own test, with no data pointers.
        if unsafe { libc::ptrace(request, pid as libc::pid_t, 0usize, 0usize) } != 0 {
            return Err(std::io::Error::last_os_error()).context("tracing the relay");
        }
    }
    waitpid(relay, Some(WaitPidFlag::__WALL))?;
    ensure!(
        proc_status(pid, "State")?.first().is_some_and(|s| s == "t"),
        "the relay is not in a ptrace stop: {:?}",
        proc_status(pid, "State")
    );
    let (code, ns) = status(&rig)?;
    ensure!(
        code == 3
            && ns["relays"][0]["running"] == false
            && ns["reasons"]
                .to_string()
                .contains(&format!("(pid {pid}) is stopped")),
        "status with the relay traced: exit {code}, {ns}"
    );
    let heal = rig.helper(&["heal", "--namespace", &rig.confined])?;
    // The tracer hears of the relay's death; collecting that lets it go.
    let _ = waitpid(relay, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
    ensure!(heal.status.success(), "heal: {}", text(&heal));
    let (new_pid, _) = relay_pids(&rig)?
        .into_iter()
        .next()
        .context("no relay in status after heal")?;
    ensure!(new_pid != pid, "heal kept the traced relay (pid {pid})");
    ensure!(Rig::tcp_request(rig.host_fd(), published, Duration::from_secs(5))? == WEB_UI);
    rig.down()?;
    rig.assert_clean()
}
