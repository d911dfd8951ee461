//! `import FILE`: a provider's wg-quick file as module options (or the helper's JSON), for
//! users who want everything declarative. Secrets are never printed: the private key and any
//! preshared keys become file-path placeholders.

use std::path::Path;

use crate::exit::{Failure, code};
use crate::wgquick;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Nix,
    Json,
}

/// Prints the options `file` stands for; warnings (ignored keys) go to stderr.
pub fn run(file: &Path, format: Format) -> Result<i32, Failure> {
    // Read as the caller: import changes nothing, so a user may convert a file of their own.
    let bad = |problem: String| Failure {
        code: code::USAGE,
        message: problem,
    };
    let read = crate::system::files::read_secret(file, "wg-quick file", wgquick::MAX_FILE_BYTES)
        .map_err(|e| bad(e.to_string()))?;
    let parsed = wgquick::parse(&read.bytes)
        .map_err(|e| bad(format!("{}:{}: {}", file.display(), e.line, e.problem)))?;
    for warning in read.warning.iter() {
        eprintln!("warning: {warning}");
    }
    for warning in &parsed.warnings {
        eprintln!(
            "warning: {}:{}",
            file.display(),
            warning.trim_start_matches("line ")
        );
    }
    match format {
        Format::Nix => print!("{}", wgquick::to_nix(&parsed)),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&wgquick::to_json(&parsed))
                .expect("a JSON value serializes")
        ),
    }
    Ok(code::OK)
}
