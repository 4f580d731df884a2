#!/usr/bin/env bash
# Parked runs on the embedded defaults: N runs of a flow whose one node is a `delay` until the
# same time T park (`waiting`, no worker held); the server's memory is measured idle and with
# all of them waiting; then T comes and the timer wakes them: how long until none waits (the
# wake), how late each run's delay finished after T (its resumed execution; p50, p99, max),
# and how long until every run succeeded.
#
#   cargo build --release -p flowcore-server
#   benches/load/timers.sh [N]            # default 10000
#   CONTROL=1 benches/load/timers.sh [N]  # the same runs with a time past: none parks, all
#                                         # finish; the memory to compare with
#
# Loopback only; every wait below is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/load/serve.sh

n=${1:-10000}
bin=${FLOWCORE_BIN:-${CARGO_TARGET_DIR:-target}/release/flowcore}
serve "$bin"
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status"; }

curl -fs -H 'x-api-key: k' -H 'content-type: application/json' "127.0.0.1:$port/api/v1/flows" \
  -d '{"id": "sleep", "nodes": [{"id": "d", "type": "delay", "params": {"until": "{{ input.at }}"}}]}' >/dev/null
sleep 2
idle=$(rss)

python3 - "$port" "$n" "$pid" "$idle" "${CONTROL:-}" <<'EOF'
import http.client, json, sys, threading, time, datetime

port, n, pid, idle = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
control = sys.argv[5] == "1"
H = {"x-api-key": "k", "content-type": "application/json"}

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

def call(conn, method, path, body=None):
    conn.request(method, path, body=body, headers=H)
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data) if data else None

# Every run's delay ends at the same second T, far enough away for all of them to park first.
lead = max(30, n // 400)
t = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=lead)
at = t.isoformat().replace("+00:00", "Z") if not control else "2001-01-01T00:00:00Z"
ids, lock = [], threading.Lock()

def create(count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    mine = []
    for _ in range(count):
        status, run = call(conn, "POST", "/api/v1/flows/sleep/runs", json.dumps({"input": {"at": at}, "wait": False}))
        assert status == 202, (status, run)
        mine.append(run["run_id"])
    with lock:
        ids.extend(mine)

started = time.time()
threads = [threading.Thread(target=create, args=(n // 4 + (1 if i < n % 4 else 0),)) for i in range(4)]
for th in threads: th.start()
for th in threads: th.join()
created = time.time() - started

def connect():
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)

def count(status):
    conn = connect()
    total, cursor = 0, None
    while True:
        path = f"/api/v1/runs?flow_id=sleep&status={status}&limit=1000" + (f"&cursor={cursor}" if cursor else "")
        _, page = call(conn, "GET", path)
        total += len(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return total

if control:
    limit = time.time() + 300
    while count("succeeded") < n:
        assert time.time() < limit, "not all runs finished within 300 s"
        time.sleep(0.5)
    time.sleep(5)
    print(f"control: {n} runs created in {created:.1f} s, all succeeded after {time.time() - started - 5:.1f} s")
    print(f"memory: idle {idle} MB, after {n} runs that did not park {rss()} MB ({rss() - idle:+d} MB)")
    sys.exit(0)
deadline = time.time() + lead
while count("waiting") < n:
    assert time.time() < deadline, "not all runs parked before T"
    time.sleep(0.5)
parked_at = time.time() - started
time.sleep(5)  # what executing them left behind settles (allocator, caches)
waiting_rss = rss()
print(f"{n} runs created in {created:.1f} s ({n / created:.0f}/s), all waiting after {parked_at:.1f} s")
print(f"memory: idle {idle} MB, {n} runs waiting {waiting_rss} MB ({waiting_rss - idle:+d} MB)")

tt = t.timestamp()
while time.time() < tt:
    time.sleep(0.05)
limit = time.time() + 300
while count("waiting") > 0:
    assert time.time() < limit, "not all runs were woken within 300 s"
    time.sleep(0.1)
woken_all = time.time() - tt
while count("succeeded") < n:
    assert time.time() < limit, "not all runs woke within 120 s"
    time.sleep(0.2)
all_done = time.time() - tt

late = []
conn = connect()
for run_id in ids:
    _, run = call(conn, "GET", f"/api/v1/runs/{run_id}")
    (step,) = [s for s in run["steps"] if s["node"] == "d"]
    end = datetime.datetime.fromisoformat(step["finished_at"].replace("Z", "+00:00")).timestamp()
    late.append(end - tt)
late.sort()
pct = lambda p: late[min(len(late) - 1, int(len(late) * p))]
print(f"woken (none waiting) {woken_all:.2f} s after T; delay ended after T: p50 {pct(0.5):.3f} s, "
      f"p99 {pct(0.99):.3f} s, max {late[-1]:.3f} s; all {n} succeeded {all_done:.2f} s after T "
      f"({n / all_done:.0f} runs/s); memory after {rss()} MB")
EOF
