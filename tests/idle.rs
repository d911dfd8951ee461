//! An idle namespace costs next to nothing: the helper's processes beside it (`refresh`,
//! `port-forward`, a publishPorts relay) sleep until something is due, instead of waking on a
//! clock, and `status` takes what they already know instead of asking again.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::natpmp::NatPmpServer;
use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![
        trial(
            "an_idle_namespaces_helper_processes_wake_at_most_12_times_a_minute",
            idle_wakeups,
        ),
        trial(
            "status_says_whether_a_name_resolves_from_what_refresh_learned",
            status_asks_refresh,
        ),
    ])
}

/// The goal is 0.2 wakeups a second per namespace: 12 in a minute.
const MOST_WAKEUPS: u64 = 12;
const IDLE: Duration = Duration::from_secs(60);

fn status(rig: &Rig) -> Result<Value> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    Ok(report["namespaces"][0].clone())
}

/// `wg-namespace COMMAND --config CONFIG` in the rig's host namespace, as its unit runs it.
fn companion(rig: &mut Rig, command: &str, config: &Path) -> Result<u32> {
    let log = std::fs::File::create(rig.dir.join(format!("{command}.log")))?;
    let child = rig
        .command_in(
            rig.host_fd(),
            &[BIN, command, "--config", config.to_str().context("path")?],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(rig.track(child))
}

fn idle_wakeups() -> Result<()> {
    let mut rig = Rig::new(160)?;
    // A mapping that lasts an hour: no renewal is due within the minute watched.
    let _gateway = NatPmpServer::start(
        rig.peer_fd(),
        rig.peer_tunnel_ip(),
        rig.peer_underlay(),
        40000,
        3600,
    )?;
    let mut config = rig.config()?;
    config["portForwarding"] = json!({
        "gateway": rig.peer_tunnel_ip().to_string(),
        "lifetimeSeconds": 3600,
    });
    config["publishPorts"] = json!([
        { "protocol": "tcp", "hostPort": 19160, "namespacePort": 9160 },
    ]);
    let path = rig.up_with(&config)?;
    let refresh = companion(&mut rig, "refresh", &path)?;
    let forward = companion(&mut rig, "port-forward", &path)?;
    wait_for(Duration::from_secs(20), "a forwarded port", || {
        status(&rig).is_ok_and(|s| s["portForwarding"]["phase"] == "mapped")
    })?;
    let relays: Vec<u32> = status(&rig)?["relays"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| u32::try_from(r["pid"].as_u64()?).ok())
        .collect();
    ensure!(relays.len() == 1, "expected one relay: {relays:?}");
    // What starting up costs is over.
    std::thread::sleep(Duration::from_secs(3));

    let watched: Vec<(&str, u32)> = [("refresh", refresh), ("port-forward", forward)]
        .into_iter()
        .chain(relays.iter().map(|&pid| ("relay", pid)))
        .collect();
    let before: Vec<u64> = watched
        .iter()
        .map(|(_, pid)| wakeups(*pid))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    std::thread::sleep(IDLE);
    let mut report = Vec::new();
    let mut total = 0;
    for ((name, pid), before) in watched.iter().zip(before) {
        let after = wakeups(*pid).with_context(|| format!("{name} (pid {pid}) ended"))?;
        report.push(format!("{name} {}", after - before));
        total += after - before;
    }
    println!(
        "idle for {:.0} s: {total} wakeups ({})",
        started.elapsed().as_secs_f64(),
        report.join(", ")
    );
    ensure!(
        total <= MOST_WAKEUPS,
        "the helper's processes woke {total} times in {} s while idle ({}); at most \
         {MOST_WAKEUPS} are allowed",
        IDLE.as_secs(),
        report.join(", ")
    );
    Ok(())
}

const NAME: &str = "peer.wgns.test";

/// Rewrites a private hosts file in place (the bind mount over /etc/hosts follows the inode).
fn write_hosts(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)?;
    writeln!(file, "{line}")?;
    Ok(())
}

/// `status --json` resolving names only from `hosts`: its reasons.
fn reasons_with_hosts(rig: &Rig, hosts: &Path) -> Result<String> {
    let out = rig
        .helper_with_hosts(hosts, &["status", "--json", "--namespace", &rig.confined])?
        .output()?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    Ok(report["namespaces"][0]["reasons"].to_string())
}

/// While `refresh` runs, `status` asks it rather than DNS whether an endpoint's name resolves:
/// a `status` whose own resolver knows the name reports it unresolvable once refresh's cannot
/// resolve it, and the other way round.
fn status_asks_refresh() -> Result<()> {
    let mut rig = Rig::new(161)?;
    let (refresh_hosts, status_hosts) =
        (rig.dir.join("refresh-hosts"), rig.dir.join("status-hosts"));
    let known = format!("{} {NAME}", rig.peer_underlay());
    write_hosts(&refresh_hosts, &known)?;
    write_hosts(&status_hosts, "")?;
    let mut config = rig.config()?;
    config["peers"][0]["endpoint"] = json!(format!("{NAME}:{WG_PORT}"));
    config["peers"][0]["dynamicEndpointRefreshSeconds"] = json!(1);
    let path = rig.write_config("config.json", &config)?;
    let path = path.to_str().context("path")?;
    let up = rig
        .helper_with_hosts(&refresh_hosts, &["up", "--config", path])?
        .output()?;
    ensure!(up.status.success(), "up: {}", text(&up));
    // Without refresh, status looks the name up itself: its resolver does not know it.
    let alone = reasons_with_hosts(&rig, &status_hosts)?;
    ensure!(alone.contains("does not resolve"), "{alone}");

    let refresher = rig
        .helper_with_hosts(&refresh_hosts, &["refresh", "--config", path])?
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(rig.dir.join("refresh.log"))?)
        .spawn()?;
    rig.track(refresher);
    wait_for(
        Duration::from_secs(10),
        "status to take refresh's word",
        || reasons_with_hosts(&rig, &status_hosts).is_ok_and(|r| !r.contains("does not resolve")),
    )?;
    write_hosts(&refresh_hosts, "")?;
    write_hosts(&status_hosts, &known)?;
    wait_for(
        Duration::from_secs(10),
        "status to say what refresh found",
        || reasons_with_hosts(&rig, &status_hosts).is_ok_and(|r| r.contains("does not resolve")),
    )
    .with_context(|| std::fs::read_to_string(rig.dir.join("refresh.log")).unwrap_or_default())?;
    Ok(())
}
