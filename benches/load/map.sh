#!/usr/bin/env bash
# A `map` of N items (default 10,000) over a one-node child, through the server on the embedded
# defaults (or PostgreSQL with DATABASE_URL=postgres://...): RUNS runs one after another
# (default 5), each started with `wait: true`; prints each run's items per second (items over
# the run's own time, from its record) and over the whole request, and the server's memory.
#
#   cargo build --release -p flowcore-server
#   benches/load/map.sh [N] [RUNS]
#   DATABASE_URL=postgres://postgres@127.0.0.1/flowcore_bench benches/load/map.sh
#
# Loopback only; the runs are bounded by the flow's time limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/serve.sh

n=${1:-10000}
runs=${2:-5}
bin=${FLOWCORE_BIN:-${CARGO_TARGET_DIR:-target}/release/flowcore}
serve "$bin" ${DATABASE_URL:+DATABASE_URL=$DATABASE_URL} WEBHOOK_TIMEOUT_SECONDS=120

python3 - "$port" "$n" "$runs" "$pid" <<'PY'
import http.client, json, sys, time
from datetime import datetime

port, n, runs, pid = (int(a) for a in sys.argv[1:5])
H = {"x-api-key": "k", "content-type": "application/json"}

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

def call(method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(method, path, json.dumps(body) if body is not None else None, H)
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, json.loads(data)

flow = {"id": "each", "nodes": [{"id": "m", "type": "map", "params": {
    "items": "{{ input.items }}", "max_items": 100000,
    "flow": {"nodes": [{"id": "t", "type": "set", "params": {"fields": {"n": "{{ input }}"}}}]}}}]}
status, body = call("POST", "/api/v1/flows", flow)
assert status in (200, 201), body
print(f"idle: {rss()} MB")
for r in range(runs):
    started = time.monotonic()
    status, run = call("POST", "/api/v1/flows/each/runs", {"input": {"items": list(range(n))}, "wait": True})
    took = time.monotonic() - started
    assert status == 200 and run["status"] == "succeeded", (status, str(run)[:300])
    assert len(run["output"]) == n and run["output"][n - 1] == {"n": n - 1}
    status, shown = call("GET", f"/api/v1/runs/{run['run_id']}")
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
    own = (parse(shown["finished_at"]) - parse(shown["started_at"])).total_seconds()
    step = shown["steps"][0]
    assert step["items_done"] == n, step
    print(f"run {r + 1}: {n} items, {n / own:,.0f} items/s in the run ({own * 1000:.0f} ms), "
          f"{n / took:,.0f} items/s over the request ({took * 1000:.0f} ms), rss {rss()} MB")
PY
