//! `publishPorts`: a service inside reachable from the host, and nothing more.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use serde_json::json;

fn main() {
    run(vec![trial(
        "published_ports_reach_in_and_nothing_reaches_out",
        published_ports,
    )])
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
