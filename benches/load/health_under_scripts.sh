#!/usr/bin/env bash
# How fast /healthz answers while CPU-bound scripts run (issue 13: 60 of them pushed it to 3 s).
# Starts `flowcore serve` on the embedded defaults, starts N runs of a flow whose script spins
# for about a second, then times 20 health checks, one every 100 ms.
#
#   cargo build --release -p flowcore-server
#   benches/load/health_under_scripts.sh [path/to/flowcore] [runs]
#
# Loopback only; the data dir is a fresh temp dir.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}
runs=${2:-60}
# shellcheck source=serve.sh
. "$here/benches/load/serve.sh"
serve "$bin" WORKER_CONCURRENCY="$runs" FLOWCORE_MAX_QUEUED_RUNS=0
curl -fs -X POST "127.0.0.1:$port/api/v1/flows" -H 'x-api-key: k' -H 'content-type: application/json' -d '{
  "id": "spin",
  "nodes": [{"id": "s", "type": "script", "params": {"source": "let x = 0; for i in 0..100000000 { x += 1; } x", "timeout_ms": 2000, "max_operations": 1000000000}}]
}' >/dev/null
posts=()
for _ in $(seq "$runs"); do
  curl -fs -X POST "127.0.0.1:$port/api/v1/flows/spin/runs" -H 'x-api-key: k' \
    -H 'content-type: application/json' -d '{"wait": false}' >/dev/null &
  posts+=($!)
done
wait "${posts[@]}"
sleep 0.5
for _ in $(seq 20); do
  curl -s -o /dev/null -w '%{time_total}\n' "127.0.0.1:$port/healthz"
  sleep 0.1
done | sort -n | awk '{ t[NR] = $1 } END { printf "healthz over %d checks: median %.1f ms, max %.1f ms\n", NR, t[int((NR + 1) / 2)] * 1000, t[NR] * 1000 }'
