# Just enough of agenix's `age.secrets` for the seed's usage example to evaluate: agenix is not
# an input of this flake. A secret's path defaults to /run/agenix/<name>, as in agenix.
{ lib, ... }:
{
  options.age.secrets = lib.mkOption {
    type = lib.types.attrsOf (
      lib.types.submodule (
        { name, ... }:
        {
          options.path = lib.mkOption {
            type = lib.types.str;
            default = "/run/agenix/${name}";
            description = "Where the decrypted secret is found at run time.";
          };
        }
      )
    );
    default = { };
    description = "Stand-in for agenix's secrets: only each secret's path.";
  };

  config.age.secrets.my_vpn_key = { };
}
