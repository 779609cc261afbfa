# Evaluates nix/module.nix for one case with nixpkgs' lib.evalModules, as
# NixOS would, but with stand-ins for the NixOS options the module sets and
# for the few parts of pkgs it uses (full nixpkgs can't be fetched here).
# Run by tests/nix_packaging.rs:
#   nix-instantiate --eval --strict --json --read-write-mode tests/nix/eval-module.nix \
#     --arg lib 'import <nixpkgs-lib>' --argstr group good --argstr case defaults
#     [--argstr package checkout]
{
  lib,
  group,
  case,
  # "overlay": pkgs.kvraft exists (the flake's overlay); "checkout": it doesn't.
  package ? "overlay",
}:

let
  cases = import ./module-cases.nix;
  entry = cases.${group}.${case};
  options = if group == "good" then entry else entry.options;

  standIns = import ./stand-ins.nix { inherit lib; };
  # pkgs.kvraft is what the flake's overlay adds; without it the module
  # builds nix/package.nix (the stand-in evaluates it).
  pkgs =
    standIns.pkgsFor "x86_64-linux"
    // lib.optionalAttrs (package == "overlay") { kvraft = standIns.standInDrv "kvraft-stand-in"; };

  evalWith =
    options:
    standIns.evalNixos [
      ../../nix/module.nix
      {
        nixpkgs.pkgs = pkgs;
        services.kvraft = options // {
          enable = true;
        };
      }
    ];
  config = evalWith options;
  source = config.environment.etc."kvraft/kvraft.toml".source;
  # The same settings without the build step: the rendered file itself.
  rendered = (evalWith (options // { checkConfig = false; })).environment.etc."kvraft/kvraft.toml".source;
  service = config.systemd.services.kvraft;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  warnings = config.warnings;
  # With checkConfig: the build step whose output is the installed file.
  checkScript = source.buildCommand or null;
  configText = builtins.readFile rendered;
  standInPackage = config.services.kvraft.package.outPath;
  environment = service.serviceConfig.Environment;
  loadCredential = service.serviceConfig.LoadCredential;
  serviceConfig = builtins.removeAttrs service.serviceConfig [
    "Environment"
    "LoadCredential"
  ];
  startLimit = {
    inherit (service) startLimitIntervalSec startLimitBurst;
  };
  firewall = config.networking.firewall;
  daemonSays = entry.daemonSays or null;
  message = entry.message or null;
}
