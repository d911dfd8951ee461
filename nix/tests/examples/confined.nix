# A service confined to the namespace with one line, next to its own sandboxing settings, and
# the namespace it uses.
{
  services.wireguard-namespace = {
    dns_server = "10.64.0.1";
    ips = [ "10.66.12.34/32" ];
    privateKeyFile = "/run/secrets/vpn.key";
    peers = [
      {
        publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
        allowedIPs = [ "0.0.0.0/0" ];
        endpoint = "185.213.154.68:51820";
      }
    ];
    publishPorts = [ { hostPort = 9091; } ];
  };

  systemd.services.transmission = {
    description = "BitTorrent daemon (stand-in)";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      ExecStart = "/run/current-system/sw/bin/sleep infinity";
      DynamicUser = true;
      BindReadOnlyPaths = [ "/var/lib/media" ];
    };
  };

  systemd.services.transmission.wireguardNamespace = "vpn";
}
