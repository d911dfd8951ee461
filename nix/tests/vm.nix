# NixOS VM test: a WireGuard server with an HTTP and a DNS server on its tunnel address, and a
# client that runs the module with one namespace and a service confined to it.
#
# The keys below are throwaway test keys, made for this test only.
{ pkgs, module }:

let
  keys = {
    server = {
      private = "2B7KA397a5+LFi6HniPYzdD/PR+tnIo+FhFiA4Lh9ms=";
      public = "RzR8zr1E8pOFrLKpPm5GDmGONwI1t+QXE938JDIlWk0=";
    };
    client = {
      private = "qNMo1OmeXjINVjKSHLH2UkAK/trDoEzlaEPuAU4Jz04=";
      public = "Sgj2bs5O8ZFTYVLbfOecwVEFcKMSo4Ahi/o2hdZs6h8=";
    };
  };

  serverTunnelAddress = "10.66.0.1";
  marker = "hello from the far end of the tunnel";
  webroot = pkgs.writeTextDir "index.html" "${marker}\n";
  # A NAT-PMP gateway (RFC 6886) as a VPN provider runs one: every mapping gets port 40000, for
  # the lifetime asked.
  natpmpGateway = pkgs.writeText "natpmp-gateway.py" ''
    import socket, struct, time
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("${serverTunnelAddress}", 5351))
    while True:
        data, peer = s.recvfrom(1100)
        if len(data) < 2:
            continue
        op = data[1]
        epoch = int(time.monotonic() - start) + 1000
        if op == 0:
            s.sendto(struct.pack("!BBHI4s", 0, 128, 0, epoch, bytes(4)), peer)
        elif op in (1, 2) and len(data) >= 12:
            internal, _, lifetime = struct.unpack("!HHI", data[4:12])
            port = 40000 if lifetime else 0
            s.sendto(struct.pack("!BBHIHHI", 0, 128 + op, 0, epoch, internal, port, lifetime), peer)
  '';
in
pkgs.testers.runNixOSTest {
  name = "wg-namespace";

  nodes.server = {
    networking.firewall = {
      allowedUDPPorts = [ 51820 ];
      # The web and DNS servers answer through the tunnel only.
      interfaces.wg0 = {
        allowedTCPPorts = [
          53
          80
        ];
        allowedUDPPorts = [
          53
          5351
        ];
      };
    };

    networking.wireguard.interfaces.wg0 = {
      ips = [ "${serverTunnelAddress}/24" ];
      listenPort = 51820;
      privateKeyFile = "${pkgs.writeText "server.key" keys.server.private}";
      peers = [
        {
          publicKey = keys.client.public;
          allowedIPs = [ "10.66.0.2/32" ];
        }
      ];
    };

    services.dnsmasq = {
      enable = true;
      resolveLocalQueries = false;
      settings = {
        interface = "wg0";
        bind-dynamic = true;
        no-resolv = true;
        address = "/web.test/${serverTunnelAddress}";
      };
    };

    systemd.services.tunnel-web = {
      description = "Test web server";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 -m http.server 80 --directory ${webroot}";
    };

    systemd.services.natpmp-gateway = {
      description = "Test NAT-PMP gateway";
      wantedBy = [ "multi-user.target" ];
      after = [ "wireguard-wg0.service" ];
      requires = [ "wireguard-wg0.service" ];
      serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 ${natpmpGateway}";
    };
  };

  nodes.client = {
    imports = [ module ];

    environment.systemPackages = [ pkgs.curl ];

    environment.etc."wg-namespace/client.key" = {
      text = keys.client.private;
      mode = "0400";
    };

    # alice may run programs in the namespace without root (the exec service); bob may not.
    users.users.alice.isNormalUser = true;
    users.users.bob.isNormalUser = true;

    # /metrics and the health endpoint, socket-activated, unprivileged.
    services.wireguard-namespace.metrics.enable = true;

    services.wireguard-namespace = {
      allowedUsers = [ "alice" ];
      dns_server = serverTunnelAddress;
      ips = [ "10.66.0.2/24" ];
      privateKeyFile = "/etc/wg-namespace/client.key";
      backend = "kernel";
      peers = [
        {
          publicKey = keys.server.public;
          allowedIPs = [ "0.0.0.0/0" ];
          # Resolved through /etc/hosts, which the test framework fills with the node names.
          endpoint = "server:51820";
          persistentKeepalive = 25;
        }
      ];
      # The health unit repairs in place; the relay gives it something to start again.
      restartOnUnhealthy = {
        enable = true;
        interval = "10s";
      };
      publishPorts = [
        {
          hostPort = 8080;
          namespacePort = 80;
        }
      ];
      # Renewed every 10 s; the hook leaves a process in the background, which must not
      # outlive it.
      portForwarding = {
        gateway = serverTunnelAddress;
        lifetimeSeconds = 20;
        onPortChange = pkgs.writeShellScript "vm-hook" ''
          sleep 300 &
          echo "vm hook: forwarded port $1"
        '';
      };
    };

    # Fetches the test page through the tunnel every second and keeps the last answer.
    systemd.services.probe = {
      wireguardNamespace = "vpn";
      wantedBy = [ "multi-user.target" ];
      path = [ pkgs.curl ];
      serviceConfig.RuntimeDirectory = "probe";
      script = ''
        while true; do
          if curl -fsS --max-time 5 http://web.test/ -o /run/probe/body.new; then
            mv /run/probe/body.new /run/probe/body
          fi
          sleep 1
        done
      '';
    };
  };

  testScript = ''
    marker = "${marker}"
    far_end = "http://${serverTunnelAddress}/"


    def requests_served() -> int:
        out = server.succeed("journalctl -u tunnel-web.service -o cat | grep -c 'GET /' || true")
        return int(out.strip())


    start_all()

    with subtest("the server side is up"):
        server.wait_for_unit("wireguard-wg0.service")
        server.wait_for_unit("dnsmasq.service")
        server.wait_for_unit("tunnel-web.service")
        server.wait_for_open_port(80)

    with subtest("the namespace comes up at boot, holding the WireGuard interface"):
        client.wait_for_unit("wireguard-namespace-vpn.service")
        client.succeed("test -e /run/netns/vpn")
        client.succeed("ip -n vpn link show vpn")
        client.fail("ip link show vpn")

    with subtest("the host itself cannot reach the far end of the tunnel"):
        client.fail(f"curl -fsS --max-time 5 {far_end}")
        client.fail("getent ahostsv4 web.test")

    with subtest("a command run with wg-namespace exec goes through the tunnel"):
        out = client.wait_until_succeeds(
            f"wg-namespace exec --namespace vpn -- curl -fsS --max-time 5 {far_end}", timeout=60
        )
        assert marker in out, out

    with subtest("DNS inside the namespace is answered by dns_server"):
        out = client.succeed("wg-namespace exec --namespace vpn -- getent ahostsv4 web.test")
        assert "${serverTunnelAddress}" in out, out
        out = client.succeed("wg-namespace exec --namespace vpn -- curl -fsS --max-time 5 http://web.test/")
        assert marker in out, out

    with subtest("an allowed user runs a command in the namespace without root; others cannot"):
        client.wait_for_unit("wg-namespace-exec.socket")
        out = client.succeed(
            f"su -l alice -c 'wg-namespace exec --namespace vpn -- curl -fsS --max-time 5 {far_end}'"
        )
        assert marker in out, out
        code, out = client.execute("su -l bob -c 'wg-namespace exec --namespace vpn -- true' 2>&1")
        assert code == 1 and "may not run commands" in out, out

    with subtest("the confined service runs in the namespace and reaches the server"):
        client.wait_for_unit("probe.service")
        client.succeed(
            "test \"$(readlink /proc/$(systemctl show -P MainPID probe.service)/ns/net)\""
            " = \"$(ip netns exec vpn readlink /proc/self/ns/net)\""
        )
        client.wait_until_succeeds(f"grep -qF '{marker}' /run/probe/body", timeout=60)

    with subtest("status and leak checks pass"):
        client.wait_until_succeeds("wg-namespace status --namespace vpn", timeout=60)
        client.succeed("wg-namespace check-leaks --namespace vpn")

    with subtest("the forwarded port: mapped, the hook run once, nothing it started left behind"):
        unit = "wireguard-namespace-vpn-port-forward.service"
        client.wait_until_succeeds(
            "grep -q '\"phase\": \"mapped\"' /run/wg-namespace/forwarding/vpn.json", timeout=60
        )
        client.wait_until_succeeds(
            f"journalctl -u {unit} -o cat | grep -q 'vm-hook 40000 succeeded'", timeout=60
        )
        # The hook ran as PID 1 of a PID namespace of its own: its background process died
        # with it, so port-forward is alone in its unit's cgroup.
        client.wait_until_succeeds(
            f"test \"$(cat /sys/fs/cgroup$(systemctl show -P ControlGroup {unit})/cgroup.procs)\""
            f" = \"$(systemctl show -P MainPID {unit})\"",
            timeout=10,
        )
        client.sleep(25)
        runs = client.succeed(f"journalctl -u {unit} -o cat | grep -c 'vm hook: forwarded port 40000'")
        assert runs.strip() == "1", f"the hook ran {runs.strip()} times for one port"
        client.succeed("grep -q '\"phase\": \"mapped\"' /run/wg-namespace/forwarding/vpn.json")

    with subtest("metrics: socket-activated, unprivileged, read from the companion, without keys"):
        client.wait_for_unit("wg-namespace-metrics.socket")
        client.wait_until_succeeds(
            "curl -fsS --max-time 30 http://127.0.0.1:9595/metrics"
            " | grep -F 'wg_namespace_verdict{netns=\"vpn\",verdict=\"healthy\"} 1'",
            timeout=60,
        )
        client.succeed(
            "test \"$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9595/v1/namespaces/vpn/health)\" = 200"
        )
        pid = client.succeed("systemctl show -P MainPID wg-namespace-metrics.service").strip()
        assert pid != "0", "the metrics server is not running after a request"
        uid = client.succeed(f"awk '/^Uid:/{{print $2}}' /proc/{pid}/status").strip()
        assert uid != "0", "the metrics server runs as root"
        client.succeed(f"grep -q '^CapEff:[[:space:]]*0000000000000000' /proc/{pid}/status")
        client.fail(
            "curl -fsS http://127.0.0.1:9595/v1/namespaces http://127.0.0.1:9595/metrics"
            " | grep -qF '${keys.client.private}'"
        )

    with subtest("the companion units run sandboxed, the namespace's own unit in the host's mounts"):
        pid = client.succeed("systemctl show -P MainPID wireguard-namespace-vpn-refresh.service").strip()
        assert pid != "0", "refresh is not running"
        client.succeed(f"test \"$(readlink /proc/{pid}/ns/mnt)\" != \"$(readlink /proc/1/ns/mnt)\"")
        client.succeed(f"grep -q '^NoNewPrivs:[[:space:]]*1' /proc/{pid}/status")
        bounding = client.succeed(f"awk '/^CapBnd/{{print $2}}' /proc/{pid}/status").strip()
        assert bounding != client.succeed("awk '/^CapBnd/{print $2}' /proc/1/status").strip(), bounding
        client.fail(f"nsenter -t {pid} -m touch /etc/sandbox-test")
        for unit in ["refresh", "health"]:
            out = client.succeed(f"systemctl show -P ProtectSystem wireguard-namespace-vpn-{unit}.service")
            assert out.strip() == "strict", f"{unit}: ProtectSystem={out}"
        client.succeed("findmnt -n /run/netns/vpn")

    with subtest("refresh handshakes anew when an address of the host comes"):
        since = client.succeed("date +%s").strip()
        client.succeed("sleep 1; ip link add wgtest0 type dummy; ip addr add 10.97.0.1/24 dev wgtest0; ip link set wgtest0 up")
        client.wait_until_succeeds(
            f"journalctl -u wireguard-namespace-vpn-refresh.service -o cat --since @{since}"
            " | grep -q 'handshaking again'",
            timeout=30,
        )
        client.succeed("ip link del wgtest0")

    with subtest("the health unit heals a deleted interface in place"):
        probe = client.succeed("systemctl show -P MainPID probe.service").strip()
        invocation = client.succeed("systemctl show -P InvocationID wireguard-namespace-vpn.service").strip()
        client.succeed("ip -n vpn link del vpn")
        client.wait_until_succeeds("ip -n vpn link show vpn", timeout=60)
        assert client.succeed("systemctl show -P MainPID probe.service").strip() == probe
        assert (
            client.succeed("systemctl show -P InvocationID wireguard-namespace-vpn.service").strip()
            == invocation
        ), "the namespace's unit was restarted instead of healed"
        client.succeed("rm -f /run/probe/body")
        client.wait_until_succeeds(f"grep -qF '{marker}' /run/probe/body", timeout=60)

    with subtest("a relay the health unit starts again outlives the check"):
        relay = client.succeed("ss -Htlnp 'sport = :8080' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2").strip()
        client.succeed(f"kill -9 {relay}")
        client.wait_until_succeeds(
            f"ss -Htlnp 'sport = :8080' | grep -o 'pid=[0-9]*' | grep -vx 'pid={relay}'", timeout=60
        )
        healed = client.succeed("ss -Htlnp 'sport = :8080' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2").strip()
        # Longer than a health check takes: with the default KillMode the relay would be gone.
        client.sleep(25)
        client.succeed(f"kill -0 {healed}")
        client.succeed("ss -Htln 'sport = :8080' | grep -q .")

    with subtest("stopping the namespace stops the confined service and cuts all traffic"):
        client.succeed("systemctl stop wireguard-namespace-vpn.service")
        client.wait_until_fails("systemctl is-active probe.service")
        client.fail("test -e /run/netns/vpn")
        code, _ = client.execute("wg-namespace status --namespace vpn")
        assert code == 4, f"wg-namespace status exited {code}, expected 4 (down)"
        client.fail("wg-namespace exec --namespace vpn -- true")
        before = requests_served()
        client.fail(f"curl -fsS --max-time 5 {far_end}")
        client.sleep(5)
        assert requests_served() == before, "the server still gets requests from the client"

    with subtest("starting the confined service brings its namespace back"):
        client.succeed("systemctl start probe.service")
        client.succeed("systemctl is-active wireguard-namespace-vpn.service")
        client.wait_until_succeeds(f"grep -qF '{marker}' /run/probe/body", timeout=60)
  '';
}
