//! A small NAT-PMP gateway (RFC 6886) for tests, behaving like ProtonVPN's: one public port
//! per client for UDP and TCP alike, kept while renewed, picked by the gateway (suggestions
//! are ignored). Three switches: `restart` (the epoch starts again and every mapping is
//! forgotten, so the next one gets another port), `silent` (requests go unanswered) and
//! `grant_lifetime` (a lifetime granted whatever was asked, as a misbehaving gateway would).
//! `natpmpc` (libnatpmp) checks it in tests/forwarding.rs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Result, Rig, Worker};

pub const PORT: u16 = 5351;

/// One request as the gateway saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub at: Instant,
    pub from: SocketAddr,
    pub opcode: u8,
    pub answered: bool,
}

struct Gateway {
    public_address: Ipv4Addr,
    max_lifetime: u32,
    /// The epoch is `epoch_base` plus the seconds since `started`.
    epoch_base: u32,
    started: Instant,
    /// The port the next new mapping gets.
    next_port: u16,
    /// Public port and expiry by client address.
    mappings: HashMap<IpAddr, (u16, Instant)>,
    silent: bool,
    /// Granted instead of what was asked, when set.
    forced_lifetime: Option<u32>,
    seen: Vec<Seen>,
}

impl Gateway {
    fn epoch(&self) -> u32 {
        self.epoch_base + self.started.elapsed().as_secs() as u32
    }

    /// The answer to `request` from `client`, or `None` when it deserves none (too short;
    /// RFC 6886 3.5: a gateway ignores what it cannot parse).
    fn answer(&mut self, client: IpAddr, request: &[u8]) -> Option<Vec<u8>> {
        let (&version, &opcode) = (request.first()?, request.get(1)?);
        let mut reply = vec![0u8, 128 | opcode];
        let result: u16 = if version != 0 {
            1 // unsupported version
        } else if opcode > 2 {
            5 // unsupported opcode
        } else {
            0
        };
        reply.extend_from_slice(&result.to_be_bytes());
        reply.extend_from_slice(&self.epoch().to_be_bytes());
        if result != 0 {
            return Some(reply);
        }
        if opcode == 0 {
            reply.extend_from_slice(&self.public_address.octets());
            return Some(reply);
        }
        if request.len() < 12 {
            return None;
        }
        let internal = u16::from_be_bytes([request[4], request[5]]);
        let lifetime = u32::from_be_bytes([request[8], request[9], request[10], request[11]]);
        let now = Instant::now();
        let (public, granted) = if lifetime == 0 {
            self.mappings.remove(&client);
            (0, 0)
        } else {
            let granted = self
                .forced_lifetime
                .unwrap_or(lifetime.min(self.max_lifetime));
            let expires = now + Duration::from_secs(u64::from(granted));
            let port = match self.mappings.get(&client) {
                Some(&(port, until)) if until > now => port,
                _ => {
                    let port = self.next_port;
                    self.next_port += 1;
                    port
                }
            };
            self.mappings.insert(client, (port, expires));
            (port, granted)
        };
        reply.extend_from_slice(&internal.to_be_bytes());
        reply.extend_from_slice(&public.to_be_bytes());
        reply.extend_from_slice(&granted.to_be_bytes());
        Some(reply)
    }
}

pub struct NatPmpServer {
    gateway: Arc<Mutex<Gateway>>,
    _worker: Worker,
}

impl NatPmpServer {
    /// Serves on `address`:5351 in the namespace `fd`. New mappings get ports from
    /// `first_port` on; lifetimes are capped at `max_lifetime` seconds.
    pub fn start(
        fd: &OwnedFd,
        address: Ipv4Addr,
        public_address: Ipv4Addr,
        first_port: u16,
        max_lifetime: u32,
    ) -> Result<NatPmpServer> {
        let socket = Rig::within(fd, || UdpSocket::bind((address, PORT)))??;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let gateway = Arc::new(Mutex::new(Gateway {
            public_address,
            max_lifetime,
            // As if up for a while: a restart then sends the epoch clearly backwards.
            epoch_base: 1000,
            started: Instant::now(),
            next_port: first_port,
            mappings: HashMap::new(),
            silent: false,
            forced_lifetime: None,
            seen: Vec::new(),
        }));
        let shared = Arc::clone(&gateway);
        let mut buf = [0u8; 1100];
        let worker = Worker::spawn(move || {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let mut gateway = shared.lock().unwrap();
            let silent = gateway.silent;
            let reply = if silent {
                None
            } else {
                gateway.answer(from.ip(), &buf[..n])
            };
            gateway.seen.push(Seen {
                at: Instant::now(),
                from,
                opcode: buf.get(1).copied().unwrap_or(255),
                answered: reply.is_some(),
            });
            drop(gateway);
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, from);
            }
        });
        Ok(NatPmpServer {
            gateway,
            _worker: worker,
        })
    }

    /// Simulates a reboot: the epoch starts from 0, every mapping is gone, and new mappings
    /// get ports from `first_port` on.
    pub fn restart(&self, first_port: u16) {
        let mut gateway = self.gateway.lock().unwrap();
        gateway.epoch_base = 0;
        gateway.started = Instant::now();
        gateway.mappings.clear();
        gateway.next_port = first_port;
    }

    pub fn set_silent(&self, silent: bool) {
        self.gateway.lock().unwrap().silent = silent;
    }

    /// Grants `lifetime` to every request from now on, whatever was asked.
    pub fn grant_lifetime(&self, lifetime: Option<u32>) {
        self.gateway.lock().unwrap().forced_lifetime = lifetime;
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.gateway.lock().unwrap().seen.clone()
    }
}
