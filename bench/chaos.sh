#!/usr/bin/env bash
# Chaos run: wrk sends GETs through Turnpike to an upstream of three nginx
# nodes while the nodes are killed (SIGKILL) and restarted at random, at
# least one always up. Prints requests sent and failed (non-2xx responses
# plus socket errors). Target: no failed request.
#
# Usage:
#   bench/chaos.sh                     # 60 s (builds turnpike first)
#   DURATION=20 SKIP_BUILD=1 bench/chaos.sh
#
# Environment:
#   DURATION      seconds of load and chaos          (default 60)
#   CONNECTIONS   wrk connections                    (default 20)
#   SKIP_BUILD    1 = use the existing release binary
#   KEEP_TMP      1 = keep the temp dir (configs, logs)
#
# The upstream has active checks (every second, out after one failed
# connection) and passive checks, and the default retries: a request whose
# connection fails moves to another node. The report goes to stdout and to
# bench/out/chaos-<timestamp>.txt.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
DURATION=${DURATION:-60}
CONNECTIONS=${CONNECTIONS:-20}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
TURNPIKE_BIN=${TURNPIKE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/turnpike}

log() { printf '[chaos] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for tool in nginx wrk python3 curl; do
    command -v "$tool" >/dev/null 2>&1 && continue
    [[ $tool == nginx || $tool == wrk ]] || die "$tool is required"
    log "installing nginx-light and wrk"
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light wrk
done
NGINX=$(command -v nginx)

if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release -p turnpike"
    (cd "$ROOT" && cargo build --release -p turnpike)
fi
[[ -x $TURNPIKE_BIN ]] || die "turnpike binary not found at $TURNPIKE_BIN"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/turnpike-chaos.XXXXXX")
chmod 755 "$TMP"
NODE_PIDS=(0 0 0)
GATEWAY_PID=""
cleanup() {
    local pid
    for pid in "${NODE_PIDS[@]}" "$GATEWAY_PID"; do
        if [[ -n $pid && $pid != 0 ]]; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

mapfile -t PORTS < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
for s in socks: print(s.getsockname()[1])
')
NODE_PORTS=("${PORTS[0]}" "${PORTS[1]}" "${PORTS[2]}")
LISTEN_PORT=${PORTS[3]}
STATUS_PORT=${PORTS[4]}

# One nginx process per node (no master), so SIGKILL takes it down whole.
node_conf() { # node_conf INDEX
    local i=$1 dir="$TMP/node$1"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:${NODE_PORTS[i]} reuseport;
        location / { return 200 "node $i\n"; }
    }
}
CONF
}

start_node() { # start_node INDEX
    "$NGINX" -p "$TMP/node$1" -c "$TMP/node$1/nginx.conf" >/dev/null 2>&1 &
    NODE_PIDS[$1]=$!
    local n
    for ((n = 0; n < 50; n++)); do
        curl -fs "http://127.0.0.1:${NODE_PORTS[$1]}/" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "node $1 did not start"
}

kill_node() { # kill_node INDEX
    kill -9 "${NODE_PIDS[$1]}" 2>/dev/null || true
    wait "${NODE_PIDS[$1]}" 2>/dev/null || true
    NODE_PIDS[$1]=0
}

for i in 0 1 2; do
    node_conf "$i"
    start_node "$i"
done

cat >"$TMP/turnpike.yaml" <<CONF
gateway:
  listen: ["127.0.0.1:$LISTEN_PORT"]
  status: {listen: "127.0.0.1:$STATUS_PORT"}
  workers: 1
upstreams:
  - id: chaos
    nodes:
      "127.0.0.1:${NODE_PORTS[0]}": 1
      "127.0.0.1:${NODE_PORTS[1]}": 1
      "127.0.0.1:${NODE_PORTS[2]}": 1
    timeout: {connect: 1, send: 5, read: 5}
    checks:
      active:
        type: tcp
        timeout: 0.5
        healthy: {interval: 1, successes: 1}
        unhealthy: {interval: 1, tcp_failures: 1}
      passive:
        unhealthy: {tcp_failures: 1, timeouts: 1}
routes:
  - {id: chaos, uri: "/*", upstream_id: chaos}
CONF
"$TURNPIKE_BIN" run -c "$TMP/turnpike.yaml" >"$TMP/turnpike.log" 2>&1 &
GATEWAY_PID=$!
for ((n = 0; n < 100; n++)); do
    curl -fs "http://127.0.0.1:$STATUS_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$STATUS_PORT/readyz" >/dev/null || die "turnpike did not start (see $TMP/turnpike.log)"

log "load: wrk -c$CONNECTIONS -d${DURATION}s; chaos: a node killed or restarted every 0.5-2 s"
wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$LISTEN_PORT/" >"$TMP/wrk.txt" 2>&1 &
WRK_PID=$!
kills=0
restarts=0
end=$((SECONDS + DURATION))
while ((SECONDS < end)); do
    sleep "$(python3 -c 'import random; print(round(random.uniform(0.5, 2), 2))')"
    i=$((RANDOM % 3))
    if [[ ${NODE_PIDS[$i]} == 0 ]]; then
        start_node "$i"
        restarts=$((restarts + 1))
    else
        up=0
        for p in "${NODE_PIDS[@]}"; do [[ $p != 0 ]] && up=$((up + 1)); done
        if ((up > 1)); then
            kill_node "$i"
            kills=$((kills + 1))
        fi
    fi
done
wait "$WRK_PID" || true

sent=$(awk '/requests in/ {print $1}' "$TMP/wrk.txt")
non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$TMP/wrk.txt")
sockerr=$(awk '/Socket errors:/ {s=0; for (i=3;i<=NF;i++) {f=$i; gsub(/,/,"",f); if (f ~ /^[0-9]+$/) s+=f}; print s}' "$TMP/wrk.txt")
failed=$((${non2xx:-0} + ${sockerr:-0}))
mkdir -p "$BENCH_DIR/out"
report="$BENCH_DIR/out/chaos-$(date -u +%Y%m%d-%H%M%S).txt"
{
    echo "Turnpike chaos run (bench/chaos.sh)"
    echo "date:        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "duration:    ${DURATION}s, wrk -c$CONNECTIONS, 3 nginx nodes"
    echo "chaos:       $kills kills, $restarts restarts (SIGKILL; at least one node always up)"
    echo "sent:        $sent"
    echo "failed:      $failed (non-2xx ${non2xx:-0}, socket errors ${sockerr:-0})"
    echo "gateway log: $(grep -c 'node is unhealthy' "$TMP/turnpike.log") nodes marked down, $(grep -c 'healthy again' "$TMP/turnpike.log") back"
} | tee "$report"
((failed == 0)) || exit 1
