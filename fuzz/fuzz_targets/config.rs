//! Config parsing and validation must never panic, every error must be one line (the CLI prints
//! it after `error: `), and whatever is accepted must hold up: a valid name, unique canonical
//! keys, at least one allowed IP per peer, prefixes and endpoints that survive a round trip.
//!
//! Each input is tried twice: as the text of a config file, and as the seed of a config-shaped
//! JSON document (known keys, plausible and broken values), which gets past the JSON syntax to
//! the validation far more often than mutated text does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use wg_namespace::config::{
    Cidr, Config, Endpoint, NAMESPACE_KEYS, PEER_KEYS, PUBLISH_KEYS, check_name,
};

fuzz_target!(|data: &[u8]| {
    check(&String::from_utf8_lossy(data));
    let document = Source { data, pos: 0 }.config();
    check(&document.to_string());
});

fn check(text: &str) {
    match Config::parse(text) {
        Ok(config) => holds_up(&config),
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.contains(['\n', '\r']),
                "error is not one line: {message:?}"
            );
            assert!(
                !e.problem.is_empty(),
                "error without a problem: {message:?}"
            );
        }
    }
}

fn holds_up(config: &Config) {
    assert!(
        check_name(&config.namespace).is_ok(),
        "{:?}",
        config.namespace
    );
    assert!(!config.userspace_command.is_empty());
    assert!(!config.dns_server.is_ipv6() || config.ipv6_enabled());
    for dns in std::iter::once(&config.dns_server).chain(&config.dns_servers) {
        let scoped = matches!(dns, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local());
        let broadcast = matches!(dns, std::net::IpAddr::V4(v4) if v4.is_broadcast());
        assert!(
            !dns.is_unspecified() && !dns.is_multicast() && !broadcast && !scoped,
            "{dns} accepted as a resolver"
        );
    }
    for (i, ip) in config.ips.iter().enumerate() {
        assert!(
            config.ips[..i].iter().all(|other| other.addr != ip.addr),
            "{} twice in ips",
            ip.addr
        );
    }
    let mut keys = std::collections::HashSet::new();
    for peer in &config.peers {
        assert!(keys.insert(peer.public_key.0), "duplicate key accepted");
        assert_eq!(peer.public_key.to_base64(), peer.public_key_text);
        assert!(!peer.allowed_ips.is_empty());
        for cidr in peer.allowed_ips.iter().chain(&config.ips) {
            assert_eq!(cidr.to_string().parse::<Cidr>(), Ok(*cidr));
            assert!(cidr.prefix <= Cidr::max_prefix(cidr.addr));
        }
        if let Some(endpoint) = &peer.endpoint {
            assert_eq!(
                Endpoint::parse(&endpoint.to_string()).as_ref(),
                Ok(endpoint)
            );
            assert_ne!(endpoint.port, 0);
        }
    }
    for port in &config.publish_ports {
        assert_ne!(port.host_port, 0);
        assert_ne!(port.namespace_port, 0);
    }
}

/// Turns fuzz bytes into choices; reads zeros once they run out.
struct Source<'a> {
    data: &'a [u8],
    pos: usize,
}

/// Strings that mean something to the validator, good and bad.
const WORDS: &[&str] = &[
    "",
    " ",
    "vpn",
    "wgb-0_a.b",
    "sixteen-chars-xx",
    "-x",
    "..",
    "a/b",
    "10.2.0.1",
    "0.0.0.0",
    "224.0.0.251",
    "255.255.255.255",
    "fe80::1",
    "ff02::fb",
    "10.0.0.300",
    "fd77::1",
    "::",
    "10.0.0.2/24",
    "10.0.0.2/",
    "10.0.0.2/033",
    "0.0.0.0/0",
    "::/0",
    "fd77::2/128",
    "10.0.0.0/33",
    " 10.0.0.1/32 ",
    "/run/keys/wg",
    "run/keys/wg",
    "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
    "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dh=",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg",
    "vpn.example.com:51820",
    "vpn.example.com.:1",
    "-bad-.example:1",
    "1.2.3.4:51820",
    "1.2.3.4",
    "[fd77::1]:51820",
    "[fd77::1]51820",
    "fd77::1:51820",
    "host:0",
    "host:65536",
    "host:+1",
    "auto",
    "kernel",
    "userspace",
    "boringtun-cli --disable-drop-privileges",
    "tcp",
    "udp",
    "sctp",
    "127.0.0.1",
    "a\nb",
    "\r",
    "\u{0}",
    "é\u{2028}",
    "add rule inet my_table my_input tcp dport 22 accept",
];

impl Source<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n
    }

    fn string(&mut self) -> String {
        if self.byte() < 200 {
            return WORDS[self.below(WORDS.len())].to_string();
        }
        // Raw bytes, for whatever the list lacks.
        let len = self.below(48);
        let start = self.pos.min(self.data.len());
        let end = (start + len).min(self.data.len());
        self.pos += len;
        String::from_utf8_lossy(&self.data[start..end]).into_owned()
    }

    fn number(&mut self) -> Value {
        match self.below(5) {
            0 => Value::from(self.byte()),
            1 => Value::from(u64::from_le_bytes(std::array::from_fn(|_| self.byte()))),
            2 => Value::from(-i64::from(self.byte())),
            3 => serde_json::Number::from_f64(f64::from(self.byte()) / 4.0)
                .map_or(Value::Null, Value::Number),
            _ => Value::from([0u64, 1, 25, 65535, 65536, 4294967295, 4294967296][self.below(7)]),
        }
    }

    fn value(&mut self, depth: u8) -> Value {
        match self.below(if depth > 2 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(self.byte() & 1 == 1),
            2 => self.number(),
            3 | 4 => Value::String(self.string()),
            5 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => self.object(&[], depth + 1, |s, _| s.value(depth + 1)),
        }
    }

    /// An object with some of `keys` (and now and then a stranger), values from `value_of`.
    fn object(
        &mut self,
        keys: &[&str],
        depth: u8,
        mut value_of: impl FnMut(&mut Self, &str) -> Value,
    ) -> Value {
        let mut map = Map::new();
        for key in keys {
            if self.byte() & 3 != 0 {
                let value = value_of(self, key);
                map.insert(key.to_string(), value);
            }
        }
        if keys.is_empty() || self.byte() >= 240 {
            for _ in 0..=self.below(2) {
                let key = self.string();
                let value = self.value(depth + 1);
                map.insert(key, value);
            }
        }
        Value::Object(map)
    }

    fn list(&mut self, mut item: impl FnMut(&mut Self) -> Value) -> Value {
        if self.byte() >= 230 {
            return self.value(2);
        }
        Value::Array((0..self.below(4)).map(|_| item(self)).collect())
    }

    /// Mostly the right type for each key, sometimes anything.
    fn typed(&mut self, key: &str) -> Value {
        if self.byte() >= 235 {
            return self.value(1);
        }
        match key {
            "ips" | "allowedIPs" => self.list(|s| Value::String(s.string())),
            "peers" => self.list(|s| s.object(PEER_KEYS, 2, Self::typed)),
            "publishPorts" => self.list(|s| s.object(PUBLISH_KEYS, 2, Self::typed)),
            "strictDns" => Value::Bool(self.byte() & 1 == 1),
            "dynamicEndpointRefreshSeconds"
            | "persistentKeepalive"
            | "hostPort"
            | "namespacePort" => self.number(),
            _ => Value::String(self.string()),
        }
    }

    fn config(&mut self) -> Value {
        self.object(NAMESPACE_KEYS, 0, Self::typed)
    }
}
