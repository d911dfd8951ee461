//! What the helper does to the system: namespaces, links, the WireGuard device, the ruleset, the
//! namespace's files, processes, the state journal and the relays. Nothing here knows about the
//! command line or exit codes; errors go up as values.

pub mod dns;
pub mod files;
pub mod firewall;
pub mod forwarding;
pub mod link;
pub mod netns;
pub mod process;
pub mod relays;
pub mod state;
pub mod terminal;
pub mod uapi;
pub mod wireguard;
