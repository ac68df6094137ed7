#!/usr/bin/env bash
# Control-plane fan-out benchmark: builds the release control plane and the benchmark,
# raises the open-files limit and runs it. Arguments go to the benchmark, e.g.
#   bash benches/run-fanout.sh --proxies 100,2000 --changes 20
# Results: benches/results/fanout.md (see benches/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p neutrino-control-plane -p neutrino-benches

# Each in-process proxy holds one socket, and so does the control plane (which inherits
# this limit) for each proxy. Where the hard limit is lower (e.g. in containers), use it.
want=65536
if ! ulimit -n "$want" 2>/dev/null; then
    hard=$(ulimit -Hn)
    echo "run-fanout: cannot raise the open-files limit to $want; using the hard limit $hard" >&2
    ulimit -n "$hard"
fi
echo "run-fanout: open-files limit $(ulimit -n); $(nproc) cores; $(free -g | awk '/^Mem:/ {print $2}') GiB" >&2

exec target/release/fanout "$@"
