#!/usr/bin/env bash
# Selection simulator: builds it, runs the sweep (progress on stderr, one line per run),
# writes benches/results/simulate.md + CSV, and draws the PNG plots with matplotlib
# (installed with pip when missing). Arguments go to the simulator, e.g.
#   bash benches/run-simulate.sh --quick              # about 1 minute after the build
#   bash benches/run-simulate.sh --seeds 5 --only slow,hetero
# Results and how they are modelled: benches/README.md, "Selection simulator".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf 'run-simulate: %s\n' "$*" >&2; }

out=benches/results
args=("$@")
given=0
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --out) out="${args[$((i + 1))]:-$out}"; given=1 ;;
        --out=*) out="${args[$i]#--out=}"; given=1 ;;
    esac
done
[ "$given" = 1 ] || args=(--out "$out" "${args[@]}")

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
log "building (cargo build --release -p neutrino-benches --bin simulate)"
cargo build --release -p neutrino-benches --bin simulate

if ! python3 -c 'import matplotlib' 2>/dev/null; then
    log "installing matplotlib with pip (for the plots)"
    python3 -m pip install --quiet matplotlib 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages matplotlib \
        || log "matplotlib could not be installed; the tables are written, the plots are not"
fi

log "running the sweep on $(nproc) cores"
target/release/simulate "${args[@]}" >/dev/null
log "tables: $out/simulate.md"
if python3 -c 'import matplotlib' 2>/dev/null; then
    python3 benches/simulate-plot.py "$out"
fi
