#!/usr/bin/env bash
# Asynchronous mode benchmark (embedded queue): how many requests per second
# the gateway accepts (202, each fsynced before the answer), and the
# end-to-end cost of a request sent asynchronously (submit, then read the
# result with ?wait=) against the same call made synchronously.
#
# Usage: bench/async.sh            (DURATION=10s CONNECTIONS=50 SAMPLES=300)
# Installs wrk and python3 with apt-get when missing; builds turnpike.
# Everything listens on 127.0.0.1; the report is printed and written to
# bench/out/async-<timestamp>.txt.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
SAMPLES=${SAMPLES:-300}

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
install wrk wrk
install python3 python3
build_turnpike
BIN=$TURNPIKE_BIN

TMP=$(mktemp -d)
trap 'kill "$GW" 2>/dev/null || true; rm -rf "$TMP"' EXIT
P=$(port); S=$(port)
cat > "$TMP/gw.yaml" <<YAML
gateway:
  listen: ["127.0.0.1:$P"]
  status: {listen: "127.0.0.1:$S"}
  data_dir: "$TMP/data"
  workers: 1
  log_level: warn
routes:
  # The "service": answers at once.
  - {id: service, uri: /service, plugins: {mocking: {response_example: done}}, upstream: {nodes: {"127.0.0.1:1": 1}}}
  # The same call, synchronously through the gateway.
  - {id: sync, uri: /sync, plugins: {proxy-rewrite: {uri: /service}}, upstream: {nodes: {"127.0.0.1:$P": 1}}}
  # And asynchronously.
  - {id: async, uri: /async, plugins: {proxy-rewrite: {uri: /service}, async-request: {concurrency: 16, max_queue: 10000000}}, upstream: {nodes: {"127.0.0.1:$P": 1}}}
YAML
"$BIN" run -c "$TMP/gw.yaml" > "$TMP/gw.log" 2>&1 &
GW=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$S/readyz" >/dev/null && break; sleep 0.1; done
printf 'wrk.method = "POST"\nwrk.body = "payload"\n' > "$TMP/post.lua"

mkdir -p "$BENCH_DIR/out"
out="$BENCH_DIR/out/async-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
    echo "# bench/async.sh on $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD)"
    echo "## accepted (202) per second: wrk -t1 -c$CONNECTIONS -d$DURATION POST /async"
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$TMP/post.lua" "http://127.0.0.1:$P/async" |
        grep -E "Requests/sec|Latency|50%|99%|Non-2xx|Socket errors" || true
    echo "## the same POST answered synchronously: wrk POST /sync"
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$TMP/post.lua" "http://127.0.0.1:$P/sync" |
        grep -E "Requests/sec|Latency|50%|99%|Non-2xx|Socket errors" || true
    # Let the workers drain what wrk queued before timing single requests.
    for _ in $(seq 600); do
        depth=$(curl -fs "http://127.0.0.1:$S/metrics" | awk '/^turnpike_async_queue_depth/ {print $2}')
        [ "${depth:-0}" = 0 ] && break
        sleep 0.5
    done
    echo "## end to end, one request at a time, $SAMPLES samples"
    python3 - "$P" "$SAMPLES" <<'PY'
import http.client, json, statistics, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
def timed(fn):
    t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1000
def sync():
    c.request("POST", "/sync", b"payload"); r = c.getresponse(); r.read(); assert r.status == 200
def asynchronous():
    c.request("POST", "/async", b"payload"); r = c.getresponse(); body = json.loads(r.read()); assert r.status == 202
    c.request("GET", body["result_url"] + "?wait=30"); r = c.getresponse(); r.read(); assert r.status == 200, r.status
for name, fn in (("sync", sync), ("async submit + ?wait= result", asynchronous)):
    times = sorted(timed(fn) for _ in range(n))
    print(f"  {name:30s} p50 {statistics.median(times):.2f} ms  p99 {times[int(0.99 * (n - 1))]:.2f} ms")
PY
} | tee "$out"
