# The files cargo needs to build and unit-test kvraft, and nothing else
# (tests/nix_packaging.rs builds from a copy of exactly this set).
{ lib }:

lib.fileset.unions [
  ../Cargo.toml
  ../Cargo.lock
  ../benches # cargo reads every target Cargo.toml declares, the flush_cost bench too
  ../build.rs
  ../proto
  ../src
]
