#!/usr/bin/env bash
# Memory and load time: idle RSS with the example config and with the
# plugins bench config (key-auth, proxy-rewrite, cors), RSS with 10,000
# routes, and how long a reload of those 10,000 routes takes.
#
#   bench/memory.sh            (SKIP_BUILD=1 to use an existing release binary)
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
build_turnpike
BIN=$TURNPIKE_BIN
TMP=$(mktemp -d)
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
wait_ready() {
    for _ in $(seq 1 200); do
        curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "turnpike did not become ready" >&2; cat "$TMP/log" >&2; exit 1
}
header() {
    printf 'gateway:\n  listen: ["127.0.0.1:%s"]\n  status: {listen: "127.0.0.1:%s"}\n  workers: %s\n' "$1" "$2" "$3"
}

# 1. Idle, with the example config's two routes, one worker and one per core.
for workers in 1 0; do
    P=$(port); S=$(port)
    { header "$P" "$S" "$workers"; sed -n '/^upstreams:/,$p' "$ROOT/conf/turnpike.yaml"; } > "$TMP/idle.yaml"
    "$BIN" run -c "$TMP/idle.yaml" > "$TMP/log" 2>&1 & PID=$!
    wait_ready "$S"; sleep 1
    echo "idle RSS (example config, workers: $workers): $(rss_kib $PID) KiB"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
done

# 1b. Idle, with bench/turnpike-plugins.yaml.tmpl: the plugins' schema
# validators are compiled when a config first uses them.
P=$(port); S=$(port); U=$(port)
sed -e "s/@LISTEN_PORT@/$P/; s/@STATUS_PORT@/$S/; s/@UPSTREAM_PORT@/$U/" \
    "$BENCH_DIR/turnpike-plugins.yaml.tmpl" > "$TMP/plugins.yaml"
"$BIN" run -c "$TMP/plugins.yaml" > "$TMP/log" 2>&1 & PID=$!
wait_ready "$S"; sleep 1
echo "idle RSS (key-auth + proxy-rewrite + cors, workers: 1): $(rss_kib $PID) KiB"
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""

# 2. 10,000 routes: static, parameter, prefix and host routes over 50 upstreams.
P=$(port); S=$(port)
python3 - "$P" "$S" > "$TMP/10k.yaml" <<'PY'
import sys
p, s = sys.argv[1], sys.argv[2]
print(f'gateway:\n  listen: ["127.0.0.1:{p}"]\n  status: {{listen: "127.0.0.1:{s}"}}\n  workers: 1\nupstreams:')
for u in range(50):
    print(f'  - {{id: u{u}, nodes: {{"127.0.0.1:{8000+u}": 1, "127.0.0.2:{8000+u}": 2}}}}')
print('routes:')
for i in range(10000):
    kind = i % 4
    uri = [f"/api/v1/service{i}/resource", f"/users{i}/:id/profile", f"/static{i}/*", f"/host{i}/*"][kind]
    hosts = f', hosts: ["svc{i}.example.com"]' if kind == 3 else ''
    print(f'  - {{id: {i}, uri: "{uri}"{hosts}, methods: [GET, POST], upstream_id: u{i % 50}}}')
PY
start=$(date +%s%N)
"$BIN" run -c "$TMP/10k.yaml" > "$TMP/log" 2>&1 & PID=$!
wait_ready "$S"
ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
sleep 1
echo "10,000 routes: ready in ${ready_ms} ms (process start, parse, compile, listen); RSS $(rss_kib $PID) KiB"
echo "# edited $(date +%s%N)" >> "$TMP/10k.yaml"
for _ in $(seq 1 100); do grep -q "configuration reloaded" "$TMP/log" && break; sleep 0.05; done
echo "reload of 10,000 routes (parse + compile + swap): $(grep -o 'elapsed_ms=[0-9]*' "$TMP/log" | tail -1)"
echo "RSS after reload: $(rss_kib $PID) KiB"
