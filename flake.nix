{
  description = "kvraft: a replicated key-value store on Raft";

  # A supported NixOS release (26.05: security fixes until the end of 2026),
  # locked in flake.lock to one revision. To move the lock forward, run
  # `nix flake update` on a networked machine and commit flake.lock; for the
  # next release, change the ref here first. Needs Nix 2.18 or newer with the
  # nix-command and flakes features.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      app = package: name: description: {
        type = "app";
        program = "${package}/bin/${name}";
        meta = { inherit description; };
      };
    in
    {
      # `nix build`: kvraftd and the kvraft CLI, with the unit tests run in
      # the build.
      packages = forAllSystems (
        _system: pkgs: rec {
          kvraft = pkgs.callPackage ./nix/package.nix { };
          default = kvraft;
        }
      );

      # `nix run .#kvraft -- get k` is the CLI; `nix run` (or .#kvraftd) a
      # one-node server on 127.0.0.1 with its data in ./kvraft-data.
      apps = forAllSystems (
        system: _pkgs:
        let
          package = self.packages.${system}.kvraft;
        in
        rec {
          kvraft = app package "kvraft" "The kvraft CLI: set, get, delete, scan, members, add-node, bench, certs";
          kvraftd = app package "kvraftd" "A kvraft node (a one-node cluster on 127.0.0.1 without flags)";
          default = kvraftd;
        }
      );

      overlays.default = final: _prev: { kvraft = final.callPackage ./nix/package.nix { }; };

      # services.kvraft; the package defaults to this flake's build.
      nixosModules.default =
        { pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.kvraft.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      # `nix flake check`: runs without KVM.
      checks = forAllSystems (
        system: pkgs: {
          # The build runs the unit tests (doCheck).
          package = self.packages.${system}.kvraft;
          # services.kvraft evaluated as real NixOS systems: good settings
          # render files kvraftd accepts, bad ones fail with their assertion.
          module = import ./nix/module-check.nix { inherit pkgs self nixpkgs; };
        }
      );

      # Needs KVM (`kvm` in the machine's system-features), so it is not in
      # `checks`: nix build .#vm-test -L
      legacyPackages = forAllSystems (
        _system: pkgs: {
          vm-test = import ./nix/vm-test.nix { inherit pkgs self; };
        }
      );

      devShells = forAllSystems (
        _system: pkgs: {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.kvraft ];
            packages = with pkgs; [
              clippy
              rustfmt
              cargo-nextest
              (prometheus.cli or prometheus) # promtool
              docker-compose
              nixfmt
            ];
          };
        }
      );

      # nixfmt over the whole tree (plain nixfmt would wait on stdin under
      # `nix fmt`, which passes no arguments since Nix 2.25).
      formatter = forAllSystems (_system: pkgs: pkgs.nixfmt-tree);
    };
}
