#!/usr/bin/env bash
# Proxy benchmark: Turnpike vs nginx as a reverse proxy in front of the same
# nginx upstream, on 127.0.0.1 only.
#
# Usage:
#   bench/proxy.sh                       # full run (builds turnpike first)
#   DURATION=30s ROUNDS=3 bench/proxy.sh
#   NGINX_ONLY=1 DURATION=2s bench/proxy.sh   # no cargo build, no turnpike
#
# Environment:
#   DURATION     wrk duration per measured run          (default 10s)
#   ROUNDS       measured rounds per scenario and proxy (default 2)
#   WARMUP       warm-up duration per proxy and scenario (default 2s, 0 = none)
#   NGINX_ONLY   1 = skip the cargo build and Turnpike, benchmark nginx only
#   SKIP_BUILD   1 = don't run cargo build, use the existing binary
#   TURNPIKE_BIN path of the turnpike binary (default <target>/release/turnpike)
#   KEEP_TMP     1 = keep the temp dir (configs, logs, raw wrk output)
#   VARIANTS     which turnpike+ variants to run   (default "plugins limits redis")
#
# Pinning (when >= 2 CPUs are usable): the proxy under test (nginx proxy,
# turnpike) runs on the second usable CPU, wrk and the upstream nginx on the
# first one. With a single CPU nothing is pinned.
#
# The report is printed and written to bench/out/proxy-<timestamp>.txt.
# Exit status is non-zero if any run had non-2xx responses or socket errors.
#
# Proxies: nginx, `turnpike` (plain route) and the variants named in VARIANTS
# (default: all): `turnpike+plugins` (key-auth, proxy-rewrite and cors;
# bench/turnpike-plugins.yaml.tmpl), `turnpike+limits` (limit-count local and
# prometheus) and `turnpike+redis` (limit-count in Redis and prometheus; a
# redis-server of the bench's own is started, pinned with the load).
# More variants: write bench/turnpike-NAME.yaml.tmpl (like
# bench/turnpike.yaml.tmpl) and add NAME to VARIANTS. Every variant gets its
# own ports and process and is interleaved with the others in each round;
# every non-nginx proxy gets a ratio line against nginx, and every
# `turnpike+…` variant one against plain `turnpike`.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-2s}
NGINX_ONLY=${NGINX_ONLY:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
VARIANTS=${VARIANTS:-plugins limits redis}
REDIS_PORT=""
TURNPIKE_BIN=${TURNPIKE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/turnpike}
NGINX=${NGINX:-/usr/sbin/nginx}
WRK=${WRK:-/usr/bin/wrk}
READY_TIMEOUT=10 # seconds

# Scenarios: name|path|connections
SCENARIOS=(
    "100B-c50|/|50"
    "16KiB-c50|/16k|50"
    "100B-c200|/|200"
)
SMALL_BODY_LEN=100
LARGE_BODY_LEN=16384

# Proxies under test, filled by start_*: parallel arrays (name, base URL).
PROXY_NAMES=()
PROXY_URLS=()
# Background processes to stop on exit: parallel arrays (pid, name).
PIDS=()
PID_NAMES=()

TMP=""
FAILED=0
WRK_PID=""

log() { printf '[proxy-bench] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    FAILED=1
    exit 1
}

# --------------------------------------------------------------------------
# cleanup

stop_pid() { # stop_pid PID NAME
    local pid=$1 name=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not exit on SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    [[ -n $WRK_PID ]] && stop_pid "$WRK_PID" wrk
    # Stop in reverse start order (proxies before the upstream).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}" "${PID_NAMES[i]}"
    done
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 || $rc -ne 0 || $FAILED -ne 0 ]]; then
            log "temp dir kept: $TMP"
        else
            rm -rf -- "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------
# helpers

need_tools() {
    local missing=0
    [[ -x $NGINX ]] || command -v nginx >/dev/null 2>&1 || missing=1
    [[ -x $WRK ]] || command -v wrk >/dev/null 2>&1 || missing=1
    if ((missing)); then
        log "nginx and/or wrk missing: installing nginx-light wrk"
        local sudo=()
        if [[ $(id -u) -ne 0 ]]; then
            command -v sudo >/dev/null 2>&1 || die "not root and no sudo: install nginx-light and wrk by hand"
            sudo=(sudo)
        fi
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light wrk
    fi
    if [[ $NGINX_ONLY != 1 && " $VARIANTS " == *" redis "* ]] && ! command -v redis-server >/dev/null 2>&1; then
        log "redis-server missing: installing it"
        local sudo=()
        [[ $(id -u) -eq 0 ]] || sudo=(sudo)
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
    fi
    [[ -x $NGINX ]] || NGINX=$(command -v nginx) || die "nginx not found"
    [[ -x $WRK ]] || WRK=$(command -v wrk) || die "wrk not found"
    command -v python3 >/dev/null 2>&1 || die "python3 is required (free ports, readiness checks)"
    command -v awk >/dev/null 2>&1 || die "awk is required"
}

# free_ports N: print N distinct free TCP ports on 127.0.0.1, one per line.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
for s in socks:
    s.close()
PY
}

# http_get URL: print "<status> <body length>" ("000 0" when unreachable).
http_get() {
    python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
# The same headers wrk sends (WRK_HEADERS).
req = urllib.request.Request(sys.argv[1], headers={"apikey": "bench-key", "Origin": "http://bench.example"})
try:
    with urllib.request.urlopen(req, timeout=2) as r:
        print(r.status, len(r.read()))
except urllib.error.HTTPError as e:
    print(e.code, len(e.read()))
except Exception:
    print("000 0")
PY
}

# wait_ready NAME URL PID LOG: poll URL until HTTP 200, at most READY_TIMEOUT s.
wait_ready() {
    local name=$1 url=$2 pid=$3 logf=$4 deadline status
    deadline=$((SECONDS + READY_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during startup; log ($logf):"
            cat "$logf" >&2 || true
            die "$name failed to start"
        fi
        status=$(http_get "$url")
        [[ ${status%% *} == 200 ]] && return 0
        if ((SECONDS >= deadline)); then
            log "$name not ready after ${READY_TIMEOUT}s ($url -> ${status%% *}); log ($logf):"
            cat "$logf" >&2 || true
            die "$name did not become ready"
        fi
        sleep 0.1
    done
}

# render TEMPLATE OUT KEY=VALUE...: replace @KEY@ by VALUE.
render() {
    local tmpl=$1 out=$2 kv key val content
    shift 2
    content=$(<"$tmpl")
    for kv in "$@"; do
        key=${kv%%=*}
        val=${kv#*=}
        content=${content//"@${key}@"/"$val"}
    done
    if [[ $content =~ @[A-Z_]+@ ]]; then
        die "unsubstituted placeholder ${BASH_REMATCH[0]} in $tmpl"
    fi
    printf '%s\n' "$content" >"$out"
}

# Pinning: LOAD_CPU for wrk + upstream, PROXY_CPU for the proxy under test.
LOAD_PIN=()
PROXY_PIN=()
PIN_NOTE=""
setup_pinning() {
    local cpus
    mapfile -t cpus < <(python3 -c 'import os; print("\n".join(map(str, sorted(os.sched_getaffinity(0)))))')
    if ((${#cpus[@]} >= 2)) && command -v taskset >/dev/null 2>&1; then
        LOAD_PIN=(taskset -c "${cpus[0]}")
        PROXY_PIN=(taskset -c "${cpus[1]}")
        PIN_NOTE="proxy under test on CPU ${cpus[1]}; wrk + upstream nginx on CPU ${cpus[0]}"
    elif ((${#cpus[@]} < 2)); then
        PIN_NOTE="only ${#cpus[@]} usable CPU: NO pinning (results are not comparable to pinned runs)"
    else
        PIN_NOTE="taskset not found: NO pinning"
    fi
    log "pinning: $PIN_NOTE"
}

# Temp paths for nginx modules that are compiled in (avoid /var/lib/nginx).
nginx_extra_temp_paths() { # nginx_extra_temp_paths PREFIXDIR
    local dir=$1 m out="" v
    v=$("$NGINX" -V 2>&1)
    for m in fastcgi uwsgi scgi; do
        if [[ $v != *"--without-http_${m}_module"* ]]; then
            out+="    ${m}_temp_path $dir/$m;"$'\n'
        fi
    done
    printf '%s' "$out"
}

# spawn NAME LOG CMD...: start CMD in the background, register its pid in
# PIDS (stopped on exit) and LAST_PID.
spawn() {
    local name=$1 logf=$2
    shift 2
    "$@" >"$logf" 2>&1 &
    PIDS+=("$!")
    PID_NAMES+=("$name")
    LAST_PID=$!
}

add_proxy() { # add_proxy NAME BASE_URL
    local name=$1 url=$2 expect got
    # Sanity check: both bodies come through with the right size.
    for expect in "/ $SMALL_BODY_LEN" "/16k $LARGE_BODY_LEN"; do
        got=$(http_get "$url${expect%% *}")
        [[ $got == "200 ${expect##* }" ]] ||
            die "$name: GET ${expect%% *} returned '$got', expected '200 ${expect##* }'"
    done
    PROXY_NAMES+=("$name")
    PROXY_URLS+=("$url")
}

# --------------------------------------------------------------------------
# processes

UPSTREAM_PORT=""
start_upstream() {
    UPSTREAM_PORT=$(free_ports 1)
    local body conf="$TMP/nginx-upstream.conf"
    mkdir -p "$TMP/www" "$TMP/upstream-tmp"
    body=$(printf '%*s' "$SMALL_BODY_LEN" '' | tr ' ' 'x')
    head -c "$LARGE_BODY_LEN" /dev/zero | tr '\0' 'a' >"$TMP/www/16k"
    chmod 644 "$TMP/www/16k"
    render "$BENCH_DIR/nginx-upstream.conf.tmpl" "$conf" \
        "TMPDIR=$TMP" "UPSTREAM_PORT=$UPSTREAM_PORT" "SMALL_BODY=$body" \
        "EXTRA_TEMP_PATHS_UPSTREAM=$(nginx_extra_temp_paths "$TMP/upstream-tmp")"
    "$NGINX" -t -q -p "$TMP" -e "$TMP/upstream.error.log" -c "$conf" ||
        die "upstream nginx config test failed ($conf)"
    spawn "upstream nginx" "$TMP/upstream.log" \
        "${LOAD_PIN[@]}" "$NGINX" -p "$TMP" -e "$TMP/upstream.error.log" -c "$conf"
    wait_ready "upstream nginx" "http://127.0.0.1:$UPSTREAM_PORT/" "$LAST_PID" "$TMP/upstream.error.log"
    log "upstream nginx on 127.0.0.1:$UPSTREAM_PORT (pid $LAST_PID)"
}

# start_redis: a redis-server without persistence, pinned with the load.
start_redis() {
    REDIS_PORT=$(free_ports 1)
    spawn "redis" "$TMP/redis.log" "${LOAD_PIN[@]}" redis-server \
        --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$TMP"
    local i
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "redis-server did not start (see $TMP/redis.log)"
    log "redis on 127.0.0.1:$REDIS_PORT (pid $LAST_PID)"
}

start_nginx_proxy() {
    local port conf="$TMP/nginx-proxy.conf"
    port=$(free_ports 1)
    mkdir -p "$TMP/proxy-tmp"
    render "$BENCH_DIR/nginx-proxy.conf.tmpl" "$conf" \
        "TMPDIR=$TMP" "UPSTREAM_PORT=$UPSTREAM_PORT" "PROXY_PORT=$port" \
        "EXTRA_TEMP_PATHS_PROXY=$(nginx_extra_temp_paths "$TMP/proxy-tmp")"
    "$NGINX" -t -q -p "$TMP" -e "$TMP/proxy.error.log" -c "$conf" ||
        die "proxy nginx config test failed ($conf)"
    spawn "nginx proxy" "$TMP/proxy.log" \
        "${PROXY_PIN[@]}" "$NGINX" -p "$TMP" -e "$TMP/proxy.error.log" -c "$conf"
    wait_ready "nginx proxy" "http://127.0.0.1:$port/" "$LAST_PID" "$TMP/proxy.error.log"
    log "nginx proxy on 127.0.0.1:$port (pid $LAST_PID)"
    add_proxy nginx "http://127.0.0.1:$port"
}

# start_turnpike NAME CONFIG_FILE LISTEN_PORT STATUS_PORT
# Starts one Turnpike process with CONFIG_FILE (which must listen on
# LISTEN_PORT and serve its status API on STATUS_PORT), waits for /readyz and
# registers it as a proxy under test.
start_turnpike() {
    local name=$1 cfg=$2 port=$3 sport=$4 logf
    logf="$TMP/${name//[^A-Za-z0-9_.+-]/_}.log"
    spawn "$name" "$logf" "${PROXY_PIN[@]}" "$TURNPIKE_BIN" run -c "$cfg"
    wait_ready "$name" "http://127.0.0.1:$sport/readyz" "$LAST_PID" "$logf"
    log "$name on 127.0.0.1:$port, status 127.0.0.1:$sport (pid $LAST_PID, config $cfg)"
    add_proxy "$name" "http://127.0.0.1:$port"
}

# add_turnpike_variant NAME TEMPLATE: render TEMPLATE (placeholders
# @LISTEN_PORT@ @STATUS_PORT@ @UPSTREAM_PORT@) with fresh ports and start it.
add_turnpike_variant() {
    local name=$1 tmpl=$2 ports cfg
    mapfile -t ports < <(free_ports 2)
    cfg="$TMP/${name//[^A-Za-z0-9_.+-]/_}.yaml"
    render "$tmpl" "$cfg" "LISTEN_PORT=${ports[0]}" "STATUS_PORT=${ports[1]}" \
        "UPSTREAM_PORT=$UPSTREAM_PORT" "REDIS_PORT=$REDIS_PORT"
    start_turnpike "$name" "$cfg" "${ports[0]}" "${ports[1]}"
}

# --------------------------------------------------------------------------
# wrk

# parse_wrk FILE: print "rps p50_ms p99_ms non2xx socket_errors".
parse_wrk() {
    awk '
        function ms(v,   n, u) {
            n = v + 0
            u = v; sub(/^[0-9.]+/, "", u)
            if (u == "us") return n / 1000
            if (u == "ms") return n
            if (u == "s")  return n * 1000
            if (u == "m")  return n * 60000
            if (u == "h")  return n * 3600000
            return -1
        }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF + 0 }
        /Socket errors:/ {
            for (i = 3; i <= NF; i++) { f = $i; gsub(/,/, "", f); if (f ~ /^[0-9]+$/) sock += f }
        }
        END {
            if (rps == "" || p50 == "" || p99 == "") exit 1
            printf "%s %.3f %.3f %d %d\n", rps, p50, p99, non2xx + 0, sock + 0
        }' "$1"
}

# Sent to every proxy alike: the plugins variant authenticates with the key
# and answers CORS for the origin; the others ignore both.
WRK_HEADERS=(-H "apikey: bench-key" -H "Origin: http://bench.example")

# run_wrk OUTFILE CONNS DURATION URL
run_wrk() {
    local out=$1 conns=$2 dur=$3 url=$4
    # Run in the background and `wait`, so a signal interrupts the run at once
    # (bash defers traps until a foreground child exits); cleanup stops it.
    "${LOAD_PIN[@]}" "$WRK" -t1 -c"$conns" -d"$dur" --latency "${WRK_HEADERS[@]}" "$url" >"$out" 2>&1 &
    WRK_PID=$!
    local rc=0
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    if ((rc != 0)); then
        cat "$out" >&2
        die "wrk failed against $url (exit $rc)"
    fi
}

# --------------------------------------------------------------------------
# report

machine_info() {
    local model
    model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
    echo "date:      $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine:   nproc=$(nproc), cpu=${model:-unknown}, kernel=$(uname -sr)"
    echo "nginx:     $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
    if [[ $NGINX_ONLY != 1 ]]; then
        echo "turnpike:  $("$TURNPIKE_BIN" version 2>&1 | head -n1 || echo unknown) ($TURNPIKE_BIN)"
    else
        echo "turnpike:  (skipped, NGINX_ONLY=1)"
    fi
    echo "wrk:       $("$WRK" -v 2>&1 | head -n1 | awk '{ print $2 }'), -t1, duration $DURATION, rounds $ROUNDS, warm-up $WARMUP"
    echo "pinning:   $PIN_NOTE"
}

# summarize RESULTS_TSV: per-round lines, then the mean table and ratios.
# TSV columns: scenario proxy round rps p50 p99 non2xx sockerr
summarize() {
    awk -F'\t' -v order="$(printf '%s,' "${PROXY_NAMES[@]}")" '
        BEGIN { np = split(order, pn, ","); np-- }
        {
            key = $1 SUBSEP $2
            if (!($1 in seen)) { seen[$1] = 1; sc[++ns] = $1 }
            n[key]++; rps[key] += $4; p50[key] += $5; p99[key] += $6
            err[key] += $7 + $8; n2[key] += $7; se[key] += $8
            rounds = rounds sprintf("  %-10s %-18s r%-2d %10.0f req/s  p50 %8.3f ms  p99 %8.3f ms  non2xx %d  sockerr %d\n", $1, $2, $3, $4, $5, $6, $7, $8)
        }
        END {
            print "per round:"
            printf "%s", rounds
            print ""
            printf "%-10s  %-18s %12s %9s %9s %7s\n", "scenario", "proxy", "req/s", "p50 ms", "p99 ms", "errors"
            printf "%-10s  %-18s %12s %9s %9s %7s\n", "----------", "------------------", "------------", "--------", "--------", "------"
            for (s = 1; s <= ns; s++) {
                for (p = 1; p <= np; p++) {
                    key = sc[s] SUBSEP pn[p]
                    if (!(key in n)) continue
                    m_rps[key] = rps[key] / n[key]; m_p99[key] = p99[key] / n[key]
                    printf "%-10s  %-18s %12.0f %9.3f %9.3f %7d\n", sc[s], pn[p], m_rps[key], p50[key] / n[key], m_p99[key], err[key]
                }
                base = sc[s] SUBSEP "nginx"
                for (p = 1; p <= np; p++) {
                    key = sc[s] SUBSEP pn[p]
                    if (pn[p] == "nginx" || !(key in n) || !(base in n)) continue
                    printf "%-10s  %-18s %12s %9s %9s\n", "", pn[p] "/nginx", sprintf("x%.3f", m_rps[key] / m_rps[base]), "", sprintf("x%.3f", m_p99[key] / m_p99[base])
                }
                plain = sc[s] SUBSEP "turnpike"
                for (p = 1; p <= np; p++) {
                    key = sc[s] SUBSEP pn[p]
                    if (pn[p] !~ /^turnpike[+]/ || !(key in n) || !(plain in n)) continue
                    printf "%-10s  %-18s %12s %9s %9s\n", "", pn[p] "/turnpike", sprintf("x%.3f", m_rps[key] / m_rps[plain]), "", sprintf("x%.3f", m_p99[key] / m_p99[plain])
                }
            }
            print ""
            print "errors = non-2xx/3xx responses + socket errors, summed over rounds (must be 0)."
            print "ratio lines: req/s ratio (higher is better) and p99 ratio (lower is better) vs nginx."
        }' "$1"
}

# --------------------------------------------------------------------------

main() {
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
    need_tools

    if [[ $NGINX_ONLY != 1 ]]; then
        if [[ $SKIP_BUILD != 1 ]]; then
            log "cargo build --release -p turnpike"
            (cd "$ROOT" && cargo build --release -p turnpike)
        fi
        [[ -x $TURNPIKE_BIN ]] || die "turnpike binary not found at $TURNPIKE_BIN"
    else
        log "NGINX_ONLY=1: skipping cargo build and turnpike"
    fi

    # Let nginx/turnpike/wrk have enough fds for 200+ connections each way.
    local nofile
    nofile=$(ulimit -n)
    if [[ $nofile != unlimited ]] && ((nofile < 8192)); then
        ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    fi

    TMP=$(mktemp -d "${TMPDIR:-/tmp}/turnpike-proxy-bench.XXXXXX")
    chmod 755 "$TMP" # nginx workers may run as an unprivileged user
    log "temp dir: $TMP"

    setup_pinning
    start_upstream
    start_nginx_proxy
    if [[ $NGINX_ONLY != 1 ]]; then
        add_turnpike_variant turnpike "$BENCH_DIR/turnpike.yaml.tmpl"
        local variant
        for variant in $VARIANTS; do
            [[ -f $BENCH_DIR/turnpike-$variant.yaml.tmpl ]] || die "no bench/turnpike-$variant.yaml.tmpl"
            [[ $variant == redis ]] && start_redis
            add_turnpike_variant "turnpike+$variant" "$BENCH_DIR/turnpike-$variant.yaml.tmpl"
        done
    fi

    local results="$TMP/results.tsv" entry name path conns r i url out parsed
    local rps p50 p99 non2xx sockerr
    : >"$results"
    for entry in "${SCENARIOS[@]}"; do
        IFS='|' read -r name path conns <<<"$entry"
        if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
            for i in "${!PROXY_NAMES[@]}"; do
                log "$name: warm-up ${PROXY_NAMES[i]} ($WARMUP)"
                run_wrk "$TMP/wrk-$name-${PROXY_NAMES[i]}-warmup.txt" "$conns" "$WARMUP" "${PROXY_URLS[i]}$path"
            done
        fi
        for ((r = 1; r <= ROUNDS; r++)); do
            for i in "${!PROXY_NAMES[@]}"; do
                url="${PROXY_URLS[i]}$path"
                out="$TMP/wrk-$name-${PROXY_NAMES[i]//[^A-Za-z0-9_.+-]/_}-r$r.txt"
                log "$name: round $r/$ROUNDS ${PROXY_NAMES[i]} -c$conns -d$DURATION $url"
                run_wrk "$out" "$conns" "$DURATION" "$url"
                parsed=$(parse_wrk "$out") || {
                    cat "$out" >&2
                    die "could not parse wrk output ($out)"
                }
                read -r rps p50 p99 non2xx sockerr <<<"$parsed"
                log "  -> $rps req/s, p50 ${p50}ms, p99 ${p99}ms, non2xx $non2xx, socket errors $sockerr"
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${PROXY_NAMES[i]}" "$r" \
                    "$rps" "$p50" "$p99" "$non2xx" "$sockerr" >>"$results"
            done
        done
    done

    mkdir -p "$BENCH_DIR/out"
    local report
    report="$BENCH_DIR/out/proxy-$(date +%Y%m%d-%H%M%S).txt"
    {
        echo "Turnpike proxy benchmark (bench/proxy.sh)"
        machine_info
        echo
        summarize "$results"
    } >"$report"
    echo
    cat "$report"
    echo
    log "report written to $report"

    if awk -F'\t' '$7 + $8 > 0 { bad = 1 } END { exit !bad }' "$results"; then
        FAILED=1
        log "ERROR: some runs had non-2xx responses or socket errors (see table)"
        exit 1
    fi
}

main "$@"
