//! wg-quick `.conf` files, as VPN providers hand them out: parsed into the values `configFile`
//! contributes to a [`Config`](crate::config::Config), and printed back as module options for
//! `wg-namespace import`.
//!
//! A small parser of our own rather than an INI crate: the format needs repeated sections
//! (`[Peer]`) and repeated keys (`Address`, `AllowedIPs`), every error must name its line, and
//! the INI crates on crates.io either merge repeated keys or sections or do not report line
//! numbers. Nothing here does I/O, so the fuzz target (fuzz/) can drive it directly.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use crate::config::{Cidr, Endpoint, Key, Peer, PresharedKey};

/// The most a provider's file may hold; the biggest real ones (many peers) are a few KiB.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

/// MTU limits: IPv4's minimum, and the largest a WireGuard link takes.
pub const MTU_MIN: u16 = 576;
pub const MTU_MAX: u16 = 65456;

/// What a wg-quick file says about the interface and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgQuick {
    pub private_key: Option<Key>,
    pub addresses: Vec<Cidr>,
    pub dns: Vec<IpAddr>,
    pub mtu: Option<u16>,
    pub peers: Vec<Peer>,
    /// Keys that mean nothing inside a namespace and were ignored, one line each.
    pub warnings: Vec<String>,
}

/// A problem on one line of the file (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub problem: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

type Result<T> = std::result::Result<T, LineError>;

fn fail<T>(line: usize, problem: impl Into<String>) -> Result<T> {
    Err(LineError {
        line,
        problem: problem.into(),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// A `[Peer]` section being read, with the line of its header for errors about the whole peer.
struct PeerDraft {
    line: usize,
    public_key: Option<(Key, String)>,
    preshared_key: Option<Key>,
    allowed_ips: Vec<Cidr>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
}

impl PeerDraft {
    fn finish(self, seen: &mut HashSet<[u8; 32]>) -> Result<Peer> {
        let Some((public_key, public_key_text)) = self.public_key else {
            return fail(self.line, "[Peer] has no PublicKey");
        };
        if !seen.insert(public_key.0) {
            return fail(
                self.line,
                format!("[Peer] {public_key_text} appears in an earlier [Peer] too"),
            );
        }
        if self.allowed_ips.is_empty() {
            return fail(
                self.line,
                "[Peer] has no AllowedIPs, so no traffic would ever go to it; use AllowedIPs = 0.0.0.0/0, ::/0 to send everything",
            );
        }
        Ok(Peer {
            public_key,
            public_key_text,
            preshared_key: self.preshared_key.map(PresharedKey::Inline),
            allowed_ips: self.allowed_ips,
            endpoint: self.endpoint,
            dynamic_endpoint_refresh_seconds: 0,
            persistent_keepalive: self.persistent_keepalive,
            alternatives: Vec::new(),
            failover_after_seconds: crate::config::DEFAULT_FAILOVER_AFTER_SECONDS,
        })
    }
}

/// The user's text for a message: quoted when it holds anything that could break the line.
fn shown(text: &str) -> String {
    if text.chars().any(|c| c.is_control()) {
        format!("{text:?}")
    } else {
        text.to_string()
    }
}

/// Parses the bytes of a wg-quick file. A UTF-8 byte order mark, CRLF line ends, `#` comments
/// and spaces around `=` are accepted; keys and section names are case-insensitive.
pub fn parse(bytes: &[u8]) -> Result<WgQuick> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).or_else(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        fail(line, "is not UTF-8 text")
    })?;

    let mut out = WgQuick::default();
    let mut section = Section::None;
    let mut interface_line = None;
    let mut peer: Option<PeerDraft> = None;
    let mut peer_lines = Vec::new();
    let mut seen_keys = HashSet::new();
    // Keys that may appear once per section, lower-cased, with the line they were on.
    let mut once: Vec<(String, usize)> = Vec::new();

    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        if content.contains('\0') {
            return fail(line, "holds a NUL byte");
        }

        if let Some(name) = content.strip_prefix('[') {
            let Some(name) = name.strip_suffix(']') else {
                return fail(
                    line,
                    format!("{} is not a section header like [Peer]", shown(content)),
                );
            };
            if let Some(done) = peer.take() {
                out.peers.push(done.finish(&mut seen_keys)?);
            }
            once.clear();
            section = match name.trim().to_ascii_lowercase().as_str() {
                "interface" if interface_line.is_some() => {
                    return fail(
                        line,
                        format!(
                            "a second [Interface]; the first is on line {}",
                            interface_line.unwrap_or(0)
                        ),
                    );
                }
                "interface" => {
                    interface_line = Some(line);
                    Section::Interface
                }
                "peer" => {
                    peer_lines.push(line);
                    peer = Some(PeerDraft {
                        line,
                        public_key: None,
                        preshared_key: None,
                        allowed_ips: Vec::new(),
                        endpoint: None,
                        persistent_keepalive: None,
                    });
                    Section::Peer
                }
                _ => {
                    return fail(
                        line,
                        format!(
                            "unknown section [{}]; a wg-quick file has [Interface] and [Peer]",
                            shown(name)
                        ),
                    );
                }
            };
            continue;
        }

        let Some((key, value)) = content.split_once('=') else {
            return fail(
                line,
                format!("{} is not `Key = value`", shown(&first_word(content))),
            );
        };
        let key = key.trim();
        let value = value.trim();
        let lower = key.to_ascii_lowercase();
        // From here on the key appears only in messages (found by fuzzing: a `\r` inside it).
        let key = &shown(key);
        let repeatable = matches!(lower.as_str(), "address" | "dns" | "allowedips");
        if !repeatable && let Some((_, first)) = once.iter().find(|(k, _)| *k == lower) {
            return fail(
                line,
                format!("{key} is given a second time; the first is on line {first}"),
            );
        }
        once.push((lower.clone(), line));
        let is_secret = matches!(lower.as_str(), "privatekey" | "presharedkey");
        if value.is_empty() && !is_secret {
            return fail(line, format!("{key} has no value"));
        }

        match (section, lower.as_str()) {
            (Section::None, _) => {
                return fail(
                    line,
                    format!("{key} comes before any [Interface] or [Peer]"),
                );
            }
            (Section::Interface, "privatekey") => {
                // Never echo a secret, even a malformed one.
                out.private_key = Some(Key::from_base64(value).ok_or_else(|| LineError {
                    line,
                    problem: "PrivateKey is not a base64 WireGuard key (44 characters, as `wg genkey` prints)".into(),
                })?);
            }
            (Section::Interface, "address") => {
                for item in list(line, key, value)? {
                    out.addresses.push(item.parse::<Cidr>().or_else(|_| {
                        fail(
                            line,
                            format!("Address {} is not an address like 10.2.0.2/32", shown(item)),
                        )
                    })?);
                }
            }
            (Section::Interface, "dns") => {
                for item in list(line, key, value)? {
                    match item.parse::<IpAddr>() {
                        Ok(ip) => {
                            if let Some(problem) = crate::config::resolver_problem(ip) {
                                return fail(line, format!("DNS {ip} {problem}, not a resolver"));
                            }
                            if !out.dns.contains(&ip) {
                                out.dns.push(ip);
                            }
                        }
                        Err(_) => {
                            return fail(
                                line,
                                format!(
                                    "DNS {} is not an IP address (search domains are not supported)",
                                    shown(item)
                                ),
                            );
                        }
                    }
                }
            }
            (Section::Interface, "mtu") => {
                out.mtu = Some(number(line, key, value, MTU_MIN, MTU_MAX)?);
            }
            (Section::Interface, "preup" | "postup" | "predown" | "postdown") => {
                return fail(
                    line,
                    format!(
                        "{key} runs shell commands as root; wg-namespace does not run them: remove the line (firewall rules belong in extraFirewallRules)"
                    ),
                );
            }
            (Section::Interface, "table" | "fwmark" | "saveconfig" | "listenport") => {
                out.warnings.push(format!(
                    "line {line}: {key} has no meaning inside a namespace; ignored"
                ));
            }
            (Section::Peer, _) => {
                let draft = peer.as_mut().expect("a [Peer] section has a draft");
                peer_key(draft, line, key, &lower, value)?;
            }
            (Section::Interface, _) => {
                return fail(line, format!("unknown key {key} in [Interface]"));
            }
        }
    }
    if let Some(done) = peer.take() {
        out.peers.push(done.finish(&mut seen_keys)?);
    }
    if interface_line.is_none() {
        return fail(1, "has no [Interface] section; is this a wg-quick file?");
    }
    // The private key pasted where the server's public key belongs: WireGuard would never
    // connect, and `import` would print the secret as a public key (found by fuzzing).
    if let Some(private) = &out.private_key
        && let Some(i) = out.peers.iter().position(|p| p.public_key == *private)
    {
        return fail(
            peer_lines[i],
            "[Peer] has this file's PrivateKey as its PublicKey; a peer's PublicKey is the server's",
        );
    }
    // The same for a preshared key pasted as a PublicKey.
    let is_preshared = |key: &Key| {
        out.peers
            .iter()
            .any(|p| matches!(&p.preshared_key, Some(PresharedKey::Inline(psk)) if psk == key))
    };
    if let Some(i) = out.peers.iter().position(|p| is_preshared(&p.public_key)) {
        return fail(
            peer_lines[i],
            "[Peer] has a PresharedKey as its PublicKey; a peer's PublicKey is the server's",
        );
    }
    Ok(out)
}

fn peer_key(draft: &mut PeerDraft, line: usize, key: &str, lower: &str, value: &str) -> Result<()> {
    match lower {
        "publickey" => {
            let key = Key::from_base64(value).ok_or_else(|| LineError {
                line,
                problem: format!(
                    "PublicKey {} is not a base64 WireGuard key (44 characters, as `wg pubkey` prints)",
                    shown(value)
                ),
            })?;
            draft.public_key = Some((key, value.to_string()));
        }
        "presharedkey" => {
            draft.preshared_key = Some(Key::from_base64(value).ok_or_else(|| LineError {
                line,
                problem: "PresharedKey is not a base64 WireGuard key (44 characters, as `wg genpsk` prints)".into(),
            })?);
        }
        "allowedips" => {
            for item in list(line, key, value)? {
                draft.allowed_ips.push(item.parse::<Cidr>().or_else(|_| {
                    fail(
                        line,
                        format!("AllowedIPs {} is not a CIDR like 0.0.0.0/0", shown(item)),
                    )
                })?);
            }
        }
        "endpoint" => {
            draft.endpoint = Some(
                Endpoint::parse(value)
                    .or_else(|p| fail(line, format!("Endpoint {} {p}", shown(value))))?,
            );
        }
        "persistentkeepalive" => {
            draft.persistent_keepalive = if value.eq_ignore_ascii_case("off") {
                None
            } else {
                Some(number(line, key, value, 0, 65535)?).filter(|&v| v != 0)
            };
        }
        _ => return fail(line, format!("unknown key {key} in [Peer]")),
    }
    Ok(())
}

/// A comma-separated list; empty items (`a,,b`) are mistakes.
fn list<'a>(line: usize, key: &str, value: &'a str) -> Result<Vec<&'a str>> {
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                fail(line, format!("{key} has an empty item in its list"))
            } else {
                Ok(item)
            }
        })
        .collect()
}

fn number(line: usize, key: &str, value: &str, min: u16, max: u16) -> Result<u16> {
    match value.parse::<u16>() {
        Ok(n) if (min..=max).contains(&n) && value.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => fail(
            line,
            format!(
                "{key} {} is not a whole number between {min} and {max}",
                shown(value)
            ),
        ),
    }
}

fn first_word(text: &str) -> String {
    let word = text.split_whitespace().next().unwrap_or(text);
    word.chars().take(40).collect()
}

/// `import --nix`: the options a file stands for, as a Nix attribute set to put under
/// `services.wireguard-namespace` (or `services.wireguard-namespaces.<name>`). The private key is
/// replaced by a `privateKeyFile` placeholder; preshared keys too (`presharedKeyFile`).
pub fn to_nix(file: &WgQuick) -> String {
    let strings = |items: Vec<String>| {
        items
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = String::from("{\n");
    out.push_str("  # The private key stays out of the Nix store: put it in a file of its own,\n");
    out.push_str("  # readable by root only (agenix, sops-nix), and name that file here.\n");
    out.push_str(&format!(
        "  privateKeyFile = \"{PRIVATE_KEY_PLACEHOLDER}\";\n"
    ));
    if let Some((first, rest)) = file.dns.split_first() {
        out.push_str(&format!("  dns_server = \"{first}\";\n"));
        if !rest.is_empty() {
            out.push_str(&format!(
                "  dnsServers = [ {} ];\n",
                strings(rest.iter().map(ToString::to_string).collect())
            ));
        }
    }
    out.push_str(&format!(
        "  ips = [ {} ];\n",
        strings(file.addresses.iter().map(ToString::to_string).collect())
    ));
    if let Some(mtu) = file.mtu {
        out.push_str(&format!("  mtu = {mtu};\n"));
    }
    out.push_str("  peers = [\n");
    for (i, peer) in file.peers.iter().enumerate() {
        out.push_str("    {\n");
        out.push_str(&format!(
            "      publicKey = \"{}\";\n",
            peer.public_key_text
        ));
        if peer.preshared_key.is_some() {
            out.push_str(&format!(
                "      presharedKeyFile = \"{}\";\n",
                preshared_placeholder(i)
            ));
        }
        out.push_str(&format!(
            "      allowedIPs = [ {} ];\n",
            strings(peer.allowed_ips.iter().map(ToString::to_string).collect())
        ));
        if let Some(endpoint) = &peer.endpoint {
            out.push_str(&format!("      endpoint = \"{endpoint}\";\n"));
        }
        if let Some(keepalive) = peer.persistent_keepalive {
            out.push_str(&format!("      persistentKeepalive = {keepalive};\n"));
        }
        out.push_str("    }\n");
    }
    out.push_str("  ];\n}\n");
    out
}

/// `import --json`: the same as [`to_nix`], as the helper's JSON config.
pub fn to_json(file: &WgQuick) -> serde_json::Value {
    let peers: Vec<serde_json::Value> = file
        .peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            serde_json::json!({
                "publicKey": peer.public_key_text,
                "presharedKeyFile": peer.preshared_key.as_ref().map(|_| preshared_placeholder(i)),
                "allowedIPs": peer.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "endpoint": peer.endpoint.as_ref().map(ToString::to_string),
                "persistentKeepalive": peer.persistent_keepalive,
            })
        })
        .collect();
    serde_json::json!({
        "privateKeyFile": PRIVATE_KEY_PLACEHOLDER,
        "dns_server": file.dns.first().map(ToString::to_string),
        "dnsServers": file.dns.iter().skip(1).map(ToString::to_string).collect::<Vec<_>>(),
        "ips": file.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "mtu": file.mtu,
        "peers": peers,
    })
}

pub const PRIVATE_KEY_PLACEHOLDER: &str = "/run/secrets/wireguard-private-key";

fn preshared_placeholder(peer: usize) -> String {
    format!("/run/secrets/wireguard-psk-{peer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const KEY_C: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const PSK: &str = "rVXs/Ni9tu3oDBLS4hOyAUAa1qTWVA3loR8eL20os3I=";

    fn key(text: &str) -> Key {
        Key::from_base64(text).unwrap()
    }

    fn cidrs(items: &[&str]) -> Vec<Cidr> {
        items.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn ips(items: &[&str]) -> Vec<IpAddr> {
        items.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn peer(public: &str, allowed: &[&str], endpoint: &str) -> Peer {
        Peer {
            public_key: key(public),
            public_key_text: public.into(),
            preshared_key: None,
            allowed_ips: cidrs(allowed),
            endpoint: Some(Endpoint::parse(endpoint).unwrap()),
            dynamic_endpoint_refresh_seconds: 0,
            persistent_keepalive: None,
            alternatives: Vec::new(),
            failover_after_seconds: crate::config::DEFAULT_FAILOVER_AFTER_SECONDS,
        }
    }

    fn error(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err().to_string()
    }

    // Mullvad's generator: a comment header, both families in one Address line, IPv4 DNS,
    // everything routed through one peer.
    #[test]
    fn mullvad() {
        let text = format!(
            "# Device: Happy Otter\n\
             [Interface]\n\
             PrivateKey = {KEY_A}\n\
             Address = 10.66.12.34/32,fc00:bbbb:bbbb:bb01::3:c21/128\n\
             DNS = 10.64.0.1\n\
             \n\
             [Peer]\n\
             PublicKey = {KEY_B}\n\
             AllowedIPs = 0.0.0.0/0,::0/0\n\
             Endpoint = 185.65.135.224:51820\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        assert_eq!(
            file,
            WgQuick {
                private_key: Some(key(KEY_A)),
                addresses: cidrs(&["10.66.12.34/32", "fc00:bbbb:bbbb:bb01::3:c21/128"]),
                dns: ips(&["10.64.0.1"]),
                mtu: None,
                peers: vec![peer(KEY_B, &["0.0.0.0/0", "::/0"], "185.65.135.224:51820")],
                warnings: vec![],
            }
        );
    }

    // ProtonVPN's download: CRLF line ends, a comment block naming the server, a `#` comment
    // after a value, and a peer keepalive.
    #[test]
    fn protonvpn() {
        let text = format!(
            "[Interface]\r\n\
             # Key for laptop\r\n\
             # Bouncing = 4\r\n\
             # NetShield = 1\r\n\
             # Moderate NAT = off\r\n\
             # NAT-PMP (Port Forwarding) = on\r\n\
             # VPN Accelerator = on\r\n\
             PrivateKey = {KEY_A}\r\n\
             Address = 10.2.0.2/32\r\n\
             DNS = 10.2.0.1 # the tunnel's resolver\r\n\
             \r\n\
             [Peer]\r\n\
             # CH#56\r\n\
             PublicKey = {KEY_B}\r\n\
             AllowedIPs = 0.0.0.0/0\r\n\
             Endpoint = 185.159.157.13:51820\r\n\
             PersistentKeepalive = 25\r\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        let mut expected = peer(KEY_B, &["0.0.0.0/0"], "185.159.157.13:51820");
        expected.persistent_keepalive = Some(25);
        assert_eq!(file.private_key, Some(key(KEY_A)));
        assert_eq!(file.addresses, cidrs(&["10.2.0.2/32"]));
        assert_eq!(file.dns, ips(&["10.2.0.1"]));
        assert_eq!(file.peers, vec![expected]);
    }

    // IVPN: a preshared key (their quantum-resistant option), a host name endpoint, repeated
    // Address and DNS lines with IPv6.
    #[test]
    fn ivpn() {
        let text = format!(
            "[Interface]\n\
             PrivateKey = {KEY_A}\n\
             Address = 172.23.45.67/32\n\
             Address = fd00:4956:504e:ffff::ac17:2d43/96\n\
             DNS = 172.16.0.1\n\
             DNS = fd00:4956:504e:ffff::1\n\
             \n\
             [Peer]\n\
             PublicKey = {KEY_B}\n\
             PresharedKey = {PSK}\n\
             Endpoint = nl3.wg.ivpn.net:2049\n\
             AllowedIPs = 0.0.0.0/0, ::/0\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        let mut expected = peer(KEY_B, &["0.0.0.0/0", "::/0"], "nl3.wg.ivpn.net:2049");
        expected.preshared_key = Some(PresharedKey::Inline(key(PSK)));
        assert_eq!(
            file.addresses,
            cidrs(&["172.23.45.67/32", "fd00:4956:504e:ffff::ac17:2d43/96"])
        );
        assert_eq!(file.dns, ips(&["172.16.0.1", "fd00:4956:504e:ffff::1"]));
        assert_eq!(file.peers, vec![expected]);
    }

    // AirVPN's Config Generator: a UTF-8 BOM, CRLF, MTU, a preshared key, both DNS families on
    // one line, keepalive, and IPv6 allowed IPs.
    #[test]
    fn airvpn() {
        let text = format!(
            "\u{feff}[Interface]\r\n\
             Address = 10.128.10.20/32, fd7d:76ee:e68f:a993:1b2:3c4d:5e6f:7a8b/128\r\n\
             PrivateKey = {KEY_A}\r\n\
             MTU = 1320\r\n\
             DNS = 10.128.0.1, fd7d:76ee:e68f:a993::1\r\n\
             \r\n\
             [Peer]\r\n\
             PublicKey = {KEY_B}\r\n\
             PresharedKey = {PSK}\r\n\
             Endpoint = europe3.vpn.airdns.org:1637\r\n\
             AllowedIPs = 0.0.0.0/0, ::/0\r\n\
             PersistentKeepalive = 15\r\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        assert_eq!(file.mtu, Some(1320));
        assert_eq!(file.dns, ips(&["10.128.0.1", "fd7d:76ee:e68f:a993::1"]));
        assert_eq!(file.peers[0].persistent_keepalive, Some(15));
        assert_eq!(
            file.peers[0].preshared_key,
            Some(PresharedKey::Inline(key(PSK)))
        );
        assert_eq!(file.addresses.len(), 2);
    }

    // Windscribe: lower- and mixed-case keys, no spaces around `=`, a preshared key, two DNS
    // servers, and AllowedIPs split over two lines; a second peer as in multi-hop exports.
    #[test]
    fn windscribe() {
        let text = format!(
            "[interface]\n\
             privatekey={KEY_A}\n\
             address=100.73.2.44/32\n\
             dns=10.255.255.1,10.255.255.2\n\
             \n\
             [peer]\n\
             publickey={KEY_B}\n\
             allowedips=0.0.0.0/1\n\
             AllowedIps=128.0.0.0/1\n\
             endpoint=ca-015.whiskergalaxy.com:443\n\
             presharedkey={PSK}\n\
             \n\
             [Peer]\n\
             PublicKey={KEY_C}\n\
             AllowedIPs=10.255.255.0/24\n\
             Endpoint=[2001:db8::15]:65142\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        assert_eq!(file.dns, ips(&["10.255.255.1", "10.255.255.2"]));
        assert_eq!(
            file.peers[0].allowed_ips,
            cidrs(&["0.0.0.0/1", "128.0.0.0/1"])
        );
        assert_eq!(file.peers.len(), 2);
        assert_eq!(
            file.peers[1].endpoint,
            Some(Endpoint::parse("[2001:db8::15]:65142").unwrap())
        );
    }

    #[test]
    fn keys_without_meaning_warn_and_are_ignored() {
        let text = format!(
            "[Interface]\nPrivateKey = {KEY_A}\nAddress = 10.2.0.2/32\nListenPort = 51820\nTable = off\nFwMark = 0x1234\nSaveConfig = true\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        assert_eq!(
            file.warnings,
            vec![
                "line 4: ListenPort has no meaning inside a namespace; ignored",
                "line 5: Table has no meaning inside a namespace; ignored",
                "line 6: FwMark has no meaning inside a namespace; ignored",
                "line 7: SaveConfig has no meaning inside a namespace; ignored",
            ]
        );
    }

    /// At least fifteen broken files, each refused with its line and one line of text, and no
    /// secret echoed.
    #[test]
    fn bad_files_name_their_line() {
        let head = format!("[Interface]\nPrivateKey = {KEY_A}\n");
        let peer = format!("[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 0.0.0.0/0\n");
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (format!("{head}PostUp = iptables -A FORWARD\n"), "line 3: PostUp runs shell commands as root"),
            (format!("{head}preup = curl x | sh\n"), "line 3: preup runs shell commands as root"),
            (format!("{head}PreDown = true\n"), "line 3: PreDown runs shell commands"),
            (format!("{head}PostDown = true\n"), "line 3: PostDown runs shell commands"),
            (format!("{head}Address = 10.2.0.2/33\n"), "line 3: Address 10.2.0.2/33 is not an address"),
            (format!("{head}DNS = 10.2.0.1, vpn.lan\n"), "line 3: DNS vpn.lan is not an IP address"),
            (format!("{head}DNS = 10.2.0.1\nDNS = 224.0.0.251\n"), "line 4: DNS 224.0.0.251 is a multicast address, not a resolver"),
            (format!("{head}DNS = fe80::1\n"), "line 3: DNS fe80::1 is link-local"),
            (format!("{head}MTU = 90000\n"), "line 3: MTU 90000 is not a whole number between 576 and 65456"),
            (format!("{head}MTU = 1420\nMTU = 1280\n"), "line 4: MTU is given a second time; the first is on line 3"),
            ("[Interface]\nPrivateKey = not-a-key-but-secret\n".into(), "line 2: PrivateKey is not a base64 WireGuard key"),
            (format!("{head}Adress = 10.2.0.2/32\n"), "line 3: unknown key Adress in [Interface]"),
            (format!("PrivateKey = {KEY_A}\n"), "line 1: PrivateKey comes before any [Interface] or [Peer]"),
            (format!("{head}[Pear]\n"), "line 3: unknown section [Pear]"),
            (format!("{head}[Peer\n"), "line 3: [Peer is not a section header"),
            (format!("{head}Address 10.2.0.2/32\n"), "line 3: Address is not `Key = value`"),
            (format!("{head}[Peer]\nAllowedIPs = 0.0.0.0/0\n"), "line 3: [Peer] has no PublicKey"),
            (format!("{head}[Peer]\nPublicKey = {KEY_B}\n"), "line 3: [Peer] has no AllowedIPs"),
            (format!("{head}{peer}Endpoint = 1.2.3.4\n"), "line 6: Endpoint 1.2.3.4 needs a port"),
            (format!("{head}{peer}PersistentKeepalive = often\n"), "line 6: PersistentKeepalive often is not a whole number"),
            (format!("{head}{peer}PresharedKey = secret-psk\n"), "line 6: PresharedKey is not a base64 WireGuard key"),
            (format!("{head}{peer}{peer}"), "line 6: [Peer] TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0= appears in an earlier [Peer]"),
            (format!("{head}{peer}AllowedIPs = 10.0.0.0/8,,10.1.0.0/16\n"), "line 6: AllowedIPs has an empty item"),
            (format!("{head}{peer}Color = blue\n"), "line 6: unknown key Color in [Peer]"),
            (format!("{head}[Interface]\n"), "line 3: a second [Interface]; the first is on line 1"),
            (format!("{head}DNS =\n"), "line 3: DNS has no value"),
            (format!("{head}[Peer]\nPublicKey = {KEY_A}\nAllowedIPs = 0.0.0.0/0\n"), "line 3: [Peer] has this file's PrivateKey as its PublicKey"),
            (format!("{head}{peer}PresharedKey = {KEY_B}\n"), "line 3: [Peer] has a PresharedKey as its PublicKey"),
            (peer.clone(), "line 1: has no [Interface] section"),
            (format!("{head}[Peer]\nPublicKey = bad\u{1b}[31mkey\nAllowedIPs = 0.0.0.0/0\n"), "line 4: PublicKey \"bad\\u{1b}[31mkey\" is not"),
        ]
        .into_iter()
        .map(|(text, expected)| (text.into_bytes(), expected))
        .collect();
        cases.push((
            b"[Interface]\nAddress = 10.2.0.2/32\xff\n".to_vec(),
            "line 2: is not UTF-8 text",
        ));
        assert!(cases.len() >= 15);
        for (text, expected) in cases {
            let message = parse(&text).map(|_| ()).unwrap_err().to_string();
            let text = String::from_utf8_lossy(&text);
            assert!(
                message.starts_with(expected),
                "{text:?}\n  gave {message:?}\n  want {expected:?}"
            );
            assert!(!message.contains('\n'), "{message:?}");
            assert!(
                !message.contains("secret"),
                "a secret was echoed: {message:?}"
            );
        }
    }

    #[test]
    fn import_prints_options_without_the_private_key() {
        let text = format!(
            "[Interface]\nPrivateKey = {KEY_A}\nAddress = 10.2.0.2/32\nDNS = 10.2.0.1, 10.2.0.2\nMTU = 1380\n[Peer]\nPublicKey = {KEY_B}\nPresharedKey = {PSK}\nAllowedIPs = 0.0.0.0/0\nEndpoint = 1.2.3.4:51820\nPersistentKeepalive = 25\n"
        );
        let file = parse(text.as_bytes()).unwrap();
        let nix = to_nix(&file);
        assert!(!nix.contains(KEY_A) && !nix.contains(PSK), "{nix}");
        assert_eq!(
            nix,
            format!(
                "{{\n  # The private key stays out of the Nix store: put it in a file of its own,\n  # readable by root only (agenix, sops-nix), and name that file here.\n  privateKeyFile = \"/run/secrets/wireguard-private-key\";\n  dns_server = \"10.2.0.1\";\n  dnsServers = [ \"10.2.0.2\" ];\n  ips = [ \"10.2.0.2/32\" ];\n  mtu = 1380;\n  peers = [\n    {{\n      publicKey = \"{KEY_B}\";\n      presharedKeyFile = \"/run/secrets/wireguard-psk-0\";\n      allowedIPs = [ \"0.0.0.0/0\" ];\n      endpoint = \"1.2.3.4:51820\";\n      persistentKeepalive = 25;\n    }}\n  ];\n}}\n"
            )
        );
        let json = to_json(&file).to_string();
        assert!(!json.contains(KEY_A) && !json.contains(PSK), "{json}");
    }

    #[test]
    fn keys_with_control_characters_stay_one_line() {
        // Found by fuzz/fuzz_targets/wgquick.rs.
        let e = error("[Interface]\nPrivatein\rterf =\n");
        assert_eq!(e, "line 2: \"Privatein\\rterf\" has no value");
        let e = error("[Interface]\nMT\rU = 1\nMT\rU = 2\n");
        assert!(!e.contains('\r'), "{e}");
    }

    #[test]
    fn errors_do_not_quote_secrets() {
        assert_eq!(error("x"), "line 1: x is not `Key = value`");
        let e = error("[Interface]\nPrivateKey = hunter2\n");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
