//! The namespace's files, rendered from the templates in `templates/` (embedded at build time).

use std::net::IpAddr;

use anyhow::{Context, Result};
use minijinja::{AutoEscape, Environment, context};

use crate::config::Config;

const TEMPLATES: &[(&str, &str)] = &[
    ("resolv.conf", include_str!("../templates/resolv.conf.j2")),
    (
        "nsswitch.conf",
        include_str!("../templates/nsswitch.conf.j2"),
    ),
    (
        "namespace.nft",
        include_str!("../templates/namespace.nft.j2"),
    ),
    ("hosts", include_str!("../templates/hosts.j2")),
];

/// The files of a namespace, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub resolv_conf: String,
    pub nsswitch_conf: String,
    pub hosts: String,
    pub ruleset: String,
    /// The ruleset's fingerprint without the forwarded port's elements, which change while the
    /// config does not: what reload and heal compare to see whether the ruleset changed.
    pub ruleset_digest: String,
}

/// The DNS servers of one family as nft writes a destination: one address, or a set.
fn nft_addresses(servers: &[IpAddr]) -> String {
    match servers {
        [one] => one.to_string(),
        many => {
            let items: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("{{ {} }}", items.join(", "))
        }
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .expect("embedded templates are valid");
    }
    env
}

/// What the templates are rendered from.
struct Inputs<'a> {
    namespace: &'a str,
    interface: &'a str,
    /// dns_server first, then dnsServers.
    dns_servers: &'a [IpAddr],
    ipv6: bool,
    strict_dns: bool,
    extra_rules: &'a str,
    /// portForwarding is on: the ruleset has the set of forwarded ports.
    forwarding: bool,
    /// The set's elements, `udp . 51413, tcp . 51413`.
    forwarded: String,
}

fn render_one(env: &Environment<'_>, name: &str, inputs: &Inputs<'_>) -> Result<String> {
    let (v6, v4): (Vec<IpAddr>, Vec<IpAddr>) =
        inputs.dns_servers.iter().partition(|ip| ip.is_ipv6());
    let dns_by_family: Vec<(&str, String)> = [("ip", v4), ("ip6", v6)]
        .into_iter()
        .filter(|(_, servers)| !servers.is_empty())
        .map(|(family, servers)| (family, nft_addresses(&servers)))
        .collect();
    let ctx = context! {
        namespace => inputs.namespace,
        interface => inputs.interface,
        dns_servers => inputs.dns_servers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        dns_by_family => dns_by_family,
        dns_comment => if inputs.dns_servers.len() == 1 { "dns_server" } else { "dns_server and dnsServers" },
        ipv6 => inputs.ipv6,
        strict_dns => inputs.strict_dns,
        extra_rules => inputs.extra_rules,
        forwarding => inputs.forwarding,
        forwarded => &inputs.forwarded,
    };
    env.get_template(name)
        .and_then(|t| t.render(&ctx))
        .with_context(|| format!("rendering {name}"))
}

/// The set of forwarded ports keeps its elements through a reload of the ruleset: they come
/// from the forwarding process's record, while that process runs and the mapping lasts.
fn forwarded_elements(config: &Config) -> String {
    use crate::system::forwarding::{Record, elements, unix_now};
    if config.port_forwarding.is_none() {
        return String::new();
    }
    match Record::load(&config.namespace) {
        Ok(Some(record)) if record.namespace == config.namespace && record.process.is_alive() => {
            elements(&record.live_ports(unix_now()))
        }
        _ => String::new(),
    }
}

pub fn render(config: &Config) -> Result<Rendered> {
    let env = environment();
    let inputs = Inputs {
        namespace: &config.namespace,
        interface: config.interface(),
        dns_servers: &config.dns_servers,
        ipv6: config.ipv6_enabled(),
        strict_dns: config.strict_dns,
        extra_rules: config.extra_firewall_rules.trim_end(),
        forwarding: config.port_forwarding.is_some(),
        forwarded: forwarded_elements(config),
    };
    let get = |name: &str| render_one(&env, name, &inputs);
    let ruleset = get("namespace.nft")?;
    let ruleset_digest = if inputs.forwarded.is_empty() {
        crate::system::firewall::digest(&ruleset)
    } else {
        let without = Inputs {
            forwarded: String::new(),
            ..inputs
        };
        crate::system::firewall::digest(&render_one(&env, "namespace.nft", &without)?)
    };
    Ok(Rendered {
        resolv_conf: get("resolv.conf")?,
        nsswitch_conf: get("nsswitch.conf")?,
        hosts: get("hosts")?,
        ruleset,
        ruleset_digest,
    })
}
