"""Driver of benches/load/timers.sh: parked runs and the timer, through the HTTP API.

    timers.py park URL N STATE [control]   start N runs of `sleep` whose delay ends at the same
                                           second T; return once all of them wait (control:
                                           a time past, return once all succeeded)
    timers.py wake URL STATE               wait for T; report how long until none waits, how
                                           late each delay ended after T, and until all
                                           succeeded

STATE is a file holding T and the runs' ids between the two. Every loop is bounded in time.
"""
import datetime, http.client, json, sys, threading, time
from urllib.parse import urlparse

H = {"x-api-key": "k", "content-type": "application/json"}


def connect(url):
    u = urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def call(conn, method, path, body=None):
    conn.request(method, path, body=body, headers=H)
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data) if data else None


def count(url, status):
    conn, total, cursor = connect(url), 0, None
    while True:
        path = f"/api/v1/runs?flow_id=sleep&status={status}&limit=1000" + (f"&cursor={cursor}" if cursor else "")
        _, page = call(conn, "GET", path)
        total += len(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return total


def park(url, n, state, control):
    # Every run's delay ends at the same second T, far enough away for all of them to park
    # first (and, with a restart between, for the restart).
    lead = max(40, n // 300)
    t = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=lead)
    at = "2001-01-01T00:00:00Z" if control else t.isoformat().replace("+00:00", "Z")
    ids, lock = [], threading.Lock()

    def create(count):
        conn, mine = connect(url), []
        body = json.dumps({"input": {"at": at}, "wait": False})
        for _ in range(count):
            # A server whose queue is full answers 503 `overloaded`: a client waits and tries
            # again, within the bound.
            for _ in range(1200):
                status, run = call(conn, "POST", "/api/v1/flows/sleep/runs", body)
                if status != 503:
                    break
                time.sleep(0.1)
            assert status == 202, (status, run)
            mine.append(run["run_id"])
        with lock:
            ids.extend(mine)

    started = time.time()
    threads = [threading.Thread(target=create, args=(n // 4 + (1 if i < n % 4 else 0),)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    created = time.time() - started
    want, limit = ("succeeded", 300) if control else ("waiting", lead)
    deadline = started + limit
    while count(url, want) < n:
        assert time.time() < deadline, f"not all runs {want} within {limit} s"
        time.sleep(0.5)
    print(f"{n} runs created in {created:.1f} s ({n / created:.0f}/s), all {want} after {time.time() - started:.1f} s")
    json.dump({"t": t.timestamp(), "ids": ids}, open(state, "w"))


def wake(url, state):
    saved = json.load(open(state))
    tt, ids, n = saved["t"], saved["ids"], len(saved["ids"])
    assert time.time() < tt, "T passed before the wake was watched"
    while time.time() < tt:
        time.sleep(0.05)
    limit = time.time() + 300
    while count(url, "waiting") > 0:
        assert time.time() < limit, "not all runs were woken within 300 s"
        time.sleep(0.1)
    woken_all = time.time() - tt
    while count(url, "succeeded") < n:
        assert time.time() < limit, "not all runs succeeded within 300 s"
        time.sleep(0.2)
    all_done = time.time() - tt
    late, conn = [], connect(url)
    for run_id in ids:
        _, run = call(conn, "GET", f"/api/v1/runs/{run_id}")
        (step,) = [s for s in run["steps"] if s["node"] == "d"]
        end = datetime.datetime.fromisoformat(step["finished_at"].replace("Z", "+00:00")).timestamp()
        late.append(end - tt)
    late.sort()
    pct = lambda p: late[min(len(late) - 1, int(len(late) * p))]
    print(f"woken (none waiting) {woken_all:.2f} s after T; delay ended after T: p50 {pct(0.5):.3f} s, "
          f"p99 {pct(0.99):.3f} s, max {late[-1]:.3f} s; all {n} succeeded {all_done:.2f} s after T "
          f"({n / all_done:.0f} runs/s)")


if __name__ == "__main__":
    if sys.argv[1] == "park":
        park(sys.argv[2], int(sys.argv[3]), sys.argv[4], len(sys.argv) > 5 and sys.argv[5] == "control")
    else:
        wake(sys.argv[2], sys.argv[3])
