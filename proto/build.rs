//! Compiles `proto/` in pure Rust (protox), so building needs no `protoc` on the machine.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/neutrino/mesh/v1/mesh.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // Round-trip through bytes so protox's prost-types version need not match ours.
    let fds = prost_types_compat(fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .btree_map(".")
        // The proxy's /config_dump renders resources as JSON.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}

fn prost_types_compat(bytes: Vec<u8>) -> Result<tonic_prost_build::FileDescriptorSet, prost::DecodeError> {
    tonic_prost_build::FileDescriptorSet::decode(bytes.as_slice())
}
