//! `heal`: repair a namespace in place with the least invasive step that works. It never
//! deletes the namespace: it reloads a missing or altered ruleset, rewrites the namespace's
//! files, makes a WireGuard interface (and its daemon) that went missing again inside the
//! existing namespace, moves peers whose names now resolve elsewhere, and sends a datagram
//! through the tunnel to peers whose handshake is overdue. A name that does not resolve, or an
//! idle tunnel, is no reason to take anything down. Only when the namespace itself is gone or
//! a repair fails does it ask for a restart ([`crate::exit::code::RESTART_NEEDED`]).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};

use crate::config::Config;
use crate::system::converge::{self, Mode, NeedsRestart};
use crate::system::state::State;

/// The config file `namespace` was brought up or last reloaded with.
pub fn recorded_config(namespace: &str) -> Result<PathBuf> {
    let state = State::load(namespace)
        .context("heal")?
        .ok_or_else(|| NeedsRestart(format!("heal: namespace {namespace:?} is not up")))?;
    state.config_path.with_context(|| {
        format!("heal: namespace {namespace:?} has no config file on record; give --config")
    })
}

pub fn run(config: &Config) -> Result<()> {
    heal(config).context("heal")
}

fn heal(config: &Config) -> Result<()> {
    let (mut session, desired, changes) = converge::prepare(&config.namespace, config, Mode::Heal)?;
    let repaired = session.apply(&desired, &changes).and_then(|()| {
        if session.tunnel_present(config.interface()) {
            Ok(())
        } else {
            Err(anyhow!("the WireGuard interface is still missing"))
        }
    });
    if let Err(e) = repaired {
        return Err(anyhow::Error::new(NeedsRestart(format!(
            "cannot repair namespace {:?} in place ({e:#}); it needs a restart",
            config.namespace
        ))));
    }
    session.commit(&desired, None, Mode::Heal, &changes)?;
    if changes.is_empty() {
        eprintln!("heal: namespace {:?}: nothing to repair", config.namespace);
    }
    Ok(())
}
