//! `reload`: bring a namespace that is up to a new config in place. The namespace, its leak
//! guard and the processes inside stay; only what differs changes (see
//! [`crate::system::converge`]). Reloading the config that is applied changes nothing.

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::system::converge::{self, Mode};

/// Applies `config` to the running namespace `namespace` (the config's own by default).
pub fn run(config: &Config, config_path: &Path, namespace: Option<&str>) -> Result<()> {
    reload(config, config_path, namespace).context("reload")
}

fn reload(config: &Config, config_path: &Path, namespace: Option<&str>) -> Result<()> {
    let (mut session, desired, changes) =
        converge::prepare(namespace.unwrap_or(&config.namespace), config, Mode::Reload)?;
    session.apply(&desired, &changes)?;
    session.commit(&desired, Some(config_path), Mode::Reload, &changes)?;
    if changes.is_empty() {
        eprintln!(
            "reload: namespace {:?}: nothing to change",
            config.namespace
        );
    } else {
        eprintln!(
            "reload: namespace {:?}: {} change(s) made in place",
            config.namespace,
            changes.len()
        );
    }
    Ok(())
}
