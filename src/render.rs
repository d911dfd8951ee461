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

pub fn render(config: &Config) -> Result<Rendered> {
    let env = environment();
    let (v6, v4): (Vec<IpAddr>, Vec<IpAddr>) =
        config.dns_servers.iter().partition(|ip| ip.is_ipv6());
    let dns_by_family: Vec<(&str, String)> = [("ip", v4), ("ip6", v6)]
        .into_iter()
        .filter(|(_, servers)| !servers.is_empty())
        .map(|(family, servers)| (family, nft_addresses(&servers)))
        .collect();
    let ctx = context! {
        namespace => &config.namespace,
        interface => config.interface(),
        dns_servers => config.dns_servers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        dns_by_family => dns_by_family,
        dns_comment => if config.dns_servers.len() == 1 { "dns_server" } else { "dns_server and dnsServers" },
        ipv6 => config.ipv6_enabled(),
        strict_dns => config.strict_dns,
        extra_rules => config.extra_firewall_rules.trim_end(),
    };
    let get = |name: &str| -> Result<String> {
        env.get_template(name)
            .and_then(|t| t.render(&ctx))
            .with_context(|| format!("rendering {name}"))
    };
    Ok(Rendered {
        resolv_conf: get("resolv.conf")?,
        nsswitch_conf: get("nsswitch.conf")?,
        hosts: get("hosts")?,
        ruleset: get("namespace.nft")?,
    })
}
