//! `up` and `down`: the order of the steps, and rollback.
//!
//! Everything `up` can check without touching the system (config, key files, endpoint names,
//! templates, name clashes) is checked first. Then each step records its resource in the state
//! journal before making it; a failure anywhere drops the [`Build`], which undoes the journal
//! in reverse. The namespace and its firewall exist before the interface is moved in, so no
//! process inside ever sees the namespace without its ruleset.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::config::Config;
use crate::render;
use crate::system::link::Netlink;
use crate::system::relays;
use crate::system::state::{Journal, Lock, LockError, Phase, Resource, State};
use crate::system::wireguard;
use crate::system::{converge, dns, netns};

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

pub use crate::system::{PAUSE_ENV, PAUSE_SWITCH};

/// How long `down` waits for an `up` of the same namespace to finish.
const DOWN_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The journal of an `up` in progress; undoes everything recorded unless committed.
struct Build {
    journal: Journal,
    committed: bool,
}

impl std::ops::Deref for Build {
    type Target = Journal;
    fn deref(&self) -> &Journal {
        &self.journal
    }
}

impl std::ops::DerefMut for Build {
    fn deref_mut(&mut self) -> &mut Journal {
        &mut self.journal
    }
}

impl Build {
    /// Nothing goes on record before the first resource does: until then there is nothing to
    /// undo, and a write saved would be a sync to disk for nothing.
    fn start(state: State) -> Build {
        Build {
            journal: Journal { state },
            committed: false,
        }
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
    crate::system::pause_point(name);
    f().map_err(|e| anyhow!("step {}/{} ({name}): {e:#}", index + 1, STEPS.len()))
}

/// Builds the namespace described by `config`.
pub fn up(config: &Config, config_path: Option<&Path>) -> Result<()> {
    up_inner(config, config_path).map_err(|e| anyhow!("up: {e:#}"))
}

fn up_inner(config: &Config, config_path: Option<&Path>) -> Result<()> {
    let ns = config.namespace.as_str();
    let prepared = wireguard::prepare(config, wireguard::Unresolved::CacheOrFail)?;
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
    converge::record_config(&mut state, config);
    let mut build = Build::start(state);

    let (ns_fd, inner) = run_step(0, || {
        // Made first and named after its identity is on record, so that a record never
        // names a namespace without saying which one.
        let fd = netns::unshare_new()?;
        let id = netns::identity(&fd)?;
        crate::system::pause_point("namespace-unrecorded");
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

    // The ruleset's digest goes on record with the next resource; a teardown needs none.
    run_step(2, || {
        converge::load_ruleset(&ns_fd, rendered, &mut build.state)
    })?;

    let backend = run_step(3, || {
        let backend =
            converge::create_interface(config, config.backend, &host, &ns_fd, &mut build)?;
        converge::configure_device(interface, backend, &ns_fd, prepared)?;
        Ok(backend)
    })?;

    run_step(4, || {
        let index = converge::place_interface(
            interface, config.mtu, backend, &host, &ns_fd, &inner, &mut build,
        )?;
        inner.add_addresses(index, &config.ips)?;
        inner.add_routes(index, &converge::routes_for(config))
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

/// Removes everything `up` recorded for `namespace`. Nothing recorded is success.
pub fn down(namespace: &str) -> Result<()> {
    let lock = Lock::acquire(namespace, DOWN_LOCK_TIMEOUT).map_err(|e| anyhow!("down: {e:#}"))?;
    // What could not be read or undone stays on record for the next `down`; the lock file
    // need not.
    let result = match State::load(namespace) {
        Ok(Some(state)) => state.teardown().map_err(|e| anyhow!("down: {e:#}")),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    lock.remove();
    result
}
