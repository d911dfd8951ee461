//! Exit codes and the one-line failure every command ends with. Only the command line and the
//! commands use this module; [`crate::system`] reports typed errors and never picks a code.

use crate::config::ConfigError;

/// Exit codes. `status` adds its own verdict codes; `exec` returns the command's status.
pub mod code {
    pub const OK: i32 = 0;
    /// A run-time failure; whatever was already built has been removed again.
    pub const FAILURE: i32 = 1;
    /// Bad config or usage; nothing on the system was touched.
    pub const USAGE: i32 = 2;
    /// `status`: the namespace works but something needs attention.
    pub const DEGRADED: i32 = 3;
    /// `status`: the namespace cannot carry traffic (or is not up).
    pub const DOWN: i32 = 4;
    /// `reload`, `heal`: the change cannot be made in place (another namespace name or
    /// backend, or the namespace is not up any more); bring the namespace down and up again.
    /// Nothing was changed. The NixOS module turns this into a restart of the unit.
    pub const RESTART_NEEDED: i32 = 5;
}

/// An error on its way to the user: the one line to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure {
            code: code::USAGE,
            message: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: code::FAILURE,
            // `{:#}` joins the context chain on one line.
            message: format!("{e:#}"),
        }
    }
}

/// An error from a change in place: [`code::RESTART_NEEDED`] when the change needs a restart.
pub fn in_place(e: anyhow::Error) -> Failure {
    match crate::system::converge::restart_reason(&e) {
        Some(_) => Failure {
            code: code::RESTART_NEEDED,
            message: format!("{e:#}"),
        },
        None => e.into(),
    }
}
