//! The last good address of every endpoint given as a host name, kept across restarts so that
//! `up` (and `reload`, `heal`) can go on with it while the name does not resolve for a moment.
//!
//! One small JSON object per namespace, `"host:port" -> "address:port"`, in
//! `$STATE_DIRECTORY/endpoints.json` (systemd's `StateDirectory=`) or else
//! `/var/lib/wg-namespace/<ns>/endpoints.json`. Written by root only (directory 0700, file 0600,
//! through [`crate::system::files`]); read back as untrusted input: size-limited, every entry
//! checked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::system::files::Dir;

const DEFAULT_ROOT: &str = "/var/lib/wg-namespace";
const FILE: &str = "endpoints.json";
/// Far more than any real list of peers needs.
const MAX_SIZE: u64 = 64 * 1024;

/// The directory for `namespace`'s cache. systemd passes `STATE_DIRECTORY` (colon-separated
/// when a unit has several; the first is ours).
pub fn dir(namespace: &str) -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        Some(value) if !value.is_empty() => {
            let value = value.to_string_lossy().into_owned();
            PathBuf::from(value.split(':').next().unwrap_or_default())
        }
        _ => Path::new(DEFAULT_ROOT).join(namespace),
    }
}

pub type Cache = BTreeMap<String, SocketAddr>;

/// What is on record; nothing (and no error) when there is no file or it cannot be trusted.
pub fn load(namespace: &str) -> Cache {
    read(&dir(namespace)).unwrap_or_else(|e| {
        eprintln!("warning: ignoring the endpoint cache: {e:#}");
        Cache::new()
    })
}

fn read(path: &Path) -> Result<Cache> {
    let dir = match Dir::open(path) {
        Ok(dir) => dir,
        Err(e) if e.not_found() => return Ok(Cache::new()),
        Err(e) => return Err(e.into()),
    };
    let Some(bytes) = dir.read(FILE, MAX_SIZE)? else {
        return Ok(Cache::new());
    };
    let raw: BTreeMap<String, String> = serde_json::from_slice(&bytes)
        .with_context(|| format!("reading {}", path.join(FILE).display()))?;
    Ok(raw
        .into_iter()
        .filter_map(|(name, addr)| Some((name, addr.parse().ok()?)))
        .collect())
}

/// Records `resolved` (configured endpoint -> address) on top of what is there. Only writes
/// when something changed.
pub fn remember(namespace: &str, resolved: &[(String, SocketAddr)]) -> Result<()> {
    if resolved.is_empty() {
        return Ok(());
    }
    let mut cache = load(namespace);
    let before = cache.clone();
    cache.extend(resolved.iter().cloned());
    if cache == before {
        return Ok(());
    }
    let text: BTreeMap<&String, String> = cache.iter().map(|(k, v)| (k, v.to_string())).collect();
    // Root's own directories all the way (see files::Dir), the last one private.
    let dir = Dir::create(&dir(namespace), 0o700)?;
    dir.write_atomically(FILE, &serde_json::to_vec_pretty(&text)?, 0o600)?;
    Ok(())
}

/// What the running `refresh` learned about the names it keeps resolved: whether each
/// resolved at its latest try. `status` (and so the snapshot `refresh` itself serves) uses it
/// instead of asking DNS on every call, while the process that wrote it runs. In
/// `/run/wg-namespace/resolution/<ns>.json`, a directory no namespace name reaches; rewritten
/// only when an outcome changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Learned {
    pub namespace: String,
    pub process: crate::system::process::ProcessId,
    /// Configured endpoint (`host:port`) -> whether it resolved.
    pub resolves: BTreeMap<String, bool>,
}

const LEARNED_SUBDIR: &str = "resolution";

fn learned_dir_path() -> PathBuf {
    Path::new(crate::system::state::STATE_DIR).join(LEARNED_SUBDIR)
}

impl Learned {
    /// An empty record of this process for `namespace`.
    pub fn new(namespace: &str) -> Learned {
        Learned {
            namespace: namespace.to_string(),
            process: crate::system::process::ProcessId::current(),
            resolves: BTreeMap::new(),
        }
    }

    /// Notes whether `endpoint` resolved; the file is rewritten when that is news.
    pub fn note(&mut self, endpoint: &str, resolved: bool) {
        if self.resolves.insert(endpoint.to_string(), resolved) == Some(resolved) {
            return;
        }
        let saved = serde_json::to_vec_pretty(self)
            .map_err(anyhow::Error::from)
            .and_then(|text| {
                let dir = Dir::create(&learned_dir_path(), 0o755)?;
                Ok(dir.write_atomically_unsynced(
                    &format!("{}.json", self.namespace),
                    &text,
                    0o644,
                )?)
            });
        if let Err(e) = saved {
            eprintln!("refresh: cannot record whether {endpoint} resolves: {e:#}");
        }
    }

    /// Removes the record of `namespace` (it goes with the namespace); missing is fine.
    pub fn forget(namespace: &str) -> Result<()> {
        let Ok(dir) = Dir::open(&learned_dir_path()) else {
            return Ok(());
        };
        Ok(dir.remove_file(&format!("{namespace}.json"))?)
    }

    /// The record for `namespace`, when the process that wrote it still runs.
    pub fn load(namespace: &str) -> Option<Learned> {
        let dir = Dir::open(&learned_dir_path()).ok()?;
        let bytes = dir.read(&format!("{namespace}.json"), MAX_SIZE).ok()??;
        let learned: Learned = serde_json::from_slice(&bytes).ok()?;
        (learned.namespace == namespace && learned.process.is_alive()).then_some(learned)
    }
}
