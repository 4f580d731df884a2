// Tests of the server as processes on a database: the binary over TCP, its commands, what it
// keeps on disk, restarts, schedules and runs shared by several processes on one database.
// Included by `api_sqlite.rs` and `api_postgres.rs` after `suite.rs` (the memory backend keeps
// nothing past a process, so these have nothing to test there).

#[test]
fn the_binary_serves_over_tcp() {
    let dir = std::env::temp_dir().join(format!("flowcore-serve-{}", flowcore::ids::new_id()));
    let server = Server::start(&dir, &[]);
    let (status, answer) = server.request("GET", "/healthz", None).expect("answer");
    let (flows, _) = server.request("GET", "/api/v1/flows", None).expect("answer");
    drop(server);
    cleanup(&dir);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with(r#"{"status":"ok"}"#), "{answer}");
    assert_eq!(flows, 200);
}

#[test]
fn cli_migrate_and_api_key_create() {
    let dir = std::env::temp_dir().join(format!("flowcore-cli-db-{}", std::process::id()));
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowcore"))
            .args(args)
            .env("FLOWCORE_DATA_DIR", &dir)
            .output()
            .unwrap()
    };
    std::fs::create_dir_all(&dir).unwrap();
    let first = run(&["migrate"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        "10 migration(s) applied"
    );
    assert_eq!(
        String::from_utf8_lossy(&run(&["migrate"]).stdout).trim(),
        "0 migration(s) applied",
        "a second run is a no-op"
    );
    let created = run(&["api-key", "create", "--name", "ops"]);
    assert!(created.status.success());
    let key = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(key.starts_with("fc_") && key.len() == 60, "{key}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .arg("migrate")
        .env("DATABASE_URL", "mysql://x")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("DATABASE_URL: unknown scheme `mysql`"));
    cleanup(&dir);
}

/// A `flowcore serve` child process on a free loopback port, killed on drop.
struct Server {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Server {
    fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join(format!("server-{port}.log"));
        let database = database_for(dir).map(|url| ("DATABASE_URL", url));
        let mut vars: Vec<(&str, &str)> = vec![("RUST_LOG", "debug")];
        vars.extend(database.as_ref().map(|(k, v)| (*k, v.as_str())));
        vars.extend(env.iter().copied());
        let server = Self {
            child: serve_command(port, dir, &vars, Some(&log))
                .spawn()
                .expect("spawn"),
            port,
            log,
        };
        wait_until_up(port);
        server
    }

    /// One HTTP/1.1 request with the admin key: the status and the raw answer.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, String)> {
        http_request(self.port, method, path, body)
    }

    /// A request whose answer is JSON.
    fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, raw) = self.request(method, path, body.as_ref()).expect("answer");
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What lets a server's `http_request` nodes call the echo server on loopback.
const ECHO_ENV: [(&str, &str); 1] = [("FLOWCORE_HTTP_ALLOW", "127.0.0.1/32")];

/// A fresh data folder named after `test`, and an echo server's URL and what it saw.
fn with_echo(
    test: &str,
) -> (std::path::PathBuf, String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let dir = std::env::temp_dir().join(format!("flowcore-{test}-{}", flowcore::ids::new_id()));
    let (url, seen) = echo_server();
    (dir, url, seen)
}

/// A loopback HTTP server that answers every request with the `Authorization` header it got,
/// as JSON, and remembers it.
fn echo_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/echo", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming().take(5000) {
            let Ok(mut sock) = sock else { return };
            let mut reader = BufReader::new(sock.try_clone().unwrap());
            let mut authorization = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("authorization: ") {
                    authorization = line[line.len() - v.len()..].trim().to_owned();
                }
            }
            record.lock().unwrap().push(authorization.clone());
            let body = json!({ "authorization": authorization }).to_string();
            let _ = write!(
                sock,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

/// Every byte under `dir` (the SQLite database, its WAL, the blobs, logs), as lossy text.
fn all_bytes(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&all_bytes(&path));
        } else {
            text.push_str(&String::from_utf8_lossy(
                &std::fs::read(&path).unwrap_or_default(),
            ));
        }
    }
    text
}

#[test]
fn credentials_are_encrypted_used_by_reference_and_never_shown() {
    const SECRET: &str = "sk-live-7f3a9c1e5b2d";
    let dir = std::env::temp_dir().join(format!("flowcore-creds-{}", flowcore::ids::new_id()));
    // The echo server is on loopback, which http_request reaches only when allowed.
    let server = Server::start(&dir, &[("FLOWCORE_HTTP_ALLOW", "127.0.0.1/32")]);
    let (url, seen) = echo_server();

    let (status, created) = server.json(
        "POST",
        "/api/v1/credentials",
        Some(json!({"name": "echo-api", "type": "bearer", "data": {"token": SECRET}})),
    );
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "echo-api");
    assert_eq!(created["type"], "bearer");
    // Refusals quote no value.
    for (body, code) in [
        (
            json!({"name": "x", "type": "bearer", "data": {"tok": SECRET}}),
            "invalid_credential",
        ),
        (
            json!({"name": "x", "type": "oauth9", "data": {"token": SECRET}}),
            "invalid_credential",
        ),
        (
            json!({"name": "x", "type": "bearer", "data": SECRET}),
            "invalid_credential",
        ),
        (
            json!({"name": "no spaces", "type": "bearer", "data": {"token": SECRET}}),
            "invalid_request",
        ),
        (
            json!({"name": "echo-api", "type": "bearer", "data": {"token": SECRET}}),
            "already_exists",
        ),
    ] {
        let (status, answer) = server.json("POST", "/api/v1/credentials", Some(body));
        assert!((400..500).contains(&status), "{answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert!(!answer.to_string().contains(SECRET));
    }

    let flow = json!({
        "id": "call", "nodes": [
            {"id": "call", "type": "http_request", "params": {"url": url, "credential": "echo-api"}},
            {"id": "copy", "type": "set", "params": {"fields": {"got": "{{ nodes.call.body.authorization }}"}}}
        ],
        "edges": [{"from": "call", "to": "copy"}]
    });
    assert_eq!(server.json("POST", "/api/v1/flows", Some(flow)).0, 201);
    let (status, run) = server.json(
        "POST",
        "/api/v1/flows/call/runs",
        Some(json!({"input": {}, "wait": true})),
    );
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["output"], json!({"got": "Bearer [redacted]"}));
    assert_eq!(*seen.lock().unwrap(), vec![format!("Bearer {SECRET}")]);
    let run_id = run["run_id"].as_str().unwrap();
    let (_, stored) = server.json("GET", &format!("/api/v1/runs/{run_id}"), None);
    assert_eq!(stored["status"], "succeeded");

    let (_, list) = server.json("GET", "/api/v1/credentials", None);
    let (_, one) = server.json(
        "GET",
        &format!("/api/v1/credentials/{}", created["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(list["items"][0]["id"], created["id"]);
    assert_eq!(one["name"], "echo-api");
    for answer in [&list, &one, &stored] {
        assert!(!answer.to_string().contains(SECRET), "{answer}");
    }
    let log = server.stop();
    assert!(log.contains("request"), "debug logs were written");
    assert!(!log.contains(SECRET), "the secret is in the log");
    let mut on_disk = all_bytes(&dir);
    on_disk.push_str(&database_bytes(&dir));
    assert!(on_disk.len() > 10_000, "the database is there");
    assert!(on_disk.contains("echo-api"), "the credential's row is there");
    assert!(
        !on_disk.contains(SECRET),
        "the secret is on disk in plain text"
    );
    assert!(!on_disk.contains(&SECRET[3..]), "even a part of it");

    // Rotation: a new key in the key file, every credential re-encrypted, still usable.
    let rotated = std::process::Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .arg("rotate-key")
        .env("FLOWCORE_DATA_DIR", &dir)
        .envs(database_for(&dir).map(|url| ("DATABASE_URL", url)))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&rotated.stdout);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert!(
        said.starts_with("1 credential(s) re-encrypted under key "),
        "{said}"
    );
    let keys = std::fs::read_to_string(dir.join("encryption.keys")).unwrap();
    assert_eq!(keys.lines().count(), 2, "the old key stays");
    let server = Server::start(&dir, &[("FLOWCORE_HTTP_ALLOW", "127.0.0.1/32")]);
    let (_, one) = server.json(
        "GET",
        &format!("/api/v1/credentials/{}", created["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(
        Some(one["key_id"].as_str().unwrap()),
        said.trim().rsplit(' ').next()
    );
    assert_ne!(one["key_id"], created["key_id"]);
    let (status, run) = server.json(
        "POST",
        "/api/v1/flows/call/runs",
        Some(json!({"input": {}})),
    );
    assert_eq!(
        (status, &run["output"]["got"]),
        (200, &json!("Bearer [redacted]"))
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(seen.lock().unwrap()[1], format!("Bearer {SECRET}"));
    let (status, _) = server.json(
        "DELETE",
        &format!("/api/v1/credentials/{}", created["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 204);
    let (status, run) = server.json(
        "POST",
        "/api/v1/flows/call/runs",
        Some(json!({"input": {}})),
    );
    assert_eq!(status, 200);
    assert_eq!(run["status"], "failed");
    drop(server);
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_tick_fires_once_across_processes() {
    let (app, a, dir) = app_with_state(&[]).await;
    // A second process on the same database.
    let vars = [
        ("FLOWCORE_DATA_DIR".to_owned(), dir.display().to_string()),
        ("STORAGE_TYPE".to_owned(), "memory".to_owned()),
        ("DATABASE_URL".to_owned(), a.config.database_url.as_str().to_owned()),
    ];
    let b = flowcore_server::build_state(Config::from_vars(vars).unwrap())
        .await
        .unwrap();
    let flow = json!({"id": "tick", "nodes": [{"id": "n", "type": "noop"}], "triggers": [{"type": "schedule", "cron": "*/5 * * * *"}]});
    assert_eq!(
        call(
            &app,
            "POST",
            "/api/v1/flows",
            Some(KEY),
            Some(flow.to_string().into_bytes())
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let (from, to) = (at("2026-01-01T10:00:00Z"), at("2026-01-01T11:00:00Z"));
    let (fired_a, fired_b) = tokio::join!(
        flowcore_server::schedules::fire_window(&a, from, to),
        flowcore_server::schedules::fire_window(&b, from, to)
    );
    assert_eq!(
        (fired_a.unwrap(), fired_b.unwrap()),
        (10, 10),
        "at most 10 ticks a window, each asked by both"
    );
    let (_, runs) = get(&app, "/api/v1/runs?flow_id=tick&limit=100").await;
    let runs = runs["items"].as_array().unwrap();
    assert_eq!(runs.len(), 10, "one run per tick");
    let (_, one) = get(&app, &format!("/api/v1/runs/{}", runs[9]["id"].as_str().unwrap())).await;
    assert_eq!(
        one["input"],
        json!({"scheduled_at": "2026-01-01T10:05:00Z", "schedule": "tick#0"})
    );
    // The same window again starts nothing new.
    flowcore_server::schedules::fire_window(&b, from, to)
        .await
        .unwrap();
    let (_, again) = get(&app, "/api/v1/runs?flow_id=tick&limit=100").await;
    assert_eq!(again["items"].as_array().unwrap().len(), 10);
    cleanup(&dir);
}

/// Runs parked at a `delay` and at a `wait` when the server is killed (-9) wake after a
/// restart, by their time and by signals sent before and after the kill, and each goes on
/// exactly once: the call after their waits reaches the echo server once per run.
#[test]
fn parked_runs_survive_a_kill_and_wake_once() {
    let (dir, url, seen) = with_echo("parked");
    let env = ECHO_ENV;
    let server = Server::start(&dir, &env);
    let flow = json!({"id": "later", "nodes": [
        {"id": "d", "type": "delay", "params": {"ms": 3000}},
        {"id": "w", "type": "wait", "params": {"signal": "go", "timeout_ms": 60000}},
        {"id": "call", "type": "http_request", "params": {"url": url, "headers": {"authorization": "run {{ run.id }}"}}}
    ], "edges": [{"from": "d", "to": "call"}, {"from": "w", "to": "call"}]});
    assert_eq!(server.json("POST", "/api/v1/flows", Some(flow)).0, 201);
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (status, run) = server.json("POST", "/api/v1/flows/later/runs", Some(json!({"wait": false})));
        assert_eq!(status, 202, "{run}");
        ids.push(run["run_id"].as_str().unwrap().to_owned());
    }
    let status_of = |server: &Server, id: &str| server.json("GET", &format!("/api/v1/runs/{id}"), None).1["status"].clone();
    let started = std::time::Instant::now();
    while !ids.iter().all(|id| status_of(&server, id) == "waiting") {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "not all parked");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Half get their signal before the kill, half after the restart.
    for id in &ids[..5] {
        let (status, sent) = server.json("POST", &format!("/api/v1/runs/{id}/signals/go"), Some(json!({"n": 1})));
        assert_eq!(status, 202, "{sent}");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    server.stop();
    let server = Server::start(&dir, &env);
    for id in &ids[5..] {
        let (status, sent) = server.json("POST", &format!("/api/v1/runs/{id}/signals/go"), Some(json!({"n": 2})));
        assert_eq!(status, 202, "{sent}");
    }
    let woken = std::time::Instant::now();
    while !ids.iter().all(|id| status_of(&server, id) == "succeeded") {
        let states: Vec<Value> = ids.iter().map(|id| status_of(&server, id)).collect();
        assert!(woken.elapsed() < std::time::Duration::from_secs(20), "not all woke: {states:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut calls = seen.lock().unwrap().clone();
    calls.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("run {id}")).collect();
    expected.sort();
    assert_eq!(calls, expected, "each run went on exactly once");
    drop(server);
    cleanup(&dir);
}

/// A 1,000-item map whose worker is killed (-9) half way: after a restart the run finishes
/// with every item's result, and no item checkpointed before the kill runs again.
#[test]
fn a_map_survives_a_kill_and_runs_no_checkpointed_item_again() {
    let (dir, url, seen) = with_echo("map-kill");
    let env = ECHO_ENV;
    let server = Server::start(&dir, &env);
    let flow = json!({"id": "each", "nodes": [{"id": "m", "type": "map", "params": {
        "items": "{{ input.items }}",
        "concurrency": 8,
        "flow": {"nodes": [
            {"id": "d", "type": "delay", "params": {"ms": 15}},
            {"id": "call", "type": "http_request", "params": {"url": url, "headers": {"authorization": "item {{ input }}"}}}
        ], "edges": [{"from": "d", "to": "call"}]}
    }}]});
    assert_eq!(server.json("POST", "/api/v1/flows", Some(flow)).0, 201);
    let items: Vec<u32> = (0..1000).collect();
    let (status, run) = server.json("POST", "/api/v1/flows/each/runs", Some(json!({"input": {"items": items}, "wait": false})));
    assert_eq!(status, 202, "{run}");
    let id = run["run_id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    loop {
        let (_, run) = server.json("GET", &format!("/api/v1/runs/{id}"), None);
        let done = run["steps"][0]["items_done"].as_u64().unwrap_or(0);
        if done >= 200 {
            assert_eq!(run["steps"][0]["items_total"], 1000, "{run}");
            assert_eq!(run["steps"][0]["status"], "running", "{run}");
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "no progress: {run}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.stop();
    // What the killed worker had checkpointed, read from the database itself.
    let database = database_for(&dir)
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("flowcore.db").display()));
    let checkpointed: Vec<u32> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use flowcore::ports::RunStore;
        let store = flowcore_store::SqlStore::connect(flowcore_store::SqlConfig::new(&database))
            .await
            .expect("the database");
        let id = flowcore::RunId::from(id.as_str());
        store.items(&id, "m").await.expect("items").into_iter().map(|(i, _)| i).collect()
    });
    assert!(checkpointed.len() >= 200 && checkpointed.len() < 1000, "{}", checkpointed.len());
    let calls_before = seen.lock().unwrap().len();

    let server = Server::start(&dir, &env);
    let resumed = std::time::Instant::now();
    let done = loop {
        let (_, run) = server.json("GET", &format!("/api/v1/runs/{id}"), None);
        if run["status"] == "succeeded" {
            break run;
        }
        assert!(run["status"] == "running" || run["status"] == "queued", "{run}");
        assert!(resumed.elapsed() < std::time::Duration::from_secs(60), "never finished: {run}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let output = done["output"].as_array().expect("an array");
    assert_eq!(output.len(), 1000);
    for (i, item) in output.iter().enumerate() {
        assert_eq!(item["body"]["authorization"], format!("item {i}"), "item {i}'s result: {item}");
    }
    assert_eq!(done["steps"][0]["items_done"], 1000);
    let calls = seen.lock().unwrap().clone();
    let mut count = std::collections::HashMap::new();
    for call in &calls {
        *count.entry(call.clone()).or_insert(0) += 1;
    }
    for i in &checkpointed {
        assert_eq!(count.get(&format!("item {i}")), Some(&1), "checkpointed item {i} ran once");
    }
    for i in 0..1000 {
        assert!(count.contains_key(&format!("item {i}")), "item {i} ran");
    }
    let again = calls.len() - 1000;
    assert!(
        again <= calls_before - checkpointed.len(),
        "only items called but not checkpointed before the kill ran again: {again}"
    );
    eprintln!(
        "map kill: {} of 1000 items checkpointed at the kill, {calls_before} called by then, {again} called twice",
        checkpointed.len()
    );
    drop(server);
    cleanup(&dir);
}

#[test]
fn sigterm_hands_running_runs_back_and_a_restart_resumes_them() {
    let dir = std::env::temp_dir().join(format!("flowcore-term-{}", flowcore::ids::new_id()));
    let server = Server::start(&dir, &[("FLOWCORE_SHUTDOWN_GRACE_SECONDS", "1")]);
    // Delays under a second execute in place (a longer one would park the run).
    let flow = json!({"id": "slow", "nodes": [
        {"id": "first", "type": "set", "params": {"fields": {"at": "start"}}},
        {"id": "wait", "type": "delay", "params": {"ms": 900}},
        {"id": "wait2", "type": "delay", "params": {"ms": 900}},
        {"id": "wait3", "type": "delay", "params": {"ms": 900}},
        {"id": "wait4", "type": "delay", "params": {"ms": 900}},
        {"id": "last", "type": "set", "params": {"fields": {"done": true}}}
    ], "edges": [
        {"from": "first", "to": "wait"}, {"from": "wait", "to": "wait2"},
        {"from": "wait2", "to": "wait3"}, {"from": "wait3", "to": "wait4"},
        {"from": "wait4", "to": "last"}
    ]});
    assert_eq!(server.json("POST", "/api/v1/flows", Some(flow)).0, 201);
    let (status, run) = server.json(
        "POST",
        "/api/v1/flows/slow/runs",
        Some(json!({"wait": false})),
    );
    assert_eq!(status, 202, "{run}");
    let id = run["run_id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    while server.json("GET", &format!("/api/v1/runs/{id}"), None).1["status"] != "running" {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let terminated = std::time::Instant::now();
    let mut server = server;
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            terminated.elapsed() < std::time::Duration::from_secs(15),
            "the server did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    let log = server.stop();
    assert!(log.contains("handing unfinished runs back"), "{log}");

    // The run is queued again with its finished step kept; a new process resumes it.
    let server = Server::start(&dir, &[]);
    let (_, run) = server.json("GET", &format!("/api/v1/runs/{id}"), None);
    assert!(
        run["status"] == "queued" || run["status"] == "running",
        "{run}"
    );
    let first_started = run["steps"][0]["started_at"].clone();
    assert_eq!(run["steps"][0]["node"], "first");
    let resumed = std::time::Instant::now();
    let done = loop {
        let (_, run) = server.json("GET", &format!("/api/v1/runs/{id}"), None);
        if run["status"] == "succeeded" {
            break run;
        }
        assert!(
            resumed.elapsed() < std::time::Duration::from_secs(20),
            "never finished: {run}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(done["output"], json!({"done": true}));
    assert_eq!(
        done["steps"][0]["started_at"], first_started,
        "`first` did not run again"
    );
    drop(server);
    cleanup(&dir);
}

/// Deletes every Redis key under `prefix` (the machine's Redis, through redis-cli).
fn clean_redis(prefix: &str) {
    let keys = std::process::Command::new("redis-cli")
        .args(["--scan", "--pattern", &format!("{prefix}:*")])
        .output()
        .expect("redis-cli runs");
    for key in String::from_utf8_lossy(&keys.stdout).lines() {
        let _ = std::process::Command::new("redis-cli").args(["del", key]).output();
    }
}

#[test]
fn an_api_process_and_a_worker_process_share_runs_and_cancels() {
    let dir = std::env::temp_dir().join(format!("flowcore-topology-{}", flowcore::ids::new_id()));
    let prefix = format!("flowcore-test-{}", flowcore::ids::new_id());
    let redis = std::env::var("FLOWCORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let shared = [("REDIS_URL", redis.as_str()), ("FLOWCORE_REDIS_PREFIX", prefix.as_str())];
    let api = Server::start(&dir, &[shared[0], shared[1], ("FLOWCORE_ROLE", "api")]);
    let worker = Server::start(&dir, &[shared[0], shared[1], ("FLOWCORE_ROLE", "worker")]);
    // `slow` waits 900 ms 25 times, in place (a delay of a second or more would park the run).
    for (id, delays) in [("quick", 1), ("slow", 25)] {
        let mut nodes = vec![json!({"id": "first", "type": "set", "params": {"fields": {"n": "{{ input.n }}"}}})];
        let mut edges = Vec::new();
        let mut before = "first".to_owned();
        for i in 0..delays {
            let ms = if delays == 1 { 10 } else { 900 };
            nodes.push(json!({"id": format!("wait{i}"), "type": "delay", "params": {"ms": ms}}));
            edges.push(json!({"from": before, "to": format!("wait{i}")}));
            before = format!("wait{i}");
        }
        nodes.push(json!({"id": "last", "type": "set", "params": {"fields": {"done": "{{ nodes.first.n }}"}}}));
        edges.push(json!({"from": before, "to": "last"}));
        let flow = json!({"id": id, "nodes": nodes, "edges": edges});
        let (status, answer) = api.json("POST", "/api/v1/flows", Some(flow));
        assert_eq!(status, 201, "{answer}");
    }

    // A waited run started on the api process is executed by the worker process.
    let (status, run) = api.json("POST", "/api/v1/flows/quick/runs", Some(json!({"input": {"n": 7}})));
    assert_eq!((status, &run["output"]), (200, &json!({"done": 7})), "{run}");
    let (_, seen) = worker.json("GET", &format!("/api/v1/runs/{}", run["run_id"].as_str().unwrap()), None);
    assert_eq!(seen["status"], "succeeded", "visible from the other process too");

    // A long run is cancelled through the api process while the worker executes it.
    let (status, run) = api.json("POST", "/api/v1/flows/slow/runs", Some(json!({"input": {"n": 1}, "wait": false})));
    assert_eq!(status, 202);
    let id = run["run_id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    while api.json("GET", &format!("/api/v1/runs/{id}"), None).1["steps"].as_array().is_none_or(|s| s.is_empty()) {
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "the worker never started it");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, cancelled) = api.json("POST", &format!("/api/v1/runs/{id}/cancel"), None);
    assert_eq!((status, &cancelled["status"]), (200, &json!("cancelled")), "{cancelled}");
    let (_, run) = api.json("GET", &format!("/api/v1/runs/{id}"), None);
    assert_eq!(run["status"], "cancelled");
    assert!(run["steps"].as_array().unwrap().iter().all(|s| s["node"] != "last"), "{run}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    drop(api);
    let log = worker.stop();
    assert!(log.contains("cancelled on request"), "{log}");
    clean_redis(&prefix);
    cleanup(&dir);
}

#[test]
fn a_workers_llm_tokens_reach_a_client_of_the_api_process_as_they_stream() {
    use flowcore::testkit::openai::{FakeLlm, Reply};
    use std::io::{BufRead, Write};
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let parts: Vec<String> = (0..10).map(|i| format!("w{i} ")).collect();
    let model = runtime.block_on(FakeLlm::start(move |_| {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Reply::text("fake-1", &parts).slowly(std::time::Duration::from_millis(150))
    }));
    let dir = std::env::temp_dir().join(format!("flowcore-llm-topology-{}", flowcore::ids::new_id()));
    let prefix = format!("flowcore-test-{}", flowcore::ids::new_id());
    let redis = std::env::var("FLOWCORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let allow = format!("127.0.0.1:{}", model.port());
    let shared = [("REDIS_URL", redis.as_str()), ("FLOWCORE_REDIS_PREFIX", prefix.as_str())];
    let api = Server::start(&dir, &[shared[0], shared[1], ("FLOWCORE_ROLE", "api")]);
    let worker = Server::start(&dir, &[shared[0], shared[1], ("FLOWCORE_ROLE", "worker"), ("FLOWCORE_HTTP_ALLOW", &allow)]);
    let flow = json!({"id": "ask", "nodes": [{"id": "ask", "type": "llm_chat", "params": {
        "base_url": model.base_url(), "model": "fake-1",
        "messages": [{"role": "user", "content": "{{ input.q }}"}]}}]});
    let (status, answer) = api.json("POST", "/api/v1/flows", Some(flow));
    assert_eq!(status, 201, "{answer}");
    let (status, run) = api.json("POST", "/api/v1/flows/ask/runs", Some(json!({"input": {"q": "hi"}, "wait": false})));
    assert_eq!(status, 202, "{run}");
    let id = run["run_id"].as_str().unwrap().to_owned();

    // The run's events from the api process, each line timed as it arrives.
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", api.port)).expect("connect");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(sock, "GET /api/v1/runs/{id}/events HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut events: Vec<(String, std::time::Duration)> = Vec::new();
    for line in std::io::BufReader::new(sock).lines() {
        let Ok(line) = line else { break };
        if let Some(name) = line.strip_prefix("event: ") {
            events.push((name.to_owned(), started.elapsed()));
            if name == "run_finished" {
                break;
            }
        }
    }
    let at = |name: &str| events.iter().filter(|(n, _)| n == name).map(|(_, t)| *t).collect::<Vec<_>>();
    let tokens = at("token");
    assert_eq!(tokens.len(), 10, "{events:?}");
    let finished = at("run_finished");
    assert_eq!(finished.len(), 1, "{events:?}");
    assert!(
        finished[0] - tokens[0] >= std::time::Duration::from_millis(800),
        "tokens arrive as the worker streams them, not with the end: {events:?}"
    );
    let (_, done) = api.json("GET", &format!("/api/v1/runs/{id}"), None);
    assert_eq!(done["output"]["content"], "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 ", "{done}");
    drop(api);
    drop(worker);
    clean_redis(&prefix);
    cleanup(&dir);
}

/// `flowcore health`: 0 while the server is ready, 1 with a message once it is gone.
#[test]
fn health_command_follows_the_server() {
    let dir = std::env::temp_dir().join(format!("flowcore-health-{}", fastrand::u64(..)));
    let server = Server::start(&dir, &[]);
    let health = |args: &[&str], bind: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowcore"))
            .arg("health")
            .args(args)
            .env("FLOWCORE_BIND", bind)
            .output()
            .expect("runs")
    };
    let bind = format!("0.0.0.0:{}", server.port);
    let url = format!("http://127.0.0.1:{}/readyz", server.port);
    assert!(health(&[], &bind).status.success(), "FLOWCORE_BIND's port");
    assert!(health(&["--url", &url], "x").status.success(), "--url");
    let port = server.port;
    server.stop();
    let gone = health(&[], &format!("127.0.0.1:{port}"));
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("/readyz"),
        "says what it asked"
    );
    let bad = health(&["--url", "ftp://x"], "x");
    assert_eq!(bad.status.code(), Some(1), "a bad URL is refused");
    cleanup(&dir);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_folder_and_database_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_app, dir) = app(&[("STORAGE_TYPE", "fs")]).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("blobs")), 0o700, "the blob folder");
    // With PostgreSQL the test made the folder itself (for its database marker).
    if BACKEND != Backend::Postgres {
        assert_eq!(mode(&dir), 0o700, "the data folder");
        assert_eq!(mode(&dir.join("flowcore.db")), 0o600, "the database");
    }
    cleanup(&dir);
}
