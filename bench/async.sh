#!/usr/bin/env bash
# Asynchronous mode benchmark: how many requests per second the gateway
# accepts (202, each stored durably before the answer), and the end-to-end
# cost of a request sent asynchronously (submit, then read the result with
# ?wait=) against the same call made synchronously. Once per queue:
#   embedded         redb in data_dir, one fsync per group commit
#   redis-always     gateway.queue: redis, Redis with appendfsync always
#   redis-everysec   the same, appendfsync everysec (Redis's usual setting)
#
# Usage: bench/async.sh   (QUEUES="embedded redis-always redis-everysec"
#                          DURATION=10s CONNECTIONS=50 SAMPLES=300)
# Installs wrk, python3 and redis-server with apt-get when missing; builds
# turnpike. Everything listens on 127.0.0.1; the report is printed and
# written to bench/out/async-<timestamp>.txt.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
SAMPLES=${SAMPLES:-300}
QUEUES=${QUEUES:-embedded redis-always redis-everysec}

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
install wrk wrk
install python3 python3
install redis-server redis-server
build_turnpike
BIN=$TURNPIKE_BIN

TMP=$(mktemp -d)
GW=""; REDIS=""
stop() { kill $GW $REDIS 2>/dev/null || true; wait $GW $REDIS 2>/dev/null || true; GW=""; REDIS=""; }
trap 'stop; rm -rf "$TMP"' EXIT
P=$(port); S=$(port); R=$(port)

# start QUEUE: a gateway (and its Redis) with the queue named.
start() {
    local queue_settings=""
    rm -rf "$TMP/data" "$TMP/redis"; mkdir -p "$TMP/redis"
    case $1 in
    redis-*)
        redis-server --bind 127.0.0.1 --port "$R" --save "" --appendonly yes \
            --appendfsync "${1#redis-}" --dir "$TMP/redis" >/dev/null &
        REDIS=$!
        queue_settings="  queue: redis
  redis: {url: \"redis://127.0.0.1:$R\"}"
        for _ in $(seq 100); do redis-cli -p "$R" ping >/dev/null 2>&1 && break; sleep 0.1; done ;;
    esac
    cat > "$TMP/gw.yaml" <<YAML
gateway:
  listen: ["127.0.0.1:$P"]
  status: {listen: "127.0.0.1:$S"}
  data_dir: "$TMP/data"
  workers: 1
  log_level: warn
$queue_settings
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
}

wrk_post() {
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$TMP/post.lua" "http://127.0.0.1:$P$1" |
        grep -E "Requests/sec|Latency|50%|99%|Non-2xx|Socket errors" || true
}

metric() { curl -fs "http://127.0.0.1:$S/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# Lets the workers drain what wrk queued, and says how fast they did.
drain() {
    local start done0 depth
    start=$(date +%s.%N); done0=$(metric turnpike_async_done_total)
    for _ in $(seq 1200); do
        depth=$(metric turnpike_async_queue_depth)
        [ "${depth:-0}" = 0 ] && break
        sleep 0.5
    done
    python3 -c "import sys; n = float(sys.argv[2]) - float(sys.argv[1]); t = float(sys.argv[4]) - float(sys.argv[3]); print(f'  workers drained {n:.0f} jobs in {t:.1f} s: {n / t:.0f} jobs/s')" \
        "${done0:-0}" "$(metric turnpike_async_done_total)" "$start" "$(date +%s.%N)"
}

# end_to_end PATH...: p50 and p99 of each, one request at a time.
end_to_end() {
    python3 - "$P" "$SAMPLES" "$@" <<'PY'
import http.client, json, statistics, sys, time
port, n, paths = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
c = http.client.HTTPConnection("127.0.0.1", port)
def timed(fn):
    t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1000
def sync():
    c.request("POST", "/sync", b"payload"); r = c.getresponse(); r.read(); assert r.status == 200
def asynchronous():
    c.request("POST", "/async", b"payload"); r = c.getresponse(); body = json.loads(r.read()); assert r.status == 202
    c.request("GET", body["result_url"] + "?wait=30"); r = c.getresponse(); r.read(); assert r.status == 200, r.status
for path in paths:
    name, fn = {"/sync": ("sync", sync), "/async": ("async submit + ?wait= result", asynchronous)}[path]
    times = sorted(timed(fn) for _ in range(n))
    print(f"  {name:30s} p50 {statistics.median(times):.2f} ms  p99 {times[int(0.99 * (n - 1))]:.2f} ms")
PY
}

printf 'wrk.method = "POST"\nwrk.body = "payload"\n' > "$TMP/post.lua"
mkdir -p "$BENCH_DIR/out"
out="$BENCH_DIR/out/async-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
    echo "# bench/async.sh on $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD)"
    start embedded
    echo "## the same POST answered synchronously: wrk -t1 -c$CONNECTIONS -d$DURATION POST /sync"
    wrk_post /sync
    end_to_end /sync
    stop
    for queue in $QUEUES; do
        start "$queue"
        echo "## queue $queue: accepted (202) per second: wrk -t1 -c$CONNECTIONS -d$DURATION POST /async"
        wrk_post /async
        drain
        echo "## queue $queue: end to end, one request at a time, $SAMPLES samples"
        end_to_end /async
        stop
    done
} | tee "$out"
