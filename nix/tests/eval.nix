# Evaluation checks of the NixOS module: the example configurations in ./examples, evaluated as
# complete NixOS systems with nixpkgs.lib.nixosSystem. Evaluation fails, listing every failed
# check, unless all hold; then the result is a trivial derivation (which also builds the
# module's option documentation, so that its Markdown is checked).
#
# The JSON files are compared by rebuilding them: the module writes
# `pkgs.writeText "wg-namespace-<name>.json" (builtins.toJSON document)`, so the expected
# document gives the same store path exactly when the contents are equal. Nothing is built to
# compare them.
{
  nixpkgs,
  pkgs,
  module,
}:

let
  inherit (nixpkgs) lib;
  inherit (lib)
    attrNames
    concatMapStrings
    filter
    hasInfix
    hasPrefix
    length
    ;

  # What turns an example into a complete system.
  base = {
    imports = [ nixpkgs.nixosModules.readOnlyPkgs ];
    nixpkgs.pkgs = pkgs;
    boot.loader.grub.enable = false;
    fileSystems."/" = {
      device = "/dev/vda";
      fsType = "ext4";
    };
    system.stateVersion = "25.11";
  };

  evalSystem = modules: lib.nixosSystem { modules = [ base ] ++ modules; };
  example =
    name:
    (evalSystem [
      module
      ./examples/${name}.nix
    ]).config;

  failedAssertions = config: map (a: a.message) (filter (a: !a.assertion) config.assertions);
  ours = filter (hasPrefix "wireguard-namespace");
  ourWarnings = config: filter (hasInfix "wireguard-namespace") config.warnings;

  helper = config: "${config.services.wireguard-namespace.package}/bin/wg-namespace";
  jsonFile = name: document: pkgs.writeText "wg-namespace-${name}.json" (builtins.toJSON document);

  # The helper's documents with every default filled in, as the module writes them.
  namespaceDefaults = {
    namespace_name = "vpn";
    extraFirewallRules = "";
    ips = [ ];
    peers = [ ];
    backend = "auto";
    # The daemon by its store path, so that every unit (and a root shell) starts the same one.
    userspaceCommand = "${pkgs.wireguard-go}/bin/wireguard-go";
    strictDns = true;
    publishPorts = [ ];
    hostServices = [ ];
    configFile = null;
    mtu = null;
    dnsServers = [ ];
    portForwarding = null;
  };
  peerDefaults = {
    presharedKey = null;
    presharedKeyFile = null;
    endpoint = null;
    dynamicEndpointRefreshSeconds = 0;
    persistentKeepalive = null;
    alternatives = null;
    failoverAfterSeconds = 30;
  };
  publishDefaults = {
    protocol = "tcp";
    hostAddress = "127.0.0.1";
    namespacePort = null;
    idleTimeoutSeconds = 300;
  };
  # hostServices entries have the same keys and defaults.
  hostServiceDefaults = publishDefaults;

  check = name: ok: {
    inherit name ok;
    detail = "does not hold";
  };
  equal = name: expected: actual: {
    inherit name;
    ok = expected == actual;
    detail = "expected ${builtins.toJSON expected}, got ${builtins.toJSON actual}";
  };
  # A system that evaluates completely: assertions hold and the system derivation exists.
  complete = name: config: [
    (equal "${name}: no failed assertions" [ ] (failedAssertions config))
    (equal "${name}: no warnings from the module" [ ] (ourWarnings config))
    (check "${name}: system instantiates" (builtins.isString config.system.build.toplevel.drvPath))
  ];
  hasPackage = pkg: unit: builtins.elem "${pkg}" (map toString unit.path);

  # Importing the module and setting nothing leaves the system derivation as it was.
  noneChecks = [
    (equal "none: system unchanged by the import"
      (evalSystem [ ]).config.system.build.toplevel.drvPath
      (example "none").system.build.toplevel.drvPath
    )
  ];

  seedChecks =
    let
      config = example "seed";
      unit = config.systemd.services.wireguard-namespace-vpn;
      document = namespaceDefaults // {
        dns_server = "10.64.0.1";
        ips = [ "10.66.12.34/32" ];
        privateKeyFile = "/run/agenix/my_vpn_key";
        peers = [
          (peerDefaults // {
            publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
            allowedIPs = [ "0.0.0.0/0" ];
            endpoint = "vpn.example.com:51820";
          })
        ];
      };
    in
    complete "seed" config
    ++ [
      (equal "seed: units" [ "wireguard-namespace-vpn" "wireguard-namespace-vpn-refresh" ] (
        ours (attrNames config.systemd.services)
      ))
      (equal "seed: timers" [ ] (ours (attrNames config.systemd.timers)))
      # The unit names a path that stays the same when the document changes, and the document
      # in reloadTriggers: a changed config is a reload (`wg-namespace reload`), not a restart.
      (equal "seed: ExecStart runs up on the document under /etc"
        "${helper config} up --config /etc/wg-namespace/vpn.json"
        unit.serviceConfig.ExecStart
      )
      (equal "seed: /etc/wg-namespace/vpn.json is the JSON document"
        "${jsonFile "vpn" document}"
        config.environment.etc."wg-namespace/vpn.json".source
      )
      (equal "seed: the document is the reload trigger" [ (jsonFile "vpn" document) ]
        unit.reloadTriggers
      )
      (equal "seed: X-Reload-Triggers in the unit" true (unit.unitConfig ? X-Reload-Triggers))
      (equal "seed: the backend is in the unit's text, so changing it restarts" "auto"
        unit.unitConfig.X-WireguardNamespaceBackend
      )
      (check "seed: ExecReload runs reload on the same path and restarts on exit 5" (
        let
          # writeShellScript's derivation keeps its text; nothing is built to read it.
          script = unit.serviceConfig.ExecReload.text;
        in
        hasInfix "${helper config} reload --namespace vpn --config /etc/wg-namespace/vpn.json" script
        && hasInfix ''[ "$code" = 5 ]'' script
        && hasInfix "systemctl restart --no-block wireguard-namespace-vpn.service" script
      ))
      (equal "seed: StateDirectory keeps the endpoint cache" "wg-namespace/vpn"
        unit.serviceConfig.StateDirectory
      )
      (equal "seed: StateDirectoryMode" "0700" unit.serviceConfig.StateDirectoryMode)
      (equal "seed: ExecStop" "${helper config} down --namespace vpn" unit.serviceConfig.ExecStop)
      (equal "seed: Type" "oneshot" unit.serviceConfig.Type)
      (equal "seed: RemainAfterExit" true unit.serviceConfig.RemainAfterExit)
      (equal "seed: Restart" "on-failure" unit.serviceConfig.Restart)
      (equal "seed: KillMode" "control-group" unit.serviceConfig.KillMode)
      (equal "seed: restartIfChanged" true unit.restartIfChanged)
      (equal "seed: wants" [ "network-online.target" ] unit.wants)
      (equal "seed: after" [ "network-online.target" ] unit.after)
      (equal "seed: wantedBy" [ "multi-user.target" ] unit.wantedBy)
      (check "seed: nftables on PATH" (hasPackage pkgs.nftables unit))
      # The document names it by its store path instead (compared above).
      (check "seed: wireguard-go not taken from PATH" (!hasPackage pkgs.wireguard-go unit))
      (equal "seed: relay user" {
        isSystemUser = true;
        group = "wg-namespace";
      } { inherit (config.users.users.wg-namespace) isSystemUser group; })
      (check "seed: relay group" (config.users.groups ? wg-namespace))
      (check "seed: helper installed" (
        builtins.elem config.services.wireguard-namespace.package config.environment.systemPackages
      ))
    ];

  twoChecks =
    let
      config = example "two-namespaces";
      units = config.systemd.services;
      mullvad = namespaceDefaults // {
        namespace_name = "mullvad";
        dns_server = "10.64.0.1";
        ips = [
          "10.66.12.34/32"
          "fc00:bbbb:bbbb:bb01::3:c21/128"
        ];
        privateKeyFile = "/run/secrets/mullvad.key";
        backend = "kernel";
        userspaceCommand = null;
        peers = [
          (peerDefaults // {
            publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
            allowedIPs = [
              "0.0.0.0/0"
              "::/0"
            ];
            endpoint = "185.213.154.68:51820";
            persistentKeepalive = 25;
            alternatives = [
              {
                publicKey = "Qn1Y1OUs6Ns6k9kYnyHydsyahJybUmRqPxMw9Q8Mbzo=";
                endpoint = "se-sto-wg-002.example.net:51820";
                presharedKeyFile = null;
                configFile = null;
              }
            ];
            failoverAfterSeconds = 20;
          })
        ];
      };
      office = namespaceDefaults // {
        namespace_name = "office";
        dns_server = "10.8.0.1";
        ips = [ "10.8.0.7/24" ];
        privateKeyFile = "/run/secrets/office.key";
        backend = "userspace";
        strictDns = false;
        extraFirewallRules = ''
          table inet office_extra {
            chain output {
              type filter hook output priority filter; policy accept;
              tcp dport 25 drop
            }
          }
        '';
        publishPorts = [
          (publishDefaults // { hostPort = 8080; })
          (publishDefaults // {
            protocol = "udp";
            hostAddress = "::1";
            hostPort = 5353;
            namespacePort = 53;
          })
        ];
        hostServices = [
          (hostServiceDefaults // { hostPort = 8096; })
          (hostServiceDefaults // {
            protocol = "udp";
            namespacePort = 5432;
            hostAddress = "192.168.1.20";
            hostPort = 5432;
            idleTimeoutSeconds = 60;
          })
        ];
        peers = [
          (peerDefaults // {
            publicKey = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
            presharedKeyFile = "/run/secrets/office.psk";
            allowedIPs = [ "10.8.0.0/24" ];
            endpoint = "office.example.org:51820";
            dynamicEndpointRefreshSeconds = 300;
          })
        ];
      };
      refresh = units.wireguard-namespace-office-refresh;
      health = units.wireguard-namespace-office-health;
      timer = config.systemd.timers.wireguard-namespace-office-health;
    in
    complete "two" config
    ++ [
      (equal "two: units"
        [
          "wireguard-namespace-mullvad"
          "wireguard-namespace-mullvad-refresh"
          "wireguard-namespace-office"
          "wireguard-namespace-office-health"
          "wireguard-namespace-office-refresh"
        ]
        (ours (attrNames units))
      )
      (equal "two: mullvad document" (jsonFile "mullvad" mullvad)
        config.environment.etc."wg-namespace/mullvad.json".source
      )
      (equal "two: office document" (jsonFile "office" office)
        config.environment.etc."wg-namespace/office.json".source
      )
      (equal "two: office reloads on its own document" [ (jsonFile "office" office) ]
        units.wireguard-namespace-office.reloadTriggers
      )
      (equal "two: backends in the units' text" [ "kernel" "userspace" ] [
        units.wireguard-namespace-mullvad.unitConfig.X-WireguardNamespaceBackend
        units.wireguard-namespace-office.unitConfig.X-WireguardNamespaceBackend
      ])
      (check "two: no wireguard-go for the kernel backend" (
        !hasPackage pkgs.wireguard-go units.wireguard-namespace-mullvad
      ))
      (check "two: wireguard-go not taken from PATH for the userspace backend" (
        !hasPackage pkgs.wireguard-go units.wireguard-namespace-office
      ))
      (equal "two: refresh ExecStart"
        "${helper config} refresh --config ${jsonFile "office" office}"
        refresh.serviceConfig.ExecStart
      )
      (equal "two: refresh Restart" "always" refresh.serviceConfig.Restart)
      (equal "two: refresh bindsTo" [ "wireguard-namespace-office.service" ] refresh.bindsTo)
      (equal "two: refresh after" [ "wireguard-namespace-office.service" ] refresh.after)
      (equal "two: refresh wantedBy" [ "wireguard-namespace-office.service" ] refresh.wantedBy)
      (equal "two: timers" [ "wireguard-namespace-office-health" ] (
        ours (attrNames config.systemd.timers)
      ))
      (equal "two: health interval" "30s" timer.timerConfig.OnUnitActiveSec)
      (equal "two: health timer fires on time" "1s" timer.timerConfig.AccuracySec)
      (check "two: health check heals in place" (
        hasInfix "${helper config} heal --config /etc/wg-namespace/office.json" health.script
      ))
      (check "two: health check restarts only when heal exits 5" (
        hasInfix ''[ "$code" = 5 ]'' health.script
        && hasInfix "systemctl restart --no-block \"$unit\"" health.script
      ))
    ];

  # Only configFile set: the namespace is on, and the helper gets the path (never the file's
  # contents) with dns_server and privateKeyFile left to the file.
  configFileChecks =
    let
      config = example "config-file";
      document = namespaceDefaults // {
        configFile = "/run/agenix/mullvad-se1.conf";
        dns_server = null;
        privateKeyFile = null;
      };
    in
    complete "config-file" config
    ++ [
      (equal "config-file: units (refresh for the file's endpoints)"
        [
          "wireguard-namespace-vpn"
          "wireguard-namespace-vpn-refresh"
        ]
        (ours (attrNames config.systemd.services))
      )
      (equal "config-file: the document names only the file" (jsonFile "vpn" document)
        config.environment.etc."wg-namespace/vpn.json".source
      )
    ];

  # portForwarding: a unit of its own, bound to the namespace's, on the same JSON document.
  portForwardingChecks =
    let
      config = example "port-forwarding";
      unit = config.systemd.services.wireguard-namespace-vpn-port-forward;
      document = namespaceDefaults // {
        dns_server = "10.2.0.1";
        ips = [ "10.2.0.2/32" ];
        privateKeyFile = "/run/secrets/proton.key";
        peers = [
          (peerDefaults // {
            publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
            allowedIPs = [ "0.0.0.0/0" ];
            endpoint = "185.159.157.1:51820";
          })
        ];
        portForwarding = {
          gateway = "10.2.0.1";
          protocols = [
            "udp"
            "tcp"
          ];
          lifetimeSeconds = 60;
          onPortChange = "/etc/wg-namespace/transmission-port";
          onPortChangeUser = "transmission";
        };
      };
    in
    complete "port-forwarding" config
    ++ [
      (equal "port-forwarding: units"
        [
          "wireguard-namespace-vpn"
          "wireguard-namespace-vpn-port-forward"
          "wireguard-namespace-vpn-refresh"
        ]
        (ours (attrNames config.systemd.services))
      )
      (equal "port-forwarding: ExecStart runs port-forward on the JSON document"
        "${helper config} port-forward --config ${jsonFile "vpn" document}"
        unit.serviceConfig.ExecStart
      )
      (equal "port-forwarding: bound to the namespace's unit" [ "wireguard-namespace-vpn.service" ]
        unit.bindsTo
      )
      (equal "port-forwarding: stops and restarts with it" [ "wireguard-namespace-vpn.service" ]
        unit.partOf
      )
      (equal "port-forwarding: Restart" "always" unit.serviceConfig.Restart)
      (check "port-forwarding: nftables on PATH" (hasPackage pkgs.nftables unit))
    ];

  confinedChecks =
    let
      config = example "confined";
      service = config.systemd.services.transmission;
      main = "wireguard-namespace-vpn.service";
    in
    complete "confined" config
    ++ [
      (equal "confined: NetworkNamespacePath" "/run/netns/vpn"
        service.serviceConfig.NetworkNamespacePath
      )
      (equal "confined: BindReadOnlyPaths (the service's own kept)"
        [
          "/etc/netns/vpn/hosts:/etc/hosts"
          "/etc/netns/vpn/nsswitch.conf:/etc/nsswitch.conf"
          "/etc/netns/vpn/resolv.conf:/etc/resolv.conf"
          "/var/lib/media"
        ]
        (lib.sort (a: b: a < b) service.serviceConfig.BindReadOnlyPaths)
      )
      (equal "confined: InaccessiblePaths"
        [
          "-/run/nscd"
          "-/run/systemd/resolve/io.systemd.Resolve"
          "-/run/dbus/system_bus_socket"
        ]
        service.serviceConfig.InaccessiblePaths
      )
      (equal "confined: bindsTo" [ main ] service.bindsTo)
      (equal "confined: after" [ main ] service.after)
      (equal "confined: partOf" [ main ] service.partOf)
      # PartOf= carries stop and restart only; a reload of the namespace's unit (a changed
      # config) must reach no confined service, so nothing may propagate reloads to it.
      (check "confined: no reload propagation" (
        !(service.unitConfig ? ReloadPropagatedFrom)
        && !(config.systemd.services.wireguard-namespace-vpn.unitConfig ? PropagatesReloadTo)
      ))
      (equal "confined: own settings kept" true service.serviceConfig.DynamicUser)
    ];

  failingChecks =
    let
      config = example "failing";
      failed = failedAssertions config;
      long = "services.wireguard-namespaces.long";
      # The start of each expected message.
      expected = [
        ''systemd.services.downloader.wireguardNamespace = "nosuchns", but no WireGuard namespace''
        ''${long}.namespace_name = "a-name-that-is-too-long" is not a valid namespace name''
        "${long}.privateKeyFile is null"
        "${long}.peers.0.allowedIPs is empty"
        "${long}.peers.0 sets both presharedKey and presharedKeyFile"
        "${long}.peers.0.alternatives is an empty list"
        "${long}.peers.0 has alternatives but no endpoint"
        "services.wireguard-namespaces.stored.configFile = \"/nix/store/00000000000000000000000000000000-mullvad.conf\" must be an absolute path outside the Nix store"
        ''services.wireguard-namespace and services.wireguard-namespaces.vpn use the same namespace''
        ''services.wireguard-namespaces.vpn.portForwarding.onPortChangeUser = "wg-namespace" is the user the relays''
        ''systemd unit wireguard-namespace-stored-refresh.service would be both the refresh unit of namespace "stored" (services.wireguard-namespaces.stored) and the main unit of namespace "stored-refresh" (services.wireguard-namespaces.stored-refresh)''
      ];
      matching = text: filter (hasPrefix text) failed;
      warnings = ourWarnings config;
    in
    [ (equal "failing: number of failed assertions" (length expected) (length failed)) ]
    ++ map (text: equal "failing: one message starts with: ${text}" 1 (length (matching text)))
      expected
    ++ [
      (equal "failing: two inline presharedKey warnings and one LAN hostAddress" 3 (length warnings))
      (check "failing: warning names the published port" (
        builtins.any (hasPrefix
          ''services.wireguard-namespace.publishPorts.0.hostAddress = "192.168.1.10" is not a loopback address''
        ) warnings
      ))
      (check "failing: warning names the option" (
        builtins.any (hasPrefix
          "services.wireguard-namespace.peers.0.presharedKey is written to the world-readable Nix store"
        ) warnings
      ))
    ];

  metricsChecks =
    let
      config = example "metrics";
      units = config.systemd.services;
      server = units.wg-namespace-metrics.serviceConfig;
    in
    complete "metrics" config
    ++ [
      (equal "metrics: units"
        [
          "wireguard-namespace-lab"
          "wireguard-namespace-lab-refresh"
          "wireguard-namespace-vpn"
          "wireguard-namespace-vpn-refresh"
        ]
        (ours (attrNames units))
      )
      (check "metrics: refresh lets the group read, also without an endpoint" (
        hasInfix "--metrics-group wg-namespace-metrics"
          units.wireguard-namespace-lab-refresh.serviceConfig.ExecStart
      ))
      (equal "metrics: socket" [ "0.0.0.0:9595" ]
        config.systemd.sockets.wg-namespace-metrics.listenStreams
      )
      (check "metrics: server unprivileged" (
        server.DynamicUser && server.CapabilityBoundingSet == "" && server.NoNewPrivileges
      ))
      (equal "metrics: server's group" [ "wg-namespace-metrics" ] server.SupplementaryGroups)
      (check "metrics: the dynamic user's name is not a static group's" (
        !(config.users.groups ? ${server.User})
      ))
      (check "metrics: group exists" (config.users.groups ? wg-namespace-metrics))
      (check "metrics: port open" (builtins.elem 9595 config.networking.firewall.allowedTCPPorts))
    ];

  # The companion units run sandboxed; the namespace's own unit gets nothing that would give it
  # a mount namespace of its own (the host must see the /run/netns/<name> mount `up` makes).
  sandboxChecks =
    let
      two = (example "two-namespaces").systemd.services;
      forwarding = (example "port-forwarding").systemd.services;
      companions = {
        refresh = two.wireguard-namespace-office-refresh;
        health = two.wireguard-namespace-office-health;
        port-forward = forwarding.wireguard-namespace-vpn-port-forward;
      };
      main = two.wireguard-namespace-office;
      common = {
        ProtectSystem = "strict";
        ProtectHome = "read-only";
        PrivateTmp = true;
        NoNewPrivileges = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        SystemCallArchitectures = "native";
      };
      commonChecks = lib.concatLists (
        lib.mapAttrsToList (
          unit: service:
          lib.mapAttrsToList (
            key: value: equal "sandbox: ${unit} ${key}" value (service.serviceConfig.${key} or null)
          ) common
          ++ [
            (check "sandbox: ${unit} keeps no CAP_SYS_MODULE" (
              service.serviceConfig ? CapabilityBoundingSet
              && !builtins.elem "CAP_SYS_MODULE" service.serviceConfig.CapabilityBoundingSet
            ))
          ]
        ) companions
      );
      mountNamespaceSettings = [
        "ProtectSystem"
        "ProtectHome"
        "PrivateTmp"
        "PrivateDevices"
        "ProtectKernelTunables"
        "ProtectKernelModules"
        "ProtectKernelLogs"
        "ProtectControlGroups"
        "ProtectHostname"
        "ReadWritePaths"
        "ReadOnlyPaths"
        "InaccessiblePaths"
      ];
    in
    commonChecks
    ++ [
      (equal "sandbox: refresh writes the state and the endpoint cache" [
        "-/run/wg-namespace"
        "-/var/lib/wg-namespace/office"
      ] companions.refresh.serviceConfig.ReadWritePaths)
      (equal "sandbox: health writes what heal repairs" [
        "-/run/wg-namespace"
        "-/var/lib/wg-namespace/office"
        "-/etc/netns"
        "-/run/wireguard"
      ] companions.health.serviceConfig.ReadWritePaths)
      (equal "sandbox: port-forward writes its record only" [ "-/run/wg-namespace" ]
        companions.port-forward.serviceConfig.ReadWritePaths
      )
      (equal "sandbox: health leaves what heal starts running" "process"
        companions.health.serviceConfig.KillMode
      )
      (equal "sandbox: health reaches TUN only" [ "/dev/net/tun rw" ]
        companions.health.serviceConfig.DeviceAllow
      )
      (check "sandbox: port-forward can become the hook's user" (
        lib.all (c: builtins.elem c companions.port-forward.serviceConfig.CapabilityBoundingSet) [
          "CAP_SETUID"
          "CAP_SETGID"
          "CAP_SETPCAP"
        ]
      ))
      (equal "sandbox: the namespace's unit has no mount namespace of its own" [ ] (
        filter (key: main.serviceConfig ? ${key}) mountNamespaceSettings
      ))
      (equal "sandbox: the namespace's unit NoNewPrivileges" true main.serviceConfig.NoNewPrivileges)
    ];

  checks =
    noneChecks
    ++ metricsChecks
    ++ seedChecks
    ++ twoChecks
    ++ configFileChecks
    ++ portForwardingChecks
    ++ confinedChecks
    ++ sandboxChecks
    ++ failingChecks;
  failures = filter (c: !c.ok) checks;

  # The option documentation as the NixOS manual would build it (descriptions must be valid
  # Markdown, every option needs one).
  optionsDoc = pkgs.nixosOptionsDoc {
    options = {
      services = {
        inherit ((evalSystem [ module ]).options.services) wireguard-namespace wireguard-namespaces;
      };
    };
  };
in
if failures != [ ] then
  throw ''
    wg-namespace module checks failed:
    ${concatMapStrings (c: "- ${c.name}: ${c.detail}\n") failures}''
else
  pkgs.runCommand "wg-namespace-module-eval" { } ''
    test -s ${optionsDoc.optionsJSON}/share/doc/nixos/options.json
    echo "${toString (length checks)} module checks passed" > $out
  ''
