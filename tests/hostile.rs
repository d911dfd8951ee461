//! Root meets paths and programs it cannot trust: symlinks planted where root writes, reads that
//! would never end, children and lookups that would never answer. Each case is one clear line
//! and nothing touched that is not ours.
//!
//! Cases that need `/run/wg-namespace` itself to be something else run the helper in a private
//! mount namespace over a tmpfs, so the real directory (and other tests using it) is never
//! disturbed.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use wg_namespace::system::state::{Resource, State};

fn main() {
    let root_only = vec![
        trial(
            "etc_netns_symlink_is_refused_and_left_alone",
            etc_netns_symlink,
        ),
        trial(
            "planted_temporary_file_symlinks_are_not_followed",
            planted_temporary_files,
        ),
        trial(
            "state_directory_and_lock_symlinks_are_refused",
            state_directory_symlinks,
        ),
        trial("a_failed_down_leaves_no_lock_file", failed_down_lock),
        trial("render_out_never_writes_through_symlinks", render_out),
        trial(
            "nft_has_a_deadline_and_its_complaint_is_never_hidden",
            nft_child,
        ),
        trial("endpoint_name_lookup_has_a_deadline", lookup_deadline),
    ];
    let mut trials = root_only;
    // Needs no privileges: reads only.
    trials.push(libtest_mimic::Trial::test(
        "config_that_is_a_fifo_device_or_huge_is_refused",
        || config_reads().map_err(|e| format!("{e:#}").into()),
    ));
    run(trials);
}

/// A directory of the test's own under /tmp, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        let dir = PathBuf::from(format!("/tmp/wgns-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Scratch(dir))
    }

    /// A victim directory (mode 0700) holding a resolv.conf that must stay as it is.
    fn victim(&self) -> Result<PathBuf> {
        let victim = self.0.join("victim");
        std::fs::create_dir_all(&victim)?;
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700))?;
        std::fs::write(victim.join("resolv.conf"), "victim\n")?;
        Ok(victim)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path the test planted (a symlink or a directory in /etc/netns); removed on drop, without
/// ever following a symlink.
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&self.0);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&self.0);
            }
            Err(_) => {}
        }
    }
}

/// Plants the symlink `link` to `target`, making its parent directory when missing. Another
/// test's `down` may remove that directory when it finds it empty, just before the symlink
/// lands in it: then try again.
fn plant(target: &Path, link: &Path) -> Result<Planted> {
    let parent = link.parent().context("a link with a parent")?;
    for _ in 0..10 {
        std::fs::create_dir_all(parent)?;
        match symlink(target, link) {
            Ok(()) => return Ok(Planted(link.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("planting {}", link.display())),
        }
    }
    bail!("{} keeps disappearing", parent.display())
}

fn assert_victim_intact(victim: &Path) -> Result<()> {
    let mode = std::fs::metadata(victim)?.mode() & 0o7777;
    ensure!(mode == 0o700, "the victim directory's mode became {mode:o}");
    let text = std::fs::read_to_string(victim.join("resolv.conf"))
        .context("the victim's resolv.conf is gone")?;
    ensure!(
        text == "victim\n",
        "the victim's resolv.conf became {text:?}"
    );
    Ok(())
}

fn etc_netns_symlink() -> Result<()> {
    let rig = Rig::new(100)?;
    let scratch = Scratch::new("etc")?;
    let victim = scratch.victim()?;
    let link = Path::new("/etc/netns").join(&rig.confined);
    ensure!(
        std::fs::symlink_metadata(&link).is_err(),
        "{} already exists",
        link.display()
    );
    let planted = plant(&victim, &link)?;

    // up: refused at the dns step, and rolled back.
    let config = rig.write_config("config.json", &rig.config()?)?;
    let out = rig.helper(&["up", "--config", config.to_str().context("path")?])?;
    let line = one_error_line(&out, 1)?;
    ensure!(
        line.contains(&format!("{}: is a symbolic link", link.display())),
        "{line}"
    );
    assert_victim_intact(&victim)?;
    ensure!(
        std::fs::symlink_metadata(&link)?.file_type().is_symlink(),
        "the symlink was removed"
    );
    ensure!(!wg_namespace::system::netns::path(&rig.confined).exists());

    // down of a namespace whose directory was swapped for a symlink afterwards: left alone.
    std::fs::remove_file(&link)?;
    rig.up_with(&rig.config()?)?;
    std::fs::remove_dir_all(&link)?;
    let _relinked = plant(&victim, &link)?;
    let out = rig.helper(&["down", "--namespace", &rig.confined])?;
    ensure!(out.status.success(), "down failed: {}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("left alone"),
        "down did not say what it left alone: {}",
        text(&out)
    );
    assert_victim_intact(&victim)?;
    drop(planted);
    rig.assert_clean()
}

fn planted_temporary_files() -> Result<()> {
    let rig = Rig::new(101)?;
    let scratch = Scratch::new("tmp")?;
    let victim = scratch.victim()?;
    let etc = Path::new("/etc/netns").join(&rig.confined);
    std::fs::create_dir_all(&etc)?;
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755))?;
    let _etc = Planted(etc.clone());
    for name in [".resolv.conf.tmp", ".nsswitch.conf.tmp"] {
        symlink(victim.join("resolv.conf"), etc.join(name))?;
    }
    // The state file's temporary names, today's and the earlier `<ns>.json.tmp`.
    let mut planted = Vec::new();
    for name in [
        format!("{}.json.tmp", rig.confined),
        format!(".{}.json.tmp", rig.confined),
    ] {
        let path = Path::new("/run/wg-namespace").join(name);
        planted.push(plant(&victim.join("resolv.conf"), &path)?);
    }

    rig.up_with(&rig.config()?)?;
    assert_victim_intact(&victim)?;
    let resolv = std::fs::symlink_metadata(etc.join("resolv.conf"))?;
    ensure!(resolv.is_file(), "resolv.conf is not a regular file");
    ensure!(resolv.mode() & 0o777 == 0o644, "resolv.conf mode");
    rig.down()?;
    assert_victim_intact(&victim)?;
    drop(planted);
    rig.assert_clean()
}

/// Runs the helper in a private mount namespace where /run is a fresh tmpfs prepared by
/// `setup` (a shell snippet), then prints what /run/wg-namespace holds.
fn in_private_run(setup: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<(String, String)> {
    let script = format!(
        "set -e\nmount -t tmpfs -o mode=755 tmpfs /run\nmkdir -p /run/netns\n{setup}\nset +e\n\"$@\"\necho \"exit $?\" >&2\nls -A /run/wg-namespace/ 2>/dev/null | tr '\\n' ' '"
    );
    let mut argv = vec![
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
        BIN,
    ];
    argv.extend_from_slice(args);
    let mut command = Command::new(argv[0]);
    command.args(&argv[1..]);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output()?;
    ensure!(
        out.status.success(),
        "the private run failed: {}",
        text(&out)
    );
    Ok((
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn state_json(namespace: &str, resources: Vec<Resource>) -> Result<String> {
    let mut state = State::new(namespace, "10.200.0.1".parse()?);
    state.resources = resources;
    Ok(serde_json::to_string(&state)?)
}

fn state_directory_symlinks() -> Result<()> {
    let scratch = Scratch::new("run")?;
    let ns = "wgfs102";
    let victim = scratch.0.join("victim");
    std::fs::create_dir_all(&victim)?;
    std::fs::write(victim.join(format!("{ns}.json")), state_json(ns, vec![])?)?;
    std::fs::write(victim.join(format!("{ns}.lock")), "victim\n")?;

    // /run/wg-namespace is a symlink to another directory.
    let (stderr, _) = in_private_run(
        "ln -s \"$VICTIM\" /run/wg-namespace",
        &["down", "--namespace", ns],
        &[("VICTIM", &victim)],
    )?;
    ensure!(
        stderr.contains("error: down: /run/wg-namespace: is a symbolic link")
            && stderr.contains("exit 1"),
        "{stderr}"
    );
    for name in [format!("{ns}.json"), format!("{ns}.lock")] {
        ensure!(
            victim.join(&name).exists(),
            "{name} was removed from the victim"
        );
    }

    // The lock file is a symlink to a file that does not exist yet.
    let target = victim.join("created-through-the-lock");
    let (stderr, _) = in_private_run(
        &format!("mkdir -m 755 /run/wg-namespace\nln -s \"$TARGET\" /run/wg-namespace/{ns}.lock"),
        &["down", "--namespace", ns],
        &[("TARGET", &target)],
    )?;
    ensure!(
        stderr.contains(&format!("/run/wg-namespace/{ns}.lock: is a symbolic link"))
            && stderr.contains("exit 1"),
        "{stderr}"
    );
    ensure!(!target.exists(), "the lock was created through the symlink");

    // A state directory another user could write to.
    let (stderr, _) = in_private_run(
        "mkdir -m 777 /run/wg-namespace",
        &["down", "--namespace", ns],
        &[],
    )?;
    ensure!(
        stderr.contains("directory /run/wg-namespace is writable by other users")
            && stderr.contains("exit 1"),
        "{stderr}"
    );
    Ok(())
}

fn failed_down_lock() -> Result<()> {
    let ns = "wgfs105";
    let scratch = Scratch::new("lock")?;
    let state = scratch.0.join("state.json");
    std::fs::write(
        &state,
        state_json(
            ns,
            vec![Resource::EtcDir {
                path: Path::new("/etc/netns").join(ns),
                created_parent: false,
            }],
        )?,
    )?;
    // A directory where our resolv.conf should be cannot be removed as a file: down fails.
    let (stderr, listing) = in_private_run(
        &format!(
            "mount -t tmpfs tmpfs /etc\nmkdir -p /etc/netns/{ns}/resolv.conf/x\nmkdir -m 755 /run/wg-namespace\ncp \"$STATE\" /run/wg-namespace/{ns}.json"
        ),
        &["down", "--namespace", ns],
        &[("STATE", &state)],
    )?;
    ensure!(stderr.contains("exit 1"), "down did not fail: {stderr}");
    ensure!(
        listing.split_whitespace().collect::<Vec<_>>() == [format!("{ns}.json")],
        "after the failed down /run/wg-namespace holds {listing:?}, want only the state file"
    );

    // A state file down cannot read (another format version): refused, and no lock file left.
    std::fs::write(&state, r#"{"version": 1, "namespace": "wgfs105"}"#)?;
    let (stderr, listing) = in_private_run(
        &format!("mkdir -m 755 /run/wg-namespace\ncp \"$STATE\" /run/wg-namespace/{ns}.json"),
        &["down", "--namespace", ns],
        &[("STATE", &state)],
    )?;
    ensure!(
        stderr.contains("has format version 1") && stderr.contains("exit 1"),
        "down did not refuse the record: {stderr}"
    );
    ensure!(
        listing.split_whitespace().collect::<Vec<_>>() == [format!("{ns}.json")],
        "after down refused the record /run/wg-namespace holds {listing:?}, want only the state file"
    );
    Ok(())
}

fn render_out() -> Result<()> {
    let scratch = Scratch::new("render")?;
    let victim = scratch.victim()?;
    let config = scratch.0.join("config.json");
    std::fs::write(
        &config,
        json!({
            "namespace_name": "wgfs106",
            "dns_server": "10.200.106.1",
            "privateKeyFile": "/nonexistent/key",
            "peers": [{"publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "allowedIPs": ["0.0.0.0/0"]}]
        })
        .to_string(),
    )?;
    let render = |out: &Path| -> Result<std::process::Output> {
        Ok(Command::new(BIN)
            .args(["render", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(out)
            .output()?)
    };

    // The output directory is a symlink.
    let link = scratch.0.join("out-link");
    symlink(&victim, &link)?;
    let line = one_error_line(&render(&link)?, 1)?;
    ensure!(line.contains("is a symbolic link"), "{line}");
    assert_victim_intact(&victim)?;

    // A file in it is a symlink: replaced, not followed.
    let out = scratch.0.join("out");
    std::fs::create_dir(&out)?;
    symlink(victim.join("resolv.conf"), out.join("resolv.conf"))?;
    let result = render(&out)?;
    ensure!(result.status.success(), "render failed: {}", text(&result));
    assert_victim_intact(&victim)?;
    ensure!(std::fs::symlink_metadata(out.join("resolv.conf"))?.is_file());

    // A directory on the way belongs to another user, who could swap it for a symlink.
    let theirs = scratch.0.join("theirs");
    std::fs::create_dir(&theirs)?;
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534))?;
    let line = one_error_line(&render(&theirs.join("out"))?, 1)?;
    ensure!(
        line.contains(&format!(
            "directory {} is owned by uid 65534",
            theirs.display()
        )),
        "{line}"
    );
    ensure!(!theirs.join("out").exists(), "render wrote into it anyway");
    Ok(())
}

fn nft_child() -> Result<()> {
    let rig = Rig::new(103)?;
    let mut config = rig.config()?;
    // Far more than a pipe holds: what libnftables says about a rule after it is not lost.
    let padding = "# padding\n".repeat(50_000);
    config["extraFirewallRules"] = json!(format!("{padding}add rule inet my_table nowhere accept"));
    let path = rig.write_config("config.json", &config)?;
    let path = path.to_str().context("path")?;
    let line = one_error_line(&rig.helper(&["up", "--config", path])?, 1)?;
    ensure!(
        line.contains("Error:") && line.contains("(extraFirewallRules line 50001)"),
        "{line}"
    );
    rig.assert_clean()?;

    // The guard is judged over netlink; the `nft` program runs only to word a rule that was
    // added. One that never finishes is given up on, and `status` still says down.
    config["extraFirewallRules"] = json!(padding);
    rig.up_with(&config)?;
    let confined = rig.confined_fd()?;
    let tamper = rig
        .command_in(
            &confined,
            &[
                "nft",
                "insert",
                "rule",
                "inet",
                "wg_namespace_guard",
                "output",
                "accept",
            ],
        )
        .output()?;
    ensure!(tamper.status.success(), "nft insert: {}", text(&tamper));
    let fake = rig.dir.join("fake-bin");
    std::fs::create_dir_all(&fake)?;
    let nft = fake.join("nft");
    std::fs::write(&nft, "#!/bin/sh\nexec sleep 600\n")?;
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755))?;
    let search = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    let child = rig
        .command_in(
            rig.host_fd(),
            &[BIN, "status", "--namespace", &rig.confined],
        )
        .env("PATH", &search)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = output_within(child, Duration::from_secs(90))?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(4) && report.contains("chain output has an added rule 1"),
        "{}",
        text(&out)
    );
    ensure!(
        started.elapsed() < Duration::from_secs(50),
        "status took {:?}",
        started.elapsed()
    );
    rig.down()?;
    rig.assert_clean()
}

fn lookup_deadline() -> Result<()> {
    let rig = Rig::new(104)?;
    // A resolver on the peer's second underlay address that never answers.
    let silent = Rig::within(rig.peer_fd(), || {
        std::net::UdpSocket::bind(format!("10.200.{}.3:53", rig.id))
    })??;
    let mut config = rig.config()?;
    config["peers"][0]["endpoint"] = json!("vpn.wgfs104.test:51820");
    let config = rig.write_config("config.json", &config)?;
    let resolv = format!(
        "nameserver 10.200.{}.3\noptions timeout:30 attempts:5\n",
        rig.id
    );
    let started = Instant::now();
    let child = rig
        .helper_with_resolver(
            &resolv,
            &["up", "--config", config.to_str().context("path")?],
        )?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = output_within(child, Duration::from_secs(60))?;
    let line = one_error_line(&out, 1)?;
    ensure!(
        line.contains("peers[0].endpoint: cannot resolve vpn.wgfs104.test:51820: no answer within"),
        "{line}"
    );
    ensure!(started.elapsed() < Duration::from_secs(40));
    drop(silent);
    rig.assert_clean()
}

fn config_reads() -> Result<()> {
    let scratch_dir = std::env::temp_dir().join(format!("wgns-hostile-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch_dir);
    std::fs::create_dir_all(&scratch_dir)?;
    let scratch = Scratch(scratch_dir);
    let fifo = scratch.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let huge = scratch.0.join("huge.json");
    std::fs::File::create(&huge)?.set_len(64 << 20)?;
    for (path, expected) in [
        (fifo.as_path(), "is a FIFO, not a regular file"),
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (huge.as_path(), "is larger than"),
    ] {
        let mut command = Command::new(BIN);
        command
            .args(["check", "--config"])
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Should a read be unbounded after all, it ends at this limit, not at the machine's.
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = output_within(command.spawn()?, Duration::from_secs(10))?;
        let line = one_error_line(&out, 2)?;
        ensure!(
            line == format!("error: {}: {expected}", path.display())
                || line.starts_with(&format!("error: {}: {expected}", path.display())),
            "{line}"
        );
    }
    Ok(())
}
