#!/usr/bin/env bash
# Soak run of the production topology (issue 20): APIS api and WORKERS worker processes started
# by deploy/local/topology.sh (PostgreSQL, Redis and S3 as there) under a steady sync-webhook
# load (wrk, 32 connections over the api processes) for MINUTES minutes, with a retention short
# enough to prune during the run (FLOWCORE_RUN_RETENTION_MAX_COUNT, default 20,000 runs of the
# flow). Prints, a line a minute: requests/s and the worst p99 of the api processes that
# minute, the resident memory of each process (api, then worker), the database's size and its
# dead row versions of `runs` and `steps`.
#
#   cargo build --release -p flowcore-server
#   benches/load/topology_soak.sh [path/to/flowcore] [minutes] [apis] [workers]
#
# Needs wrk, psql, redis-cli, curl, python3. Loopback only.
set -euo pipefail
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}")
export SOAK_MINUTES=${2:-30} FLOWCORE_APIS=${3:-1} FLOWCORE_WORKERS=${4:-1}
export WORKER_CONCURRENCY=${WORKER_CONCURRENCY:-64} RUST_LOG=warn RATE_LIMIT_PER_MINUTE=0
export FLOWCORE_RUN_RETENTION_MAX_COUNT=${FLOWCORE_RUN_RETENTION_MAX_COUNT:-20000}
export GREET=$here/examples/flows/greet.json
# The process name (at most 15 characters, as the kernel keeps it).
SOAK_NAME=$(basename "$bin" | cut -c1-15)
export SOAK_NAME
# shellcheck disable=SC2016
export FLOWCORE_TOPOLOGY_READY='
set -euo pipefail
urls=($FLOWCORE_API_URLS)
curl -fs -X POST "${urls[0]}/api/v1/flows" -H "x-api-key: $FLOWCORE_ADMIN_KEY" \
  -H "content-type: application/json" -d @"$GREET" >/dev/null
sleep 1 # every process hears of the new flow
lua=$(mktemp)
printf "wrk.method = \"POST\"\nwrk.body = %s\nwrk.headers[\"Content-Type\"] = \"application/json\"\n" "[[{\"name\": \"ada\", \"n\": 7}]]" > "$lua"
# The flowcore processes of this topology (their environment names its Redis prefix), by role.
rss() {
  for role in api worker; do
    for pid in $(pgrep -x "$SOAK_NAME"); do
      env=$(tr "\0" "\n" < "/proc/$pid/environ" 2>/dev/null || true)
      grep -qx "FLOWCORE_REDIS_PREFIX=$FLOWCORE_REDIS_PREFIX" <<<"$env" || continue
      grep -qx "FLOWCORE_ROLE=$role" <<<"$env" || continue
      printf "%s:%s " "$role" $(( $(awk "/VmRSS/ {print \$2}" "/proc/$pid/status") / 1024 ))
    done
  done
}
conns=$(( 32 / ${#urls[@]} ))
printf "%-6s %10s %9s %10s %10s %10s %s\n" minute "req/s" "p99" "db MB" "dead rows" "redis MB" "RSS MB"
for minute in $(seq "$SOAK_MINUTES"); do
  outs=()
  for u in "${urls[@]}"; do
    out=$(mktemp); outs+=("$out")
    wrk -t1 -c"$conns" -d60s --latency -s "$lua" "$u/webhooks/greet" > "$out" &
  done
  wait
  total=0; p99=""
  for out in "${outs[@]}"; do
    total=$(awk -v t="$total" "/Requests\/sec/ { print t + \$2 }" "$out")
    p99="$p99$(awk "\$1 == \"99%\" {print \$2}" "$out") "
    rm -f "$out"
  done
  db=$(( $(psql "$DATABASE_URL" -XAtqc "SELECT pg_database_size(current_database())") / 1024 / 1024 ))
  dead=$(psql "$DATABASE_URL" -XAtqc "SELECT sum(n_dead_tup) FROM pg_stat_user_tables WHERE relname IN ('"'"'runs'"'"', '"'"'steps'"'"')")
  redis=$(( $(redis-cli -u "$REDIS_URL" info memory | awk -F: "/^used_memory:/ {print \$2}" | tr -d "\r") / 1024 / 1024 ))
  printf "%-6s %10s %9s %10s %10s %10s %s\n" "$minute" "$total" "$p99" "$db" "$dead" "$redis" "$(rss)"
done
echo "runs stored at the end: $(psql "$DATABASE_URL" -XAtqc "SELECT count(*) FROM runs")"
'
exec "$here/deploy/local/topology.sh" "$bin"
