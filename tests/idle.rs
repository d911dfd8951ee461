//! An idle namespace costs next to nothing: `status` takes what the helper's processes beside
//! it already know instead of asking again.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![trial(
        "status_says_whether_a_name_resolves_from_what_refresh_learned",
        status_asks_refresh,
    )])
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
