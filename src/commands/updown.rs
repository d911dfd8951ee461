//! `up` and `down`: the order of the steps, and rollback.
//!
//! Everything `up` can check without touching the system (config, key files, endpoint names,
//! templates, name clashes) is checked first. Then each step records its resource in the state
//! journal before making it; a failure anywhere drops the [`Build`], which undoes the journal
//! in reverse. The namespace and its firewall exist before the interface is moved in, so no
//! process inside ever sees the namespace without its ruleset.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::config::Config;
use crate::render;
use crate::system::link::Netlink;
use crate::system::relays;
use crate::system::state::{
    LinkKind, Lock, LockError, PeerRecord, Phase, PortForwardingRecord, PublishRecord, Resource,
    ServerRecord, State,
};
use crate::system::wireguard::{self, Backend};
use crate::system::{dns, firewall, netns};

/// The steps of `up`, in order. Their names appear in error messages and in the test-only
/// pause switch.
pub const STEPS: [&str; 7] = [
    "namespace",
    "dns",
    "firewall",
    "interface",
    "network",
    "publish",
    "record",
];

/// Test-only: `up` stops itself (SIGSTOP) just before the named step, with every earlier step
/// done and on record, so fault tests can kill it at a precise point. Only debug builds (what
/// `cargo test` builds) look at it: the release binary the NixOS package ships has no such
/// switch.
pub const PAUSE_ENV: &str = "WG_NAMESPACE_TEST_PAUSE_BEFORE";

/// Whether this build stops at [`PAUSE_ENV`]'s points.
pub const PAUSE_SWITCH: bool = cfg!(debug_assertions);

/// Stops this process (SIGSTOP) when [`PAUSE_ENV`] names `point` and this is a debug build.
pub fn pause_before(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(PAUSE_ENV).as_deref() == Ok(point) {
        eprintln!("wg-namespace: paused before step {point}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// How long `down` waits for an `up` of the same namespace to finish.
const DOWN_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The journal of an `up` in progress; undoes everything recorded unless committed.
struct Build {
    state: State,
    committed: bool,
}

impl Build {
    fn start(state: State) -> Result<Build> {
        state.save()?;
        Ok(Build {
            state,
            committed: false,
        })
    }

    /// Records a resource that is about to be created.
    fn record(&mut self, resource: Resource) -> Result<()> {
        self.state.resources.push(resource);
        self.state.save()
    }

    /// Records `resource`, then makes it with `make`. When `make` finds the name taken (someone
    /// else got there between our check and now), the record goes again: undoing it would
    /// remove what is not ours.
    fn create<T>(&mut self, resource: Resource, make: impl FnOnce() -> Result<T>) -> Result<T> {
        self.record(resource)?;
        make().inspect_err(|e| {
            let taken = e.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::AlreadyExists)
            });
            if taken {
                self.state.resources.pop();
                let _ = self.state.save();
            }
        })
    }

    /// Drops the newest record: its resource was never made.
    fn forget_last(&mut self) -> Result<()> {
        self.state.resources.pop();
        self.state.save()
    }

    /// Notes the WireGuard link's index, and whether it now lives in the namespace.
    fn link_at(&mut self, new_index: u32, in_namespace: bool) -> Result<()> {
        for resource in &mut self.state.resources {
            if let Resource::Link { moved, index, .. } = resource {
                *moved = in_namespace;
                *index = Some(new_index);
            }
        }
        self.state.save()
    }

    /// Notes what the daemon runs now that it has started (a wrapper may have become
    /// another program).
    fn daemon_runs(&mut self, executable: std::path::PathBuf) -> Result<()> {
        for resource in &mut self.state.resources {
            if let Resource::Daemon { executables, .. } = resource
                && !executables.contains(&executable)
            {
                executables.push(executable.clone());
            }
        }
        self.state.save()
    }

    fn commit(mut self) -> Result<()> {
        self.state.phase = Phase::Up;
        self.state.save()?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = self.state.teardown()
        {
            eprintln!("warning: rollback left something behind: {e:#}");
        }
    }
}

fn run_step<T>(index: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let name = STEPS[index];
    pause_before(name);
    f().map_err(|e| anyhow!("step {}/{} ({name}): {e:#}", index + 1, STEPS.len()))
}

/// Builds the namespace described by `config`.
pub fn up(config: &Config, config_path: Option<&Path>) -> Result<()> {
    up_inner(config, config_path).map_err(|e| anyhow!("up: {e:#}"))
}

fn up_inner(config: &Config, config_path: Option<&Path>) -> Result<()> {
    let ns = config.namespace.as_str();
    let prepared = wireguard::prepare(config)?;
    let rendered = render::render(config)?;
    for warning in config.warnings.iter().chain(&prepared.warnings) {
        eprintln!("warning: {warning}");
    }
    for (i, port) in config.publish_ports.iter().enumerate() {
        if !port.host_address.is_loopback() {
            eprintln!(
                "warning: publishPorts[{i}].hostAddress {} is not a loopback address: every connection arrives inside from 127.0.0.1, so a service there that trusts localhost trusts everyone who reaches {}",
                port.host_address, port.host_address
            );
        }
    }

    let lock = match Lock::try_acquire(ns) {
        Ok(lock) => lock,
        Err(LockError::Busy) => {
            bail!("another wg-namespace is working on namespace {ns:?} right now")
        }
        Err(LockError::Other(e)) => return Err(e),
    };
    let result = build(config, config_path, &prepared, &rendered);
    if result.is_err() && State::load(ns).ok().flatten().is_none() {
        lock.remove();
    }
    result
}

fn build(
    config: &Config,
    config_path: Option<&Path>,
    prepared: &wireguard::Prepared,
    rendered: &render::Rendered,
) -> Result<()> {
    let ns = config.namespace.as_str();
    let interface = config.interface();

    if let Some(previous) = State::load(ns)? {
        if previous.phase == Phase::Up && previous.open_netns().is_some() {
            bail!("namespace {ns:?} is already up; run `wg-namespace down --namespace {ns}` first");
        }
        // An `up` that was killed, or a namespace removed behind our back: clear the rest.
        previous
            .teardown()
            .context("clearing what an interrupted earlier run left behind")?;
    }
    if netns::path(ns).exists() {
        bail!(
            "a network namespace named {ns:?} exists and was not made by wg-namespace; choose another namespace_name or remove it"
        );
    }
    let host = Netlink::here()?;
    if host.index_of(interface)?.is_some() {
        bail!(
            "a link named {interface:?} already exists in the host namespace; choose another namespace_name"
        );
    }

    let mut state = State::new(ns, config.dns_server);
    state.config_path =
        config_path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    state.dns_servers = config.dns_servers.clone();
    state.strict_dns = config.strict_dns;
    state.ipv6 = config.ipv6_enabled();
    state.peers = config
        .peers
        .iter()
        .map(|p| PeerRecord {
            public_key: p.public_key_text.clone(),
            endpoint: p.endpoint.as_ref().map(ToString::to_string),
            alternatives: p
                .alternatives
                .iter()
                .map(|a| ServerRecord {
                    public_key: a.public_key_text.clone(),
                    endpoint: a.endpoint.to_string(),
                })
                .collect(),
            failover: None,
        })
        .collect();
    state.publish_ports = config
        .publish_ports
        .iter()
        .map(|p| PublishRecord {
            protocol: p.protocol,
            host_address: p.host_address,
            host_port: p.host_port,
            namespace_port: p.namespace_port,
        })
        .collect();
    state.port_forwarding = config
        .port_forwarding
        .as_ref()
        .map(|f| PortForwardingRecord {
            gateway: f.gateway,
            protocols: f.protocols.clone(),
        });
    let mut build = Build::start(state)?;

    let (ns_fd, inner) = run_step(0, || {
        // Made first and named after its identity is on record, so that a record never
        // names a namespace without saying which one.
        let fd = netns::unshare_new()?;
        let id = netns::identity(&fd)?;
        build.create(
            Resource::Namespace {
                name: ns.into(),
                id,
            },
            || netns::attach(&fd, ns),
        )?;
        let inner = Netlink::inside(&fd)?;
        let lo = inner
            .index_of("lo")?
            .context("the new namespace has no loopback link")?;
        inner.set_up(lo)?;
        if !config.ipv6_enabled() {
            // Belt to the firewall's braces: no IPv6 addresses at all, not even link-local
            // ones on the WireGuard interface once it arrives.
            netns::within(&fd, netns::disable_ipv6)??;
        }
        // A new namespace lets no group use ICMP echo sockets; allow them as distributions do
        // on the host, so `ping` works for ordinary users inside.
        netns::within(&fd, || {
            netns::write_sysctl("net/ipv4/ping_group_range", "0 2147483647")
        })??;
        Ok((fd, inner))
    })?;

    run_step(1, || {
        build.record(Resource::EtcDir {
            path: dns::dir(ns),
            created_parent: dns::parent_missing(),
        })?;
        dns::install(ns, rendered)
    })?;

    run_step(2, || firewall::load(&ns_fd, &rendered.ruleset))?;

    let backend = run_step(3, || {
        let backend = create_interface(config, &host, &ns_fd, &mut build)?;
        match backend {
            // The kernel's configuration interface answers in the namespace the link is in.
            Backend::Kernel => netns::within(&ns_fd, || {
                wireguard::configure(interface, backend, prepared)
            })??,
            Backend::Userspace => wireguard::configure(interface, backend, prepared)?,
        }
        Ok(backend)
    })?;

    run_step(4, || {
        if backend == Backend::Userspace {
            // The daemon made its TUN link here, by name; it has to be moved in.
            let index = host
                .index_of(interface)?
                .context("the WireGuard link disappeared")?;
            host.move_to(index, &ns_fd)?;
            // Until the new index is on record, the one from the host stands: the kernel
            // keeps an index across a move when it is free in the new namespace, as in ours.
            build.link_at(index, true)?;
            // A daemon that opens its interface by name again after this point makes a twin
            // here, which would take part of the tunnel's traffic. Better no tunnel than that.
            if host.index_of(interface)?.is_some() {
                bail!(
                    "the WireGuard daemon made a second {interface} link in the host namespace \
                     after the first was moved; it must open all its queues at start"
                );
            }
        }
        let index = inner
            .index_of(interface)?
            .context("the WireGuard link did not arrive in the namespace")?;
        build.link_at(index, true)?;
        inner.add_addresses(index, &config.ips)?;
        if let Some(mtu) = config.mtu {
            inner.set_mtu(index, mtu)?;
        }
        inner.set_up(index)?;
        // Without an IPv6 address IPv6 is switched off inside, and the kernel refuses IPv6
        // routes; `::/0` in allowedIPs (common in providers' configs) then routes nothing.
        let prefixes: Vec<_> = config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .filter(|prefix| config.ipv6_enabled() || !prefix.is_ipv6())
            .collect();
        inner.add_routes(index, &prefixes)
    })?;

    run_step(5, || {
        for entry in relays::entries(config) {
            relays::start(&entry, ns, ns_fd.as_fd(), &mut |r| build.record(r))?;
        }
        Ok(())
    })?;

    run_step(6, || {
        build.state.backend = Some(backend);
        build.commit()
    })
}

/// Step 4: the WireGuard link, with its UDP socket in the host namespace. A kernel link is born
/// inside the namespace; a userspace daemon makes its link here and step 5 moves it in.
fn create_interface(
    config: &Config,
    host: &Netlink,
    ns_fd: &OwnedFd,
    build: &mut Build,
) -> Result<Backend> {
    use crate::config::BackendChoice;
    let interface = config.interface();
    let link = |born_inside: bool, link_kind| Resource::Link {
        name: interface.into(),
        namespace: config.namespace.clone(),
        moved: born_inside,
        index: None,
        link_kind,
    };
    if config.backend == BackendChoice::Userspace {
        // The daemon makes the link; the record covers it from the start.
        build.record(link(false, LinkKind::Tun))?;
    } else {
        let made = build.create(link(true, LinkKind::Wireguard), || {
            host.add_wireguard_in(interface, ns_fd)
                .map_err(anyhow::Error::from)
        });
        let error = match made {
            Ok(()) => {
                let index = Netlink::inside(ns_fd)?
                    .index_of(interface)?
                    .context("the WireGuard link vanished right after creation")?;
                build.link_at(index, true)?;
                return Ok(Backend::Kernel);
            }
            Err(e) => e,
        };
        let unsupported = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(wireguard::is_unsupported);
        match config.backend {
            BackendChoice::Auto if unsupported => {
                // The failed attempt made nothing; the userspace link gets its own record.
                build.forget_last()?;
                build.record(link(false, LinkKind::Tun))?;
            }
            _ if unsupported => {
                bail!(
                    "the kernel has no WireGuard support (backend \"kernel\" was asked for): {error}"
                )
            }
            _ => return Err(error.context("creating the WireGuard link")),
        }
    }
    // A daemon serving an interface of this name elsewhere (another namespace) holds the
    // socket: ours could not listen there, and nothing of ours may go to that one.
    if wireguard::socket_answers(interface) {
        bail!(
            "{} is served by a WireGuard daemon wg-namespace did not start (an interface named \
             {interface} elsewhere?); stop it or choose another namespace_name",
            wireguard::uapi_socket(interface).display()
        );
    }
    wireguard::remove_stale_socket(interface);
    let daemon = wireguard::spawn_daemon(&config.userspace_command, interface)?;
    let process = daemon.process;
    build.record(Resource::Daemon {
        process,
        executables: daemon.executables.clone(),
        interface: interface.into(),
    })?;
    daemon.release()?;
    wireguard::wait_for_daemon(process, &config.userspace_command, interface, host)?;
    if let Some(executable) = process.executable() {
        build.daemon_runs(executable)?;
    }
    let index = host
        .index_of(interface)?
        .context("the WireGuard daemon's link disappeared")?;
    build.link_at(index, false)?;
    Ok(Backend::Userspace)
}

/// Removes everything `up` recorded for `namespace`. Nothing recorded is success.
pub fn down(namespace: &str) -> Result<()> {
    let lock = Lock::acquire(namespace, DOWN_LOCK_TIMEOUT).map_err(|e| anyhow!("down: {e:#}"))?;
    let Some(state) = State::load(namespace)? else {
        lock.remove();
        return Ok(());
    };
    // What could not be undone stays on record for the next `down`; the lock file need not.
    let result = state.teardown().map_err(|e| anyhow!("down: {e:#}"));
    lock.remove();
    result
}
