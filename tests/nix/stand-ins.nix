# Stand-ins for the parts of nixpkgs that can't be fetched here, for the
# evaluation harnesses (eval-flake.nix, eval-module.nix): just enough of pkgs
# for nix/package.nix, nix/module.nix and flake.nix, with nixpkgs' own lib.
{
  lib,
  rustcVersion ? "1.88.0",
}:

rec {
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

  # The NixOS options services.kvraft sets, typed loosely.
  nixosStandIns =
    { lib, ... }:
    with lib;
    {
      options = {
        # Read by the stand-in evaluation below, as NixOS reads them.
        nixpkgs.pkgs = mkOption { type = types.unspecified; };
        boot.isContainer = mkOption {
          type = types.bool;
          default = false;
        };
        system.stateVersion = mkOption {
          type = types.str;
          default = "26.05";
        };
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
        systemd.timers = mkOption {
          type = types.attrsOf (types.attrsOf types.anything);
          default = { };
        };
      };
    };

  # lib.evalModules over NixOS stand-ins: the config of a "system" made of
  # `modules`, with pkgs taken from nixpkgs.pkgs as NixOS does.
  evalNixos =
    modules:
    (lib.evalModules {
      modules = modules ++ [
        nixosStandIns
        (
          { config, ... }:
          {
            _module.args.pkgs = config.nixpkgs.pkgs;
          }
        )
      ];
    }).config;

  # nixpkgs' lib with nixosSystem (from nixpkgs' flake.nix) standing in.
  libWithNixosSystem = libWithOldNix // {
    nixosSystem = { modules }: { config = evalNixos modules; };
  };

  # A derivation as far as the Nix code can tell: an out path to interpolate.
  standInDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  # nixpkgs renders formats.toml with remarshal; kvraftd's configuration is
  # flat, so scalars (and lists of them) as TOML is all this needs.
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

  pkgsFor = system: rec {
    lib = libWithOldNix;
    stdenv = {
      hostPlatform.system = system;
      buildPlatform.canExecute = _: true;
    };
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
          inherit
            lib
            rustc
            rustPlatform
            buildPackages
            ;
        }
        // extra
      );
    coreutils = standInDrv "coreutils";
    nixfmt = standInDrv "nixfmt";
    nixfmt-tree = standInDrv "nixfmt-tree";
    formats.toml = _: {
      type =
        with lib.types;
        let
          scalar = oneOf [
            bool
            int
            float
            str
          ];
        in
        attrsOf (either scalar (listOf scalar));
      generate =
        name: value:
        builtins.toFile name (
          lib.concatStrings (lib.mapAttrsToList (k: v: "${k} = ${tomlValue v}\n") value)
        );
    };
    # A build step, kept as text: the test runs it with the real kvraftd in
    # place of the stand-in package.
    runCommandLocal =
      name: _env: buildCommand:
      standInDrv name // { inherit buildCommand; };
    runCommand = runCommandLocal;
  };
}
