#!/usr/bin/env bash
# Load run of issue 5: `flowcore serve` on the embedded defaults (SQLite, local files, in-process
# queue; every run persisted with its steps), the contract's example flow through its sync
# webhook, 32 connections. Prints start-up time, requests/s, latencies and memory.
#
#   cargo build --release -p flowcore-server
#   benches/load/webhook.sh [path/to/flowcore] [seconds]
#
# Needs wrk (Debian: apt-get install wrk). Loopback only; the data dir is a fresh temp dir.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}
seconds=${2:-10}
# shellcheck source=serve.sh
. "$here/benches/load/serve.sh"
serve "$bin"
curl -fs -X POST "127.0.0.1:$port/api/v1/flows" -H 'x-api-key: k' -H 'content-type: application/json' \
  -d @"$here/examples/flows/greet.json" >/dev/null
curl -fs -X POST "127.0.0.1:$port/webhooks/greet" -H 'content-type: application/json' -d '{"name":"ada","n":7}' >/dev/null
sleep 1
idle=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
cat > "$dir/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"name": "ada", "n": 7}'
wrk.headers["Content-Type"] = "application/json"
LUA
( sleep $((seconds / 2)); awk '/VmRSS/ {print $2}' /proc/$pid/status > "$dir/rss" ) &
sampler=$!
wrk -t2 -c32 -d"${seconds}s" --latency -s "$dir/post.lua" "http://127.0.0.1:$port/webhooks/greet"
wait $sampler
echo "ready in ${ready_ms} ms (including the shell's polling)"
echo "memory: idle $((idle / 1024)) MB, under load $(( $(cat "$dir/rss") / 1024 )) MB (VmRSS)"
runs=$(curl -fs "127.0.0.1:$port/api/v1/runs?flow_id=greet&status=succeeded&limit=1" -H 'x-api-key: k' | head -c 200)
echo "a stored run: $runs"
