//! Compiles the gRPC benchmark backend's `src/grpc_backend/bench.proto` in pure Rust
//! (protox, as `proto/build.rs` does), so building needs no `protoc` on the machine.
//! It generates only the server side; it must not grow into a second API crate.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "src/grpc_backend/bench.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["src/grpc_backend"])?;
    // Round-trip through bytes so protox's prost-types version need not match ours.
    let fds = tonic_prost_build::FileDescriptorSet::decode(fds.encode_to_vec().as_slice())?;
    tonic_prost_build::configure()
        .build_client(false)
        // The reply is built once and shared: `Bytes` clones without copying.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
