# The wg-namespace helper, built from this repository's Cargo workspace.
{
  lib,
  rustPlatform,
  nftables,
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;

  # Only what cargo needs, so that editing the Nix files or docs does not rebuild the helper.
  # tests/nix_module.rs is left out: it checks nix/module.nix and docs/options.md, which are
  # not in this source, and needs nix-instantiate (the flake's module-eval check covers the
  # module instead).
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../build.rs
      ../src
      (lib.fileset.maybeMissing ../templates)
      (lib.fileset.difference (lib.fileset.maybeMissing ../tests) (
        lib.fileset.maybeMissing ../tests/nix_module.rs
      ))
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # build.rs links the binary at a fixed address (README, "Linked at a fixed address"); the
  # compiler wrapper's PIE hardening would otherwise add -pie to the same link.
  hardeningDisable = [ "pie" ];

  # Tests that need root skip themselves in the build sandbox; the rest may render and check
  # rulesets with nft.
  nativeCheckInputs = [ nftables ];

  # tests/kernel_vm.rs boots a downloaded kernel under qemu: neither exists in the sandbox.
  preCheck = ''
    export WG_NAMESPACE_VM_SKIP=1
  '';

  # The helper loads its rulesets through libnftables in its own process, found at this path,
  # and reads them back with this `nft`: every unit that runs the helper (and a root shell)
  # gets the same ones, whatever its PATH. The store paths in the binary also make nftables a
  # runtime dependency.
  env.WG_NAMESPACE_LIBNFTABLES = "${lib.getLib nftables}/lib/libnftables.so.1";
  env.WG_NAMESPACE_NFT = "${lib.getBin nftables}/bin/nft";

  meta = {
    description = "Network namespaces whose only way out is a WireGuard tunnel";
    mainProgram = "wg-namespace";
    platforms = lib.platforms.linux;
  };
}
