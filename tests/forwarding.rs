//! `portForwarding`: a port the VPN provider forwards, mapped over NAT-PMP through the tunnel,
//! open in the namespace's firewall only while mapped, and handed to a command.
//!
//! The gateway is tests/common/natpmp.rs, in the peer namespace on the peer's tunnel address
//! (as ProtonVPN's is at 10.2.0.1). libnatpmp's `natpmpc` checks it first, so the helper is
//! tested against a gateway that software nobody here wrote agrees with.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::natpmp::{self, NatPmpServer};
use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![
        trial(
            "the_test_gateway_satisfies_natpmpc",
            the_test_gateway_satisfies_natpmpc,
        ),
        trial(
            "forwarded_port_follows_the_gateway",
            forwarded_port_follows_the_gateway,
        ),
        trial(
            "mapped_again_when_the_tunnel_changes",
            mapped_again_when_the_tunnel_changes,
        ),
        trial(
            "the_record_is_kept_apart_from_state_files",
            the_record_is_kept_apart_from_state_files,
        ),
        trial(
            "a_hanging_hook_neither_stops_renewals_nor_outlives_its_deadline",
            a_hanging_hook_neither_stops_renewals_nor_outlives_its_deadline,
        ),
        trial(
            "a_hook_is_killed_at_its_deadline_even_while_the_gateway_is_silent",
            a_hook_is_killed_at_its_deadline_even_while_the_gateway_is_silent,
        ),
        trial(
            "an_idle_port_forward_wakes_rarely",
            an_idle_port_forward_wakes_rarely,
        ),
        trial(
            "the_gateway_picks_neither_the_port_nor_the_renewal",
            the_gateway_picks_neither_the_port_nor_the_renewal,
        ),
        trial(
            "port_forward_refuses_configs_it_cannot_serve",
            port_forward_refuses_configs_it_cannot_serve,
        ),
    ])
}

/// The ports the test gateway hands out: first life, after a restart.
const FIRST_PORT: u16 = 40000;
const AFTER_RESTART: u16 = 50000;
/// After the mapping lapsed during a silence: the gateway's next port.
const AFTER_SILENCE: u16 = 50001;
/// The test gateway grants at most this lifetime, so renewals come every 2 s.
const LIFETIME: u32 = 4;

fn gateway(rig: &Rig) -> Result<NatPmpServer> {
    gateway_granting(rig, FIRST_PORT, LIFETIME)
}

fn gateway_granting(rig: &Rig, first_port: u16, lifetime: u32) -> Result<NatPmpServer> {
    NatPmpServer::start(
        rig.peer_fd(),
        rig.peer_tunnel_ip(),
        rig.peer_underlay(),
        first_port,
        lifetime,
    )
}

/// `natpmpc` inside the confined namespace, asking the gateway through the tunnel.
fn natpmpc(rig: &Rig, args: &[&str]) -> Result<String> {
    let gw = rig.peer_tunnel_ip().to_string();
    let mut argv = vec!["timeout", "20", "natpmpc", "-g", &gw];
    argv.extend_from_slice(args);
    let out = rig.exec(&argv)?;
    ensure!(out.status.success(), "natpmpc {args:?}: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number after `key` in natpmpc's output.
fn number_after(output: &str, key: &str) -> Result<u64> {
    let rest = output
        .split(key)
        .nth(1)
        .with_context(|| format!("no {key:?} in natpmpc's output: {output}"))?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .with_context(|| format!("no number after {key:?}: {output}"))
}

/// What natpmpc reports after "Mapped public port ".
fn mapped(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("Mapped public port "))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn the_test_gateway_satisfies_natpmpc() -> Result<()> {
    let rig = Rig::new(190)?;
    rig.up_with(&rig.config()?)?;
    let server = gateway(&rig)?;

    let public = natpmpc(&rig, &[])?;
    ensure!(
        public.contains(&format!("Public IP address : {}", rig.peer_underlay())),
        "public address request: {public}"
    );
    let first_epoch = number_after(&public, "epoch =")?;

    // ProtonVPN's own instructions: `natpmpc -a 1 0 udp 60`, then the same for tcp.
    // The lifetime asked for (60 s) is capped by the gateway. (natpmpc spells it "liftime".)
    let udp = natpmpc(&rig, &["-a", "1", "0", "udp", "60"])?;
    ensure!(
        mapped(&udp) == format!("{FIRST_PORT} protocol UDP to local port 0 liftime {LIFETIME}"),
        "udp mapping: {udp}"
    );
    let tcp = natpmpc(&rig, &["-a", "1", "0", "tcp", "60"])?;
    ensure!(
        mapped(&tcp) == format!("{FIRST_PORT} protocol TCP to local port 0 liftime {LIFETIME}"),
        "the same port for tcp: {tcp}"
    );

    server.restart(AFTER_RESTART);
    let again = natpmpc(&rig, &["-a", "1", "0", "udp", "60"])?;
    ensure!(
        mapped(&again).starts_with(&format!("{AFTER_RESTART} protocol UDP")),
        "a new port after the restart: {again}"
    );
    let epoch = number_after(&again, "epoch =")?;
    ensure!(
        epoch < first_epoch,
        "the epoch went back: {first_epoch} then {epoch}"
    );

    server.set_silent(true);
    // natpmpc would retry for two minutes; three seconds show it gets nothing.
    let out = rig.exec(&[
        "timeout",
        "3",
        "natpmpc",
        "-g",
        &rig.peer_tunnel_ip().to_string(),
    ])?;
    ensure!(
        !out.status.success(),
        "natpmpc got an answer from a silent gateway: {}",
        text(&out)
    );
    ensure!(
        server
            .seen()
            .iter()
            .all(|s| s.from.ip() == rig.confined_ip()),
        "requests came from elsewhere than the tunnel address: {:?}",
        server.seen()
    );
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// `port-forward`, as its unit runs it, with its log kept.
fn start_forwarder(rig: &mut Rig, config: &Path) -> Result<(u32, PathBuf)> {
    let log = rig.dir.join("port-forward.log");
    let child = rig
        .command_in(
            rig.host_fd(),
            &[
                BIN,
                "port-forward",
                "--config",
                config.to_str().context("path")?,
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting port-forward")?;
    Ok((rig.track(child), log))
}

fn status(rig: &Rig) -> Result<Value> {
    let out = rig.helper(&["status", "--namespace", &rig.confined, "--json"])?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status --json: {}", text(&out)))?;
    Ok(report["namespaces"][0].clone())
}

fn forwarded(status: &Value) -> Vec<(String, u64)> {
    status["forwardedPorts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["protocol"].as_str().unwrap_or_default().to_string(),
                p["port"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// The calls of the onPortChange hook so far: `<argument> <env var> <uid>`.
fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether a connection from the peer side reaches `port` on the confined address.
fn reachable(rig: &Rig, port: u16) -> Result<bool> {
    let addr = SocketAddr::new(rig.confined_ip().into(), port);
    Rig::within(rig.peer_fd(), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
    })
}

/// The hook's second call named AFTER_RESTART, which is open from the peer side while
/// FIRST_PORT is closed again.
fn moved_to_second_port(rig: &Rig, calls_log: &Path) -> Result<()> {
    ensure!(
        calls(calls_log)[1] == format!("{AFTER_RESTART} {AFTER_RESTART} 65534"),
        "hook calls: {:?}",
        calls(calls_log)
    );
    ensure!(reachable(rig, AFTER_RESTART)?, "the new port is closed");
    ensure!(!reachable(rig, FIRST_PORT)?, "the old port is still open");
    Ok(())
}

/// An onPortChange hook that logs `<argument> <env var> <uid>` to the file returned; it runs as
/// nobody and may write only its own directory.
fn hook(rig: &Rig) -> Result<(PathBuf, PathBuf)> {
    let hook_dir = rig.dir.join("hook");
    std::fs::create_dir(&hook_dir)?;
    std::os::unix::fs::chown(&hook_dir, Some(65534), Some(65534))?;
    let calls_log = hook_dir.join("calls.log");
    let hook = rig.dir.join("on-port-change");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1 $WG_NAMESPACE_FORWARDED_PORT $(id -u)\" >> {}\n",
            calls_log.display()
        ),
    )?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    Ok((hook, calls_log))
}

fn forwarding_config(rig: &Rig, hook: &Path) -> Result<Value> {
    let mut config = rig.config()?;
    config["portForwarding"] = json!({
        "gateway": rig.peer_tunnel_ip().to_string(),
        "lifetimeSeconds": 60,
        "onPortChange": hook,
    });
    Ok(config)
}

fn forwarded_port_follows_the_gateway() -> Result<()> {
    let mut rig = Rig::new(191)?;
    let server = gateway(&rig)?;
    let underlay = Capture::start_underlay(rig.host_fd(), &rig.host_veth)?;
    let tunnel = Capture::start_tunnel(rig.peer_fd(), &rig.peer_if)?;
    let (hook, calls_log) = hook(&rig)?;
    let path = rig.up_with(&forwarding_config(&rig, &hook)?)?;
    let inside = rig.confined_fd()?;
    for port in [FIRST_PORT, AFTER_RESTART, AFTER_SILENCE, 40001] {
        Rig::serve_tcp(
            &inside,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
            "torrent client",
        )?;
    }
    let (forwarder, daemon_log) = start_forwarder(&mut rig, &path)?;

    // First mapping: the hook once, with the port, as nobody; the port open, no other.
    wait_for(Duration::from_secs(20), "the first mapping", || {
        calls(&calls_log).len() == 1
    })?;
    ensure!(
        calls(&calls_log) == [format!("{FIRST_PORT} {FIRST_PORT} 65534")],
        "hook calls: {:?}",
        calls(&calls_log)
    );
    let report = status(&rig)?;
    let both = vec![
        ("udp".to_string(), u64::from(FIRST_PORT)),
        ("tcp".to_string(), u64::from(FIRST_PORT)),
    ];
    ensure!(
        forwarded(&report) == both,
        "status: {report:#}\nport-forward said: {}",
        std::fs::read_to_string(&daemon_log)?
    );
    ensure!(
        report["portForwarding"]["phase"] == "mapped" && report["verdict"] == "healthy",
        "status: {report:#}"
    );
    let record = record_path(&rig.confined);
    let meta = std::fs::symlink_metadata(&record)?;
    ensure!(
        meta.permissions().mode() & 0o777 == 0o644,
        "{} is readable by other units",
        record.display()
    );
    let text_status = rig.helper(&["status", "--namespace", &rig.confined])?;
    let shown = String::from_utf8_lossy(&text_status.stdout).into_owned();
    ensure!(
        shown.contains(&format!("forwarded: udp {FIRST_PORT}")),
        "status text: {shown}"
    );
    ensure!(reachable(&rig, FIRST_PORT)?, "the forwarded port is closed");
    ensure!(
        !reachable(&rig, 40001)?,
        "a port that is not forwarded is open"
    );
    ensure!(
        !reachable(&rig, AFTER_RESTART)?,
        "a port that is not forwarded yet is open"
    );

    // Renewals (every 2 s) keep the port and leave the hook alone.
    let requests_before = server.seen().len();
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        server.seen().len() >= requests_before + 4,
        "no renewals: {} requests before, {} after",
        requests_before,
        server.seen().len()
    );
    ensure!(
        calls(&calls_log).len() == 1,
        "hook calls: {:?}",
        calls(&calls_log)
    );
    ensure!(forwarded(&status(&rig)?) == both, "the port moved");

    // The gateway restarts: a new epoch and another port.
    server.restart(AFTER_RESTART);
    wait_for(
        Duration::from_secs(20),
        "the mapping after the restart",
        || calls(&calls_log).len() == 2,
    )?;
    moved_to_second_port(&rig, &calls_log)?;
    let log = std::fs::read_to_string(&daemon_log)?;
    ensure!(
        log.contains("restarted"),
        "the epoch going back was not noticed: {log}"
    );

    // The gateway falls silent: degraded with a reason, the port closes when its mapping
    // ends, and the retries back off.
    server.set_silent(true);
    let silent_since = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "status to show the failure",
        || {
            status(&rig).is_ok_and(|s| {
                s["verdict"] == "degraded"
                    && s["portForwarding"]["phase"] == "retrying"
                    && s["reasons"].as_array().is_some_and(|r| {
                        r.iter()
                            .any(|r| r.as_str().unwrap_or("").contains("did not answer"))
                    })
            })
        },
    )?;
    wait_for(Duration::from_secs(20), "status to show no port", || {
        status(&rig).is_ok_and(|s| forwarded(&s).is_empty())
    })?;
    // The process closes it at the same instant, give or take its one-second turn.
    wait_for(Duration::from_secs(3), "the expired port to close", || {
        !reachable(&rig, AFTER_RESTART).unwrap_or(true)
    })?;
    std::thread::sleep(Duration::from_secs(12).saturating_sub(silent_since.elapsed()));
    let unanswered: Vec<Instant> = server
        .seen()
        .iter()
        .filter(|s| !s.answered)
        .map(|s| s.at)
        .collect();
    let span = silent_since.elapsed().as_secs_f64();
    ensure!(
        unanswered.len() >= 3 && (unanswered.len() as f64) < span * 2.0,
        "{} requests in {span:.1}s of silence: no retries, or a tight loop",
        unanswered.len()
    );
    let busiest_second = unanswered
        .iter()
        .map(|&t| {
            unanswered
                .iter()
                .filter(|&&u| u >= t && u < t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    ensure!(
        busiest_second <= 4,
        "{busiest_second} requests within one second"
    );

    // It answers again: mapped anew (the old mapping lapsed, so another port), the hook runs.
    server.set_silent(false);
    wait_for(Duration::from_secs(30), "recovery", || {
        calls(&calls_log).len() == 3
            && status(&rig).is_ok_and(|s| s["portForwarding"]["phase"] == "mapped")
    })?;
    ensure!(
        calls(&calls_log)[2] == format!("{AFTER_SILENCE} {AFTER_SILENCE} 65534"),
        "hook calls: {:?}",
        calls(&calls_log)
    );
    let port = AFTER_SILENCE;
    ensure!(reachable(&rig, port)?, "the port after recovery is closed");
    ensure!(status(&rig)?["verdict"] == "healthy", "{:#}", status(&rig)?);

    // The NAT-PMP exchange went only through the tunnel.
    let frames = underlay.stop();
    ensure!(
        frames
            .iter()
            .all(|f| f.sport != natpmp::PORT && f.dport != natpmp::PORT),
        "NAT-PMP seen on the underlay"
    );
    ensure!(
        frames.iter().any(Frame::is_wireguard),
        "no WireGuard on the underlay at all"
    );
    let inner = tunnel.stop();
    ensure!(
        inner
            .iter()
            .any(|f| f.dport == natpmp::PORT && f.src == Some(rig.confined_ip().into())),
        "no NAT-PMP request came out of the tunnel"
    );

    // Stopping closes the port and removes the record.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(forwarder as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    wait_for(Duration::from_secs(10), "port-forward to stop", || {
        !record.exists()
    })?;
    ensure!(
        !reachable(&rig, port)?,
        "the port is open after port-forward stopped"
    );
    let report = status(&rig)?;
    ensure!(
        report["verdict"] == "degraded"
            && forwarded(&report).is_empty()
            && report["reasons"]
                .to_string()
                .contains("no port-forward process reports"),
        "status after port-forward stopped: {report:#}"
    );
    rig.kill_tracked(forwarder);
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// What heal, reload and failover do to a tunnel, and a namespace made anew: each time the port
/// is asked for again at once (renewals are 30 s apart here), and a ruleset loaded from scratch
/// keeps the open port.
fn mapped_again_when_the_tunnel_changes() -> Result<()> {
    let mut rig = Rig::new(192)?;
    let server = gateway_granting(&rig, FIRST_PORT, 60)?;
    let (hook, calls_log) = hook(&rig)?;
    let path = rig.up_with(&forwarding_config(&rig, &hook)?)?;
    let listen = |rig: &Rig| -> Result<()> {
        let inside = rig.confined_fd()?;
        for port in [FIRST_PORT, AFTER_RESTART] {
            Rig::serve_tcp(
                &inside,
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                "torrent client",
            )?;
        }
        Ok(())
    };
    listen(&rig)?;
    let (forwarder, daemon_log) = start_forwarder(&mut rig, &path)?;
    wait_for(Duration::from_secs(20), "the first mapping", || {
        calls(&calls_log).len() == 1
    })?;
    ensure!(reachable(&rig, FIRST_PORT)?, "the forwarded port is closed");

    // Failover to another server (another key; its gateway knows nothing of our mapping and
    // hands out other ports), done as failover does it: the switch recorded in the state file,
    // then one device update.
    drop(server);
    rig.stop_peer_wg();
    let old_key = rig.peer_key.get_public().to_base64();
    rig.peer_key = wireguard_control::Key::generate_private();
    rig.start_peer_wg()?;
    let server = gateway_granting(&rig, AFTER_RESTART, 60)?;
    let new_key = rig.peer_key.get_public().to_base64();
    let endpoint = format!("{}:{WG_PORT}", rig.peer_underlay());
    let changed_at = Instant::now();
    wg_namespace::system::state::State::load(&rig.confined)?
        .context("no state file")?
        .save()?;
    let out = rig
        .command_in(
            rig.host_fd(),
            &[
                "wg",
                "set",
                &rig.confined,
                "peer",
                &old_key,
                "remove",
                "peer",
                &new_key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                "0.0.0.0/0",
            ],
        )
        .output()?;
    ensure!(out.status.success(), "wg set: {}", text(&out));
    wait_for(
        Duration::from_secs(10),
        "the mapping after the change",
        || calls(&calls_log).len() == 2,
    )?;
    ensure!(
        changed_at.elapsed() < Duration::from_secs(10),
        "mapped again only at the renewal"
    );
    moved_to_second_port(&rig, &calls_log)?;

    // A reload replaces the whole ruleset; what `render` writes keeps the forwarded port.
    let out_dir = rig.dir.join("rendered");
    let out = rig.helper(&[
        "render",
        "--config",
        path.to_str().context("path")?,
        "--out",
        out_dir.to_str().context("path")?,
    ])?;
    ensure!(out.status.success(), "render: {}", text(&out));
    let ruleset = std::fs::read_to_string(out_dir.join(format!("{}.nft", rig.confined)))?;
    let elements = format!("elements = {{ udp . {AFTER_RESTART}, tcp . {AFTER_RESTART} }}");
    ensure!(
        ruleset.contains(&elements),
        "the rendered ruleset lacks {elements}"
    );

    // A reload of the same config: the moved port alone is no reason to load the ruleset.
    let reload = |rig: &Rig, config: &Value| -> Result<Value> {
        let path = rig.write_config("config.json", config)?;
        let out = rig.helper(&["reload", "--config", path.to_str().context("path")?])?;
        ensure!(out.status.success(), "reload: {}", text(&out));
        Ok(status(rig)?["lastReload"]["changes"].clone())
    };
    let changes = reload(&rig, &forwarding_config(&rig, &hook)?)?;
    ensure!(
        !changes.to_string().contains("ruleset"),
        "a reload without changes loaded the ruleset: {changes}"
    );
    // A reload that does load it (flush ruleset and all) keeps the port open, even with
    // port-forward unable to put it back.
    let mut changed = forwarding_config(&rig, &hook)?;
    changed["extraFirewallRules"] = "add table inet scratch".into();
    let stop =
        |signal| nix::sys::signal::kill(nix::unistd::Pid::from_raw(forwarder as i32), signal);
    stop(nix::sys::signal::Signal::SIGSTOP)?;
    let changes = reload(&rig, &changed);
    let open = reachable(&rig, AFTER_RESTART);
    stop(nix::sys::signal::Signal::SIGCONT)?;
    let changes = changes?;
    ensure!(
        changes.to_string().contains("ruleset"),
        "the ruleset was not reloaded: {changes}"
    );
    ensure!(open?, "the reload closed the forwarded port");
    ensure!(
        !reachable(&rig, FIRST_PORT)?,
        "the reload opened another port"
    );

    // Heal rebuilds a deleted interface in place (a new ifindex): mapped again at once, and
    // since the gateway kept the port, the hook is left alone.
    let asked_before = server.seen().len();
    let calls_before = calls(&calls_log).len();
    let confined = rig.confined.clone();
    let out = rig
        .command_in(&rig.confined_fd()?, &["ip", "link", "del", &confined])
        .output()?;
    ensure!(out.status.success(), "ip link del: {}", text(&out));
    let out = rig.helper(&["heal", "--namespace", &confined])?;
    ensure!(out.status.success(), "heal: {}", text(&out));
    wait_for(Duration::from_secs(8), "a request after the heal", || {
        server.seen().len() > asked_before
    })?;
    wait_for(Duration::from_secs(8), "the port after the heal", || {
        reachable(&rig, AFTER_RESTART).unwrap_or(false)
    })?;
    ensure!(
        calls(&calls_log).len() == calls_before,
        "the hook ran again for the same port: {:?}",
        calls(&calls_log)
    );

    // The namespace made anew (down, up) under the running process: it follows, maps again and
    // tells the application, which restarted with the namespace.
    rig.down()?;
    rig.up_with(&forwarding_config(&rig, &hook)?)?;
    listen(&rig)?;
    wait_for(
        Duration::from_secs(15),
        "the mapping in the new namespace",
        || calls(&calls_log).len() == 3 && reachable(&rig, AFTER_RESTART).unwrap_or(false),
    )
    .with_context(|| {
        format!(
            "port-forward said: {}",
            std::fs::read_to_string(&daemon_log).unwrap_or_default()
        )
    })?;
    ensure!(!reachable(&rig, FIRST_PORT)?, "another port is open");

    rig.kill_tracked(forwarder);
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// Where `port-forward` keeps its record for other units.
fn record_path(namespace: &str) -> PathBuf {
    Path::new("/run/wg-namespace/forwarding").join(format!("{namespace}.json"))
}

/// Downs a namespace the rig does not know of, on failure too.
struct Extra(String);

impl Drop for Extra {
    fn drop(&mut self) {
        let _ = run_cmd(&[BIN, "down", "--namespace", &self.0]);
    }
}

/// Namespaces listed by plain `status --json`.
fn listed_namespaces(rig: &Rig) -> Result<Vec<String>> {
    let out = rig.helper(&["status", "--json"])?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status --json: {}", text(&out)))?;
    Ok(report["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["namespace"].as_str().map(str::to_string))
        .collect())
}

/// A namespace `<ns>.forwarding` next to `<ns>`: the record of `<ns>` is no namespace for plain
/// `status`, leaves the other's state file alone, and `down` of one removes only its own files.
fn the_record_is_kept_apart_from_state_files() -> Result<()> {
    let mut rig = Rig::new(70)?;
    // Short enough that `<name>.forwarding` is still a valid interface name.
    rig.confined = "r70".into();
    let neighbour = format!("{}.forwarding", rig.confined);
    let server = gateway(&rig)?;
    let (hook, calls_log) = hook(&rig)?;
    let path = rig.up_with(&forwarding_config(&rig, &hook)?)?;
    let (forwarder, daemon_log) = start_forwarder(&mut rig, &path)?;
    wait_for(Duration::from_secs(20), "the first mapping", || {
        calls(&calls_log).len() == 1
    })?;
    ensure!(
        record_path(&rig.confined).exists(),
        "no record at {}; port-forward said: {}",
        record_path(&rig.confined).display(),
        std::fs::read_to_string(&daemon_log)?
    );
    let listed = listed_namespaces(&rig)?;
    ensure!(
        listed.contains(&rig.confined) && !listed.contains(&neighbour),
        "plain status lists {listed:?}"
    );

    // The neighbour comes up beside the running port-forward; the gateway then moves the port,
    // so the record is written again.
    let _neighbour_guard = Extra(neighbour.clone());
    let mut config = rig.config()?;
    config["namespace_name"] = neighbour.clone().into();
    config["ips"] = json!(["10.200.70.77/32"]);
    let neighbour_config = rig.write_config("neighbour.json", &config)?;
    let out = rig.helper(&["up", "--config", neighbour_config.to_str().context("path")?])?;
    ensure!(out.status.success(), "up {neighbour}: {}", text(&out));
    let state_file = Path::new("/run/wg-namespace").join(format!("{neighbour}.json"));
    let state_before = std::fs::read(&state_file)?;
    server.restart(AFTER_RESTART);
    wait_for(
        Duration::from_secs(20),
        "the mapping after the restart",
        || calls(&calls_log).len() == 2,
    )?;
    ensure!(
        std::fs::read(&state_file)? == state_before
            && std::fs::metadata(&state_file)?.permissions().mode() & 0o777 == 0o600,
        "{} was written over",
        state_file.display()
    );

    // port-forward dies without removing its record; down removes the record, and nothing of
    // the neighbour.
    rig.kill_tracked(forwarder);
    rig.down()?;
    ensure!(
        !record_path(&rig.confined).exists(),
        "down left the record behind"
    );
    ensure!(
        std::fs::read(&state_file)? == state_before,
        "down of {} touched {}",
        rig.confined,
        state_file.display()
    );
    let out = rig.helper(&["status", "--namespace", &neighbour, "--json"])?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status of {neighbour}: {}", text(&out)))?;
    ensure!(
        report["namespaces"][0]["namespace"] == neighbour.as_str()
            && report["namespaces"][0]["interface"]["present"] == true,
        "the neighbour after down of {}: {report:#}",
        rig.confined
    );
    let out = rig.helper(&["down", "--namespace", &neighbour])?;
    ensure!(out.status.success(), "down {neighbour}: {}", text(&out));
    drop(server);
    rig.assert_clean()
}

/// The processes (by PID and start time, as the host sees them) that the hook below wrote down.
fn hook_processes(pids: &Path) -> Vec<wg_namespace::system::process::ProcessId> {
    std::fs::read_to_string(pids)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let pid = fields.next()?.parse().ok()?;
            let start_time = fields.next()?.parse().ok()?;
            Some(wg_namespace::system::process::ProcessId { pid, start_time })
        })
        .collect()
}

/// The record's phase and the earliest expiry of its ports, as `port-forward` wrote it.
fn record_expiry(namespace: &str) -> Option<(String, Option<u64>)> {
    let record: Value =
        serde_json::from_slice(&std::fs::read(record_path(namespace)).ok()?).ok()?;
    let earliest = record["ports"]
        .as_array()?
        .iter()
        .filter_map(|p| p["expiresAt"].as_u64())
        .min();
    Some((record["phase"].as_str()?.to_string(), earliest))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A hook that hangs past its 60 s deadline the first time, having started a process in the
/// background, and returns at once (leaving another such process) after that. Meanwhile the
/// renewals (every 2 s) go on, the record never shows a lapsed mapping as mapped, and the
/// retry and a port granted again do not run the hook more than once per port. Whatever the
/// hook started is gone when it is killed, and when it returns.
fn a_hanging_hook_neither_stops_renewals_nor_outlives_its_deadline() -> Result<()> {
    let mut rig = Rig::new(71)?;
    let server = gateway(&rig)?;
    let hook_dir = rig.dir.join("hook");
    std::fs::create_dir(&hook_dir)?;
    std::os::unix::fs::chown(&hook_dir, Some(65534), Some(65534))?;
    let calls_log = hook_dir.join("calls.log");
    let pids = hook_dir.join("pids");
    let hook = rig.dir.join("on-port-change");
    // `read ... < /proc/self/stat` in the shell itself: its PID and start time as the host
    // sees them (fields 1 and 22), whatever PID namespace it runs in.
    let me = r#"read -r pid _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ start _ < /proc/self/stat; echo "$pid $start" >> "$dir/pids""#;
    std::fs::write(
        &hook,
        format!(
            r#"#!/bin/sh
export dir={dir}
echo "$1" >> "$dir/calls.log"
{me}
sh -c '{me}; exec sleep 600' &
calls=$(wc -l < "$dir/calls.log")
# Until the background process has written itself down.
while [ "$(wc -l < "$dir/pids")" -lt $((calls * 2)) ]; do sleep 0.1; done
if [ "$calls" -eq 1 ]; then exec sleep 600; fi
"#,
            dir = hook_dir.display(),
        ),
    )?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    let path = rig.up_with(&forwarding_config(&rig, &hook)?)?;
    let (forwarder, daemon_log) = start_forwarder(&mut rig, &path)?;
    let log = || std::fs::read_to_string(&daemon_log).unwrap_or_default();

    wait_for(
        Duration::from_secs(20),
        "the hook and its background process",
        || hook_processes(&pids).len() == 2,
    )
    .with_context(|| format!("port-forward said: {}", log()))?;
    let first = hook_processes(&pids);
    ensure!(
        first.iter().all(|p| p.is_alive()),
        "the hook's processes are not running: {first:?}"
    );
    let hanging_since = Instant::now();
    let requests_before = server.seen().len();
    let mut lapsed_yet_mapped = Vec::new();
    // Past the deadline (60 s) and the first retry (5 s later).
    wait_for(Duration::from_secs(80), "the hook's second run", || {
        if let Some((phase, Some(earliest))) = record_expiry(&rig.confined)
            && phase == "mapped"
            && earliest < unix_now()
        {
            lapsed_yet_mapped.push((unix_now(), earliest));
        }
        std::thread::sleep(Duration::from_millis(200));
        calls(&calls_log).len() >= 2
    })
    .with_context(|| format!("port-forward said: {}", log()))?;
    let hung_for = hanging_since.elapsed();
    ensure!(
        hung_for >= Duration::from_secs(55),
        "the hook was killed after {hung_for:?}, before its deadline"
    );
    ensure!(
        lapsed_yet_mapped.is_empty(),
        "the record said mapped with a lapsed port (now, expiresAt): {lapsed_yet_mapped:?}"
    );
    let times: Vec<Instant> = server.seen()[requests_before..]
        .iter()
        .map(|s| s.at)
        .collect();
    let longest_gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(hung_for);
    ensure!(
        times.len() >= 40 && longest_gap < Duration::from_millis(3500),
        "{} requests while the hook hung for {hung_for:?}, {longest_gap:?} the longest pause (renewals are due every 2s)",
        times.len()
    );
    let left: Vec<_> = first.iter().filter(|p| p.is_alive()).collect();
    ensure!(
        left.is_empty(),
        "the killed hook's processes are still running: {left:?}"
    );
    ensure!(
        log().contains("killed it and all it started"),
        "no word of the kill: {}",
        log()
    );

    // The second run returns at once; what it left in the background goes with it.
    wait_for(
        Duration::from_secs(10),
        "the second run's processes",
        || hook_processes(&pids).len() == 4,
    )?;
    let second = hook_processes(&pids)[2..].to_vec();
    wait_for(
        Duration::from_secs(5),
        "the second run's processes to end",
        || second.iter().all(|p| !p.is_alive()),
    )?;
    wait_for(Duration::from_secs(5), "the hook's success", || {
        log().contains("succeeded")
    })?;
    // Renewals of the same port, the hook left alone.
    std::thread::sleep(Duration::from_secs(6));
    ensure!(
        calls(&calls_log) == [FIRST_PORT.to_string(), FIRST_PORT.to_string()],
        "hook calls: {:?}",
        calls(&calls_log)
    );
    let report = status(&rig)?;
    ensure!(
        report["verdict"] == "healthy" && report["portForwarding"]["phase"] == "mapped",
        "status: {report:#}"
    );

    // A new port: one more run.
    server.restart(AFTER_RESTART);
    wait_for(Duration::from_secs(20), "the run for the new port", || {
        calls(&calls_log).len() == 3
    })?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        calls(&calls_log)[2..] == [AFTER_RESTART.to_string()],
        "hook calls: {:?}",
        calls(&calls_log)
    );
    rig.kill_tracked(forwarder);
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// A hook that hangs is killed at its deadline (60 s) even when port-forward is then in the
/// middle of a request round to a gateway that went silent. The gateway goes silent just
/// before the renewal 5.2 to 2.7 s before the deadline: that round gives up when the mapping
/// lapses, 1.5 s later; the next, a second after, waits the full 3.75 s for an answer, across
/// the deadline.
fn a_hook_is_killed_at_its_deadline_even_while_the_gateway_is_silent() -> Result<()> {
    let mut rig = Rig::new(238)?;
    let server = gateway(&rig)?;
    let hook_dir = rig.dir.join("hook");
    std::fs::create_dir(&hook_dir)?;
    std::os::unix::fs::chown(&hook_dir, Some(65534), Some(65534))?;
    let pids = hook_dir.join("pids");
    let hook = rig.dir.join("on-port-change");
    std::fs::write(
        &hook,
        format!(
            r#"#!/bin/sh
read -r pid _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ start _ < /proc/self/stat
echo "$pid $start" >> {pids}
exec sleep 600
"#,
            pids = pids.display()
        ),
    )?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    let path = rig.up_with(&forwarding_config(&rig, &hook)?)?;
    let (forwarder, daemon_log) = start_forwarder(&mut rig, &path)?;
    let log = || std::fs::read_to_string(&daemon_log).unwrap_or_default();

    let mut hooked = Vec::new();
    wait_for(Duration::from_secs(20), "the hook", || {
        hooked = hook_processes(&pids);
        !hooked.is_empty()
    })
    .with_context(|| format!("port-forward said: {}", log()))?;
    // The hook's deadline is 60 s from a moment just before this one.
    let started = Instant::now();
    let hook = hooked[0];
    let after = |ms: u64| started + Duration::from_millis(ms);
    // Renewals start every 2.5 s or so (2 s after the last round, which takes two answers, each
    // read 250 ms after its request): the one 5.2 to 2.7 s before the deadline is found from the
    // last few.
    std::thread::sleep(after(52_500).saturating_duration_since(Instant::now()));
    let renewals: Vec<Instant> = server
        .seen()
        .iter()
        .filter(|s| s.answered && s.opcode == 1)
        .map(|s| s.at)
        .collect();
    ensure!(renewals.len() >= 5, "renewals: {renewals:?}");
    let last = renewals[renewals.len() - 1];
    let period = (last - renewals[renewals.len() - 5]) / 4;
    let mut next = last;
    while next < after(54_800) {
        next += period;
    }
    std::thread::sleep(
        (next - Duration::from_millis(600)).saturating_duration_since(Instant::now()),
    );
    server.set_silent(true);
    let give_up = Instant::now() + Duration::from_secs(20);
    while hook.is_alive() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed_after = started.elapsed();
    ensure!(
        !hook.is_alive(),
        "the hook still runs after {killed_after:?}"
    );
    let silence = server
        .seen()
        .iter()
        .find(|s| !s.answered)
        .map(|s| s.at.saturating_duration_since(started));
    ensure!(
        silence.is_some_and(
            |at| at >= Duration::from_millis(54_800) && at < Duration::from_millis(57_400)
        ),
        "the first unanswered request came {silence:?} after the hook, not 5.2 to 2.7 s before \
         its deadline (renewals every {period:?})"
    );
    ensure!(
        killed_after >= Duration::from_secs(59),
        "the hook was killed after {killed_after:?}, before its deadline"
    );
    ensure!(
        killed_after < Duration::from_millis(60_500),
        "the hook was killed {killed_after:?} after it started, not at its deadline (60 s); the \
         gateway fell silent {silence:?} after it; port-forward said: {}",
        log()
    );
    wait_for(Duration::from_secs(10), "word of the kill", || {
        log().contains("did not finish within 60s; killed it and all it started")
    })
    .with_context(|| format!("port-forward said: {}", log()))?;
    rig.kill_tracked(forwarder);
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// Mapped with ProtonVPN's 60 s lifetime and left alone for a minute, `port-forward` wakes for
/// its two renewals and little else (issue 22: it woke every second).
fn an_idle_port_forward_wakes_rarely() -> Result<()> {
    let mut rig = Rig::new(72)?;
    let server = gateway_granting(&rig, FIRST_PORT, 60)?;
    let (hook, calls_log) = hook(&rig)?;
    let path = rig.up_with(&forwarding_config(&rig, &hook)?)?;
    let (forwarder, _) = start_forwarder(&mut rig, &path)?;
    wait_for(Duration::from_secs(20), "the first mapping", || {
        calls(&calls_log).len() == 1
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let before = wakeups(forwarder)?;
    let requests_before = server.seen().len();
    std::thread::sleep(Duration::from_secs(60));
    let woke = wakeups(forwarder)? - before;
    let renewals = server.seen().len() - requests_before;
    eprintln!("port-forward woke {woke} times in 60s idle ({renewals} requests)");
    ensure!(
        renewals >= 2,
        "{renewals} requests in 60s: the renewals stopped"
    );
    ensure!(woke <= 12, "port-forward woke {woke} times in 60s idle");
    rig.kill_tracked(forwarder);
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// Whether status shows port forwarding degraded with a reason containing `words`.
fn degraded_because(rig: &Rig, words: &str) -> bool {
    status(rig).is_ok_and(|s| {
        s["verdict"] == "degraded"
            && s["portForwarding"]["phase"] == "retrying"
            && s["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r.as_str().unwrap_or("").contains(words)))
    })
}

/// A granted port below 1024, or one a relay serves (publishPorts' namespacePort here), is
/// not opened and not handed to the hook; a lifetime longer than asked is renewed as if it
/// were the one asked for, so that a gateway restart is noticed at the next renewal.
fn the_gateway_picks_neither_the_port_nor_the_renewal() -> Result<()> {
    const ASKED: u64 = 6;
    let mut rig = Rig::new(73)?;
    // The first port the gateway grants is the published service's.
    let server = gateway_granting(&rig, FIRST_PORT, 60)?;
    let (hook, calls_log) = hook(&rig)?;
    // Not nobody: the relays of publishPorts run as nobody here.
    std::os::unix::fs::chown(rig.dir.join("hook"), Some(1), Some(1))?;
    let mut config = forwarding_config(&rig, &hook)?;
    config["portForwarding"]["onPortChangeUser"] = "daemon".into();
    config["portForwarding"]["lifetimeSeconds"] = ASKED.into();
    config["publishPorts"] = json!([{ "protocol": "tcp", "hostAddress": "127.0.0.1",
        "hostPort": 18173, "namespacePort": FIRST_PORT }]);
    let path = rig.up_with(&config)?;
    let inside = rig.confined_fd()?;
    for port in [FIRST_PORT, 1000, 45000] {
        Rig::serve_tcp(
            &inside,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
            "service",
        )?;
    }
    let (forwarder, daemon_log) = start_forwarder(&mut rig, &path)?;
    let log = || std::fs::read_to_string(&daemon_log).unwrap_or_default();

    wait_for(
        Duration::from_secs(20),
        "the published port refused",
        || {
            degraded_because(
                &rig,
                &format!("granted port {FIRST_PORT} is a publishPorts namespacePort"),
            )
        },
    )
    .with_context(|| format!("status: {:?}\nport-forward said: {}", status(&rig), log()))?;
    ensure!(
        forwarded(&status(&rig)?).is_empty() && !reachable(&rig, FIRST_PORT)?,
        "the published service's port was opened to the tunnel"
    );

    server.restart(1000);
    wait_for(Duration::from_secs(20), "a port below 1024 refused", || {
        degraded_because(&rig, "granted port 1000 is below 1024")
    })
    .with_context(|| format!("status: {:?}\nport-forward said: {}", status(&rig), log()))?;
    ensure!(
        forwarded(&status(&rig)?).is_empty() && !reachable(&rig, 1000)?,
        "port 1000 was opened"
    );
    ensure!(
        calls(&calls_log).is_empty(),
        "the hook ran for a refused port: {:?}",
        calls(&calls_log)
    );

    server.restart(45000);
    wait_for(Duration::from_secs(20), "an acceptable port", || {
        calls(&calls_log).len() == 1
    })?;
    ensure!(
        calls(&calls_log) == ["45000 45000 1"] && reachable(&rig, 45000)?,
        "hook calls: {:?}",
        calls(&calls_log)
    );
    wait_for(Duration::from_secs(10), "healthy", || {
        status(&rig).is_ok_and(|s| s["verdict"] == "healthy")
    })?;

    // 2^32-1 seconds granted: still renewed at half the lifetime asked for.
    server.grant_lifetime(Some(u32::MAX));
    let asked_at = server.seen().len();
    wait_for(Duration::from_secs(10), "renewals granted 2^32-1", || {
        server.seen().len() >= asked_at + 4
    })?;
    let record: Value = serde_json::from_slice(&std::fs::read(record_path(&rig.confined))?)?;
    let latest = record["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["expiresAt"].as_u64())
        .max()
        .unwrap_or(u64::MAX);
    ensure!(
        latest <= unix_now() + ASKED,
        "the record expects the mapping to last until {latest}: {record:#}"
    );
    server.restart(AFTER_RESTART);
    wait_for(Duration::from_secs(15), "the restart noticed", || {
        calls(&calls_log).len() == 2
    })
    .with_context(|| format!("port-forward said: {}", log()))?;
    ensure!(
        calls(&calls_log)[1] == format!("{AFTER_RESTART} {AFTER_RESTART} 1"),
        "hook calls: {:?}",
        calls(&calls_log)
    );
    rig.kill_tracked(forwarder);
    drop(server);
    rig.down()?;
    rig.assert_clean()
}

/// One line naming the field, exit 2, before anything is touched.
fn port_forward_refuses_configs_it_cannot_serve() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("wgns-forwarding-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let base = json!({ "dns_server": "10.2.0.1", "privateKeyFile": "/run/keys/wg" });
    let mut no_user = base.clone();
    no_user["portForwarding"] = json!({
        "gateway": "10.2.0.1",
        "onPortChange": "/bin/true",
        "onPortChangeUser": "no-such-user-wgns",
    });
    let mut v6 = base.clone();
    v6["portForwarding"] = json!({ "gateway": "fd77::1" });
    let cases = [
        (base, "error: portForwarding: is not set in the config"),
        (
            no_user,
            "error: portForwarding.onPortChangeUser: no user \"no-such-user-wgns\" on this system",
        ),
        (
            v6,
            "error: portForwarding.gateway: \"fd77::1\" is not an IPv4 address (NAT-PMP speaks IPv4 only)",
        ),
    ];
    for (i, (config, expected)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("{i}.json"));
        std::fs::write(&path, config.to_string())?;
        let out = run_cmd(&[
            BIN,
            "port-forward",
            "--config",
            path.to_str().context("path")?,
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2) && stderr.trim_end() == expected,
            "case {i}: {}",
            text(&out)
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
