//! The wg-quick parser (`wg_namespace::wgquick::parse`) on arbitrary bytes, alone and as the
//! `configFile` of a config: it must never panic, every error must be one line naming a line
//! of the input, and whatever is accepted must hold up (unique peer keys, at least one allowed
//! IP per peer, canonical prefixes and endpoints, and `import`'s output without the secrets).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wg_namespace::config::{Cidr, Config, Endpoint, PresharedKey};
use wg_namespace::system::files::SecretFile;
use wg_namespace::wgquick;

const PATH: &str = "/run/provider.conf";

fuzz_target!(|data: &[u8]| {
    let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
    match wgquick::parse(data) {
        Ok(file) => holds_up(&file),
        Err(e) => {
            assert!((1..=lines).contains(&e.line), "line {} of {lines}", e.line);
            one_line(&e.to_string());
            assert!(!e.problem.is_empty());
        }
    }

    // As the module writes a document naming only the file.
    let document = format!(r#"{{"namespace_name":"vpn","configFile":"{PATH}","ips":[],"peers":[]}}"#);
    let read = |_: &std::path::Path| {
        Ok(SecretFile {
            bytes: data.to_vec(),
            warning: None,
        })
    };
    match Config::parse_with(&document, &read) {
        Ok(config) => {
            assert!(!config.dns_servers.is_empty());
            assert_eq!(config.dns_servers[0], config.dns_server);
            assert!(config.dns_servers.iter().all(|ip| !ip.is_ipv6()) || config.ipv6_enabled());
            for warning in &config.warnings {
                one_line(warning);
                assert!(warning.starts_with(PATH), "{warning}");
            }
        }
        Err(e) => one_line(&e.to_string()),
    }
});

fn one_line(message: &str) {
    assert!(
        !message.contains(['\n', '\r']),
        "not one line: {message:?}"
    );
}

fn holds_up(file: &wgquick::WgQuick) {
    let mut keys = std::collections::HashSet::new();
    for peer in &file.peers {
        assert!(keys.insert(peer.public_key.0), "duplicate peer accepted");
        assert_eq!(peer.public_key.to_base64(), peer.public_key_text);
        assert!(!peer.allowed_ips.is_empty());
        if let Some(endpoint) = &peer.endpoint {
            assert_eq!(Endpoint::parse(&endpoint.to_string()).as_ref(), Ok(endpoint));
        }
    }
    for cidr in file
        .addresses
        .iter()
        .chain(file.peers.iter().flat_map(|p| &p.allowed_ips))
    {
        assert_eq!(cidr.to_string().parse::<Cidr>(), Ok(*cidr));
    }
    if let Some(mtu) = file.mtu {
        assert!((wgquick::MTU_MIN..=wgquick::MTU_MAX).contains(&mtu));
    }
    for warning in &file.warnings {
        one_line(warning);
    }
    // `import` never prints a secret.
    let printed = format!("{}{}", wgquick::to_nix(file), wgquick::to_json(file));
    if let Some(key) = &file.private_key {
        assert!(!printed.contains(&key.to_base64()), "import printed the private key");
    }
    for peer in &file.peers {
        if let Some(PresharedKey::Inline(psk)) = &peer.preshared_key {
            assert!(!printed.contains(&psk.to_base64()), "import printed a preshared key");
        }
    }
}
