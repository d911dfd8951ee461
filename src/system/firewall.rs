//! The namespace's nftables ruleset: loaded through libnftables inside the namespace, read back
//! with the `nft` program run there.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::system::{nf_tables, nft};

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

/// The `nft` program: the NixOS package sets its store path at build time, so that every unit
/// (and a root shell) runs the same one whatever its PATH; elsewhere PATH finds it.
const NFT_PROGRAM: &str = match option_env!("WG_NAMESPACE_NFT") {
    Some(path) => path,
    None => "nft",
};

/// Runs the `nft` program with `args` inside the namespace `fd`, within [`NFT_TIMEOUT`]. What
/// only reads the ruleset goes this way: libnftables 1.0.6 reads freed memory when it prints
/// JSON in a process that has had a context before (valgrind), which a short-lived `nft`
/// process survives and this one must not risk.
fn nft_program(fd: BorrowedFd<'_>, args: &[&str]) -> Result<Output> {
    let mut command = crate::system::process::command_in(NFT_PROGRAM, fd);
    command.args(args);
    crate::system::process::output_within(&mut command, None, NFT_TIMEOUT).map_err(|e| {
        match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::Error::new(e).context(format!(
                "running {NFT_PROGRAM} (is nftables installed{}?)",
                if NFT_PROGRAM.contains('/') {
                    ""
                } else {
                    " and on PATH"
                }
            )),
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

/// Whether the table `name` (family inet) exists in the namespace.
pub fn has_table(fd: impl AsFd, name: &str) -> Result<bool> {
    has_tables(fd, &[name])
}

/// Whether every one of the tables `names` (family inet) exists in the namespace: one netlink
/// request for all of them.
pub fn has_tables(fd: impl AsFd, names: &[&str]) -> Result<bool> {
    let present = nf_tables::tables(fd).context("listing the nftables tables")?;
    Ok(names.iter().all(|name| present.iter().any(|p| p == name)))
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

/// The leak guard as the kernel holds it now: what `up`, `reload` and `heal` record right after
/// loading the ruleset, for [`judge`] to compare with.
pub fn guard_record(fd: impl AsFd) -> Result<nf_tables::Table> {
    nf_tables::read_after_load(fd, GUARD_TABLE)
        .context("reading the leak guard back")?
        .table
        .context("the loaded ruleset holds no leak guard table")
}

/// What [`judge`] found.
#[derive(Debug)]
pub struct Judgement {
    /// Both the leak guard's table and the policy table are there.
    pub loaded: bool,
    pub policy_loaded: bool,
    /// One line per way the leak guard differs from the one recorded when it was loaded;
    /// empty when it is the same.
    pub differences: Vec<String>,
}

/// Compares the leak guard in the namespace with `recorded`, the one wg-namespace loaded:
/// a few netlink requests, no process and no namespace made. Compared is what decides verdicts
/// on packets: the table's flags (a dormant table filters nothing), each chain's type, hook,
/// priority and policy, every rule in order, the elements of the sets rules look up. Handles
/// and counter values are not (they differ between loads and grow with traffic). Only when a
/// rule differs is `nft` run, to name it in its own words.
pub fn judge(fd: impl AsFd, recorded: Option<&nf_tables::Table>) -> Result<Judgement> {
    let reading = nf_tables::read(fd.as_fd(), GUARD_TABLE).context("reading the ruleset")?;
    Ok(judge_reading(fd.as_fd(), reading, recorded))
}

/// [`judge`] for a reader that asks again and again (the companion, per scrape). An intact
/// guard stays intact until the namespace's ruleset changes, and every change to it moves the
/// ruleset's generation id: while the generation, the namespace and the record are the ones
/// last judged intact, that judgement stands, for one netlink request instead of a dozen. What
/// is not intact is read and compared again every time, and so is a guard with sets whose
/// elements expire (which changes them without a new generation).
#[derive(Debug, Default)]
pub struct Judge {
    intact: Option<Intact>,
}

#[derive(Debug)]
struct Intact {
    netns: crate::system::netns::NetnsId,
    generation: u32,
    recorded: nf_tables::Table,
    loaded: bool,
    policy_loaded: bool,
}

impl Judge {
    pub fn judge(
        &mut self,
        fd: impl AsFd,
        netns: crate::system::netns::NetnsId,
        recorded: Option<&nf_tables::Table>,
    ) -> Result<Judgement> {
        let known = self
            .intact
            .as_ref()
            .filter(|i| i.netns == netns && Some(&i.recorded) == recorded)
            .map(|i| i.generation);
        let reading = nf_tables::read_unless(fd.as_fd(), GUARD_TABLE, known)
            .context("reading the ruleset")?;
        let Some(reading) = reading else {
            let intact = self.intact.as_ref().context("no judgement to keep")?;
            return Ok(Judgement {
                loaded: intact.loaded,
                policy_loaded: intact.policy_loaded,
                differences: Vec::new(),
            });
        };
        let generation = reading.generation;
        let timed = reading
            .table
            .as_ref()
            .is_some_and(|t| t.sets.iter().any(nf_tables::Set::timed));
        let judgement = judge_reading(fd.as_fd(), reading, recorded);
        self.intact = match recorded {
            Some(recorded) if judgement.differences.is_empty() && !timed => Some(Intact {
                netns,
                generation,
                recorded: recorded.clone(),
                loaded: judgement.loaded,
                policy_loaded: judgement.policy_loaded,
            }),
            _ => None,
        };
        Ok(judgement)
    }
}

fn judge_reading(
    fd: BorrowedFd<'_>,
    reading: nf_tables::Reading,
    recorded: Option<&nf_tables::Table>,
) -> Judgement {
    let has = |name: &str| reading.tables.iter().any(|t| t == name);
    let differences = match (&reading.table, recorded) {
        (None, _) => vec![format!("the leak guard table {GUARD_TABLE} is missing")],
        (Some(_), None) => vec![
            "the leak guard was loaded by an older wg-namespace, which kept no record of it to \
             compare with (`wg-namespace heal` or `reload` loads it again and records it)"
                .to_string(),
        ],
        (Some(live), Some(recorded)) => {
            let listing = std::cell::OnceCell::new();
            let describe_live = |rule: &nf_tables::Rule| -> String {
                let listing = listing.get_or_init(|| live_rule_texts(fd.as_fd()));
                rule.handle
                    .and_then(|h| listing.get(&h).cloned())
                    .unwrap_or_else(|| describe_recorded(rule))
            };
            guard_differences(recorded, live, &describe_live)
        }
    };
    Judgement {
        loaded: has(GUARD_TABLE) && has(POLICY_TABLE),
        policy_loaded: has(POLICY_TABLE),
        differences,
    }
}

/// The guard's rules as nft words them (`nft -j list table`), by handle; empty when nft cannot
/// tell.
fn live_rule_texts(fd: BorrowedFd<'_>) -> HashMap<u64, String> {
    let items = guard_items(fd).ok().flatten().unwrap_or_default();
    items
        .iter()
        .filter_map(|item| item.get("rule"))
        .filter_map(|rule| Some((rule["handle"].as_u64()?, describe_rule(rule))))
        .collect()
}

/// A recorded rule, known by its comment.
fn describe_recorded(rule: &nf_tables::Rule) -> String {
    match rule.comment() {
        Some(comment) => format!("... comment \"{comment}\""),
        None => "a rule without a comment".into(),
    }
}

/// How `live` differs from `recorded`: one line per difference.
fn guard_differences(
    recorded: &nf_tables::Table,
    live: &nf_tables::Table,
    describe_live: &dyn Fn(&nf_tables::Rule) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    if live.head != recorded.head {
        let flags = live.flags();
        if flags != recorded.flags() {
            let names: Vec<&str> = [(1, "dormant"), (2, "owner"), (4, "persist")]
                .into_iter()
                .filter(|(bit, _)| flags & bit != 0)
                .map(|(_, name)| name)
                .collect();
            out.push(if flags & 1 != 0 {
                format!(
                    "the leak guard table is marked `flags {}` (a dormant table filters nothing)",
                    names.join(", ")
                )
            } else {
                format!(
                    "the leak guard table has flags {flags:#x} instead of {:#x}",
                    recorded.flags()
                )
            });
        } else {
            out.push(
                "the leak guard table's attributes are not the ones it was loaded with".into(),
            );
        }
    }
    for expected in &recorded.chains {
        let name = &expected.name;
        let Some(chain) = live.chains.iter().find(|c| &c.name == name) else {
            out.push(format!("the leak guard chain {name} is missing"));
            continue;
        };
        if chain.head != expected.head {
            let verdict = |p: Option<u32>| match p {
                Some(0) => "drop".to_string(),
                Some(1) => "accept".to_string(),
                Some(other) => other.to_string(),
                None => "none".to_string(),
            };
            if chain.policy() != expected.policy() {
                out.push(format!(
                    "the leak guard chain {name} has policy {} instead of {}",
                    verdict(chain.policy()),
                    verdict(expected.policy())
                ));
            }
            if chain.hook() != expected.hook() {
                let describe = |hook: Option<(String, u32, i32)>| match hook {
                    Some((kind, number, priority)) => {
                        let hook = ["prerouting", "input", "forward", "output", "postrouting"]
                            .get(number as usize)
                            .map_or(number.to_string(), |h| h.to_string());
                        format!("type {kind} hook {hook} priority {priority}")
                    }
                    None => "a regular chain".into(),
                };
                out.push(format!(
                    "the leak guard chain {name} is {} instead of {}",
                    describe(chain.hook()),
                    describe(expected.hook())
                ));
            }
            if chain.policy() == expected.policy() && chain.hook() == expected.hook() {
                out.push(format!(
                    "the leak guard chain {name}'s attributes are not the ones it was loaded with"
                ));
            }
        }
        out.extend(rule_differences(
            name,
            &expected.rules,
            &chain.rules,
            &|r| describe_recorded(r),
            describe_live,
        ));
    }
    for chain in &live.chains {
        if !recorded.chains.iter().any(|c| c.name == chain.name) {
            out.push(format!(
                "the leak guard has a chain {} it was not loaded with",
                chain.name
            ));
        }
    }
    for set in &live.sets {
        match recorded.sets.iter().find(|s| s.name == set.name) {
            None => out.push(format!(
                "the leak guard has a set {} it was not loaded with",
                set.name
            )),
            Some(expected) if expected != set => out.push(format!(
                "the leak guard's set {} is not the one it was loaded with",
                set.name
            )),
            Some(_) => {}
        }
    }
    for set in &recorded.sets {
        if !live.sets.iter().any(|s| s.name == set.name) {
            out.push(format!("the leak guard's set {} is missing", set.name));
        }
    }
    out
}

/// The first place where a chain's rules part from the expected ones, told as an added, a
/// missing or a changed rule.
fn rule_differences<R: PartialEq>(
    chain: &str,
    expected: &[R],
    loaded: &[R],
    describe_expected: &dyn Fn(&R) -> String,
    describe_loaded: &dyn Fn(&R) -> String,
) -> Option<String> {
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
            describe_loaded(&loaded[at])
        ));
    }
    if expected.len() > at && loaded[at..] == expected[at + 1..] {
        return Some(format!(
            "the leak guard chain {chain} lacks its rule {number}: {}",
            describe_expected(&expected[at])
        ));
    }
    Some(match (loaded.get(at), expected.get(at)) {
        (Some(got), Some(want)) => format!(
            "the leak guard chain {chain} has rule {number} `{}` instead of `{}`",
            describe_loaded(got),
            describe_expected(want)
        ),
        (Some(got), None) => format!(
            "the leak guard chain {chain} has an added rule {number}: {}",
            describe_loaded(got)
        ),
        (None, _) => format!(
            "the leak guard chain {chain} has {} rules instead of {}",
            loaded.len(),
            expected.len()
        ),
    })
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
        let differences = |loaded: &[Value]| {
            rule_differences("output", &expected, loaded, &describe_rule, &describe_rule)
        };
        assert_eq!(differences(&expected), None);
        assert_eq!(
            differences(&[accept.clone(), lo.clone(), dns.clone()]).as_deref(),
            Some("the leak guard chain output has an added rule 1: accept")
        );
        assert_eq!(
            differences(std::slice::from_ref(&lo)).as_deref(),
            Some(
                "the leak guard chain output lacks its rule 2: udp dport { 5353, 5355 } counter \
                 drop comment \"mDNS and LLMNR\""
            )
        );
        assert_eq!(
            differences(&[lo.clone(), accept]).as_deref(),
            Some(
                "the leak guard chain output has rule 2 `accept` instead of `udp dport { 5353, \
                 5355 } counter drop comment \"mDNS and LLMNR\"`"
            )
        );
        assert_eq!(
            differences(&[]).as_deref(),
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
