//! The helper's input: the module's options as JSON, parsed and validated into [`Config`].
//!
//! Parsing walks a `serde_json::Value` by hand instead of deriving `Deserialize`, so that every
//! error names the exact field (`peers[1].allowedIPs[0]`) and unknown keys get a suggestion.
//! Nothing here touches the system but the reading of a `configFile` (a provider's wg-quick
//! file, see [`crate::wgquick`]), whose values fill in what the JSON leaves unset: a config that
//! passes [`Config::load`] is sound as far as files can tell; key files and host names are
//! looked at only by `up`.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

/// Top-level keys, in the order the README documents them.
pub const NAMESPACE_KEYS: &[&str] = &[
    "namespace_name",
    "dns_server",
    "extraFirewallRules",
    "ips",
    "privateKeyFile",
    "peers",
    "backend",
    "userspaceCommand",
    "strictDns",
    "publishPorts",
    "hostServices",
    "configFile",
    "mtu",
    "dnsServers",
    "portForwarding",
    "allowedUsers",
    "allowedGroups",
];

/// Keys of one entry of `peers`.
pub const PEER_KEYS: &[&str] = &[
    "publicKey",
    "presharedKey",
    "presharedKeyFile",
    "allowedIPs",
    "endpoint",
    "dynamicEndpointRefreshSeconds",
    "persistentKeepalive",
    "alternatives",
    "failoverAfterSeconds",
];

/// Keys of one entry of a peer's `alternatives`.
pub const ALTERNATIVE_KEYS: &[&str] = &["publicKey", "endpoint", "presharedKeyFile", "configFile"];

/// `failoverAfterSeconds` when not given, and its smallest value: below WireGuard's own retry
/// interval (5 s) a server could not even be asked twice.
pub const DEFAULT_FAILOVER_AFTER_SECONDS: u64 = 30;
pub const MIN_FAILOVER_AFTER_SECONDS: u64 = 5;

/// Keys of one entry of `publishPorts`.
pub const PUBLISH_KEYS: &[&str] = &[
    "protocol",
    "hostAddress",
    "hostPort",
    "namespacePort",
    "idleTimeoutSeconds",
];

/// Keys of one entry of `hostServices`.
pub const HOST_SERVICE_KEYS: &[&str] = &[
    "protocol",
    "namespacePort",
    "hostAddress",
    "hostPort",
    "idleTimeoutSeconds",
];

/// Long enough for a web UI left open between clicks, short enough that idle connections
/// cannot hold an entry's sessions for long.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u32 = 300;
/// The longest `idleTimeoutSeconds`: a day. Nothing waits forever.
pub const MAX_IDLE_TIMEOUT_SECONDS: u64 = 86_400;

/// Keys of `portForwarding`.
pub const FORWARDING_KEYS: &[&str] = &[
    "gateway",
    "protocols",
    "lifetimeSeconds",
    "onPortChange",
    "onPortChangeUser",
];

/// ProtonVPN asks for 60 seconds and a renewal well within them.
pub const DEFAULT_FORWARDING_LIFETIME: u32 = 60;
/// The user `onPortChange` runs as unless another is named: it talks to a torrent client's
/// API and needs none of root's powers.
pub const DEFAULT_FORWARDING_USER: &str = "nobody";

pub const DEFAULT_NAMESPACE: &str = "vpn";
/// glibc's MAXNS: resolv.conf lines after the third `nameserver` are ignored.
pub const MAX_NAMESERVERS: usize = 3;
pub const DEFAULT_USERSPACE_COMMAND: &str = "wireguard-go";
/// Linux interface names hold at most 15 bytes, and the interface is named after the namespace.
pub const MAX_NAME_LEN: usize = 15;

/// A validation failure: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

type Result<T> = std::result::Result<T, ConfigError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Kernel WireGuard when the kernel offers it, the userspace daemon otherwise.
    Auto,
    Kernel,
    Userspace,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kernel => "kernel",
            BackendChoice::Userspace => "userspace",
        }
    }
}

/// An address with a prefix length, as in `10.0.0.2/24`. Host bits may be set (the seed's own
/// example has `10.192.124.1/24`); [`Cidr::network`] clears them where the kernel wants that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    /// True for `0.0.0.0/0` and `::/0`, which become default routes.
    pub fn is_default(&self) -> bool {
        self.prefix == 0
    }
}

impl FromStr for Cidr {
    type Err = ();

    /// Accepts `addr/prefix` and a bare address (a full-length prefix), as `ip` and `wg` do.
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        let max = Cidr::max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().map_err(|_| ())?
            }
            Some(_) => return Err(()),
        };
        if prefix > max {
            return Err(());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A peer's endpoint: an IP address or a host name (resolved by `up`, in the host namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: EndpointHost,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointHost {
    Ip(IpAddr),
    Name(String),
}

impl Endpoint {
    pub fn parse(s: &str) -> std::result::Result<Endpoint, &'static str> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or("an IPv6 endpoint is written [address]:port")?;
            let ip: Ipv6Addr = h
                .parse()
                .map_err(|_| "is not an IPv6 address in brackets")?;
            (EndpointHost::Ip(IpAddr::V6(ip)), p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or("needs a port: write host:port or [IPv6]:port")?;
            if h.contains(':') {
                return Err("an IPv6 endpoint is written [address]:port");
            }
            let host = match h.parse::<Ipv4Addr>() {
                Ok(ip) => EndpointHost::Ip(IpAddr::V4(ip)),
                Err(_) if is_host_name(h) => EndpointHost::Name(h.to_string()),
                Err(_) => return Err("is not an IP address or a host name"),
            };
            (host, p)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err("needs a port between 1 and 65535"),
        };
        Ok(Endpoint { host, port })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            EndpointHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            EndpointHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            EndpointHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // An all-numeric name like 10.0.0.300 is a typo for an address, not a host.
        && !s.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// A WireGuard key as 32 raw bytes. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Decodes standard base64 (with padding) of exactly 32 bytes, as `wg genkey` writes it.
    pub fn from_base64(s: &str) -> Option<Key> {
        let s = s.trim();
        if s.len() != 44 || !s.ends_with('=') || s.ends_with("==") {
            return None;
        }
        let mut out = [0u8; 32];
        let mut acc: u32 = 0;
        let mut bits = 0;
        let mut n = 0;
        for &c in &s.as_bytes()[..43] {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                if n < 32 {
                    out[n] = (acc >> bits) as u8;
                }
                n += 1;
                acc &= (1 << bits) - 1;
            }
        }
        // 43 symbols carry 258 bits: 256 of key and 2 that must be zero.
        (n == 32 && acc == 0).then_some(Key(out))
    }

    pub fn to_base64(&self) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(44);
        for chunk in self.0.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        while !out.len().is_multiple_of(4) {
            out.push('=');
        }
        out
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresharedKey {
    /// Given inline in the config (and therefore in the Nix store when set through the module).
    Inline(Key),
    /// Read by `up` at run time.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    /// The key as written, for display and for matching against the device.
    pub public_key_text: String,
    pub preshared_key: Option<PresharedKey>,
    pub allowed_ips: Vec<Cidr>,
    pub endpoint: Option<Endpoint>,
    pub dynamic_endpoint_refresh_seconds: u64,
    pub persistent_keepalive: Option<u16>,
    /// Servers that stand in for this peer, in order, with its allowed IPs and keepalive.
    pub alternatives: Vec<Server>,
    /// How long the server in use may leave what the tunnel sends unanswered before the next
    /// one takes its place.
    pub failover_after_seconds: u64,
}

/// A server that can stand in for a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub public_key: Key,
    pub public_key_text: String,
    pub endpoint: Endpoint,
    pub preshared_key: Option<PresharedKey>,
}

impl Peer {
    /// How many servers can carry this peer: itself and its alternatives.
    pub fn server_count(&self) -> usize {
        1 + self.alternatives.len()
    }

    /// Server `index`: 0 is the peer itself, `n` is `alternatives[n - 1]`. Its key, the key as
    /// written, and its endpoint.
    pub fn server(&self, index: usize) -> (&Key, &str, Option<&Endpoint>) {
        match index.checked_sub(1).and_then(|i| self.alternatives.get(i)) {
            Some(s) => (&s.public_key, &s.public_key_text, Some(&s.endpoint)),
            None => (
                &self.public_key,
                &self.public_key_text,
                self.endpoint.as_ref(),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A port inside the namespace made reachable on a host address, by a relay process: no
/// forwarding, no NAT and no route between the namespace and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublishPort {
    pub protocol: Protocol,
    pub host_address: IpAddr,
    pub host_port: u16,
    pub namespace_port: u16,
    /// A connection (or UDP client) with nothing sent either way for this long is closed.
    pub idle_timeout_seconds: u32,
}

/// A service in the host namespace made reachable from inside at 127.0.0.1:namespacePort, by
/// a relay process: exactly this destination, and no route, forwarding or NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostService {
    pub protocol: Protocol,
    pub namespace_port: u16,
    pub host_address: IpAddr,
    pub host_port: u16,
    pub idle_timeout_seconds: u32,
}

/// Where this end's private key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivateKeySource {
    /// `privateKeyFile`, read by `up` at run time.
    File(PathBuf),
    /// The `PrivateKey` of `configFile`, already read (as root, from a file only root can change).
    ConfigFile(Key),
}

/// A port the VPN provider forwards to the namespace, asked for over NAT-PMP (RFC 6886) through
/// the tunnel and kept open in the namespace's firewall while it is mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwarding {
    pub gateway: Ipv4Addr,
    /// Mapped in this order; the port of the first is the one handed to `on_port_change`.
    pub protocols: Vec<Protocol>,
    pub lifetime_seconds: u32,
    /// A program (no shell) run inside the namespace with the new port as its argument.
    pub on_port_change: Option<PathBuf>,
    pub on_port_change_user: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub namespace: String,
    /// The first DNS server: `dns_server`, or the first `DNS` of `configFile`.
    pub dns_server: IpAddr,
    /// Every DNS server, `dns_server` first; resolv.conf lists them and the leak guard lets DNS
    /// go to exactly these.
    pub dns_servers: Vec<IpAddr>,
    pub extra_firewall_rules: String,
    pub ips: Vec<Cidr>,
    pub private_key: PrivateKeySource,
    pub peers: Vec<Peer>,
    pub backend: BackendChoice,
    /// Program and arguments; the helper appends `-f <interface>`.
    pub userspace_command: Vec<String>,
    pub strict_dns: bool,
    pub publish_ports: Vec<PublishPort>,
    pub host_services: Vec<HostService>,
    /// `configFile` as given, when there is one.
    pub config_file: Option<PathBuf>,
    /// The WireGuard interface's MTU; `None` leaves the backend's choice.
    pub mtu: Option<u16>,
    /// What the user should hear about the config (keys of `configFile` that were ignored).
    pub warnings: Vec<String>,
    pub port_forwarding: Option<PortForwarding>,
    /// Users who may run commands in the namespace without root, through the exec service.
    pub allowed_users: Vec<String>,
    /// Groups whose members may, like [`Config::allowed_users`].
    pub allowed_groups: Vec<String>,
}

/// How [`Config::parse_with`] gets the bytes of `configFile`: the problem alone on failure.
pub type ReadConfigFile<'a> =
    &'a dyn Fn(&Path) -> std::result::Result<crate::system::files::SecretFile, String>;

impl Config {
    /// Reads and validates a config file. A file that cannot be read is reported against the
    /// file's path, like malformed JSON.
    pub fn load(path: &Path) -> Result<Config> {
        let bytes = crate::system::files::read_regular(path, crate::system::files::CONFIG_LIMIT)
            .map_err(|e| ConfigError::new(path.display().to_string(), e.problem))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::new(path.display().to_string(), "is not UTF-8 text"))?;
        Config::parse_with(&text, &read_config_file).map_err(|e| {
            if e.field.is_empty() {
                ConfigError::new(path.display().to_string(), e.problem)
            } else {
                e
            }
        })
    }

    /// Parses and validates the JSON text. Errors with an empty field are about the document
    /// as a whole (malformed JSON). A `configFile` is refused here: only [`Config::load`] and
    /// [`Config::parse_with`] read files.
    pub fn parse(text: &str) -> Result<Config> {
        Config::parse_with(text, &|_| {
            Err("is read only when a config is loaded from a file".into())
        })
    }

    /// [`Config::parse`], with `read` for the bytes of `configFile`. The file's values fill in
    /// what the JSON leaves unset (null, or an empty list): the module's options override the
    /// file.
    pub fn parse_with(text: &str, read: ReadConfigFile) -> Result<Config> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::new("", format!("not valid JSON: {e}")))?;
        let root = Object::new("config", &value)?;
        root.reject_unknown(NAMESPACE_KEYS)?;

        let namespace = match root.opt_str("namespace_name")? {
            Some(name) => name.to_string(),
            None => DEFAULT_NAMESPACE.to_string(),
        };
        check_name(&namespace).map_err(|p| ConfigError::new("namespace_name", p))?;

        let config_file = match root.opt_str("configFile")? {
            Some(text) => Some(absolute_path("configFile", text)?),
            None => None,
        };
        let mut warnings = Vec::new();
        let file = match &config_file {
            Some(path) => read_wg_quick("configFile", path, read, &mut warnings)?,
            None => crate::wgquick::WgQuick::default(),
        };
        let from_file = |key: &str, problem: &str| match &config_file {
            Some(path) => ConfigError::new(
                key,
                format!("is required, and {} {problem}", path.display()),
            ),
            None => ConfigError::new(key, "is required"),
        };

        let dns_server = match root.opt_str("dns_server")? {
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                ConfigError::new(
                    "dns_server",
                    format!("{} is not an IP address", quoted(root.get("dns_server"))),
                )
            })?),
            None => None,
        };
        let more_dns = root
            .opt_list("dnsServers")?
            .iter()
            .map(|item| item.ip())
            .collect::<Result<Vec<_>>>()?;
        for (field, ip) in dns_server
            .iter()
            .map(|ip| ("dns_server".to_string(), ip))
            .chain(
                more_dns
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| (format!("dnsServers[{i}]"), ip)),
            )
        {
            check_dns_server(&field, *ip)?;
        }
        let mut dns_servers: Vec<IpAddr> = Vec::new();
        let dns_from_file = dns_server.is_none() && more_dns.is_empty();
        if dns_from_file {
            // Checked by the parser, which names the line.
            dns_servers.extend(&file.dns);
        } else {
            for ip in dns_server.iter().chain(&more_dns) {
                if !dns_servers.contains(ip) {
                    dns_servers.push(*ip);
                }
            }
        }
        let dns_server = *dns_servers
            .first()
            .ok_or_else(|| from_file("dns_server", "has no DNS line"))?;
        if dns_servers.len() > MAX_NAMESERVERS {
            let unused: Vec<String> = dns_servers[MAX_NAMESERVERS..]
                .iter()
                .map(ToString::to_string)
                .collect();
            // Named like every other message: the field, or the file the servers came from.
            let source = match &config_file {
                Some(path) if dns_from_file => path.display().to_string(),
                _ => "dnsServers".to_string(),
            };
            warnings.push(format!(
                "{source}: {} DNS servers, but the C library asks only the first {MAX_NAMESERVERS} in resolv.conf; {} will not be asked",
                dns_servers.len(),
                unused.join(", ")
            ));
        }

        let extra_firewall_rules = root
            .opt_str("extraFirewallRules")?
            .unwrap_or_default()
            .to_string();

        let mut ips = root
            .opt_list("ips")?
            .iter()
            .map(|item| item.cidr())
            .collect::<Result<Vec<_>>>()?;
        if ips.is_empty() {
            ips = file.addresses.clone();
        }
        for (i, ip) in ips.iter().enumerate() {
            if let Some(first) = ips[..i].iter().position(|other| other.addr == ip.addr) {
                return Err(ConfigError::new(
                    format!("ips[{i}]"),
                    format!("{} is already in ips[{first}]", ip.addr),
                ));
            }
        }

        let private_key = match (root.opt_str("privateKeyFile")?, &file.private_key) {
            (Some(text), _) => PrivateKeySource::File(absolute_path("privateKeyFile", text)?),
            (None, Some(key)) => PrivateKeySource::ConfigFile(key.clone()),
            (None, None) => return Err(from_file("privateKeyFile", "has no PrivateKey line")),
        };

        let mut peers = Vec::new();
        let mut this_end = ThisEnd {
            read,
            private_key: &private_key,
            ips: &ips,
            warnings: &mut warnings,
        };
        for item in root.opt_list("peers")? {
            peers.push(parse_peer(&item, &mut this_end)?);
        }
        if peers.is_empty() {
            peers = file.peers.clone();
        }
        let mtu = match root.opt_int("mtu", 0, u64::from(u16::MAX))? {
            Some(v)
                if (u64::from(crate::wgquick::MTU_MIN)..=u64::from(crate::wgquick::MTU_MAX))
                    .contains(&v) =>
            {
                Some(v as u16)
            }
            Some(v) => {
                return Err(ConfigError::new(
                    "mtu",
                    format!(
                        "{v} is not between {} and {}",
                        crate::wgquick::MTU_MIN,
                        crate::wgquick::MTU_MAX
                    ),
                ));
            }
            None => file.mtu,
        };
        // Every key ends up on the one device, the alternatives' included.
        let mut seen = HashSet::new();
        for (i, peer) in peers.iter().enumerate() {
            if !seen.insert(peer.public_key.0) {
                return Err(ConfigError::new(
                    format!("peers[{i}].publicKey"),
                    "the same key appears in an earlier peer or alternative",
                ));
            }
            for (j, alternative) in peer.alternatives.iter().enumerate() {
                if alternative.public_key == peer.public_key {
                    return Err(ConfigError::new(
                        format!("peers[{i}].alternatives[{j}].publicKey"),
                        "is the peer's own publicKey; an alternative is another server",
                    ));
                }
                if !seen.insert(alternative.public_key.0) {
                    return Err(ConfigError::new(
                        format!("peers[{i}].alternatives[{j}].publicKey"),
                        "the same key appears in an earlier peer or alternative",
                    ));
                }
            }
        }

        let backend = match root.opt_str("backend")? {
            None | Some("auto") => BackendChoice::Auto,
            Some("kernel") => BackendChoice::Kernel,
            Some("userspace") => BackendChoice::Userspace,
            Some(other) => {
                return Err(ConfigError::new(
                    "backend",
                    format!("{other:?} is not one of \"auto\", \"kernel\", \"userspace\""),
                ));
            }
        };

        let userspace_command = match root.opt_str("userspaceCommand")? {
            None => vec![DEFAULT_USERSPACE_COMMAND.to_string()],
            Some(cmd) => {
                let words: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
                if words.is_empty() {
                    return Err(ConfigError::new(
                        "userspaceCommand",
                        "is empty; leave it null for wireguard-go from PATH",
                    ));
                }
                words
            }
        };

        let strict_dns = root.opt_bool("strictDns")?.unwrap_or(true);

        let publish_ports = root
            .opt_list("publishPorts")?
            .iter()
            .map(parse_publish_port)
            .collect::<Result<Vec<_>>>()?;
        let mut seen = HashSet::new();
        for (i, p) in publish_ports.iter().enumerate() {
            if !seen.insert((p.protocol, p.host_address, p.host_port)) {
                return Err(ConfigError::new(
                    format!("publishPorts[{i}]"),
                    format!(
                        "{} {}:{} is already published by an earlier entry",
                        p.protocol.as_str(),
                        p.host_address,
                        p.host_port
                    ),
                ));
            }
        }

        let host_services = root
            .opt_list("hostServices")?
            .iter()
            .map(parse_host_service)
            .collect::<Result<Vec<_>>>()?;
        let mut seen = HashSet::new();
        for (i, s) in host_services.iter().enumerate() {
            let field = format!("hostServices[{i}].namespacePort");
            if !seen.insert((s.protocol, s.namespace_port)) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} port {} inside is already taken by an earlier entry",
                        s.protocol.as_str(),
                        s.namespace_port
                    ),
                ));
            }
            // The published port's relay would connect to this listener and back out again.
            if let Some(j) = publish_ports
                .iter()
                .position(|p| (p.protocol, p.namespace_port) == (s.protocol, s.namespace_port))
            {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} port {} inside is also the target of publishPorts[{j}]; a port inside is either a service's or a host service's",
                        s.protocol.as_str(),
                        s.namespace_port
                    ),
                ));
            }
        }
        let port_forwarding = match root.get("portForwarding") {
            None => None,
            Some(value) => Some(parse_port_forwarding(&Item {
                path: "portForwarding".into(),
                value,
            })?),
        };

        let allowed_users = account_names(&root.opt_list("allowedUsers")?)?;
        let allowed_groups = account_names(&root.opt_list("allowedGroups")?)?;

        let config = Config {
            namespace,
            dns_server,
            dns_servers,
            extra_firewall_rules,
            ips,
            private_key,
            peers,
            backend,
            userspace_command,
            strict_dns,
            publish_ports,
            host_services,
            config_file,
            mtu,
            warnings,
            port_forwarding,
            allowed_users,
            allowed_groups,
        };
        if let Some(ipv6) = config.dns_servers.iter().find(|ip| ip.is_ipv6())
            && !config.ipv6_enabled()
        {
            let field = if *ipv6 == config.dns_server {
                "dns_server"
            } else {
                "dnsServers"
            };
            return Err(ConfigError::new(
                field,
                format!("{ipv6} is IPv6, but IPv6 is dropped because ips has no IPv6 address"),
            ));
        }
        Ok(config)
    }

    /// IPv6 leaves the namespace only when the interface has an IPv6 address of its own.
    pub fn ipv6_enabled(&self) -> bool {
        self.ips.iter().any(Cidr::is_ipv6)
    }

    /// The WireGuard interface carries the namespace's name, as in the seed.
    pub fn interface(&self) -> &str {
        &self.namespace
    }
}

/// Reads `configFile` as root reads key files: only when no other user can change it, and at
/// most [`crate::wgquick::MAX_FILE_BYTES`]. A world-readable file is read, with a warning: it
/// holds the private key.
/// Reads and parses a provider's wg-quick file named by `field`, collecting its warnings.
fn read_wg_quick(
    field: &str,
    path: &Path,
    read: ReadConfigFile,
    warnings: &mut Vec<String>,
) -> Result<crate::wgquick::WgQuick> {
    let read = read(path)
        .map_err(|problem| ConfigError::new(format!("{field}: {}", path.display()), problem))?;
    warnings.extend(read.warning.map(|w| format!("{field}: {w}")));
    let file = crate::wgquick::parse(&read.bytes)
        .map_err(|e| ConfigError::new(format!("{}:{}", path.display(), e.line), e.problem))?;
    warnings.extend(
        file.warnings
            .iter()
            .map(|w| format!("{}:{}", path.display(), w.trim_start_matches("line "))),
    );
    Ok(file)
}

fn read_config_file(path: &Path) -> std::result::Result<crate::system::files::SecretFile, String> {
    crate::system::files::read_secret(path, "wg-quick file", crate::wgquick::MAX_FILE_BYTES)
        .map_err(|e| e.problem)
}

/// A resolver address the namespace can actually send queries to and get answers from.
fn check_dns_server(field: &str, ip: IpAddr) -> Result<()> {
    match resolver_problem(ip) {
        Some(problem) => Err(ConfigError::new(
            field,
            format!("{ip} {problem}, not a resolver"),
        )),
        None => Ok(()),
    }
}

/// Why `ip` cannot be a DNS server, if it cannot (also used for a wg-quick file's `DNS`).
pub fn resolver_problem(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("is the unspecified address"),
        _ if ip.is_multicast() => Some("is a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        // A link-local address means something only together with an interface (a scope),
        // which an address here cannot carry.
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            Some("is link-local and would need a scope (an interface); use a routable address")
        }
        _ => None,
    }
}

/// Checks a namespace name, which is also the interface name, a path component and part of a
/// systemd unit name. The module asserts the same rule.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} is {} bytes; the interface is named after the namespace and Linux allows at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(format!(
            "{name:?} may only hold letters, digits, '_', '.' and '-', and must start with a letter, digit or '_'"
        ));
    }
    Ok(())
}

/// User or group names, as useradd(8) and NixOS accept them. Root is refused: it needs no
/// permission, and granting it through the exec service would run things as root.
fn account_names(items: &[Item<'_>]) -> Result<Vec<String>> {
    items
        .iter()
        .map(|item| {
            let Value::String(name) = item.value else {
                return Err(ConfigError::new(
                    &item.path,
                    format!("expected a user or group name, got {}", kind_of(item.value)),
                ));
            };
            let body = name.strip_suffix('$').unwrap_or(name);
            let well_formed = (1..=32).contains(&name.len())
                && body
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !well_formed {
                return Err(ConfigError::new(
                    &item.path,
                    format!(
                        "{name:?} is not a user or group name (a letter or '_', then letters, digits, '_', '.', '-'; at most 32 bytes)"
                    ),
                ));
            }
            if name == "root" {
                return Err(ConfigError::new(
                    &item.path,
                    "root runs `wg-namespace exec` directly and is never granted through the exec service",
                ));
            }
            Ok(name.clone())
        })
        .collect()
}

fn absolute_path(field: &str, text: &str) -> Result<PathBuf> {
    let path = PathBuf::from(text);
    if text.is_empty() || !path.is_absolute() {
        return Err(ConfigError::new(
            field,
            format!("{text:?} is not an absolute path"),
        ));
    }
    // Paths end up in messages, which must stay one line (found by the fuzz target).
    if text.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            format!("{text:?} holds a control character"),
        ));
    }
    Ok(path)
}

/// What an alternative given as a provider's file must agree with: failover changes the server,
/// never this end's key or addresses.
struct ThisEnd<'a> {
    read: ReadConfigFile<'a>,
    private_key: &'a PrivateKeySource,
    ips: &'a [Cidr],
    warnings: &'a mut Vec<String>,
}

fn parse_peer(item: &Item, this_end: &mut ThisEnd) -> Result<Peer> {
    let peer = item.object()?;
    peer.reject_unknown(PEER_KEYS)?;

    let public_key_text = peer.req_str("publicKey")?.trim().to_string();
    let public_key = Key::from_base64(&public_key_text).ok_or_else(|| {
        peer.error(
            "publicKey",
            format!("{public_key_text:?} is not a base64 WireGuard key (44 characters, as `wg pubkey` prints)"),
        )
    })?;

    let inline_psk = match peer.opt_str("presharedKey")? {
        // Never echo a secret, even a malformed one.
        Some(text) => Some(Key::from_base64(text).ok_or_else(|| {
            peer.error(
                "presharedKey",
                "is not a base64 WireGuard key (44 characters, as `wg genpsk` prints)",
            )
        })?),
        None => None,
    };
    let psk_file = match peer.opt_str("presharedKeyFile")? {
        Some(text) => Some(absolute_path(&peer.field("presharedKeyFile"), text)?),
        None => None,
    };
    let preshared_key = match (inline_psk, psk_file) {
        (Some(_), Some(_)) => {
            return Err(peer.error(
                "presharedKeyFile",
                "conflicts with presharedKey: set only one of them",
            ));
        }
        (Some(k), None) => Some(PresharedKey::Inline(k)),
        (None, Some(f)) => Some(PresharedKey::File(f)),
        (None, None) => None,
    };

    let allowed_ips = peer
        .req_list("allowedIPs")?
        .iter()
        .map(|i| i.cidr())
        .collect::<Result<Vec<_>>>()?;
    if allowed_ips.is_empty() {
        return Err(peer.error(
            "allowedIPs",
            "is empty, so no traffic would ever go to this peer; use [\"0.0.0.0/0\"] to send everything",
        ));
    }

    let endpoint = match peer.opt_str("endpoint")? {
        Some(text) => Some(
            Endpoint::parse(text).map_err(|p| peer.error("endpoint", format!("{text:?} {p}")))?,
        ),
        None => None,
    };

    let dynamic_endpoint_refresh_seconds = peer
        .opt_int("dynamicEndpointRefreshSeconds", 0, u64::from(u32::MAX))?
        .unwrap_or(0);
    let persistent_keepalive = peer
        .opt_int("persistentKeepalive", 0, 65535)?
        .map(|v| v as u16)
        .filter(|&v| v != 0);

    let alternatives = match peer.get("alternatives") {
        None => Vec::new(),
        Some(_) => {
            let items = peer.opt_list("alternatives")?;
            if items.is_empty() {
                return Err(peer.error(
                    "alternatives",
                    "is empty; list at least one server, or leave it out (null)",
                ));
            }
            if endpoint.is_none() {
                return Err(peer.error(
                    "endpoint",
                    "is required when alternatives are given: failover switches between servers to reach",
                ));
            }
            items
                .iter()
                .map(|item| parse_alternative(item, this_end))
                .collect::<Result<Vec<_>>>()?
        }
    };
    let failover_after_seconds = peer
        .opt_int(
            "failoverAfterSeconds",
            MIN_FAILOVER_AFTER_SECONDS,
            u64::from(u32::MAX),
        )?
        .unwrap_or(DEFAULT_FAILOVER_AFTER_SECONDS);

    Ok(Peer {
        public_key,
        public_key_text,
        preshared_key,
        allowed_ips,
        endpoint,
        dynamic_endpoint_refresh_seconds,
        persistent_keepalive,
        alternatives,
        failover_after_seconds,
    })
}

fn parse_alternative(item: &Item, this_end: &mut ThisEnd) -> Result<Server> {
    let server = item.object()?;
    server.reject_unknown(ALTERNATIVE_KEYS)?;
    if let Some(text) = server.opt_str("configFile")? {
        for key in ["publicKey", "endpoint", "presharedKeyFile"] {
            if server.get(key).is_some() {
                return Err(server.error(
                    key,
                    "conflicts with configFile: give a server either as a provider's file or by publicKey and endpoint",
                ));
            }
        }
        let field = server.field("configFile");
        let path = absolute_path(&field, text)?;
        let file = read_wg_quick(&field, &path, this_end.read, this_end.warnings)?;
        return server_from_file(&field, &path, file, this_end);
    }
    let public_key_text = server.req_str("publicKey")?.trim().to_string();
    let public_key = Key::from_base64(&public_key_text).ok_or_else(|| {
        server.error(
            "publicKey",
            format!("{public_key_text:?} is not a base64 WireGuard key (44 characters, as `wg pubkey` prints)"),
        )
    })?;
    let text = server.req_str("endpoint")?;
    let endpoint =
        Endpoint::parse(text).map_err(|p| server.error("endpoint", format!("{text:?} {p}")))?;
    let preshared_key = match server.opt_str("presharedKeyFile")? {
        Some(text) => Some(PresharedKey::File(absolute_path(
            &server.field("presharedKeyFile"),
            text,
        )?)),
        None => None,
    };
    Ok(Server {
        public_key,
        public_key_text,
        endpoint,
        preshared_key,
    })
}

/// The one server of a provider's file. Its [Interface] must describe this end as the
/// namespace has it, where it says anything.
fn server_from_file(
    field: &str,
    path: &Path,
    file: crate::wgquick::WgQuick,
    this_end: &mut ThisEnd,
) -> Result<Server> {
    let fail = |problem: String| ConfigError::new(format!("{field}: {}", path.display()), problem);
    let [peer] = <[Peer; 1]>::try_from(file.peers).map_err(|peers| {
        fail(format!(
            "has {} [Peer] sections; an alternative is one server",
            peers.len()
        ))
    })?;
    let endpoint = peer
        .endpoint
        .ok_or_else(|| fail("its [Peer] has no Endpoint".into()))?;
    match (&file.private_key, this_end.private_key) {
        (Some(theirs), PrivateKeySource::ConfigFile(ours)) if theirs != ours => {
            return Err(fail(
                "has another PrivateKey than the namespace; failover changes the server, not this end's key".into(),
            ));
        }
        (Some(_), PrivateKeySource::File(key_file)) => this_end.warnings.push(format!(
            "{field}: {}: its PrivateKey is not used; the namespace keeps the key of {}",
            path.display(),
            key_file.display()
        )),
        _ => {}
    }
    let same_addresses = file.addresses.len() == this_end.ips.len()
        && file.addresses.iter().all(|a| this_end.ips.contains(a));
    if !file.addresses.is_empty() && !same_addresses {
        return Err(fail(
            "has another Address than the namespace's ips; failover changes the server, not this end's addresses".into(),
        ));
    }
    Ok(Server {
        public_key: peer.public_key,
        public_key_text: peer.public_key_text,
        endpoint,
        preshared_key: peer.preshared_key,
    })
}

fn parse_publish_port(item: &Item) -> Result<PublishPort> {
    let entry = item.object()?;
    entry.reject_unknown(PUBLISH_KEYS)?;
    let protocol = parse_protocol(&entry)?;
    let host_address = match entry.opt_str("hostAddress")? {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(text) => text
            .parse()
            .map_err(|_| entry.error("hostAddress", format!("{text:?} is not an IP address")))?,
    };
    let host_port = entry.req_int("hostPort", 1, 65535)? as u16;
    let namespace_port = entry
        .opt_int("namespacePort", 1, 65535)?
        .map_or(host_port, |p| p as u16);
    Ok(PublishPort {
        protocol,
        host_address,
        host_port,
        namespace_port,
        idle_timeout_seconds: idle_timeout(&entry)?,
    })
}

fn parse_host_service(item: &Item) -> Result<HostService> {
    let entry = item.object()?;
    entry.reject_unknown(HOST_SERVICE_KEYS)?;
    let protocol = parse_protocol(&entry)?;
    let host_address: IpAddr = match entry.opt_str("hostAddress")? {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(text) => text
            .parse()
            .map_err(|_| entry.error("hostAddress", format!("{text:?} is not an IP address")))?,
    };
    if host_address.is_unspecified() || host_address.is_multicast() {
        return Err(entry.error(
            "hostAddress",
            format!("{host_address} is not the address of one host; give the address the service listens on"),
        ));
    }
    let host_port = entry.req_int("hostPort", 1, 65535)? as u16;
    let namespace_port = entry
        .opt_int("namespacePort", 1, 65535)?
        .map_or(host_port, |p| p as u16);
    Ok(HostService {
        protocol,
        namespace_port,
        host_address,
        host_port,
        idle_timeout_seconds: idle_timeout(&entry)?,
    })
}

fn parse_protocol(entry: &Object) -> Result<Protocol> {
    match entry.opt_str("protocol")? {
        None | Some("tcp") => Ok(Protocol::Tcp),
        Some("udp") => Ok(Protocol::Udp),
        Some(other) => Err(entry.error("protocol", format!("{other:?} is not \"tcp\" or \"udp\""))),
    }
}

fn idle_timeout(entry: &Object) -> Result<u32> {
    Ok(entry
        .opt_int("idleTimeoutSeconds", 1, MAX_IDLE_TIMEOUT_SECONDS)?
        .map_or(DEFAULT_IDLE_TIMEOUT_SECONDS, |s| s as u32))
}

fn parse_port_forwarding(item: &Item) -> Result<PortForwarding> {
    let entry = item.object()?;
    entry.reject_unknown(FORWARDING_KEYS)?;
    let text = entry.req_str("gateway")?;
    let gateway = text.parse::<Ipv4Addr>().map_err(|_| {
        entry.error(
            "gateway",
            format!("{text:?} is not an IPv4 address (NAT-PMP speaks IPv4 only)"),
        )
    })?;
    let mut protocols = Vec::new();
    match entry.get("protocols") {
        None => protocols = vec![Protocol::Udp, Protocol::Tcp],
        Some(_) => {
            for item in entry.opt_list("protocols")? {
                let protocol = match item.value.as_str() {
                    Some("udp") => Protocol::Udp,
                    Some("tcp") => Protocol::Tcp,
                    _ => {
                        return Err(ConfigError::new(
                            &item.path,
                            format!("{} is not \"udp\" or \"tcp\"", item.value),
                        ));
                    }
                };
                if protocols.contains(&protocol) {
                    return Err(ConfigError::new(
                        &item.path,
                        format!("{:?} is listed twice", protocol.as_str()),
                    ));
                }
                protocols.push(protocol);
            }
            if protocols.is_empty() {
                return Err(entry.error(
                    "protocols",
                    "is empty; list \"udp\", \"tcp\" or both (ProtonVPN wants both)",
                ));
            }
        }
    }
    // Renewals come at half the lifetime: below 4 s they would come faster than a lost
    // request can be retried.
    let lifetime_seconds = entry
        .opt_int("lifetimeSeconds", 4, u64::from(u32::MAX))?
        .map_or(DEFAULT_FORWARDING_LIFETIME, |v| v as u32);
    let on_port_change = match entry.opt_str("onPortChange")? {
        Some(text) => Some(absolute_path(&entry.field("onPortChange"), text)?),
        None => None,
    };
    let on_port_change_user = match entry.opt_str("onPortChangeUser")? {
        Some("") => return Err(entry.error("onPortChangeUser", "is empty")),
        Some(user) => user.to_string(),
        None => DEFAULT_FORWARDING_USER.to_string(),
    };
    Ok(PortForwarding {
        gateway,
        protocols,
        lifetime_seconds,
        on_port_change,
        on_port_change_user,
    })
}

fn quoted(value: Option<&Value>) -> String {
    value.map(Value::to_string).unwrap_or_default()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A JSON object together with its field path, so every accessor can report precisely.
struct Object<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

/// A list element with its path.
struct Item<'a> {
    path: String,
    value: &'a Value,
}

impl<'a> Object<'a> {
    fn new(path: &str, value: &'a Value) -> Result<Object<'a>> {
        match value {
            Value::Object(map) => Ok(Object {
                path: path.to_string(),
                map,
            }),
            other => Err(ConfigError::new(
                path,
                format!("expected an object, got {}", kind_of(other)),
            )),
        }
    }

    /// The path of a key: bare at the top level, `peers[0].key` below it.
    fn field(&self, key: &str) -> String {
        if self.path == "config" {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn error(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.field(key), problem)
    }

    fn reject_unknown(&self, known: &[&str]) -> Result<()> {
        for key in self.map.keys() {
            if !known.contains(&key.as_str()) {
                let hint = nearest(key, known)
                    .map(|k| format!(" (did you mean {k:?}?)"))
                    .unwrap_or_default();
                // The key is the user's text: quoted when it holds a line break or another
                // control character, so that the error stays one line.
                let shown = if key.chars().any(char::is_control) {
                    format!("{key:?}")
                } else {
                    key.clone()
                };
                return Err(self.error(&shown, format!("unknown key{hint}")));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.error(key, format!("expected a string, got {}", kind_of(other))))
            }
        }
    }

    fn req_str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?
            .ok_or_else(|| self.error(key, "is required"))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, got {}", kind_of(other)),
            )),
        }
    }

    fn opt_int(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(self.error(
                    key,
                    format!("{n} is not a whole number between {min} and {max}"),
                )),
            },
            Some(other) => Err(self.error(
                key,
                format!("expected a whole number, got {}", kind_of(other)),
            )),
        }
    }

    fn req_int(&self, key: &str, min: u64, max: u64) -> Result<u64> {
        self.opt_int(key, min, max)?
            .ok_or_else(|| self.error(key, "is required"))
    }

    fn opt_list(&self, key: &str) -> Result<Vec<Item<'a>>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, value)| Item {
                    path: format!("{}[{i}]", self.field(key)),
                    value,
                })
                .collect()),
            Some(other) => Err(self.error(key, format!("expected a list, got {}", kind_of(other)))),
        }
    }

    fn req_list(&self, key: &str) -> Result<Vec<Item<'a>>> {
        if self.get(key).is_none() {
            return Err(self.error(key, "is required"));
        }
        self.opt_list(key)
    }
}

impl<'a> Item<'a> {
    fn object(&self) -> Result<Object<'a>> {
        Object::new(&self.path, self.value)
    }

    fn ip(&self) -> Result<IpAddr> {
        match self.value {
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| ConfigError::new(&self.path, format!("{s:?} is not an IP address"))),
            other => Err(ConfigError::new(
                &self.path,
                format!(
                    "expected a string like \"10.64.0.1\", got {}",
                    kind_of(other)
                ),
            )),
        }
    }

    fn cidr(&self) -> Result<Cidr> {
        match self.value {
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| ConfigError::new(&self.path, format!("{s:?} is not a CIDR"))),
            other => Err(ConfigError::new(
                &self.path,
                format!(
                    "expected a string like \"10.0.0.2/24\", got {}",
                    kind_of(other)
                ),
            )),
        }
    }
}

/// The known key closest to `key` (case-insensitive edit distance), when it is close enough to
/// be a plausible typo.
fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn minimal() -> Value {
        serde_json::json!({
            "dns_server": "10.2.0.1",
            "privateKeyFile": "/run/keys/wg",
            "peers": [{ "publicKey": KEY, "allowedIPs": ["0.0.0.0/0"], "endpoint": "vpn.example.com:51820" }]
        })
    }

    fn error_of(value: Value) -> String {
        Config::parse(&value.to_string()).unwrap_err().to_string()
    }

    #[test]
    fn defaults_follow_the_seed() {
        let config = Config::parse(&minimal().to_string()).unwrap();
        assert_eq!(config.namespace, "vpn");
        assert_eq!(config.extra_firewall_rules, "");
        assert!(config.ips.is_empty());
        assert_eq!(config.backend, BackendChoice::Auto);
        assert_eq!(config.userspace_command, vec!["wireguard-go"]);
        assert!(config.strict_dns);
        assert_eq!(config.peers[0].dynamic_endpoint_refresh_seconds, 0);
        assert_eq!(config.peers[0].persistent_keepalive, None);
    }

    #[test]
    fn nulls_mean_defaults_as_nix_writes_them() {
        let mut v = minimal();
        v["userspaceCommand"] = Value::Null;
        v["peers"][0]["presharedKey"] = Value::Null;
        v["peers"][0]["persistentKeepalive"] = Value::Null;
        assert!(Config::parse(&v.to_string()).is_ok());
    }

    #[test]
    fn key_round_trip() {
        let key = Key::from_base64(KEY).unwrap();
        assert_eq!(key.to_base64(), KEY);
        assert!(Key::from_base64("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dh=").is_none());
        assert!(Key::from_base64("short=").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = minimal();
        v["peers"][0]["allowedIPs"][0] = "10.0.0.0/33".into();
        assert_eq!(
            error_of(v),
            "peers[0].allowedIPs[0]: \"10.0.0.0/33\" is not a CIDR"
        );

        let mut v = minimal();
        v["peers"][0]["allowedIps"] = serde_json::json!([]);
        assert_eq!(
            error_of(v),
            "peers[0].allowedIps: unknown key (did you mean \"allowedIPs\"?)"
        );

        let mut v = minimal();
        v.as_object_mut().unwrap().remove("dns_server");
        assert_eq!(error_of(v), "dns_server: is required");
    }

    #[test]
    fn unknown_keys_with_line_breaks_stay_one_line() {
        // Found by the fuzz target (fuzz/fuzz_targets/config.rs).
        let mut v = minimal();
        v["a\nb"] = 1.into();
        assert_eq!(error_of(v), "\"a\\nb\": unknown key");
        let mut v = minimal();
        v["peers"][0]["\r"] = 1.into();
        assert_eq!(error_of(v), "peers[0].\"\\r\": unknown key");
    }

    #[test]
    fn inline_preshared_key_is_never_echoed() {
        let mut v = minimal();
        v["peers"][0]["presharedKey"] = "secret-but-malformed".into();
        let e = error_of(v);
        assert!(e.starts_with("peers[0].presharedKey:"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn alternatives_are_checked_field_by_field() {
        const OTHER: &str = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
        let with = |alternatives: Value| {
            let mut v = minimal();
            v["peers"][0]["alternatives"] = alternatives;
            v
        };
        let good = with(serde_json::json!([{ "publicKey": OTHER, "endpoint": "10.0.0.9:51820" }]));
        let config = Config::parse(&good.to_string()).unwrap();
        let peer = &config.peers[0];
        assert_eq!(peer.failover_after_seconds, DEFAULT_FAILOVER_AFTER_SECONDS);
        assert_eq!(peer.server_count(), 2);
        assert_eq!(peer.server(1).1, OTHER);
        assert_eq!(peer.server(0).1, KEY);
        // Null is what the module writes for "no alternatives".
        assert!(Config::parse(&with(Value::Null).to_string()).is_ok());

        assert_eq!(
            error_of(with(serde_json::json!([]))),
            "peers[0].alternatives: is empty; list at least one server, or leave it out (null)"
        );
        assert_eq!(
            error_of(with(
                serde_json::json!([{ "publicKey": KEY, "endpoint": "10.0.0.9:51820" }])
            )),
            "peers[0].alternatives[0].publicKey: is the peer's own publicKey; an alternative is another server"
        );
        assert_eq!(
            error_of(with(
                serde_json::json!([{ "publicKey": OTHER, "endpoint": "10.0.0.9" }])
            )),
            "peers[0].alternatives[0].endpoint: \"10.0.0.9\" needs a port: write host:port or [IPv6]:port"
        );
        assert_eq!(
            error_of(with(serde_json::json!([{ "publicKey": OTHER }]))),
            "peers[0].alternatives[0].endpoint: is required"
        );
        assert_eq!(
            error_of(with(serde_json::json!([
                { "publicKey": OTHER, "endpoint": "10.0.0.9:1" },
                { "publicKey": OTHER, "endpoint": "10.0.0.10:1" }
            ]))),
            "peers[0].alternatives[1].publicKey: the same key appears in an earlier peer or alternative"
        );
        assert_eq!(
            error_of(with(serde_json::json!([
                { "publicKey": OTHER, "endpoint": "10.0.0.9:1", "presharedKey": "x" }
            ]))),
            "peers[0].alternatives[0].presharedKey: unknown key (did you mean \"presharedKeyFile\"?)"
        );
        let mut v = good.clone();
        v["peers"][0]["failoverAfterSeconds"] = 1.into();
        assert_eq!(
            error_of(v),
            "peers[0].failoverAfterSeconds: 1 is not a whole number between 5 and 4294967295"
        );
        let mut v = good;
        v["peers"][0].as_object_mut().unwrap().remove("endpoint");
        assert!(error_of(v).starts_with("peers[0].endpoint: is required when alternatives"));
    }

    #[test]
    fn endpoints() {
        for ok in ["1.2.3.4:51820", "[fd77::1]:51820", "vpn.example.com:1"] {
            assert!(Endpoint::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "1.2.3.4",
            "fd77::1:51820",
            "host:0",
            "host:65536",
            "a b:1",
            "10.0.0.300:1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn network_clears_host_bits() {
        let c: Cidr = "10.192.124.1/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.192.124.0/24");
        let c: Cidr = "fd77::1/0".parse().unwrap();
        assert_eq!(c.network().to_string(), "::/0");
    }

    /// A Mullvad-shaped provider file, for the `configFile` tests below.
    fn provider_file() -> crate::system::files::SecretFile {
        crate::system::files::SecretFile {
            bytes: format!(
                "\u{feff}# Mullvad\r\n[Interface]\r\nPrivateKey = {PSK_LIKE}\r\nAddress = 10.66.1.2/32, fc00:bbbb::2/128\r\nDNS = 10.64.0.1, fc00:bbbb::1\r\nMTU = 1380\r\nListenPort = 51820\r\n[Peer]\r\nPublicKey = {KEY}\r\nAllowedIPs = 0.0.0.0/0, ::/0\r\nEndpoint = 185.65.135.224:51820\r\n"
            )
            .into_bytes(),
            warning: None,
        }
    }

    const PSK_LIKE: &str = "rVXs/Ni9tu3oDBLS4hOyAUAa1qTWVA3loR8eL20os3I=";

    fn with_file(json: Value) -> Result<Config> {
        Config::parse_with(&json.to_string(), &|path| {
            assert_eq!(path, Path::new("/run/secrets/mullvad.conf"));
            Ok(provider_file())
        })
    }

    #[test]
    fn alternatives_from_provider_files() {
        const OTHER: &str = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
        let server = |private: &str, address: &str, peers: &str| crate::system::files::SecretFile {
            bytes: format!("[Interface]\nPrivateKey = {private}\nAddress = {address}\n{peers}")
                .into_bytes(),
            warning: None,
        };
        let one = format!(
            "[Peer]\nPublicKey = {OTHER}\nPresharedKey = {PSK_LIKE}\nAllowedIPs = 0.0.0.0/0\nEndpoint = se2.example.net:51820\n"
        );
        let both = "10.66.1.2/32, fc00:bbbb::2/128";
        let read = |path: &Path| {
            Ok(match path.to_str().unwrap() {
                "/run/secrets/mullvad.conf" => provider_file(),
                "/run/secrets/se2.conf" => server(PSK_LIKE, both, &one),
                "/run/secrets/two.conf" => server(
                    PSK_LIKE,
                    both,
                    &format!(
                        "{one}{}",
                        one.replace(OTHER, "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=")
                    ),
                ),
                "/run/secrets/key.conf" => server(KEY, both, &one),
                "/run/secrets/address.conf" => server(PSK_LIKE, "10.66.9.9/32", &one),
                other => panic!("read {other}"),
            })
        };
        let with = |alternative: Value| {
            let json = serde_json::json!({
                "configFile": "/run/secrets/mullvad.conf",
                "peers": [{ "publicKey": KEY, "allowedIPs": ["0.0.0.0/0"],
                            "endpoint": "185.65.135.224:51820", "alternatives": [alternative] }]
            });
            Config::parse_with(&json.to_string(), &read)
        };
        let config = with(serde_json::json!({ "configFile": "/run/secrets/se2.conf" })).unwrap();
        let alternative = &config.peers[0].alternatives[0];
        assert_eq!(alternative.public_key_text, OTHER);
        assert_eq!(alternative.endpoint.to_string(), "se2.example.net:51820");
        assert!(matches!(
            alternative.preshared_key,
            Some(PresharedKey::Inline(_))
        ));

        let error = |alternative: Value| with(alternative).unwrap_err().to_string();
        assert_eq!(
            error(serde_json::json!({ "configFile": "/run/secrets/two.conf" })),
            "peers[0].alternatives[0].configFile: /run/secrets/two.conf: has 2 [Peer] sections; an alternative is one server"
        );
        assert!(
            error(serde_json::json!({ "configFile": "/run/secrets/key.conf" }))
                .ends_with("has another PrivateKey than the namespace; failover changes the server, not this end's key")
        );
        assert!(
            error(serde_json::json!({ "configFile": "/run/secrets/address.conf" }))
                .contains("has another Address than the namespace's ips")
        );
        assert_eq!(
            error(serde_json::json!({ "configFile": "/run/secrets/se2.conf", "publicKey": OTHER })),
            "peers[0].alternatives[0].publicKey: conflicts with configFile: give a server either as a provider's file or by publicKey and endpoint"
        );
    }

    #[test]
    fn a_config_file_alone_is_a_whole_config() {
        // As the module writes it: every option null or empty but the file.
        let config = with_file(serde_json::json!({
            "namespace_name": "mullvad", "configFile": "/run/secrets/mullvad.conf",
            "dns_server": null, "dnsServers": [], "privateKeyFile": null, "ips": [], "peers": [],
            "mtu": null
        }))
        .unwrap();
        assert_eq!(
            config.private_key,
            PrivateKeySource::ConfigFile(Key::from_base64(PSK_LIKE).unwrap())
        );
        assert_eq!(config.dns_server.to_string(), "10.64.0.1");
        let dns: Vec<String> = config.dns_servers.iter().map(ToString::to_string).collect();
        assert_eq!(dns, ["10.64.0.1", "fc00:bbbb::1"]);
        let ips: Vec<String> = config.ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.66.1.2/32", "fc00:bbbb::2/128"]);
        assert_eq!(config.mtu, Some(1380));
        assert_eq!(config.peers.len(), 1);
        assert_eq!(config.peers[0].public_key_text, KEY);
        assert_eq!(
            config.warnings,
            ["/run/secrets/mullvad.conf:7: ListenPort has no meaning inside a namespace; ignored"]
        );
        assert_eq!(
            config.config_file,
            Some(PathBuf::from("/run/secrets/mullvad.conf"))
        );
    }

    #[test]
    fn options_override_the_config_file() {
        let config = with_file(serde_json::json!({
            "configFile": "/run/secrets/mullvad.conf",
            "dns_server": "10.64.0.3", "privateKeyFile": "/run/keys/wg",
            "ips": ["10.66.9.9/32"], "mtu": 1280,
            "peers": [{ "publicKey": KEY, "allowedIPs": ["10.0.0.0/8"] }]
        }))
        .unwrap();
        assert_eq!(
            config.dns_servers,
            vec!["10.64.0.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            config.private_key,
            PrivateKeySource::File("/run/keys/wg".into())
        );
        assert_eq!(config.ips, vec!["10.66.9.9/32".parse().unwrap()]);
        assert_eq!(config.mtu, Some(1280));
        assert_eq!(
            config.peers[0].allowed_ips,
            vec!["10.0.0.0/8".parse().unwrap()]
        );
    }

    #[test]
    fn config_file_errors_name_the_file_and_line() {
        let e = Config::parse_with(
            &serde_json::json!({ "configFile": "/etc/wg/p.conf" }).to_string(),
            &|_| {
                Ok(crate::system::files::SecretFile {
                    bytes: b"[Interface]\nPostUp = x\n".to_vec(),
                    warning: None,
                })
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/etc/wg/p.conf:2: PostUp runs shell commands as root"),
            "{e}"
        );
        let e = Config::parse_with(
            &serde_json::json!({ "configFile": "/etc/wg/p.conf" }).to_string(),
            &|_| Err("cannot read it: No such file or directory".into()),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "configFile: /etc/wg/p.conf: cannot read it: No such file or directory"
        );
        let e = error_of(serde_json::json!({ "configFile": "relative.conf" }));
        assert_eq!(e, "configFile: \"relative.conf\" is not an absolute path");
    }

    #[test]
    fn several_dns_servers() {
        let mut v = minimal();
        v["dnsServers"] = serde_json::json!(["10.2.0.2", "10.2.0.1"]);
        let config = Config::parse(&v.to_string()).unwrap();
        let dns: Vec<String> = config.dns_servers.iter().map(ToString::to_string).collect();
        assert_eq!(dns, ["10.2.0.1", "10.2.0.2"]);
        v["dnsServers"] = serde_json::json!(["fd00::53"]);
        assert_eq!(
            error_of(v.clone()),
            "dnsServers: fd00::53 is IPv6, but IPv6 is dropped because ips has no IPv6 address"
        );
        v["dnsServers"] = serde_json::json!(["resolver"]);
        assert_eq!(
            error_of(v),
            "dnsServers[0]: \"resolver\" is not an IP address"
        );
    }

    #[test]
    fn more_than_three_dns_servers_are_warned_about() {
        let mut v = minimal();
        v["dnsServers"] = serde_json::json!(["10.2.0.2", "10.2.0.3"]);
        assert!(Config::parse(&v.to_string()).unwrap().warnings.is_empty());
        v["dnsServers"] = serde_json::json!(["10.2.0.2", "10.2.0.3", "10.2.0.4"]);
        assert_eq!(
            Config::parse(&v.to_string()).unwrap().warnings,
            [
                "dnsServers: 4 DNS servers, but the C library asks only the first 3 in resolv.conf; 10.2.0.4 will not be asked"
            ]
        );
        // From a configFile: the file is named (found by fuzzing: the warning named nothing).
        let file = format!(
            "[Interface]\nPrivateKey = {PSK_LIKE}\nAddress = 10.2.0.2/32\nDNS = 10.2.0.1, 10.2.0.2, 10.2.0.3, 10.2.0.4\n"
        );
        let config = Config::parse_with(r#"{"configFile": "/run/p.conf"}"#, &|_| {
            Ok(crate::system::files::SecretFile {
                bytes: file.clone().into_bytes(),
                warning: None,
            })
        })
        .unwrap();
        assert_eq!(
            config.warnings,
            [
                "/run/p.conf: 4 DNS servers, but the C library asks only the first 3 in resolv.conf; 10.2.0.4 will not be asked"
            ]
        );
    }

    #[test]
    fn mtu_is_checked() {
        let mut v = minimal();
        v["mtu"] = 1420.into();
        assert_eq!(Config::parse(&v.to_string()).unwrap().mtu, Some(1420));
        v["mtu"] = 100.into();
        assert_eq!(error_of(v), "mtu: 100 is not between 576 and 65456");
    }

    #[test]
    fn paths_with_line_breaks_are_refused() {
        let mut v = minimal();
        v["privateKeyFile"] = "/run/keys/a\nb".into();
        assert_eq!(
            error_of(v),
            "privateKeyFile: \"/run/keys/a\\nb\" holds a control character"
        );
    }

    #[test]
    fn dns_server_must_be_a_resolver_address() {
        for (bad, problem) in [
            ("0.0.0.0", "dns_server: 0.0.0.0 is the unspecified address"),
            ("::", "dns_server: :: is the unspecified address"),
            (
                "224.0.0.251",
                "dns_server: 224.0.0.251 is a multicast address",
            ),
            ("ff02::fb", "dns_server: ff02::fb is a multicast address"),
            (
                "255.255.255.255",
                "dns_server: 255.255.255.255 is the broadcast address",
            ),
            (
                "fe80::1",
                "dns_server: fe80::1 is link-local and would need a scope",
            ),
        ] {
            let mut v = minimal();
            v["dns_server"] = bad.into();
            v["ips"] = serde_json::json!(["10.2.0.2/32", "fd77::2/128"]);
            let e = error_of(v);
            assert!(e.starts_with(problem), "{bad}: {e}");
        }
    }

    #[test]
    fn the_same_interface_address_twice_is_refused() {
        let mut v = minimal();
        v["ips"] = serde_json::json!(["10.2.0.2/32", "fd77::2/128", "10.2.0.2/24"]);
        assert_eq!(error_of(v), "ips[2]: 10.2.0.2 is already in ips[0]");
    }

    #[test]
    fn port_forwarding() {
        let mut v = minimal();
        v["portForwarding"] = serde_json::json!({ "gateway": "10.2.0.1" });
        let f = Config::parse(&v.to_string())
            .unwrap()
            .port_forwarding
            .unwrap();
        assert_eq!(f.protocols, [Protocol::Udp, Protocol::Tcp]);
        assert_eq!(f.lifetime_seconds, 60);
        assert_eq!(f.on_port_change, None);
        assert_eq!(f.on_port_change_user, "nobody");

        v["portForwarding"]["gateway"] = "fd00::1".into();
        assert_eq!(
            error_of(v.clone()),
            "portForwarding.gateway: \"fd00::1\" is not an IPv4 address (NAT-PMP speaks IPv4 only)"
        );
        v["portForwarding"]["gateway"] = "10.2.0.1".into();
        v["portForwarding"]["protocols"] = serde_json::json!(["tcp", "tcp"]);
        assert_eq!(
            error_of(v.clone()),
            "portForwarding.protocols[1]: \"tcp\" is listed twice"
        );
        v["portForwarding"]["protocols"] = serde_json::json!(["sctp"]);
        assert_eq!(
            error_of(v.clone()),
            "portForwarding.protocols[0]: \"sctp\" is not \"udp\" or \"tcp\""
        );
        v["portForwarding"]["protocols"] = serde_json::json!(["tcp"]);
        v["portForwarding"]["onPortChange"] = "set-port.sh".into();
        assert_eq!(
            error_of(v.clone()),
            "portForwarding.onPortChange: \"set-port.sh\" is not an absolute path"
        );
        v["portForwarding"]["onPortChange"] = Value::Null;
        v["portForwarding"]["lifetimeSeconds"] = 1.into();
        assert!(error_of(v).starts_with("portForwarding.lifetimeSeconds: 1 is not"));
    }

    #[test]
    fn allowed_users_and_groups() {
        let mut v = minimal();
        let config = Config::parse(&v.to_string()).unwrap();
        assert!(config.allowed_users.is_empty() && config.allowed_groups.is_empty());
        v["allowedUsers"] = serde_json::json!(["alice", "svc-backup$"]);
        v["allowedGroups"] = serde_json::json!(["vpn-users"]);
        let config = Config::parse(&v.to_string()).unwrap();
        assert_eq!(config.allowed_users, ["alice", "svc-backup$"]);
        assert_eq!(config.allowed_groups, ["vpn-users"]);
        v["allowedUsers"] = serde_json::json!(["alice", "../bob"]);
        assert!(
            error_of(v.clone())
                .starts_with("allowedUsers[1]: \"../bob\" is not a user or group name")
        );
        v["allowedUsers"] = serde_json::json!(["root"]);
        assert!(error_of(v.clone()).starts_with("allowedUsers[0]: root runs"));
        v["allowedUsers"] = Value::Null;
        v["allowedGroups"] = serde_json::json!([1000]);
        assert_eq!(
            error_of(v),
            "allowedGroups[0]: expected a user or group name, got a number"
        );
    }

    #[test]
    fn names() {
        assert!(check_name("vpn").is_ok());
        assert!(check_name("wg.se-1_a").is_ok());
        assert!(check_name("sixteen-chars-xx").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("..").is_err());
    }

    #[test]
    fn host_services_default_and_validate() {
        let mut v = minimal();
        v["hostServices"] = serde_json::json!([{ "hostPort": 5432 }]);
        v["publishPorts"] = serde_json::json!([{ "hostPort": 9091 }]);
        let config = Config::parse(&v.to_string()).unwrap();
        assert_eq!(
            config.host_services,
            vec![HostService {
                protocol: Protocol::Tcp,
                namespace_port: 5432,
                host_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                host_port: 5432,
                idle_timeout_seconds: DEFAULT_IDLE_TIMEOUT_SECONDS,
            }]
        );
        assert_eq!(config.publish_ports[0].idle_timeout_seconds, 300);

        for (entries, expected) in [
            (
                serde_json::json!([{ "hostPort": 1, "hostAddress": "0.0.0.0" }]),
                "hostServices[0].hostAddress: 0.0.0.0 is not the address of one host",
            ),
            (
                serde_json::json!([{ "hostPort": 1 }, { "hostPort": 2, "namespacePort": 1 }]),
                "hostServices[1].namespacePort: tcp port 1 inside is already taken",
            ),
            (
                serde_json::json!([{ "hostPort": 5432, "namespacePort": 9091 }]),
                "hostServices[0].namespacePort: tcp port 9091 inside is also the target of publishPorts[0]",
            ),
            (
                serde_json::json!([{ "hostPort": 1, "idleTimeoutSeconds": 0 }]),
                "hostServices[0].idleTimeoutSeconds: 0 is not a whole number between 1 and 86400",
            ),
            (serde_json::json!([{ "port": 1 }]), "hostServices[0].port"),
        ] {
            let mut v = v.clone();
            v["hostServices"] = entries;
            let e = error_of(v);
            assert!(e.starts_with(expected), "{e}");
        }
    }
}
