# The kvraft package: kvraftd and the kvraft CLI. callPackage-able, so the
# NixOS module can build it without the flake (pkgs.callPackage ./package.nix { }).
{
  lib,
  rustPlatform,
  rustc,
  buildPackages,
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;

  # raft-proto's build script (protobuf-build 0.14) runs `protoc` only to
  # write a FileDescriptorSet, and accepts only a protoc that reports version
  # 3.x; otherwise it runs the prebuilt protoc bundled in the crate, an FHS
  # binary that cannot run in the Nix sandbox or on NixOS. This shim reports
  # 3.x and runs the current protoc. It runs on the build machine, so both
  # come from buildPackages (cross-safe). kvraft's own proto is compiled by
  # protox, in Rust: no protoc.
  protocShim = buildPackages.writeShellScriptBin "protoc" ''
    if [ "$1" = "--version" ]; then echo "libprotoc 3.21.12"; exit 0; fi
    exec ${buildPackages.protobuf}/bin/protoc "$@"
  '';
in
assert lib.assertMsg (lib.versionAtLeast rustc.version cargoToml.package.rust-version)
  "kvraft needs Rust ${cargoToml.package.rust-version} or newer (Cargo.toml's rust-version, which the locked dependencies need); this nixpkgs has ${rustc.version}. Use nixpkgs 26.05 or newer.";
rustPlatform.buildRustPackage {
  pname = "kvraft";
  version = cargoToml.package.version;

  # Only what cargo reads: edits to the README, packaging or tests don't
  # rebuild, and `result`, `target` and `.git` never enter the store.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = import ./source.nix { inherit lib; };
  };

  cargoLock.lockFile = ../Cargo.lock;
  nativeBuildInputs = [ protocShim ];

  # The unit tests (in src/) run in the build: the config checks, the codec,
  # the peer guard's rules, storage on a temp dir, the state machine. The
  # integration tests in tests/ start clusters of real processes on loopback
  # with wall-clock deadlines; they run in CI (.ci/run) and are not part of
  # the source set.
  doCheck = true;
  cargoTestFlags = [
    "--lib"
    "--bins"
  ];

  postInstall = ''
    install -Dm644 ${../packaging/kvraft.example.toml} $out/share/doc/kvraft/kvraft.example.toml
  '';

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.asl20;
    # `nix run .#kvraft` is the CLI (apps.kvraft); `nix run .#kvraftd` the server.
    mainProgram = "kvraft";
    platforms = lib.platforms.linux;
  };
}
