#!/usr/bin/env bash
# User-space instructions per request of one outbound proxy, counted by callgrind: stable
# on a shared, noisy machine where CPU time is not (the figure "What changed it" in
# benches/README.md uses). Kernel time is not counted. Then the same for nginx as the
# benchmark's reverse proxy (proxy-nginx.conf, one process), for comparison.
#
#   bash benches/dataplane/instructions.sh              # HTTP/1.1 keep-alive 1 KiB, then gRPC unary
#   NGINX=0 bash benches/dataplane/instructions.sh      # Neutrino only
#   PROXY=/path/to/neutrino-proxy bash benches/dataplane/instructions.sh   # another build
#   N=20000 bash benches/dataplane/instructions.sh      # requests counted per workload
#   KEEP=/tmp/cg bash benches/dataplane/instructions.sh # keep the callgrind files (http1.cg, grpc.cg)
#                                                       # for callgrind_annotate --inclusive=yes
#
# Needs: valgrind, nginx, h2load, the release binaries (run.sh builds them). Starts a
# backend nginx, the gRPC backend, the control plane and one proxy under callgrind on
# 127.0.0.1:19080-19614, warms up, zeroes the counters, sends N requests, dumps, and
# prints instructions per request. Everything it starts is stopped on exit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
rel="$root/target/release"
proxy="${PROXY:-$root/target/proxy-release/neutrino-proxy}"
n="${N:-20000}"
die() { echo "instructions: ERROR: $*" >&2; exit 1; }
log() { echo "instructions: $*" >&2; }
for t in valgrind callgrind_control callgrind_annotate nginx h2load curl; do
    command -v "$t" >/dev/null || die "$t not found; apt-get install valgrind nginx nghttp2-client curl"
done
for b in "$proxy" "$rel/neutrino-control-plane" "$rel/grpc-backend"; do
    [[ -x $b ]] || die "$b missing; build with: bash benches/dataplane/run.sh (or cargo build --release; the proxy: --profile proxy-release)"
done
tmp=$(mktemp -d)
chmod 755 "$tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
wait_http() { # what url
    for _ in $(seq 300); do curl -sf "$2" >/dev/null && return 0; sleep 0.1; done
    die "$1 did not answer $2 within 30 s; logs in $tmp"
}

mkdir -p "$tmp/www" && head -c 1024 /dev/zero | tr '\0' x >"$tmp/www/1k"
sed -e "s#@DIR@#$tmp#g; s#@PORT@#19080#; s#@H2PORT@#19082#" "$here/backend-nginx.conf" >"$tmp/backend.conf"
nginx -c "$tmp/backend.conf" -p "$tmp" >"$tmp/nginx.log" 2>&1 & pids+=($!)
"$rel/grpc-backend" --addr 127.0.0.1:19084 >"$tmp/grpc.log" 2>&1 & pids+=($!)
cat >"$tmp/mesh.yaml" <<'EOF'
services:
  - name: bench
    namespace: default
    ports: [{port: 80, targetPort: 19080, protocol: http}]
    endpoints: [{address: 127.0.0.1, port: 19080, name: backend, capacity: {cpu: "100000", memory: 1Ti}}]
  - name: bench-grpc
    namespace: default
    ports: [{port: 80, targetPort: 19084, protocol: grpc}]
    endpoints: [{address: 127.0.0.1, port: 19084, name: grpc, capacity: {cpu: "100000", memory: 1Ti}}]
EOF
"$rel/neutrino-control-plane" --mesh-file "$tmp/mesh.yaml" --grpc-addr 127.0.0.1:19610 \
    --admin-addr 127.0.0.1:19614 --log warn >"$tmp/cp.log" 2>&1 & pids+=($!)
wait_http "control plane" http://127.0.0.1:19614/ready
log "starting the proxy under callgrind (slow: about 1,500 requests/s)"
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.%p" "$proxy" --pod bench-a \
    --control-plane 127.0.0.1:19610 --admin-addr 127.0.0.1:19390 --outbound-addr 127.0.0.1:19380 \
    --inbound-addr 127.0.0.1:19381 --log warn >"$tmp/proxy.log" 2>&1 & vg=$!; pids+=($vg)
wait_http "proxy" http://127.0.0.1:19390/ready

count() { # label, file name for KEEP, then the h2load arguments (of the process $vg, files $cgp.*)
    local label=$1 keep=$2; shift 2
    h2load "$@" -n 2000 >/dev/null || die "$label: warm-up failed"
    callgrind_control -z "$vg" >/dev/null 2>&1
    out=$(h2load "$@" -n "$n") || die "$label: h2load failed"
    grep -q "status codes: $n 2xx" <<<"$out" || die "$label: not every request got a 2xx: $(grep 'status codes' <<<"$out")"
    callgrind_control -d "$vg" >/dev/null 2>&1
    local f total
    for _ in $(seq 50); do f=$(ls -t "$tmp"/$cgp.*.[0-9]* 2>/dev/null | head -1); [[ -n $f ]] && break; sleep 0.1; done
    total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP" && mv "$f" "$KEEP/$keep.cg"; else rm -f "$f"; fi
    rm -f "$tmp"/$cgp.*.[0-9]*
    echo "$label: $((total / n)) instructions per request ($n requests)"
}
cgp=cg
count "HTTP/1.1 keep-alive 1 KiB, 64 connections" http1 --h1 -c 64 -t1 -H ':authority: bench.default' \
    http://127.0.0.1:19380/1k
python3 - "$tmp/grpc.bin" <<'EOF'
import sys
payload = b"\x0a\x20" + b"p" * 32  # field 1, 32 bytes
open(sys.argv[1], "wb").write(b"\x00" + len(payload).to_bytes(4, "big") + payload)
EOF
count "gRPC unary, 1 connection x 100 streams" grpc -c 1 -m 100 -t1 -d "$tmp/grpc.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' -H ':authority: bench-grpc.default' \
    http://127.0.0.1:19380/bench.Echo/Unary

[[ ${NGINX:-1} == 1 ]] || exit 0
# nginx, configured as in the benchmark, as one process (no master) under callgrind.
mkdir -p "$tmp/nginx-body" "$tmp/nginx-proxy" "$tmp/nginx-fastcgi" "$tmp/nginx-uwsgi" "$tmp/nginx-scgi"
sed -e "s#@DIR@#$tmp#g; s#@PORT@#19480#; s#@H2PORT@#19482#; s#@GRPCPORT@#19484#; s#@BACKEND@#19080#; s#@GRPCBACKEND@#19084#" \
    "$here/proxy-nginx.conf" >"$tmp/proxy-nginx.conf"
log "starting nginx (the benchmark's reverse proxy) under callgrind"
valgrind --tool=callgrind --callgrind-out-file="$tmp/cgn.%p" nginx -c "$tmp/proxy-nginx.conf" -p "$tmp" \
    -g 'master_process off;' >"$tmp/nginx-proxy.log" 2>&1 & vg=$!; pids+=($vg)
for _ in $(seq 300); do curl -sf http://127.0.0.1:19480/1k >/dev/null && break; sleep 0.1; done
cgp=cgn
count "nginx, HTTP/1.1 keep-alive 1 KiB, 64 connections" nginx-http1 --h1 -c 64 -t1 http://127.0.0.1:19480/1k
count "nginx, gRPC unary, 1 connection x 100 streams" nginx-grpc -c 1 -m 100 -t1 -d "$tmp/grpc.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' http://127.0.0.1:19484/bench.Echo/Unary
