//! One file per subcommand. Commands order the steps that [`crate::system`] provides and turn
//! their outcome into what the user sees.

pub mod demo;
pub mod exec;
pub mod exec_service;
pub mod failover;
pub mod forward;
pub mod heal;
pub mod import;
pub mod leaks;
pub mod metrics;
pub mod refresh;
pub mod reload;
pub mod render;
pub mod serve;
pub mod status;
pub mod updown;
