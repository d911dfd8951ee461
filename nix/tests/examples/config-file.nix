# A provider's wg-quick file and nothing else: the helper reads the private key, addresses, DNS
# servers, MTU and peers from it at run time (the file stays out of the Nix store).
{
  services.wireguard-namespace.configFile = "/run/agenix/mullvad-se1.conf";
}
