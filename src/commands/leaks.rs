//! `check-leaks`: probes a live namespace the way a leak would happen, and prints a verdict
//! per probe. Probe packets are sent from inside the namespace to documentation addresses
//! (RFC 5737 / RFC 3849); a protected namespace drops them before they leave (the kernel then
//! answers the sender with EPERM), and even an unprotected one could only send them into the
//! tunnel.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::exit::code;
use crate::system::process::ProcessId;
use crate::system::relays::{Direction, Entry};
use crate::system::state::{Phase, Resource, State};
use crate::system::{dns, files, firewall, netns};

/// A resolver that is not `dns_server` (TEST-NET-2).
const OTHER_RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const MDNS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const LLMNR: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 252);
const V6_DOC: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53);

struct Probe {
    name: &'static str,
    passed: bool,
    detail: String,
}

/// What a packet sent from inside met. Dropping it in the output hook gives the sender EPERM
/// at once on current kernels; older ones (6.1) let a TCP connect time out instead, so the
/// guard rule's counter is the other witness.
fn outcome(result: io::Result<()>, counted: bool) -> (bool, String) {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => (true, "dropped by the firewall".into()),
        _ if counted => (true, "dropped by the firewall (counted by its rule)".into()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)
            ) =>
        {
            (true, "no route out".into())
        }
        // IPv6 switched off: no address to send from (or no IPv6 at all).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT)
            ) =>
        {
            (true, "no IPv6 address to send from".into())
        }
        Err(e) => (false, format!("not dropped: {e}")),
        Ok(()) => (false, "the packet left the namespace".into()),
    }
}

fn udp_probe(to: SocketAddr) -> io::Result<()> {
    let bind: SocketAddr = if to.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.send_to(b"wg-namespace leak probe", to).map(|_| ())
}

fn tcp_probe(to: SocketAddr) -> io::Result<()> {
    TcpStream::connect_timeout(&to, Duration::from_secs(2)).map(|_| ())
}

/// The hidden `probe-inside` command, run through `exec`: reports what a process inside sees.
pub fn probe_inside() -> i32 {
    let resolv =
        files::read_text(Path::new("/etc/resolv.conf"), files::CONFIG_LIMIT).unwrap_or_default();
    let nameservers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .collect();
    println!("nameservers {}", nameservers.join(","));
    let nsswitch =
        files::read_text(Path::new("/etc/nsswitch.conf"), files::CONFIG_LIMIT).unwrap_or_default();
    let hosts = nsswitch
        .lines()
        .find_map(|l| l.trim().strip_prefix("hosts:"))
        .map(|h| h.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!("hosts {hosts}");
    // Any address in /etc/hosts that is not loopback: the host's hosts file showing through.
    let hosts_file =
        files::read_text(Path::new("/etc/hosts"), files::CONFIG_LIMIT).unwrap_or_default();
    let foreign: Vec<&str> = hosts_file
        .lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
        .filter(|addr| !addr.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
        .collect();
    println!("hosts-file-foreign {}", foreign.join(","));
    for path in [
        "/run/nscd/socket",
        dns::HOST_RESOLVER_PATHS[1],
        dns::HOST_RESOLVER_PATHS[2],
    ] {
        if UnixStream::connect(path).is_ok() {
            println!("reachable {path}");
        }
    }
    code::OK
}

fn resolver_probes(namespace: &str, dns_servers: &str) -> Result<Vec<Probe>> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut command = Command::new(&exe);
    command
        .args(["exec", "--namespace", namespace, "--"])
        .arg(&exe)
        .arg("probe-inside");
    // The probe only reads files and tries local sockets; half a minute is plenty.
    let output = crate::system::process::output_within(&mut command, None, Duration::from_secs(30))
        .context("running a probe through exec")?;
    if !output.status.success() {
        bail!(
            "the probe inside failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let nameservers = field("nameservers ");
    let hosts = field("hosts ");
    let foreign_hosts = field("hosts-file-foreign ");
    let reachable: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("reachable "))
        .collect();
    Ok(vec![
        Probe {
            name: "resolv-conf",
            passed: nameservers == dns_servers,
            detail: format!("processes inside use nameserver {nameservers:?} (want {dns_servers})"),
        },
        Probe {
            name: "nsswitch-hosts",
            passed: hosts == "files dns",
            detail: format!(
                "hosts: {hosts:?} (want \"files dns\": no resolved, mDNS or nscd module)"
            ),
        },
        Probe {
            name: "hosts-file",
            passed: foreign_hosts.is_empty(),
            detail: if foreign_hosts.is_empty() {
                "/etc/hosts inside names loopback addresses only".into()
            } else {
                format!("/etc/hosts inside names {foreign_hosts} (the host's hosts file?)")
            },
        },
        Probe {
            name: "host-resolver-sockets",
            passed: reachable.is_empty(),
            detail: if reachable.is_empty() {
                "nscd, systemd-resolved and D-Bus sockets are hidden".into()
            } else {
                format!("reachable from inside: {}", reachable.join(", "))
            },
        },
    ])
}

/// The relays are the only ways between host and namespace: each must run unprivileged and on
/// the side it connects from (publishPorts inside, hostServices on the host). Lists the host
/// services, the destinations on the host that processes inside can reach on purpose.
fn relay_probe(state: &State, ns_fd: &OwnedFd) -> Option<Probe> {
    let relays: Vec<(&ProcessId, &Entry)> = state
        .resources
        .iter()
        .filter_map(|r| match r {
            Resource::Relay { process, entry, .. } => Some((process, entry)),
            _ => None,
        })
        .collect();
    if relays.is_empty() {
        return None;
    }
    let inode = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let inside = std::fs::File::from(ns_fd.try_clone().ok()?)
        .metadata()
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let host = inode("/proc/self/ns/net");
    let mut problems = Vec::new();
    for (process, entry) in &relays {
        let pid = process.pid;
        if !process.is_alive() {
            problems.push(format!("the relay for {entry} (pid {pid}) is gone"));
            continue;
        }
        let status = files::read_regular(
            std::path::Path::new(&format!("/proc/{pid}/status")),
            files::PROC_LIMIT,
        )
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let uids = field("Uid:");
        if uids.is_empty() || uids.contains(&"0") {
            problems.push(format!("the relay for {entry} (pid {pid}) runs as root"));
        }
        if field("CapEff:")
            .first()
            .is_none_or(|caps| !caps.trim_start_matches('0').is_empty())
        {
            problems.push(format!(
                "the relay for {entry} (pid {pid}) has capabilities"
            ));
        }
        let expected = match entry.direction {
            Direction::Publish => inside,
            Direction::HostService => host,
        };
        if inode(&format!("/proc/{pid}/ns/net")) != expected || expected.is_none() {
            problems.push(format!(
                "the relay for {entry} (pid {pid}) is not in the namespace it should connect from"
            ));
        }
    }
    let services: Vec<String> = relays
        .iter()
        .filter(|(_, e)| e.direction == Direction::HostService)
        .map(|(_, e)| {
            format!(
                "{} 127.0.0.1:{} -> {}",
                e.protocol.as_str(),
                e.namespace_port,
                e.host()
            )
        })
        .collect();
    let detail = if problems.is_empty() {
        let mut text = format!("{} relays run unprivileged, none as root", relays.len());
        if !services.is_empty() {
            text.push_str(&format!(
                "; host services reachable from inside on purpose: {}",
                services.join(", ")
            ));
        }
        text
    } else {
        problems.join("; ")
    };
    Some(Probe {
        name: "relays",
        passed: problems.is_empty(),
        detail,
    })
}

pub fn run(namespace: &str) -> Result<i32> {
    let Some(state) = State::load(namespace)?.filter(|s| s.phase == Phase::Up) else {
        bail!("check-leaks: namespace {namespace:?} is not up");
    };
    let fd = state.open_netns().with_context(|| {
        format!("check-leaks: network namespace {namespace:?} is gone or is not the one wg-namespace made")
    })?;
    let mut probes = Vec::new();

    let links = crate::system::link::Netlink::inside(&fd)?.links()?;
    let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
    probes.push(Probe {
        name: "interfaces",
        passed: links.iter().all(|l| l.name == "lo" || l.name == namespace),
        detail: format!("links inside: {}", names.join(", ")),
    });
    probes.push(Probe {
        name: "ruleset",
        passed: firewall::has_table(&fd, firewall::GUARD_TABLE)?,
        detail: format!("leak guard table inet {}", firewall::GUARD_TABLE),
    });

    // Each probe names the guard rule (by its comment) that must stop it.
    const DNS_RULE: &str = "DNS anywhere else";
    const MDNS_RULE: &str = "mDNS and LLMNR";
    const IPV6_RULE: &str = "IPv6: the interface has no IPv6 address";
    let mut packet = |name: &'static str,
                      what: String,
                      rule: &str,
                      send: &dyn Fn() -> io::Result<()>|
     -> Result<()> {
        let before = firewall::guard_drops(&fd).unwrap_or_default();
        let result = netns::within(&fd, send)?;
        let after = firewall::guard_drops(&fd).unwrap_or_default();
        let counted =
            after.get(rule).copied().unwrap_or(0) > before.get(rule).copied().unwrap_or(0);
        let (passed, how) = outcome(result, counted);
        probes.push(Probe {
            name,
            passed,
            detail: format!("{what}: {how}"),
        });
        Ok(())
    };
    if state.strict_dns {
        let udp = SocketAddr::new(OTHER_RESOLVER.into(), 53);
        packet(
            "dns-udp-elsewhere",
            format!("UDP DNS to {OTHER_RESOLVER}"),
            DNS_RULE,
            &|| udp_probe(udp),
        )?;
        packet(
            "dns-tcp-elsewhere",
            format!("TCP DNS to {OTHER_RESOLVER}"),
            DNS_RULE,
            &|| tcp_probe(udp),
        )?;
        let dot = SocketAddr::new(OTHER_RESOLVER.into(), 853);
        packet(
            "dot-elsewhere",
            format!("DNS over TLS to {OTHER_RESOLVER}"),
            DNS_RULE,
            &|| tcp_probe(dot),
        )?;
    }
    let mdns = SocketAddr::new(MDNS.into(), 5353);
    packet("mdns", "mDNS query".into(), MDNS_RULE, &|| udp_probe(mdns))?;
    let llmnr = SocketAddr::new(LLMNR.into(), 5355);
    packet("llmnr", "LLMNR query".into(), MDNS_RULE, &|| {
        udp_probe(llmnr)
    })?;
    if !state.ipv6 {
        let v6 = SocketAddr::new(IpAddr::V6(V6_DOC), 443);
        packet(
            "ipv6",
            "IPv6 packet with no IPv6 address configured".into(),
            IPV6_RULE,
            &|| udp_probe(v6),
        )?;
    }
    let dns_servers = if state.dns_servers.is_empty() {
        state.dns_server.to_string()
    } else {
        let all: Vec<String> = state.dns_servers.iter().map(ToString::to_string).collect();
        all.join(",")
    };
    probes.extend(resolver_probes(namespace, &dns_servers)?);
    probes.extend(relay_probe(&state, &fd));

    for probe in &probes {
        println!(
            "{} {}: {}",
            if probe.passed { "PASS" } else { "FAIL" },
            probe.name,
            probe.detail
        );
    }
    let failed = probes.iter().filter(|p| !p.passed).count();
    if failed == 0 {
        println!("verdict: no leak found ({} probes)", probes.len());
        Ok(code::OK)
    } else {
        println!("verdict: {failed} of {} probes found a leak", probes.len());
        Ok(code::FAILURE)
    }
}
