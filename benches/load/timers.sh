#!/usr/bin/env bash
# Parked runs and the timer: N runs of a flow whose one node is a `delay` until the same second
# T park (`waiting`, no worker held); the servers' memory is read idle and with all of them
# waiting; then T comes and the timer wakes them: how long until none waits (the wake), how late
# each run's delay finished after T (its resumed execution; p50, p99, max), and how long until
# every run succeeded. The driver is timers.py.
#
#   cargo build --release -p flowcore-server
#   benches/load/timers.sh [N]             # embedded defaults (SQLite, in-process queue), one
#                                          # `flowcore serve`; default N 10000
#   CONTROL=1 benches/load/timers.sh [N]   # the same runs with a time past: none parks, all
#                                          # finish; the memory to compare with
#   RESTART=1 benches/load/timers.sh [N]   # the server restarts while all N wait: a fresh
#                                          # process's memory with N waiting runs in its
#                                          # database against a fresh idle one; then it wakes them
#   TOPOLOGY=1 benches/load/timers.sh [N]  # one api and one worker process on PostgreSQL and
#                                          # Redis (deploy/local/topology.sh): each one's memory
#                                          # idle and with N waiting, then the wake
#
# Loopback only; every wait is bounded (timers.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$(pwd)
n=${1:-10000}
bin=$(realpath "${FLOWCORE_BIN:-${CARGO_TARGET_DIR:-target}/release/flowcore}")
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
add_flow() {
  curl -fs -H 'x-api-key: k' -H 'content-type: application/json' "$1/api/v1/flows" \
    -d '{"id": "sleep", "nodes": [{"id": "d", "type": "delay", "params": {"until": "{{ input.at }}"}}]}' >/dev/null
}

if [ "${1:-}" = --inside-topology ]; then
  # Called by deploy/local/topology.sh once its processes are up.
  n=$N
  url=${FLOWCORE_API_URLS%% *}
  declare -A procs
  # This topology's servers: the processes with its Redis prefix and a role (deploy/local/run.sh
  # execs the binary, so each one's pid is its server's).
  for env_file in /proc/[0-9]*/environ; do
    env=$( { tr '\0' '\n' <"$env_file"; } 2>/dev/null || true)
    grep -qx "FLOWCORE_REDIS_PREFIX=$FLOWCORE_REDIS_PREFIX" <<<"$env" || continue
    role=$(grep -m1 '^FLOWCORE_ROLE=' <<<"$env" | cut -d= -f2 || true)
    [ -n "$role" ] && procs[$role]=$(basename "$(dirname "$env_file")")
  done
  add_flow "$url"
  sleep 2
  idle_api=$(rss "${procs[api]}") idle_worker=$(rss "${procs[worker]}")
  state=$(mktemp)
  python3 "$here/benches/load/timers.py" park "$url" "$n" "$state"
  sleep 5 # what executing them left behind settles (allocator, caches)
  echo "memory, api process: idle $idle_api MB, $n runs waiting $(rss "${procs[api]}") MB"
  echo "memory, worker process: idle $idle_worker MB, $n runs waiting $(rss "${procs[worker]}") MB"
  python3 "$here/benches/load/timers.py" wake "$url" "$state"
  echo "memory after: api $(rss "${procs[api]}") MB, worker $(rss "${procs[worker]}") MB"
  exit 0
fi

if [ -n "${TOPOLOGY:-}" ]; then
  export FLOWCORE_APIS=1 FLOWCORE_WORKERS=1 FLOWCORE_ADMIN_KEY=k RUST_LOG=warn \
    RATE_LIMIT_PER_MINUTE=0 N=$n
  export FLOWCORE_TOPOLOGY_READY="bash $here/benches/load/timers.sh --inside-topology"
  exec "$here/deploy/local/topology.sh" "$bin"
fi

source benches/load/serve.sh
serve "$bin"
url=http://127.0.0.1:$port
add_flow "$url"
sleep 2
idle=$(rss "$pid")
state=$dir/state.json
if [ -n "${CONTROL:-}" ]; then
  python3 benches/load/timers.py park "$url" "$n" "$state" control
  sleep 5
  echo "memory: idle $idle MB, after $n runs that did not park $(rss "$pid") MB"
  exit 0
fi
python3 benches/load/timers.py park "$url" "$n" "$state"
sleep 5 # what executing them left behind settles (allocator, caches)
echo "memory: idle $idle MB, $n runs waiting $(rss "$pid") MB"
if [ -n "${RESTART:-}" ]; then
  # The same data dir, a fresh process: what N waiting runs cost a process that did not
  # execute them.
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  env FLOWCORE_DATA_DIR="$dir" FLOWCORE_ADMIN_KEY=k FLOWCORE_BIND="127.0.0.1:$port" RUST_LOG=warn \
    "$bin" serve 2>>"$dir/log" &
  pid=$!
  until curl -fs "$url/healthz" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "the server did not restart:" >&2; cat "$dir/log" >&2; exit 1; }
    sleep 0.01
  done
  sleep 5
  echo "memory after a restart: fresh idle $idle MB, fresh with $n runs waiting $(rss "$pid") MB"
fi
python3 benches/load/timers.py wake "$url" "$state"
echo "memory after: $(rss "$pid") MB"
