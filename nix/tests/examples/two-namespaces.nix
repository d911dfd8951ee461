# Two namespaces: the seed-shaped one under another name, and one from the attribute set that
# uses the newer options (dynamic endpoint, health checks, published ports, userspace backend).
{
  services.wireguard-namespace = {
    namespace_name = "mullvad";
    dns_server = "10.64.0.1";
    ips = [
      "10.66.12.34/32"
      "fc00:bbbb:bbbb:bb01::3:c21/128"
    ];
    privateKeyFile = "/run/secrets/mullvad.key";
    backend = "kernel";
    peers = [
      {
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
          }
        ];
        failoverAfterSeconds = 20;
      }
    ];
  };

  services.wireguard-namespaces.office = {
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
    restartOnUnhealthy = {
      enable = true;
      interval = "30s";
    };
    publishPorts = [
      { hostPort = 8080; }
      {
        protocol = "udp";
        hostAddress = "::1";
        hostPort = 5353;
        namespacePort = 53;
      }
    ];
    hostServices = [
      { hostPort = 8096; }
      {
        protocol = "udp";
        namespacePort = 5432;
        hostAddress = "192.168.1.20";
        hostPort = 5432;
        idleTimeoutSeconds = 60;
      }
    ];
    peers = [
      {
        publicKey = "s5SzHhoDFL1S3FlX7L8GEzZs3szHDZ6RrEJeY+Dbvmw=";
        presharedKeyFile = "/run/secrets/office.psk";
        allowedIPs = [ "10.8.0.0/24" ];
        endpoint = "office.example.org:51820";
        dynamicEndpointRefreshSeconds = 300;
      }
    ];
  };
}
