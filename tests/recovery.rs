//! The tunnel recovers by itself: at once after the host's network comes back, and by failing
//! over to another server when the one in use stops answering.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn main() {
    run(vec![trial(
        "tunnel_recovers_within_seconds_of_the_host_route_returning",
        route_returns,
    )])
}

/// A confined `ping` of the peer's tunnel address, started once: the times of its replies.
struct Pinger {
    pid: u32,
    replies: Arc<Mutex<Vec<Instant>>>,
}

impl Pinger {
    fn start(rig: &mut Rig, target: Ipv4Addr) -> Result<Pinger> {
        let target = target.to_string();
        let mut child = rig
            .command_in(
                rig.host_fd(),
                &[
                    BIN,
                    "exec",
                    "--namespace",
                    &rig.confined,
                    "--",
                    "ping",
                    "-n",
                    "-i",
                    "0.1",
                    &target,
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("ping's output")?;
        let replies = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&replies);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.contains("bytes from") {
                    seen.lock().unwrap().push(Instant::now());
                }
            }
        });
        let pid = rig.track(child);
        Ok(Pinger { pid, replies })
    }

    /// Waits for the first reply after `since`; how long after `since` it came.
    fn reply_after(&self, since: Instant, timeout: Duration) -> Result<Duration> {
        let mut found = None;
        wait_for(timeout, "a reply through the tunnel", || {
            found = self
                .replies
                .lock()
                .unwrap()
                .iter()
                .find(|&&t| t > since)
                .copied();
            found.is_some()
        })?;
        Ok(found.context("reply")?.duration_since(since))
    }

    fn alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The host loses its default route for two seconds, and meanwhile the server forgets the
/// session (as one does after a long outage or while the client sleeps). How long after the
/// route's return do the pings get through again?
fn outage(rig: &mut Rig, pinger: &Pinger, gateway: &str) -> Result<Duration> {
    sh(&["ip", "-n", &rig.host, "route", "del", "default"])?;
    rig.stop_peer_wg();
    rig.start_peer_wg()?;
    std::thread::sleep(Duration::from_secs(2));
    sh(&[
        "ip", "-n", &rig.host, "route", "add", "default", "via", gateway,
    ])?;
    pinger.reply_after(Instant::now(), Duration::from_secs(40))
}

fn route_returns() -> Result<()> {
    let mut rig = Rig::new(150)?;
    // The server sits behind the host's default route, as a VPN server does.
    let server = Ipv4Addr::new(10, 200, rig.id, 9);
    let gateway = rig.peer_underlay().to_string();
    sh(&[
        "ip",
        "-n",
        &rig.peer,
        "address",
        "add",
        &format!("{server}/32"),
        "dev",
        &rig.peer_veth,
    ])?;
    sh(&[
        "ip", "-n", &rig.host, "route", "add", "default", "via", &gateway,
    ])?;
    let mut config = rig.config()?;
    config["peers"][0]["endpoint"] = json!(format!("{server}:{WG_PORT}"));
    let path = rig.up_with(&config)?;

    let target = rig.peer_tunnel_ip();
    let pinger = Pinger::start(&mut rig, target)?;
    pinger.reply_after(Instant::now(), Duration::from_secs(10))?;

    // Without the refresh loop: WireGuard's own timers bring it back.
    let unattended = outage(&mut rig, &pinger, &gateway)?;

    let log = rig.dir.join("refresh.log");
    let refresher = rig
        .command_in(
            rig.host_fd(),
            &[BIN, "refresh", "--config", path.to_str().context("path")?],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    rig.track(refresher);
    std::thread::sleep(Duration::from_secs(1));
    let watched = outage(&mut rig, &pinger, &gateway)?;

    println!(
        "traffic through the tunnel again {:.2} s after the host's default route returned \
         ({:.2} s without `refresh` watching)",
        watched.as_secs_f64(),
        unattended.as_secs_f64()
    );
    ensure!(pinger.alive(), "the confined ping ended");
    ensure!(
        watched < Duration::from_secs(5),
        "traffic came back only {watched:?} after the route (log: {})",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Ok(())
}
