//! Endpoints given as host names (resolved on the host, refreshed in place) and the health
//! verdict of `status`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wg_namespace::system::process::ProcessId;

fn main() {
    run(vec![
        trial(
            "endpoint_follows_a_moved_name_while_traffic_flows",
            endpoint_follows_moved_name,
        ),
        trial("status_verdicts_follow_what_breaks", status_verdicts),
        trial(
            "status_says_down_when_the_leak_guard_is_altered",
            status_sees_an_altered_guard,
        ),
    ])
}

const NAME: &str = "peer.wgns.test";

fn write_hosts(path: &Path, address: &str) -> Result<()> {
    // Rewrite in place: the bind mount over /etc/hosts follows this inode, not the path.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)?;
    writeln!(file, "{address} {NAME}")?;
    Ok(())
}

/// A server in the peer that writes a numbered line every 50 ms on each connection.
fn ticker(rig: &Rig) -> Result<SocketAddr> {
    let listener = Rig::within(rig.peer_fd(), || {
        TcpListener::bind((rig.peer_tunnel_ip(), 8100))
    })??;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                for n in 0u64.. {
                    if writeln!(stream, "{n}").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    Ok(addr)
}

fn device_endpoint(rig: &Rig) -> Result<Option<SocketAddr>> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    Ok(report["namespaces"][0]["peers"][0]["endpoint"]
        .as_str()
        .and_then(|e| e.parse().ok()))
}

fn endpoint_follows_moved_name() -> Result<()> {
    let mut rig = Rig::new(41)?;
    let hosts = rig.dir.join("hosts");
    let (old, new) = (
        rig.peer_underlay(),
        std::net::Ipv4Addr::new(10, 200, rig.id, 3),
    );
    write_hosts(&hosts, &old.to_string())?;
    let refresh_seconds = 1;
    let mut config = rig.config()?;
    config["peers"][0]["endpoint"] = json!(format!("{NAME}:{WG_PORT}"));
    config["peers"][0]["dynamicEndpointRefreshSeconds"] = json!(refresh_seconds);
    config["peers"][0]["persistentKeepalive"] = json!(1);
    let path = rig.write_config("config.json", &config)?;
    let path = path.to_str().context("path")?;

    let up = rig
        .helper_with_hosts(&hosts, &["up", "--config", path])?
        .output()?;
    ensure!(
        up.status.success(),
        "up with a host-name endpoint: {}",
        text(&up)
    );
    ensure!(
        device_endpoint(&rig)? == Some(SocketAddr::new(old.into(), WG_PORT)),
        "the name was not resolved on the host"
    );
    let refresher = rig
        .helper_with_hosts(&hosts, &["refresh", "--config", path])?
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    rig.track(refresher);

    // A long-lived connection from inside, read on a thread of its own.
    let server = ticker(&rig)?;
    let stream = Rig::within(&rig.confined_fd()?, || {
        TcpStream::connect_timeout(&server, Duration::from_secs(15))
    })??;
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, u64)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx
                .send((Instant::now(), line.parse().unwrap_or(0)))
                .is_err()
            {
                return;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .context("no traffic before the move")?;

    // The server moves: the name points at its new address and the old one disappears.
    write_hosts(&hosts, &new.to_string())?;
    sh(&[
        "ip",
        "-n",
        &rig.peer,
        "address",
        "del",
        &format!("{old}/29"),
        "dev",
        &rig.peer_veth,
    ])?;
    let moved_at = Instant::now();
    let limit = Duration::from_secs(refresh_seconds + 4);
    wait_for(limit, "the endpoint to follow the name", || {
        device_endpoint(&rig).ok().flatten() == Some(SocketAddr::new(new.into(), WG_PORT))
    })?;
    let followed_after = moved_at.elapsed();

    // The same connection carries on: lines keep arriving after the move.
    let deadline = Instant::now() + limit;
    let mut last = first.1;
    let mut after_move = 0;
    while Instant::now() < deadline && after_move < 10 {
        if let Ok((at, n)) = rx.recv_timeout(Duration::from_millis(500)) {
            ensure!(
                n == last + 1,
                "the connection lost data: line {n} after {last}"
            );
            last = n;
            if at > moved_at + followed_after {
                after_move += 1;
            }
        }
    }
    ensure!(
        after_move >= 10,
        "the connection stalled after the move (only {after_move} lines)"
    );
    Ok(())
}

fn status_json(rig: &Rig) -> Result<(i32, Value)> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    Ok((
        out.status.code().unwrap_or(-1),
        report["namespaces"][0].clone(),
    ))
}

fn expect_verdict(rig: &Rig, code: i32, verdict: &str, reason: &str) -> Result<Value> {
    let (got, status) = status_json(rig)?;
    ensure!(
        got == code && status["verdict"] == verdict,
        "expected {verdict} (exit {code}), got exit {got}: {status:#}"
    );
    let reasons = status["reasons"].to_string();
    ensure!(
        reasons.contains(reason),
        "reasons {reasons} do not mention {reason:?}"
    );
    Ok(status)
}

fn status_verdicts() -> Result<()> {
    let rig = Rig::new(42)?;
    let hosts = rig.dir.join("hosts");
    write_hosts(&hosts, &rig.peer_underlay().to_string())?;
    let mut config = rig.config()?;
    config["peers"][0]["persistentKeepalive"] = json!(1);
    rig.up_with(&config)?;

    wait_for(Duration::from_secs(10), "a handshake", || {
        status_json(&rig).is_ok_and(|(_, s)| s["peers"][0]["latestHandshakeSecondsAgo"].is_u64())
    })?;
    let healthy = expect_verdict(&rig, 0, "healthy", "")?;
    ensure!(
        healthy["firewall"]["loaded"] == true && healthy["dns"]["resolvConf"] == true,
        "{healthy:#}"
    );

    // Text form carries the same verdict.
    let text_out = rig.helper(&["status", "--namespace", &rig.confined])?;
    ensure!(
        String::from_utf8_lossy(&text_out.stdout)
            .contains(&format!("namespace {}: healthy", rig.confined))
    );

    let pid = healthy["daemonPid"].as_u64().context("no daemon pid")? as i32;

    // The daemon is stopped: down at once (status must not wait for an answer), healthy again
    // once it runs.
    let daemon = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP)?;
    // A stop takes effect once the daemon is scheduled; on a busy machine that is not at once.
    wait_for(Duration::from_secs(5), "the daemon to stop", || {
        ProcessId::of(pid as u32).is_some_and(|p| p.is_stopped())
    })?;
    let asked = std::time::Instant::now();
    let stopped = expect_verdict(&rig, 4, "down", "is stopped");
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGCONT)?;
    stopped?;
    ensure!(
        asked.elapsed() < Duration::from_secs(4),
        "status took {:?} with a stopped daemon",
        asked.elapsed()
    );
    expect_verdict(&rig, 0, "healthy", "")?;

    // The daemon dies: down, with the reason; down + up recovers.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(Duration::from_secs(5), "the daemon to end", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })?;
    expect_verdict(&rig, 4, "down", "daemon")?;
    rig.down()?;
    rig.assert_clean()?;
    rig.up_with(&config)?;
    wait_for(
        Duration::from_secs(10),
        "a handshake after recovery",
        || status_json(&rig).is_ok_and(|(code, _)| code == 0),
    )?;

    // The firewall disappears: down.
    let fd = rig.confined_fd()?;
    let nft = rig
        .command_in(
            &fd,
            &["nft", "delete", "table", "inet", "wg_namespace_guard"],
        )
        .output()?;
    ensure!(nft.status.success(), "{}", text(&nft));
    expect_verdict(&rig, 4, "down", "firewall")?;
    rig.down()?;

    // resolv.conf disappears: down (processes inside would fall back to the host's resolver).
    rig.up_with(&config)?;
    std::fs::remove_file(format!("/etc/netns/{}/resolv.conf", rig.confined))?;
    expect_verdict(&rig, 4, "down", "resolv.conf")?;
    rig.down()?;

    // The endpoint's name stops resolving: degraded, the tunnel itself untouched.
    let mut named = config.clone();
    named["peers"][0]["endpoint"] = json!(format!("{NAME}:{WG_PORT}"));
    let path = rig.write_config("named.json", &named)?;
    let up = rig
        .helper_with_hosts(&hosts, &["up", "--config", path.to_str().context("path")?])?
        .output()?;
    ensure!(up.status.success(), "{}", text(&up));
    std::fs::write(&hosts, "")?;
    let status = rig
        .helper_with_hosts(&hosts, &["status", "--json", "--namespace", &rig.confined])?
        .output()?;
    let report: Value = serde_json::from_slice(&status.stdout).with_context(|| text(&status))?;
    let ns = &report["namespaces"][0];
    ensure!(
        status.status.code() == Some(3) && ns["verdict"] == "degraded",
        "{}",
        text(&status)
    );
    ensure!(
        ns["reasons"].to_string().contains("does not resolve"),
        "{ns:#}"
    );

    // A namespace that is not up is down.
    rig.down()?;
    expect_verdict(&rig, 4, "down", "not up")?;
    Ok(())
}

/// The guard table still there but flushed, dormant, opened by a rule or by its policy: it
/// leaks as if it were gone, and `status` must say so, naming what changed.
fn status_sees_an_altered_guard() -> Result<()> {
    let rig = Rig::new(123)?;
    let mut config = rig.config()?;
    // A second DNS server makes the guard's DNS rule a set: the expected guard must be
    // rendered from everything the state file records.
    config["dnsServers"] = json!([format!("10.200.{}.131", rig.id)]);
    let path = rig.up_with(&config)?;
    let rendered = rig.dir.join("rendered");
    let out = rig.helper(&[
        "render",
        "--config",
        path.to_str().context("path")?,
        "--out",
        rendered.to_str().context("path")?,
    ])?;
    ensure!(out.status.success(), "render: {}", text(&out));
    let ruleset = rendered.join(format!("{}.nft", rig.confined));
    let ruleset = ruleset.to_str().context("path")?;
    let fd = rig.confined_fd()?;
    let nft = |args: &[&str]| -> Result<()> {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(args);
        let out = rig.command_in(&fd, &argv).output()?;
        ensure!(out.status.success(), "{argv:?}: {}", text(&out));
        Ok(())
    };

    expect_verdict(&rig, 0, "healthy", "")?;
    let guard = "wg_namespace_guard";
    let tamperings: [(&[&str], &str); 4] = [
        (
            &["flush", "chain", "inet", guard, "output"],
            "chain output has no rules (it was flushed)",
        ),
        (
            &["add", "table", "inet", guard, "{ flags dormant; }"],
            "marked `flags dormant`",
        ),
        (
            &["insert", "rule", "inet", guard, "output", "accept"],
            "chain output has an added rule 1: accept",
        ),
        (
            &["chain", "inet", guard, "output", "{ policy accept; }"],
            "chain output has policy accept instead of drop",
        ),
    ];
    for (tamper, reason) in tamperings {
        nft(tamper)?;
        let down = expect_verdict(&rig, 4, "down", reason)
            .with_context(|| format!("after nft {}", tamper.join(" ")));
        nft(&["-f", ruleset])?;
        let down = down?;
        ensure!(down["firewall"]["guardIntact"] == false, "{down:#}");
        let healthy = expect_verdict(&rig, 0, "healthy", "")
            .with_context(|| format!("after restoring from nft {}", tamper.join(" ")))?;
        ensure!(healthy["firewall"]["guardIntact"] == true, "{healthy:#}");
    }
    // Either table gone: the ruleset counts as not loaded.
    for table in ["my_table", guard] {
        nft(&["delete", "table", "inet", table])?;
        let down = expect_verdict(&rig, 4, "down", "the firewall ruleset is not loaded")
            .with_context(|| format!("after nft delete table inet {table}"));
        nft(&["-f", ruleset])?;
        let down = down?;
        ensure!(down["firewall"]["loaded"] == false, "{down:#}");
        let healthy = expect_verdict(&rig, 0, "healthy", "")?;
        ensure!(healthy["firewall"]["loaded"] == true, "{healthy:#}");
    }
    Ok(())
}
