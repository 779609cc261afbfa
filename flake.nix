{
  description = "kvraft: a replicated key-value store on Raft";

  # No flake.lock is committed yet: the first `nix flake lock` (or any nix
  # command on this flake) pins nixpkgs; commit the lock file it writes.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      cargoToml = lib.importTOML ./Cargo.toml;

      # raft-proto's build script (protobuf-build 0.14) runs `protoc` only to
      # write a FileDescriptorSet, and accepts only a protoc that reports
      # version 3.x; otherwise it runs the prebuilt protoc bundled in the
      # crate, an FHS binary that cannot run in the Nix sandbox or on NixOS.
      # This shim reports 3.x and runs the current protoc. (kvraft's own proto
      # is compiled by protox, in Rust: no protoc.)
      protocShimFor = pkgs: pkgs.writeShellScriptBin "protoc" ''
        if [ "$1" = "--version" ]; then echo "libprotoc 3.21.12"; exit 0; fi
        exec ${pkgs.protobuf}/bin/protoc "$@"
      '';

      kvraftFor = pkgs:
        pkgs.rustPlatform.buildRustPackage {
          pname = "kvraft";
          version = cargoToml.package.version;
          src = lib.cleanSourceWith {
            src = ./.;
            filter = path: type:
              let base = baseNameOf path; in
              !(type == "directory" && lib.elem base [ "target" "kvraft-data" "result" ]);
          };
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ (protocShimFor pkgs) ];
          # The test suite starts real kvraftd processes that bind loopback
          # ports and waits on wall-clock timeouts; it runs in CI (.ci/run),
          # not in the build sandbox. The NixOS VM test (checks) exercises the
          # built binaries.
          doCheck = false;
          postInstall = ''
            install -Dm644 packaging/kvraft.example.toml $out/share/doc/kvraft/kvraft.example.toml
          '';
          meta = {
            description = cargoToml.package.description;
            license = lib.licenses.asl20;
            mainProgram = "kvraftd";
            platforms = lib.platforms.linux;
          };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        kvraft = kvraftFor pkgs;
        default = kvraft;
      });

      overlays.default = final: _prev: { kvraft = kvraftFor final; };

      # services.kvraft; the package defaults to this flake's build.
      nixosModules.default = { pkgs, ... }: {
        imports = [ ./nix/module.nix ];
        services.kvraft.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            # promtool (prometheus' "cli" output in current nixpkgs)
            (prometheus.cli or prometheus)
            docker-compose
          ] ++ [ (protocShimFor pkgs) ];
        };
      });

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # Three NixOS VMs form a cluster from a static initialCluster and
        # serve a set/get through the kvraft CLI. Needs KVM to be quick.
        vm-test = import ./nix/vm-test.nix { inherit pkgs self; };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
