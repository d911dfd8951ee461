# The metrics server for two namespaces, one of them without an endpoint (refresh still runs
# for it: it answers the namespace's status socket), opened to the network.
{ ... }:
{
  services.wireguard-namespace.metrics = {
    enable = true;
    listenAddress = "0.0.0.0";
    openFirewall = true;
  };
  services.wireguard-namespaces = {
    vpn = {
      dns_server = "10.64.0.1";
      ips = [ "10.66.12.34/32" ];
      privateKeyFile = "/run/keys/vpn";
      peers = [
        {
          publicKey = "ZLuhud+INvuHE9TQkJnkoa1k4sOYvR13ru11/4ks3E4=";
          allowedIPs = [ "0.0.0.0/0" ];
          endpoint = "vpn.example.com:51820";
        }
      ];
    };
    lab = {
      dns_server = "10.65.0.1";
      ips = [ "10.67.1.2/32" ];
      privateKeyFile = "/run/keys/lab";
      peers = [
        {
          publicKey = "RzR8zr1E8pOFrLKpPm5GDmGONwI1t+QXE938JDIlWk0=";
          allowedIPs = [ "10.9.0.0/24" ];
        }
      ];
    };
  };
}
