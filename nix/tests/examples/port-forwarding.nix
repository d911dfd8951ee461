# ProtonVPN with its forwarded port (NAT-PMP) handed to a script that tells Transmission.
{
  services.wireguard-namespace = {
    dns_server = "10.2.0.1";
    ips = [ "10.2.0.2/32" ];
    privateKeyFile = "/run/secrets/proton.key";
    peers = [
      {
        publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
        allowedIPs = [ "0.0.0.0/0" ];
        endpoint = "185.159.157.1:51820";
      }
    ];
    portForwarding = {
      gateway = "10.2.0.1";
      onPortChange = "/etc/wg-namespace/transmission-port";
      onPortChangeUser = "transmission";
    };
  };
}
