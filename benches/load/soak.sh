#!/usr/bin/env bash
# Soak run (issue 20): `flowcore serve` on the embedded defaults (SQLite, local files,
# in-process queue) under a steady sync-webhook load for MINUTES minutes, with a retention short
# enough to prune during the run (FLOWCORE_RUN_RETENTION_MAX_COUNT, default 20,000 runs of the
# flow). Prints, a line a minute: requests/s and p99 of that minute, the server's resident
# memory (the mean and the peak of a sample every 5 seconds) and the part of it SQLite holds
# (its page caches, `flowcore_sqlite_memory_bytes`), the database's size (file and WAL) and the
# runs finished.
#
#   cargo build --release -p flowcore-server
#   benches/load/soak.sh [path/to/flowcore] [minutes] [connections] [max runs kept]
#
# With FLOWCORE_SOAK_POSTGRES=postgres://postgres@127.0.0.1:5432 the database is a fresh one on
# that PostgreSQL (dropped at the end) instead of SQLite, and each line adds the dead row
# versions of `runs` and `steps` that autovacuum has not yet made reusable.
#
# FLOWCORE_SOAK_WARMUP (minutes, default 2) runs the load first without measuring it, so that
# minute 1 starts on a database that retention already holds at its size (on an empty one the
# first minute runs a third faster). With FLOWCORE_SOAK_CONTROL=1, one unwarmed minute on a fresh
# server and database runs before and after the soak: if the after one is slower too, the
# machine slowed, not the soaked server.
#
# Needs wrk, curl (and psql for PostgreSQL). Loopback only; the data dir is a fresh temp dir.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}
minutes=${2:-60}
connections=${3:-8}
keep=${4:-20000}
warmup=${FLOWCORE_SOAK_WARMUP:-2}
control() {
  echo "control ($1): one minute on a fresh server and database"
  FLOWCORE_SOAK_CONTROL=0 FLOWCORE_SOAK_WARMUP=0 bash "$0" "$bin" 1 "$connections" "$keep" | sed -n 2p
}
if [ "${FLOWCORE_SOAK_CONTROL:-0}" = 1 ]; then
  control before
fi
# shellcheck source=serve.sh
. "$here/benches/load/serve.sh"
pg=${FLOWCORE_SOAK_POSTGRES:-}
extra=()
if [ -n "$pg" ]; then
  database=flowcore_soak_$$
  psql "$pg/postgres" -XAtqc "CREATE DATABASE $database"
  on_exit='psql "$pg/postgres" -XAtqc "DROP DATABASE IF EXISTS $database WITH (FORCE)"'
  extra=(DATABASE_URL="$pg/$database")
fi
serve "$bin" FLOWCORE_RUN_RETENTION_MAX_COUNT="$keep" "${extra[@]}"
curl -fs -X POST "127.0.0.1:$port/api/v1/flows" -H 'x-api-key: k' -H 'content-type: application/json' \
  -d @"$here/examples/flows/greet.json" >/dev/null
cat > "$dir/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"name": "ada", "n": 7}'
wrk.headers["Content-Type"] = "application/json"
LUA
size() {
  if [ -n "$pg" ]; then
    psql "$pg/$database" -XAtqc "SELECT pg_database_size(current_database())"
  else
    du -cb "$dir"/flowcore.db* 2>/dev/null | tail -1 | cut -f1
  fi
}
dead() {
  [ -n "$pg" ] || { echo -; return; }
  psql "$pg/$database" -XAtqc "SELECT sum(n_dead_tup) FROM pg_stat_user_tables WHERE relname IN ('runs', 'steps')"
}
if [ "$warmup" -gt 0 ]; then
  echo "warming up for $warmup minutes"
  wrk -t2 -c"$connections" -d"$((warmup * 60))s" -s "$dir/post.lua" "http://127.0.0.1:$port/webhooks/greet" >/dev/null
fi
printf '%-6s %10s %9s %8s %8s %9s %10s %10s %10s\n' minute "req/s" "p99" "RSS MB" "max MB" "sqlite MB" "db MB" "runs done" "dead rows"
for minute in $(seq "$minutes"); do
  wrk -t2 -c"$connections" -d60s --latency -s "$dir/post.lua" "http://127.0.0.1:$port/webhooks/greet" >"$dir/wrk.out" &
  load=$!
  # Resident memory swings by a tenth within seconds under load: sampled every 5 seconds
  # through the minute, its mean and its peak.
  : >"$dir/rss"
  while kill -0 "$load" 2>/dev/null; do
    awk '/VmRSS/ {print $2}' "/proc/$pid/status" >>"$dir/rss"
    sleep 5
  done
  wait "$load"
  out=$(cat "$dir/wrk.out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  read -r rss rss_max < <(awk '{s += $1; if ($1 > m) m = $1} END {if (NR) printf "%.1f %d\n", s / NR / 1024, m / 1024; else print "- -"}' "$dir/rss")
  db=$(( $(size) / 1024 / 1024 ))
  metrics=$(curl -fs "127.0.0.1:$port/metrics")
  runs=$(awk '/^flowcore_runs_total/ {s += $2} END {print s + 0}' <<<"$metrics")
  sqlite=$(awk '/^flowcore_sqlite_memory_bytes/ {printf "%.1f", $2 / 1048576}' <<<"$metrics")
  printf '%-6s %10s %9s %8s %8s %9s %10s %10s %10s\n' "$minute" "$rps" "$p99" "$rss" "$rss_max" "$sqlite" "$db" "$runs" "$(dead)"
done
pruned=$(curl -fs "127.0.0.1:$port/metrics" | awk '/^flowcore_runs_pruned_total/ {print $2}')
echo "runs pruned by retention: ${pruned:-0}"
if [ "${FLOWCORE_SOAK_CONTROL:-0}" = 1 ]; then
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  control after
fi
