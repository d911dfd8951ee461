//! `up`, `down` and `exec` against real namespaces and a real WireGuard peer (wireguard-go).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![
        trial("tunnel_carries_tcp_and_ping", tunnel_carries_tcp_and_ping),
        trial(
            "socket_stays_on_host_and_namespace_holds_only_lo_and_wg",
            socket_stays_on_host,
        ),
        trial(
            "nothing_leaves_when_the_peer_is_down",
            nothing_leaves_when_the_peer_is_down,
        ),
        trial(
            "inbound_is_dropped_until_extra_rules_open_the_port",
            inbound_dropped_until_opened,
        ),
        trial(
            "exec_resolves_through_dns_server_and_runs_as_user",
            exec_dns_and_user,
        ),
        trial(
            "down_leaves_nothing_also_after_a_failed_up",
            down_leaves_nothing,
        ),
        trial(
            "down_returns_only_once_the_daemon_has_exited_and_up_follows_at_once",
            down_then_up_at_once,
        ),
        trial("up_twice_is_a_clear_error_and_harms_nothing", up_twice),
        trial("bad_configs_fail_cleanly", bad_configs),
        trial(
            "bad_conf_files_fail_with_file_and_line_and_touch_nothing",
            bad_conf_files,
        ),
        trial("boringtun_works_as_userspace_command", boringtun),
        trial("demo_works_and_cleans_up_also_on_ctrl_c", demo),
        trial(
            "extra_rules_cannot_open_the_leak_guard",
            extra_rules_cannot_open_the_guard,
        ),
        trial(
            "rulesets_load_inside_the_namespace_never_on_the_host",
            rulesets_load_inside_only,
        ),
        trial(
            "no_process_inherits_the_helpers_nftables_socket",
            no_nftables_socket_inherited,
        ),
        libtest_mimic::Trial::test("usage_errors_are_one_line_and_exit_2", || {
            usage_errors().map_err(|e| format!("{e:#}").into())
        }),
        libtest_mimic::Trial::test("import_prints_options_without_secrets", || {
            import_prints_options().map_err(|e| format!("{e:#}").into())
        }),
        libtest_mimic::Trial::test("render_matches_golden_files", || {
            render_golden().map_err(|e| format!("{e:#}").into())
        }),
    ])
}

const REPLY: &str = "hello from the peer";

fn tunnel_carries_tcp_and_ping() -> Result<()> {
    let rig = Rig::new(1)?;
    let service = rig.peer_service(REPLY)?;
    rig.up_with(&rig.config()?)?;
    let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    ensure!(answer == REPLY, "unexpected answer {answer:?}");
    let ping = rig.exec(&[
        "ping",
        "-c",
        "1",
        "-W",
        "3",
        &rig.peer_tunnel_ip().to_string(),
    ])?;
    ensure!(
        ping.status.success(),
        "ping through the tunnel failed: {}",
        text(&ping)
    );
    // `down` also takes the config file, as the module's users may call it.
    let path = rig.dir.join("config.json");
    let down = rig.helper(&["down", "--config", path.to_str().context("path")?])?;
    ensure!(down.status.success(), "down --config: {}", text(&down));
    rig.assert_clean()
}

/// Local UDP ports of the sockets in the namespace `fd` (IPv4 and IPv6).
fn udp_ports(fd: &std::os::fd::OwnedFd) -> Result<Vec<u16>> {
    Rig::within(fd, || -> Result<Vec<u16>> {
        let mut ports = Vec::new();
        for table in ["udp", "udp6"] {
            let content = std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))?;
            for line in content.lines().skip(1) {
                let local = line.split_whitespace().nth(1).unwrap_or_default();
                if let Some((_, port)) = local.rsplit_once(':') {
                    ports.push(u16::from_str_radix(port, 16)?);
                }
            }
        }
        Ok(ports)
    })?
}

fn socket_stays_on_host() -> Result<()> {
    let rig = Rig::new(2)?;
    let service = rig.peer_service(REPLY)?;
    rig.up_with(&rig.config()?)?;
    Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;

    // The peer saw the confined side's packets coming from the host's underlay address.
    let device = wireguard_control::Device::get(
        &rig.peer_if.parse().map_err(|e| anyhow!("{e:?}"))?,
        wireguard_control::Backend::Userspace,
    )?;
    let endpoint = device.peers[0]
        .config
        .endpoint
        .context("the peer has no endpoint for us")?;
    ensure!(
        endpoint.ip() == IpAddr::from(rig.host_underlay()),
        "the peer sees us at {endpoint}, not at the host's address"
    );
    let host_ports = udp_ports(rig.host_fd())?;
    ensure!(
        host_ports.contains(&endpoint.port()),
        "no UDP socket on port {} in the host namespace",
        endpoint.port()
    );
    let inside_ports = udp_ports(&rig.confined_fd()?)?;
    ensure!(
        inside_ports.is_empty(),
        "UDP sockets inside the confined namespace: {inside_ports:?}"
    );

    let links = wg_namespace::system::link::Netlink::inside(rig.confined_fd()?)?.links()?;
    let mut names: Vec<_> = links.iter().map(|l| l.name.clone()).collect();
    names.sort();
    ensure!(
        names == vec!["lo".to_string(), rig.confined.clone()],
        "links inside: {names:?}"
    );
    Ok(())
}

fn nothing_leaves_when_the_peer_is_down() -> Result<()> {
    let mut rig = Rig::new(3)?;
    let service = rig.peer_service(REPLY)?;
    rig.up_with(&rig.config()?)?;
    Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    rig.stop_peer_wg();

    let host_side = Capture::start(rig.host_fd(), &rig.host_veth)?;
    let peer_side = Capture::start(rig.peer_fd(), &rig.peer_veth)?;
    let targets: Vec<IpAddr> = vec![
        rig.peer_tunnel_ip().into(),
        rig.peer_underlay().into(),
        rig.host_underlay().into(),
        "198.51.100.7".parse()?,
        format!("fd77:{}::1", rig.id).parse()?,
    ];
    rig.flood(&rig.confined_fd()?, &targets)?;
    std::thread::sleep(Duration::from_secs(1));
    let host_frames = host_side.stop();
    let peer_frames = peer_side.stop();
    for (side, frames) in [("host", &host_frames), ("peer", &peer_frames)] {
        let leaks: Vec<String> = frames
            .iter()
            .filter(|f| f.kind != FrameKind::Arp && !f.is_wireguard())
            .map(Frame::describe)
            .collect();
        ensure!(
            leaks.is_empty(),
            "on the {side} side of the underlay: {}",
            leaks.join("; ")
        );
    }
    // The capture works: WireGuard itself kept trying to reach the peer.
    ensure!(
        host_frames
            .iter()
            .any(|f| f.is_wireguard() && f.dst == Some(rig.peer_underlay().into())),
        "the capture saw no WireGuard packet at all, so it proves nothing"
    );
    Ok(())
}

fn inbound_dropped_until_opened() -> Result<()> {
    let rig = Rig::new(4)?;
    let config = rig.config()?;
    // The peer can only send into the tunnel once it has heard from us; a probe without a
    // handshake would fail whatever the firewall does.
    let handshake = || -> Result<()> {
        let ping = rig.exec(&[
            "ping",
            "-c",
            "1",
            "-W",
            "3",
            &rig.peer_tunnel_ip().to_string(),
        ])?;
        ensure!(ping.status.success(), "no tunnel: {}", text(&ping));
        Ok(())
    };
    rig.up_with(&config)?;
    handshake()?;
    let inside = Rig::serve_tcp(&rig.confined_fd()?, "0.0.0.0:8080".parse()?, "inside")?;
    let target = SocketAddr::new(rig.confined_ip().into(), inside.port());
    let probe = Rig::tcp_request(rig.peer_fd(), target, Duration::from_secs(2));
    ensure!(
        probe.is_err(),
        "the peer reached a listener inside the namespace: {probe:?}"
    );

    rig.down()?;
    let mut opened = config.clone();
    opened["extraFirewallRules"] = json!(format!(
        "add rule inet my_table my_input tcp dport {} accept",
        inside.port()
    ));
    rig.up_with(&opened)?;
    handshake()?;
    let inside = Rig::serve_tcp(&rig.confined_fd()?, "0.0.0.0:8080".parse()?, "inside")?;
    let answer = Rig::tcp_request(
        rig.peer_fd(),
        SocketAddr::new(rig.confined_ip().into(), inside.port()),
        Duration::from_secs(5),
    )?;
    ensure!(answer == "inside", "unexpected answer {answer:?}");
    Ok(())
}

fn exec_dns_and_user() -> Result<()> {
    let mut rig = Rig::new(5)?;
    let name = "probe.wgns.test";
    let address = format!("10.200.{}.77", rig.id);
    let log = rig.dnsmasq(&[(name, &address)])?;
    let config = rig.config()?;
    let path = rig.up_with(&config)?;

    let lookup = rig.exec(&["getent", "hosts", name])?;
    ensure!(lookup.status.success(), "lookup failed: {}", text(&lookup));
    let answer = String::from_utf8_lossy(&lookup.stdout);
    ensure!(
        answer.split_whitespace().next() == Some(address.as_str()),
        "resolved to {answer:?}"
    );
    let queries = std::fs::read_to_string(&log)?;
    ensure!(
        queries.contains(&format!("query[A] {name}")),
        "dns_server never saw the query: {queries}"
    );

    let resolv = rig.exec(&["cat", "/etc/resolv.conf"])?;
    let out = rig.dir.join("rendered");
    let rendered = rig.helper(&[
        "render",
        "--config",
        path.to_str().context("path")?,
        "--out",
        out.to_str().context("path")?,
    ])?;
    ensure!(
        rendered.status.success(),
        "render failed: {}",
        text(&rendered)
    );
    ensure!(
        resolv.stdout == std::fs::read(out.join("resolv.conf"))?,
        "inside, /etc/resolv.conf is {:?}",
        String::from_utf8_lossy(&resolv.stdout)
    );

    let id = rig.exec(&["id", "-u"])?;
    ensure!(
        String::from_utf8_lossy(&id.stdout).trim() == "0",
        "root stays root: {}",
        text(&id)
    );
    let mut args = vec![
        "exec",
        "--namespace",
        &rig.confined,
        "--user",
        "nobody",
        "--",
        "id",
        "-u",
    ];
    let nobody = rig.helper(&args)?;
    ensure!(
        String::from_utf8_lossy(&nobody.stdout).trim() == "65534",
        "--user nobody ran as: {}",
        text(&nobody)
    );
    // Ordinary users may ping from inside (ICMP echo sockets, no raw socket needed).
    args.truncate(5);
    args.extend(["--", "cat", "/proc/sys/net/ipv4/ping_group_range"]);
    let range = rig.helper(&args)?;
    let range = String::from_utf8_lossy(&range.stdout);
    ensure!(
        range.split_whitespace().collect::<Vec<_>>() == ["0", "2147483647"],
        "ping_group_range {range:?}"
    );
    args.truncate(5);
    args.extend(["--", "sh", "-c", "exit 7"]);
    let status = rig.helper(&args)?;
    ensure!(
        status.status.code() == Some(7),
        "exec must return the command's status: {}",
        text(&status)
    );
    Ok(())
}

fn down_leaves_nothing() -> Result<()> {
    let rig = Rig::new(6)?;
    let config = rig.config()?;
    rig.up_with(&config)?;
    rig.down()?;
    rig.assert_clean()?;
    rig.down().context("a second down must also succeed")?;

    for (what, broken) in [
        (
            "a ruleset nft rejects",
            json!({"extraFirewallRules": "this is not nftables"}),
        ),
        (
            "a daemon that cannot start",
            json!({"userspaceCommand": "/bin/false"}),
        ),
    ] {
        let mut bad = config.clone();
        for (k, v) in broken.as_object().context("object")? {
            bad[k] = v.clone();
        }
        let path = rig.write_config("bad.json", &bad)?;
        let out = rig.helper(&["up", "--config", path.to_str().context("path")?])?;
        ensure!(
            out.status.code() == Some(1),
            "{what}: expected exit 1: {}",
            text(&out)
        );
        rig.assert_clean()
            .with_context(|| format!("after a failed up with {what}"))?;
    }
    Ok(())
}

/// `down` ends the daemon only after the namespace is gone (see `State::teardown`), and must
/// still return no sooner than the daemon's whole thread group has exited: an `up` of the same
/// config right after it needs the socket path and the interface name free.
fn down_then_up_at_once() -> Result<()> {
    use wg_namespace::system::process::ProcessId;
    let rig = Rig::new(210)?;
    let service = rig.peer_service(REPLY)?;
    let config = rig.config()?;
    rig.up_with(&config)?;
    for round in 1..=10 {
        let status = rig.helper(&["status", "--namespace", &rig.confined, "--json"])?;
        let status: Value = serde_json::from_slice(&status.stdout)
            .with_context(|| format!("status --json: {}", text(&status)))?;
        let pid = status["namespaces"][0]["daemonPid"]
            .as_u64()
            .with_context(|| format!("round {round}: no daemon pid in {status}"))?;
        let daemon = ProcessId::of(u32::try_from(pid)?)
            .with_context(|| format!("round {round}: the daemon {pid} is not running"))?;
        rig.down()?;
        // A zombie whose every thread has ended has exited; its parent reaps it when it will.
        let exited = match ProcessId::of(daemon.pid) {
            Some(now) if now == daemon => {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                status
                    .lines()
                    .any(|l| l.split_whitespace().eq(["State:", "Z", "(zombie)"]))
                    && status
                        .lines()
                        .any(|l| l.split_whitespace().eq(["Threads:", "1"]))
            }
            _ => true,
        };
        ensure!(
            exited,
            "round {round}: down returned while its daemon {pid} was still running: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
        );
        rig.assert_clean()
            .with_context(|| format!("round {round}: after down"))?;
        rig.up_with(&config)
            .with_context(|| format!("round {round}: up right after down"))?;
    }
    let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    ensure!(answer == REPLY, "unexpected answer {answer:?}");
    rig.down()?;
    rig.assert_clean()
}

fn up_twice() -> Result<()> {
    let rig = Rig::new(8)?;
    let service = rig.peer_service(REPLY)?;
    let path = rig.up_with(&rig.config()?)?;
    let again = rig.helper(&["up", "--config", path.to_str().context("path")?])?;
    ensure!(
        again.status.code() == Some(1),
        "a second up must fail: {}",
        text(&again)
    );
    let message = String::from_utf8_lossy(&again.stderr);
    ensure!(message.contains("already up"), "unclear message: {message}");
    let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    ensure!(answer == REPLY, "the namespace was harmed: {answer:?}");
    Ok(())
}

/// What a failed `up` of this rig's namespace must leave exactly as it was. Only names of this
/// rig count: other tests change the machine's namespaces and files at the same time.
fn snapshot(rig: &Rig) -> Result<Vec<String>> {
    let ours = [
        &rig.confined,
        &rig.host,
        &rig.peer,
        &rig.host_veth,
        &rig.peer_veth,
        &rig.peer_if,
    ];
    let is_ours = |name: &str| {
        let stem = name.split('.').next().unwrap_or(name);
        ours.iter().any(|o| stem == o.as_str())
    };
    let mut seen: Vec<String> = wg_namespace::system::netns::list()
        .into_iter()
        .filter(|n| is_ours(n))
        .collect();
    for dir in ["/etc/netns", "/run/wg-namespace", "/var/run/wireguard"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_ours(&name) {
                    seen.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    let links = wg_namespace::system::link::Netlink::inside(rig.host_fd())?.links()?;
    seen.extend(links.into_iter().map(|l| format!("link {}", l.name)));
    seen.extend(
        processes_mentioning(&rig.confined)
            .into_iter()
            .map(|p| format!("process {}", cmdline(p))),
    );
    seen.sort();
    Ok(seen)
}

fn bad_configs() -> Result<()> {
    let rig = Rig::new(7)?;
    let good = rig.config()?;
    let psk_file = rig.write_secret(
        "psk",
        &wireguard_control::Key::generate_preshared().to_base64(),
    )?;
    let garbage = rig.write_secret("garbage.key", "not a key\n")?;
    let open_key = rig.write_secret("open.key", &rig.confined_key.to_base64())?;
    std::fs::set_permissions(
        &open_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )?;
    let key_dir = rig.dir.join("keydir");
    std::fs::create_dir_all(&key_dir)?;
    // Root's own key, reached through a symlink that another user owns.
    let foreign_link = rig.dir.join("foreign-link.key");
    std::os::unix::fs::symlink(
        rig.write_secret("linked.key", &rig.confined_key.to_base64())?,
        &foreign_link,
    )?;
    std::os::unix::fs::lchown(&foreign_link, Some(65534), Some(65534))?;
    // Root's own key in a directory that another user owns, or that anyone may write to.
    let foreign_dir = rig.dir.join("foreign-dir");
    let open_dir = rig.dir.join("open-dir");
    let mut keys_in_dirs = Vec::new();
    for dir in [&foreign_dir, &open_dir] {
        std::fs::create_dir_all(dir)?;
        let key = dir.join("wg.key");
        std::fs::write(&key, rig.confined_key.to_base64())?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        keys_in_dirs.push(key);
    }
    std::os::unix::fs::chown(&foreign_dir, Some(65534), Some(65534))?;
    std::fs::set_permissions(
        &open_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    // A port already taken in the rig's host namespace, where the relay would listen.
    let busy = Rig::within(rig.host_fd(), || std::net::TcpListener::bind("127.0.0.1:0"))??;
    let busy_port = busy.local_addr()?.port();

    enum Input {
        Text(&'static str),
        Set(&'static str, Value),
        SetPeer(&'static str, Value),
        Remove(&'static str),
    }
    use Input::*;
    let psk = wireguard_control::Key::generate_preshared().to_base64();
    let cases: Vec<(&str, Input, i32, &str)> = vec![
        (
            "malformed JSON",
            Text("{\"dns_server\": "),
            2,
            "not valid JSON",
        ),
        ("not an object", Text("[]"), 2, "config: expected an object"),
        (
            "missing dns_server",
            Remove("dns_server"),
            2,
            "dns_server: is required",
        ),
        (
            "dns_server not an address",
            Set("dns_server", json!("dns.example")),
            2,
            "dns_server: \"dns.example\" is not an IP address",
        ),
        (
            "dns_server a number",
            Set("dns_server", json!(53)),
            2,
            "dns_server: expected a string",
        ),
        (
            "dns_server IPv6 without IPv6",
            Set("dns_server", json!("fd77::53")),
            2,
            "dns_server: fd77::53 is IPv6",
        ),
        (
            "missing privateKeyFile",
            Remove("privateKeyFile"),
            2,
            "privateKeyFile: is required",
        ),
        (
            "relative privateKeyFile",
            Set("privateKeyFile", json!("wg.key")),
            2,
            "privateKeyFile: \"wg.key\" is not an absolute path",
        ),
        (
            "unknown key",
            Set("dnsServer", json!("1.1.1.1")),
            2,
            "dnsServer: unknown key (did you mean \"dns_server\"?)",
        ),
        (
            "unknown peer key",
            SetPeer("allowedIps", json!([])),
            2,
            "peers[0].allowedIps: unknown key (did you mean \"allowedIPs\"?)",
        ),
        (
            "name too long",
            Set("namespace_name", json!("wg-namespace-toolong")),
            2,
            "namespace_name: \"wg-namespace-toolong\" is 20 bytes",
        ),
        (
            "name with a slash",
            Set("namespace_name", json!("a/b")),
            2,
            "namespace_name: \"a/b\" may only hold",
        ),
        (
            "empty name",
            Set("namespace_name", json!("")),
            2,
            "namespace_name: is empty",
        ),
        (
            "bad public key",
            SetPeer("publicKey", json!("abc=")),
            2,
            "peers[0].publicKey: \"abc=\" is not a base64 WireGuard key",
        ),
        (
            "bad preshared key",
            SetPeer("presharedKey", json!("s3cret")),
            2,
            "peers[0].presharedKey: is not a base64 WireGuard key",
        ),
        (
            "both preshared keys",
            SetPeer("presharedKeyFile", json!(psk_file)),
            2,
            "peers[0].presharedKeyFile: conflicts with presharedKey",
        ),
        (
            "CIDR prefix too long",
            SetPeer("allowedIPs", json!(["10.0.0.0/33"])),
            2,
            "peers[0].allowedIPs[0]: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "no allowed IPs",
            SetPeer("allowedIPs", json!([])),
            2,
            "peers[0].allowedIPs: is empty",
        ),
        (
            "bad interface address",
            Set("ips", json!(["10.0.0.1/40"])),
            2,
            "ips[0]: \"10.0.0.1/40\" is not a CIDR",
        ),
        (
            "ips not a list",
            Set("ips", json!("10.0.0.1/32")),
            2,
            "ips: expected a list",
        ),
        (
            "endpoint without port",
            SetPeer("endpoint", json!("10.200.7.2")),
            2,
            "peers[0].endpoint: \"10.200.7.2\" needs a port",
        ),
        (
            "endpoint port too big",
            SetPeer("endpoint", json!("10.200.7.2:70000")),
            2,
            "peers[0].endpoint: \"10.200.7.2:70000\" needs a port between 1 and 65535",
        ),
        (
            "bare IPv6 endpoint",
            SetPeer("endpoint", json!("fd77::2:51820")),
            2,
            "peers[0].endpoint: \"fd77::2:51820\" an IPv6 endpoint is written [address]:port",
        ),
        (
            "keepalive too big",
            SetPeer("persistentKeepalive", json!(70000)),
            2,
            "peers[0].persistentKeepalive: 70000 is not a whole number between 0 and 65535",
        ),
        (
            "keepalive a string",
            SetPeer("persistentKeepalive", json!("25")),
            2,
            "peers[0].persistentKeepalive: expected a whole number, got a string",
        ),
        (
            "negative refresh",
            SetPeer("dynamicEndpointRefreshSeconds", json!(-1)),
            2,
            "peers[0].dynamicEndpointRefreshSeconds: -1 is not a whole number",
        ),
        (
            "unknown backend",
            Set("backend", json!("wireguard")),
            2,
            "backend: \"wireguard\" is not one of",
        ),
        (
            "empty userspaceCommand",
            Set("userspaceCommand", json!(" ")),
            2,
            "userspaceCommand: is empty",
        ),
        (
            "publish port zero",
            Set("publishPorts", json!([{"hostPort": 0}])),
            2,
            "publishPorts[0].hostPort: 0 is not a whole number between 1 and 65535",
        ),
        (
            "publish protocol",
            Set(
                "publishPorts",
                json!([{"hostPort": 8080, "protocol": "sctp"}]),
            ),
            2,
            "publishPorts[0].protocol: \"sctp\" is not \"tcp\" or \"udp\"",
        ),
        (
            "host service to no host",
            Set(
                "hostServices",
                json!([{"hostAddress": "0.0.0.0", "hostPort": 5432}]),
            ),
            2,
            "hostServices[0].hostAddress: 0.0.0.0 is not the address of one host",
        ),
        (
            "host service idle timeout zero",
            Set(
                "hostServices",
                json!([{"hostPort": 5432, "idleTimeoutSeconds": 0}]),
            ),
            2,
            "hostServices[0].idleTimeoutSeconds: 0 is not a whole number between 1 and 86400",
        ),
        (
            "missing key file",
            Set("privateKeyFile", json!("/nonexistent/wg.key")),
            1,
            "privateKeyFile: /nonexistent/wg.key: cannot read it",
        ),
        (
            "key file is a directory",
            Set("privateKeyFile", json!(key_dir)),
            1,
            "is a directory, not a regular file",
        ),
        (
            "key file holds garbage",
            Set("privateKeyFile", json!(garbage)),
            1,
            "does not hold a base64 WireGuard key",
        ),
        (
            "world-writable key file",
            Set("privateKeyFile", json!(open_key)),
            1,
            "is writable by other users",
        ),
        (
            "key through another user's symlink",
            Set("privateKeyFile", json!(foreign_link)),
            1,
            "is owned by uid 65534, not by root; another user could point it elsewhere",
        ),
        (
            "key in another user's directory",
            Set("privateKeyFile", json!(keys_in_dirs[0])),
            1,
            "foreign-dir is owned by uid 65534, not by root",
        ),
        (
            "key in a directory anyone may write",
            Set("privateKeyFile", json!(keys_in_dirs[1])),
            1,
            "open-dir is writable by other users (mode 777)",
        ),
        (
            "dns_server unspecified",
            Set("dns_server", json!("0.0.0.0")),
            2,
            "dns_server: 0.0.0.0 is the unspecified address",
        ),
        (
            "dns_server multicast",
            Set("dns_server", json!("224.0.0.251")),
            2,
            "dns_server: 224.0.0.251 is a multicast address",
        ),
        (
            "dns_server broadcast",
            Set("dns_server", json!("255.255.255.255")),
            2,
            "dns_server: 255.255.255.255 is the broadcast address",
        ),
        (
            "dns_server link-local",
            Set("dns_server", json!("fe80::1")),
            2,
            "dns_server: fe80::1 is link-local and would need a scope",
        ),
        (
            "the same interface address twice",
            Set("ips", json!(["10.200.7.130/32", "10.200.7.130/24"])),
            2,
            "ips[1]: 10.200.7.130 is already in ips[0]",
        ),
        (
            "ruleset nft rejects",
            Set(
                "extraFirewallRules",
                json!("add rule inet my_table my_input tcp dport 22 accept\nthis is not nftables"),
            ),
            1,
            "(extraFirewallRules line 2)",
        ),
        (
            "daemon not found",
            Set("userspaceCommand", json!("/nonexistent/wireguard-go")),
            1,
            "step 4/7 (interface): starting the userspace WireGuard daemon (/nonexistent/wireguard-go): /nonexistent/wireguard-go is not an executable file",
        ),
        (
            "published port in use",
            Set("publishPorts", json!([{"hostPort": busy_port}])),
            1,
            "step 6/7 (publish): publishPorts tcp 127.0.0.1:",
        ),
    ];
    ensure!(cases.len() >= 25, "the table must hold at least 25 cases");
    let before = snapshot(&rig)?;
    let good_path = rig.write_config("good.json", &good)?;
    let check = rig.helper(&["check", "--config", good_path.to_str().context("path")?])?;
    ensure!(
        check.status.success() && check.stderr.is_empty(),
        "a good config fails check: {}",
        text(&check)
    );
    let mut failures = Vec::new();
    for (what, input, expected_code, expected) in &cases {
        let body = match input {
            Text(t) => t.to_string(),
            Set(k, v) => {
                let mut c = good.clone();
                c[*k] = v.clone();
                if *what == "both preshared keys" {
                    c["peers"][0]["presharedKey"] = json!(psk);
                }
                c.to_string()
            }
            SetPeer(k, v) => {
                let mut c = good.clone();
                c["peers"][0][*k] = v.clone();
                if *what == "both preshared keys" {
                    c["peers"][0]["presharedKey"] = json!(psk);
                }
                c.to_string()
            }
            Remove(k) => {
                let mut c = good.clone();
                c.as_object_mut().context("object")?.remove(*k);
                c.to_string()
            }
        };
        let path = rig.dir.join("case.json");
        std::fs::write(&path, body)?;
        let out = rig.helper(&["up", "--config", path.to_str().context("path")?])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("warning:"))
            .collect();
        let problem = if out.status.code() != Some(*expected_code) {
            Some(format!(
                "exit {:?}, expected {expected_code}",
                out.status.code()
            ))
        } else if lines.len() != 1 || !lines[0].starts_with("error: ") {
            Some(format!("expected one error line, got {lines:?}"))
        } else if !lines[0].contains(expected) {
            Some(format!("{:?} does not say {expected:?}", lines[0]))
        } else if lines[0].contains("s3cret") {
            Some("the error echoes a secret".into())
        } else {
            None
        };
        // `check` judges static problems exactly as `up` does.
        if *expected_code == 2 {
            let check = rig.helper(&["check", "--config", path.to_str().context("path")?])?;
            if check.status.code() != Some(2) || check.stderr != out.stderr {
                failures.push(format!("{what}: check disagrees with up: {}", text(&check)));
            }
        }
        if let Some(problem) = problem {
            failures.push(format!("{what}: {problem}"));
        }
        let after = snapshot(&rig)?;
        if after != before {
            failures.push(format!(
                "{what}: the system changed: before {before:?}, after {after:?}"
            ));
        }
    }
    drop(busy);
    ensure!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Broken wg-quick files named by `configFile`: `up` and `check` both refuse each with exit 2
/// and one line `error: <file>:<line>: <problem>`, and nothing on the system changes.
fn bad_conf_files() -> Result<()> {
    let rig = Rig::new(172)?;
    let head = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {}/32\nDNS = {}\n",
        rig.confined_key.to_base64(),
        rig.confined_ip(),
        rig.peer_tunnel_ip()
    );
    let peer = format!(
        "[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0\n",
        rig.peer_key.get_public().to_base64()
    );
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("{head}PostUp = iptables -I OUTPUT -j ACCEPT\n{peer}"),
            5,
            "PostUp runs shell commands as root",
        ),
        (
            format!("{head}PreUp = true\n{peer}"),
            5,
            "PreUp runs shell commands as root",
        ),
        (
            format!("{head}PreDown = true\n{peer}"),
            5,
            "PreDown runs shell commands as root",
        ),
        (
            format!("{head}PostDown = true\n{peer}"),
            5,
            "PostDown runs shell commands as root",
        ),
        (
            format!("{head}MTU = 9\n{peer}"),
            5,
            "MTU 9 is not a whole number between 576 and 65456",
        ),
        (
            format!("{head}Address = 10.200.172.300/32\n{peer}"),
            5,
            "Address 10.200.172.300/32 is not an address",
        ),
        (
            format!("{head}DNS = resolver.lan\n{peer}"),
            5,
            "DNS resolver.lan is not an IP address",
        ),
        (
            format!("{head}Adress = 10.0.0.1/32\n{peer}"),
            5,
            "unknown key Adress in [Interface]",
        ),
        (
            format!("{head}{peer}Endpoint = 10.200.172.2\n"),
            8,
            "Endpoint 10.200.172.2 needs a port",
        ),
        (
            format!("{head}{peer}PersistentKeepalive = 1e3\n"),
            8,
            "PersistentKeepalive 1e3 is not a whole number",
        ),
        (
            format!("{head}{peer}PresharedKey = hunter2\n"),
            8,
            "PresharedKey is not a base64 WireGuard key",
        ),
        (
            format!("{head}{peer}{peer}"),
            8,
            "appears in an earlier [Peer] too",
        ),
        (
            format!("{head}[Peer]\nAllowedIPs = 0.0.0.0/0\n"),
            5,
            "[Peer] has no PublicKey",
        ),
        (
            format!("{head}{peer}AllowedIPs = 10.0.0.0/8,\n"),
            8,
            "AllowedIPs has an empty item",
        ),
        (format!("{head}[Pier]\n"), 5, "unknown section [Pier]"),
        (
            format!("DNS = 10.0.0.1\n{head}"),
            1,
            "DNS comes before any [Interface] or [Peer]",
        ),
        (peer.clone(), 1, "has no [Interface] section"),
        (
            "[Interface]\r\nPrivateKey = hunter2\r\n".into(),
            2,
            "PrivateKey is not a base64 WireGuard key",
        ),
        (
            format!("{head}{peer}Endpoint 10.200.172.2:51820\n"),
            8,
            "Endpoint is not `Key = value`",
        ),
    ];
    ensure!(
        cases.len() >= 15,
        "the table must hold at least 15 bad files"
    );
    let before = snapshot(&rig)?;
    let conf = rig.dir.join("provider.conf");
    let config = rig.write_config(
        "from-file.json",
        &json!({"namespace_name": rig.confined, "configFile": conf, "backend": "userspace"}),
    )?;
    let config = config.to_str().context("path")?;
    let mut failures = Vec::new();
    for (body, line, problem) in &cases {
        rig.write_secret("provider.conf", body)?;
        let expected = format!("error: {}:{line}: ", conf.display());
        for command in ["up", "check"] {
            let out = rig.helper(&[command, "--config", config])?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            if out.status.code() != Some(2)
                || lines.len() != 1
                || !lines[0].starts_with(&expected)
                || !lines[0].contains(problem)
                || stderr.contains("hunter2")
            {
                failures.push(format!(
                    "{command} {body:?}: want {expected}...{problem}, got {}",
                    text(&out)
                ));
            }
        }
        let after = snapshot(&rig)?;
        if after != before {
            failures.push(format!(
                "{body:?}: the system changed: {before:?} -> {after:?}"
            ));
        }
    }
    // Control: the same document with a good file passes check, so the failures are the files'.
    rig.write_secret("provider.conf", &format!("{head}{peer}"))?;
    let out = rig.helper(&["check", "--config", config])?;
    ensure!(
        out.status.success(),
        "a good file fails check: {}",
        text(&out)
    );
    ensure!(
        failures.is_empty(),
        "{} of {} bad files were not refused cleanly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

/// boringtun-cli, when installed, must work as the userspace daemon (CI installs it). It opens
/// one TUN queue per thread, by name, after its socket answers: moving the link before the last
/// one made a twin link on the host that swallowed the replies those threads decrypted.
fn boringtun() -> Result<()> {
    let Ok(path) = which("boringtun-cli") else {
        bail!("boringtun-cli is not installed (scripts/setup installs it with cargo install)");
    };
    let rig = Rig::new(9)?;
    let service = rig.peer_service(REPLY)?;
    let mut config = rig.config()?;
    // Plain command: the helper itself must keep boringtun from dropping privileges. Many
    // threads make the window for a late queue wide.
    config["userspaceCommand"] = json!(format!("{} --threads 12", path.display()));
    rig.up_with(&config)?;
    let twin =
        wg_namespace::system::link::Netlink::inside(rig.host_fd())?.index_of(&rig.confined)?;
    ensure!(
        twin.is_none(),
        "a link {} is in the host namespace after up",
        rig.confined
    );
    // Each connection hashes to another queue and thread; every one must be answered.
    for attempt in 0..12 {
        let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))
            .with_context(|| format!("request {attempt} through boringtun"))?;
        ensure!(answer == REPLY, "unexpected answer {answer:?}");
    }
    rig.down()?;
    rig.assert_clean()
}

fn which(program: &str) -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        Path::new("/root/.cargo/bin").to_path_buf(),
        Path::new("/usr/local/bin").to_path_buf(),
    ];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found"))
}

/// `render` output, line by line, against tests/golden/<case>/.
fn render_golden() -> Result<()> {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let cases = [
        (
            "default",
            json!({
                "dns_server": "10.2.0.1",
                "ips": ["10.2.0.2/32"],
                "privateKeyFile": "/run/keys/vpn",
                "peers": [{"publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "allowedIPs": ["0.0.0.0/0"], "endpoint": "vpn.example.com:51820"}]
            }),
        ),
        (
            "several-dns",
            json!({
                "namespace_name": "mullvad",
                "dns_server": "10.64.0.1",
                "dnsServers": ["10.64.0.2", "fc00:bbbb:bbbb:bb01::1"],
                "ips": ["10.66.12.34/32", "fc00:bbbb:bbbb:bb01::3:c21/128"],
                "privateKeyFile": "/run/keys/mullvad",
                "peers": [{"publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "allowedIPs": ["0.0.0.0/0", "::/0"]}]
            }),
        ),
        (
            "extended",
            json!({
                "namespace_name": "se1",
                "dns_server": "fd00:53::1",
                "ips": ["10.2.0.2/32", "fd00:2::2/128"],
                "privateKeyFile": "/run/keys/se1",
                "strictDns": false,
                "extraFirewallRules": "add rule inet my_table my_input tcp dport 9091 accept\nadd rule inet my_table my_input udp dport 51413 accept",
                "peers": [{"publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "allowedIPs": ["0.0.0.0/0", "::/0"]}]
            }),
        ),
    ];
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let scratch = std::env::temp_dir().join(format!("wgns-render-{}", std::process::id()));
    let mut differences = Vec::new();
    for (name, config) in cases {
        let out = scratch.join(name);
        std::fs::create_dir_all(&out)?;
        let config_path = out.join("config.json");
        std::fs::write(&config_path, config.to_string())?;
        let run = std::process::Command::new(BIN)
            .args([
                "render",
                "--config",
                config_path.to_str().context("path")?,
                "--out",
                out.to_str().context("path")?,
            ])
            .output()?;
        ensure!(run.status.success(), "render {name}: {}", text(&run));
        let namespace = config["namespace_name"].as_str().unwrap_or("vpn");
        for file in [
            "resolv.conf".to_string(),
            "nsswitch.conf".to_string(),
            "hosts".to_string(),
            format!("{namespace}.nft"),
        ] {
            let actual = std::fs::read_to_string(out.join(&file))?;
            let expected_path = golden.join(name).join(&file);
            if update {
                std::fs::create_dir_all(golden.join(name))?;
                std::fs::write(&expected_path, &actual)?;
                continue;
            }
            let expected = std::fs::read_to_string(&expected_path).with_context(|| {
                format!(
                    "{} (regenerate with UPDATE_GOLDEN=1)",
                    expected_path.display()
                )
            })?;
            let (a, e): (Vec<_>, Vec<_>) = (actual.lines().collect(), expected.lines().collect());
            for i in 0..a.len().max(e.len()) {
                if a.get(i) != e.get(i) {
                    differences.push(format!(
                        "{name}/{file} line {}: expected {:?}, got {:?}",
                        i + 1,
                        e.get(i).copied().unwrap_or("<end>"),
                        a.get(i).copied().unwrap_or("<end>")
                    ));
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    ensure!(differences.is_empty(), "{}", differences.join("\n"));
    Ok(())
}

/// The demo's names are fixed; it runs here inside a namespace of its own, which plays the host.
fn demo() -> Result<()> {
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = wg_namespace::system::netns::delete("wgt-demo-host");
            let _ = sh(&["ip", "route", "del", "unreachable", "10.200.250.0/23"]);
        }
    }
    let leftovers = || -> Vec<String> {
        let mut found: Vec<String> = ["wgdemo", "wgdemo-peer"]
            .iter()
            .filter(|n| wg_namespace::system::netns::path(n).exists())
            .map(|n| format!("namespace {n}"))
            .collect();
        for path in [
            "/run/wg-namespace-demo",
            "/run/wg-namespace/wgdemo.json",
            "/etc/netns/wgdemo",
        ] {
            if Path::new(path).exists() {
                found.push(path.to_string());
            }
        }
        found.extend(
            processes_mentioning("wgdemo-p")
                .into_iter()
                .map(|p| format!("process {}", cmdline(p))),
        );
        found
    };
    ensure!(
        leftovers().is_empty(),
        "a demo is already running here: {:?}",
        leftovers()
    );
    sh(&["ip", "route", "add", "unreachable", "10.200.250.0/23"])?;
    let _guard = Guard;
    wg_namespace::system::netns::create("wgt-demo-host")?;
    let host = wg_namespace::system::netns::open("wgt-demo-host")?;
    let in_host = |args: &[&str]| {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&host);
        let mut command = std::process::Command::new(BIN);
        command.args(args);
        // SAFETY: setns between fork and exec; `host` outlives the spawn.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        command
    };
    sh(&["ip", "-n", "wgt-demo-host", "link", "set", "lo", "up"])?;

    let out = in_host(&["demo"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "demo failed: {}", text(&out));
    ensure!(
        stdout.contains("answered: \"hello from the peer, through the tunnel\""),
        "{stdout}"
    );
    ensure!(stdout.contains("from the host fails"), "{stdout}");
    ensure!(leftovers().is_empty(), "the demo left {:?}", leftovers());

    // Ctrl-C once the confined namespace is up: everything still goes.
    let mut child = in_host(&["demo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut seen = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("[up]") {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )?;
        }
    }
    let out = child.wait_with_output()?;
    ensure!(seen.contains("[up]"), "the demo never came up: {seen}");
    ensure!(
        out.status.code() == Some(1),
        "an interrupted demo must fail: {seen} {}",
        text(&out)
    );
    ensure!(
        seen.contains("[teardown]"),
        "no teardown after Ctrl-C: {seen}"
    );
    ensure!(leftovers().is_empty(), "Ctrl-C left {:?}", leftovers());
    Ok(())
}

/// extraFirewallRules that wipe the ruleset and bring their own, permissive guard table: the
/// real guard still stands, as check-leaks shows.
fn extra_rules_cannot_open_the_guard() -> Result<()> {
    let rig = Rig::new(10)?;
    let mut config = rig.config()?;
    config["extraFirewallRules"] = json!(
        "flush ruleset\n\
         table inet wg_namespace_guard {\n\
           chain output { type filter hook output priority filter - 1; policy accept; accept; }\n\
         }"
    );
    rig.up_with(&config)?;
    let out = rig.helper(&["check-leaks", "--namespace", &rig.confined])?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && !report.contains("FAIL"),
        "{}",
        text(&out)
    );
    ensure!(report.contains("PASS dns-udp-elsewhere"), "{report}");
    Ok(())
}

/// The ruleset is loaded in the helper's own process (libnftables), by a thread that enters the
/// namespace first: up, reload and heal put it into the confined namespace and leave the
/// ruleset of the namespace the helper runs in exactly as it was.
fn rulesets_load_inside_only() -> Result<()> {
    let rig = Rig::new(230)?;
    let ruleset = |fd: &std::os::fd::OwnedFd| -> Result<String> {
        let out = rig.command_in(fd, &["nft", "list", "ruleset"]).output()?;
        ensure!(out.status.success(), "nft list ruleset: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let host_before = ruleset(rig.host_fd())?;
    let check = |step: &str, rule: &str| -> Result<()> {
        let inside = ruleset(&rig.confined_fd()?)?;
        ensure!(
            inside.contains("table inet wg_namespace_guard") && inside.contains(rule),
            "after {step}, the namespace's ruleset lacks the guard or `{rule}`:\n{inside}"
        );
        let host = ruleset(rig.host_fd())?;
        ensure!(
            host == host_before,
            "after {step}, the host's ruleset changed:\n{host}"
        );
        Ok(())
    };
    let mut config = rig.config()?;
    config["extraFirewallRules"] = json!("add rule inet my_table my_input tcp dport 8081 accept");
    let path = rig.up_with(&config)?;
    check("up", "tcp dport 8081 accept")?;

    config["extraFirewallRules"] = json!("add rule inet my_table my_input tcp dport 8082 accept");
    let path_text = path.to_str().context("path")?;
    rig.write_config("config.json", &config)?;
    let out = rig.helper(&["reload", "--config", path_text])?;
    ensure!(out.status.success(), "reload: {}", text(&out));
    check("reload", "tcp dport 8082 accept")?;

    let out = rig
        .command_in(&rig.confined_fd()?, &["nft", "flush", "ruleset"])
        .output()?;
    ensure!(out.status.success(), "flush: {}", text(&out));
    let out = rig.helper(&["heal", "--config", path_text])?;
    ensure!(out.status.success(), "heal: {}", text(&out));
    check("heal", "tcp dport 8082 accept")?;
    rig.down()
}

/// A netlink socket made by root for nf_tables carries root's right to change the ruleset to
/// whoever holds it, so the one libnftables opens in the helper must not reach the processes
/// `up` starts (the daemon, the relays). Checked from the namespace's side: once `up` has
/// returned, no process holds an nf_tables socket that lives in the confined namespace.
fn no_nftables_socket_inherited() -> Result<()> {
    let rig = Rig::new(231)?;
    let mut config = rig.config()?;
    config["publishPorts"] = json!([
        {"protocol": "tcp", "hostAddress": "127.0.0.1", "hostPort": 18090, "namespacePort": 8090}
    ]);
    rig.up_with(&config)?;
    // /proc/net/netlink of the confined namespace: "sk Eth Pid Groups Rmem Wmem Dump Locks
    // Drops Inode"; Eth 12 is NETLINK_NETFILTER.
    let table = rig
        .command_in(&rig.confined_fd()?, &["cat", "/proc/net/netlink"])
        .output()?;
    let inodes: Vec<String> = String::from_utf8_lossy(&table.stdout)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&"12")).then(|| fields.last().map(|i| i.to_string()))?
        })
        .collect();
    let mut holders = Vec::new();
    for process in std::fs::read_dir("/proc")?.flatten() {
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            if inodes.iter().any(|i| target == format!("socket:[{i}]")) {
                holders.push(format!(
                    "{} ({})",
                    process.file_name().to_string_lossy(),
                    cmdline(process.file_name().to_string_lossy().parse().unwrap_or(0))
                ));
            }
        }
    }
    ensure!(
        holders.is_empty(),
        "processes holding the helper's nf_tables socket: {holders:?}"
    );
    rig.down()
}

/// `import` turns a provider's file into options a user can paste (Nix that parses, or the
/// helper's JSON that `check` accepts once the placeholder key exists), never printing a key.
fn import_prints_options() -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir().join(format!("wgns-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let write = |name: &str, text: &str| -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        Ok(path)
    };
    let private = "yHUHbtQeE0HChRwRyuYyclbyPdjKQczRwtTT+QWr31M=";
    let psk = "rVXs/Ni9tu3oDBLS4hOyAUAa1qTWVA3loR8eL20os3I=";
    let conf = write(
        "proton.conf",
        &format!(
            "[Interface]\r\n# NetShield = 1\r\nPrivateKey = {private}\r\nAddress = 10.2.0.2/32\r\n\
             DNS = 10.2.0.1\r\nListenPort = 51820\r\n\r\n[Peer]\r\nPublicKey = \
             xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\r\nPresharedKey = {psk}\r\n\
             AllowedIPs = 0.0.0.0/0\r\nEndpoint = 185.159.157.13:51820\r\n"
        ),
    )?;
    let conf = conf.to_str().context("path")?;

    let nix = std::process::Command::new(BIN)
        .args(["import", conf])
        .output()?;
    let printed = String::from_utf8_lossy(&nix.stdout);
    ensure!(nix.status.success(), "import: {}", text(&nix));
    ensure!(
        !printed.contains(private) && !printed.contains(psk),
        "import printed a secret: {printed}"
    );
    ensure!(
        printed.contains("privateKeyFile = \"/run/secrets/wireguard-private-key\";")
            && printed.contains("dns_server = \"10.2.0.1\";")
            && printed.contains("endpoint = \"185.159.157.13:51820\";"),
        "import --nix: {printed}"
    );
    ensure!(
        String::from_utf8_lossy(&nix.stderr).contains(&format!("warning: {conf}:6: ListenPort")),
        "import did not warn about ListenPort: {}",
        text(&nix)
    );
    if let Ok(parsed) = std::process::Command::new("nix-instantiate")
        .args(["--parse", "-E", &printed])
        .output()
    {
        ensure!(
            parsed.status.success(),
            "import --nix is not Nix: {}",
            text(&parsed)
        );
    }

    let json = std::process::Command::new(BIN)
        .args(["import", conf, "--json"])
        .output()?;
    ensure!(json.status.success(), "import --json: {}", text(&json));
    let mut document: Value = serde_json::from_slice(&json.stdout)?;
    document["privateKeyFile"] = json!(write("key", private)?);
    document["peers"][0]["presharedKeyFile"] = json!(write("psk", psk)?);
    let config = dir.join("imported.json");
    std::fs::write(&config, document.to_string())?;
    let check = std::process::Command::new(BIN)
        .args(["check", "--config", config.to_str().context("path")?])
        .output()?;
    ensure!(
        check.status.success(),
        "check of the imported JSON: {}",
        text(&check)
    );

    let bad = write("bad.conf", "[Interface]\nPostUp = curl x | sh\n")?;
    let out = std::process::Command::new(BIN)
        .args(["import", bad.to_str().context("path")?])
        .output()?;
    ensure!(
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).trim_end()
                == format!(
                    "error: {}:2: PostUp runs shell commands as root; wg-namespace does not run them: remove the line (firewall rules belong in extraFirewallRules)",
                    bad.display()
                ),
        "import of a file with PostUp: {}",
        text(&out)
    );
    Ok(())
}

/// Removes a scratch directory when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn usage_errors() -> Result<()> {
    for args in [
        &["up", "--confg", "x.json"][..],
        &["frobnicate"],
        &["down"],
        &["exec", "--namespace", "vpn"],
        &["status", "--namespace", "bad/name"],
        &["check", "--config", "/nonexistent/config.json"],
    ] {
        let out = std::process::Command::new(BIN).args(args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2)
                && stderr.lines().count() == 1
                && stderr.starts_with("error: "),
            "wg-namespace {}: {}",
            args.join(" "),
            text(&out)
        );
    }
    Ok(())
}
