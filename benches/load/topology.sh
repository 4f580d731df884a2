#!/usr/bin/env bash
# Load run of issue 6 (first look): one `api` and one `worker` process on the machine's
# PostgreSQL and Redis (a fresh database and key prefix, dropped afterwards), the greet flow
# through the api's sync webhook, 32 connections. Loopback only.
#
#   cargo build --release -p flowcore-server
#   benches/load/topology.sh [path/to/flowcore] [seconds]
#
# Needs wrk, psql and redis-cli. FLOWCORE_BENCH_POSTGRES_URL / FLOWCORE_BENCH_REDIS_URL override
# the servers.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}
seconds=${2:-10}
pg=${FLOWCORE_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
db=flowcore_bench_$(date +%s)_$$
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api_port=$(free_port)
worker_port=$(free_port)
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  psql "$pg/postgres" -XAtqc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  redis-cli -u "${FLOWCORE_BENCH_REDIS_URL:-redis://127.0.0.1:6379}" --scan --pattern "$db:*" \
    | xargs -r redis-cli -u "${FLOWCORE_BENCH_REDIS_URL:-redis://127.0.0.1:6379}" del >/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
psql "$pg/postgres" -XAtqc "CREATE DATABASE $db"
export DATABASE_URL=$pg/$db REDIS_URL=${FLOWCORE_BENCH_REDIS_URL:-redis://127.0.0.1:6379}
export FLOWCORE_REDIS_PREFIX=$db FLOWCORE_DATA_DIR=$dir FLOWCORE_ADMIN_KEY=k RUST_LOG=warn
export FLOWCORE_ENCRYPTION_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
FLOWCORE_ROLE=api FLOWCORE_BIND=127.0.0.1:$api_port "$bin" serve 2>"$dir/api.log" &
pids+=($!)
until curl -fs "127.0.0.1:$api_port/healthz" >/dev/null; do sleep 0.01; done
FLOWCORE_ROLE=worker FLOWCORE_BIND=127.0.0.1:$worker_port WORKER_CONCURRENCY=64 "$bin" serve 2>"$dir/worker.log" &
pids+=($!)
until curl -fs "127.0.0.1:$worker_port/healthz" >/dev/null; do sleep 0.01; done
curl -fs -X POST "127.0.0.1:$api_port/api/v1/flows" -H 'x-api-key: k' -H 'content-type: application/json' \
  -d @"$here/examples/flows/greet.json" >/dev/null
curl -fs -X POST "127.0.0.1:$api_port/webhooks/greet" -H 'content-type: application/json' -d '{"name":"ada","n":7}'
echo
cat > "$dir/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"name": "ada", "n": 7}'
wrk.headers["Content-Type"] = "application/json"
LUA
wrk -t2 -c32 -d"${seconds}s" --latency -s "$dir/post.lua" "http://127.0.0.1:$api_port/webhooks/greet"
