//! The tunnel recovers by itself: at once after the host's network comes back, and by failing
//! over to another server when the one in use stops answering.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![
        trial(
            "tunnel_recovers_within_seconds_of_the_host_route_returning",
            route_returns,
        ),
        trial(
            "failover_to_the_second_server_in_place_without_a_leak",
            failover_in_place,
        ),
        trial(
            "all_servers_down_is_degraded_and_retried_with_backoff",
            all_servers_down,
        ),
        trial(
            "an_outage_on_record_ends_with_the_first_answer_after_refresh_restarts",
            outage_outlives_a_restart,
        ),
        libtest_mimic::Trial::test("bad_alternatives_are_one_line_naming_the_field", || {
            bad_alternatives().map_err(|e| format!("{e:#}").into())
        }),
    ])
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

    /// How long after `since` the first reply after it came, if one did.
    fn replied_after(&self, since: Instant) -> Option<Duration> {
        let replies = self.replies.lock().unwrap();
        let first = replies.iter().find(|&&t| t > since)?;
        Some(first.duration_since(since))
    }

    /// Waits for the first reply after `since`; how long after `since` it came.
    fn reply_after(&self, since: Instant, timeout: Duration) -> Result<Duration> {
        wait_for(timeout, "a reply through the tunnel", || {
            self.replied_after(since).is_some()
        })?;
        self.replied_after(since).context("reply")
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
    start_refresh(&mut rig, &path)?;
    std::thread::sleep(Duration::from_secs(1));
    // What is already there, refreshed (as router advertisements refresh IPv6 addresses every
    // few minutes), is no change: no handshake anew for it.
    for _ in 0..3 {
        sh(&[
            "ip",
            "-n",
            &rig.host,
            "address",
            "change",
            &format!("{}/29", rig.host_underlay()),
            "dev",
            &rig.host_veth,
            "valid_lft",
            "3600",
            "preferred_lft",
            "3600",
        ])?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let log_text = std::fs::read_to_string(&log)?;
    ensure!(
        !log_text.contains("handshaking again"),
        "a refreshed address counted as a change: {log_text}"
    );
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

/// How long the helper waits for an answer before switching, in the failover tests.
const FAILOVER_AFTER: u64 = 5;

/// A rig with a second server, a config whose peer has it as its alternative (with a preshared
/// key; given by key, endpoint and key file, or `as_file` as a provider's wg-quick file), `up`,
/// `refresh` running (its log in refresh.log) and a confined ping getting replies.
fn failover_rig(id: u8, as_file: bool) -> Result<(Rig, Pinger, u32)> {
    let mut rig = Rig::new(id)?;
    let psk = wireguard_control::Key::generate_preshared();
    rig.add_second_peer(Some(psk.clone()))?;
    let public_key = rig.second_peer().key.get_public().to_base64();
    let endpoint = format!("{}:{WG_PORT}", rig.second_peer_underlay());
    let alternative = if as_file {
        let file = rig.write_secret(
            "second.conf",
            &format!(
                "[Interface]\nAddress = {}/32\n\n[Peer]\nPublicKey = {public_key}\n\
                 PresharedKey = {}\nAllowedIPs = 0.0.0.0/0\nEndpoint = {endpoint}\n",
                rig.confined_ip(),
                psk.to_base64()
            ),
        )?;
        json!({ "configFile": file })
    } else {
        let psk_file = rig.write_secret("second.psk", &psk.to_base64())?;
        json!({ "publicKey": public_key, "endpoint": endpoint, "presharedKeyFile": psk_file })
    };
    let mut config = rig.config()?;
    config["peers"][0]["failoverAfterSeconds"] = json!(FAILOVER_AFTER);
    config["peers"][0]["alternatives"] = json!([alternative]);
    let path = rig.up_with(&config)?;
    let refresher = start_refresh(&mut rig, &path)?;
    let target = rig.peer_tunnel_ip();
    let pinger = Pinger::start(&mut rig, target)?;
    pinger.reply_after(Instant::now(), Duration::from_secs(10))?;
    Ok((rig, pinger, refresher))
}

/// `refresh` in the rig's host namespace, its messages appended to refresh.log; its PID.
fn start_refresh(rig: &mut Rig, config: &std::path::Path) -> Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rig.dir.join("refresh.log"))?;
    let refresher = rig
        .command_in(
            rig.host_fd(),
            &[BIN, "refresh", "--config", config.to_str().context("path")?],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(rig.track(refresher))
}

fn refresh_log(rig: &Rig) -> String {
    std::fs::read_to_string(rig.dir.join("refresh.log")).unwrap_or_default()
}

/// The namespace's entry in `status --json`, and the exit code.
fn status(rig: &Rig) -> Result<(i32, Value)> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    Ok((
        out.status.code().unwrap_or(-1),
        report["namespaces"][0].clone(),
    ))
}

/// Captures on both underlay links: what the host side sees must be WireGuard between the host
/// and one of the two servers, and nothing else, while [`Watchers::probe`] sends from inside.
struct Watchers {
    captures: Vec<Capture>,
    targets: Vec<std::net::IpAddr>,
    allowed: Vec<std::net::IpAddr>,
}

impl Watchers {
    fn start(rig: &Rig) -> Result<Watchers> {
        let id = rig.id;
        Ok(Watchers {
            captures: vec![
                Capture::start_underlay(rig.host_fd(), &rig.host_veth)?,
                Capture::start_underlay(rig.host_fd(), &rig.second_peer().host_veth)?,
            ],
            // The host's side of both links, addresses beyond, IPv6.
            targets: vec![
                rig.host_underlay().into(),
                Ipv4Addr::new(10, 200, id, 17).into(),
                Ipv4Addr::new(10, 200, id, 200).into(),
                format!("fd77:{id}::99").parse()?,
            ],
            allowed: vec![
                rig.host_underlay().into(),
                rig.peer_underlay().into(),
                Ipv4Addr::new(10, 200, id, 17).into(),
                rig.second_peer_underlay().into(),
            ],
        })
    }

    /// Leak probes from inside the confined namespace: TCP, UDP and pings to `targets`, until
    /// `done` holds or `timeout` passes.
    fn probe_until(
        &self,
        rig: &Rig,
        timeout: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Result<()> {
        let confined = rig.confined_fd()?;
        let deadline = Instant::now() + timeout;
        while !done() {
            ensure!(Instant::now() < deadline, "timed out after {timeout:?}");
            rig.flood(&confined, &self.targets)?;
        }
        Ok(())
    }

    /// Stops the captures; fails when a frame other than WireGuard between the host and the two
    /// servers (or ARP) was seen. Returns how many frames were seen.
    fn check(self) -> Result<usize> {
        let mut seen = 0;
        for capture in self.captures {
            for frame in capture.stop() {
                if frame.kind == FrameKind::Arp {
                    continue;
                }
                let between = frame.src.is_some_and(|a| self.allowed.contains(&a))
                    && frame.dst.is_some_and(|a| self.allowed.contains(&a));
                ensure!(
                    frame.is_wireguard() && between,
                    "on the underlay: {}",
                    frame.describe()
                );
                seen += 1;
            }
        }
        Ok(seen)
    }
}

fn failover_in_place() -> Result<()> {
    let (mut rig, pinger, _) = failover_rig(151, false)?;
    let (_, before) = status(&rig)?;
    ensure!(
        before["peers"][0]["failover"]["active"] == 0,
        "starts with the peer itself: {before:#}"
    );
    let up_since = before["upSince"].clone();
    let watchers = Watchers::start(&rig)?;

    rig.stop_peer_wg();
    let stopped = Instant::now();
    let limit = Duration::from_secs(FAILOVER_AFTER + 10);
    let resumed = pinger.reply_after(stopped, limit).with_context(|| {
        format!(
            "no reply through the second server; log:\n{}",
            refresh_log(&rig)
        )
    })?;
    println!(
        "traffic resumed through the second server {:.1} s after the first stopped \
         (failoverAfterSeconds = {FAILOVER_AFTER}; limit {} s)",
        resumed.as_secs_f64(),
        limit.as_secs()
    );
    // A few more seconds through the second server, probing still.
    let more = Instant::now() + Duration::from_secs(2);
    watchers.probe_until(&rig, Duration::from_secs(10), || Instant::now() > more)?;
    let frames = watchers.check()?;
    ensure!(frames > 0, "the captures saw nothing at all");

    ensure!(pinger.alive(), "the confined ping ended");
    let (code, after) = status(&rig)?;
    let failover = &after["peers"][0]["failover"];
    ensure!(
        failover["active"] == 1
            && failover["activePublicKey"] == rig.second_peer().key.get_public().to_base64()
            && failover["lastSwitchAt"].is_u64()
            && failover["lastSwitchReason"]
                .as_str()
                .is_some_and(|r| r.contains("unanswered")),
        "status does not name the switch: {after:#}"
    );
    ensure!(failover["allDownSince"].is_null(), "{after:#}");
    ensure!(
        after["upSince"] == up_since,
        "the namespace was rebuilt: {after:#}"
    );
    ensure!(code == 0, "status exit {code}: {after:#}");
    let text_out = rig.helper(&["status", "--namespace", &rig.confined])?;
    ensure!(
        String::from_utf8_lossy(&text_out.stdout).contains("alternative 1"),
        "{}",
        text(&text_out)
    );

    // Reloading the same config keeps the server that works: no switch back to the dead one.
    let config = rig.dir.join("config.json");
    let reload = rig.helper(&["reload", "--config", config.to_str().context("path")?])?;
    ensure!(reload.status.success(), "reload: {}", text(&reload));
    let (_, reloaded) = status(&rig)?;
    ensure!(
        reloaded["peers"][0]["failover"]["active"] == 1,
        "reload put the dead server back: {reloaded:#}"
    );
    let after_reload = Instant::now();
    pinger.reply_after(after_reload, Duration::from_secs(5))?;
    ensure!(pinger.alive(), "the confined ping ended");
    Ok(())
}

fn all_servers_down() -> Result<()> {
    // The second server comes as a provider's wg-quick file.
    let (mut rig, pinger, _) = failover_rig(152, true)?;
    let watchers = Watchers::start(&rig)?;
    rig.stop_peer_wg();
    rig.stop_second_peer_wg();

    // Each switch, as refresh reports it, with when it was seen: the log is read every 100 ms,
    // which a loaded machine cannot stretch the way it stretches a `status` run.
    let second_key = rig.second_peer().key.get_public().to_base64();
    let mut switches: Vec<(Instant, usize)> = Vec::new();
    let mut degraded = None;
    let mut status_due = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while switches.len() < 3 && Instant::now() < deadline {
        let log = refresh_log(&rig);
        for line in log
            .lines()
            .filter(|l| l.contains("switched to server"))
            .skip(switches.len())
        {
            let active = usize::from(line.contains(&format!("switched to server {second_key}")));
            switches.push((Instant::now(), active));
        }
        if degraded.is_none() && Instant::now() >= status_due {
            status_due = Instant::now() + Duration::from_secs(1);
            let (code, ns) = status(&rig)?;
            if !ns["peers"][0]["failover"]["allDownSince"].is_null() {
                ensure!(
                    code == 3 && ns["verdict"] == "degraded",
                    "all servers down but not degraded: {ns:#}"
                );
                ensure!(
                    ns["reasons"].to_string().contains("none of its 2 servers"),
                    "{ns:#}"
                );
                degraded = Some(ns.clone());
                // The second server comes back: the next round reaches it.
                rig.start_second_peer_wg()?;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        switches.len() == 3,
        "expected three switches, saw {}: {switches:?}\nlog:\n{}",
        switches.len(),
        refresh_log(&rig)
    );
    ensure!(degraded.is_some(), "never degraded");
    let actives: Vec<_> = switches.iter().map(|(_, active)| *active).collect();
    ensure!(
        actives == [1, 0, 1],
        "in order: {actives:?}\nlog:\n{}",
        refresh_log(&rig)
    );
    let first_gap = switches[1].0 - switches[0].0;
    let second_gap = switches[2].0 - switches[1].0;
    println!(
        "all servers down: switches {:.1} s then {:.1} s apart (the second round waits twice as long)",
        first_gap.as_secs_f64(),
        second_gap.as_secs_f64()
    );
    ensure!(
        first_gap >= Duration::from_secs(FAILOVER_AFTER),
        "switched again after only {first_gap:?}"
    );
    ensure!(
        second_gap >= first_gap + Duration::from_secs(FAILOVER_AFTER - 2),
        "no backoff: {first_gap:?} then {second_gap:?}"
    );
    // The second server answers: traffic flows and the outage is over.
    watchers.probe_until(&rig, Duration::from_secs(10), || {
        pinger.replied_after(switches[2].0).is_some()
    })?;
    wait_for(Duration::from_secs(5), "allDownSince to clear", || {
        status(&rig).is_ok_and(|(_, ns)| ns["peers"][0]["failover"]["allDownSince"].is_null())
    })?;
    watchers.check()?;
    ensure!(pinger.alive(), "the confined ping ended");
    Ok(())
}

/// All servers down and on record as such; `refresh` restarts (as the module restarts it on a
/// config change); the server in use comes back: the outage on record ends without a switch.
fn outage_outlives_a_restart() -> Result<()> {
    let (mut rig, pinger, refresher) = failover_rig(153, false)?;
    rig.stop_peer_wg();
    rig.stop_second_peer_wg();
    wait_for(
        Duration::from_secs(40),
        "every server to count as down",
        || status(&rig).is_ok_and(|(_, ns)| !ns["peers"][0]["failover"]["allDownSince"].is_null()),
    )
    .with_context(|| refresh_log(&rig))?;
    rig.kill_tracked(refresher);
    let config = rig.dir.join("config.json");
    start_refresh(&mut rig, &config)?;
    let (_, before) = status(&rig)?;
    let active = before["peers"][0]["failover"]["active"].clone();
    ensure!(
        active == 0,
        "after two switches the peer itself is back: {before:#}"
    );
    let restarted = Instant::now();
    rig.start_peer_wg()?;
    pinger.reply_after(restarted, Duration::from_secs(10))?;
    wait_for(Duration::from_secs(5), "allDownSince to clear", || {
        status(&rig).is_ok_and(|(_, ns)| ns["peers"][0]["failover"]["allDownSince"].is_null())
    })
    .with_context(|| refresh_log(&rig))?;
    let (code, after) = status(&rig)?;
    ensure!(
        after["peers"][0]["failover"]["active"] == active
            && after["peers"][0]["failover"]["lastSwitchAt"]
                == before["peers"][0]["failover"]["lastSwitchAt"],
        "switched although the server in use answered: {after:#}"
    );
    ensure!(code == 0, "status exit {code}: {after:#}");
    Ok(())
}

/// Bad alternatives are refused by `check` (the same validation `up` runs first) with one line
/// naming the field and exit status 2.
fn bad_alternatives() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("wgns-alternatives-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    let other = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
    let cases = [
        (
            json!([{ "publicKey": key, "endpoint": "10.200.153.2:51820" }]),
            "error: peers[0].alternatives[0].publicKey: is the peer's own publicKey",
        ),
        (json!([]), "error: peers[0].alternatives: is empty"),
        (
            json!([{ "publicKey": other, "endpoint": "10.200.153.2" }]),
            "error: peers[0].alternatives[0].endpoint: \"10.200.153.2\" needs a port",
        ),
        (
            json!([{ "publicKey": other, "endpoint": "[fd77::1:51820" }]),
            "error: peers[0].alternatives[0].endpoint:",
        ),
    ];
    let result = (|| -> Result<()> {
        for (alternatives, expected) in cases {
            let config = json!({
                "namespace_name": "wgt153c",
                "dns_server": "10.200.153.129",
                "privateKeyFile": "/nonexistent/key",
                "peers": [{
                    "publicKey": key,
                    "allowedIPs": ["0.0.0.0/0"],
                    "endpoint": "10.200.153.2:51820",
                    "alternatives": alternatives,
                }]
            });
            let path = dir.join("config.json");
            std::fs::write(&path, config.to_string())?;
            let out = run_cmd(&[BIN, "check", "--config", path.to_str().context("path")?])?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                out.status.code() == Some(2)
                    && stderr.lines().count() == 1
                    && stderr.starts_with(expected),
                "expected {expected:?}: {}",
                text(&out)
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
