#!/usr/bin/env bash
# Control-plane benchmark: how fast a change reaches every node of an etcd
# cluster (p50/p99 over CHANGES writes), and what a snapshot rebuild at
# ROUTES routes costs while traffic flows. See bench/control_plane.py.
#
# Usage:
#   bench/control-plane.sh                 # both parts (builds turnpike first)
#   bench/control-plane.sh propagation     # one part
#   CHANGES=200 ROUTES=10000 WRITES=20 WRK_SECONDS=10 bench/control-plane.sh
#
# Installs etcd-server, wrk and python3 with apt-get when missing. Everything
# runs on 127.0.0.1; the report is printed and written to
# bench/out/control-plane-<timestamp>.txt.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
install etcd etcd-server
install wrk wrk
install python3 python3

build_turnpike
mkdir -p "$BENCH_DIR/out"
out="$BENCH_DIR/out/control-plane-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
    echo "# bench/control-plane.sh $* on $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD)"
    python3 "$BENCH_DIR/control_plane.py" "$@"
} | tee "$out"
