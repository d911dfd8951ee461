# The usage example of the design seed, unchanged except that its <PLACEHOLDERS> hold real
# values. The import supplies the agenix option the example reads.
{ config, ... }:
{
  imports = [ ./agenix-stand-in.nix ];

  services.wireguard-namespace = {
    dns_server = "10.64.0.1";
    ips = [ "10.66.12.34/32" ];
    privateKeyFile = config.age.secrets.my_vpn_key.path;
    peers = [
      {
        publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
        allowedIPs = [ "0.0.0.0/0" ]; # To route all traffic through this peer
        endpoint = "vpn.example.com:51820";
      }
    ];
  };
}
