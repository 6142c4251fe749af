# shellcheck shell=bash
# Shared by the bench scripts: `source "$BENCH_DIR/lib.sh"` after setting
# BENCH_DIR and ROOT.

need() { command -v "$1" >/dev/null 2>&1; }

# install COMMAND PACKAGE: apt-get install PACKAGE when COMMAND is missing.
install() {
    need "$1" && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y -q "$2" >/dev/null 2>&1 ||
        { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$2" >/dev/null; }
    need "$1" || { echo "$0: could not install $2" >&2; exit 1; }
}

# A TCP port free on 127.0.0.1 right now.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Builds the release binary (unless SKIP_BUILD=1) and sets TURNPIKE_BIN.
build_turnpike() {
    [ "${SKIP_BUILD:-0}" = 1 ] || (cd "$ROOT" && cargo build --release -q -p turnpike)
    TURNPIKE_BIN=${TURNPIKE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/turnpike}
    export TURNPIKE_BIN
}
