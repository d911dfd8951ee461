//! Command line: the surface scripts, the NixOS module and the tests call. Every failure ends as
//! one `error: ...` line on stderr and an exit code from [`code`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::exit::{Failure, code};

#[derive(Parser, Debug)]
#[command(
    name = "wg-namespace",
    version,
    about = "Confine processes to a network namespace whose only way out is a WireGuard peer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file and exit: 0 when valid, 2 with one line naming the field otherwise.
    /// A configFile it names is read and checked too (so check needs the rights up has); key
    /// files are left to up.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write resolv.conf, nsswitch.conf, hosts and <namespace>.nft for a config into a directory.
    Render {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Build the namespace, its firewall and its WireGuard interface.
    Up {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Bring a namespace that is up to a new config in place: peers, addresses, routes, DNS
    /// files, the ruleset and published ports change; the namespace and the processes inside
    /// stay. Exit 5 when the change needs a restart (another namespace name or backend).
    Reload {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The running namespace to reload (default: the config's namespace_name).
        #[arg(long, value_name = "NAME")]
        namespace: Option<String>,
    },
    /// Repair a namespace in place with the least invasive step that works (ruleset, DNS
    /// files, the WireGuard interface and its daemon, endpoints, handshakes). Exit 5 when only
    /// a restart can help.
    Heal {
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "namespace",
            required_unless_present = "namespace"
        )]
        config: Option<PathBuf>,
        /// Heal with the config file the namespace was brought up (or last reloaded) with.
        #[arg(long, value_name = "NAME")]
        namespace: Option<String>,
    },
    /// Remove everything `up` made. Succeeds when nothing is up.
    Down {
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "namespace",
            required_unless_present = "namespace"
        )]
        config: Option<PathBuf>,
        #[arg(long, value_name = "NAME")]
        namespace: Option<String>,
    },
    /// Run a command inside the namespace with its resolv.conf and nsswitch.conf and without the
    /// host's nscd or resolver sockets.
    Exec {
        #[arg(long, value_name = "NAME")]
        namespace: String,
        /// Run the command as this user (name or numeric uid).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Show namespaces, interfaces, peers and a health verdict. Exit 0 healthy, 3 degraded, 4 down.
    Status {
        #[arg(long, value_name = "NAME")]
        namespace: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Keep peers' endpoint host names resolved: re-resolve every dynamicEndpointRefreshSeconds
    /// and at once when a handshake is overdue, updating the peer in place.
    Refresh {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Resolve and update once, then exit.
        #[arg(long)]
        once: bool,
        /// Members of this group (name or number) may read the namespace's status from its snapshot socket
        /// (/run/wg-namespace/companion/NAME.sock, what `serve` and `metrics` read); without it
        /// only root may.
        #[arg(long, value_name = "GROUP")]
        metrics_group: Option<String>,
    },
    /// Print every namespace's metrics once, in the Prometheus text format (for node_exporter's
    /// textfile collector). Reads the namespaces' companions; as root, a namespace whose
    /// companion does not answer is inspected directly.
    Metrics,
    /// Serve /metrics and the /v1/namespaces status documents over HTTP, unprivileged and
    /// read-only (also socket-activated: LISTEN_FDS).
    Serve {
        #[arg(long, value_name = "ADDRESS:PORT", default_value_t = std::net::SocketAddr::from(([127, 0, 0, 1], crate::commands::serve::DEFAULT_PORT)))]
        listen: std::net::SocketAddr,
        /// When socket-activated, exit after this many seconds without a connection.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        exit_when_idle: u64,
    },
    /// Keep the VPN provider's forwarded port (portForwarding) mapped over NAT-PMP from inside
    /// the namespace, open in its firewall, and handed to onPortChange. Runs until stopped.
    PortForward {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Probe a live namespace for leaks (DNS, IPv6, mDNS, stray interfaces) and print a verdict
    /// per probe. Exit 0 when every probe passes.
    CheckLeaks {
        #[arg(long, value_name = "NAME")]
        namespace: String,
    },
    /// Print the options a wg-quick .conf file (as VPN providers hand out) stands for, with the
    /// private key replaced by a privateKeyFile placeholder.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print a Nix attribute set for services.wireguard-namespace (the default).
        #[arg(long, conflicts_with = "json")]
        nix: bool,
        /// Print the helper's JSON config instead.
        #[arg(long)]
        json: bool,
    },
    /// Build a throwaway peer and a confined namespace, show traffic going only through the
    /// tunnel, and tear everything down again.
    Demo,
    /// Relay one publishPorts or hostServices entry (started by `up`; not for direct use).
    #[command(hide = true)]
    Relay {
        /// The namespace the relay serves (for `ps` and for people reading it).
        #[arg(long, value_name = "NAME")]
        namespace: String,
        /// The inherited listening socket.
        #[arg(long, value_name = "FD")]
        listen_fd: i32,
        #[arg(long, value_name = "tcp|udp")]
        protocol: String,
        /// Where every connection is relayed to, from the namespace the relay runs in.
        #[arg(long, value_name = "ADDRESS:PORT")]
        to: std::net::SocketAddr,
        #[arg(long, value_name = "SECONDS")]
        idle_timeout: u32,
        #[arg(long, value_name = "UID")]
        uid: u32,
        #[arg(long, value_name = "GID")]
        gid: u32,
        /// The inherited counters socket, bound but not listening.
        #[arg(long, value_name = "FD")]
        counters_fd: Option<i32>,
    },
    /// Report what a process inside sees (run through `exec` by `check-leaks`).
    #[command(hide = true)]
    ProbeInside,
    /// Serve `exec` for the users namespaces allow, on the socket the service manager passes
    /// (started by wg-namespace-exec.socket; not for direct use).
    #[command(hide = true)]
    ExecService {
        /// Exit after this long with no request and no command running.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        idle_seconds: u64,
    },
    /// Wait for the go-ahead on FD, then become COMMAND (how detached processes start).
    #[command(hide = true)]
    Gate {
        #[arg(long, value_name = "FD")]
        fd: i32,
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    code::OK
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    code::USAGE
                }
                // Like every other failure: one line.
                _ => {
                    let rendered = e.render().to_string();
                    let line = rendered
                        .lines()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("bad usage");
                    eprintln!("error: {} (see --help)", line.trim_start_matches("error: "));
                    code::USAGE
                }
            };
        }
    };
    match run(cli.command) {
        Ok(status) => status,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            failure.code
        }
    }
}

fn refuse_hook_as_relay_user(config: &Config) -> Result<(), Failure> {
    match crate::system::relays::hook_user_clash(config) {
        Some(clash) => Err(clash.into()),
        None => Ok(()),
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: code::USAGE,
        message: message.into(),
    }
}

fn namespace_arg(name: &str) -> Result<String, Failure> {
    crate::config::check_name(name).map_err(|p| usage(format!("--namespace: {p}")))?;
    Ok(name.to_string())
}

fn run(command: Command) -> Result<i32, Failure> {
    match command {
        Command::Check { config } => {
            for warning in Config::load(&config)?.warnings {
                eprintln!("warning: {warning}");
            }
            Ok(code::OK)
        }
        Command::Render { config, out } => {
            let config = Config::load(&config)?;
            crate::commands::render::run(&config, &out)?;
            Ok(code::OK)
        }
        Command::Up { config } => {
            let path = config;
            let config = Config::load(&path)?;
            refuse_hook_as_relay_user(&config)?;
            crate::commands::updown::up(&config, Some(&path))?;
            Ok(code::OK)
        }
        Command::Reload { config, namespace } => {
            let path = config;
            let config = Config::load(&path)?;
            refuse_hook_as_relay_user(&config)?;
            let namespace = namespace.as_deref().map(namespace_arg).transpose()?;
            crate::commands::reload::run(&config, &path, namespace.as_deref())
                .map_err(crate::exit::in_place)?;
            Ok(code::OK)
        }
        Command::Heal { config, namespace } => {
            let path = match (config, namespace) {
                (Some(path), _) => path,
                (None, Some(name)) => {
                    crate::commands::heal::recorded_config(&namespace_arg(&name)?)
                        .map_err(crate::exit::in_place)?
                }
                (None, None) => return Err(usage("heal needs --config or --namespace")),
            };
            let config = Config::load(&path)?;
            crate::commands::heal::run(&config).map_err(crate::exit::in_place)?;
            Ok(code::OK)
        }
        Command::Down { config, namespace } => {
            let namespace = match (config, namespace) {
                (Some(path), _) => Config::load(&path)?.namespace,
                (None, Some(name)) => namespace_arg(&name)?,
                (None, None) => return Err(usage("down needs --config or --namespace")),
            };
            crate::commands::updown::down(&namespace)?;
            Ok(code::OK)
        }
        Command::Exec {
            namespace,
            user,
            command,
        } => {
            let namespace = namespace_arg(&namespace)?;
            Ok(crate::commands::exec::run(
                &namespace,
                user.as_deref(),
                &command,
            )?)
        }
        Command::Status { namespace, json } => {
            let namespace = namespace.as_deref().map(namespace_arg).transpose()?;
            Ok(crate::commands::status::run(namespace.as_deref(), json)?)
        }
        Command::Refresh {
            config,
            once,
            metrics_group,
        } => {
            let config = Config::load(&config)?;
            let group = metrics_group
                .map(|name| match name.parse::<u32>() {
                    Ok(gid) => Ok(nix::unistd::Gid::from_raw(gid)),
                    Err(_) => match nix::unistd::Group::from_name(&name) {
                        Ok(Some(group)) => Ok(group.gid),
                        _ => Err(usage(format!(
                            "--metrics-group: no group {name:?} on this system"
                        ))),
                    },
                })
                .transpose()?;
            let access = crate::system::companion::Access { group };
            crate::commands::refresh::run(&config, once, access)?;
            Ok(code::OK)
        }
        Command::PortForward { config } => {
            let config = Config::load(&config)?;
            let Some(forwarding) = &config.port_forwarding else {
                return Err(usage("portForwarding: is not set in the config"));
            };
            // A hook that could never run is a config error, not something to retry forever.
            let user = &forwarding.on_port_change_user;
            let known = match user.parse::<u32>() {
                Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
                Err(_) => nix::unistd::User::from_name(user),
            };
            if forwarding.on_port_change.is_some() && !matches!(known, Ok(Some(_))) {
                return Err(usage(format!(
                    "portForwarding.onPortChangeUser: no user {user:?} on this system"
                )));
            }
            crate::commands::forward::run(&config)?;
            Ok(code::OK)
        }
        Command::Metrics => Ok(crate::commands::metrics::run()?),
        Command::Serve {
            listen,
            exit_when_idle,
        } => Ok(crate::commands::serve::run(
            listen,
            std::time::Duration::from_secs(exit_when_idle),
        )?),
        Command::CheckLeaks { namespace } => {
            let namespace = namespace_arg(&namespace)?;
            Ok(crate::commands::leaks::run(&namespace)?)
        }
        Command::Import { file, nix: _, json } => {
            use crate::commands::import::Format;
            let format = if json { Format::Json } else { Format::Nix };
            crate::commands::import::run(&file, format)
        }
        Command::Demo => {
            crate::commands::demo::run()?;
            Ok(code::OK)
        }
        Command::Relay {
            namespace,
            listen_fd,
            protocol,
            to,
            idle_timeout,
            uid,
            gid,
            counters_fd,
        } => {
            namespace_arg(&namespace)?;
            let protocol = match protocol.as_str() {
                "tcp" => crate::config::Protocol::Tcp,
                "udp" => crate::config::Protocol::Udp,
                other => return Err(usage(format!("--protocol: {other:?} is not tcp or udp"))),
            };
            crate::system::relays::serve(&crate::system::relays::RelayArgs {
                listen_fd,
                protocol,
                to,
                idle_timeout: std::time::Duration::from_secs(idle_timeout.into()),
                uid,
                gid,
                counters_fd,
            })?;
            Ok(code::FAILURE)
        }
        Command::ProbeInside => Ok(crate::commands::leaks::probe_inside()),
        Command::ExecService { idle_seconds } => {
            crate::commands::exec_service::run(std::time::Duration::from_secs(idle_seconds))
        }
        Command::Gate { fd, command } => {
            crate::system::process::gate(fd, &command)?;
            Ok(code::FAILURE)
        }
    }
}
