//! Metrics and health seen from the host, unprivileged: `serve` (as nobody, no capabilities)
//! reads the namespaces' companions; a real Prometheus scrapes it; the health endpoint follows
//! the tunnel; no key ever appears in an answer.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn main() {
    run(vec![
        trial(
            "prometheus_scrapes_two_namespaces_and_sees_their_traffic_grow",
            prometheus_scrapes,
        ),
        trial(
            "health_follows_silent_servers_and_a_flushed_guard_and_returns_after_heal",
            health_follows,
        ),
        trial(
            "health_turns_503_when_a_lone_peer_falls_silent_and_200_when_it_answers_again",
            silent_peer,
        ),
        trial(
            "a_stopped_refresh_takes_its_own_snapshot_socket_along_and_leaves_the_namespace_as_it_was",
            refresh_stops_cleanly,
        ),
        libtest_mimic::Trial::test(
            "the_alert_rules_pass_promtool_and_the_pictures_use_only_exported_metrics",
            || contrib_files().map_err(|e| format!("{e:#}").into()),
        ),
    ])
}

/// The unprivileged identity `serve` runs as: nobody, with the metrics group as its only
/// supplementary group (as DynamicUser with SupplementaryGroups gives it).
const NOBODY: u32 = 65534;
/// A group no one on the machine has: the one the companions admit.
const METRICS_GID: u32 = 64999;

/// `refresh --metrics-group` in the rig's host namespace, its messages in refresh.log.
fn start_refresh(rig: &mut Rig, config: &Path) -> Result<u32> {
    let child = spawn_refresh(rig, config)?;
    Ok(rig.track(child))
}

/// [`start_refresh`], the process left to the caller.
fn spawn_refresh(rig: &Rig, config: &Path) -> Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rig.dir.join("refresh.log"))?;
    let child = rig
        .command_in(
            rig.host_fd(),
            &[
                BIN,
                "refresh",
                "--config",
                config.to_str().context("path")?,
                "--metrics-group",
                &METRICS_GID.to_string(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let socket = Path::new("/run/wg-namespace/companion").join(format!("{}.sock", rig.confined));
    // The socket is new once refresh has put its own in place (an earlier run may have left one).
    wait_for(Duration::from_secs(10), "the companion's socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })?;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&socket)?;
    ensure!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777) == (0, METRICS_GID, 0o660),
        "the companion's socket is uid {} gid {} mode {:o}",
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777
    );
    Ok(child)
}

/// The companion socket's inode, None while there is none.
fn companion_inode(rig: &Rig) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let socket = Path::new("/run/wg-namespace/companion").join(format!("{}.sock", rig.confined));
    std::fs::symlink_metadata(socket).ok().map(|m| m.ino())
}

/// Sends SIGTERM to `child` (as systemd stops a unit) once it has settled into its sleep, and
/// waits for it: it must exit 0 soon.
fn stop(child: &mut std::process::Child, what: &str) -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    let pid = child.id();
    wait_for(Duration::from_secs(10), &format!("{what} to sleep"), || {
        let before = wakeups(pid).ok();
        std::thread::sleep(Duration::from_millis(300));
        before.is_some() && wakeups(pid).ok() == before
    })?;
    kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} was still running 5 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "{what} ended with {status} on SIGTERM");
    Ok(())
}

/// What `status --json` says of the namespace that refresh must leave alone.
fn untouched_facts(rig: &Rig) -> Result<Value> {
    let out = rig.helper(&["status", "--json", "--namespace", &rig.confined])?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    let ns = &report["namespaces"][0];
    ensure!(
        ns["firewall"]["loaded"] == true && ns["firewall"]["guardIntact"] == true,
        "the leak guard is not in place: {ns:#}"
    );
    Ok(json!({
        "daemonPid": ns["daemonPid"],
        "interface": ns["interface"],
        "firewall": ns["firewall"],
        "upSince": ns["upSince"],
    }))
}

/// systemd stops refresh with SIGTERM: it must end at once with status 0 and take its snapshot
/// socket along (with no namespace going, nothing else removes it), but only its own: a socket
/// another refresh has put in its place since stays. The namespace stays up and guarded.
fn refresh_stops_cleanly() -> Result<()> {
    let rig = Rig::new(237)?;
    let config = rig.config()?;
    let path = rig.up_with(&config)?;
    let before = untouched_facts(&rig)?;

    // With no endpoint to follow, refresh only answers its socket.
    let mut quiet = config.clone();
    quiet["peers"][0]
        .as_object_mut()
        .context("peer")?
        .remove("endpoint");
    let quiet = rig.write_config("no-endpoint.json", &quiet)?;
    let mut only_socket = spawn_refresh(&rig, &quiet)?;
    stop(&mut only_socket, "refresh with no endpoint to follow")?;
    ensure!(
        companion_inode(&rig).is_none(),
        "the snapshot socket outlived its refresh"
    );

    // Two at once: the second's socket replaces the first's, so the first leaves it alone.
    let mut first = spawn_refresh(&rig, &path)?;
    let first_socket = companion_inode(&rig);
    let mut second = spawn_refresh(&rig, &path)?;
    wait_for(Duration::from_secs(10), "the second socket", || {
        companion_inode(&rig).is_some_and(|ino| Some(ino) != first_socket)
    })?;
    let second_socket = companion_inode(&rig);
    stop(&mut first, "the first refresh")?;
    ensure!(
        companion_inode(&rig) == second_socket,
        "stopping the first refresh removed the second one's socket"
    );
    let answer = read_companion_as_nobody(&rig, &format!("--groups={METRICS_GID}"))?;
    ensure!(
        answer.contains(&rig.confined),
        "the second refresh does not answer: {answer}"
    );
    stop(&mut second, "the second refresh")?;
    ensure!(
        companion_inode(&rig).is_none(),
        "the snapshot socket outlived its refresh"
    );

    let after = untouched_facts(&rig)?;
    ensure!(
        after == before,
        "stopping refresh changed the namespace:\nbefore {before:#}\nafter {after:#}"
    );
    let log = std::fs::read_to_string(rig.dir.join("refresh.log")).unwrap_or_default();
    rig.down()?;
    rig.assert_clean()
        .with_context(|| format!("refresh said: {log}"))
}

/// `serve` on 127.0.0.1:`port` in the rig's host namespace, as nobody with the metrics group
/// and no capabilities left.
fn start_serve(rig: &mut Rig, port: u16) -> Result<u32> {
    let listen = format!("127.0.0.1:{port}");
    let mut command = rig.command_in(rig.host_fd(), &[BIN, "serve", "--listen", &listen]);
    // SAFETY: plain system calls between fork and exec; runs after the setns above.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(METRICS_GID)])?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(NOBODY))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(NOBODY))?;
            Ok(())
        });
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = rig.track(child);
    let address: SocketAddr = listen.parse()?;
    let fd = rig.host_fd();
    wait_for(Duration::from_secs(10), "serve to listen", || {
        Rig::within(fd, || TcpStream::connect(address).is_ok()).unwrap_or(false)
    })?;
    Ok(pid)
}

/// A `ping` of the peer's tunnel address from inside, every `interval` seconds, for as long as
/// the rig lives: what keeps WireGuard handshaking, as a busy tunnel does.
fn keep_pinging(rig: &mut Rig, interval: &str) -> Result<()> {
    let peer = rig.peer_tunnel_ip().to_string();
    let pinger = rig
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
                interval,
                &peer,
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    rig.track(pinger);
    Ok(())
}

/// GET `path` from `address` in the namespace `fd`: the status code and the body.
fn get(fd: &std::os::fd::OwnedFd, address: SocketAddr, path: &str) -> Result<(u16, String)> {
    Rig::within(fd, || -> Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {answer:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok((
            code,
            if chunked {
                dechunk(body)?
            } else {
                body.to_string()
            },
        ))
    })?
}

/// What a process of uid nobody reads from `rig`'s companion socket when it has `groups` and
/// may pass the socket file's mode anyway (CAP_DAC_OVERRIDE): only the companion's own check
/// of its credentials stands between it and the document.
fn read_companion_as_nobody(rig: &Rig, groups: &str) -> Result<String> {
    let socket = format!("/run/wg-namespace/companion/{}.sock", rig.confined);
    let read = "import socket, sys\n\
                s = socket.socket(socket.AF_UNIX)\n\
                s.settimeout(10)\n\
                s.connect(sys.argv[1])\n\
                data = b''\n\
                while True:\n    \
                    chunk = s.recv(65536)\n    \
                    if not chunk: break\n    \
                    data += chunk\n\
                sys.stdout.write(data.decode())\n";
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            groups,
            "--inh-caps=+dac_override",
            "--ambient-caps=+dac_override",
            "--",
            "python3",
            "-c",
            read,
            &socket,
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "reading the companion: {}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A chunked HTTP body (as Prometheus sends its larger answers), joined.
fn dechunk(mut body: &str) -> Result<String> {
    let mut joined = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .context("a chunk without its size")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(joined);
        }
        joined.push_str(rest.get(..size).context("a chunk cut short")?);
        body = rest.get(size + 2..).context("a chunk without its end")?;
    }
}

/// The process's uids and effective capabilities, from /proc.
fn identity(pid: u32) -> Result<(String, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Ok((field("Uid:"), field("CapEff:")))
}

/// Fails when any of `secrets` appears in `text`.
fn no_secret(what: &str, text: &str, secrets: &[String]) -> Result<()> {
    for secret in secrets {
        ensure!(
            !text.contains(secret.as_str()),
            "{what} holds a secret key: {text}"
        );
    }
    Ok(())
}

/// A running Prometheus in the namespace `fd`, killed by PID when dropped.
struct Prometheus {
    child: std::process::Child,
    address: SocketAddr,
}

impl Prometheus {
    fn start(rig: &Rig, target: SocketAddr, port: u16) -> Result<Prometheus> {
        let dir = rig.dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n  - job_name: wg-namespace\n    static_configs:\n      \
                 - targets: ['{target}']\n",
                repo().join(RULES).display()
            ),
        )?;
        let address: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = rig
            .command_in(
                rig.host_fd(),
                &[
                    "prometheus",
                    &format!("--config.file={}", config.display()),
                    &format!("--storage.tsdb.path={}", dir.join("data").display()),
                    &format!("--web.listen-address={address}"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log"))?)
            .spawn()
            .context("starting prometheus (scripts/setup installs it)")?;
        Ok(Prometheus { child, address })
    }

    /// The value of each series `query` returns now, by its netns label.
    fn query(&self, rig: &Rig, query: &str) -> Result<Vec<(String, f64)>> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = get(
            rig.host_fd(),
            self.address,
            &format!("/api/v1/query?query={encoded}"),
        )?;
        ensure!(code == 200, "prometheus answered {code}: {body}");
        let answer: Value = serde_json::from_str(&body)?;
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                let netns = r["metric"]["netns"].as_str()?.to_string();
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((netns, value))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const RULES: &str = "contrib/prometheus/wg-namespace.rules.yml";
const DASHBOARD: &str = "contrib/grafana/wg-namespace.json";

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every PromQL expression of the dashboard and the rules, with Grafana's variables filled in.
fn shipped_queries() -> Result<Vec<String>> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD))?)?;
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    queries.extend(
        std::fs::read_to_string(repo().join(RULES))?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(|e| e.trim().to_string()),
    );
    Ok(queries
        .into_iter()
        .map(|q| q.replace("$netns", ".*").replace("$__rate_interval", "1m"))
        .collect())
}

fn contrib_files() -> Result<()> {
    let checked = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join(RULES))
        .output()
        .context("running promtool (scripts/setup installs it)")?;
    ensure!(
        checked.status.success(),
        "promtool check rules: {}",
        text(&checked)
    );
    let exported: Vec<&str> = wg_namespace::commands::metrics::FAMILIES
        .iter()
        .map(|(name, _, _)| *name)
        .collect();
    let queries = shipped_queries()?;
    ensure!(queries.len() >= 10, "only {} queries found", queries.len());
    for query in &queries {
        let words = query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        for name in words.filter(|w| w.starts_with("wireguard_") || w.starts_with("wg_namespace_"))
        {
            ensure!(
                exported.contains(&name),
                "{name} (in {query}) is not a metric serve exports"
            );
        }
    }
    Ok(())
}

/// The received bytes Prometheus has for each of `namespaces`, once it has them all.
fn received(prometheus: &Prometheus, rig: &Rig, namespaces: &[&str]) -> Result<Vec<f64>> {
    let mut values = Vec::new();
    let waited = wait_for(Duration::from_secs(60), "prometheus to have both", || {
        let query = format!(
            "wireguard_peer_receive_bytes_total{{netns=~\"{}\"}}",
            namespaces.join("|")
        );
        let Ok(series) = prometheus.query(rig, &query) else {
            return false;
        };
        values = namespaces
            .iter()
            .filter_map(|ns| series.iter().find(|(n, _)| n == ns).map(|(_, v)| *v))
            .collect();
        values.len() == namespaces.len()
    });
    if let Err(e) = waited {
        let targets = get(rig.host_fd(), prometheus.address, "/api/v1/targets")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let log = std::fs::read_to_string(rig.dir.join("prometheus/log")).unwrap_or_default();
        bail!(
            "{e}
targets: {targets}
log:
{log}"
        );
    }
    Ok(values)
}

fn prometheus_scrapes() -> Result<()> {
    let mut a = Rig::new(193)?;
    let mut b = Rig::new(194)?;
    let mut companions = Vec::new();
    for rig in [&mut a, &mut b] {
        let config = rig.config()?;
        let path = rig.up_with(&config)?;
        companions.push(start_refresh(rig, &path)?);
    }
    // The companion answers members of the metrics group, and nobody else who is not root.
    let member = read_companion_as_nobody(&a, &format!("--groups={METRICS_GID}"))?;
    ensure!(
        member.contains(&format!("\"namespace\":\"{}\"", a.confined)),
        "a member got {member:?}"
    );
    let stranger = read_companion_as_nobody(&a, "--clear-groups")?;
    ensure!(stranger.is_empty(), "a non-member got {stranger:?}");

    let serve = start_serve(&mut a, 9595)?;
    let (uid, capabilities) = identity(serve)?;
    ensure!(
        uid.split_whitespace().all(|u| u == NOBODY.to_string()),
        "serve runs as uids {uid}"
    );
    ensure!(
        capabilities == "0000000000000000",
        "serve has capabilities {capabilities}"
    );
    let target: SocketAddr = "127.0.0.1:9595".parse()?;
    let prometheus = Prometheus::start(&a, target, 9090)?;
    let names = [a.confined.clone(), b.confined.clone()];
    let namespaces = [names[0].as_str(), names[1].as_str()];
    let before = received(&prometheus, &a, &namespaces)?;

    for rig in [&a, &b] {
        let peer = rig.peer_tunnel_ip().to_string();
        let out = rig.exec(&["ping", "-n", "-c", "5", "-i", "0.2", "-s", "1000", &peer])?;
        ensure!(
            out.status.success(),
            "ping through the tunnel: {}",
            text(&out)
        );
    }
    wait_for(
        Duration::from_secs(60),
        "the received bytes to grow",
        || {
            received(&prometheus, &a, &namespaces).is_ok_and(|after| {
                after
                    .iter()
                    .zip(&before)
                    .all(|(after, before)| after > before)
            })
        },
    )?;

    // The exposition is what Prometheus' own checker accepts.
    let (code, exposition) = get(a.host_fd(), target, "/metrics")?;
    ensure!(code == 200, "/metrics: {code}");
    for ns in namespaces {
        ensure!(
            exposition.contains(&format!(
                "wg_namespace_verdict{{netns=\"{ns}\",verdict=\"healthy\"}} 1"
            )),
            "{ns} not healthy in:\n{exposition}"
        );
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    check
        .stdin
        .take()
        .context("promtool's input")?
        .write_all(exposition.as_bytes())?;
    let checked = output_within(check, Duration::from_secs(30))?;
    ensure!(
        checked.status.success(),
        "promtool check metrics: {}\n{exposition}",
        text(&checked)
    );

    let secrets = [a.confined_key.to_base64(), b.confined_key.to_base64()];
    no_secret("/metrics", &exposition, &secrets)?;
    let (code, all) = get(a.host_fd(), target, "/v1/namespaces")?;
    ensure!(code == 200, "/v1/namespaces: {code}");
    no_secret("/v1/namespaces", &all, &secrets)?;
    let all: Value = serde_json::from_str(&all)?;
    for ns in namespaces {
        ensure!(
            all["namespaces"]
                .as_array()
                .is_some_and(|list| list.iter().any(|d| d["namespace"] == ns)),
            "{ns} missing from /v1/namespaces"
        );
    }
    let (code, _) = get(a.host_fd(), target, "/v1/namespaces/wgt193nothere")?;
    ensure!(code == 404, "an unknown namespace gave {code}");

    // The dashboard's queries and the alert rules run on what was scraped.
    for query in shipped_queries()? {
        prometheus
            .query(&a, &query)
            .with_context(|| format!("the shipped query {query}"))?;
    }
    let (code, rules) = get(a.host_fd(), prometheus.address, "/api/v1/rules")?;
    ensure!(code == 200, "rules: {code} {rules}");
    let rules: Value = serde_json::from_str(&rules)?;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    ensure!(loaded.len() == 4, "rules loaded: {rules:#}");
    for rule in loaded {
        ensure!(rule["health"] != "err", "a rule fails: {rule:#}");
    }

    drop(prometheus);
    socket_activated(&a)?;
    bounded(&a, target, serve)?;

    // b's companion stops: serve says so; `metrics` as root inspects b itself.
    b.kill_tracked(companions[1]);
    let (code, document) = get(
        a.host_fd(),
        target,
        &format!("/v1/namespaces/{}", b.confined),
    )?;
    ensure!(
        code == 200 && document.contains("does not answer") && document.contains("\"down\""),
        "{code} {document}"
    );
    let printed = a.helper(&["metrics"])?;
    ensure!(printed.status.success(), "metrics: {}", text(&printed));
    let printed = String::from_utf8_lossy(&printed.stdout);
    for ns in namespaces {
        let healthy = format!("wg_namespace_verdict{{netns=\"{ns}\",verdict=\"healthy\"}} 1");
        ensure!(
            printed.contains(&healthy),
            "{healthy} missing from:\n{printed}"
        );
    }
    no_secret("metrics", &printed, &secrets)?;
    Ok(())
}

/// `serve` started as systemd starts it (the listening socket passed as LISTEN_FDS, by
/// systemd-socket-activate), as nobody: it answers on the passed socket, and exits by itself
/// once idle.
fn socket_activated(rig: &Rig) -> Result<()> {
    let address: SocketAddr = "127.0.0.1:9596".parse()?;
    let mut child = rig
        .command_in(
            rig.host_fd(),
            &[
                "systemd-socket-activate",
                "--listen",
                &address.to_string(),
                "setpriv",
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                &format!("--groups={METRICS_GID}"),
                "--",
                BIN,
                "serve",
                "--exit-when-idle",
                "3",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("systemd-socket-activate (Debian's systemd package)")?;
    let fd = rig.host_fd();
    let answered = wait_for(Duration::from_secs(10), "the activated serve", || {
        get(fd, address, "/metrics").is_ok_and(|(code, body)| {
            code == 200 && body.contains("# TYPE wg_namespace_verdict gauge")
        })
    });
    if let Err(e) = answered {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let (uid, _) = identity(child.id())?;
    ensure!(
        uid.starts_with(&NOBODY.to_string()),
        "activated serve runs as {uid}"
    );
    let exited = output_within(child, Duration::from_secs(20))?;
    ensure!(
        exited.status.success(),
        "the activated serve did not exit cleanly when idle: {}",
        text(&exited)
    );
    Ok(())
}

/// `serve` bounds what a client can make it hold: the request's size and time, and the number
/// of connections at once; and it answers GET (and HEAD) only.
fn bounded(rig: &Rig, target: SocketAddr, serve: u32) -> Result<()> {
    let fd = rig.host_fd();
    let exchange = |request: &[u8]| -> Result<String> {
        Rig::within(fd, || -> Result<String> {
            let mut stream = TcpStream::connect(target)?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.write_all(request)?;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            Ok(String::from_utf8_lossy(&answer).into_owned())
        })?
    };
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let answer = exchange(huge.as_bytes())?;
    ensure!(
        answer.starts_with("HTTP/1.1 431"),
        "a 9 KB request: {answer:?}"
    );
    let answer = exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")?;
    ensure!(answer.starts_with("HTTP/1.1 405"), "a POST: {answer:?}");

    // Sixteen clients that send nothing: the seventeenth is turned away at once. Prometheus has
    // stopped, so these are the server's only clients, and its request threads (one for each
    // connection it holds, gone once it lets go) show when it holds all sixteen. Asking before
    // that fails on a busy machine: a thread of an earlier answer not yet gone holds a place,
    // one of the sixteen is turned away instead, and the next client is rightly answered.
    let mut seen = Vec::new();
    let silent = loop {
        wait_for(
            Duration::from_secs(30),
            "serve to let go of its earlier clients",
            || request_threads(serve).is_ok_and(|n| n == 0),
        )?;
        let silent: Vec<TcpStream> = (0..16)
            .map(|_| Rig::within(fd, || TcpStream::connect(target))?.map_err(Into::into))
            .collect::<Result<_>>()?;
        wait_for(Duration::from_secs(10), "serve to hold the sixteen", || {
            request_threads(serve).is_ok_and(|n| n == 16)
        })?;
        let answer = exchange(b"GET /metrics HTTP/1.1\r\n\r\n")?;
        let status = answer.lines().next().unwrap_or_default().to_string();
        if status.starts_with("HTTP/1.1 503") {
            break silent;
        }
        let still = silent.iter().filter(|s| held(s)).count();
        seen.push(format!(
            "{status:?}, {still} of the sixteen still held after it"
        ));
        // Only on a very slow machine is one of them given up (after 10 s) before the
        // seventeenth arrives: then ask again.
        ensure!(
            still < 16 && seen.len() < 3,
            "the 17th connection: {seen:#?}"
        );
    };
    // ... and the silent ones are given up after the request deadline (10 s).
    let started = std::time::Instant::now();
    let mut first = silent.into_iter().next().context("a silent client")?;
    first.set_nonblocking(false)?;
    first.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut answer = Vec::new();
    let _ = first.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 408") && started.elapsed() < Duration::from_secs(15),
        "a silent client after {:?}: {answer:?}",
        started.elapsed()
    );
    wait_for(
        Duration::from_secs(10),
        "serve to take requests again",
        || get(fd, target, "/metrics").is_ok_and(|(code, _)| code == 200),
    )?;
    Ok(())
}

/// Whether the server still holds `stream` unanswered: neither an answer nor its close has
/// arrived.
fn held(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).is_ok()
        && matches!(
            stream.peek(&mut [0u8]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
}

/// How many connections `serve` (its PID) holds: it has one thread for each.
fn request_threads(serve: u32) -> Result<usize> {
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{serve}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "request" {
            threads += 1;
        }
    }
    Ok(threads)
}

/// Polls the health endpoint of `rig`'s namespace until it answers `code`.
fn health_becomes(rig: &Rig, target: SocketAddr, code: u16, limit: Duration) -> Result<Value> {
    let path = format!("/v1/namespaces/{}/health", rig.confined);
    let mut last = (0, String::new());
    let reached = wait_for(limit, &format!("health {code}"), || {
        match get(rig.host_fd(), target, &path) {
            Ok(answer) => {
                last = answer;
                last.0 == code
            }
            Err(_) => false,
        }
    });
    reached.with_context(|| format!("last answer: {} {}", last.0, last.1))?;
    Ok(serde_json::from_str(&last.1)?)
}

fn health_follows() -> Result<()> {
    let mut rig = Rig::new(195)?;
    let psk = wireguard_control::Key::generate_preshared();
    rig.add_second_peer(Some(psk.clone()))?;
    let psk_file = rig.write_secret("second.psk", &psk.to_base64())?;
    let mut config = rig.config()?;
    config["peers"][0]["failoverAfterSeconds"] = json!(5);
    config["publishPorts"] = json!([{ "hostPort": 18195, "namespacePort": 8195 }]);
    config["peers"][0]["alternatives"] = json!([{
        "publicKey": rig.second_peer().key.get_public().to_base64(),
        "endpoint": format!("{}:{WG_PORT}", rig.second_peer_underlay()),
        "presharedKeyFile": psk_file,
    }]);
    let path = rig.up_with(&config)?;
    start_refresh(&mut rig, &path)?;
    start_serve(&mut rig, 9595)?;
    let target: SocketAddr = "127.0.0.1:9595".parse()?;
    let secrets = [rig.confined_key.to_base64(), psk.to_base64()];

    // Traffic keeps the tunnel busy, so that silence is noticed.
    keep_pinging(&mut rig, "0.2")?;
    health_becomes(&rig, target, 200, Duration::from_secs(30))?;
    let (_, exposition) = get(rig.host_fd(), target, "/metrics")?;
    let relay = format!(
        "{{direction=\"publish\",host_address=\"127.0.0.1\",host_port=\"18195\",\
         namespace_port=\"8195\",netns=\"{}\",protocol=\"tcp\"}}",
        rig.confined
    );
    for series in [
        format!("wg_namespace_relay_running{relay} 1"),
        format!("wg_namespace_relay_sessions_open{relay} 0"),
    ] {
        ensure!(
            exposition.lines().any(|l| l == series),
            "{series} missing from:\n{exposition}"
        );
    }

    // Both servers fall silent: degraded once no server answers.
    rig.stop_peer_wg();
    rig.stop_second_peer_wg();
    let sick = health_becomes(&rig, target, 503, Duration::from_secs(90))?;
    ensure!(sick["verdict"] == "degraded", "{sick:#}");
    no_secret("health", &sick.to_string(), &secrets)?;
    let (_, exposition) = get(rig.host_fd(), target, "/metrics")?;
    no_secret("/metrics", &exposition, &secrets)?;
    let switches = format!(
        "wg_namespace_peer_switches_total{{device=\"{c}\",netns=\"{c}\",public_key=\"{}\"}}",
        rig.peer_key.get_public().to_base64(),
        c = rig.confined
    );
    let switched = exposition
        .lines()
        .find_map(|l| l.strip_prefix(&switches))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    ensure!(switched >= 1.0, "no switch counted:\n{exposition}");

    // They answer again: healthy again.
    rig.start_peer_wg()?;
    rig.start_second_peer_wg()?;
    health_becomes(&rig, target, 200, Duration::from_secs(90))?;

    // The leak guard is flushed: down, until heal puts it back.
    let flushed = rig
        .command_in(
            &rig.confined_fd()?,
            &["nft", "flush", "table", "inet", "wg_namespace_guard"],
        )
        .output()?;
    ensure!(flushed.status.success(), "flushing: {}", text(&flushed));
    let down = health_becomes(&rig, target, 503, Duration::from_secs(30))?;
    ensure!(down["verdict"] == "down", "{down:#}");
    let (_, exposition) = get(rig.host_fd(), target, "/metrics")?;
    ensure!(
        exposition.contains(&format!(
            "wg_namespace_guard_intact{{netns=\"{}\"}} 0",
            rig.confined
        )),
        "guard not reported broken:\n{exposition}"
    );
    let healed = rig.helper(&["heal", "--namespace", &rig.confined])?;
    ensure!(healed.status.success(), "heal: {}", text(&healed));
    health_becomes(&rig, target, 200, Duration::from_secs(30))?;
    let (_, exposition) = get(rig.host_fd(), target, "/metrics")?;
    ensure!(
        exposition.contains(&format!(
            "wg_namespace_heals_total{{netns=\"{}\"}} 1",
            rig.confined
        )),
        "heal not counted:\n{exposition}"
    );
    let (_, document) = get(
        rig.host_fd(),
        target,
        &format!("/v1/namespaces/{}", rig.confined),
    )?;
    no_secret("the namespace's document", &document, &secrets)?;
    let (code, port) = get(
        rig.host_fd(),
        target,
        &format!("/v1/namespaces/{}/forwarded-port", rig.confined),
    )?;
    ensure!(code == 200 && port.contains("\"port\": 0"), "{code} {port}");
    Ok(())
}

/// How long a peer may go without a handshake before its namespace is degraded
/// (`status::HANDSHAKE_STALE`, the 3 minutes of the shipped alert rule).
const HANDSHAKE_STALE: Duration = Duration::from_secs(180);

/// Asks the health endpoint once a second (the wait is minutes long) until it answers `code`;
/// the answer and when it came.
fn health_by(
    rig: &Rig,
    target: SocketAddr,
    code: u16,
    limit: Duration,
) -> Result<(Value, std::time::Instant)> {
    let path = format!("/v1/namespaces/{}/health", rig.confined);
    let deadline = std::time::Instant::now() + limit;
    let mut last = None;
    loop {
        if let Ok(answer) = get(rig.host_fd(), target, &path) {
            if answer.0 == code {
                return Ok((serde_json::from_str(&answer.1)?, std::time::Instant::now()));
            }
            last = Some(answer);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "health did not answer {code} within {}s; last answer: {last:?}",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The one peer of a namespace (no alternatives, so no failover to notice it) stops answering:
/// its namespace drops the tunnel's UDP. The only sign is the handshake's age, so health turns
/// 503 (degraded, the reason naming the peer and the age) once the last handshake is older than
/// three minutes, and 200 again once the peer answers.
fn silent_peer() -> Result<()> {
    let mut rig = Rig::new(240)?;
    let config = rig.config()?;
    ensure!(
        config["peers"][0].get("alternatives").is_none(),
        "the peer has alternatives: {config:#}"
    );
    let path = rig.up_with(&config)?;
    start_refresh(&mut rig, &path)?;
    start_serve(&mut rig, 9595)?;
    let target: SocketAddr = "127.0.0.1:9595".parse()?;

    // Traffic keeps WireGuard handshaking, as a busy tunnel does.
    keep_pinging(&mut rig, "0.5")?;
    let document = format!("/v1/namespaces/{}", rig.confined);
    let handshake_ago = |rig: &Rig| -> Option<u64> {
        let (_, body) = get(rig.host_fd(), target, &document).ok()?;
        let document: Value = serde_json::from_str(&body).ok()?;
        document["peers"][0]["latestHandshakeSecondsAgo"].as_u64()
    };
    wait_for(Duration::from_secs(30), "a first handshake", || {
        handshake_ago(&rig).is_some()
    })?;
    health_by(&rig, target, 200, Duration::from_secs(10))?;

    // The peer falls silent: whatever reaches its WireGuard port is dropped.
    let table = format!("wgt{}_silence", rig.id);
    let rule = format!(
        "table inet {table} {{ chain input {{ type filter hook input priority -10; \
         udp dport {WG_PORT} drop; }}; }}"
    );
    let silenced = rig.command_in(rig.peer_fd(), &["nft", &rule]).output()?;
    ensure!(silenced.status.success(), "silencing: {}", text(&silenced));
    let since = std::time::Instant::now();
    let age_then = handshake_ago(&rig).context("the handshake's age")?;
    ensure!(
        age_then < 60,
        "the last handshake is {age_then}s old already"
    );

    // Degraded once the last handshake is over three minutes old, and not long after.
    let stale_in = HANDSHAKE_STALE.saturating_sub(Duration::from_secs(age_then));
    let (sick, at) = health_by(&rig, target, 503, stale_in + Duration::from_secs(45))?;
    ensure!(
        at - since + Duration::from_secs(age_then + 2) >= HANDSHAKE_STALE,
        "503 after {}s of silence, with the last handshake {age_then}s old then: {sick:#}",
        (at - since).as_secs()
    );
    ensure!(sick["verdict"] == "degraded", "{sick:#}");
    let peer = rig.peer_key.get_public().to_base64();
    let reasons = sick["reasons"].as_array().context("no reasons")?;
    ensure!(
        reasons.iter().any(|r| r
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("peer {peer}: no handshake for")))),
        "no reason names the silent peer: {sick:#}"
    );
    no_secret(
        "health",
        &sick.to_string(),
        &[rig.confined_key.to_base64(), rig.peer_key.to_base64()],
    )?;

    // It answers again: the next handshake makes the namespace healthy.
    let heard = rig
        .command_in(rig.peer_fd(), &["nft", "delete", "table", "inet", &table])
        .output()?;
    ensure!(heard.status.success(), "unsilencing: {}", text(&heard));
    health_by(&rig, target, 200, Duration::from_secs(30))?;
    ensure!(
        handshake_ago(&rig).is_some_and(|ago| ago < 30),
        "healthy without a new handshake"
    );
    Ok(())
}
