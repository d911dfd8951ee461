//! `exec --user`: what the command gets (its user's identity and nothing of root's: no
//! capability, no descriptor, no terminal), and what is hidden from it.

mod common;

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn main() {
    run(vec![
        trial(
            "exec_as_user_gets_its_identity_no_capability_and_no_descriptor_of_root",
            identity_only,
        ),
        trial(
            "exec_as_user_gets_a_session_and_terminal_of_its_own",
            terminal_of_its_own,
        ),
        trial(
            "exec_as_user_hides_the_users_sockets_but_follows_no_symlink",
            hides_sockets_not_symlinks,
        ),
        trial(
            "exec_as_user_cannot_regain_privileges_and_starts_in_the_root_directory",
            hardened,
        ),
    ])
}

const NOBODY: u32 = 65534;

fn as_nobody<'a>(rig: &'a Rig, argv: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        BIN,
        "exec",
        "--namespace",
        &rig.confined,
        "--user",
        "nobody",
    ];
    args.push("--");
    args.extend_from_slice(argv);
    args
}

fn identity_only() -> Result<()> {
    let rig = Rig::new(120)?;
    rig.up_with(&rig.config()?)?;

    // A descriptor root lets the helper inherit (as a careless caller or a service manager
    // would): the command must not get it.
    let secret = rig.dir.join("root-only");
    std::fs::write(&secret, "root's\n")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let open = std::fs::File::open(&secret)?;
    let raw = open.as_raw_fd();
    let script = "id -u; id -g; id -G; \
                  grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status; \
                  echo fds; ls /proc/$$/fd";
    let mut command = rig.command_in(rig.host_fd(), &as_nobody(&rig, &["sh", "-c", script]));
    // SAFETY: dup2 onto a free number, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(raw, 7) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output()?;
    drop(open);
    ensure!(out.status.success(), "exec --user failed: {}", text(&out));
    let got = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = got.lines().map(str::trim).collect();
    let zero = "0000000000000000";
    let expected = [
        NOBODY.to_string(),
        NOBODY.to_string(),
        // nobody's groups only: none of root's supplementary groups.
        NOBODY.to_string(),
        format!("CapInh:\t{zero}"),
        format!("CapPrm:\t{zero}"),
        format!("CapEff:\t{zero}"),
        format!("CapAmb:\t{zero}"),
        // Listed from outside the shell: a command substitution would add its own pipe.
        "fds".to_string(),
        "0".to_string(),
        "1".to_string(),
        "2".to_string(),
    ];
    ensure!(
        lines == expected,
        "as nobody the command saw:\n{got}\nexpected:\n{}",
        expected.join("\n")
    );

    // Killing exec's process group (as a deadline does) ends the command too, although the
    // command runs in a session of its own.
    let mut command = rig.command_in(
        rig.host_fd(),
        &as_nobody(&rig, &["sh", "-c", "echo $$; exec sleep 38"]),
    );
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let command_pid: i32 = line.trim().parse().with_context(|| format!("{line:?}"))?;
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL)?;
    let _ = child.wait();
    let gone = wait_for(Duration::from_secs(3), "the command to end", || {
        !Path::new(&format!("/proc/{command_pid}")).exists()
    });
    if gone.is_err() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(command_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    gone.context("the command outlived exec, killed with its process group")?;

    // A command that cannot be found or run gives the shell's statuses, as without --user.
    let plain_file = rig.dir.join("not-executable");
    std::fs::write(&plain_file, "data\n")?;
    std::fs::set_permissions(&plain_file, std::fs::Permissions::from_mode(0o644))?;
    let plain_file = plain_file.to_str().context("path")?;
    for (program, status) in [("/nonexistent/program", 127), (plain_file, 126)] {
        let out = rig.helper(&as_nobody(&rig, &[program])[1..])?;
        ensure!(
            out.status.code() == Some(status)
                && String::from_utf8_lossy(&out.stderr).contains(program),
            "exec --user of {program}: {}",
            text(&out)
        );
    }
    Ok(())
}

/// What a setuid or file-capability program would give back, and the directory root was in
/// (one nobody may not be able to open).
fn hardened() -> Result<()> {
    let rig = Rig::new(90)?;
    rig.up_with(&rig.config()?)?;
    let script = "grep -E '^(NoNewPrivs|CapBnd|CapEff):' /proc/self/status; pwd";
    let out = rig
        .command_in(rig.host_fd(), &as_nobody(&rig, &["sh", "-c", script]))
        .current_dir(&rig.dir)
        .output()?;
    ensure!(out.status.success(), "exec --user failed: {}", text(&out));
    let got = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = got.lines().map(str::trim).collect();
    let zero = "0000000000000000";
    let expected = [
        format!("CapEff:\t{zero}"),
        format!("CapBnd:\t{zero}"),
        "NoNewPrivs:\t1".to_string(),
        "/".to_string(),
    ];
    ensure!(
        lines == expected,
        "as nobody the command saw:\n{got}\nexpected:\n{}",
        expected.join("\n")
    );
    Ok(())
}

/// A program under a pseudo-terminal of the test's own (util-linux `script`), its output
/// collected as it comes and its input held open until it ends.
struct UnderPty {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl UnderPty {
    fn start(rig: &Rig, shell_script: &str, env: &[(&str, &str)]) -> Result<UnderPty> {
        let mut command = rig.command_in(
            rig.host_fd(),
            &["script", "-qec", "exec bash -c \"$OUTER\"", "/dev/null"],
        );
        command
            .env("OUTER", shell_script)
            .env("SHELL", "/bin/sh")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().context("running script (util-linux)")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Ok(UnderPty { child, output })
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().replace('\r', "")
    }

    fn wait_for_text(&self, needle: &str) -> Result<()> {
        wait_for(Duration::from_secs(10), needle, || {
            self.text().contains(needle)
        })
        .with_context(|| format!("output so far: {:?}", self.text()))
    }

    fn type_in(&mut self, bytes: &[u8]) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        stdin.write_all(bytes)?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the end; the output afterwards.
    fn finish(mut self, limit: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                let text = self.text();
                ensure!(status.success(), "script ended with {status}: {text}");
                return Ok(text);
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "still running after {}s: {:?}",
                    limit.as_secs(),
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UnderPty {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The words after `key` on the first line holding it (echoed control characters such as
/// `^C` may come first on that line).
fn field<'a>(text: &'a str, key: &str) -> Result<Vec<&'a str>> {
    text.lines()
        .find_map(|l| l.find(key).map(|at| &l[at + key.len()..]))
        .map(|rest| rest.split_whitespace().collect())
        .with_context(|| format!("no {key:?} line in {text:?}"))
}

fn terminal_of_its_own() -> Result<()> {
    let rig = Rig::new(121)?;
    rig.up_with(&rig.config()?)?;
    let helper = as_nobody(&rig, &[]).join(" ");

    // Its terminal and session, its window size, its exit status, and whether what it pushes
    // into its terminal with TIOCSTI reaches the shell that ran it.
    let inner = "echo inner $(tty) $(cut -d' ' -f6 /proc/$$/stat) size $(stty size); \
                 perl -e 'ioctl(STDIN, 0x5412, $_) or die \"TIOCSTI: $!\" for split //, \"echo INJECTED\\n\"'; \
                 exit 7";
    let outer = format!(
        "echo outer $(tty) $(cut -d' ' -f6 /proc/$$/stat); stty rows 45 cols 123; \
         before=$(stty -g); {helper} sh -c \"$INNER\"; echo status $?; \
         [ \"$(stty -g)\" = \"$before\" ] && echo modes restored; \
         read -t 1 line; echo typed \"[$line]\""
    );
    let run = UnderPty::start(&rig, &outer, &[("INNER", inner)])?;
    let text = run.finish(Duration::from_secs(20))?;
    let (outer_at, inner_at) = (field(&text, "outer ")?, field(&text, "inner ")?);
    ensure!(
        outer_at[0].starts_with("/dev/pts/") && inner_at[0].starts_with("/dev/pts/"),
        "not on terminals: {text:?}"
    );
    ensure!(
        inner_at[0] != outer_at[0],
        "the command shares the caller's terminal {}: {text:?}",
        outer_at[0]
    );
    ensure!(
        inner_at[1] != outer_at[1],
        "the command is in the caller's session {}: {text:?}",
        outer_at[1]
    );
    ensure!(
        inner_at[2..] == ["size", "45", "123"],
        "window size not passed on: {text:?}"
    );
    ensure!(
        field(&text, "status ")? == ["7"],
        "exit status not passed on: {text:?}"
    );
    ensure!(
        text.contains("modes restored"),
        "the caller's terminal modes were not restored: {text:?}"
    );
    ensure!(
        field(&text, "typed ")? == ["[]"],
        "the command typed into the caller's terminal: {text:?}"
    );

    // ^C typed at the caller's terminal reaches the command through its own terminal.
    let inner = "echo ready; exec sleep 30";
    let outer = format!("{helper} sh -c \"$INNER\"; echo status $?");
    let mut run = UnderPty::start(&rig, &outer, &[("INNER", inner)])?;
    run.wait_for_text("ready")?;
    std::thread::sleep(Duration::from_millis(200));
    run.type_in(b"\x03")?;
    let text = run.finish(Duration::from_secs(10))?;
    ensure!(
        field(&text, "status ")? == ["130"],
        "^C did not end the command with SIGINT: {text:?}"
    );

    // A background process that keeps the command's terminal open (and ignores the hangup)
    // must not keep the caller waiting.
    let inner = "(trap '' HUP; exec sleep 37) & echo background $!";
    let outer = format!("{helper} sh -c \"$INNER\"; echo status $?");
    let started = Instant::now();
    let run = UnderPty::start(&rig, &outer, &[("INNER", inner)])?;
    let result = run.finish(Duration::from_secs(20));
    let took = started.elapsed();
    if let Some(pid) = result
        .as_ref()
        .ok()
        .and_then(|t| field(t, "background ").ok())
        .and_then(|f| f.first().and_then(|p| p.parse::<i32>().ok()))
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let text = result?;
    ensure!(
        field(&text, "status ")? == ["0"],
        "exit status not passed on: {text:?}"
    );
    ensure!(
        took < Duration::from_secs(5),
        "exec waited {took:?} for a background process holding its terminal"
    );
    Ok(())
}

/// `/run/user/<nobody>` made for the test, removed again on drop (without following links).
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> Result<RuntimeDir> {
        let path = PathBuf::from(format!("/run/user/{NOBODY}"));
        ensure!(
            !path.exists(),
            "{} exists already; this test needs to make it",
            path.display()
        );
        std::fs::create_dir_all(&path)?;
        let dir = RuntimeDir(path);
        chown_nobody(&dir.0)?;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chown_nobody(path: &Path) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY))
        .with_context(|| format!("chown {}", path.display()))
}

fn hides_sockets_not_symlinks() -> Result<()> {
    let rig = Rig::new(122)?;
    rig.up_with(&rig.config()?)?;
    let runtime = RuntimeDir::create()?;
    let decoy = rig.dir.join("decoy");
    std::fs::write(&decoy, "decoy file\n")?;
    std::fs::set_permissions(&decoy, std::fs::Permissions::from_mode(0o644))?;

    // `bus` is the user's symlink to a file of root's; `systemd/private` a real socket of the
    // user's. The socket is hidden; the file the symlink names is not.
    let bus = runtime.0.join("bus");
    std::os::unix::fs::symlink(&decoy, &bus)?;
    chown_nobody(&bus)?;
    let systemd = runtime.0.join("systemd");
    std::fs::create_dir(&systemd)?;
    chown_nobody(&systemd)?;
    let private = systemd.join("private");
    let _listener = std::os::unix::net::UnixListener::bind(&private)?;
    chown_nobody(&private)?;
    let script = format!(
        "cat {}; test -S {p} && echo socket visible; test -c {p} && echo socket hidden",
        decoy.display(),
        p = private.display()
    );
    let out = rig.helper(&as_nobody(&rig, &["sh", "-c", &script])[1..])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "decoy file\nsocket hidden\n",
        "inside: {}",
        text(&out)
    );

    // `systemd` as the user's symlink to a directory of root's: nothing in it is masked.
    std::fs::remove_dir_all(&systemd)?;
    let decoy_dir = rig.dir.join("decoy-dir");
    std::fs::create_dir(&decoy_dir)?;
    std::fs::set_permissions(&decoy_dir, std::fs::Permissions::from_mode(0o755))?;
    let decoy_private = decoy_dir.join("private");
    std::fs::write(&decoy_private, "decoy private\n")?;
    std::fs::set_permissions(&decoy_private, std::fs::Permissions::from_mode(0o644))?;
    std::os::unix::fs::symlink(&decoy_dir, &systemd)?;
    chown_nobody(&systemd)?;
    let script = format!("cat {}", decoy_private.display());
    let out = rig.helper(&as_nobody(&rig, &["sh", "-c", &script])[1..])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "decoy private\n",
        "inside: {}",
        text(&out)
    );
    Ok(())
}
