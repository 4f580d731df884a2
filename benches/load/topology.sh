#!/usr/bin/env bash
# Load run of the production topology: APIS api and WORKERS worker processes started by
# deploy/local/topology.sh (PostgreSQL, Redis and S3 as there), the greet flow through the api
# processes' sync webhooks, 32 connections spread over them, every run durable. Prints wrk's
# figures per api process, the total, and the enqueue-to-start latency from the database.
#
#   cargo build --release -p flowcore-server
#   benches/load/topology.sh [path/to/flowcore] [seconds] [apis] [workers]
#
# CONCURRENCY_KEYS=N gives the flow a concurrency key at limit 1 (`settings.concurrency`), and
# each request one of N keys at random: the cost of the keys' slots in the queue.
#
# Needs wrk, psql, redis-cli, curl, python3. Loopback only.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}")
export SECONDS_OF_LOAD=${2:-10} FLOWCORE_APIS=${3:-1} FLOWCORE_WORKERS=${4:-1}
export WORKER_CONCURRENCY=${WORKER_CONCURRENCY:-64} RUST_LOG=warn RATE_LIMIT_PER_MINUTE=0
export GREET=$here/examples/flows/greet.json
export CONCURRENCY_KEYS=${CONCURRENCY_KEYS:-0}
if (( CONCURRENCY_KEYS > 0 )); then
  keyed=$(mktemp --suffix=.json)
  python3 - "$GREET" "$keyed" <<'PY'
import json, sys
flow = json.load(open(sys.argv[1]))
flow["settings"] = {"concurrency": {"key": "{{ input.k }}", "limit": 1}}
json.dump(flow, open(sys.argv[2], "w"))
PY
  GREET=$keyed
fi
# shellcheck disable=SC2016
export FLOWCORE_TOPOLOGY_READY='
set -euo pipefail
urls=($FLOWCORE_API_URLS)
curl -fs -X POST "${urls[0]}/api/v1/flows" -H "x-api-key: $FLOWCORE_ADMIN_KEY" \
  -H "content-type: application/json" -d @"$GREET" >/dev/null
sleep 1 # every process hears of the new flow
for u in "${urls[@]}"; do curl -fs -X POST "$u/webhooks/greet" -H "content-type: application/json" -d "{\"name\":\"ada\",\"n\":7,\"k\":0}"; echo; done
lua=$(mktemp)
printf "wrk.method = \"POST\"\nwrk.body = %s\nwrk.headers[\"Content-Type\"] = \"application/json\"\n" "[[{\"name\": \"ada\", \"n\": 7}]]" > "$lua"
if (( CONCURRENCY_KEYS > 0 )); then
  printf "request = function() return wrk.format(nil, nil, nil, string.format([[{\"name\": \"ada\", \"n\": 7, \"k\": %%d}]], math.random(%d))) end\n" "$CONCURRENCY_KEYS" >> "$lua"
fi
conns=$(( 32 / ${#urls[@]} ))
outs=()
for u in "${urls[@]}"; do
  out=$(mktemp); outs+=("$out")
  wrk -t1 -c"$conns" -d"${SECONDS_OF_LOAD}s" --latency -s "$lua" "$u/webhooks/greet" > "$out" &
done
wait
total=0
for out in "${outs[@]}"; do
  grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors" "$out"
  total=$(awk -v t="$total" "/Requests\/sec/ { print t + \$2 }" "$out")
done
echo "total requests/s: $total"
sleep 2 # runs in flight when wrk stopped
psql "$DATABASE_URL" -XAtc "SELECT count(*) AS runs,
  round(avg(started_at - created_at) / 1000.0, 2) AS enqueue_to_start_avg_ms,
  round((percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - created_at) / 1000.0)::numeric, 2) AS p50_ms,
  round((percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - created_at) / 1000.0)::numeric, 2) AS p99_ms,
  count(*) FILTER (WHERE status <> '\''succeeded'\'') AS not_succeeded
  FROM runs" | awk -F"|" "{ print \"runs \" \$1 \"; enqueue to start: avg \" \$2 \" ms, p50 \" \$3 \" ms, p99 \" \$4 \" ms; not succeeded: \" \$5 }"
psql "$DATABASE_URL" -XAtc "SELECT status, count(*), min(error) FROM runs WHERE status <> '\''succeeded'\'' GROUP BY status"
'
exec "$here/deploy/local/topology.sh" "$bin"
