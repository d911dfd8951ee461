//! `render --out DIR`: the files `up` would install, for reading and for review.

use std::path::Path;

use anyhow::Result;

use crate::config::Config;
use crate::render::render;
use crate::system::files::{self, Dir};

/// Writes resolv.conf, nsswitch.conf, hosts and `<namespace>.nft` into `dir`, creating it when
/// missing. The directory and every directory above it must be the caller's or root's and
/// writable by no one else, and nothing is written through a symlink: run as root, this must
/// not become a way to write into someone else's files.
pub fn run(config: &Config, dir: &Path) -> Result<()> {
    let rendered = render(config)?;
    let dir = Dir::create(&files::absolute(dir)?, 0o755)?;
    for (name, text) in [
        ("resolv.conf".to_string(), &rendered.resolv_conf),
        ("nsswitch.conf".to_string(), &rendered.nsswitch_conf),
        ("hosts".to_string(), &rendered.hosts),
        (format!("{}.nft", config.namespace), &rendered.ruleset),
    ] {
        dir.write_atomically(&name, text.as_bytes(), 0o644)?;
    }
    Ok(())
}
