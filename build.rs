//! Compiles `proto/kvraft.proto` with prost-build. `protox` parses the file in
//! pure Rust, so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kvraft.proto");
    let descriptors = protox::compile(["proto/kvraft.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes([".kvraft.StoredValue.value"])
        .compile_fds(descriptors)?;
    Ok(())
}
