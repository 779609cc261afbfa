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
  # "wrong-message": checks.module given a bad case whose expected message
  # no assertion has, which it must reject.
  mutate ? "none",
}:

let
  standIns = import ./stand-ins.nix { inherit lib rustcVersion; };
  libWithOldNix = standIns.libWithOldNix;
  pkgsFor = standIns.pkgsFor;
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  nixpkgs = {
    lib = standIns.libWithNixosSystem;
    legacyPackages = libWithOldNix.genAttrs systems pkgsFor;
  };

  flake = import ../../flake.nix;
  self = flake.outputs { inherit self nixpkgs; } // {
    outPath = ../..;
  };
  system = "x86_64-linux";
  package = self.packages.${system}.kvraft;
  cases = import ./module-cases.nix;
  moduleCheck =
    if mutate == "wrong-message" then
      import ../../nix/module-check.nix {
        inherit self nixpkgs;
        pkgs = pkgsFor system;
        cases = lib.recursiveUpdate cases {
          bad.join-and-initial-cluster.message = "a message no assertion has";
        };
      }
    else
      self.checks.${system}.module;
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
  # What checks.module builds: each good case's configuration file (their
  # checkConfig steps are its inputs).
  moduleCheck = moduleCheck.buildCommand;
  # The files of the source set, as paths in this checkout.
  sourceFiles = map toString (
    libWithOldNix.fileset.toList (import ../../nix/source.nix { lib = libWithOldNix; })
  );
}
