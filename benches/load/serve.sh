# Sourced by the load scripts: `serve BIN [VAR=value ...]` starts `flowcore serve` on the
# embedded defaults (data in a fresh temp dir, admin key `k`, a free loopback port) with the
# extra variables, and returns once /healthz answers. It sets $port, $dir (holding the server's
# log) and $pid, and $ready_ms (from the start of the process to its first health answer);
# the server is stopped and $dir removed when the script exits, after which $on_exit (if the
# script set it) is evaluated.
serve() {
  local bin=$1
  shift
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"; eval "${on_exit:-}"' EXIT
  local start
  start=$(date +%s%N)
  env FLOWCORE_DATA_DIR="$dir" FLOWCORE_ADMIN_KEY=k FLOWCORE_BIND="127.0.0.1:$port" RUST_LOG=warn \
    "$@" "$bin" serve 2>"$dir/log" &
  pid=$!
  until curl -fs "127.0.0.1:$port/healthz" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "the server did not start:" >&2; cat "$dir/log" >&2; exit 1; }
    sleep 0.005
  done
  ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
}
