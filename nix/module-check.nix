# checks.module: services.kvraft on real NixOS (nixpkgs' own modules), no VM.
# Every good case of tests/nix/module-cases.nix must evaluate without a failed
# assertion, and its configuration file must build: with checkConfig (the
# default) the build runs `kvraftd --print-config` on it. Every bad case must
# fail evaluation with its assertion's message. tests/nix_packaging.rs runs
# the same cases on machines without nixpkgs, with stand-ins for NixOS.
{
  pkgs,
  self,
  nixpkgs,
  cases ? import ../tests/nix/module-cases.nix,
}:

let
  lib = nixpkgs.lib;

  evalCase =
    options:
    (lib.nixosSystem {
      modules = [
        self.nixosModules.default
        {
          # The flake's nixpkgs (and its platform), not a new instance per case.
          nixpkgs.pkgs = pkgs;
          # Enough of a system to evaluate: no boot loader, no file systems.
          boot.isContainer = true;
          system.stateVersion = "26.05";
          services.kvraft = options // {
            enable = true;
          };
        }
      ];
    }).config;
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  badProblems = lib.concatLists (
    lib.mapAttrsToList (
      name: case:
      let
        failed = failedAssertions (evalCase case.options);
      in
      lib.optional (!lib.any (lib.hasInfix case.message) failed) "bad case ${name}: expected a failed assertion containing \"${case.message}\", got ${builtins.toJSON failed}"
    ) cases.bad
  );

  goodFiles = lib.mapAttrs (
    name: options:
    let
      config = evalCase options;
      failed = failedAssertions config;
    in
    if failed != [ ] then
      throw "good case ${name}: ${lib.concatStringsSep "; " failed}"
    else
      config.environment.etc."kvraft/kvraft.toml".source
  ) cases.good;
in
if badProblems != [ ] then
  throw (lib.concatStringsSep "\n" badProblems)
else
  pkgs.runCommand "kvraft-module-check" { } ''
    mkdir $out
    ${lib.concatStrings (lib.mapAttrsToList (name: file: "cp ${file} $out/${name}.toml\n") goodFiles)}
  ''
