//! The namespace's nftables ruleset, loaded with the `nft` program run inside the namespace.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Output, Stdio};

use anyhow::{Context, Result, bail};

/// The leak guard's table; its presence is what `status` calls "ruleset loaded".
pub const GUARD_TABLE: &str = "wg_namespace_guard";
/// The seed's policy table.
pub const POLICY_TABLE: &str = "my_table";
/// Marks where extraFirewallRules start in the rendered ruleset.
const EXTRA_MARKER: &str = "# extraFirewallRules";

/// Runs `nft` with `args` inside the namespace `fd`, feeding it `stdin`.
fn nft(fd: BorrowedFd<'_>, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut command = crate::system::process::command_in("nft", fd);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .context("running nft (is nftables installed and on PATH?)")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).context("feeding nft")?;
    }
    child.wait_with_output().context("waiting for nft")
}

/// Loads `ruleset` (which starts with `flush ruleset`) into the namespace. nft's complaint
/// becomes one line, pointing into extraFirewallRules when that is where the problem is.
pub fn load(fd: impl AsFd, ruleset: &str) -> Result<()> {
    let output = nft(fd.as_fd(), &["-f", "-"], Some(ruleset))?;
    if !output.status.success() {
        bail!(
            "nft rejected the ruleset: {}",
            explain(&String::from_utf8_lossy(&output.stderr), ruleset)
        );
    }
    Ok(())
}

/// Whether the table `name` (family inet) exists in the namespace.
pub fn has_table(fd: impl AsFd, name: &str) -> Result<bool> {
    Ok(nft(fd.as_fd(), &["list", "table", "inet", name], None)?
        .status
        .success())
}

/// Packets dropped so far by each counted rule of the leak guard, keyed by the rule's comment.
pub fn guard_drops(fd: impl AsFd) -> Result<HashMap<String, u64>> {
    let output = nft(
        fd.as_fd(),
        &["-j", "list", "table", "inet", GUARD_TABLE],
        None,
    )?;
    if !output.status.success() {
        bail!("the leak guard table is not loaded");
    }
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("reading nft's JSON output")?;
    let mut drops = HashMap::new();
    let items = document["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let comment = rule["comment"].as_str().unwrap_or_default();
        let packets = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64());
        if let Some(packets) = packets {
            *drops.entry(comment.to_string()).or_default() += packets;
        }
    }
    Ok(drops)
}

/// Condenses nft's multi-line error report to its first `Error:` line, and translates a line
/// number inside extraFirewallRules into one the user can find in their own option.
fn explain(stderr: &str, ruleset: &str) -> String {
    let Some(line) = stderr.lines().find(|l| l.contains("Error:")) else {
        let text = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        return if text.is_empty() {
            "no message".into()
        } else {
            text
        };
    };
    let line = line.trim();
    let extra_start = ruleset
        .lines()
        .position(|l| l == EXTRA_MARKER)
        .map(|i| i + 2); // 1-based number of the first line after the marker
    let reported: Option<usize> = line
        .strip_prefix("/dev/stdin:")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok());
    match (extra_start, reported) {
        (Some(start), Some(n)) if n >= start => {
            let extra_lines = ruleset
                .lines()
                .skip(start - 1)
                .take_while(|l| !l.starts_with("# Leak guard"))
                .count();
            if n < start + extra_lines {
                format!("{line} (extraFirewallRules line {})", n - start + 1)
            } else {
                line.to_string()
            }
        }
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_into_extra_rules() {
        let ruleset = "a\n# extraFirewallRules\nfirst\nsecond\n\n# Leak guard\nz\n";
        let stderr = "/dev/stdin:4:1-6: Error: syntax error\nsecond\n^^^^^^\n";
        assert_eq!(
            explain(stderr, ruleset),
            "/dev/stdin:4:1-6: Error: syntax error (extraFirewallRules line 2)"
        );
        let stderr = "/dev/stdin:1:1-1: Error: nope\n";
        assert_eq!(explain(stderr, ruleset), "/dev/stdin:1:1-1: Error: nope");
    }
}
