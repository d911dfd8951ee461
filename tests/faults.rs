//! Faults: `up` killed at every step and at random moments inside steps, concurrent `up`s, key
//! files that cannot be trusted.
//! (A userspace daemon killed under a live namespace is covered by tests/endpoints.rs.)

mod common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wg_namespace::commands::updown::{PAUSE_SWITCH, STEPS};
use wg_namespace::system::INNER_PAUSES;

fn main() {
    run(vec![
        paused_trial(
            "up_killed_at_each_step_and_inside_steps_recovers_and_leaves_nothing",
            killed_at_each_step,
        ),
        trial(
            "up_killed_at_random_moments_leaves_nothing_after_down",
            killed_at_random_moments,
        ),
        paused_trial(
            "concurrent_ups_of_one_namespace_one_wins",
            concurrent_same_namespace,
        ),
        trial(
            "concurrent_ups_of_different_namespaces_all_succeed",
            concurrent_different_namespaces,
        ),
        trial("untrusted_key_files_are_refused_or_warned_about", key_files),
        libtest_mimic::Trial::test("a_gated_process_runs_only_when_released", || {
            gate().map_err(|e| format!("{e:#}").into())
        }),
    ])
}

const REPLY: &str = "through the tunnel";

/// A trial that needs `up`'s pause switch, which only debug builds have.
fn paused_trial(name: &str, test: fn() -> Result<()>) -> libtest_mimic::Trial {
    trial(name, test).with_ignored_flag(!is_root() || !PAUSE_SWITCH)
}

/// Starts `up` that stops itself just before `step`.
fn paused_up(rig: &Rig, config: &str, step: &str) -> Result<Child> {
    rig.paused("up", config, step)
}

fn kill(mut child: Child) -> Result<()> {
    child.kill()?;
    child.wait()?;
    Ok(())
}

fn tunnel_works(rig: &Rig, service: SocketAddr) -> Result<()> {
    let answer = Rig::tcp_request(&rig.confined_fd()?, service, Duration::from_secs(5))?;
    ensure!(answer == REPLY, "unexpected answer {answer:?}");
    Ok(())
}

fn killed_at_each_step() -> Result<()> {
    let rig = Rig::new(60)?;
    let service = rig.peer_service(REPLY)?;
    let config = rig.write_config("config.json", &rig.config()?)?;
    let config = config.to_str().context("path")?;
    for step in STEPS.into_iter().chain(INNER_PAUSES) {
        // Killed, then brought up again: the new `up` clears what the dead one left.
        kill(paused_up(&rig, config, step)?)?;
        let up = rig.helper(&["up", "--config", config])?;
        ensure!(
            up.status.success(),
            "up after a kill before {step}: {}",
            text(&up)
        );
        tunnel_works(&rig, service).with_context(|| format!("after a kill before {step}"))?;
        rig.down()?;
        rig.assert_clean()
            .with_context(|| format!("down after a kill before {step}"))?;

        // Killed, then taken down: `down` alone clears it too.
        kill(paused_up(&rig, config, step)?)?;
        rig.down()?;
        rig.assert_clean()
            .with_context(|| format!("down right after a kill before {step}"))?;
    }
    Ok(())
}

/// xorshift64*: a few random numbers, reproducible from the seed the test prints.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Files under /run/wg-namespace that name the namespace (state, lock, temporary files).
fn state_files(namespace: &str) -> Vec<String> {
    std::fs::read_dir("/run/wg-namespace")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.contains(namespace))
        .collect()
}

/// SIGKILL at random moments of `up`, inside steps too (between a spawn and its record, a move
/// and its journal entry, a write and its rename): `down` must leave nothing each time, and
/// `up` must work afterwards. WG_NAMESPACE_FAULT_SEED repeats a run.
fn killed_at_random_moments() -> Result<()> {
    const ROUNDS: usize = 40;
    let rig = Rig::new(114)?;
    let service = rig.peer_service(REPLY)?;
    let config = rig.write_config("config.json", &rig.config()?)?;
    let config = config.to_str().context("path")?;
    let seed = std::env::var("WG_NAMESPACE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    let mut random = Random(seed);
    let run = |what: &str| -> Result<()> {
        let out = rig.helper(&["up", "--config", config])?;
        ensure!(out.status.success(), "up {what}: {}", text(&out));
        tunnel_works(&rig, service).with_context(|| format!("up {what}"))?;
        rig.down()?;
        Ok(())
    };

    // How long a whole `up` takes here: the kills spread over that time and a bit beyond.
    let started = std::time::Instant::now();
    run("before the kills")?;
    let span = started.elapsed().as_micros() as u64 + 1;
    let mut killed_finished = 0;
    for round in 0..ROUNDS {
        let delay = Duration::from_micros(random.next() % (span + span / 5));
        let mut up = rig
            .command_in(rig.host_fd(), &[BIN, "up", "--config", config])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(delay);
        let _ = up.kill();
        let status = up.wait()?;
        if status.success() {
            killed_finished += 1;
        }
        let failed =
            |what: String| anyhow!("round {round} (seed {seed}, kill after {delay:?}): {what}");
        let out = rig.helper(&["down", "--namespace", &rig.confined])?;
        if !out.status.success() {
            return Err(failed(format!("down failed: {}", text(&out))));
        }
        // A daemon's gate that `up` started but never recorded exits by itself once it sees
        // `up`'s end of its pipe close; on a busy machine it may still be starting up itself.
        let _ = wait_for(Duration::from_secs(5), "unrecorded gates to exit", || {
            rig.leftovers().is_empty()
        });
        let mut left = rig.leftovers();
        left.extend(state_files(&rig.confined));
        if !left.is_empty() {
            return Err(failed(format!("left behind: {}", left.join(", "))));
        }
    }
    ensure!(
        killed_finished < ROUNDS,
        "every `up` finished before its kill: the kills never landed inside it"
    );
    run("after the kills")
}

fn concurrent_same_namespace() -> Result<()> {
    let rig = Rig::new(61)?;
    let service = rig.peer_service(REPLY)?;
    let config = rig.write_config("config.json", &rig.config()?)?;
    let config = config.to_str().context("path")?;

    // Deterministic: the second `up` arrives while the first is mid-way.
    let first = paused_up(&rig, config, "firewall")?;
    let second = rig.helper(&["up", "--config", config])?;
    ensure!(
        second.status.code() == Some(1),
        "the second up must lose: {}",
        text(&second)
    );
    ensure!(
        String::from_utf8_lossy(&second.stderr)
            .contains("another wg-namespace is working on namespace"),
        "the loser must say why: {}",
        text(&second)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )?;
    let first = first.wait_with_output()?;
    ensure!(
        first.status.success(),
        "the winner failed: {}",
        text(&first)
    );
    tunnel_works(&rig, service)?;
    rig.down()?;

    // A real race, several times: exactly one wins and its namespace works.
    for round in 0..5 {
        let spawn = || {
            rig.command_in(rig.host_fd(), &[BIN, "up", "--config", config])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        };
        let (a, b) = (spawn()?, spawn()?);
        let (a, b) = (a.wait_with_output()?, b.wait_with_output()?);
        let winners = [&a, &b].iter().filter(|o| o.status.success()).count();
        ensure!(
            winners == 1,
            "round {round}: {winners} winners:\n{}\n{}",
            text(&a),
            text(&b)
        );
        let loser = if a.status.success() { &b } else { &a };
        let why = String::from_utf8_lossy(&loser.stderr);
        ensure!(
            loser.status.code() == Some(1)
                && (why.contains("already up") || why.contains("another wg-namespace is working")),
            "round {round}: the loser: {}",
            text(loser)
        );
        tunnel_works(&rig, service).with_context(|| format!("round {round}"))?;
        rig.down()?;
        rig.assert_clean()?;
    }
    Ok(())
}

/// Takes extra namespaces down whatever happens.
struct Extra<'a> {
    rig: &'a Rig,
    names: Vec<String>,
}

impl Drop for Extra<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.rig.helper(&["down", "--namespace", name]);
        }
    }
}

fn concurrent_different_namespaces() -> Result<()> {
    let rig = Rig::new(62)?;
    let base = rig.config()?;
    let extra = Extra {
        rig: &rig,
        names: (1..=4).map(|i| format!("wgt62x{i}")).collect(),
    };
    let mut children = Vec::new();
    for (i, name) in extra.names.iter().enumerate() {
        let mut config: Value = base.clone();
        config["namespace_name"] = json!(name);
        config["ips"] = json!([format!("10.200.62.{}/32", 140 + i)]);
        let path = rig.write_config(&format!("{name}.json"), &config)?;
        children.push(
            rig.command_in(
                rig.host_fd(),
                &[BIN, "up", "--config", path.to_str().context("path")?],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
        );
    }
    for (name, child) in extra.names.iter().zip(children) {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "up of {name}: {}", text(&out));
        ensure!(
            wg_namespace::system::netns::exists(name),
            "{name} is not there"
        );
    }
    for name in &extra.names {
        let out = rig.helper(&["down", "--namespace", name])?;
        ensure!(out.status.success(), "down of {name}: {}", text(&out));
        ensure!(
            !wg_namespace::system::netns::path(name).exists(),
            "{name} is still there"
        );
        ensure!(
            processes_mentioning(name).is_empty(),
            "a process for {name} is still running"
        );
    }
    Ok(())
}

fn key_files() -> Result<()> {
    let rig = Rig::new(63)?;
    let config = rig.config()?;
    let key = rig.confined_key.to_base64();
    let try_up = |key_file: &std::path::Path| -> Result<std::process::Output> {
        let mut c = config.clone();
        c["privateKeyFile"] = json!(key_file);
        let path = rig.write_config("keys.json", &c)?;
        rig.helper(&["up", "--config", path.to_str().context("path")?])
    };

    // A symlink to a key owned by another user: refused (that user could swap the key).
    let foreign = rig.write_secret("foreign.key", &key)?;
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534))?;
    let link = rig.dir.join("link.key");
    std::os::unix::fs::symlink(&foreign, &link)?;
    let out = try_up(&link)?;
    ensure!(out.status.code() == Some(1), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("is owned by uid 65534"),
        "{}",
        text(&out)
    );
    rig.assert_clean()?;

    // A directory where the key should be: refused.
    let dir = rig.dir.join("key.d");
    std::fs::create_dir(&dir)?;
    let out = try_up(&dir)?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("is a directory"),
        "{}",
        text(&out)
    );
    rig.assert_clean()?;

    // A world-readable key: works, with a warning to fix it.
    let readable = rig.write_secret("readable.key", &key)?;
    std::fs::set_permissions(
        &readable,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let out = try_up(&readable)?;
    ensure!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("warning: privateKeyFile:") && stderr.contains("readable by every user"),
        "no warning: {}",
        text(&out)
    );
    ensure!(!stderr.contains(&key), "the warning leaks the key");
    rig.down()?;
    rig.assert_clean()
}

/// The start gate: the program runs only after the go-ahead, and never once its starter is
/// gone (the pipe closed without a byte).
fn gate() -> Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join(format!("wgns-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let run = |release: bool| -> Result<(Option<i32>, bool)> {
        let marker = dir.join(if release { "released" } else { "abandoned" });
        // Only the read end is inherited (at the same number); the write end must close on
        // exec, or the gate would hold it and never see the pipe close.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        nix::fcntl::fcntl(
            &read,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        let mut child = std::process::Command::new(BIN)
            .args(["gate", "--fd", &read.as_raw_fd().to_string(), "--", "touch"])
            .arg(&marker)
            .stderr(Stdio::null())
            .spawn()?;
        drop(read);
        let mut write = std::fs::File::from(write);
        if release {
            write.write_all(b"1")?;
        }
        drop(write);
        let status = child.wait()?;
        Ok((status.code(), marker.exists()))
    };
    let released = run(true)?;
    let abandoned = run(false)?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(released == (Some(0), true), "released gate: {released:?}");
    ensure!(
        abandoned == (Some(1), false),
        "abandoned gate ran the program: {abandoned:?}"
    );
    Ok(())
}
