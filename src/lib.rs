//! `wg-namespace`: puts a WireGuard interface into its own network namespace so that whatever
//! runs there reaches the world only through the VPN peer.
//!
//! Dependencies point one way: [`cli`] parses the command line and maps outcomes to [`exit`]
//! codes; [`commands`] (one file per subcommand) order the steps that [`system`] provides;
//! [`system`] acts through netlink, nft and the file system on a [`config`] that was validated
//! before anything was touched, using [`render`] for the files and ruleset.

pub mod cli;
pub mod commands;
pub mod config;
pub mod exit;
pub mod render;
pub mod system;
pub mod wgquick;
