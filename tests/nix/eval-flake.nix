# Evaluates flake.nix's outputs with nixpkgs' lib and stand-ins for the few
# parts of nixpkgs that nix/package.nix and flake.nix use (full nixpkgs can't
# be fetched here), and returns what a user would run: the apps, the checks,
# the package's build settings and its source set. Run by
# tests/nix_packaging.rs:
#   nix-instantiate --eval --strict --json --read-write-mode tests/nix/eval-flake.nix \
#     --arg lib 'import <nixpkgs-lib>' [--argstr rustcVersion 1.87.0]
{
  lib,
  rustcVersion ? "1.88.0",
}:

let
  # nixpkgs' lib.fileset reads file types with builtins.readFileType (Nix
  # 2.14); Debian's Nix 2.8 has builtins.readDir, which says the same.
  libWithOldNix = lib.extend (
    _final: prev: {
      filesystem = prev.filesystem // {
        pathType =
          path:
          if builtins ? readFileType then
            builtins.readFileType path
          else if dirOf path == path then
            "directory"
          else
            (builtins.readDir (dirOf path)).${baseNameOf path};
      };
    }
  );

  standInDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  pkgsFor = system: rec {
    lib = libWithOldNix;
    stdenv.hostPlatform.system = system;
    rustc.version = rustcVersion;
    # What the package asks of the build, as the value to check.
    rustPlatform.buildRustPackage = args: args // standInDrv "${args.pname}-${args.version}";
    buildPackages = {
      writeShellScriptBin = name: _text: standInDrv name;
      protobuf = standInDrv "protobuf";
    };
    callPackage =
      fn: extra:
      import fn (
        {
          inherit lib rustc rustPlatform buildPackages;
        }
        // extra
      );
    nixfmt = standInDrv "nixfmt";
  };
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  nixpkgs = {
    lib = libWithOldNix;
    legacyPackages = libWithOldNix.genAttrs systems pkgsFor;
  };

  flake = import ../../flake.nix;
  self = flake.outputs { inherit self nixpkgs; } // {
    outPath = ../..;
  };
  system = "x86_64-linux";
  package = self.packages.${system}.kvraft;
in
{
  inputUrl = flake.inputs.nixpkgs.url;
  systems = builtins.attrNames self.packages;
  packages = builtins.attrNames self.packages.${system};
  apps = builtins.mapAttrs (_: app: { inherit (app) type program; }) self.apps.${system};
  checks = builtins.attrNames self.checks.${system};
  legacyPackages = builtins.attrNames self.legacyPackages.${system};
  hasOverlay = builtins.isFunction self.overlays.default;
  hasModule = builtins.isFunction self.nixosModules.default;
  hasFormatter = self.formatter.${system}.name;
  package = {
    inherit (package)
      pname
      version
      doCheck
      cargoTestFlags
      ;
    mainProgram = package.meta.mainProgram;
    out = package.outPath;
    # The store copy of the source set (fileset.toSource).
    src = "${package.src}";
    lockFile = toString package.cargoLock.lockFile;
  };
  # The files of the source set, as paths in this checkout.
  sourceFiles = map toString (
    libWithOldNix.fileset.toList (import ../../nix/source.nix { lib = libWithOldNix; })
  );
}
