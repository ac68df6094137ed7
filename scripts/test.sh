#!/usr/bin/env bash
# Every test, from a fresh machine: installs what the tests need, checks formatting and
# lints, builds the binaries the end-to-end tests start, then runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s ==\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }

# Real tools the end-to-end tests drive: iptables and iproute2 (network namespaces and
# nat rules), util-linux (setpriv), curl (the HTTP client), python3 (http.server
# backends), redis-server (the request log). Installed only when missing, so a
# developer's machine is left alone.
need=()
for pair in iptables:iptables ip:iproute2 setpriv:util-linux curl:curl python3:python3 redis-server:redis-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  step "installing ${need[*]} (apt-get)"
  if [ "$(id -u)" -ne 0 ]; then echo "run as root to install ${need[*]}, or install them yourself" >&2; exit 1; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# The real gRPC client and server of the interception tests.
if ! python3 -c "import grpc" 2>/dev/null; then
  step "installing grpcio (pip)"
  python3 -m pip install --quiet --disable-pip-version-check grpcio
fi

# Offline Kubernetes schema validation of `neutrino install` (cli/tests/install.rs).
if ! python3 -c "import kubernetes_validate" 2>/dev/null; then
  step "installing kubernetes-validate (pip)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

step "format"
cargo fmt --all --check
step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build binaries for the end-to-end tests"
cargo build --workspace --bins --locked
step "test"
cargo nextest run --workspace --locked --no-fail-fast
