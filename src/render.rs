//! The namespace's files, rendered from the templates in `templates/` (embedded at build time).

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
];

/// The three files of a namespace, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub resolv_conf: String,
    pub nsswitch_conf: String,
    pub ruleset: String,
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
    let ctx = context! {
        namespace => &config.namespace,
        interface => config.interface(),
        dns_server => config.dns_server.to_string(),
        dns_family => if config.dns_server.is_ipv6() { "ip6" } else { "ip" },
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
        ruleset: get("namespace.nft")?,
    })
}
