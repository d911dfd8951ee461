//! What the helper does to the system: namespaces, links, the WireGuard device, the ruleset, the
//! namespace's files, processes, the state journal and the relays. Nothing here knows about the
//! command line or exit codes; errors go up as values.

pub mod companion;
pub mod converge;
pub mod dns;
pub mod endpoints;
pub mod exec_socket;
pub mod files;
pub mod firewall;
pub mod forwarding;
pub mod link;
pub mod listen;
pub mod netns;
pub mod nf_tables;
pub mod nft;
pub mod privileges;
pub mod process;
pub mod relays;
pub mod state;
pub mod stop;
pub mod terminal;
pub mod uapi;
pub mod wireguard;

/// Test-only: `up`, `reload` and `heal` stop themselves (SIGSTOP) just before the step or
/// change of this name, with everything earlier done and on record, so fault tests can kill
/// them at a precise point. Only debug builds (what `cargo test` builds) look at it: the
/// release binary the NixOS package ships has no such switch.
pub const PAUSE_ENV: &str = "WG_NAMESPACE_TEST_PAUSE_BEFORE";

/// Points inside `up`'s steps where [`PAUSE_ENV`] can stop it too: something exists that its
/// journal entry does not describe yet (an unnamed namespace, a daemon held at its gate, a
/// link moved while the record still places it on the host).
pub const INNER_PAUSES: [&str; 3] = [
    "namespace-unrecorded",
    "daemon-unrecorded",
    "move-unrecorded",
];

/// Whether this build stops at [`PAUSE_ENV`]'s points.
pub const PAUSE_SWITCH: bool = cfg!(debug_assertions);

/// Stops this process (SIGSTOP) when [`PAUSE_ENV`] names `point` and this is a debug build.
pub fn pause_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(PAUSE_ENV).as_deref() == Ok(point) {
        eprintln!("wg-namespace: paused before step {point}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
