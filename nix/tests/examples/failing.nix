# A configuration with one of each mistake the module's assertions catch, and an inline
# preshared key and a port published on a LAN address (warnings, not errors).
{
  # namespace_name defaults to "vpn" ...
  services.wireguard-namespace = {
    dns_server = "10.64.0.1";
    privateKeyFile = "/run/secrets/vpn.key";
    peers = [
      {
        publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
        presharedKey = "8mylWJMwkttlNSmi+ZD81nCbWrCPFOfHk1//82TN4SY=";
        allowedIPs = [ "0.0.0.0/0" ];
      }
    ];
    publishPorts = [
      {
        hostAddress = "192.168.1.10";
        hostPort = 9091;
      }
    ];
  };

  services.wireguard-namespaces = {
    # ... and so does this one's (its attribute name).
    vpn = {
      dns_server = "10.8.0.1";
      privateKeyFile = "/run/secrets/other.key";
      # The hook as the relays' own user could stop them.
      portForwarding = {
        gateway = "10.8.0.1";
        onPortChange = "/etc/wg-namespace/port-changed";
        onPortChangeUser = "wg-namespace";
      };
    };

    long = {
      namespace_name = "a-name-that-is-too-long";
      dns_server = "10.9.0.1";
      privateKeyFile = null;
      peers = [
        {
          publicKey = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
          presharedKey = "J3uSElF58qJasY+M7kq61nQXcxJgkOcMOYF7+6XYAe8=";
          presharedKeyFile = "/run/secrets/long.psk";
          allowedIPs = [ ];
          alternatives = [ ];
        }
      ];
    };
  };

  # A provider's file put into the Nix store, where every user can read its private key.
  services.wireguard-namespaces.stored.configFile = "/nix/store/00000000000000000000000000000000-mullvad.conf";

  # Its main unit would have the name of the refresh unit of "stored".
  services.wireguard-namespaces.stored-refresh = {
    dns_server = "10.10.0.1";
    privateKeyFile = "/run/secrets/stored-refresh.key";
  };

  systemd.services.downloader = {
    wantedBy = [ "multi-user.target" ];
    serviceConfig.ExecStart = "/run/current-system/sw/bin/sleep infinity";
    wireguardNamespace = "nosuchns";
  };
}
