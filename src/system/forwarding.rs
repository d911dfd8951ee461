//! The provider's forwarded port as the rest of the system sees it: the nft set that opens it
//! in the namespace's input chain, and `/run/wg-namespace/forwarding/<ns>.json`, which
//! `status`, the ruleset template and other units read.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::Protocol;
use crate::system::files::Dir;
use crate::system::process::ProcessId;
use crate::system::state::STATE_DIR;

/// The set in `inet my_table` whose elements (`protocol . port`) `my_input` accepts from the
/// tunnel. The template declares it; only the forwarding process changes its elements.
pub const SET: &str = "wg_namespace_forwarded";
/// A record file is at most this big; anything larger is not ours.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// The records' own directory beside the state files. No namespace name reaches it (a
/// namespace's files there are `<ns>.json` and `<ns>.lock`), so a record is never taken for a
/// namespace's state, nor written over one, nor removed with another namespace.
const RECORD_SUBDIR: &str = "forwarding";

fn record_name(namespace: &str) -> String {
    format!("{namespace}.json")
}

pub fn record_dir_path() -> PathBuf {
    Path::new(STATE_DIR).join(RECORD_SUBDIR)
}

pub fn record_path(namespace: &str) -> PathBuf {
    record_dir_path().join(record_name(namespace))
}

/// The records' directory, checked like the state directory (root's own, no symlink on the
/// way); `None` when it does not exist and `create` is false.
fn record_dir(create: bool) -> Result<Option<Dir>> {
    let path = record_dir_path();
    let dir = if create {
        Dir::create(&path, 0o755)
    } else {
        Dir::open(&path)
    };
    match dir {
        Ok(dir) => Ok(Some(dir)),
        Err(e) if e.not_found() && !create => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// No mapping yet: the first request is under way.
    Requesting,
    /// Every protocol is mapped and the port is open.
    Mapped,
    /// The gateway did not answer or refused; retrying with a backoff. A mapping that has not
    /// expired yet stays open meanwhile.
    Retrying,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedPort {
    pub protocol: Protocol,
    pub port: u16,
    /// Seconds since the Unix epoch when the gateway forgets the mapping unless renewed.
    pub expires_at: u64,
}

/// What the forwarding process reports; rewritten whenever something in it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub namespace: String,
    pub gateway: Ipv4Addr,
    /// The process keeping the mapping alive.
    pub process: ProcessId,
    pub phase: Phase,
    /// The port handed to `onPortChange` (that of the first protocol), while mapped.
    pub port: Option<u16>,
    pub ports: Vec<ForwardedPort>,
    /// Why the phase is not `mapped`.
    pub reason: Option<String>,
    /// Seconds since the Unix epoch of the last change.
    pub updated_at: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Record {
    /// The record of `namespace`, if there is one; read like the state file (no symlink
    /// followed, size-limited): it is only trusted as far as its parsing goes.
    pub fn load(namespace: &str) -> Result<Option<Record>> {
        let Some(dir) = record_dir(false)? else {
            return Ok(None);
        };
        let Some(bytes) = dir.read(&record_name(namespace), MAX_RECORD_BYTES)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{} is not a port forwarding record",
                record_path(namespace).display()
            )
        })
    }

    /// Ports still within their lifetime: what may be open.
    pub fn live_ports(&self, now: u64) -> Vec<ForwardedPort> {
        self.ports
            .iter()
            .copied()
            .filter(|p| p.expires_at > now)
            .collect()
    }

    /// Replaces the file atomically. World-readable on purpose (other units read the port);
    /// it holds nothing secret.
    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).context("encoding the record")?;
        let name = record_name(&self.namespace);
        let write = || -> Result<()> {
            let dir = record_dir(true)?.context("the records' directory is missing")?;
            // Rewritten at every renewal and meaningless after a reboot: never worth a sync.
            Ok(dir.write_atomically_unsynced(&name, &text, 0o644)?)
        };
        // The last record of another namespace going may take the empty directory with it
        // between our opening and writing it; it is made again.
        write().or_else(|_| write())
    }
}

/// Removes the record of `namespace`, and the records' directory when that leaves it empty
/// (so that the state directory itself can go with the last namespace).
pub fn remove_record(namespace: &str) -> Result<()> {
    let Some(dir) = record_dir(false)? else {
        return Ok(());
    };
    dir.remove_file(&record_name(namespace))?;
    if let Ok(parent) = Dir::open(Path::new(STATE_DIR)) {
        let _ = parent.remove_dir(RECORD_SUBDIR);
    }
    Ok(())
}

/// The set's elements as nft writes them, `udp . 51413, tcp . 51413`.
pub fn elements(ports: &[ForwardedPort]) -> String {
    ports
        .iter()
        .map(|p| format!("{} . {}", p.protocol.as_str(), p.port))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The set's key for `protocol . port`, as the kernel keeps it: each field of the concatenation
/// padded to four bytes, the port in network byte order.
fn key(protocol: Protocol, port: u16) -> Vec<u8> {
    let number = match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP,
        Protocol::Udp => libc::IPPROTO_UDP,
    };
    let [high, low] = port.to_be_bytes();
    vec![number as u8, 0, 0, 0, high, low, 0, 0]
}

/// `protocol . port` of a key [`key`] makes.
fn from_key(key: &[u8]) -> Result<(Protocol, u16)> {
    let &[number, 0, 0, 0, high, low, 0, 0] = key else {
        bail!("unexpected element in the nft set {SET}: {key:02x?}");
    };
    let protocol = match i32::from(number) {
        libc::IPPROTO_TCP => Protocol::Tcp,
        libc::IPPROTO_UDP => Protocol::Udp,
        other => bail!("unexpected protocol {other} in the nft set {SET}"),
    };
    Ok((protocol, u16::from_be_bytes([high, low])))
}

/// Makes the set hold exactly `ports`, in one nf_tables transaction: there is no instant in
/// which both the old and the new port, or an empty set while a port stays mapped, is seen.
pub fn set_open_ports(fd: impl AsFd, ports: &[ForwardedPort]) -> Result<()> {
    let keys: Vec<Vec<u8>> = ports.iter().map(|p| key(p.protocol, p.port)).collect();
    crate::system::nf_tables::replace_elements(
        fd,
        crate::system::firewall::POLICY_TABLE,
        SET,
        &keys,
    )
    .with_context(|| format!("updating the nft set {SET}"))
}

/// The set's elements now, as `(protocol, port)`.
pub fn open_ports(fd: impl AsFd) -> Result<Vec<(Protocol, u16)>> {
    crate::system::nf_tables::element_keys(fd, crate::system::firewall::POLICY_TABLE, SET)
        .with_context(|| format!("reading the nft set {SET}"))?
        .iter()
        .map(|k| from_key(k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unexpired_ports_are_live() {
        let port = |protocol, expires_at| ForwardedPort {
            protocol,
            port: 40000,
            expires_at,
        };
        let record = Record {
            namespace: "vpn".into(),
            gateway: Ipv4Addr::new(10, 2, 0, 1),
            process: ProcessId::current(),
            phase: Phase::Retrying,
            port: Some(40000),
            ports: vec![port(Protocol::Udp, 100), port(Protocol::Tcp, 200)],
            reason: None,
            updated_at: 0,
        };
        assert_eq!(record.live_ports(150), vec![port(Protocol::Tcp, 200)]);
        assert_eq!(elements(&record.live_ports(50)), "udp . 40000, tcp . 40000");
    }

    #[test]
    fn keys_are_the_kernels_padded_concatenation() {
        // What `nft --debug=netlink list set` shows for `tcp . 40000`: 00000006 0000409c.
        assert_eq!(key(Protocol::Tcp, 40000), [6, 0, 0, 0, 0x9c, 0x40, 0, 0]);
        assert_eq!(
            from_key(&key(Protocol::Udp, 51413)).unwrap(),
            (Protocol::Udp, 51413)
        );
        assert!(from_key(&[6, 0, 0, 0, 0x9c]).is_err());
        assert!(from_key(&[1, 0, 0, 0, 0, 80, 0, 0]).is_err());
    }
}
