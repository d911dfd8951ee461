//! The namespace's nftables ruleset: loaded through libnftables inside the namespace, read back
//! with the `nft` program run there.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::system::nft;

/// The leak guard's table; its presence is what `status` calls "ruleset loaded".
pub const GUARD_TABLE: &str = "wg_namespace_guard";
/// The seed's policy table.
pub const POLICY_TABLE: &str = "my_table";
/// Marks where extraFirewallRules start in the rendered ruleset.
const EXTRA_MARKER: &str = "# extraFirewallRules";

/// How long one nft command may take. Loading even a large ruleset takes well under a second.
const NFT_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the script `text` through libnftables inside the namespace `fd`.
fn run_nft(fd: BorrowedFd<'_>, text: &str) -> Result<nft::Outcome> {
    nft::run_script(fd, text, NFT_TIMEOUT).context("loading nft rules (libnftables)")
}

/// Runs the `nft` program with `args` inside the namespace `fd`, within [`NFT_TIMEOUT`]. What
/// only reads the ruleset goes this way: libnftables 1.0.6 reads freed memory when it prints
/// JSON in a process that has had a context before (valgrind), which a short-lived `nft`
/// process survives and this one must not risk.
fn nft_program(fd: BorrowedFd<'_>, args: &[&str]) -> Result<Output> {
    let mut command = crate::system::process::command_in("nft", fd);
    command.args(args);
    crate::system::process::output_within(&mut command, None, NFT_TIMEOUT).map_err(|e| {
        match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::Error::new(e).context("running nft (is nftables installed and on PATH?)")
            }
            _ => anyhow::Error::new(e).context("running nft"),
        }
    })
}

/// Loads `ruleset` (which starts with `flush ruleset`) into the namespace. nft's complaint
/// becomes one line, pointing into extraFirewallRules when that is where the problem is.
pub fn load(fd: impl AsFd, ruleset: &str) -> Result<()> {
    let outcome = run_nft(fd.as_fd(), ruleset)?;
    if !outcome.success {
        bail!(
            "nft rejected the ruleset: {}",
            explain(&outcome.error, ruleset)
        );
    }
    Ok(())
}

/// Runs a short nft script (one transaction) inside the namespace; nft's complaint becomes
/// one line.
pub fn run_script(fd: impl AsFd, script: &str) -> Result<()> {
    let outcome = run_nft(fd.as_fd(), script)?;
    if !outcome.success {
        bail!("nft: {}", explain(&outcome.error, script));
    }
    Ok(())
}

/// `nft -j list <what>` inside the namespace, parsed.
pub fn list_json(fd: impl AsFd, what: &[&str]) -> Result<serde_json::Value> {
    let mut args = vec!["-j", "list"];
    args.extend_from_slice(what);
    let output = nft_program(fd.as_fd(), &args)?;
    if !output.status.success() {
        bail!(
            "nft list {}: {}",
            what.join(" "),
            explain(&String::from_utf8_lossy(&output.stderr), "")
        );
    }
    serde_json::from_slice(&output.stdout).context("reading nft's JSON output")
}

/// Whether the table `name` (family inet) exists in the namespace.
pub fn has_table(fd: impl AsFd, name: &str) -> Result<bool> {
    has_tables(fd, &[name])
}

/// Whether every one of the tables `names` (family inet) exists in the namespace: one `nft`
/// run for all of them.
pub fn has_tables(fd: impl AsFd, names: &[&str]) -> Result<bool> {
    let output = nft_program(fd.as_fd(), &["list", "tables", "inet"])?;
    if !output.status.success() {
        bail!(
            "nft list tables: {}",
            explain(&String::from_utf8_lossy(&output.stderr), "")
        );
    }
    let listed = String::from_utf8_lossy(&output.stdout);
    let present: Vec<&str> = listed
        .lines()
        .filter_map(|line| line.trim().strip_prefix("table inet "))
        .collect();
    Ok(names.iter().all(|name| present.contains(name)))
}

/// The leak guard's table as nft lists it (`nft -j list table`): its table, chain, rule and
/// other objects, in nft's order. None when the table is not there.
fn guard_items(fd: BorrowedFd<'_>) -> Result<Option<Vec<Value>>> {
    let output = nft_program(fd, &["-j", "list", "table", "inet", GUARD_TABLE])?;
    if !output.status.success() {
        return Ok(None);
    }
    let mut document: Value =
        serde_json::from_slice(&output.stdout).context("reading nft's JSON output")?;
    let items = match document["nftables"].take() {
        Value::Array(items) => items,
        _ => bail!("nft's JSON output holds no \"nftables\" list"),
    };
    Ok(Some(
        items
            .into_iter()
            .filter(|item| item.get("metainfo").is_none())
            .collect(),
    ))
}

/// A short fingerprint of `text` (FNV-1a, 64 bits): enough to notice a change, not a
/// security check.
pub fn digest(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Packets dropped so far by each counted rule of the leak guard, keyed by the rule's comment.
pub fn guard_drops(fd: impl AsFd) -> Result<HashMap<String, u64>> {
    let items = guard_items(fd.as_fd())?.context("the leak guard table is not loaded")?;
    let mut drops = HashMap::new();
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

/// How the loaded leak guard differs from the one `ruleset` (as rendered for the namespace)
/// makes: one line per difference, empty when they are the same. Compared is what decides
/// verdicts on packets: the table's flags (a dormant table filters nothing), each chain's
/// type, hook, priority and policy, and every rule in order. Handles and counter values are
/// not (they differ between loads and grow with traffic).
///
/// What `ruleset` makes is what nft itself lists after loading it into a throwaway network
/// namespace, so both sides are in nft's own words whatever its version prints.
pub fn guard_differences(fd: impl AsFd, ruleset: &str) -> Result<Vec<String>> {
    let Some(loaded) = guard_items(fd.as_fd())? else {
        return Ok(vec![format!(
            "the leak guard table {GUARD_TABLE} is missing"
        )]);
    };
    let scratch = crate::system::netns::unshare_new()
        .context("making a throwaway namespace to load the expected guard into")?;
    load(&scratch, ruleset).context("loading the expected guard into a throwaway namespace")?;
    let expected =
        guard_items(scratch.as_fd())?.context("the rendered ruleset holds no leak guard table")?;
    let mut differences = Guard::of(&expected).differences_to(&Guard::of(&loaded));
    if differences.iter().any(|d| d.starts_with(FLAGS_DIFFER)) {
        // nft's JSON names table flags wrongly in some versions (1.0.6 says "inet" for
        // dormant); its text listing names them right.
        if let Some(flags) = table_flags_text(fd.as_fd()) {
            differences = differences
                .into_iter()
                .map(|d| {
                    if d.starts_with(FLAGS_DIFFER) {
                        format!("the leak guard table is marked `{flags}` (a dormant table filters nothing)")
                    } else {
                        d
                    }
                })
                .collect();
        }
    }
    Ok(differences)
}

const FLAGS_DIFFER: &str = "the leak guard table's flags";

/// The `flags ...` line of the guard table's text listing.
fn table_flags_text(fd: BorrowedFd<'_>) -> Option<String> {
    let output = nft_program(fd, &["list", "table", "inet", GUARD_TABLE]).ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("flags "))
        .map(str::to_string)
}

/// A leak guard reduced to what decides verdicts; see [`guard_differences`].
struct Guard {
    flags: Value,
    chains: Vec<Chain>,
    /// Sets, maps and other objects: the rendered guard has none.
    others: Vec<Value>,
}

struct Chain {
    name: String,
    /// Type, hook, priority and policy (all null for a regular chain).
    head: [Value; 4],
    rules: Vec<Value>,
}

impl Guard {
    fn of(items: &[Value]) -> Guard {
        let mut guard = Guard {
            flags: Value::Null,
            chains: Vec::new(),
            others: Vec::new(),
        };
        for item in items {
            if let Some(table) = item.get("table") {
                guard.flags = table.get("flags").cloned().unwrap_or(Value::Null);
            } else if let Some(chain) = item.get("chain") {
                guard.chains.push(Chain {
                    name: chain["name"].as_str().unwrap_or_default().to_string(),
                    head: ["type", "hook", "prio", "policy"].map(|k| chain[k].clone()),
                    rules: Vec::new(),
                });
            } else if let Some(rule) = item.get("rule") {
                let name = rule["chain"].as_str().unwrap_or_default();
                let mut rule = rule.clone();
                if let Some(fields) = rule.as_object_mut() {
                    fields.remove("handle");
                }
                zero_counters(&mut rule);
                match guard.chains.iter_mut().find(|c| c.name == name) {
                    Some(chain) => chain.rules.push(rule),
                    None => guard.others.push(rule),
                }
            } else {
                let mut other = item.clone();
                if let Some(fields) = other
                    .as_object_mut()
                    .and_then(|o| o.values_mut().next())
                    .and_then(Value::as_object_mut)
                {
                    fields.remove("handle");
                }
                guard.others.push(other);
            }
        }
        guard
    }

    /// What `loaded` has that `self` (the expected guard) has not, and the reverse.
    fn differences_to(&self, loaded: &Guard) -> Vec<String> {
        let mut out = Vec::new();
        if loaded.flags != self.flags {
            out.push(format!(
                "{FLAGS_DIFFER} are {} instead of {}",
                loaded.flags, self.flags
            ));
        }
        for expected in &self.chains {
            let Some(chain) = loaded.chains.iter().find(|c| c.name == expected.name) else {
                out.push(format!("the leak guard chain {} is missing", expected.name));
                continue;
            };
            let name = &expected.name;
            if chain.head[3] != expected.head[3] {
                out.push(format!(
                    "the leak guard chain {name} has policy {} instead of {}",
                    plain(&chain.head[3]),
                    plain(&expected.head[3])
                ));
            }
            if chain.head[..3] != expected.head[..3] {
                let describe = |h: &[Value; 4]| {
                    format!(
                        "type {} hook {} priority {}",
                        plain(&h[0]),
                        plain(&h[1]),
                        plain(&h[2])
                    )
                };
                out.push(format!(
                    "the leak guard chain {name} is {} instead of {}",
                    describe(&chain.head),
                    describe(&expected.head)
                ));
            }
            out.extend(rule_differences(name, &expected.rules, &chain.rules));
        }
        for chain in &loaded.chains {
            if !self.chains.iter().any(|c| c.name == chain.name) {
                out.push(format!(
                    "the leak guard has a chain {} it was not loaded with",
                    chain.name
                ));
            }
        }
        for other in &loaded.others {
            if !self.others.contains(other) {
                out.push(format!(
                    "the leak guard holds an object it was not loaded with: {other}"
                ));
            }
        }
        out
    }
}

/// The first place where a chain's rules part from the expected ones, told as an added, a
/// missing or a changed rule.
fn rule_differences(chain: &str, expected: &[Value], loaded: &[Value]) -> Option<String> {
    if loaded.is_empty() && !expected.is_empty() {
        return Some(format!(
            "the leak guard chain {chain} has no rules (it was flushed); it was loaded with {}",
            expected.len()
        ));
    }
    let at = expected
        .iter()
        .zip(loaded)
        .take_while(|(e, l)| e == l)
        .count();
    if at == expected.len() && at == loaded.len() {
        return None;
    }
    let number = at + 1;
    if loaded.len() > at && loaded[at + 1..] == expected[at..] {
        return Some(format!(
            "the leak guard chain {chain} has an added rule {number}: {}",
            describe_rule(&loaded[at])
        ));
    }
    if expected.len() > at && loaded[at..] == expected[at + 1..] {
        return Some(format!(
            "the leak guard chain {chain} lacks its rule {number}: {}",
            describe_rule(&expected[at])
        ));
    }
    Some(match (loaded.get(at), expected.get(at)) {
        (Some(got), Some(want)) => format!(
            "the leak guard chain {chain} has rule {number} `{}` instead of `{}`",
            describe_rule(got),
            describe_rule(want)
        ),
        (Some(got), None) => format!(
            "the leak guard chain {chain} has an added rule {number}: {}",
            describe_rule(got)
        ),
        (None, _) => format!(
            "the leak guard chain {chain} has {} rules instead of {}",
            loaded.len(),
            expected.len()
        ),
    })
}

fn zero_counters(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            if let Some(Value::Object(counter)) = fields.get_mut("counter") {
                for key in ["packets", "bytes"] {
                    if counter.contains_key(key) {
                        counter.insert(key.into(), Value::from(0));
                    }
                }
            }
            fields.values_mut().for_each(zero_counters);
        }
        Value::Array(items) => items.iter_mut().for_each(zero_counters),
        _ => {}
    }
}

/// A string without its JSON quotes, anything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A rule in something close to nft's own syntax, for a reason line; expressions this does
/// not know are shown as nft's JSON.
fn describe_rule(rule: &Value) -> String {
    let operand = |v: &Value| -> String {
        if let Some(key) = v["meta"]["key"].as_str() {
            return format!("meta {key}");
        }
        if let (Some(protocol), Some(field)) = (
            v["payload"]["protocol"].as_str(),
            v["payload"]["field"].as_str(),
        ) {
            return format!("{protocol} {field}");
        }
        if let Some(items) = v["set"].as_array() {
            let items: Vec<String> = items.iter().map(plain).collect();
            return format!("{{ {} }}", items.join(", "));
        }
        plain(v)
    };
    let mut words: Vec<String> = rule["expr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            if let Some(m) = e.get("match") {
                let op = match m["op"].as_str() {
                    Some("==") | Some("in") => String::new(),
                    Some(op) => format!("{op} "),
                    None => String::new(),
                };
                return format!("{} {op}{}", operand(&m["left"]), operand(&m["right"]));
            }
            if e.get("counter").is_some() {
                return "counter".into();
            }
            match e.as_object().map(|o| o.iter().next()) {
                Some(Some((verb, Value::Null))) => verb.clone(),
                Some(Some((verb, Value::Object(target)))) if target.contains_key("target") => {
                    format!("{verb} {}", plain(&target["target"]))
                }
                _ => e.to_string(),
            }
        })
        .collect();
    if let Some(comment) = rule["comment"].as_str() {
        words.push(format!("comment \"{comment}\""));
    }
    words.join(" ")
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
        .strip_prefix(nft::SOURCE_NAME)
        .and_then(|rest| rest.strip_prefix(':'))
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

    fn rule(expr: Value, comment: Option<&str>) -> Value {
        let mut rule = serde_json::json!({ "family": "inet", "chain": "output", "expr": expr });
        if let Some(comment) = comment {
            rule["comment"] = comment.into();
        }
        rule
    }

    #[test]
    fn tells_which_rule_was_added_removed_or_changed() {
        let lo = rule(
            serde_json::json!([
                { "match": { "op": "==", "left": { "meta": { "key": "oif" } }, "right": "lo" } },
                { "accept": null }
            ]),
            None,
        );
        let dns = rule(
            serde_json::json!([
                { "match": { "op": "==", "left": { "payload": { "protocol": "udp", "field": "dport" } },
                             "right": { "set": [5353, 5355] } } },
                { "counter": { "packets": 0, "bytes": 0 } },
                { "drop": null }
            ]),
            Some("mDNS and LLMNR"),
        );
        let accept = rule(serde_json::json!([{ "accept": null }]), None);
        let expected = [lo.clone(), dns.clone()];
        assert_eq!(rule_differences("output", &expected, &expected), None);
        assert_eq!(
            rule_differences(
                "output",
                &expected,
                &[accept.clone(), lo.clone(), dns.clone()]
            )
            .as_deref(),
            Some("the leak guard chain output has an added rule 1: accept")
        );
        assert_eq!(
            rule_differences("output", &expected, std::slice::from_ref(&lo)).as_deref(),
            Some(
                "the leak guard chain output lacks its rule 2: udp dport { 5353, 5355 } counter \
                 drop comment \"mDNS and LLMNR\""
            )
        );
        assert_eq!(
            rule_differences("output", &expected, &[lo.clone(), accept]).as_deref(),
            Some(
                "the leak guard chain output has rule 2 `accept` instead of `udp dport { 5353, \
                 5355 } counter drop comment \"mDNS and LLMNR\"`"
            )
        );
        assert_eq!(
            rule_differences("output", &expected, &[]).as_deref(),
            Some("the leak guard chain output has no rules (it was flushed); it was loaded with 2")
        );
    }

    #[test]
    fn points_into_extra_rules() {
        let ruleset = "a\n# extraFirewallRules\nfirst\nsecond\n\n# Leak guard\nz\n";
        let stderr = "ruleset:4:1-6: Error: syntax error\nsecond\n^^^^^^\n";
        assert_eq!(
            explain(stderr, ruleset),
            "ruleset:4:1-6: Error: syntax error (extraFirewallRules line 2)"
        );
        let stderr = "ruleset:1:1-1: Error: nope\n";
        assert_eq!(explain(stderr, ruleset), "ruleset:1:1-1: Error: nope");
    }
}
