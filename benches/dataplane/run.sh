#!/usr/bin/env bash
# Data-path benchmark (issue 4, first slice): Neutrino vs nginx and HAProxy, on loopback.
#
#   bash benches/dataplane/run.sh            # install what is missing, build, run, report
#   DURATION=5 bash benches/dataplane/run.sh # shorter measurement windows (seconds)
#   SKIP_INSTALL=1 SKIP_BUILD=1 bash benches/dataplane/run.sh   # reuse tools and binaries
#   bash benches/dataplane/run.sh outage   # the request log and traces while their sinks fail
#
# Results: benches/results/dataplane.md (printed too) and
# benches/results/dataplane-latency.png. How it works: benches/README.md, section
# "Data path: Neutrino vs nginx and HAProxy". The orchestration is bench.py next to
# this file (with procs.py, targets.py, workloads.py, report.py); it starts every
# process itself and stops all of them on any exit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

log() { echo "dataplane: $*" >&2; }
die() { echo "dataplane: ERROR: $*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------
if [[ -z "${SKIP_INSTALL:-}" ]]; then
    missing=()
    for pair in nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client redis-server:redis-server perf:linux-perf; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    if ((${#missing[@]})); then
        [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} and not root; install them with apt-get or run as root"
        log "installing ${missing[*]} with apt-get (progress below)"
        apt-get update -q || die "apt-get update failed; check network access to the Debian mirrors"
        # linux-perf is optional (profiling only): install it separately so that its
        # absence never stops the benchmark.
        required=()
        for p in "${missing[@]}"; do [[ $p == linux-perf ]] || required+=("$p"); done
        if ((${#required[@]})); then
            DEBIAN_FRONTEND=noninteractive apt-get install -y "${required[@]}" \
                || die "apt-get install ${required[*]} failed; see the output above"
        fi
        if [[ " ${missing[*]} " == *" linux-perf "* ]]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y linux-perf \
                || log "linux-perf could not be installed; continuing without profiles"
        fi
        # Debian's packages start the system nginx/haproxy where an init system runs;
        # the benchmark uses its own instances on its own ports and never touches those.
    fi
    if ! command -v oha >/dev/null 2>&1 && [[ ! -x "$HOME/.cargo/bin/oha" ]]; then
        log "installing oha (fixed-rate latency) with cargo install --locked oha; at most 10 minutes"
        if ! timeout 600 cargo install --locked oha; then
            log "oha could not be installed within 10 minutes; latency at a fixed rate falls back to wrk's"
        fi
    fi
    python3 -c 'import grpc' 2>/dev/null || {
        log "installing grpcio with pip (to check that every target answers the gRPC call)"
        pip install --quiet grpcio 2>/dev/null \
            || pip install --quiet --break-system-packages grpcio \
            || die "grpcio could not be installed; the gRPC targets cannot be checked (pip install grpcio)"
    }
    python3 -c 'import matplotlib' 2>/dev/null || {
        log "installing matplotlib with pip (for the latency plot)"
        pip install --quiet matplotlib 2>/dev/null \
            || pip install --quiet --break-system-packages matplotlib \
            || log "matplotlib could not be installed; no PNG plot will be drawn"
    }
fi
export PATH="$HOME/.cargo/bin:$PATH"
for t in nginx haproxy wrk python3; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found; run without SKIP_INSTALL or install it"
done

# --- build -------------------------------------------------------------------
if [[ -z "${SKIP_BUILD:-}" ]]; then
    log "building Neutrino (release; the proxy with its shipped profile, proxy-release: fat LTO, a 2-3 minute link)"
    cargo build --release -p neutrino-control-plane \
        || die "cargo build --release failed; see the compiler output above"
    cargo build --profile proxy-release -p neutrino-proxy --bin neutrino-proxy \
        || die "cargo build --profile proxy-release -p neutrino-proxy failed; see the compiler output above"
    # The gRPC unary workload's backend (benches/src/grpc_backend).
    log "building the gRPC backend (release)"
    cargo build --release -p neutrino-benches --bin grpc-backend \
        || die "cargo build --release -p neutrino-benches --bin grpc-backend failed; see the compiler output above"
fi
for b in release/neutrino-control-plane proxy-release/neutrino-proxy release/grpc-backend; do
    [[ -x target/$b ]] || die "target/$b is missing; run without SKIP_BUILD"
done

# --- limits ------------------------------------------------------------------
# 10,000 idle connections need 10,000 descriptors in the client and in each proxy
# (plus upstream ones). Use the hard limit where it is lower than 65,536.
want=65536
if ! ulimit -n "$want" 2>/dev/null; then
    hard=$(ulimit -Hn)
    log "cannot raise the open-files limit to $want; using the hard limit $hard"
    ulimit -n "$hard" || die "cannot raise the open-files limit to $hard"
fi
log "open-files limit $(ulimit -n); $(nproc) cores; $(free -g | awk '/^Mem:/ {print $2}') GiB"

script=bench.py
if [[ "${1:-}" == "outage" ]]; then
    shift
    script=outage.py
fi
exec python3 "$here/$script" --root "$root" "$@"
