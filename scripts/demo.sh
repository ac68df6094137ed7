#!/usr/bin/env bash
# The main job: build Neutrino and run the local demo mesh on examples/mesh.yaml.
# Needs only a Rust toolchain (cargo); protobuf is compiled in pure Rust.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
echo "== building (release) =="
cargo build --release --workspace --bins
echo "== running the demo =="
exec target/release/neutrino demo --mesh-file examples/mesh.yaml "$@"
