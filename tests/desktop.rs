//! `wg-namespace exec` by ordinary users, through the exec service (issue 23): who gets in,
//! what they get, and what a hostile client cannot get. Users are made here with useradd and
//! removed again; the service is started the way systemd's socket unit starts it (a listening
//! socket passed as LISTEN_FDS), with the unit's capability bounding set.

mod common;

use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, bind, listen, sendmsg,
    socket,
};

/// Set for the test binary run as a raw client (see [`raw_client`]).
const RAW_CLIENT: &str = "WGNS_TEST_RAW_CLIENT";

fn main() {
    if let Ok(socket) = std::env::var(RAW_CLIENT) {
        std::process::exit(raw_client(&socket));
    }
    run(vec![
        trial(
            "allowed_users_run_through_the_tunnel_as_themselves_and_others_are_refused",
            allowed_and_refused,
        ),
        trial(
            "a_hostile_client_gets_nothing_root_would_not_give_and_a_flood_is_bounded",
            hostile,
        ),
        trial(
            "headless_chromium_started_by_an_allowed_user_renders_the_peers_page",
            chromium,
        ),
    ])
}

/// A user (and its own group) made for the test, removed with its home when dropped.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl TestUser {
    fn new(name: &str, extra_groups: &[&str]) -> Result<TestUser> {
        let mut args = vec![
            "useradd",
            "--create-home",
            "--user-group",
            "--shell",
            "/bin/sh",
        ];
        let groups = extra_groups.join(",");
        if !extra_groups.is_empty() {
            args.extend(["--groups", &groups]);
        }
        args.push(name);
        sh(&args)?;
        let user = nix::unistd::User::from_name(name)?.context("the new user")?;
        Ok(TestUser {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })
    }

    /// `argv` run as this user (with its groups) in the rig's host namespace.
    fn command(&self, rig: &Rig, argv: &[&str]) -> Command {
        let uid = self.uid.to_string();
        let gid = self.gid.to_string();
        let mut full = vec![
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &gid,
            "--init-groups",
            "--",
        ];
        full.extend_from_slice(argv);
        let mut command = rig.command_in(rig.host_fd(), &full);
        command.current_dir(&self.home).env("HOME", &self.home);
        command
    }

    /// `wg-namespace exec --namespace NS -- argv` as this user, through `service`.
    fn exec(&self, rig: &Rig, service: &Service, namespace: &str, argv: &[&str]) -> Command {
        let mut full = vec![BIN, "exec", "--namespace", namespace, "--"];
        full.extend_from_slice(argv);
        let mut command = self.command(rig, &full);
        command.env(
            wg_namespace::system::exec_socket::SOCKET_ENV,
            &service.socket,
        );
        command
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // userdel refuses while a process of the user runs: a command the service's end is
        // still taking down gets a few seconds.
        let _ = wait_for(Duration::from_secs(5), "the user's removal", || {
            let _ = run_cmd(&["userdel", "--remove", &self.name]);
            matches!(nix::unistd::User::from_name(&self.name), Ok(None))
        });
        let _ = run_cmd(&["groupdel", &self.name]);
    }
}

struct TestGroup(String);

impl TestGroup {
    fn new(name: &str) -> Result<TestGroup> {
        sh(&["groupadd", name])?;
        Ok(TestGroup(name.to_string()))
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = run_cmd(&["groupdel", &self.0]);
    }
}

fn user_name(rig: &Rig, letter: char) -> String {
    format!("wgt{}{letter}{}", rig.id, std::process::id() % 100_000)
}

/// The exec service, started as systemd starts it from wg-namespace-exec.socket, listening
/// on a socket of its own in the rig's directory.
struct Service {
    socket: PathBuf,
    child: Child,
    log: PathBuf,
}

/// The capability bounding set of the module's wg-namespace-exec.service.
const UNIT_CAPABILITIES: &str = "-all,+sys_admin,+dac_read_search,+setuid,+setgid,+setpcap";

impl Service {
    fn start(rig: &Rig, idle_seconds: u64) -> Result<Service> {
        let path = rig.dir.join("exec.sock");
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(listener.as_raw_fd(), &UnixAddr::new(&path)?)?;
        listen(&listener, nix::sys::socket::Backlog::new(64)?)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let log = rig.dir.join("exec-service.log");
        let script = format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec setpriv --bounding-set={UNIT_CAPABILITIES} {BIN} exec-service --idle-seconds {idle_seconds}"
        );
        let mut command = rig.command_in(rig.host_fd(), &["sh", "-c", &script]);
        let raw = listener.as_raw_fd();
        // SAFETY: dup2 onto descriptor 3 (which then survives exec), between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(raw, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .process_group(0)
            .spawn()?;
        drop(listener);
        Ok(Service {
            socket: path,
            child,
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // The service and its connections' processes share its process group; the commands
        // (sessions of their own) die with their connection's process.
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A web server on the peer's tunnel address, port 8000: reachable only through the tunnel.
fn peer_web_server(rig: &Rig, marker: &'static str) -> Result<SocketAddr> {
    let addr = SocketAddr::new(rig.peer_tunnel_ip().into(), 8000);
    let listener = Rig::within(rig.peer_fd(), || TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buffer = [0u8; 2048];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let body = format!(
                    "<html><head><title>peer</title></head><body style=\"background:#2a7\"><h1>{marker}</h1></body></html>\n"
                );
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    Ok(addr)
}

/// A directory where the commands could leave a mark if they ran, whoever they ran as.
fn anyone_writes(rig: &Rig) -> Result<PathBuf> {
    let dir = rig.dir.join("marks");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
    Ok(dir)
}

fn config_allowing(rig: &Rig, users: &[&str], groups: &[&str]) -> Result<serde_json::Value> {
    let mut config = rig.config()?;
    config["allowedUsers"] = serde_json::json!(users);
    config["allowedGroups"] = serde_json::json!(groups);
    Ok(config)
}

fn output(mut command: Command, limit: Duration) -> Result<Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    output_within(child, limit)
}

const MARKER: &str = "served by the peer through the tunnel";

fn allowed_and_refused() -> Result<()> {
    let rig = Rig::new(91)?;
    let group = TestGroup::new(&user_name(&rig, 'g'))?;
    let alice = TestUser::new(&user_name(&rig, 'a'), &[])?;
    let carol = TestUser::new(&user_name(&rig, 'c'), &[&group.0])?;
    let bob = TestUser::new(&user_name(&rig, 'b'), &[])?;
    rig.up_with(&config_allowing(&rig, &[&alice.name], &[&group.0])?)?;
    let web = peer_web_server(&rig, MARKER)?;
    let service = Service::start(&rig, 30)?;
    let ns = rig.confined.as_str();

    // An allowed user reaches the peer's page through the tunnel, without root.
    let url = format!("http://{web}/");
    let out = output(
        alice.exec(
            &rig,
            &service,
            ns,
            &["curl", "-sS", "--max-time", "10", &url],
        ),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(MARKER),
        "curl as {} through the exec service: {}\nservice: {}",
        alice.name,
        text(&out),
        service.log()
    );
    // The caller's own standard input, output and error are the command's.
    let mut command = alice.exec(
        &rig,
        &service,
        ns,
        &["sh", "-c", "tr a-z A-Z; echo to-stderr >&2"],
    );
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"typed by the caller\n")?;
    let out = output_within(child, Duration::from_secs(20))?;
    ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout) == "TYPED BY THE CALLER\n"
            && String::from_utf8_lossy(&out.stderr).contains("to-stderr"),
        "the caller's descriptors: {}",
        text(&out)
    );
    // The command's exit status comes back.
    let out = output(
        alice.exec(&rig, &service, ns, &["sh", "-c", "exit 7"]),
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.code() == Some(7),
        "exit 7 came back as {}",
        text(&out)
    );

    // A member of an allowed group runs as exactly itself: uid, gid, groups; with nothing to
    // regain, in its working directory.
    let script = "id -u; id -g; id -G | tr ' ' '\\n' | sort -n | tr '\\n' ' '; echo; \
                  grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status; pwd; \
                  readlink /proc/self/ns/net";
    let out = output(
        carol.exec(&rig, &service, ns, &["sh", "-c", script]),
        Duration::from_secs(20),
    )?;
    ensure!(out.status.success(), "as {}: {}", carol.name, text(&out));
    let got = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = got.lines().map(str::trim).collect();
    let group_gid = nix::unistd::Group::from_name(&group.0)?
        .context("group")?
        .gid
        .as_raw();
    let mut groups = [carol.gid, group_gid];
    groups.sort();
    let inside = rig.exec(&["readlink", "/proc/self/ns/net"])?;
    ensure!(inside.status.success(), "root's exec: {}", text(&inside));
    let confined_ns = String::from_utf8_lossy(&inside.stdout).trim().to_string();
    let zero = "0000000000000000";
    let expected = [
        carol.uid.to_string(),
        carol.gid.to_string(),
        groups
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        format!("CapEff:\t{zero}"),
        format!("CapBnd:\t{zero}"),
        "NoNewPrivs:\t1".to_string(),
        carol.home.display().to_string(),
        confined_ns,
    ];
    ensure!(
        lines == expected,
        "as {} the command saw:\n{got}\nexpected:\n{}",
        carol.name,
        expected.join("\n")
    );

    // A user named nowhere: one line, non-zero, and nothing ran.
    let ran = anyone_writes(&rig)?.join("bob-ran");
    let ran_str = ran.to_str().context("path")?;
    let out = output(
        bob.exec(&rig, &service, ns, &["touch", ran_str]),
        Duration::from_secs(20),
    )?;
    let line = one_error_line(&out, 1)?;
    ensure!(
        line.contains(&bob.name) && line.contains("allowedUsers") && !ran.exists(),
        "{} was not refused as expected: {}",
        bob.name,
        text(&out)
    );
    // A reload that names the user lets it in, with the namespace still running.
    let config = rig.write_config(
        "config.json",
        &config_allowing(&rig, &[&alice.name, &bob.name], &[&group.0])?,
    )?;
    let out = rig.helper(&["reload", "--config", config.to_str().context("path")?])?;
    ensure!(out.status.success(), "reload: {}", text(&out));
    let out = output(
        bob.exec(&rig, &service, ns, &["touch", ran_str]),
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.success() && ran.exists(),
        "{} after the reload that allows it: {}",
        bob.name,
        text(&out)
    );
    std::fs::remove_file(&ran)?;

    // --user stays root's.
    let mut command = alice.command(
        &rig,
        &[
            BIN,
            "exec",
            "--namespace",
            ns,
            "--user",
            "root",
            "--",
            "touch",
            ran_str,
        ],
    );
    command.env(
        wg_namespace::system::exec_socket::SOCKET_ENV,
        &service.socket,
    );
    let out = output(command, Duration::from_secs(20))?;
    one_error_line(&out, 2)?;
    ensure!(
        !ran.exists(),
        "--user root ran something for {}",
        alice.name
    );
    Ok(())
}

/// The raw client ([`raw_client`]) run as `user` with `request`; its output: what the
/// command printed on the passed descriptors, then the service's answer.
fn raw(
    rig: &Rig,
    user: &TestUser,
    service: &Service,
    request: &str,
    extra_fd: bool,
) -> Result<Output> {
    let exe = std::env::current_exe()?;
    let mut command = user.command(rig, &[exe.to_str().context("path")?]);
    command
        .env(RAW_CLIENT, &service.socket)
        .env("WGNS_TEST_REQUEST", request);
    if extra_fd {
        command.env("EXTRA_FD", "1");
    }
    output(command, Duration::from_secs(30))
}

fn request(namespace: &str, command: &[&str], cwd: Option<&str>, env: &[(&str, &str)]) -> String {
    serde_json::json!({
        "namespace": namespace,
        "command": command,
        "cwd": cwd,
        "env": env,
    })
    .to_string()
}

/// PIDs of the processes running `argv` exactly, as `uid`.
fn running_as(uid: u32, argv: &str) -> Vec<u32> {
    processes_mentioning(argv.split(' ').next_back().unwrap_or(argv))
        .into_iter()
        .filter(|&pid| cmdline(pid) == argv && uid_of(pid) == Some(uid))
        .collect()
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|rest| rest.trim().to_string())
}

fn uid_of(pid: u32) -> Option<u32> {
    status_field(pid, "Uid:")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| status_field(pid, "PPid:").and_then(|p| p.parse().ok()) == Some(parent))
        .collect()
}

fn refused(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stdout).contains("\"refused\"")
}

fn hostile() -> Result<()> {
    let rig = Rig::new(93)?;
    let other = Rig::new(92)?;
    let alice = TestUser::new(&user_name(&rig, 'a'), &[])?;
    let bob = TestUser::new(&user_name(&rig, 'b'), &[])?;
    rig.up_with(&config_allowing(&rig, &[&alice.name], &[])?)?;
    other.up_with(&other.config()?)?;
    let service = Service::start(&rig, 30)?;
    let ns = rig.confined.as_str();
    let ran = anyone_writes(&rig)?.join("ran");
    let ran_str = ran.to_str().context("path")?;

    // A namespace that does not name the user, and one that is not a namespace name.
    let out = output(
        alice.exec(&rig, &service, &other.confined, &["touch", ran_str]),
        Duration::from_secs(20),
    )?;
    let line = one_error_line(&out, 1)?;
    ensure!(
        line.contains(&other.confined) && !ran.exists(),
        "namespace {} allows nobody, yet: {}",
        other.confined,
        text(&out)
    );
    let asked = request("../../etc", &["touch", ran_str], None, &[]);
    let out = raw(&rig, &alice, &service, &asked, false)?;
    ensure!(
        refused(&out) && !ran.exists(),
        "a path as namespace: {}",
        text(&out)
    );

    // Who runs is the socket's peer, whatever the request says.
    let mut with_uid: serde_json::Value =
        serde_json::from_str(&request(ns, &["touch", ran_str], None, &[]))?;
    with_uid["uid"] = 0.into();
    let out = raw(&rig, &alice, &service, &with_uid.to_string(), false)?;
    ensure!(
        refused(&out) && !ran.exists(),
        "a request naming uid 0: {}",
        text(&out)
    );

    // Nothing that changes how programs load or where they talk to reaches the command.
    let env = [
        ("LD_PRELOAD", "/tmp/evil.so"),
        ("LD_LIBRARY_PATH", "/tmp"),
        ("GCONV_PATH", "/tmp"),
        ("BASH_ENV", "/tmp/evil.sh"),
        ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/tmp/bus"),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
        ("LC_TIME", "C"),
        ("WAYLAND_DISPLAY", "wayland-0"),
        ("PATH", "/usr/bin:/bin"),
    ];
    let out = raw(
        &rig,
        &alice,
        &service,
        &request(ns, &["env"], None, &env),
        false,
    )?;
    let got = String::from_utf8_lossy(&out.stdout);
    let mut seen: Vec<&str> = got
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with('{'))
        .collect();
    seen.sort();
    let home = format!("HOME={}", alice.home.display());
    let user = format!("USER={}", alice.name);
    let logname = format!("LOGNAME={}", alice.name);
    let mut expected = vec![
        home.as_str(),
        "LANG=C.UTF-8",
        "LC_TIME=C",
        logname.as_str(),
        "PATH=/usr/bin:/bin",
        "SHELL=/bin/sh",
        user.as_str(),
        "WAYLAND_DISPLAY=wayland-0",
    ];
    expected.sort();
    ensure!(
        seen == expected,
        "the command's environment: {seen:?}, expected {expected:?}"
    );

    // A working directory that leads where only root may go: the command starts in /.
    let secret = rig.dir.join("root-only");
    std::fs::create_dir(&secret)?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700))?;
    let link = rig.dir.join("innocent");
    std::os::unix::fs::symlink(&secret, &link)?;
    let asked = request(ns, &["pwd"], Some(link.to_str().context("path")?), &[]);
    let out = raw(&rig, &alice, &service, &asked, false)?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).lines().next() == Some("/")
            && String::from_utf8_lossy(&out.stderr).contains("cannot enter"),
        "a symlink to a root-only working directory: {}",
        text(&out)
    );

    // More descriptors than the three, or a request over the size limit: refused, nothing runs.
    let asked = request(ns, &["touch", ran_str], None, &[]);
    let out = raw(&rig, &alice, &service, &asked, true)?;
    ensure!(
        refused(&out) && !ran.exists(),
        "four descriptors: {}",
        text(&out)
    );
    let long = "x".repeat(wg_namespace::system::exec_socket::MAX_REQUEST);
    let asked = request(ns, &["touch", ran_str, &long], None, &[]);
    let out = raw(&rig, &alice, &service, &asked, false)?;
    ensure!(
        refused(&out) && !ran.exists(),
        "an oversized request: {}",
        text(&out)
    );

    // A client that connects and says nothing is let go of at the exchange deadline.
    let silent = {
        let exe = std::env::current_exe()?;
        // Another user's: it holds a place of its own while it waits.
        let mut command = bob.command(&rig, &[exe.to_str().context("path")?]);
        command
            .env(RAW_CLIENT, &service.socket)
            .env("WGNS_TEST_REQUEST", "silent")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?
    };

    // A flood: only MAX_PER_USER commands run for one user, the rest are refused at once.
    let most = wg_namespace::commands::exec_service::MAX_PER_USER;
    let mut clients = Vec::new();
    for _ in 0..most + 4 {
        let mut command = alice.exec(&rig, &service, ns, &["sleep", "93"]);
        clients.push(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    let sleeping = || running_as(alice.uid, "sleep 93");
    let counted = wait_for(
        Duration::from_secs(20),
        "the flood's commands to start",
        || sleeping().len() >= most,
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut refusals = 0;
    for client in &mut clients {
        if let Some(status) = client.try_wait()? {
            let mut stderr = String::new();
            client
                .stderr
                .take()
                .context("stderr")?
                .read_to_string(&mut stderr)?;
            ensure!(
                status.code() == Some(1) && stderr.contains("as many commands"),
                "a flood client ended with {status}: {stderr}"
            );
            refusals += 1;
        }
    }
    let running = sleeping().len();
    // The connection processes whose commands run have become the user: only the silent
    // client's, still waiting for a request, is root's.
    let service_children = children_of(service.child.id());
    let as_root: Vec<u32> = service_children
        .iter()
        .copied()
        .filter(|&pid| uid_of(pid) != Some(alice.uid))
        .collect();
    // Ending a client ends its command.
    for client in &mut clients {
        let _ = client.kill();
        let _ = client.wait();
    }
    let ended = wait_for(
        Duration::from_secs(10),
        "the commands to end with their clients",
        || sleeping().is_empty(),
    );
    counted.with_context(|| format!("service: {}", service.log()))?;
    ensure!(
        running == most && refusals == 4,
        "{running} commands ran and {refusals} were refused; expected {most} and 4; service: {}",
        service.log()
    );
    ensure!(
        service_children.len() == most + 1 && as_root.len() == 1,
        "the service's connection processes {service_children:?}: not the user's: {as_root:?}"
    );
    ended?;

    let out = output_within(silent, Duration::from_secs(30))?;
    let got = String::from_utf8_lossy(&out.stdout);
    let waited: u64 = got
        .lines()
        .find_map(|l| l.strip_prefix("after "))
        .and_then(|s| s.trim_end_matches('s').parse().ok())
        .with_context(|| format!("silent client: {}", text(&out)))?;
    ensure!(
        got.contains("nothing came within the deadline") && (9..=16).contains(&waited),
        "a silent client: {}",
        text(&out)
    );
    Ok(())
}

/// What the probe of this machine found Chromium needs here: no sandbox (no user namespaces
/// for it, and no_new_privs keeps its setuid helper from working), and none of its own
/// background connections.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=800,600",
];

fn chromium() -> Result<()> {
    let rig = Rig::new(94)?;
    let alice = TestUser::new(&user_name(&rig, 'a'), &[])?;
    rig.up_with(&config_allowing(&rig, &[&alice.name], &[])?)?;
    let web = peer_web_server(&rig, MARKER)?;
    let service = Service::start(&rig, 60)?;
    let url = format!("http://{web}/");
    let profile = |name: &str| format!("--user-data-dir={}", alice.home.join(name).display());
    let browser = |extra: &[String]| -> Vec<String> {
        let mut argv = vec!["chromium".to_string()];
        argv.extend(CHROMIUM_FLAGS.iter().map(|f| f.to_string()));
        argv.extend_from_slice(extra);
        argv.push(url.clone());
        argv
    };
    let limit = Duration::from_secs(90);

    // Through the exec service: the page, as a screenshot and as the DOM.
    let shot = alice.home.join("peer.png");
    let argv = browser(&[profile("vpn-1"), format!("--screenshot={}", shot.display())]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = output(alice.exec(&rig, &service, &rig.confined, &argv), limit)?;
    ensure!(
        out.status.success() && shot.exists(),
        "chromium --screenshot through the exec service: {}\nservice: {}",
        text(&out),
        service.log()
    );
    let png = std::fs::read(&shot)?;
    ensure!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        shot.display()
    );
    // Kept for a person to look at.
    let _ = std::fs::write(
        format!("/tmp/wgns-test-94-chromium-{}.png", std::process::id()),
        &png,
    );
    let argv = browser(&[profile("vpn-2"), "--dump-dom".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = output(alice.exec(&rig, &service, &rig.confined, &argv), limit)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(MARKER),
        "chromium --dump-dom through the exec service: {}",
        text(&out)
    );

    // The same run by the same user on the host side, without the namespace: no page.
    let argv = browser(&[profile("host"), "--dump-dom".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = output(alice.command(&rig, &argv), limit)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("Page load failed")
            && !String::from_utf8_lossy(&out.stdout).contains(MARKER),
        "chromium reached the peer's page without the namespace: {}",
        text(&out)
    );

    // With the default profile already in use outside, the new window would open there:
    // refused, with the way out named.
    let lock_dir = alice.home.join(".config/chromium");
    std::fs::create_dir_all(&lock_dir)?;
    std::os::unix::fs::symlink("otherhost-4242", lock_dir.join("SingletonLock"))?;
    let argv = browser(&[]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = output(alice.exec(&rig, &service, &rig.confined, &argv), limit)?;
    let line = one_error_line(&out, 126)?;
    ensure!(
        line.contains("--user-data-dir"),
        "chromium with its profile in use outside: {}",
        text(&out)
    );
    // A lock a crash left behind (this host, a process that is gone) holds nothing.
    let mut gone = Command::new("true").spawn()?;
    let dead = gone.id();
    gone.wait()?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    std::fs::remove_file(lock_dir.join("SingletonLock"))?;
    std::os::unix::fs::symlink(
        format!("{}-{dead}", hostname.trim()),
        lock_dir.join("SingletonLock"),
    )?;
    let argv = browser(&["--dump-dom".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = output(alice.exec(&rig, &service, &rig.confined, &argv), limit)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(MARKER),
        "chromium with a stale lock of its profile: {}",
        text(&out)
    );
    Ok(())
}

/// The test binary as a client that says exactly what it is told (the JSON request in
/// WGNS_TEST_REQUEST, "silent" for nothing at all, EXTRA_FD to pass a fourth descriptor),
/// then prints the service's answer, or "EOF" when it hangs up. Run as a test user.
fn raw_client(path: &str) -> i32 {
    let go = || -> Result<String> {
        let socket: OwnedFd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        nix::sys::socket::connect(socket.as_raw_fd(), &UnixAddr::new(Path::new(path))?)?;
        let request = std::env::var("WGNS_TEST_REQUEST").unwrap_or_default();
        if request != "silent" {
            let mut fds = vec![0, 1, 2];
            if std::env::var_os("EXTRA_FD").is_some() {
                fds.push(0);
            }
            sendmsg::<()>(
                socket.as_raw_fd(),
                &[IoSlice::new(request.as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )?;
        }
        let started = Instant::now();
        let mut buffer = vec![0u8; 70_000];
        let n = nix::sys::socket::recv(socket.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        let answer = if n == 0 {
            "EOF".to_string()
        } else {
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        };
        Ok(format!("{answer}\nafter {}s", started.elapsed().as_secs()))
    };
    match go() {
        Ok(answer) => {
            println!("{answer}");
            0
        }
        Err(e) => {
            println!("raw client: {e:#}");
            2
        }
    }
}
