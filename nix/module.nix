# NixOS module for wg-namespace.
#
# Each configured namespace becomes a JSON file in the Nix store (the helper's config schema,
# see src/config.rs) and a oneshot unit that runs `wg-namespace up` on it. Services are confined
# to a namespace with `systemd.services.<name>.wireguardNamespace`.
#
# The option sets below are let-bound attribute sets (peerOptions, publishPortOptions,
# namespaceOptions, ...) so that tests/nix_module.rs can find them with rnix: it compares their
# names with the helper's JSON keys and renders docs/options.md from them. Keep each option a
# plain `mkOption { ... }` with literal descriptions.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:

let
  inherit (lib)
    all
    any
    concatLists
    concatStringsSep
    filter
    filterAttrs
    groupBy
    imap0
    listToAttrs
    literalExpression
    literalMD
    mapAttrs'
    mapAttrsToList
    mkIf
    mkMerge
    mkOption
    nameValuePair
    optional
    types
    unique
    ;

  cfg = config.services.wireguard-namespace;

  # The namespace name is also the WireGuard interface name (at most 15 bytes), a path
  # component under /run/netns and /etc/netns, and part of systemd unit names. Same rule as
  # `check_name` in src/config.rs.
  validName = name: builtins.match "[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}" name != null;

  unitName = name: "wireguard-namespace-${name}";

  # Messages are written as indented strings and shown on one line.
  oneLine = text: lib.replaceStrings [ "\n" ] [ " " ] (lib.removeSuffix "\n" text);

  alternativeOptions = {
    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
      description = ''
        The public key of this server, base64-encoded as printed by `wg pubkey`. Required
        unless {option}`configFile` is set.
      '';
    };

    endpoint = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "se-sto-wg-002.example.net:51820";
      description = ''
        Where to reach this server, written like the peer's {option}`endpoint`. Host names are
        resolved in the host's network namespace when the server is switched to. Required
        unless {option}`configFile` is set.
      '';
    };

    presharedKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/wireguard-psk-2";
      description = ''
        Absolute path of a file holding the preshared key shared with this server, read when
        the server is switched to and never copied to the Nix store. `null` for none.
      '';
    };

    configFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/mullvad-se-sto-002.conf";
      description = ''
        Absolute path of a provider's wg-quick file for this server, read by the helper as root
        at run time (never copied to the Nix store), instead of {option}`publicKey`,
        {option}`endpoint` and {option}`presharedKeyFile`. Its one `[Peer]` gives the server's
        `PublicKey`, `Endpoint` and `PresharedKey`. Its `[Interface]` must not describe another
        end: an `Address` must equal the namespace's addresses, and a `PrivateKey` must equal
        the one the namespace's own `configFile` holds (it is ignored when the namespace uses
        `privateKeyFile`). Other lines (`AllowedIPs`, `DNS`, ...) are not used: the server stands
        in with the peer's settings.
      '';
    };
  };

  peerOptions = {
    publicKey = mkOption {
      type = types.str;
      example = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
      description = "The peer's public key, base64-encoded as printed by `wg pubkey`.";
    };

    presharedKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "rVXs/Ni9tu3oDBLS4hOyAUAa1qTWVA3loR8eL20os3I=";
      description = ''
        An optional base64 preshared key (from `wg genpsk`) shared with this peer. It mixes a
        symmetric secret into the handshake as a hedge against future attacks on its public-key
        cryptography.

        ::: {.warning}
        A key given here is written into the Nix store, which every local user can read. Prefer
        {option}`presharedKeyFile`.
        :::
      '';
    };

    presharedKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/wireguard-psk";
      description = ''
        Absolute path of a file holding the preshared key for this peer, as written by
        `wg genpsk`. The file is read when the namespace comes up and never copied to the Nix
        store. Mutually exclusive with {option}`presharedKey`.
      '';
    };

    allowedIPs = mkOption {
      type = types.listOf types.str;
      example = [
        "10.192.122.3/32"
        "10.192.124.1/24"
      ];
      description = ''
        Address ranges, IPv4 or IPv6 in CIDR notation, that this peer may send from and that
        traffic leaving the namespace is routed to through this peer. Use `0.0.0.0/0` (and
        `::/0` when {option}`ips` has an IPv6 address) to send everything through it. Must not be
        empty.
      '';
    };

    endpoint = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "demo.wireguard.io:12913";
      description = ''
        Where to reach the peer: `host:port`, where host is an IPv4 address or a host name, or
        `[address]:port` for IPv6. Host names are resolved in the host's network namespace when
        the namespace comes up; set {option}`dynamicEndpointRefreshSeconds` when the address
        behind the name can change. `null` for a peer that only ever connects to us.
      '';
    };

    dynamicEndpointRefreshSeconds = mkOption {
      type = types.int;
      default = 0;
      example = 300;
      description = ''
        Resolve the host name in {option}`endpoint` again every this many seconds (and whenever a
        handshake is overdue) and update the peer in place, for endpoints behind dynamic DNS.
        A companion unit `wireguard-namespace-<name>-refresh.service` does this while the
        namespace is up. `0` resolves the name only once, at start.
      '';
    };

    persistentKeepalive = mkOption {
      type = types.nullOr types.int;
      default = null;
      example = 25;
      description = ''
        Send an authenticated empty packet to the peer every this many seconds (1 to 65535) so
        that a NAT or stateful firewall between the two keeps the connection open even when
        nothing else is sent. `null` (or `0`) turns it off, which suits most setups; about `25`
        is a common value behind NAT.
      '';
    };

    alternatives = mkOption {
      type = types.nullOr (types.listOf (types.submodule { options = alternativeOptions; }));
      default = null;
      example = literalExpression ''
        [
          { publicKey = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw="; endpoint = "se-sto-wg-002.example.net:51820"; }
          { publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4="; endpoint = "185.213.154.68:51820"; }
        ]
      '';
      description = ''
        Other servers that stand in for this peer, in order, with its {option}`allowedIPs`,
        routes and {option}`persistentKeepalive`. When the server in use leaves what the tunnel
        sends unanswered for {option}`failoverAfterSeconds`, the companion unit
        `wireguard-namespace-<name>-refresh.service` puts the next one in its place in one
        change of the WireGuard device: the namespace, its firewall and the programs inside stay,
        and nothing leaves the namespace other than through the tunnel meanwhile. The order is
        the peer itself, its alternatives, then the peer itself again; a server that works is
        kept until it fails (no switching back while it answers), and `up` starts with the peer
        itself. When none answers, each round gives every server twice as long (up to
        10 minutes) and `wg-namespace status` reports the namespace as degraded. Requires
        {option}`endpoint`. `null` for none; an empty list is an error. A server can also be a
        provider's wg-quick file ({option}`configFile`), so that several of a provider's files
        become one namespace that fails over between them.
      '';
    };

    failoverAfterSeconds = mkOption {
      type = types.ints.between 5 4294967295;
      default = 30;
      example = 15;
      description = ''
        How long the server in use may leave what the tunnel sends unanswered before it is
        asked for a new handshake; when that goes unanswered for another 5 seconds, the next of
        {option}`alternatives` takes its place. A healthy server answers traffic within about
        10 seconds (WireGuard's passive keepalive), so values below 15 only cost extra
        handshakes on a tunnel with one-way traffic. Only used with {option}`alternatives`.
      '';
    };
  };

  # The relays' idle timeout and session cap, the same for both directions.
  idleTimeoutOption = mkOption {
    type = types.ints.between 1 86400;
    default = 300;
    example = 3600;
    description = ''
      A relayed TCP connection, or a UDP client, with nothing sent either way for this many
      seconds is closed (sooner when nothing was ever sent: a TCP connection after 10 s, a UDP
      client its service never answered after 5 s). Each entry relays at most 256 connections
      (or UDP clients) at once, at most 64 of them from one non-loopback source address; over a
      cap a new TCP connection is accepted and closed at once, and a new UDP client takes the
      place of the least recently active one (of its own source, when that source is at its cap).
    '';
  };

  publishPortOptions = {
    protocol = mkOption {
      type = types.enum [
        "tcp"
        "udp"
      ];
      default = "tcp";
      description = "Transport protocol of the published port.";
    };

    hostAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "192.168.1.10";
      description = ''
        Host address to listen on. The default keeps the port local to this machine; use an
        address of a LAN interface to offer it to other machines.

        ::: {.warning}
        Every relayed connection arrives inside the namespace from `127.0.0.1`, whoever made it.
        With a LAN address here, programs that trust localhost (Transmission's
        `rpc-whitelist`, say) trust every machine that can reach this address; the module
        warns about such entries. Protect the service with its own authentication.
        :::
      '';
    };

    hostPort = mkOption {
      type = types.ints.between 1 65535;
      example = 9091;
      description = "Port to listen on at {option}`hostAddress`.";
    };

    namespacePort = mkOption {
      type = types.nullOr (types.ints.between 1 65535);
      default = null;
      example = 8080;
      description = ''
        Port inside the namespace that connections are relayed to, on its loopback address.
        `null` means the same number as {option}`hostPort`.
      '';
    };

    idleTimeoutSeconds = idleTimeoutOption;
  };

  hostServiceOptions = {
    protocol = mkOption {
      type = types.enum [
        "tcp"
        "udp"
      ];
      default = "tcp";
      description = "Transport protocol of the host service.";
    };

    namespacePort = mkOption {
      type = types.nullOr (types.ints.between 1 65535);
      default = null;
      example = 5432;
      description = ''
        Port on the namespace's loopback address (`127.0.0.1`) where programs inside reach the
        host service. `null` means the same number as {option}`hostPort`.
      '';
    };

    hostAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "192.168.1.20";
      description = ''
        Address of the service, as seen from the host: the host's loopback for a service on
        this machine, or another machine's address. Connections to it are made in the host's
        network namespace, outside the tunnel.
      '';
    };

    hostPort = mkOption {
      type = types.ints.between 1 65535;
      example = 8096;
      description = "Port of the service at {option}`hostAddress`.";
    };

    idleTimeoutSeconds = idleTimeoutOption;
  };


  desktopEntryOptions = {
    name = mkOption {
      type = types.str;
      example = "Firefox (vpn)";
      description = ''
        The entry's name in the desktop's application menu.
      '';
    };

    command = mkOption {
      type = types.listOf types.str;
      example = [
        "firefox"
        "--no-remote"
        "-P"
        "vpn"
      ];
      description = ''
        The program and its arguments, run with `wg-namespace exec --namespace <name> --` by
        the user who picks the entry. Give a browser a profile of its own (`--no-remote -P`,
        `--user-data-dir=`), or it may open its window in an instance already running outside.
      '';
    };

    icon = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "firefox";
      description = ''
        Icon name (from the icon theme) or absolute path; null for none.
      '';
    };
  };

  portForwardingOptions = {
    gateway = mkOption {
      type = types.str;
      example = "10.2.0.1";
      description = ''
        IPv4 address of the provider's NAT-PMP gateway, reached through the tunnel. For ProtonVPN
        it is `10.2.0.1`, its DNS server and gateway.
      '';
    };

    protocols = mkOption {
      type = types.listOf (
        types.enum [
          "udp"
          "tcp"
        ]
      );
      default = [
        "udp"
        "tcp"
      ];
      example = [ "tcp" ];
      description = ''
        Protocols to map. ProtonVPN wants a UDP and a TCP mapping for the same port; the port of
        the first protocol is the one handed to {option}`onPortChange`.
      '';
    };

    lifetimeSeconds = mkOption {
      type = types.ints.between 4 4294967295;
      default = 60;
      example = 120;
      description = ''
        Lifetime asked for each mapping, in seconds. The gateway may grant less; the mapping is
        renewed at half of what it grants. ProtonVPN grants 60.
      '';
    };

    onPortChange = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression ''
        pkgs.writeShellScript "transmission-port" '''
          exec ''${pkgs.transmission_4}/bin/transmission-remote 127.0.0.1:9091 --port "$1"
        '''
      '';
      description = ''
        Program run inside the namespace, without a shell, each time the forwarded port changes
        (the first time included), with the port as its only argument and in the environment as
        `WG_NAMESPACE_FORWARDED_PORT` (also `WG_NAMESPACE_FORWARDED_UDP_PORT` and
        `WG_NAMESPACE_FORWARDED_TCP_PORT`). It runs once per change, beside the renewals (which
        do not wait for it); when it fails or takes longer than 60 seconds it is tried again, with
        a growing pause, until it succeeds. Every process it starts is killed when it exits or
        at that deadline (it runs as PID 1 of a PID namespace of its own).

        It runs in the sandbox of `wireguard-namespace-<name>-port-forward.service`: the file
        system is read-only but for a private `/tmp`, so hand the port over through the
        application's API; a program that wants it from a file can read
        `/run/wg-namespace/forwarding/<name>.json`.
      '';
    };

    onPortChangeUser = mkOption {
      type = types.str;
      default = "nobody";
      example = "transmission";
      description = ''
        User (name or uid) {option}`onPortChange` runs as. It needs no privileges, only what it
        takes to reach the application, for example a password file it can read. It may not be
        `wg-namespace`, the user the relays of publishPorts and hostServices run as: a process
        of their uid could stop them.
      '';
    };
  };

  # Shared by services.wireguard-namespace (nameDefault = "vpn", as in the seed) and every
  # services.wireguard-namespaces.<name> (nameDefault = the attribute name).
  namespaceOptions = nameDefault: {
    namespace_name = mkOption {
      type = types.str;
      default = nameDefault;
      example = "mullvad";
      description = ''
        Name of the network namespace (`/run/netns/<name>`), of the WireGuard interface inside it
        and of its unit `wireguard-namespace-<name>.service`. 1 to 15 bytes: letters, digits,
        `_`, `.` and `-`, starting with a letter, a digit or `_`. A name that would give that
        unit the name of another namespace's companion unit (`x-refresh`, `x-health` or
        `x-port-forward` next to a namespace `x` that has one) fails an assertion naming both.

        On `nixos-rebuild switch`, a change to any other option of the namespace is applied in
        place by `wg-namespace reload`: the namespace and the services confined to it keep
        running. Changing the name (or {option}`backend`) restarts the namespace, and the
        confined services with it.
      '';
    };

    dns_server = mkOption {
      type = types.str;
      example = "10.64.0.1";
      description = ''
        IP address of the DNS server that programs in the namespace use, usually one reached
        through the tunnel. It goes into the namespace's own `resolv.conf`, and with
        {option}`strictDns` the namespace's firewall lets DNS go to this address only.
        For {option}`services.wireguard-namespace`, defining this option (or
        {option}`configFile`) is what turns the namespace on. May be left undefined when
        {option}`configFile` has a `DNS` line.
      '';
    };

    dnsServers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "10.64.0.2"
        "fc00:bbbb:bbbb:bb01::1"
      ];
      description = ''
        Further DNS servers, IPv4 or IPv6, after {option}`dns_server`: all of them go into the
        namespace's `resolv.conf` in this order, and with {option}`strictDns` the firewall lets
        DNS go to exactly these and {option}`dns_server`. An IPv6 server needs an IPv6 address in
        {option}`ips`. The C library asks at most three servers in all; the helper warns about
        more.
      '';
    };

    configFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/agenix/mullvad-se1.conf";
      description = ''
        Absolute path of a WireGuard configuration in wg-quick format, as VPN providers hand
        them out (`[Interface]` with `PrivateKey`, `Address`, `DNS`, `MTU`; `[Peer]` sections
        with `PublicKey`, `PresharedKey`, `AllowedIPs`, `Endpoint`, `PersistentKeepalive`). It is
        read by root when the namespace comes up, with the same checks as a key file (owned by
        root, writable by nobody else), and never copied to the Nix store, so it can be a secret
        managed by agenix or sops-nix. Every option set here overrides the file's value for it:
        {option}`dns_server` and {option}`dnsServers` its `DNS`, {option}`ips` its `Address`,
        {option}`privateKeyFile` its `PrivateKey`, {option}`mtu` its `MTU`, and a non-empty
        {option}`peers` all of its `[Peer]` sections. `PreUp`, `PostUp`, `PreDown` and
        `PostDown` (shell commands run as root) make the file refused; `Table`, `FwMark`,
        `SaveConfig` and `ListenPort` are ignored with a warning. `wg-namespace import FILE`
        prints the options a file stands for, for a configuration without it.
      '';
    };

    mtu = mkOption {
      type = types.nullOr (types.ints.between 576 65456);
      default = null;
      example = 1320;
      description = ''
        MTU of the WireGuard interface, for providers that recommend one (a lower value helps on
        links that drop large packets). `null` keeps the `MTU` of {option}`configFile`, or else
        leaves the choice to the WireGuard backend.
      '';
    };

    extraFirewallRules = mkOption {
      type = types.str;
      default = "";
      example = ''
        add rule inet my_table my_input tcp dport 51413 accept comment "forwarded by the VPN"
      '';
      description = ''
        nftables rules, in `nft -f` syntax, loaded inside the namespace after the default
        ruleset. The default ruleset is the seed's table `inet my_table`, whose chains
        `my_input`, `my_forward` and `my_output` drop incoming connections and forwarding; rules
        here can add to those chains or bring tables of their own. A separate guard table still
        drops whatever would leave the namespace other than through the tunnel.
      '';
    };

    ips = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "10.2.0.2/32"
        "fd7d:76ee:e68f:a993::2/128"
      ];
      description = ''
        Addresses, in CIDR notation, of the WireGuard interface inside the namespace, as given by
        the VPN provider. IPv6 traffic is dropped unless one of them is an IPv6 address.
      '';
    };

    privateKeyFile = mkOption {
      type = types.nullOr types.str;
      example = "/run/agenix/wireguard-key";
      description = ''
        Absolute path of the file holding this end's private key, as written by `wg genkey`. It
        is read when the namespace comes up and never copied to the Nix store, so it can be a
        secret managed by agenix or sops-nix. May be left undefined when {option}`configFile`
        holds the private key.
      '';
    };

    peers = mkOption {
      type = types.listOf (types.submodule { options = peerOptions; });
      default = [ ];
      example = literalExpression ''
        [
          {
            publicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
            allowedIPs = [ "0.0.0.0/0" "::/0" ];
            endpoint = "vpn.example.com:51820";
          }
        ]
      '';
      description = "The WireGuard peers of the interface; usually one, the VPN server.";
    };

    backend = mkOption {
      type = types.enum [
        "auto"
        "kernel"
        "userspace"
      ];
      default = "auto";
      example = "userspace";
      description = ''
        Which WireGuard implementation carries the tunnel. `kernel` uses the Linux module,
        `userspace` runs {option}`userspaceCommand` (for kernels without WireGuard or for
        containers that cannot create the interface), and `auto` takes the kernel when it offers
        WireGuard and the userspace daemon otherwise. A change cannot be applied in place: it
        restarts the namespace.
      '';
    };

    userspaceCommand = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = literalExpression ''"''${pkgs.boringtun}/bin/boringtun-cli"'';
      description = ''
        Command that runs the userspace WireGuard daemon for the `userspace` and `auto` backends.
        The helper appends `-f <interface>`. `null` runs `wireguard-go` from nixpkgs, by its
        store path. A program given without a path is looked up in `PATH` by `up`; repairs
        (`heal`, `reload`) start the same file again, whatever `PATH` they run with.
      '';
    };

    strictDns = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether the namespace's firewall lets DNS (ports 53 and 853) go to
        {option}`dns_server` only. Turn it off when a program inside the namespace runs its own
        resolver that talks to other servers.
      '';
    };

    publishPorts = mkOption {
      type = types.listOf (types.submodule { options = publishPortOptions; });
      default = [ ];
      example = literalExpression ''
        [
          { hostPort = 9091; }
          { protocol = "udp"; hostAddress = "192.168.1.10"; hostPort = 5353; namespacePort = 53; }
        ]
      '';
      description = ''
        Ports of programs inside the namespace to make reachable on the host, for example a web
        interface. For each entry, the host listener is handed to a relay process that runs
        inside the namespace, as the unprivileged user `wg-namespace` (created by this module)
        without capabilities, and opens a new connection to `127.0.0.1` there for each one it
        accepts. No routing, forwarding or NAT joins the two, and the namespace still reaches
        the outside only through the tunnel. Every connection arrives inside from `127.0.0.1`.
      '';
    };

    hostServices = mkOption {
      type = types.listOf (types.submodule { options = hostServiceOptions; });
      default = [ ];
      example = literalExpression ''
        [
          { hostPort = 8096; }
          { namespacePort = 5432; hostAddress = "192.168.1.20"; hostPort = 5432; }
        ]
      '';
      description = ''
        Services in the host's network namespace that programs inside may reach, for example a
        media server or a database on this machine: each becomes reachable inside at
        `127.0.0.1:namespacePort`, and only that exact address and port of the host. A relay
        process in the host namespace, unprivileged and without capabilities, holds the listener
        inside and connects to {option}`hostAddress`:{option}`hostPort` for each connection. No
        route, forwarding or NAT joins host and namespace; the leak guard still drops everything
        else that would leave other than through the tunnel.
      '';
    };

    portForwarding = mkOption {
      type = types.nullOr (types.submodule { options = portForwardingOptions; });
      default = null;
      example = literalExpression ''
        {
          gateway = "10.2.0.1";
          onPortChange = pkgs.writeShellScript "transmission-port" '''
            exec ''${pkgs.transmission_4}/bin/transmission-remote 127.0.0.1:9091 --port "$1"
          ''';
        }
      '';
      description = ''
        A port forwarded by the VPN provider over NAT-PMP (RFC 6886), as ProtonVPN offers. A unit
        `wireguard-namespace-<name>-port-forward.service` asks for it from inside the namespace,
        so only through the tunnel; renews it; maps again when the gateway restarts or the tunnel
        changes; opens the port (and no other, and never one below 1024 or a publishPorts or
        hostServices namespacePort) in the namespace's firewall only while it is mapped; runs
        {option}`portForwarding.onPortChange` when it changes; and writes it, with
        its expiry, to `/run/wg-namespace/forwarding/<name>.json` for other units to read.
        `wg-namespace status` shows it too.
      '';
    };

    allowedUsers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "alice" ];
      description = ''
        Users who may run programs in this namespace as themselves, without sudo and without any
        setuid binary: `wg-namespace exec --namespace <name> -- firefox --no-remote -P vpn`.
        The command goes to a small root service on the socket
        `/run/wg-namespace/exec.sock` (socket-activated), which learns who asks from the
        socket's peer credentials only and runs the command as exactly that user (uid, primary
        group and supplementary groups from the user database) inside the namespace, with the
        namespace's `/etc` files, the host's resolver and session bus sockets hidden, the
        caller's standard descriptors and working directory, and a filtered environment (the
        display, sound and locale variables; never `LD_*`). Empty: nobody. Root needs no
        permission and cannot be listed.
      '';
    };

    allowedGroups = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "vpn-users" ];
      description = ''
        Groups whose members (primary or supplementary, as the user database says when the
        command is asked for) may run programs in this namespace like
        {option}`allowedUsers`. Empty: nobody.
      '';
    };

    desktopEntries = mkOption {
      type = types.attrsOf (types.submodule { options = desktopEntryOptions; });
      default = { };
      example = literalExpression ''
        {
          firefox = {
            name = "Firefox (vpn)";
            command = [ "firefox" "--no-remote" "-P" "vpn" ];
            icon = "firefox";
          };
        }
      '';
      description = ''
        Application menu entries that start a program in this namespace through
        `wg-namespace exec`, for the users {option}`allowedUsers` and {option}`allowedGroups`
        name (installed as `share/applications/wg-namespace-<name>-<entry>.desktop` in the
        system profile).
      '';
    };

    restartOnUnhealthy = {
      enable = mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = ''
          Whether to check the namespace periodically with `wg-namespace heal`, which repairs
          what went missing in place with the least invasive step (a missing or altered
          ruleset, the namespace's files, the WireGuard interface or its userspace daemon, a
          relay, an overdue handshake) and never takes the namespace down, so confined services
          keep running. Only when it cannot (the namespace itself is gone, a repair failed)
          is `wireguard-namespace-<name>.service` restarted, and the confined services with it.
          A passing DNS failure or an idle tunnel is never a reason for that. A namespace that
          was stopped on purpose is left alone; one whose unit failed is restarted.
        '';
      };

      interval = mkOption {
        type = types.str;
        default = "1min";
        example = "30s";
        description = ''
          How often to check, as a systemd time span (see {manpage}`systemd.time(7)`). The
          timer fires within a second of it (`AccuracySec=1s`, not systemd's default minute).
        '';
      };
    };
  };

  metricsOptions = {
    enable = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = ''
        Whether to serve every namespace's metrics (Prometheus text format at `/metrics`) and
        status (`/v1/namespaces`, with a health endpoint per namespace) over HTTP with
        `wg-namespace serve`. It is socket-activated (`wg-namespace-metrics.socket`): nothing runs
        until someone asks, and the server exits again after two idle minutes. It runs as a
        dynamic user with no capabilities and reads only what each namespace's
        `wireguard-namespace-<name>-refresh.service` answers on its socket in
        `/run/wg-namespace/companion`, which the group `wg-namespace-metrics` may read.
      '';
    };

    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        The address the metrics server listens on. The default is reachable from this machine
        only; an IPv6 address is given without brackets.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 9595;
      example = 9586;
      description = ''
        The TCP port the metrics server listens on (the WireGuard exporters use 9586).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = ''
        Whether to open {option}`services.wireguard-namespace.metrics.port` in the host's
        firewall (`networking.firewall.allowedTCPPorts`), for a Prometheus on another machine.
      '';
    };
  };

  packageOption = mkOption {
    type = types.package;
    default = pkgs.callPackage ./package.nix { };
    defaultText = literalMD "the `wg-namespace` package built from this flake's source";
    description = "The `wg-namespace` helper package used by every namespace.";
  };

  confinementOption = mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "vpn";
    description = ''
      Run this service inside the named WireGuard namespace (the value of one of the
      configured `namespace_name` options). The service then uses the namespace's network and
      its `resolv.conf` and `nsswitch.conf`, cannot reach the host's nscd or resolver sockets,
      is started together with `wireguard-namespace-<name>.service`, and is stopped and
      restarted with it, so it never runs without the tunnel.
    '';
  };

  # Every configured namespace with the option path it came from (for messages). The
  # seed-shaped one is active once its required dns_server, or a configFile, is defined.
  declared =
    optional (options.services.wireguard-namespace.dns_server.isDefined || cfg.configFile != null) {
      loc = "services.wireguard-namespace";
      ns = cfg;
    }
    ++ mapAttrsToList (attr: ns: {
      loc = "services.wireguard-namespaces.${attr}";
      inherit ns;
    }) config.services.wireguard-namespaces;

  declaredNames = unique (map (d: d.ns.namespace_name) declared);

  # Units are made for valid names only, and for the first of duplicates; the assertions
  # below report the others.
  namespaces = listToAttrs (
    map (d: {
      name = d.ns.namespace_name;
      value = d.ns;
    }) (filter (d: validName d.ns.namespace_name) declared)
  );

  # Where each of `namespaces` is configured, for messages.
  namespaceLocations = listToAttrs (
    map (d: {
      name = d.ns.namespace_name;
      value = d.loc;
    }) (filter (d: validName d.ns.namespace_name) declared)
  );

  # The JSON document for the helper: exactly the keys of NAMESPACE_KEYS, PEER_KEYS and
  # PUBLISH_KEYS, HOST_SERVICE_KEYS and FORWARDING_KEYS in src/config.rs (tests/nix_module.rs checks that).
  peerJson = peer: {
    inherit (peer)
      publicKey
      presharedKey
      presharedKeyFile
      allowedIPs
      endpoint
      dynamicEndpointRefreshSeconds
      persistentKeepalive
      failoverAfterSeconds
      ;
    alternatives =
      if peer.alternatives == null then null else map alternativeJson peer.alternatives;
  };

  alternativeJson = server: {
    inherit (server)
      publicKey
      endpoint
      presharedKeyFile
      configFile
      ;
  };

  publishPortJson = port: {
    inherit (port)
      protocol
      hostAddress
      hostPort
      namespacePort
      idleTimeoutSeconds
      ;
  };

  hostServiceJson = service: {
    inherit (service)
      protocol
      namespacePort
      hostAddress
      hostPort
      idleTimeoutSeconds
      ;
  };

  # dns_server and privateKeyFile keep the seed's types, with no default; with a configFile
  # they may be left undefined (the file has them), and are written as null then. Reading an
  # undefined option throws, which is what tryEval catches.
  orFromFile =
    ns: value:
    if ns.configFile == null then
      value
    else
      let
        tried = builtins.tryEval value;
      in
      if tried.success then tried.value else null;
  portForwardingJson = forwarding: {
    inherit (forwarding)
      gateway
      protocols
      lifetimeSeconds
      onPortChange
      onPortChangeUser
      ;
  };

  namespaceJson = ns: {
    inherit (ns)
      namespace_name
      dnsServers
      extraFirewallRules
      ips
      backend
      strictDns
      configFile
      mtu
      allowedUsers
      allowedGroups
      ;
    # By its store path: `heal` from the health unit or a root shell starts the daemon again
    # whatever PATH it has.
    userspaceCommand =
      if usesWireguardGo ns then "${pkgs.wireguard-go}/bin/wireguard-go" else ns.userspaceCommand;
    dns_server = orFromFile ns ns.dns_server;
    privateKeyFile = orFromFile ns ns.privateKeyFile;
    peers = map peerJson ns.peers;
    publishPorts = map publishPortJson ns.publishPorts;
    hostServices = map hostServiceJson ns.hostServices;
    portForwarding =
      if ns.portForwarding == null then null else portForwardingJson ns.portForwarding;
  };

  jsonDocument =
    ns:
    pkgs.writeText "wg-namespace-${ns.namespace_name}.json" (builtins.toJSON (namespaceJson ns));

  helper = "${cfg.package}/bin/wg-namespace";

  # One argument of a desktop entry's Exec key: quoted when it holds anything but plain
  # characters, with the Desktop Entry Specification's escapes inside quotes (\ " \` \$),
  # each backslash doubled again for the string level beneath; % doubled.
  desktopArgument =
    arg:
    let
      escaped = lib.replaceStrings [ "%" ] [ "%%" ] arg;
      plain = builtins.match "[A-Za-z0-9_./:=+,@-]+" arg != null;
    in
    if plain then
      escaped
    else
      "\"" + lib.replaceStrings [ "\\" "\"" "`" "$" ] [ "\\\\\\\\" "\\\\\"" "\\\\`" "\\\\$" ] escaped + "\"";

  desktopEntry =
    ns: entry: e:
    pkgs.writeTextFile {
      name = "wg-namespace-${ns.namespace_name}-${entry}.desktop";
      destination = "/share/applications/wg-namespace-${ns.namespace_name}-${entry}.desktop";
      text = ''
        [Desktop Entry]
        Type=Application
        Name=${e.name}
        Exec=${
          concatStringsSep " " (
            map desktopArgument (
              [
                helper
                "exec"
                "--namespace"
                ns.namespace_name
                "--"
              ]
              ++ e.command
            )
          )
        }
      ''
      + lib.optionalString (e.icon != null) "Icon=${e.icon}\n";
    };

  # Where a namespace's JSON document is found at run time. The path stays the same when the
  # config changes, so the unit text does not, and `nixos-rebuild switch` reloads instead of
  # restarting (the document's store path is in reloadTriggers). The activation script updates
  # /etc before switch-to-configuration reloads units, so the reload reads the new document.
  stableDocument = name: "/etc/wg-namespace/${name}.json";

  # Exit status of `reload` and `heal` when only a restart can apply the change or repair the
  # namespace (code::RESTART_NEEDED in src/exit.rs).
  restartNeeded = 5;

  # On the PATH NixOS gives every unit.
  systemctl = "systemctl";

  # `reload` of the running namespace; one it cannot make in place becomes a restart (queued
  # after this reload job: systemd merges it and runs the restart next).
  reloadScript =
    name:
    pkgs.writeShellScript "wg-namespace-${name}-reload" ''
      code=0
      ${helper} reload --namespace ${name} --config ${stableDocument name} || code=$?
      if [ "$code" = ${toString restartNeeded} ]; then
        echo "the change to namespace ${name} needs a restart; restarting ${unitName name}.service"
        exec ${systemctl} restart --no-block ${unitName name}.service
      fi
      exit "$code"
    '';

  # The userspace daemon, when it may be needed and no other command is configured.
  usesWireguardGo = ns: ns.backend != "kernel" && ns.userspaceCommand == null;

  mainUnit = name: ns: {
    description = "WireGuard network namespace ${name}";
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    wantedBy = [ "multi-user.target" ];
    path = [ pkgs.nftables ];
    # A changed document is applied in place by ExecReload: the namespace, and the services
    # confined to it, keep running. What cannot change in place stays in the unit's text, so
    # that changing it restarts: the name (in the unit's name and paths) and the backend.
    restartIfChanged = true;
    reloadTriggers = [ (jsonDocument ns) ];
    unitConfig.X-WireguardNamespaceBackend = ns.backend;
    # Keep retrying while the network (or the endpoint's DNS) is not there yet at boot.
    startLimitIntervalSec = 0;
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStart = "${helper} up --config ${stableDocument name}";
      ExecReload = reloadScript name;
      ExecStop = "${helper} down --namespace ${name}";
      # Also after an `up` killed half-way (timeout): `down` does nothing when nothing is up.
      ExecStopPost = "${helper} down --namespace ${name}";
      Restart = "on-failure";
      RestartSec = "10s";
      # Exit status 2 is a bad config: retrying cannot help.
      RestartPreventExitStatus = 2;
      TimeoutStartSec = "2min";
      # The userspace daemon and the port relay outlive `up` in this cgroup; stop kills them.
      KillMode = "control-group";
      # The last good address of each endpoint name (endpoints.json), kept across restarts
      # and reboots: `up` goes on with it when a name does not resolve at that moment.
      StateDirectory = "wg-namespace/${name}";
      StateDirectoryMode = "0700";
    }
    # No setting that gives the unit a mount namespace of its own (ProtectSystem, PrivateTmp,
    # ReadWritePaths, ...): the /run/netns/<name> mount `up` makes must be seen by the host and
    # by every unit that joins the namespace. What needs no mount namespace still applies, and
    # to the userspace daemon and the relays started here too.
    // unitHardening
    // {
      CapabilityBoundingSet = repairCapabilities;
      DeviceAllow = [ "/dev/net/tun rw" ];
      DevicePolicy = "closed";
    };
  };

  # Sandboxing that suits every unit running the helper as root, the namespace's own included:
  # none of it needs a mount namespace, so mounts made under it stay visible to the host.
  unitHardening = {
    # Nothing these units start gains privileges through a setuid or file-capability program.
    NoNewPrivileges = true;
    # Netlink (links, routes, WireGuard, nftables), UDP to the servers and the gateway, TCP
    # and UDP for the relays, Unix sockets (userspace daemon, name service, systemctl).
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_NETLINK"
      "AF_INET"
      "AF_INET6"
    ];
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    # No clock setting, debugging (ptrace, reading other processes' memory), kernel modules,
    # raw I/O, reboot or swap.
    SystemCallFilter = [
      "~@clock @cpu-emulation @debug @module @obsolete @raw-io @reboot @swap"
      "~process_vm_readv process_vm_writev"
    ];
  };

  # What making, repairing and taking down a namespace takes: entering and making network
  # namespaces and mounting them (CAP_SYS_ADMIN), links, addresses, routes, WireGuard and
  # nftables (CAP_NET_ADMIN), binding a published port below 1024 (CAP_NET_BIND_SERVICE),
  # starting the relays as their own user with an empty bounding set (CAP_SETUID, CAP_SETGID,
  # CAP_SETPCAP), ending recorded processes after checking what they run in /proc (CAP_KILL,
  # CAP_SYS_PTRACE for the read access; ptrace itself is refused by the system call filter),
  # and reading key files whoever owns them (CAP_DAC_READ_SEARCH).
  repairCapabilities = [
    "CAP_NET_ADMIN"
    "CAP_SYS_ADMIN"
    "CAP_NET_BIND_SERVICE"
    "CAP_SETUID"
    "CAP_SETGID"
    "CAP_SETPCAP"
    "CAP_KILL"
    "CAP_SYS_PTRACE"
    "CAP_DAC_READ_SEARCH"
  ];

  # The companion units (refresh, port-forward, health) never make the namespace's mount, so
  # each has a mount namespace of its own: the file system is read-only but for the paths each
  # writes (ReadWritePaths, per unit), home directories too (key files may live there), /tmp
  # is private, and the kernel's modules, logs and control groups are out of reach.
  companionSandbox = unitHardening // {
    ProtectSystem = "strict";
    ProtectHome = "read-only";
    PrivateTmp = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
  };

  # A long-running companion of the namespace's unit: started with it, stopped and restarted
  # with it.
  boundToNamespace = name: {
    bindsTo = [ "${unitName name}.service" ];
    partOf = [ "${unitName name}.service" ];
    after = [ "${unitName name}.service" ];
    wantedBy = [ "${unitName name}.service" ];
  };

  # The group whose members may read the namespaces' status from refresh's snapshot sockets.
  metricsGroup = "wg-namespace-metrics";

  refreshUnit = name: ns: boundToNamespace name // {
    description = "Keep WireGuard peers of namespace ${name} reachable, answer its status socket";
    serviceConfig = {
      ExecStart =
        "${helper} refresh --config ${jsonDocument ns}"
        + lib.optionalString cfg.metrics.enable " --metrics-group ${metricsGroup}";
      Restart = "always";
      RestartSec = "10s";
    }
    // companionSandbox
    // {
      # Enters the namespace (setns) and changes the WireGuard device in it (netlink); reads
      # the recorded daemon's /proc entries (ptrace read access: the daemon may hold
      # capabilities this unit has not; ptrace itself is refused by the system call filter);
      # reads key files of the alternatives it switches to, whoever owns them; gives its status
      # socket to the metrics group (CAP_CHOWN, which reaches only the paths below: the rest of
      # the file system is read-only here).
      CapabilityBoundingSet = [
        "CAP_NET_ADMIN"
        "CAP_SYS_ADMIN"
        "CAP_SYS_PTRACE"
        "CAP_DAC_READ_SEARCH"
        "CAP_CHOWN"
      ];
      # The state file (and its lock and snapshot socket) and the endpoint cache.
      ReadWritePaths = [
        "-/run/wg-namespace"
        "-/var/lib/wg-namespace/${name}"
      ];
      # Only the helper runs here: no device, no sysctl, no writable executable memory.
      PrivateDevices = true;
      ProtectKernelTunables = true;
      MemoryDenyWriteExecute = true;
      RestrictNamespaces = "net";
    };
  };

  # Its own unit rather than part of `refresh`: it lives inside the namespace (refresh works in
  # the host's), runs whenever port forwarding is on, and fails and restarts on its own.
  portForwardUnit = name: ns: boundToNamespace name // {
    description = "Forwarded port (NAT-PMP) of WireGuard namespace ${name}";
    path = [ pkgs.nftables ];
    serviceConfig = {
      ExecStart = "${helper} port-forward --config ${jsonDocument ns}";
      Restart = "always";
      RestartSec = "10s";
    }
    // companionSandbox
    // {
      # As refresh (setns, the forwarded port in the namespace's firewall), plus what
      # `exec --user` needs to run onPortChange: a mount namespace for the namespace's /etc
      # files, becoming the hook's user (CAP_SETUID/SETGID; CAP_SETPCAP to empty its bounding
      # set) and ending the hook's processes, which run as another user (CAP_KILL); and a PID
      # namespace per run of the hook, so that all it started dies with it.
      CapabilityBoundingSet = [
        "CAP_NET_ADMIN"
        "CAP_SYS_ADMIN"
        "CAP_SYS_PTRACE"
        "CAP_DAC_READ_SEARCH"
        "CAP_SETUID"
        "CAP_SETGID"
        "CAP_SETPCAP"
        "CAP_KILL"
      ];
      # The forwarding record (/run/wg-namespace/forwarding). The hook inherits this sandbox:
      # it writes nowhere but its private /tmp.
      ReadWritePaths = [ "-/run/wg-namespace" ];
      PrivateDevices = true;
      ProtectKernelTunables = true;
      RestrictNamespaces = "net mnt pid";
      # No MemoryDenyWriteExecute: the hook may be any program, a JIT-compiled one too.
    };
  };

  healthUnit = name: {
    description = "Heal WireGuard namespace ${name} in place when something is missing";
    after = [ "${unitName name}.service" ];
    serviceConfig = {
      Type = "oneshot";
      # A check that hangs must not keep the timer from firing again.
      TimeoutStartSec = "1min";
      # What heal starts again (the userspace daemon, a relay) must outlive the check: with
      # the default, systemd would kill it as soon as this oneshot ends. `down` (the
      # namespace's ExecStop) ends it by its recorded identity, wherever it runs.
      KillMode = "process";
    }
    // companionSandbox
    // {
      # What `up` needs, but for making the namespace (heal never does): see
      # repairCapabilities.
      CapabilityBoundingSet = repairCapabilities;
      # The state file, the endpoint cache, the namespace's /etc files and the userspace
      # daemon's configuration socket.
      ReadWritePaths = [
        "-/run/wg-namespace"
        "-/var/lib/wg-namespace/${name}"
        "-/etc/netns"
        "-/run/wireguard"
      ];
      # Only TUN, for a userspace daemon heal starts again. /proc/sys stays writable: IPv6 is
      # turned off inside the namespace through it. No MemoryDenyWriteExecute: that daemon is
      # the configured userspaceCommand, whatever program it is.
      DeviceAllow = [ "/dev/net/tun rw" ];
      DevicePolicy = "closed";
      RestrictNamespaces = "net";
    };
    # `heal` repairs what it finds missing with the least invasive step (the ruleset, the
    # namespace's files, the WireGuard interface or its daemon, a relay, a handshake) and
    # never takes the namespace down; confined services keep running. Only when it cannot
    # (the namespace is gone, a repair failed) is the unit restarted, and they with it.
    script = ''
      unit=${unitName name}.service
      state=$(${systemctl} is-active "$unit" || true)
      case "$state" in
        active) ;;
        failed)
          echo "$unit has failed; restarting it"
          exec ${systemctl} restart --no-block "$unit"
          ;;
        *)
          echo "$unit is $state; leaving it alone"
          exit 0
          ;;
      esac
      code=0
      ${helper} heal --config ${stableDocument name} || code=$?
      if [ "$code" = ${toString restartNeeded} ]; then
        echo "namespace ${name} cannot be healed in place; restarting $unit"
        exec ${systemctl} restart --no-block "$unit"
      fi
      exit "$code"
    '';
  };

  healthTimer = ns: {
    description = "Check WireGuard namespace ${ns.namespace_name} periodically";
    wantedBy = [ "timers.target" ];
    timerConfig = {
      OnBootSec = ns.restartOnUnhealthy.interval;
      OnUnitActiveSec = ns.restartOnUnhealthy.interval;
      # systemd's default (1min) let a 20s interval fire anywhere from 20 to 80 s apart
      # (seen under systemd-vm): a missing interface stayed missing that long.
      AccuracySec = "1s";
    };
  };

  # Every namespace runs refresh: it handshakes anew when the host's routes or addresses change
  # and after resume from sleep (for peers with endpoints), and it answers the namespace's
  # status socket, which the metrics server reads.

  # Each with what it is, for the message when two would get the same name.
  serviceUnits = concatLists (
    mapAttrsToList (
      name: ns:
      let
        of = what: "the ${what} of namespace \"${name}\" (${namespaceLocations.${name}})";
      in
      [
        {
          name = unitName name;
          value = mainUnit name ns;
          role = of "main unit";
        }
        {
          name = "${unitName name}-refresh";
          value = refreshUnit name ns;
          role = of "refresh unit";
        }
      ]
      ++ optional (ns.portForwarding != null) {
        name = "${unitName name}-port-forward";
        value = portForwardUnit name ns;
        role = of "port-forward unit";
      }
      ++ optional ns.restartOnUnhealthy.enable {
        name = "${unitName name}-health";
        value = healthUnit name;
        role = of "health unit";
      }
    ) namespaces
  );

  # A namespace named like another's companion unit ("x-refresh" next to "x") would share that
  # unit's name, and listToAttrs would keep one of the two without a word.
  unitClashAssertions = mapAttrsToList (unit: units: {
    assertion = builtins.length units == 1;
    message = oneLine ''
      systemd unit ${unit}.service would be both ${concatStringsSep " and " (map (u: u.role) units)};
      only one of them would exist. Give one of these namespaces another namespace_name, for
      example with '_' where the name has '-'.'';
  }) (groupBy (u: u.name) serviceUnits);

  metricsListen =
    let
      m = cfg.metrics;
      host = if lib.hasInfix ":" m.listenAddress then "[${m.listenAddress}]" else m.listenAddress;
    in
    "${host}:${toString m.port}";

  # Socket-activated: systemd holds the listening socket and starts the server on the first
  # connection; the server exits after two idle minutes.
  metricsSocket = {
    description = "wg-namespace metrics and status (HTTP)";
    wantedBy = [ "sockets.target" ];
    listenStreams = [ metricsListen ];
    # Connections are accepted on this unit's socket: the filter must be here too.
    socketConfig = metricsAddressFilter;
  };

  # Bound to a loopback address, it answers this machine only, whatever the firewall says.
  metricsAddressFilter = lib.optionalAttrs (isLoopback cfg.metrics.listenAddress) {
    IPAddressDeny = "any";
    IPAddressAllow = "localhost";
  };

  metricsService = {
    description = "wg-namespace metrics and status (HTTP), read from the namespaces' companions";
    requires = [ "wg-namespace-metrics.socket" ];
    after = [ "wg-namespace-metrics.socket" ];
    serviceConfig = {
      ExecStart = "${helper} serve --exit-when-idle 120";
      # Unprivileged and read-only: everything it shows comes from the refresh units' sockets,
      # which this group may read.
      DynamicUser = true;
      # Not the unit's name, which the dynamic user would take by default: a group of that name
      # (metricsGroup) exists already, and systemd refuses a dynamic user whose group name is
      # taken ("User or group with specified name already exists", seen under systemd 252).
      User = "wg-namespace-serve";
      SupplementaryGroups = [ metricsGroup ];
      CapabilityBoundingSet = "";
      AmbientCapabilities = "";
      NoNewPrivileges = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      PrivateDevices = true;
      PrivateIPC = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectClock = true;
      ProtectHostname = true;
      ProtectProc = "invisible";
      ProcSubset = "pid";
      RestrictAddressFamilies = [
        "AF_UNIX"
        "AF_INET"
        "AF_INET6"
      ];
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      RemoveIPC = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = true;
      SystemCallArchitectures = "native";
      SystemCallFilter = [
        "@system-service"
        "~@privileged"
      ];
      UMask = "0077";
    }
    // metricsAddressFilter;
  };

  timerUnits = mapAttrsToList (name: ns: {
    name = "${unitName name}-health";
    value = healthTimer ns;
  }) (filterAttrs (_: ns: ns.restartOnUnhealthy.enable) namespaces);

  # What `wireguardNamespace = name` adds to a service. Derived from the name alone, so that
  # it does not depend on the rest of the configuration.
  confinement =
    name:
    let
      unit = "${unitName name}.service";
    in
    {
      bindsTo = [ unit ];
      after = [ unit ];
      partOf = [ unit ];
      serviceConfig = {
        NetworkNamespacePath = "/run/netns/${name}";
        BindReadOnlyPaths = [
          "/etc/netns/${name}/resolv.conf:/etc/resolv.conf"
          "/etc/netns/${name}/nsswitch.conf:/etc/nsswitch.conf"
          # Only the loopback names; the host's /etc/hosts stays outside.
          "/etc/netns/${name}/hosts:/etc/hosts"
        ];
        # Each of these would resolve names outside the tunnel: the host's nscd, the NSS
        # socket of systemd-resolved, and D-Bus (resolved's bus API).
        InaccessiblePaths = [
          "-/run/nscd"
          "-/run/systemd/resolve/io.systemd.Resolve"
          "-/run/dbus/system_bus_socket"
        ];
      };
    };

  confinedServices = filterAttrs (_: s: s.wireguardNamespace != null) config.systemd.services;

  namespaceAssertions =
    { loc, ns }:
    mapAttrsToList (entry: e: {
      assertion = e.command != [ ];
      message = "${loc}.desktopEntries.${entry}.command is empty; give the program to run and its arguments.";
    }) ns.desktopEntries
    ++ [
      {
        assertion = validName ns.namespace_name;
        message = oneLine ''
          ${loc}.namespace_name = "${ns.namespace_name}" is not a valid namespace name. It also
          names the WireGuard interface, so it must be 1 to 15 bytes long (the Linux limit for
          interface names), use only letters, digits, '_', '.' and '-', and start with a letter,
          a digit or '_'.'';
      }
      {
        assertion = ns.configFile != null || ns.privateKeyFile != null;
        message = oneLine ''
          ${loc}.privateKeyFile is null. Set it to the absolute path of a file holding the
          private key (as written by `wg genkey`), for example a secret managed by agenix or
          sops-nix; the file is read at run time and never copied to the Nix store. Or set
          ${loc}.configFile to a provider's wg-quick file that holds the key.'';
      }
      {
        assertion =
          ns.configFile == null
          || (lib.hasPrefix "/" ns.configFile && !lib.hasPrefix builtins.storeDir ns.configFile);
        message = oneLine ''
          ${loc}.configFile = "${toString ns.configFile}" must be an absolute path outside the Nix
          store: the file holds the private key, and everything in the store is readable by every
          local user. Point it at a secret managed by agenix or sops-nix, for example
          /run/agenix/vpn.conf.'';
      }
      {
        assertion =
          ns.portForwarding == null || ns.portForwarding.onPortChangeUser != "wg-namespace";
        message = oneLine ''
          ${loc}.portForwarding.onPortChangeUser = "wg-namespace" is the user the relays of
          publishPorts and hostServices run as, and a hook running as that user could stop or
          trace them. Name another user: the default, nobody, or the application's own.'';
      }
    ]
    ++ concatLists (
      imap0 (i: peer: [
        {
          assertion = peer.allowedIPs != [ ];
          message = oneLine ''
            ${loc}.peers.${toString i}.allowedIPs is empty, so no traffic would ever be sent to
            the peer ${peer.publicKey}. List the ranges to route through it, for example
            [ "0.0.0.0/0" "::/0" ] for everything.'';
        }
        {
          assertion = peer.alternatives != [ ];
          message = oneLine ''
            ${loc}.peers.${toString i}.alternatives is an empty list. List at least one server
            that can stand in for the peer ${peer.publicKey}, or leave it null.'';
        }
        {
          assertion = all (
            a: (a.configFile != null) != (a.publicKey != null || a.endpoint != null)
              && (a.configFile != null || (a.publicKey != null && a.endpoint != null))
          ) (if peer.alternatives == null then [ ] else peer.alternatives);
          message = oneLine ''
            ${loc}.peers.${toString i}.alternatives has a server that is neither given by
            configFile alone nor by publicKey and endpoint. Give each alternative either a
            provider's wg-quick file (configFile) or its publicKey and endpoint.'';
        }
        {
          assertion = peer.alternatives == null || peer.endpoint != null;
          message = oneLine ''
            ${loc}.peers.${toString i} has alternatives but no endpoint. Failover switches
            between servers the namespace reaches out to: set endpoint for the peer itself.'';
        }
        {
          assertion = peer.presharedKey == null || peer.presharedKeyFile == null;
          message = oneLine ''
            ${loc}.peers.${toString i} sets both presharedKey and presharedKeyFile. Keep only
            presharedKeyFile: an inline presharedKey ends up in the world-readable Nix store.'';
        }
      ]) ns.peers
    );

  duplicateAssertions = mapAttrsToList (name: ds: {
    assertion = builtins.length ds == 1;
    message = oneLine ''
      ${concatStringsSep " and " (map (d: d.loc) ds)} use the same namespace name "${name}".
      Each namespace needs its own name (it names a network namespace, an interface and a
      systemd unit): set namespace_name on all but one of them.'';
  }) (groupBy (d: d.ns.namespace_name) declared);

  confinementAssertions = mapAttrsToList (service: s: {
    assertion = builtins.elem s.wireguardNamespace declaredNames;
    message = oneLine ''
      systemd.services.${service}.wireguardNamespace = "${s.wireguardNamespace}", but no
      WireGuard namespace of that name is configured${
        if declaredNames == [ ] then
          ""
        else
          " (configured: ${concatStringsSep ", " (map (n: ''"${n}"'') declaredNames)})"
      }. Define services.wireguard-namespaces.${s.wireguardNamespace}, or
      services.wireguard-namespace, whose namespace_name defaults to "vpn".'';
  }) confinedServices;

  presharedKeyWarnings = concatLists (
    map (
      { loc, ns }:
      concatLists (
        imap0 (
          i: peer:
          optional (peer.presharedKey != null) (oneLine ''
            ${loc}.peers.${toString i}.presharedKey is written to the world-readable Nix store,
            where every local user can read it. Put the key in a file readable by root only and
            use presharedKeyFile instead.'')
        ) ns.peers
      )
    ) declared
  );

  isLoopback = address: lib.hasPrefix "127." address || address == "::1";

  publishWarnings = concatLists (
    map (
      { loc, ns }:
      concatLists (
        imap0 (
          i: port:
          optional (!isLoopback port.hostAddress) (oneLine ''
            ${loc}.publishPorts.${toString i}.hostAddress = "${port.hostAddress}" is not a
            loopback address. Every connection relayed to port ${toString port.hostPort} arrives
            inside the namespace from 127.0.0.1, so a program there that trusts localhost (such
            as Transmission's rpc-whitelist) trusts every machine that reaches
            ${port.hostAddress}. Use 127.0.0.1 and a reverse proxy, or make sure the service
            asks for a password.'')
        ) ns.publishPorts
      )
    ) declared
  );
in
{
  options = {
    services.wireguard-namespace = namespaceOptions "vpn" // {
      package = packageOption;
      metrics = metricsOptions;
    };

    services.wireguard-namespaces = mkOption {
      type = types.attrsOf (types.submodule ({ name, ... }: { options = namespaceOptions name; }));
      default = { };
      example = literalExpression ''
        {
          home = {
            dns_server = "10.2.0.1";
            ips = [ "10.2.0.2/32" ];
            privateKeyFile = "/run/agenix/home-vpn";
            peers = [
              {
                publicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
                allowedIPs = [ "0.0.0.0/0" ];
                endpoint = "home.example.org:51820";
                dynamicEndpointRefreshSeconds = 300;
              }
            ];
          };
        }
      '';
      description = ''
        Further WireGuard namespaces, with the same options as
        {option}`services.wireguard-namespace`. Their `namespace_name` defaults to the attribute
        name.
      '';
    };

    systemd.services = mkOption {
      type = types.attrsOf (
        types.submodule (
          { config, ... }:
          {
            options.wireguardNamespace = confinementOption;
            config = mkIf (config.wireguardNamespace != null) (
              confinement config.wireguardNamespace
            );
          }
        )
      );
    };
  };

  config = mkMerge [
    {
      assertions = confinementAssertions;

      warnings =
        optional
          (
            options.services.wireguard-namespace.privateKeyFile.isDefined
            && !options.services.wireguard-namespace.dns_server.isDefined
            && cfg.configFile == null
          )
          (oneLine ''
            services.wireguard-namespace has settings but no dns_server, so no namespace is set
            up from it. Define services.wireguard-namespace.dns_server to turn it on.'');
    }

    (mkIf (declared != [ ]) {
      assertions =
        concatLists (map namespaceAssertions declared) ++ duplicateAssertions ++ unitClashAssertions;
      warnings = presharedKeyWarnings ++ publishWarnings;
      environment.systemPackages = [ cfg.package ];
      environment.etc = mapAttrs' (
        name: ns: nameValuePair "wg-namespace/${name}.json" { source = jsonDocument ns; }
      ) namespaces;
      # The relays of publishPorts and hostServices run as this user, not as root (the helper
      # falls back to nobody where it does not exist).
      users.users.wg-namespace = {
        isSystemUser = true;
        group = "wg-namespace";
        description = "wg-namespace port relays";
      };
      users.groups.wg-namespace = { };
      systemd.services = listToAttrs (map (u: { inherit (u) name value; }) serviceUnits);
      systemd.timers = listToAttrs timerUnits;
    })

    (mkIf cfg.metrics.enable {
      users.groups.${metricsGroup} = { };
      systemd.sockets.wg-namespace-metrics = metricsSocket;
      systemd.services.wg-namespace-metrics = metricsService;
      environment.systemPackages = [ cfg.package ];
    })

    # Only where a firewall module is part of the evaluation (NixOS always has one; the unit
    # rendering in tests does not declare it unless a case does).
    (lib.optionalAttrs (options ? networking.firewall.allowedTCPPorts) {
      networking.firewall.allowedTCPPorts = mkIf (cfg.metrics.enable && cfg.metrics.openFirewall) [
        cfg.metrics.port
      ];
    })

    {
      environment.systemPackages = concatLists (
        mapAttrsToList (_: ns: mapAttrsToList (desktopEntry ns) ns.desktopEntries) namespaces
      );
    }

    # The exec service for allowedUsers/allowedGroups: started by the first connection, gone
    # again once idle. Anyone may connect; the service checks the peer credentials against
    # the namespaces' lists and answers everyone else with a refusal.
    (mkIf (any (ns: ns.allowedUsers != [ ] || ns.allowedGroups != [ ]) (lib.attrValues namespaces)) {
      systemd.sockets.wg-namespace-exec = {
        description = "wg-namespace exec for allowed users";
        wantedBy = [ "sockets.target" ];
        socketConfig = {
          ListenSequentialPacket = "/run/wg-namespace/exec.sock";
          SocketMode = "0666";
          DirectoryMode = "0755";
          RemoveOnStop = true;
        };
      };
      systemd.services.wg-namespace-exec = {
        description = "wg-namespace exec for allowed users";
        requires = [ "wg-namespace-exec.socket" ];
        after = [ "wg-namespace-exec.socket" ];
        # The users' programs run in this unit: a switch must not end someone's browser. The
        # service exits when idle, and the next request starts the new one.
        restartIfChanged = false;
        serviceConfig = {
          ExecStart = "${helper} exec-service";
          # The users' commands run in this unit's cgroup: stopping it ends them, nothing else.
          KillMode = "control-group";
          # Entering namespaces and mounting over /etc (CAP_SYS_ADMIN), looking into the
          # user's runtime directory to hide its bus (CAP_DAC_READ_SEARCH), becoming the user
          # (CAP_SETUID, CAP_SETGID, CAP_SETPCAP for the bounding set). tests/desktop.rs starts
          # the service with this same bounding set.
          CapabilityBoundingSet = [
            "CAP_SYS_ADMIN"
            "CAP_DAC_READ_SEARCH"
            "CAP_SETUID"
            "CAP_SETGID"
            "CAP_SETPCAP"
          ];
        };
      };
    })
  ];
}
