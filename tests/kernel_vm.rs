//! The kernel path, tested for real: boots Debian's own kernel (which has WireGuard) under qemu
//! with an initramfs holding `wg-namespace` and the libraries it links, and runs the checks in
//! `scripts/vm/init` there: the link born inside the namespace, traffic through the tunnel, the
//! UDP socket in the root namespace, the confined namespace's links, the configured MTU, the
//! inbound drop, `status --json`, `check-leaks`, `heal` of a deleted kernel link (made again in
//! the same namespace with its MTU, a process inside keeping its PID), failover under `refresh`
//! (servers whose hosts drop the UDP port: the switch, all down with backoff, recovery; a
//! server whose link goes down), and a clean `down`.
//!
//! Phases, each timed and printed: `scripts/vm/prepare-kernel` (downloads and caches the kernel
//! on first use: the only network access), `build-initramfs` with the helper cargo built for
//! the test, `boot`. The console log stays in `target/tmp/kernel-vm/console.log`.
//!
//! Run alone: `cargo test --test kernel_vm -- --nocapture` (or `scripts/vm/run`).
//! `WG_NAMESPACE_VM_SKIP=1`, a missing qemu or running without root skip it: it is then reported
//! as ignored, with the reason, never as passed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Every check the VM must report, in the order `scripts/vm/init` runs them.
const CHECKS: &[&str] = &[
    "up",
    "born-inside",
    "ping-peer",
    "tcp-peer",
    "udp-socket-root-ns",
    "netns-links",
    "mtu",
    "inbound-dropped",
    "status-handshake",
    "check-leaks",
    "heal-kernel",
    "failover-drop",
    "failover-all-down",
    "failover-recovery",
    "failover-kernel",
    "down-clean",
];

/// The guest's own limit (the boot script kills qemu then); the harness allows a little more.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// First preparation downloads ~70 MB; later ones only read the cache.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);
const INITRAMFS_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vm_script(name: &str) -> PathBuf {
    repo().join("scripts/vm").join(name)
}

/// Phase names and durations, printed at the end and in any failure message.
#[derive(Default)]
struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    fn record(&mut self, phase: &'static str, took: Duration) {
        eprintln!("kernel-vm: {phase}: {:.1} s", took.as_secs_f64());
        self.0.push((phase, took));
    }

    fn summary(&self) -> String {
        let total: Duration = self.0.iter().map(|(_, d)| *d).sum();
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(p, d)| format!("{p} {:.1} s", d.as_secs_f64()))
            .collect();
        format!(
            "phase timings: {} (total {:.1} s)",
            parts.join(", "),
            total.as_secs_f64()
        )
    }
}

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

/// Runs a command with a deadline, collecting its output. On the deadline the child's process
/// group is killed, so nothing it started survives.
fn run_with_deadline(mut cmd: Command, limit: Duration) -> Outcome {
    use std::io::Read;
    use std::os::unix::process::CommandExt;

    let described = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child: Child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {described}: {e}"));
    // Drain stdout and stderr on threads so a chatty child cannot block on a full pipe; stderr
    // is echoed as it comes, for progress.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(&mut err_pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("    {line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            timed_out = true;
            // SAFETY: kill(2) on the process group we created; no memory is involved.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            break child.wait().expect("wait after kill");
        }
        sleep(Duration::from_millis(100));
    };
    Outcome {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
        timed_out,
    }
}

/// Runs a phase; panics with its output and the timings so far when it fails.
fn phase(
    timings: &mut Timings,
    name: &'static str,
    cmd: Command,
    limit: Duration,
) -> (Outcome, Duration) {
    eprintln!("kernel-vm: {name}: {cmd:?}");
    let started = Instant::now();
    let outcome = run_with_deadline(cmd, limit);
    let took = started.elapsed();
    timings.record(name, took);
    if outcome.timed_out {
        panic!(
            "kernel-vm: phase {name} did not finish within {} s\n{}",
            limit.as_secs(),
            timings.summary()
        );
    }
    (outcome, took)
}

fn require_success(timings: &Timings, name: &str, outcome: &Outcome) {
    if !outcome.status.success() {
        panic!(
            "kernel-vm: phase {name} failed ({}):\n{}\n{}",
            outcome.status,
            outcome.stderr.trim_end(),
            timings.summary()
        );
    }
}

/// `WGNS-RESULT <check> <verdict> <detail>` lines of the console log, by check. The serial
/// console may glue firmware output in front of a line, so the marker is searched anywhere.
fn parse_results(log: &str) -> (BTreeMap<String, (String, String)>, bool) {
    let mut results = BTreeMap::new();
    let mut done = false;
    for raw in log.lines() {
        let line = raw.trim_end_matches('\r');
        if line.contains("WGNS-DONE") {
            done = true;
        }
        let Some(at) = line.find("WGNS-RESULT ") else {
            continue;
        };
        let mut parts = line[at + "WGNS-RESULT ".len()..].splitn(3, ' ');
        let check = parts.next().unwrap_or_default().to_string();
        let verdict = parts.next().unwrap_or_default().to_string();
        let detail = parts.next().unwrap_or_default().to_string();
        // A check reported twice counts as failed if either report failed.
        let keep_earlier = results
            .get(&check)
            .is_some_and(|(earlier, _): &(String, String)| earlier != "PASS");
        if !keep_earlier {
            results.insert(check, (verdict, detail));
        }
    }
    (results, done)
}

/// The problems with a run: failed, missing or unknown checks, a missing end marker.
fn judge(results: &BTreeMap<String, (String, String)>, done: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for check in CHECKS {
        match results.get(*check) {
            None => problems.push(format!("{check}: no result")),
            Some((verdict, _)) if verdict == "PASS" => {}
            Some((verdict, detail)) => problems.push(format!("{check}: {verdict} {detail}")),
        }
    }
    for check in results.keys() {
        if !CHECKS.contains(&check.as_str()) {
            problems.push(format!("{check}: a result the test does not know"));
        }
    }
    if !done {
        problems.push("the VM never printed WGNS-DONE".to_string());
    }
    problems
}

fn bash(script: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    cmd
}

fn main() {
    let skip = skip_reason();
    if let Some(reason) = &skip {
        eprintln!("kernel-vm: SKIPPED: {reason}");
    }
    let trials = vec![
        libtest_mimic::Trial::test("kernel_wireguard_in_a_vm", || {
            kernel_wireguard_in_a_vm();
            Ok(())
        })
        .with_ignored_flag(skip.is_some()),
        libtest_mimic::Trial::test("result_lines_are_parsed_and_judged", || {
            result_lines_are_parsed_and_judged();
            Ok(())
        }),
        libtest_mimic::Trial::test("a_skipped_vm_run_is_reported_as_ignored", || {
            a_skipped_vm_run_is_reported_as_ignored().map_err(Into::into)
        }),
    ];
    libtest_mimic::run(&libtest_mimic::Arguments::from_args(), trials).exit()
}

/// Why the VM cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    if std::env::var_os("WG_NAMESPACE_VM_SKIP").is_some_and(|v| v != "0" && !v.is_empty()) {
        return Some("WG_NAMESPACE_VM_SKIP is set".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "it needs root (prepare-kernel runs apt-get); run it as root (CI does)".into(),
        );
    }
    let on_path = |program: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
    };
    if !on_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 is not installed (scripts/setup installs it)".into());
    }
    None
}

fn kernel_wireguard_in_a_vm() {
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-vm");
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let log_path = out_dir.join("console.log");
    let initramfs = out_dir.join("initramfs.cpio");
    let _ = std::fs::remove_file(&log_path);
    let mut timings = Timings::default();

    // 1. The kernel: downloaded and unpacked once, then read from the cache.
    let (prepared, _) = phase(
        &mut timings,
        "prepare kernel",
        bash(&vm_script("prepare-kernel")),
        PREPARE_TIMEOUT,
    );
    require_success(&timings, "prepare kernel", &prepared);
    let tree = prepared.stdout.trim().to_string();
    assert!(
        !tree.is_empty(),
        "prepare-kernel printed no kernel directory"
    );

    // 2. The helper cargo built for this test; it links libnftables, whose libraries (and
    // glibc) come along into the initramfs.
    let helper = std::env::var_os("WG_NAMESPACE_VM_HELPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wg-namespace")));

    // 3. The initramfs: busybox, ip, nft, wg, the modules, the helper and scripts/vm/init.
    let mut cmd = bash(&vm_script("build-initramfs"));
    cmd.arg(&tree)
        .arg(vm_script("init"))
        .arg(&initramfs)
        .arg(&helper);
    let (built, _) = phase(&mut timings, "initramfs", cmd, INITRAMFS_TIMEOUT);
    require_success(&timings, "initramfs", &built);

    // 4. The boot, with the checks inside.
    let mut cmd = bash(&vm_script("boot"));
    cmd.arg(&tree)
        .arg(&initramfs)
        .arg(&log_path)
        .arg(BOOT_TIMEOUT.as_secs().to_string());
    let (booted, _) = phase(
        &mut timings,
        "boot and checks",
        cmd,
        BOOT_TIMEOUT + Duration::from_secs(30),
    );

    let log = std::fs::read(&log_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let (results, done) = parse_results(&log);
    for check in CHECKS {
        match results.get(*check) {
            Some((verdict, detail)) => eprintln!("kernel-vm: {verdict} {check}: {detail}"),
            None => eprintln!("kernel-vm: MISSING {check}"),
        }
    }
    eprintln!("kernel-vm: console log: {}", log_path.display());
    eprintln!("kernel-vm: {}", timings.summary());

    let mut problems = Vec::new();
    if booted.status.code() == Some(124) {
        problems.push(format!(
            "the VM did not finish within {} s",
            BOOT_TIMEOUT.as_secs()
        ));
    } else if !booted.status.success() {
        problems.push(format!(
            "qemu failed ({}): {}",
            booted.status,
            booted.stderr.trim_end()
        ));
    }
    problems.extend(judge(&results, done));
    assert!(
        problems.is_empty(),
        "kernel-vm: {} problem(s):\n  {}\nconsole log: {}\n{}",
        problems.len(),
        problems.join("\n  "),
        log_path.display(),
        timings.summary()
    );
}

fn result_lines_are_parsed_and_judged() {
    let mut log = String::from("SeaBIOS\r\nBooting from ROM..WGNS-RESULT up PASS up exited 0\r\n");
    for check in &CHECKS[1..] {
        log.push_str(&format!("WGNS-RESULT {check} PASS fine, really\n"));
    }
    let (results, done) = parse_results(&log);
    assert_eq!(results["up"], ("PASS".into(), "up exited 0".into()));
    assert_eq!(results["ping-peer"].1, "fine, really");
    assert!(!done);
    assert_eq!(judge(&results, done), ["the VM never printed WGNS-DONE"]);

    log.push_str("WGNS-RESULT netns-links FAIL links in vpn: 'lo vpn eth0'\nWGNS-DONE\r\n");
    let (mut results, done) = parse_results(&log);
    assert!(done);
    assert_eq!(
        judge(&results, done),
        ["netns-links: FAIL links in vpn: 'lo vpn eth0'"]
    );
    results.remove("down-clean");
    assert_eq!(judge(&results, done).len(), 2);

    // A failure is not undone by a later pass of the same check.
    log.push_str("WGNS-RESULT netns-links PASS links in vpn: lo vpn\n");
    let (results, _) = parse_results(&log);
    assert_eq!(results["netns-links"].0, "FAIL");
}

/// The VM test asked to skip must say "ignored": a skipped run counted as a pass would hide
/// that the kernel path was never tested.
fn a_skipped_vm_run_is_reported_as_ignored() -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(me)
        .args(["--exact", "kernel_wireguard_in_a_vm"])
        .env("WG_NAMESPACE_VM_SKIP", "1")
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success()
        && stdout.contains("0 passed")
        && stdout.contains("1 ignored")
        && stderr.contains("SKIPPED: WG_NAMESPACE_VM_SKIP is set")
    {
        Ok(())
    } else {
        Err(format!(
            "a skipped VM run reported:\nstdout: {stdout}\nstderr: {stderr}"
        ))
    }
}
