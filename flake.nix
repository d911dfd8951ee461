{
  description = "NixOS module and helper for network namespaces whose only way out is WireGuard";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      nixosModules.default = ./nix/module.nix;

      overlays.default = final: _prev: {
        wg-namespace = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);

      checks = forAllSystems (
        pkgs:
        let
          module = self.nixosModules.default;
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          module-eval = import ./nix/tests/eval.nix { inherit nixpkgs pkgs module; };
          vm = import ./nix/tests/vm.nix { inherit pkgs module; };
        }
      );
    };
}
