//! Identities, not names: `down` acts only on what is provably what `up` made (namespace cookie,
//! link index and kind, PID + start time + executable, this boot), and the state file is
//! untrusted input.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};
use wg_namespace::system::netns;
use wg_namespace::system::process::ProcessId;

fn main() {
    run(vec![
        trial(
            "down_leaves_a_namespace_made_again_behind_its_back",
            namespace_made_again,
        ),
        trial("forged_records_act_on_nothing", forged_records),
        trial(
            "a_record_from_another_boot_removes_only_files",
            another_boot,
        ),
        trial(
            "up_never_talks_to_another_daemons_socket",
            another_daemons_socket,
        ),
        trial(
            "a_state_file_of_another_format_version_is_refused_in_one_line",
            other_version,
        ),
    ])
}

fn state_path(rig: &Rig) -> String {
    format!("/run/wg-namespace/{}.json", rig.confined)
}

fn read_state(rig: &Rig) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        state_path(rig),
    )?)?)
}

fn write_state(rig: &Rig, state: &Value) -> Result<()> {
    std::fs::write(state_path(rig), serde_json::to_vec_pretty(state)?)?;
    Ok(())
}

fn down_output(rig: &Rig) -> Result<std::process::Output> {
    rig.helper(&["down", "--namespace", &rig.confined])
}

/// The nsfs inode of the namespace `name` (what a test can see without our library).
fn namespace_inode(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let fd = netns::open(name).ok()?;
    std::fs::File::from(fd).metadata().ok().map(|m| m.ino())
}

fn namespace_made_again() -> Result<()> {
    let rig = Rig::new(110)?;
    rig.up_with(&rig.config()?)?;
    let c = rig.confined.as_str();
    sh(&["ip", "netns", "del", c])?;
    sh(&["ip", "netns", "add", c])?;
    let admins = netns::identity(netns::open(c)?)?;

    // Nothing enters the admin's namespace as if it were the guarded one.
    let exec = rig.exec(&["true"])?;
    ensure!(
        !exec.status.success() && String::from_utf8_lossy(&exec.stderr).contains("not the one"),
        "exec ran in a namespace wg-namespace did not make: {}",
        text(&exec)
    );
    let heal = rig.helper(&["heal", "--namespace", c])?;
    ensure!(
        !heal.status.success(),
        "heal acted on a namespace wg-namespace did not make: {}",
        text(&heal)
    );
    let tables = sh(&["ip", "netns", "exec", c, "nft", "list", "tables"])?;
    ensure!(
        tables.trim().is_empty(),
        "a ruleset was loaded into the admin's namespace: {tables}"
    );
    let status = rig.helper(&["status", "--namespace", c])?;
    ensure!(
        status.status.code() == Some(4),
        "status of a namespace made again: {}",
        text(&status)
    );

    let out = down_output(&rig)?;
    ensure!(out.status.success(), "down failed: {}", text(&out));
    let still = netns::open(c).ok().map(netns::identity).transpose()?;
    ensure!(
        still == Some(admins),
        "down removed the admin's new namespace {c} (now {still:?}): {}",
        text(&out)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("left alone"),
        "down must say what it left alone: {}",
        text(&out)
    );
    ensure!(
        !Path::new(&state_path(&rig)).exists(),
        "the record is still there"
    );
    ensure!(
        !Path::new("/etc/netns").join(c).exists(),
        "/etc/netns/{c} is still there"
    );
    // The rig removes the admin's namespace: it has no record any more.
    Ok(())
}

/// A `sleep` that `down` must not end, whatever a record says about its PID.
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Result<Bystander> {
        Ok(Bystander(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()?,
        ))
    }

    fn record(&self) -> Result<Value> {
        let id = ProcessId::of(self.0.id()).context("the bystander is gone")?;
        Ok(json!({ "pid": id.pid, "startTime": id.start_time }))
    }

    /// What it runs: a forged record can name exactly that.
    fn executable(&self) -> Result<std::path::PathBuf> {
        Ok(std::fs::read_link(format!("/proc/{}/exe", self.0.id()))?)
    }

    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn forged_records() -> Result<()> {
    let rig = Rig::new(111)?;
    rig.up_with(&rig.config()?)?;
    let c = rig.confined.clone();
    let host_link = |name: &str| -> Result<Option<u32>> {
        wg_namespace::system::link::Netlink::inside(rig.host_fd())?.index_of(name)
    };
    // Host links that are not ours (a veth pair): one with the interface's own name (the real
    // one is inside the namespace by now), one with another name.
    let decoy = format!("wgt{}d", rig.id);
    sh(&[
        "ip", "-n", &rig.host, "link", "add", &c, "type", "veth", "peer", "name", &decoy,
    ])?;
    let same_name_index = host_link(&c)?.context("veth link")?;
    let decoy_index = host_link(&decoy)?.context("veth link")?;
    // A directory that is not /etc/netns/<ns>.
    let victim = rig.dir.join("victim");
    std::fs::create_dir_all(&victim)?;
    std::fs::write(victim.join("resolv.conf"), "nameserver 10.200.111.9\n")?;
    let mut daemon_bystander = Bystander::start()?;
    let mut relay_bystander = Bystander::start()?;
    let peer_id = serde_json::to_value(netns::identity(rig.peer_fd())?)?;

    let mut state = read_state(&rig)?;
    let forged = [
        json!({"kind": "namespace", "name": rig.peer, "id": peer_id}),
        json!({"kind": "link", "name": c, "namespace": c, "moved": false,
               "index": same_name_index, "linkKind": "wireguard"}),
        json!({"kind": "link", "name": decoy, "namespace": c, "moved": false,
               "index": decoy_index, "linkKind": "wireguard"}),
        json!({"kind": "etcDir", "path": victim, "createdParent": false}),
        // The records even name what the processes run: only how `up` starts its own
        // processes (their arguments) makes them ours.
        json!({"kind": "daemon", "process": daemon_bystander.record()?,
               "executables": [daemon_bystander.executable()?], "interface": c}),
        json!({"kind": "publisher", "process": relay_bystander.record()?,
               "executables": [relay_bystander.executable()?]}),
    ];
    state["resources"]
        .as_array_mut()
        .context("resources")?
        .extend(forged);
    write_state(&rig, &state)?;

    let out = down_output(&rig)?;
    ensure!(out.status.success(), "down failed: {}", text(&out));
    ensure!(
        netns::exists(&rig.peer),
        "down deleted namespace {}",
        rig.peer
    );
    ensure!(
        host_link(&c)? == Some(same_name_index),
        "down deleted the host's link {c}"
    );
    ensure!(
        host_link(&decoy)? == Some(decoy_index),
        "down deleted the host's link {decoy}"
    );
    ensure!(
        victim.join("resolv.conf").exists(),
        "down deleted a file of another directory"
    );
    ensure!(
        daemon_bystander.alive(),
        "down killed a process recorded as the daemon"
    );
    ensure!(
        relay_bystander.alive(),
        "down killed a process recorded as the relay"
    );
    // What was ours went.
    ensure!(
        !netns::path(&c).exists(),
        "the real namespace is still there"
    );
    sh(&["ip", "-n", &rig.host, "link", "del", &c])?;

    // A record that claims to be another namespace's must not remove that one's record.
    let other = format!("wgt{}o", rig.id);
    let other_path = format!("/run/wg-namespace/{other}.json");
    // `down` removed the directory when it left it empty.
    std::fs::create_dir_all("/run/wg-namespace")?;
    std::fs::write(&other_path, "{}")?;
    let removed = (|| -> Result<()> {
        let mut state = state.clone();
        state["namespace"] = json!(other);
        state["resources"] = json!([]);
        write_state(&rig, &state)?;
        let out = down_output(&rig)?;
        ensure!(
            Path::new(&other_path).exists(),
            "down of {c} removed {other_path}: {}",
            text(&out)
        );
        ensure!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).lines().count() == 1,
            "down must refuse a record of another namespace in one line: {}",
            text(&out)
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&other_path);
    let _ = std::fs::remove_file(state_path(&rig));
    removed
}

fn another_boot() -> Result<()> {
    let rig = Rig::new(112)?;
    rig.up_with(&rig.config()?)?;
    let c = rig.confined.as_str();
    let inode = namespace_inode(c);
    let mut state = read_state(&rig)?;
    ensure!(
        state.get("bootId").is_some(),
        "the record has no boot id: {state}"
    );
    state["bootId"] = json!("00000000-0000-0000-0000-000000000000");
    write_state(&rig, &state)?;
    let daemon = processes_mentioning(c);

    let out = down_output(&rig)?;
    ensure!(out.status.success(), "down failed: {}", text(&out));
    ensure!(
        namespace_inode(c) == inode && inode.is_some(),
        "a record from another boot removed namespace {c}"
    );
    ensure!(
        processes_mentioning(c) == daemon,
        "a record from another boot ended processes"
    );
    ensure!(
        !Path::new("/etc/netns").join(c).exists(),
        "files are removed whatever the boot"
    );
    // The rig ends the daemon (in its host namespace) and removes the unrecorded namespace.
    Ok(())
}

fn another_daemons_socket() -> Result<()> {
    let mut rig = Rig::new(113)?;
    let c = rig.confined.clone();
    // Someone else's wireguard-go, serving an interface with our name in another namespace: its
    // socket is where ours would be.
    let other = rig
        .command_in(rig.peer_fd(), &["wireguard-go", "-f", &c])
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let other = rig.track(other);
    let socket = wg_namespace::system::wireguard::uapi_socket(&c);
    wait_for(
        std::time::Duration::from_secs(10),
        "the other daemon's socket",
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
    )?;

    let config = rig.write_config("config.json", &rig.config()?)?;
    let out = rig.helper(&["up", "--config", config.to_str().context("path")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        !out.status.success() && stderr.lines().count() == 1 && stderr.contains(".sock"),
        "up must refuse another daemon's socket in one line: {}",
        text(&out)
    );
    let private = sh(&["wg", "show", &c, "private-key"])?;
    ensure!(
        !private.contains(&rig.confined_key.to_base64()),
        "our private key went to the other daemon"
    );
    let peers = sh(&["wg", "show", &c, "peers"])?;
    ensure!(
        peers.trim().is_empty(),
        "our peers went to the other daemon: {peers}"
    );
    ensure!(
        Some(other) == ProcessId::of(other).map(|p| p.pid),
        "the other daemon is gone"
    );
    rig.kill_tracked(other);
    // Killed, it leaves its socket file: that is the other daemon's, not a leftover of `up`.
    let _ = std::fs::remove_file(&socket);
    rig.assert_clean()
}

fn other_version() -> Result<()> {
    let rig = Rig::new(115)?;
    rig.up_with(&rig.config()?)?;
    let mut state = read_state(&rig)?;
    let current = state["version"].as_u64().context("version")?;
    state["version"] = json!(current - 1);
    write_state(&rig, &state)?;
    let out = down_output(&rig)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let refused =
        !out.status.success() && stderr.lines().count() == 1 && stderr.contains("format version");
    ensure!(
        netns::exists(&rig.confined),
        "down acted on a record it cannot read"
    );
    // Put the version back so the rig's own `down` clears everything.
    state["version"] = json!(current);
    write_state(&rig, &state)?;
    ensure!(
        refused,
        "down must refuse another format version in one line: {}",
        text(&out)
    );
    rig.down()?;
    rig.assert_clean()
}
