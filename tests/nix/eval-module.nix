# Evaluates nix/module.nix for one case with nixpkgs' lib.evalModules, as
# NixOS would, but with stand-ins for the NixOS options the module sets and
# for the few parts of pkgs it uses (full nixpkgs can't be fetched here).
# Run by tests/nix_packaging.rs:
#   nix-instantiate --eval --strict --json --read-write-mode tests/nix/eval-module.nix \
#     --arg lib 'import <nixpkgs-lib>' --argstr group good --argstr case defaults
{
  lib,
  group,
  case,
}:

let
  cases = import ./module-cases.nix;
  entry = cases.${group}.${case};
  options = if group == "good" then entry else entry.options;

  # A derivation as far as the module can tell: an out path to interpolate.
  standInDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  # nixpkgs renders formats.toml with remarshal; kvraftd's configuration is
  # flat, so scalars (and lists of them) as TOML is all this stand-in needs.
  tomlValue =
    v:
    if builtins.isBool v then
      lib.boolToString v
    else if builtins.isInt v || builtins.isFloat v then
      toString v
    else if builtins.isString v then
      builtins.toJSON v # a JSON string is a TOML basic string
    else if builtins.isList v then
      "[ ${lib.concatMapStringsSep ", " tomlValue v} ]"
    else
      throw "stand-in formats.toml: ${builtins.typeOf v} values are not supported";

  pkgs = {
    kvraft = standInDrv "kvraft-stand-in";
    coreutils = standInDrv "coreutils-stand-in";
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
    formats.toml = _: {
      type =
        with lib.types;
        attrsOf (oneOf [
          bool
          int
          float
          str
          (listOf (oneOf [
            bool
            int
            float
            str
          ]))
        ]);
      generate =
        name: value:
        builtins.toFile name (
          lib.concatStrings (lib.mapAttrsToList (k: v: "${k} = ${tomlValue v}\n") value)
        );
    };
    # The build step that checks the file: kept as text, which the test runs
    # with the real kvraftd in place of the stand-in package.
    runCommandLocal =
      name: _env: buildCommand:
      standInDrv name // { inherit buildCommand; };
  };

  # The NixOS options services.kvraft sets, typed loosely.
  nixosStandIns =
    { lib, ... }:
    with lib;
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        environment.etc = mkOption {
          type = types.attrsOf (types.attrsOf types.anything);
          default = { };
        };
        networking.firewall.allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        networking.firewall.interfaces = mkOption {
          type = types.attrsOf (
            types.submodule {
              options.allowedTCPPorts = mkOption {
                type = types.listOf types.port;
                default = [ ];
              };
            }
          );
          default = { };
        };
        systemd.services = mkOption {
          type = types.attrsOf (types.attrsOf types.anything);
          default = { };
        };
      };
    };

  evalWith =
    options:
    (lib.evalModules {
      modules = [
        ../../nix/module.nix
        nixosStandIns
        { services.kvraft = options // { enable = true; }; }
      ];
      specialArgs = { inherit pkgs; };
    }).config;
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
  standInPackage = pkgs.kvraft.outPath;
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
