//! The fault suite of the production topology: 2 `api` and 3 `worker` processes, each started
//! through `deploy/local/run.sh` (so the deploy settings are checked by the real binary), on a
//! throwaway PostgreSQL cluster (`initdb` into a temporary folder, its own port), a throwaway
//! Redis and a local S3 server (moto). Runs of a flow with delays and several steps are pushed
//! through both api processes while workers and api processes are killed with SIGKILL and
//! restarted at random, Redis is restarted empty, and PostgreSQL is stopped the way a crash
//! stops it (immediate shutdown: no checkpoint, recovery from the WAL at the next start).
//!
//! At the end: every accepted run finished exactly once with the right output, no step whose
//! success was stored ran again (checked by the step server at the moment of every repeated
//! call), nothing is stuck. The figures are printed (`--nocapture`). Loopback only; every loop is
//! bounded. `FLOWCORE_FAULT_SECONDS` (30) sets how long the load and the faults last;
//! `FLOWCORE_TEST_POSTGRES_BIN` the folder of `initdb` and `postgres` (else `pg_config --bindir`);
//! with `FLOWCORE_FAULT_KEEP` set, the processes' logs and data stay in the temporary folder.
//! `FLOWCORE_FAULT_LOG` sets the processes' log filter (default `warn`); `FLOWCORE_FAULT_SEED`
//! replays a report's seed (the choice and order of faults; their timing varies).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY: &str = "fault-admin-key";

include!("common/http.rs");
/// Short leases, so that a killed worker's runs move on quickly.
const LEASE_SECONDS: u64 = 3;
const NODES: [&str; 3] = ["s1", "s2", "s3"];

/// The URL (without a database) of the suite's own PostgreSQL, set once it runs.
static POSTGRES: OnceLock<String> = OnceLock::new();

fn postgres_base() -> &'static str {
    POSTGRES
        .get()
        .expect("the suite's PostgreSQL is started first")
}

/// One SQL statement through psql; rows as lines, columns separated by a tab.
fn try_psql(database: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            &format!("{}/{database}", postgres_base()),
            "-XAtq",
            "-F",
            "\t",
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`try_psql`], again and again for up to 60 s while PostgreSQL may be restarting.
fn psql(database: &str, sql: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match try_psql(database, sql) {
            Ok(out) => return out,
            Err(e) if Instant::now() >= deadline => panic!("psql failed for 60 s: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The folder of PostgreSQL's server programs.
fn postgres_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("FLOWCORE_TEST_POSTGRES_BIN") {
        return dir.into();
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config runs (or set FLOWCORE_TEST_POSTGRES_BIN to the folder of initdb)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
fn postgres_user() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?))
}

/// A PostgreSQL cluster of its own in `dir`, on `port`: created with `initdb`, not started.
fn postgres_cluster(dir: &Path, port: u16) -> Proc {
    use std::os::unix::process::CommandExt;
    let bin = postgres_bin();
    let user = postgres_user();
    std::fs::create_dir_all(dir).unwrap();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown the cluster folder");
    }
    let command = move |program: &str| {
        let mut c = Command::new(bin.join(program));
        if let Some((uid, gid)) = user {
            c.uid(uid).gid(gid);
        }
        c
    };
    let data = dir.join("data");
    let out = command("initdb")
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .output()
        .expect("initdb runs");
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (dir, log) = (dir.to_owned(), dir.join("postgres.log"));
    let mut postgres = Proc::new("postgres", port, move || {
        let mut c = command("postgres");
        c.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .stdout(Stdio::null())
            .stderr(log_file(&log));
        c
    });
    // Immediate shutdown: the server processes exit at once, without a checkpoint; the next
    // start recovers from the WAL, as after a crash.
    postgres.stop_signal = Some("QUIT");
    postgres
}

/// A process's log, appended to across its restarts.
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

/// Waits until something accepts TCP connections on `port`.
fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start in 30 s");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A child process stopped (SIGKILL, or `stop_signal`) and reaped on drop.
struct Proc {
    name: String,
    command: Box<dyn Fn() -> Command + Send>,
    port: u16,
    child: Option<Child>,
    stop_signal: Option<&'static str>,
}

impl Proc {
    /// A process named `name` that `command` starts and that listens on `port`; killed with
    /// SIGKILL unless `stop_signal` is set.
    fn new(
        name: impl Into<String>,
        port: u16,
        command: impl Fn() -> Command + Send + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            port,
            child: None,
            stop_signal: None,
            command: Box::new(command),
        }
    }

    /// Starts the process, again while it exits at start (a database still recovering from
    /// a crash refuses connections for a while), for up to 30 s.
    fn start(&mut self) {
        let mut last = String::new();
        let (started, mut tries) = (Instant::now(), 0);
        while tries < 5 || started.elapsed() < Duration::from_secs(30) {
            tries += 1;
            let mut child = (self.command)().spawn().expect("spawn");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("{} exited with {status}", self.name);
                    break;
                }
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "{} did not start", self.name);
                thread::sleep(Duration::from_millis(20));
            }
            thread::sleep(Duration::from_millis(500));
        }
        panic!("{last} {tries} times in {:?}", started.elapsed());
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            match self.stop_signal {
                Some(signal) => {
                    let _ = Command::new("kill")
                        .arg(format!("-{signal}"))
                        .arg(child.id().to_string())
                        .status();
                }
                None => {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 request (a connection each): the status and the JSON body, `None` when the
/// connection failed.
fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    http_request(port, method, path, body).map(|(status, answer)| (status, json_body(&answer)))
}

/// One call of a step as the step server saw it.
#[derive(Debug, Clone, Copy)]
struct Call {
    start: Instant,
    end: Instant,
}

/// What the step server saw: calls per (run key, node), and repeated calls of a step whose
/// success was already stored.
#[derive(Default)]
struct Seen {
    calls: Mutex<HashMap<(String, String), Vec<Call>>>,
    violations: Mutex<Vec<String>>,
}

/// The HTTP server the flow's steps call: it sleeps `ms`, remembers the call and, when a step
/// is called again, checks in the database that its success was not stored before.
fn step_server(database: String, seen: Arc<Seen>, stop: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((sock, _)) => {
                    let (database, seen) = (database.clone(), seen.clone());
                    thread::spawn(move || serve_steps(sock, &database, &seen));
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    port
}

fn serve_steps(sock: TcpStream, database: &str, seen: &Seen) {
    let _ = sock.set_nonblocking(false);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
    let mut writer = match sock.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(sock);
    // Keep-alive: requests one after the other, at most 10,000 on one connection.
    for _ in 0..10_000 {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let key = body["k"].as_str().unwrap_or_default().to_owned();
        let node = body["node"].as_str().unwrap_or_default().to_owned();
        let start = Instant::now();
        let earlier: Vec<Call> = seen
            .calls
            .lock()
            .unwrap()
            .get(&(key.clone(), node.clone()))
            .cloned()
            .unwrap_or_default();
        if !earlier.is_empty() {
            // The step runs again: only allowed when its success was never stored.
            let stored = psql(
                database,
                &format!(
                    "SELECT r.epoch, r.status, coalesce(r.lease_owner, ''), s.attempts, \
                     to_timestamp(s.started_at / 1e6)::time, to_timestamp(s.finished_at / 1e6)::time \
                     FROM steps s JOIN runs r ON r.id = s.run_id \
                     WHERE r.idempotency_key = '{key}' AND s.node = '{node}' AND s.status = 'succeeded'"
                ),
            );
            if !stored.trim().is_empty() {
                // Enough to follow it in the logs: the stored step (run epoch, status, owner,
                // attempts, started, finished), the wall clock, the earlier calls' ages.
                let ages: Vec<_> = earlier
                    .iter()
                    .map(|c| (start - c.start, start - c.end))
                    .collect();
                seen.violations.lock().unwrap().push(format!(
                    "{key}/{node} ran again after its success was stored (stored: {}; now {:?}; \
                     check took {:?}; earlier calls started/ended before this one: {ages:?})",
                    stored.trim(),
                    std::time::SystemTime::now(),
                    start.elapsed(),
                ));
            }
        }
        thread::sleep(Duration::from_millis(
            body["ms"].as_u64().unwrap_or(0).min(10_000),
        ));
        let calls = {
            let mut map = seen.calls.lock().unwrap();
            let list = map.entry((key, node)).or_default();
            list.push(Call {
                start,
                end: Instant::now(),
            });
            list.len()
        };
        let answer = json!({"calls": calls}).to_string();
        if write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        )
        .is_err()
        {
            return;
        }
    }
}

/// A call of the step server as node `node` of the run keyed `input.k`.
fn step(step_port: u16, node: &str) -> Value {
    json!({"id": node, "type": "http_request", "params": {
        "method": "POST",
        "url": format!("http://127.0.0.1:{step_port}/step"),
        "body": {"k": "{{ input.k }}", "node": node, "ms": 50},
        "timeout_ms": 10_000
    }})
}

/// The flow: three calls of the step server with delays in between, then the answer.
fn flow(step_port: u16) -> Value {
    let step = |node: &str| step(step_port, node);
    json!({
        "id": "fault",
        "nodes": [
            step("s1"),
            {"id": "d1", "type": "delay", "params": {"ms": 100}},
            step("s2"),
            {"id": "d2", "type": "delay", "params": {"ms": 100}},
            step("s3"),
            {"id": "out", "type": "set", "params": {"fields": {"k": "{{ input.k }}", "done": "yes"}}}
        ],
        "edges": [
            {"from": "s1", "to": "d1"}, {"from": "d1", "to": "s2"}, {"from": "s2", "to": "d2"},
            {"from": "d2", "to": "s3"}, {"from": "s3", "to": "out"}
        ]
    })
}

/// A fault the chaos thread caused.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Worker,
    Api,
    Redis,
    Postgres,
}

#[test]
fn topology_survives_kills_and_restarts() {
    let seconds: u64 = std::env::var("FLOWCORE_FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
        .clamp(5, 600);
    // The chaos's choices replay from `FLOWCORE_FAULT_SEED` (the timings do not).
    let seed = std::env::var("FLOWCORE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    fastrand::seed(seed);
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("flowcore-faults-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // PostgreSQL: a cluster of its own, which the chaos restarts.
    let postgres_port = free_port();
    let mut postgres = postgres_cluster(&dir.join("postgres"), postgres_port);
    postgres.start();
    POSTGRES
        .set(format!("postgres://postgres@127.0.0.1:{postgres_port}"))
        .expect("set once");
    let database = "flowcore_faults".to_owned();
    psql("postgres", &format!("CREATE DATABASE {database}"));

    // A throwaway Redis (restarted empty by the chaos) and moto as S3.
    let redis_port = free_port();
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let mut redis = Proc::new("redis-server", redis_port, move || {
        let mut c = Command::new("redis-server");
        c.args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&redis_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    });
    redis.start();
    let moto_port = free_port();
    let mut moto = Proc::new("moto_server", moto_port, move || {
        let program =
            std::env::var("FLOWCORE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let mut c = Command::new(program);
        c.args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    });
    moto.start();
    wait_for_port(moto_port, "moto_server");
    let (status, _) = request(moto_port, "PUT", "/flowcore", None).expect("moto answers");
    assert!(status < 300, "bucket creation answered {status}");

    let seen = Arc::new(Seen::default());
    let stop_steps = Arc::new(AtomicBool::new(false));
    let step_port = step_server(database.clone(), seen.clone(), stop_steps.clone());

    // The flowcore processes, through the deploy script.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/run.sh");
    let env: Vec<(String, String)> = vec![
        (
            "DATABASE_URL".into(),
            format!("{}/{database}", postgres_base()),
        ),
        (
            "REDIS_URL".into(),
            format!("redis://127.0.0.1:{redis_port}"),
        ),
        ("FLOWCORE_REDIS_PREFIX".into(), "faults".into()),
        (
            "S3_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{moto_port}"),
        ),
        ("S3_STORAGE_ACCESS_KEY_ID".into(), "test".into()),
        ("S3_STORAGE_SECRET_ACCESS_KEY".into(), "test".into()),
        ("FLOWCORE_ADMIN_KEY".into(), KEY.into()),
        ("FLOWCORE_ENCRYPTION_KEY".into(), "11".repeat(32)),
        ("FLOWCORE_LEASE_SECONDS".into(), LEASE_SECONDS.to_string()),
        ("WORKER_CONCURRENCY".into(), "16".into()),
        // The flows' steps report to a recorder on loopback, which http_request reaches only
        // when allowed.
        ("FLOWCORE_HTTP_ALLOW".into(), "127.0.0.1/32".into()),
        // One client address and no proxy here.
        ("RATE_LIMIT_PER_MINUTE".into(), "0".into()),
        ("NUMBER_OF_PROXIES".into(), "0".into()),
        // FLOWCORE_FAULT_LOG (e.g. `warn,flowcore=debug,flowcore_server=debug`) to follow runs.
        (
            "RUST_LOG".into(),
            std::env::var("FLOWCORE_FAULT_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    let process = |role: &str, i: usize| {
        let port = free_port();
        let name = format!("{role}{i}");
        let (script, env, data) = (script.clone(), env.clone(), dir.join(&name));
        let log: PathBuf = dir.join(format!("{name}.log"));
        let role = role.to_owned();
        Proc::new(name, port, move || {
            let mut c = Command::new("bash");
            c.arg(&script)
                .arg(env!("CARGO_BIN_EXE_flowcore"))
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("FLOWCORE_ROLE", &role)
                .env("FLOWCORE_BIND", format!("127.0.0.1:{port}"))
                .env("FLOWCORE_DATA_DIR", &data)
                .stdout(Stdio::null())
                .stderr(log_file(&log));
            c
        })
    };
    let mut apis: Vec<Proc> = (1..=2).map(|i| process("api", i)).collect();
    let mut workers: Vec<Proc> = (1..=3).map(|i| process("worker", i)).collect();
    for p in apis.iter_mut().chain(workers.iter_mut()) {
        p.start();
    }
    let api_ports: Vec<u16> = apis.iter().map(|p| p.port).collect();
    let (status, answer) = request(
        api_ports[0],
        "POST",
        "/api/v1/flows",
        Some(&flow(step_port)),
    )
    .expect("the api answers");
    assert_eq!(status, 201, "the flow is created: {answer}");
    let ready = started.elapsed();

    // The load: runs through both api processes until the end; a run whose request failed on
    // the way is asked for again (same idempotency key) from the other api process.
    let load_until = Instant::now() + Duration::from_secs(seconds);
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let retries = Arc::new(AtomicU64::new(0));
    let server_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..6)
        .map(|t| {
            let (accepted, refused, retries, server_errors, ports) = (
                accepted.clone(),
                refused.clone(),
                retries.clone(),
                server_errors.clone(),
                api_ports.clone(),
            );
            thread::spawn(move || {
                for i in 0..100_000usize {
                    if Instant::now() >= load_until {
                        return;
                    }
                    let key = format!("r{t}-{i}");
                    let body = json!({"input": {"k": key}, "wait": false, "idempotency_key": key});
                    let mut outcome = None;
                    for attempt in 0..100usize {
                        let port = ports[(t + i + attempt) % ports.len()];
                        match request(port, "POST", "/api/v1/flows/fault/runs", Some(&body)) {
                            Some((200 | 202, _)) => {
                                outcome = Some(true);
                                break;
                            }
                            // The queue or the database was down: refused, and the run (if
                            // stored) failed or left for the orphan sweep.
                            Some((503, _)) => {
                                outcome = Some(false);
                                break;
                            }
                            // Any other 5xx is a bug: an outage is a 503.
                            Some((status @ 500.., answer)) => {
                                server_errors
                                    .lock()
                                    .unwrap()
                                    .push(format!("{key}: {status} {answer}"));
                                outcome = Some(false);
                                break;
                            }
                            _ => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                    match outcome {
                        Some(true) => accepted.lock().unwrap().push(key),
                        _ => refused.lock().unwrap().push(key),
                    }
                    thread::sleep(Duration::from_millis(75));
                }
            })
        })
        .collect();

    // The chaos: one fault at a time, every 1.5 to 3 s, each kind at least once.
    let mut faults: Vec<(Instant, Fault)> = Vec::new();
    let mut restarts = 0;
    for round in 0..1000 {
        thread::sleep(Duration::from_millis(fastrand::u64(1500..3000)));
        if Instant::now() + Duration::from_secs(3) >= load_until {
            break;
        }
        let fault = match round {
            0 => Fault::Worker,
            1 => Fault::Redis,
            2 => Fault::Api,
            3 => Fault::Postgres,
            _ => match fastrand::u8(0..10) {
                0..4 => Fault::Worker,
                4..6 => Fault::Api,
                6..8 => Fault::Redis,
                _ => Fault::Postgres,
            },
        };
        let victim = match fault {
            Fault::Worker => fastrand::choice(workers.iter_mut()),
            Fault::Api => fastrand::choice(apis.iter_mut()),
            Fault::Redis => Some(&mut redis),
            Fault::Postgres => Some(&mut postgres),
        }
        .expect("a process");
        victim.kill();
        faults.push((Instant::now(), fault));
        thread::sleep(Duration::from_millis(fastrand::u64(300..1500)));
        victim.start();
        restarts += 1;
    }
    for c in clients {
        c.join().expect("client");
    }
    let load_took = started.elapsed() - ready;

    // Drain: every run reaches its end (leases are 3 s; bounded at 90 s).
    let drain_started = Instant::now();
    let mut left = String::new();
    while drain_started.elapsed() < Duration::from_secs(90) {
        left = psql(
            &database,
            "SELECT count(*) FROM runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')",
        );
        if left.trim() == "0" {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let drained_in = drain_started.elapsed();
    // What the unfinished ones look like, for the failure's message.
    let unfinished = psql(
        &database,
        "SELECT id, idempotency_key, status, epoch, coalesce(lease_owner, ''), created_at, \
         coalesce(lease_expires_at, 0) FROM runs \
         WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') LIMIT 20",
    );

    // The verdict.
    let rows = psql(
        &database,
        "SELECT idempotency_key, status, coalesce(output, '') FROM runs",
    );
    let mut runs: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for line in rows.lines() {
        let mut cols = line.splitn(3, '\t');
        let (key, status, output) = (
            cols.next().unwrap_or_default(),
            cols.next().unwrap_or_default(),
            cols.next().unwrap_or_default(),
        );
        runs.entry(key.to_owned())
            .or_default()
            .push((status.to_owned(), output.to_owned()));
    }
    let accepted = accepted.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    let mut problems = Vec::new();
    let mut lost = 0;
    for key in &accepted {
        match runs.get(key).map(Vec::as_slice) {
            Some([(status, output)]) => {
                let output: Value = serde_json::from_str(output).unwrap_or(Value::Null);
                if status != "succeeded" || output != json!({"k": key, "done": "yes"}) {
                    lost += 1;
                    problems.push(format!("{key}: {status} {output}"));
                }
            }
            Some(many) => {
                lost += 1;
                problems.push(format!("{key}: {} runs", many.len()));
            }
            None => {
                lost += 1;
                problems.push(format!("{key}: accepted but not stored"));
            }
        }
    }
    let calls = seen.calls.lock().unwrap().clone();
    let mut repeated = 0;
    for key in &accepted {
        for node in NODES {
            match calls.get(&(key.clone(), node.to_owned())) {
                None => problems.push(format!("{key}/{node} never ran")),
                Some(list) => repeated += list.len() - 1,
            }
        }
    }
    // Recovery: from a worker's kill to the next step of a run that stalled across it. Only
    // stalls that one fault explains are counted: after two kills it is unknown which worker
    // held the run, and a Redis or PostgreSQL outage has its own recovery.
    let mut longest_recovery = Duration::ZERO;
    let mut by_key: HashMap<&str, Vec<Call>> = HashMap::new();
    for ((key, _), list) in &calls {
        by_key.entry(key).or_default().extend(list.iter().copied());
    }
    for list in by_key.values_mut() {
        list.sort_by_key(|c| c.start);
        for pair in list.windows(2) {
            if pair[1].start - pair[0].end <= Duration::from_secs(1) {
                continue;
            }
            let mut within = faults
                .iter()
                .filter(|(at, _)| pair[0].end < *at && *at < pair[1].start);
            if let (Some((at, Fault::Worker)), None) = (within.next(), within.next()) {
                longest_recovery = longest_recovery.max(pair[1].start - *at);
            }
        }
    }
    let violations = seen.violations.lock().unwrap().clone();
    let server_errors = server_errors.lock().unwrap().clone();
    let count = |f: Fault| faults.iter().filter(|(_, x)| *x == f).count();
    let report = format!(
        "faults: seed {seed}; ready in {ready:?}; load {load_took:?}; {} runs accepted, {} refused with 503 (queue or database down), {} requests retried; \
         kills: {} workers, {} api processes; Redis restarts: {}; PostgreSQL restarts: {}; processes restarted: {restarts}; \
         lost = {lost}; duplicated steps = {}; steps re-run after a kill before their success was stored: {repeated}; \
         longest recovery (worker killed -> its run's next step, the stalls one kill explains) = {longest_recovery:?} (lease {LEASE_SECONDS} s); drained in {drained_in:?}",
        accepted.len(),
        refused.len(),
        retries.load(Ordering::Relaxed),
        count(Fault::Worker),
        count(Fault::Api),
        count(Fault::Redis),
        count(Fault::Postgres),
        violations.len(),
    );
    println!("{report}");
    // Kept where `.ci/run` prints it (a passing test's output is captured).
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-report.txt"),
        format!("{report}\n"),
    );
    for p in apis.iter_mut().chain(workers.iter_mut()) {
        p.kill();
    }
    assert!(
        accepted.len() >= 100,
        "too few runs went through: {}",
        accepted.len()
    );
    assert_eq!(
        left.trim(),
        "0",
        "runs left unfinished: {left} (id, key, status, epoch, owner, created, lease until):\n{unfinished}"
    );
    assert!(
        server_errors.is_empty(),
        "answers other than 503 among the 5xx: {server_errors:?}"
    );
    assert!(violations.is_empty(), "steps ran again: {violations:?}");
    assert!(
        problems.is_empty(),
        "{} problems: {:?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    // Refused runs that were stored ended too (checked above: nothing unfinished).

    // Parked runs across a restart of every process: runs asleep at a delay, then waiting for a
    // signal, while every process stops at once (both api processes, the workers, Redis and
    // PostgreSQL), all wake after the restart (by their time, by signals sent before the stop
    // and after the restart), and each step runs once.
    for p in apis.iter_mut().chain(workers.iter_mut()) {
        p.start();
    }
    let parked = json!({"id": "parked", "nodes": [
        step(step_port, "p1"),
        {"id": "sleep", "type": "delay", "params": {"ms": 3000}},
        {"id": "w", "type": "wait", "params": {"signal": "go", "timeout_ms": 120_000}},
        step(step_port, "p2")
    ], "edges": [{"from": "p1", "to": "sleep"}, {"from": "sleep", "to": "w"}, {"from": "w", "to": "p2"}]});
    let (status, answer) =
        request(api_ports[0], "POST", "/api/v1/flows", Some(&parked)).expect("the api answers");
    assert_eq!(status, 201, "{answer}");
    let mut parked_ids = Vec::new();
    for i in 0..20 {
        let key = format!("parked-{i}");
        let body = json!({"input": {"k": key}, "wait": false, "idempotency_key": key});
        let (status, run) = request(
            api_ports[i % 2],
            "POST",
            "/api/v1/flows/parked/runs",
            Some(&body),
        )
        .expect("the api answers");
        assert_eq!(status, 202, "{run}");
        parked_ids.push(run["run_id"].as_str().expect("an id").to_owned());
    }
    let count_parked = |status: &str| {
        psql(
            &database,
            &format!("SELECT count(*) FROM runs WHERE idempotency_key LIKE 'parked-%' AND status = '{status}'"),
        )
        .trim()
        .to_owned()
    };
    let asleep = Instant::now();
    while count_parked("waiting") != "20" {
        assert!(
            asleep.elapsed() < Duration::from_secs(30),
            "the runs did not all park"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let signal = |id: &str| {
        let path = format!("/api/v1/runs/{id}/signals/go");
        for attempt in 0..300usize {
            if let Some((202, _)) = request(
                api_ports[attempt % 2],
                "POST",
                &path,
                Some(&json!({"ok": true})),
            ) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("the signal for {id} was never taken");
    };
    // Half get their signal before they reach their wait (it is kept for them).
    for id in &parked_ids[..10] {
        signal(id);
    }
    for p in apis.iter_mut().chain(workers.iter_mut()) {
        p.kill();
    }
    redis.kill();
    postgres.kill();
    thread::sleep(Duration::from_millis(500));
    postgres.start();
    redis.start();
    for p in apis.iter_mut().chain(workers.iter_mut()) {
        p.start();
    }
    for id in &parked_ids[10..] {
        signal(id);
    }
    let woken = Instant::now();
    while count_parked("succeeded") != "20" {
        assert!(
            woken.elapsed() < Duration::from_secs(60),
            "parked runs not all done after the restart: {} succeeded",
            count_parked("succeeded")
        );
        thread::sleep(Duration::from_millis(250));
    }
    let calls = seen.calls.lock().unwrap().clone();
    for i in 0..20 {
        for node in ["p1", "p2"] {
            let ran = calls
                .get(&(format!("parked-{i}"), node.to_owned()))
                .map_or(0, Vec::len);
            assert_eq!(ran, 1, "parked-{i}/{node} ran {ran} times");
        }
    }
    let violations = seen.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "steps ran again: {violations:?}");
    println!(
        "faults: 20 parked runs woke after every process restarted, each step once, in {:?}",
        woken.elapsed()
    );
    // Concurrency keys and failure handlers while workers die: keyed runs holding slots and
    // failed runs whose handlers are due, with a worker killed every second or two. No key
    // stays blocked past a lease, no two runs of a key at limit 1 overlap, and each failed run
    // has exactly one handler run. (Every process runs since the restart above.)
    let flows = [
        json!({"id": "keyed", "nodes": [
            step(step_port, "k1"), {"id": "d", "type": "delay", "params": {"ms": 500}}, step(step_port, "k2")
        ], "edges": [{"from": "k1", "to": "d"}, {"from": "d", "to": "k2"}],
        "settings": {"concurrency": {"key": "{{ input.tenant }}", "limit": 1}}}),
        json!({"id": "alert", "nodes": [{"id": "alert", "type": "http_request", "params": {
            "method": "POST", "url": format!("http://127.0.0.1:{step_port}/step"),
            "body": {"k": "{{ input.input.k }}", "node": "alert", "ms": 50}, "timeout_ms": 10_000}}]}),
        json!({"id": "doomed", "nodes": [
            step(step_port, "h1"), {"id": "boom", "type": "script", "params": {"source": "throw \"down\""}}
        ], "edges": [{"from": "h1", "to": "boom"}], "settings": {"on_failure": {"flow_id": "alert"}}}),
    ];
    for flow in &flows {
        let (status, answer) =
            request(api_ports[0], "POST", "/api/v1/flows", Some(flow)).expect("the api answers");
        assert_eq!(status, 201, "{answer}");
    }
    let start = |flow: &str, input: Value, i: usize| {
        let key = input["k"].as_str().expect("k").to_owned();
        let body = json!({"input": input, "wait": false, "idempotency_key": key});
        for attempt in 0..300usize {
            if let Some((202 | 200, _)) = request(
                api_ports[(i + attempt) % 2],
                "POST",
                &format!("/api/v1/flows/{flow}/runs"),
                Some(&body),
            ) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("{key} was never accepted");
    };
    let tenants = 5;
    for i in 0..8 {
        for t in 0..tenants {
            start(
                "keyed",
                json!({"k": format!("keyed-{t}-{i}"), "tenant": format!("t{t}")}),
                i,
            );
        }
    }
    for i in 0..20 {
        start("doomed", json!({"k": format!("doomed-{i}")}), i);
    }
    let kills_started = Instant::now();
    let mut key_kills = 0;
    while kills_started.elapsed() < Duration::from_secs(8) {
        thread::sleep(Duration::from_millis(fastrand::u64(800..1600)));
        let victim = fastrand::choice(workers.iter_mut()).expect("a worker");
        victim.kill();
        thread::sleep(Duration::from_millis(fastrand::u64(200..600)));
        victim.start();
        key_kills += 1;
    }
    let count_runs = |condition: &str| {
        psql(
            &database,
            &format!("SELECT count(*) FROM runs WHERE {condition}"),
        )
        .trim()
        .to_owned()
    };
    let settling = Instant::now();
    while count_runs(
        "flow_id IN ('keyed', 'doomed', 'alert') AND status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')",
    ) != "0"
        || count_runs("flow_id = 'alert'") != "20"
    {
        assert!(
            settling.elapsed() < Duration::from_secs(90),
            "keyed runs or handlers left unfinished: {}",
            psql(
                &database,
                "SELECT flow_id, status, count(*) FROM runs WHERE flow_id IN ('keyed', 'doomed', 'alert') GROUP BY 1, 2"
            )
        );
        thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        count_runs("flow_id = 'keyed' AND status = 'succeeded'"),
        (8 * tenants).to_string()
    );
    assert_eq!(count_runs("flow_id = 'doomed' AND status = 'failed'"), "20");
    assert_eq!(
        count_runs("flow_id = 'alert' AND status = 'succeeded'"),
        "20",
        "one handler each, all through"
    );
    assert_eq!(
        psql(
            &database,
            "SELECT count(DISTINCT input::json->>'run_id') FROM runs WHERE flow_id = 'alert'"
        )
        .trim(),
        "20",
        "each failed run has its own handler"
    );
    // First: a step run again would also make its run's calls overlap the next run's.
    let violations = seen.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "steps ran again: {violations:?}");
    let calls = seen.calls.lock().unwrap().clone();
    for t in 0..tenants {
        let mut spans: Vec<(Instant, Instant)> = (0..8)
            .map(|i| {
                let key = format!("keyed-{t}-{i}");
                let all: Vec<Call> = ["k1", "k2"]
                    .iter()
                    .flat_map(|node| {
                        calls
                            .get(&(key.clone(), (*node).to_owned()))
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect();
                assert!(!all.is_empty(), "{key} never called its steps");
                (
                    all.iter().map(|c| c.start).min().expect("a call"),
                    all.iter().map(|c| c.end).max().expect("a call"),
                )
            })
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "two runs of key t{t} at limit 1 overlapped by {:?} (runs of the key: {})",
                pair[0].1 - pair[1].0,
                psql(
                    &database,
                    &format!(
                        "SELECT string_agg(idempotency_key || ' epoch ' || epoch || ' ' || status, ', ') \
                         FROM runs WHERE flow_id = 'keyed' AND input::json->>'tenant' = 't{t}'"
                    )
                )
                .trim()
            );
        }
    }
    for i in 0..20 {
        let ran = calls
            .get(&(format!("doomed-{i}"), "alert".to_owned()))
            .map_or(0, Vec::len);
        assert!(ran >= 1, "doomed-{i}'s handler never called its step");
    }
    println!(
        "faults: {} keyed runs over {tenants} keys at limit 1 ({} of them taken over from a killed worker) and 20 failure handlers through {key_kills} worker kills, settled in {:?}",
        8 * tenants,
        count_runs("flow_id = 'keyed' AND epoch > 1"),
        settling.elapsed()
    );

    // A database failover of 40 s while runs wait in the queue: every worker slot is busy
    // with a slow step when PostgreSQL stops, so the waiting runs' jobs are taken only while
    // it is away, and their claims fail for as long as it is. Their runs are older than the
    // orphan sweep's look. All of them run once it is back: a worker keeps a job whose claim
    // fails for an outage (giving it back each time would spend its deliveries, and a job
    // dead-lettered leaves its run queued for good).
    let hold = json!({"id": "hold", "nodes": [{"id": "h", "type": "http_request", "params": {
        "method": "POST", "url": format!("http://127.0.0.1:{step_port}/step"),
        "body": {"k": "{{ input.k }}", "node": "h", "ms": 8_000}, "timeout_ms": 30_000}}]});
    let (status, answer) =
        request(api_ports[0], "POST", "/api/v1/flows", Some(&hold)).expect("the api answers");
    assert_eq!(status, 201, "{answer}");
    let submitted = Instant::now();
    // 3 workers of 16 slots.
    for i in 0..60 {
        start("hold", json!({"k": format!("hold-{i}")}), i);
    }
    for i in 0..20 {
        start("fault", json!({"k": format!("failover-{i}")}), i);
    }
    // The waiting runs pass the orphan sweep's age (a lease) and its look (every second).
    thread::sleep(Duration::from_millis(5_500).saturating_sub(submitted.elapsed()));
    assert_eq!(
        count_runs("idempotency_key LIKE 'failover-%' AND status = 'queued'"),
        "20",
        "the runs wait behind busy workers when the database stops"
    );
    postgres.kill();
    thread::sleep(Duration::from_secs(40));
    postgres.start();
    let recovered = Instant::now();
    while count_runs(
        "(idempotency_key LIKE 'failover-%' OR idempotency_key LIKE 'hold-%') AND status = 'succeeded'",
    ) != "80"
    {
        assert!(
            recovered.elapsed() < Duration::from_secs(90),
            "runs left behind by the failover: {}",
            psql(
                &database,
                "SELECT flow_id, status, count(*) FROM runs WHERE idempotency_key LIKE 'failover-%' \
                 OR idempotency_key LIKE 'hold-%' GROUP BY 1, 2"
            )
        );
        thread::sleep(Duration::from_millis(250));
    }
    let violations = seen.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "steps ran again: {violations:?}");
    println!(
        "faults: 80 runs through a 40 s database failover (20 queued behind 60 slow ones), all done {:?} after it",
        recovered.elapsed()
    );

    stop_steps.store(true, Ordering::Relaxed);
    for p in apis.iter_mut().chain(workers.iter_mut()) {
        p.kill();
    }

    postgres.kill();
    // Each PostgreSQL fault was a crash-like stop that the next start recovered from.
    let log = std::fs::read_to_string(dir.join("postgres/postgres.log")).unwrap_or_default();
    assert_eq!(
        log.matches("received immediate shutdown request").count(),
        count(Fault::Postgres) + 3,
        "PostgreSQL stopped once per fault, once with every process, once for the failover and once at the end"
    );
    if std::env::var_os("FLOWCORE_FAULT_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
