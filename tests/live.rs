//! Changes and repairs in place: `reload` and `heal` keep the namespace, the processes inside
//! and their connections, and nothing leaves the namespace except WireGuard while they work.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value, json};
use wg_namespace::commands::updown::PAUSE_SWITCH;
use wg_namespace::system::process::ProcessId;
use wg_namespace::system::wireguard::{self, Backend, DeviceView};

fn main() {
    run(vec![
        trial(
            "reload_changes_peers_rules_and_dns_in_place_with_the_same_pid_and_connection",
            reload_in_place,
        ),
        trial(
            "reload_adds_and_removes_an_ipv6_address_in_place",
            reload_ipv6,
        ),
        trial(
            "reload_refuses_another_name_or_backend_with_code_5_and_changes_nothing",
            reload_refuses,
        ),
        trial(
            "heal_recreates_a_deleted_interface_and_a_killed_daemon_in_place",
            heal_in_place,
        ),
        trial(
            "heal_without_the_daemon_on_path_starts_the_program_up_found_in_place",
            heal_without_the_daemon_on_path,
        ),
        // The pause switch exists in debug builds only.
        trial(
            "reload_killed_midway_is_finished_by_reload_or_undone_by_down",
            reload_killed_midway,
        )
        .with_ignored_flag(!is_root() || !PAUSE_SWITCH),
        trial(
            "heal_killed_midway_is_finished_by_heal_or_undone_by_down",
            heal_killed_midway,
        )
        .with_ignored_flag(!is_root() || !PAUSE_SWITCH),
        trial(
            "up_and_heal_go_on_with_the_last_good_address_when_a_name_does_not_resolve",
            last_good_address,
        ),
    ])
}

const RESTART_NEEDED: i32 = 5;

/// A line echo server on the peer's tunnel address: what an open connection through the
/// tunnel talks to.
fn echo_server(rig: &Rig) -> Result<SocketAddr> {
    let listener = Rig::within(rig.peer_fd(), || {
        TcpListener::bind((rig.peer_tunnel_ip(), 8200))
    })??;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(writer, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One connection from inside the confined namespace, kept open across changes.
struct Connection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    sent: u64,
}

impl Connection {
    /// Allows for one lost handshake initiation: WireGuard sends the next after 5 s (plus
    /// jitter), and a busy machine can lose the first, as it did once in CI.
    fn open(inside: &OwnedFd, to: SocketAddr, when: &str) -> Result<Connection> {
        let stream = Rig::within(inside, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(15))
        })?
        .with_context(|| format!("connecting to {to} through the tunnel {when}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Connection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            sent: 0,
        })
    }

    /// Sends a numbered line and expects it back.
    fn carries_data(&mut self, when: &str) -> Result<()> {
        self.sent += 1;
        writeln!(self.writer, "line {}", self.sent).with_context(|| format!("sending {when}"))?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .with_context(|| format!("the open connection stopped carrying data {when}"))?;
        ensure!(
            answer.trim() == format!("line {}", self.sent),
            "unexpected echo {when}: {answer:?}"
        );
        Ok(())
    }
}

/// A long-running process inside the confined namespace.
fn confined_process(rig: &mut Rig) -> Result<u32> {
    let child = rig
        .command_in(&rig.confined_fd()?, &["sleep", "600"])
        .stdout(Stdio::null())
        .spawn()?;
    Ok(rig.track(child))
}

/// The process still runs, and still in the namespace called `rig.confined`.
fn still_confined(rig: &Rig, pid: u32, when: &str) -> Result<()> {
    let ns = std::fs::metadata(format!("/run/netns/{}", rig.confined))?;
    let its = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("the confined process {pid} is gone {when}"))?;
    ensure!(
        (ns.dev(), ns.ino()) == (its.dev(), its.ino()),
        "process {pid} is no longer in namespace {} {when}",
        rig.confined
    );
    Ok(())
}

fn state(rig: &Rig) -> Result<Value> {
    let path = format!("/run/wg-namespace/{}.json", rig.confined);
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

/// The PID of the recorded process of `kind` ("daemon", "relay").
fn recorded_pid(rig: &Rig, kind: &str) -> Result<u32> {
    let state = state(rig)?;
    let pid = state["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["kind"] == kind)
        .and_then(|r| r["process"]["pid"].as_u64())
        .with_context(|| format!("no {kind} recorded"))?;
    Ok(u32::try_from(pid)?)
}

fn device(rig: &Rig) -> Result<DeviceView> {
    let fd = rig.confined_fd()?;
    Ok(DeviceView::of(&wireguard::show(
        &rig.confined,
        Backend::Userspace,
        &fd,
    )?))
}

fn handshake_of(rig: &Rig, key: &wireguard_control::Key) -> Result<Option<SystemTime>> {
    Ok(device(rig)?
        .peers
        .iter()
        .find(|p| p.public_key.0 == key.0)
        .context("peer missing from the device")?
        .last_handshake)
}

fn reload(rig: &Rig, config: &Value) -> Result<std::process::Output> {
    let path = rig.write_config("config.json", config)?;
    rig.helper(&["reload", "--config", path.to_str().context("path")?])
}

fn reload_ok(rig: &Rig, config: &Value, what: &str) -> Result<String> {
    let out = reload(rig, config)?;
    ensure!(
        out.status.success(),
        "reload ({what}) failed: {}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn heal(rig: &Rig, config: &std::path::Path) -> Result<std::process::Output> {
    rig.helper(&["heal", "--config", config.to_str().context("path")?])
}

fn status_json(rig: &Rig) -> Result<Value> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    Ok(report["namespaces"][0].clone())
}

/// A capture on the underlay and traffic from inside to addresses that must only ever be
/// reached through the tunnel, for as long as it lives.
struct LeakWatch {
    capture: Capture,
    _flood: Worker,
}

impl LeakWatch {
    fn start(rig: &Rig) -> Result<LeakWatch> {
        let capture = Capture::start_underlay(rig.host_fd(), &rig.host_veth)?;
        let inside = rig.confined_fd()?;
        let targets: Vec<IpAddr> = vec![
            rig.host_underlay().into(),
            rig.peer_underlay().into(),
            "198.51.100.7".parse()?,
        ];
        let flood = Worker::spawn(move || {
            let _ = Rig::within(&inside, || {
                for &ip in &targets {
                    for port in [53u16, 80, 443] {
                        let addr = SocketAddr::new(ip, port);
                        let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(50));
                        if let Ok(socket) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
                            let _ = socket.send_to(b"leak probe", addr);
                        }
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(20));
        });
        Ok(LeakWatch {
            capture,
            _flood: flood,
        })
    }

    fn assert_clean(self, during: &str) -> Result<()> {
        let frames = self.capture.frames();
        let wireguard = frames.iter().filter(|f| f.is_wireguard()).count();
        let leaks: Vec<String> = self.capture.stop().iter().filter_map(leak).collect();
        ensure!(
            leaks.is_empty(),
            "{} frame(s) other than WireGuard on the underlay during {during}: {}",
            leaks.len(),
            leaks
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        ensure!(
            wireguard > 0,
            "the capture saw no WireGuard at all during {during}: is it armed?"
        );
        Ok(())
    }
}

fn leak(frame: &Frame) -> Option<String> {
    (frame.kind != FrameKind::Arp && !frame.is_wireguard()).then(|| frame.describe())
}

fn reload_in_place() -> Result<()> {
    let mut rig = Rig::new(130)?;
    let echo = echo_server(&rig)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([{ "protocol": "tcp", "hostAddress": "127.0.0.1",
        "hostPort": 18130, "namespacePort": 8130 }]);
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    Rig::serve_tcp(&inside, "127.0.0.1:8130".parse()?, "published")?;
    let pid = confined_process(&mut rig)?;
    let mut connection = Connection::open(&inside, echo, "after up")?;
    connection.carries_data("after up")?;
    let daemon = recorded_pid(&rig, "daemon")?;
    let relay = recorded_pid(&rig, "relay")?;
    let peer_key = rig.peer_key.get_public();
    let first_handshake = handshake_of(&rig, &peer_key)?.context("no handshake after up")?;

    let watch = LeakWatch::start(&rig)?;
    // The same config again: nothing at all changes.
    let said = reload_ok(&rig, &config, "same config")?;
    ensure!(said.contains("nothing to change"), "reload said: {said}");
    ensure!(
        handshake_of(&rig, &peer_key)? == Some(first_handshake),
        "reloading the same config reset the peer's handshake"
    );
    ensure!(
        recorded_pid(&rig, "relay")? == relay,
        "the relay was restarted"
    );

    let extra_key = wireguard_control::Key::generate_private().get_public();
    config["peers"]
        .as_array_mut()
        .context("peers")?
        .push(json!({
            "publicKey": extra_key.to_base64(),
            "allowedIPs": [format!("10.200.{}.200/32", rig.id)],
        }));
    // The other peer routes 0.0.0.0/0; the new one takes a /32 of it.
    reload_ok(&rig, &config, "a peer added")?;
    let view = device(&rig)?;
    ensure!(
        view.peers.len() == 2,
        "peers on the device: {}",
        view.peers.len()
    );
    ensure!(
        handshake_of(&rig, &peer_key)? == Some(first_handshake),
        "adding a peer reset the other peer's handshake"
    );
    still_confined(&rig, pid, "after adding a peer")?;
    connection.carries_data("after adding a peer")?;

    config["peers"][0]["persistentKeepalive"] = json!(25);
    reload_ok(&rig, &config, "keepalive")?;
    let keepalive = device(&rig)?
        .peers
        .iter()
        .find(|p| p.public_key.0 == peer_key.0)
        .and_then(|p| p.keepalive);
    ensure!(
        keepalive == Some(25),
        "keepalive on the device: {keepalive:?}"
    );
    still_confined(&rig, pid, "after changing keepalive")?;
    connection.carries_data("after changing keepalive")?;

    config["mtu"] = json!(1380);
    reload_ok(&rig, &config, "mtu")?;
    let link = sh(&["ip", "-n", &rig.confined, "link", "show", &rig.confined])?;
    ensure!(link.contains(" mtu 1380 "), "the MTU after reload: {link}");
    still_confined(&rig, pid, "after changing the MTU")?;
    connection.carries_data("after changing the MTU")?;

    config["extraFirewallRules"] =
        json!("add rule inet my_table my_input tcp dport 51413 accept comment \"torrent\"");
    reload_ok(&rig, &config, "extraFirewallRules")?;
    let ruleset = String::from_utf8_lossy(
        &rig.command_in(&inside, &["nft", "list", "ruleset"])
            .output()?
            .stdout,
    )
    .into_owned();
    ensure!(ruleset.contains("51413"), "the new rule is not loaded");
    ensure!(
        ruleset.contains("wg_namespace_guard"),
        "the guard is not loaded"
    );
    still_confined(&rig, pid, "after changing extraFirewallRules")?;
    connection.carries_data("after changing extraFirewallRules")?;

    let new_dns = format!("10.200.{}.131", rig.id);
    config["dns_server"] = json!(new_dns);
    reload_ok(&rig, &config, "dns_server")?;
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", rig.confined))?;
    ensure!(
        resolv.contains(&format!("nameserver {new_dns}")),
        "resolv.conf: {resolv}"
    );
    still_confined(&rig, pid, "after changing dns_server")?;
    connection.carries_data("after changing dns_server")?;
    ensure!(
        recorded_pid(&rig, "daemon")? == daemon,
        "the WireGuard daemon was restarted"
    );
    ensure!(
        recorded_pid(&rig, "relay")? == relay,
        "the relay was restarted although publishPorts stayed"
    );

    // A changed published port restarts the relay, and only then.
    config["publishPorts"][0]["hostPort"] = json!(18131);
    reload_ok(&rig, &config, "publishPorts")?;
    ensure!(
        recorded_pid(&rig, "relay")? != relay,
        "the relay kept its old ports"
    );
    let answer = Rig::tcp_request(
        rig.host_fd(),
        "127.0.0.1:18131".parse()?,
        Duration::from_secs(5),
    )?;
    ensure!(answer == "published", "published port answered {answer:?}");
    connection.carries_data("after changing publishPorts")?;
    watch.assert_clean("the reloads")?;

    let status = status_json(&rig)?;
    let changes = status["lastReload"]["changes"]
        .as_array()
        .context("status --json has no lastReload")?;
    ensure!(
        changes
            .iter()
            .any(|c| c.as_str().is_some_and(|c| c.contains("relay"))),
        "lastReload: {changes:?}"
    );
    rig.down()?;
    rig.assert_clean()
}

fn reload_ipv6() -> Result<()> {
    let mut rig = Rig::new(136)?;
    let (peer6, mine6) = (
        format!("fd77:{}::1", rig.id).parse::<std::net::Ipv6Addr>()?,
        format!("fd77:{}::2", rig.id),
    );
    let service6 = Rig::serve_tcp(
        rig.peer_fd(),
        SocketAddr::new(peer6.into(), 8000),
        "over IPv6",
    )?;
    let mut config = rig.config()?;
    rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let pid = confined_process(&mut rig)?;
    ensure!(
        Rig::tcp_request(&inside, service6, Duration::from_secs(1)).is_err(),
        "IPv6 got through without an IPv6 address"
    );

    config["ips"] = json!([format!("{}/32", rig.confined_ip()), format!("{mine6}/128")]);
    let said = reload_ok(&rig, &config, "an IPv6 address added")?;
    ensure!(said.contains("IPv6 enabled"), "reload said: {said}");
    let answer = Rig::tcp_request(&inside, service6, Duration::from_secs(5))
        .context("TCP over IPv6 after the reload")?;
    ensure!(answer == "over IPv6", "{answer:?}");
    still_confined(&rig, pid, "after adding an IPv6 address")?;

    config["ips"] = json!([format!("{}/32", rig.confined_ip())]);
    reload_ok(&rig, &config, "the IPv6 address removed")?;
    ensure!(
        Rig::tcp_request(&inside, service6, Duration::from_secs(1)).is_err(),
        "IPv6 still gets through after its address went"
    );
    let disabled = Rig::within(&inside, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
    })??;
    ensure!(disabled.trim() == "1", "IPv6 not switched off inside again");
    still_confined(&rig, pid, "after removing the IPv6 address")?;
    rig.down()?;
    rig.assert_clean()
}

fn reload_refuses() -> Result<()> {
    let rig = Rig::new(131)?;
    let config = rig.config()?;
    rig.up_with(&config)?;
    let before = std::fs::read(format!("/run/wg-namespace/{}.json", rig.confined))?;
    let daemon = recorded_pid(&rig, "daemon")?;

    let mut kernel = config.clone();
    kernel["backend"] = json!("kernel");
    let out = reload(&rig, &kernel)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(RESTART_NEEDED) && stderr.lines().count() == 1,
        "a backend change must be refused on one line with code 5: {}",
        text(&out)
    );
    ensure!(stderr.contains("backend"), "{stderr}");

    let path = rig.write_config("renamed.json", &{
        let mut renamed = config.clone();
        renamed["namespace_name"] = json!(format!("wgt{}r", rig.id));
        renamed
    })?;
    let out = rig.helper(&[
        "reload",
        "--namespace",
        &rig.confined,
        "--config",
        path.to_str().context("path")?,
    ])?;
    ensure!(
        out.status.code() == Some(RESTART_NEEDED)
            && String::from_utf8_lossy(&out.stderr).contains("namespace_name"),
        "a name change must be refused with code 5: {}",
        text(&out)
    );
    ensure!(
        std::fs::read(format!("/run/wg-namespace/{}.json", rig.confined))? == before,
        "a refused reload changed the state file"
    );
    ensure!(recorded_pid(&rig, "daemon")? == daemon);
    ensure!(
        !std::path::Path::new(&format!("/run/netns/wgt{}r", rig.id)).exists(),
        "a refused reload made a namespace"
    );
    rig.down()?;
    rig.assert_clean()
}

fn link_index(rig: &Rig) -> Result<Option<u32>> {
    wg_namespace::system::link::Netlink::inside(rig.confined_fd()?)?.index_of(&rig.confined)
}

fn heal_in_place() -> Result<()> {
    let mut rig = Rig::new(132)?;
    let echo = echo_server(&rig)?;
    let mut config = rig.config()?;
    config["peers"][0]["persistentKeepalive"] = json!(1);
    let path = rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let pid = confined_process(&mut rig)?;
    let when = "after up";
    Connection::open(&inside, echo, when)?.carries_data(when)?;

    let out = heal(&rig, &path)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nothing to repair"),
        "heal of a healthy namespace: {}",
        text(&out)
    );

    // The interface deleted behind the helper's back.
    let watch = LeakWatch::start(&rig)?;
    let index = link_index(&rig)?.context("no interface")?;
    wg_namespace::system::link::Netlink::inside(&inside)?.delete(index)?;
    let out = heal(&rig, &path)?;
    ensure!(out.status.success(), "heal: {}", text(&out));
    let when = "after healing a deleted interface";
    Connection::open(&inside, echo, when)?.carries_data(when)?;
    still_confined(&rig, pid, "after healing a deleted interface")?;

    // The userspace daemon killed.
    let daemon = recorded_pid(&rig, "daemon")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(Duration::from_secs(5), "the daemon to be gone", || {
        ProcessId::of(daemon).is_none_or(|p| !p.is_alive())
    })?;
    let out = heal(&rig, &path)?;
    ensure!(out.status.success(), "heal: {}", text(&out));
    ensure!(recorded_pid(&rig, "daemon")? != daemon, "no new daemon");
    let when = "after healing a killed daemon";
    Connection::open(&inside, echo, when)?.carries_data(when)?;
    still_confined(&rig, pid, "after healing a killed daemon")?;

    // The guard table removed: loaded again.
    let out = rig
        .command_in(
            &inside,
            &["nft", "delete", "table", "inet", "wg_namespace_guard"],
        )
        .output()?;
    ensure!(out.status.success(), "{}", text(&out));
    let out = heal(&rig, &path)?;
    ensure!(out.status.success(), "heal: {}", text(&out));
    let listed = rig
        .command_in(
            &inside,
            &["nft", "list", "table", "inet", "wg_namespace_guard"],
        )
        .output()?;
    ensure!(listed.status.success(), "the guard was not loaded again");

    // The guard altered (an accept put in front of its drops): loaded again as rendered.
    let out = rig
        .command_in(
            &inside,
            &[
                "nft",
                "insert",
                "rule",
                "inet",
                "wg_namespace_guard",
                "output",
                "accept",
            ],
        )
        .output()?;
    ensure!(out.status.success(), "{}", text(&out));
    let out = heal(&rig, &path)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stderr).contains("ruleset reloaded"),
        "heal of an altered guard: {}",
        text(&out)
    );
    let intact = status_json(&rig)?["firewall"]["guardIntact"].clone();
    ensure!(intact == json!(true), "guardIntact after heal: {intact}");
    watch.assert_clean("the repairs")?;

    let status = status_json(&rig)?;
    let heals = status["heals"].as_array().context("no heals in status")?;
    let said: Vec<&str> = heals
        .iter()
        .flat_map(|h| h["changes"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        said.iter()
            .filter(|c| c.contains("interface recreated"))
            .count()
            == 2
            && said.iter().filter(|c| c.contains("ruleset")).count() == 2,
        "heals in status: {said:?}"
    );
    let text_status = rig.helper(&["status", "--namespace", &rig.confined])?;
    ensure!(
        String::from_utf8_lossy(&text_status.stdout).contains("healed:"),
        "{}",
        text(&text_status)
    );

    // The namespace itself gone: only a restart helps, and heal says so.
    rig.down()?;
    let out = heal(&rig, &path)?;
    ensure!(
        out.status.code() == Some(RESTART_NEEDED),
        "heal of a namespace that is not up: {}",
        text(&out)
    );
    rig.assert_clean()
}

/// Starts `reload` that stops itself just before the change `step`.
fn paused_reload(rig: &Rig, config: &str, step: &str) -> Result<Child> {
    rig.paused("reload", config, step)
}

fn reload_killed_midway() -> Result<()> {
    let rig = Rig::new(133)?;
    let service = rig.peer_service("through the tunnel")?;
    let base = rig.config()?;
    let mut changed = base.clone();
    changed["extraFirewallRules"] = json!("add rule inet my_table my_input tcp dport 6881 accept");
    changed["peers"][0]["persistentKeepalive"] = json!(5);
    changed["peers"][0]["allowedIPs"] = json!(["0.0.0.0/1", "128.0.0.0/1"]);
    changed["publishPorts"] = json!([{ "hostAddress": "127.0.0.1", "hostPort": 18133 }]);
    let changed_path = rig.write_config("changed.json", &changed)?;
    let changed_path = changed_path.to_str().context("path")?;
    for step in ["ruleset", "peers", "routes", "relay"] {
        // Killed, then reloaded again: the second reload finishes the work.
        let path = rig.up_with(&base)?;
        let mut child = paused_reload(&rig, changed_path, step)?;
        child.kill()?;
        child.wait()?;
        let out = rig.helper(&["reload", "--config", changed_path])?;
        ensure!(
            out.status.success(),
            "reload after a kill before {step}: {}",
            text(&out)
        );
        let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
        ensure!(
            answer == "through the tunnel",
            "after a kill before {step}: {answer:?}"
        );
        let again = rig.helper(&["reload", "--config", changed_path])?;
        ensure!(
            String::from_utf8_lossy(&again.stderr).contains("nothing to change"),
            "the reload after the kill before {step} left work: {}",
            text(&again)
        );
        rig.down()?;
        rig.assert_clean()
            .with_context(|| format!("down after a finished reload, kill before {step}"))?;

        // Killed, then taken down: nothing stays.
        rig.helper(&["up", "--config", path.to_str().context("path")?])?;
        let mut child = paused_reload(&rig, changed_path, step)?;
        child.kill()?;
        child.wait()?;
        rig.down()?;
        rig.assert_clean()
            .with_context(|| format!("down right after a kill before {step}"))?;
    }
    Ok(())
}

/// The health unit, refresh and a root shell have another PATH than the unit that ran `up`
/// (under NixOS, none of them has wireguard-go): `heal` must start the daemon `up` started, by
/// the file `up` found, and repair in place rather than ask for a restart (exit 5).
fn heal_without_the_daemon_on_path() -> Result<()> {
    let mut rig = Rig::new(64)?;
    let echo = echo_server(&rig)?;
    let mut config = rig.config()?;
    config["peers"][0]["persistentKeepalive"] = json!(1);
    let path = rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    let pid = confined_process(&mut rig)?;
    let mut connection = Connection::open(&inside, echo, "after up")?;
    connection.carries_data("after up")?;
    let daemon = recorded_pid(&rig, "daemon")?;
    let program = std::fs::read_link(format!("/proc/{daemon}/exe"))?;

    // A PATH with nothing but nft, which a cargo build of the helper reads the ruleset with
    // (the NixOS package runs nftables' own by its store path).
    let bin = rig.dir.join("unrelated-bin");
    std::fs::create_dir(&bin)?;
    let nft = wg_namespace::system::process::find_program("nft")?;
    std::os::unix::fs::symlink(nft, bin.join("nft"))?;

    let index = link_index(&rig)?.context("no interface")?;
    wg_namespace::system::link::Netlink::inside(&inside)?.delete(index)?;
    let out = rig
        .command_in(
            rig.host_fd(),
            &[BIN, "heal", "--config", path.to_str().context("path")?],
        )
        .env_clear()
        .env("PATH", &bin)
        .output()?;
    ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("interface recreated"),
        "heal with PATH={} ({}): {}",
        bin.display(),
        out.status,
        text(&out)
    );
    connection.carries_data("after healing with another PATH")?;
    still_confined(&rig, pid, "after healing with another PATH")?;
    let healed = recorded_pid(&rig, "daemon")?;
    ensure!(healed != daemon, "no new daemon");
    let now = std::fs::read_link(format!("/proc/{healed}/exe"))?;
    ensure!(
        now == program,
        "the new daemon runs {now:?}, up's ran {program:?}"
    );
    rig.down()?;
    rig.assert_clean()
}

fn heal_killed_midway() -> Result<()> {
    let rig = Rig::new(135)?;
    let service = rig.peer_service("through the tunnel")?;
    let path = rig.write_config("config.json", &rig.config()?)?;
    let path = path.to_str().context("path")?;
    let works = |when: &str| -> Result<()> {
        let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))
            .with_context(|| format!("the tunnel {when}"))?;
        ensure!(answer == "through the tunnel", "{when}: {answer:?}");
        Ok(())
    };
    for step in ["interface", "addresses", "routes", "rehandshake"] {
        for then in ["heal", "down"] {
            let up = rig.helper(&["up", "--config", path])?;
            ensure!(up.status.success(), "up: {}", text(&up));
            let index = link_index(&rig)?.context("no interface")?;
            wg_namespace::system::link::Netlink::inside(rig.confined_fd()?)?.delete(index)?;
            let mut child = rig.paused("heal", path, step)?;
            child.kill()?;
            child.wait()?;
            if then == "heal" {
                let out = heal(&rig, std::path::Path::new(path))?;
                ensure!(
                    out.status.success(),
                    "heal after a kill before {step}: {}",
                    text(&out)
                );
                works(&format!(
                    "after a heal killed before {step} and another heal"
                ))?;
            }
            rig.down()?;
            rig.assert_clean()
                .with_context(|| format!("down after a heal killed before {step}, then {then}"))?;
        }
    }
    Ok(())
}

fn last_good_address() -> Result<()> {
    const NAME: &str = "peer.wgns.test";
    let rig = Rig::new(134)?;
    let service = rig.peer_service("through the tunnel")?;
    let state_dir = rig.dir.join("state");
    let hosts = rig.dir.join("hosts");
    std::fs::write(&hosts, format!("{} {NAME}\n", rig.peer_underlay()))?;
    let mut config = rig.config()?;
    config["peers"][0]["endpoint"] = json!(format!("{NAME}:{WG_PORT}"));
    let path = rig.write_config("config.json", &config)?;
    let path = path.to_str().context("path")?;
    let helper = |args: &[&str]| -> Result<std::process::Output> {
        Ok(rig
            .helper_with_hosts(&hosts, args)?
            .env("STATE_DIRECTORY", &state_dir)
            .output()?)
    };
    let out = helper(&["up", "--config", path])?;
    ensure!(out.status.success(), "up: {}", text(&out));
    let cache = std::fs::read_to_string(state_dir.join("endpoints.json"))?;
    ensure!(
        cache.contains(&rig.peer_underlay().to_string()),
        "cache: {cache}"
    );
    rig.down()?;

    // The name stops resolving: up goes on with the last good address.
    std::fs::write(&hosts, "")?;
    let out = helper(&["up", "--config", path])?;
    ensure!(out.status.success(), "up without the name: {}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("last good address"),
        "up must say it used the last good address: {}",
        text(&out)
    );
    let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    ensure!(answer == "through the tunnel", "{answer:?}");

    // heal with the name still not resolving: nothing is taken down.
    let out = helper(&["heal", "--config", path])?;
    ensure!(
        out.status.success(),
        "heal without the name: {}",
        text(&out)
    );
    let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    ensure!(answer == "through the tunnel", "{answer:?}");

    // Without a cache, up still refuses a name it cannot resolve.
    rig.down()?;
    std::fs::remove_file(state_dir.join("endpoints.json"))?;
    let out = helper(&["up", "--config", path])?;
    ensure!(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("resolve"),
        "up with neither name nor cache: {}",
        text(&out)
    );
    rig.assert_clean()
}
