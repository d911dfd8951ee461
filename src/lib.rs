//! `wg-namespace`: puts a WireGuard interface into its own network namespace so that whatever
//! runs there reaches the world only through the VPN peer.
//!
//! Data flows one way: [`config`] validates the JSON the NixOS module writes, [`setup`] builds
//! or removes the namespace through netlink, and [`cli`] maps outcomes to exit codes.

pub mod cli;
pub mod config;
pub mod demo;
pub mod dns;
pub mod exec;
pub mod firewall;
pub mod leaks;
pub mod link;
pub mod netns;
pub mod process;
pub mod publish;
pub mod refresh;
pub mod render;
pub mod setup;
pub mod state;
pub mod status;
pub mod wireguard;
