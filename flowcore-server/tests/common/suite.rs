// The HTTP API in process (tower `oneshot`, no socket), included by `api_memory.rs`,
// `api_sqlite.rs` and `api_postgres.rs` with `BACKEND` set: the same suite on every backend.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flowcore_server::config::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

const KEY: &str = "test-admin-key";

/// The stores a test's server is composed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
enum Backend {
    /// `Stores::memory()`: nothing outlives the process.
    Memory,
    /// The embedded default: SQLite in the data dir.
    Sqlite,
    /// A fresh database on the machine's PostgreSQL.
    Postgres,
}

fn postgres_base() -> String {
    std::env::var("FLOWCORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

fn psql(database: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([&format!("{}/{database}", postgres_base()), "-XAtqc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "PostgreSQL must run on 127.0.0.1:5432 (or FLOWCORE_TEST_POSTGRES_URL): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// With PostgreSQL, the URL of a fresh database for the test whose data dir is `dir` (the same
/// one on every call with that dir, so a restarted server finds its runs); `None` for SQLite.
/// Databases of runs over an hour old are dropped on the way (a test that panicked leaves its
/// database behind).
fn database_for(dir: &std::path::Path) -> Option<String> {
    if BACKEND != Backend::Postgres {
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let marker = dir.join("database-url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return Some(url);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for old in psql("postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'flowcore_api_%'").lines() {
        let created: u64 = old.split('_').nth(2).and_then(|t| t.parse().ok()).unwrap_or(now);
        if created + 3600 < now {
            psql("postgres", &format!("DROP DATABASE IF EXISTS {old} WITH (FORCE)"));
        }
    }
    let name = format!("flowcore_api_{now}_{}", fastrand::u32(..));
    psql("postgres", &format!("CREATE DATABASE {name}"));
    let url = format!("{}/{name}", postgres_base());
    std::fs::write(&marker, &url).unwrap();
    Some(url)
}

/// Everything the test's database holds, as text: the SQLite files (with the WAL) or a
/// PostgreSQL data dump.
fn database_bytes(dir: &std::path::Path) -> String {
    match std::fs::read_to_string(dir.join("database-url")) {
        Ok(url) => {
            let dump = std::process::Command::new("pg_dump")
                .args(["--data-only", &url])
                .output()
                .expect("pg_dump runs");
            assert!(dump.status.success());
            String::from_utf8_lossy(&dump.stdout).into_owned()
        }
        Err(_) => ["flowcore.db", "flowcore.db-wal"]
            .iter()
            .map(|f| String::from_utf8_lossy(&std::fs::read(dir.join(f)).unwrap_or_default()).into_owned())
            .collect(),
    }
}

/// Drops the test's database (PostgreSQL) and removes its data dir.
fn cleanup(dir: &std::path::Path) {
    if let Ok(url) = std::fs::read_to_string(dir.join("database-url")) {
        let name = url.rsplit('/').next().unwrap_or_default().to_owned();
        psql("postgres", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
    std::fs::remove_dir_all(dir).ok();
}

async fn app(extra: &[(&str, &str)]) -> (axum::Router, std::path::PathBuf) {
    let (router, _, dir) = app_with_state(extra).await;
    (router, dir)
}

async fn app_with_state(
    extra: &[(&str, &str)],
) -> (
    axum::Router,
    flowcore_server::Shared,
    std::path::PathBuf,
) {
    let dir = std::env::temp_dir().join(format!(
        "flowcore-api-{}-{}",
        std::process::id(),
        flowcore::ids::new_id()
    ));
    let mut vars = vec![
        ("FLOWCORE_DATA_DIR".to_owned(), dir.display().to_string()),
        ("FLOWCORE_ADMIN_KEY".to_owned(), KEY.to_owned()),
        ("STORAGE_TYPE".to_owned(), "memory".to_owned()),
    ];
    if let Some(url) = database_for(&dir) {
        vars.push(("DATABASE_URL".to_owned(), url));
    }
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = Config::from_vars(vars).expect("config");
    let state = match BACKEND {
        Backend::Memory => flowcore_server::build_state_with(
            config,
            flowcore_server::Stores::memory(),
            flowcore::Registry::with_builtins(),
        ),
        Backend::Sqlite | Backend::Postgres => flowcore_server::build_state(config).await,
    }
    .expect("state");
    (flowcore_server::app::app(state.clone()), state, dir)
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("response");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("body");
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    (status, json)
}

/// A response's body, whole.
/// `GET uri` without an API key, the whole answer.
/// An authorized GET.
async fn get(app: &axum::Router, path: &str) -> (StatusCode, Value) {
    call(app, "GET", path, Some(KEY), None).await
}

/// An authorized POST of a JSON body.
async fn post(app: &axum::Router, path: &str, body: &[u8]) -> (StatusCode, Value) {
    call(app, "POST", path, Some(KEY), Some(body.to_vec())).await
}

/// A worker of the app's state, and its timer, in tasks of the test's.
struct Worker {
    shutdown: flowcore::CancellationToken,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Worker {
    fn start(state: &flowcore_server::Shared) -> Self {
        let shutdown = flowcore::CancellationToken::new();
        let (state, token) = (state.clone(), shutdown.clone());
        let tasks = [
            tokio::spawn(flowcore_server::worker::work(state.clone(), token.clone())),
            tokio::spawn(flowcore_server::lifecycle::wake_timers(state, token)),
        ];
        Self { shutdown, tasks }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// A flow `id` that keeps a worker busy for `n` × 0.9 s, then outputs `done`: delays under a
/// second sleep in place (a longer one parks the run).
fn busy(id: &str, n: usize) -> Vec<u8> {
    let mut nodes: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("d{i}"), "type": "delay", "params": {"ms": 900}}))
        .collect();
    nodes.push(json!({"id": "t", "type": "template", "params": {"template": "done"}}));
    let edges: Vec<Value> = (0..n)
        .map(|i| {
            let to = if i + 1 == n { "t".to_owned() } else { format!("d{}", i + 1) };
            json!({"from": format!("d{i}"), "to": to})
        })
        .collect();
    json!({"id": id, "nodes": nodes, "edges": edges})
        .to_string()
        .into_bytes()
}

/// An authorized GET's body, as text.
async fn get_signed_text(app: &axum::Router, uri: &str) -> String {
    let req = Request::builder()
        .uri(uri)
        .header("x-api-key", KEY)
        .body(Body::empty())
        .unwrap();
    text_of(app.clone().oneshot(req).await.unwrap()).await
}

async fn get_unsigned(app: &axum::Router, uri: &str) -> axum::response::Response {
    let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap()
}

async fn bytes_of(res: axum::response::Response) -> axum::body::Bytes {
    axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("a body")
}

/// A response's body as text.
async fn text_of(res: axum::response::Response) -> String {
    String::from_utf8(bytes_of(res).await.to_vec()).expect("UTF-8")
}

/// The values of the lines of `text` that start with `prefix` (an event stream's fields).
fn fields<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter_map(|l| l.strip_prefix(prefix)).collect()
}

/// Every `/api/` route (method, path with `x` for parameters).
const API_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/flows"),
    ("POST", "/api/v1/flows"),
    ("GET", "/api/v1/flows/x"),
    ("PUT", "/api/v1/flows/x"),
    ("DELETE", "/api/v1/flows/x"),
    ("POST", "/api/v1/flows/x/runs"),
    ("GET", "/api/v1/runs"),
    ("GET", "/api/v1/runs/x"),
    ("POST", "/api/v1/runs/x/cancel"),
    ("POST", "/api/v1/runs/x/rerun"),
    ("POST", "/api/v1/runs/replay"),
    ("GET", "/api/v1/replays/x"),
    ("POST", "/api/v1/runs/x/signals/s"),
    ("POST", "/api/v1/signals/s"),
    ("GET", "/api/v1/runs/x/events"),
    ("GET", "/api/v1/api-keys"),
    ("POST", "/api/v1/api-keys"),
    ("DELETE", "/api/v1/api-keys/x"),
    ("GET", "/api/v1/credentials"),
    ("POST", "/api/v1/credentials"),
    ("GET", "/api/v1/credentials/x"),
    ("DELETE", "/api/v1/credentials/x"),
    ("POST", "/api/v1/files"),
    ("GET", "/api/v1/files/x"),
    ("GET", "/api/v1/files/x/meta"),
    ("DELETE", "/api/v1/files/x"),
    ("GET", "/api/v1/usage"),
    ("GET", "/api/v1/openapi.json"),
];

fn greet() -> Vec<u8> {
    include_bytes!("../../../examples/flows/greet.json").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let (app, dir) = app(&[]).await;
    assert_eq!(
        call(&app, "GET", "/healthz", None, None).await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let (status, body) = call(&app, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"database": "ok", "queue": "ok", "blob_store": "ok"})
    );
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_a_key() {
    // Every request here comes from one address: no budget of failures.
    let (app, dir) = app(&[("FLOWCORE_AUTH_FAILURES_PER_MINUTE", "0")]).await;
    for (method, path) in API_ROUTES {
        for key in [None, Some("wrong"), Some("")] {
            let (status, body) = call(&app, method, path, key, None).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {key:?}"
            );
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    let req = Request::builder()
        .uri("/api/v1/flows")
        .header("x-api-key", KEY)
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK,
        "x-api-key works too"
    );
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_crud_and_errors() {
    let (app, dir) = app(&[("MAX_PAYLOAD_SIZE_MB", "1")]).await;
    let k = Some(KEY);
    assert_eq!(
        call(&app, "POST", "/api/v1/flows", k, Some(greet())).await,
        (StatusCode::CREATED, json!({"id": "greet", "version": 1}))
    );
    let (status, body) = call(&app, "POST", "/api/v1/flows", k, Some(greet())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_exists"))
    );

    let (status, body) = get(&app, "/api/v1/flows/greet").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            body["version"].as_u64(),
            body["definition"]["nodes"].as_array().map(Vec::len)
        ),
        (Some(1), Some(4))
    );

    let mut v2: Value = serde_json::from_slice(&greet()).unwrap();
    v2["name"] = json!("Greeting v2");
    let (status, body) = call(
        &app,
        "PUT",
        "/api/v1/flows/greet",
        k,
        Some(serde_json::to_vec(&v2).unwrap()),
    )
    .await;
    assert_eq!(
        (status, body["version"].as_u64()),
        (StatusCode::OK, Some(2))
    );
    let (_, old) = get(&app, "/api/v1/flows/greet?version=1").await;
    assert_eq!(
        old["definition"]["name"], "Greeting",
        "old versions stay readable"
    );

    let (status, list) = get(&app, "/api/v1/flows?limit=10").await;
    assert_eq!(
        (status, list["items"][0]["id"].as_str()),
        (StatusCode::OK, Some("greet"))
    );

    // Server-assigned id.
    let anonymous = br#"{"nodes": [{"id": "a", "type": "noop"}]}"#;
    let (status, body) = post(&app, "/api/v1/flows", anonymous).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(flowcore::model::is_valid_id(body["id"].as_str().unwrap()));

    // Every problem, with where it is.
    let bad = br#"{"nodes": [{"id": "a", "type": "nope"}, {"id": "b", "type": "noop"}], "edges": [{"from": "b", "to": "b"}]}"#;
    let (status, body) = post(&app, "/api/v1/flows", bad).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_flow"))
    );
    assert_eq!(
        body["error"]["details"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    assert_eq!(
        body["error"]["details"][0],
        json!({"node": "a", "edge": null, "problem": "unknown node type `nope`", "line": 1, "column": 12})
    );

    for (payload, code) in [
        (b"{not json".to_vec(), "invalid_json"),
        (br#"{"nodes": [], "extra": 1}"#.to_vec(), "invalid_flow"),
        (br#"{"nodes": "many"}"#.to_vec(), "invalid_flow"),
        (b"\xff\xfe\xfd".to_vec(), "invalid_json"),
        (
            format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            "invalid_json",
        ),
    ] {
        let (status, body) = call(&app, "POST", "/api/v1/flows", k, Some(payload)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body}"
        );
    }
    // Every problem of the shape at once, each at its path and on its node or edge.
    let typos = json!({"id": "typos", "nodes": [
        {"id": "a", "type": "noop", "retyr": {"max_attempts": 2}},
        {"id": "b", "type": "noop", "timeout_ms": "soon"},
        {"id": "c", "type": "noop"}
    ], "edges": [{"from": "a", "to": "b", "prot": "x"}], "triggers": [{"type": "webhook"}]});
    let text = serde_json::to_string_pretty(&typos).unwrap();
    let (status, body) = post(&app, "/api/v1/flows", text.as_bytes()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_flow")),
        "{body}"
    );
    let details = body["error"]["details"].as_array().unwrap();
    assert_eq!(details.len(), 4, "{body}");
    // Each at its path, and at its line and column in the body.
    let soon = text.find("\"soon\"").unwrap();
    let line_start = text[..soon].rfind('\n').map_or(0, |i| i + 1);
    assert_eq!(details[1]["path"], "nodes[1].timeout_ms", "{body}");
    assert_eq!(
        (details[1]["line"].as_u64(), details[1]["column"].as_u64()),
        (Some(text[..soon].matches('\n').count() as u64 + 1), Some((soon - line_start + 1) as u64)),
        "{body}"
    );
    assert!(details.iter().all(|d| d["line"].is_u64() && d["path"].is_string()), "{body}");
    assert_eq!((details[0]["node"].as_str(), details[1]["node"].as_str()), (Some("a"), Some("b")));
    assert!(details[0]["problem"].as_str().unwrap().contains("retyr"), "{body}");
    assert!(details[1]["problem"].as_str().unwrap().starts_with("`nodes[1].timeout_ms`"), "{body}");
    assert_eq!(details[2]["edge"], 0);
    assert!(details[3]["problem"].as_str().unwrap().starts_with("`triggers[0]"), "{body}");
    // However broken the flow, the answer lists 100 problems and counts the rest: a body of
    // 100,000 bad edges gets a small answer.
    let edges = format!(r#"{{"nodes": [], "edges": [{}0]}}"#, "0,".repeat(99_999));
    let (status, body) = call(&app, "POST", "/api/v1/flows?dry_run=true", k, Some(edges.into_bytes())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let details = body["error"]["details"].as_array().unwrap();
    assert_eq!(details.len(), 101);
    assert_eq!(details[100]["problem"], "and 99900 more problems, not listed");
    assert!(body.to_string().len() < 64 * 1024, "{}", body.to_string().len());
    let huge = format!(
        r#"{{"nodes": [], "description": "{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let (status, body) = call(&app, "POST", "/api/v1/flows", k, Some(huge.into_bytes())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );

    assert_eq!(get(&app, "/api/v1/flows/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/api/v1/flows/bad%20id").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(get(&app, "/api/v1/flows/greet?version=zz").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        call(&app, "DELETE", "/api/v1/flows/greet", k, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&app, "DELETE", "/api/v1/flows/greet", k, None).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = call(&app, "GET", "/no/such/route", None, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    cleanup(&dir);
}

async fn wait_for_status(app: &axum::Router, run_id: &str, want: &str) -> Value {
    for _ in 0..200 {
        let (_, run) = get(app, &format!("/api/v1/runs/{run_id}")).await;
        if run["status"] == want {
            return run;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("run {run_id} never became {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_sync_async_idempotent_cancel() {
    let (app, state, dir) = app_with_state(&[("WEBHOOK_TIMEOUT_SECONDS", "1")]).await;
    let worker = Worker::start(&state);
    let k = Some(KEY);
    call(&app, "POST", "/api/v1/flows", k, Some(greet())).await;

    // Sync: the output in the answer.
    let body = json!({"input": {"name": "ada", "n": 7}})
        .to_string()
        .into_bytes();
    let (status, run) = call(&app, "POST", "/api/v1/flows/greet/runs", k, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["output"], json!({"path": "a", "msg": "hello ada"}));
    let run_id = run["run_id"].as_str().unwrap().to_owned();
    let (status, full) = get(&app, &format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (full["flow_id"].as_str(), full["flow_version"].as_u64()),
        (Some("greet"), Some(1))
    );
    assert_eq!(full["steps"].as_array().map(Vec::len), Some(4), "{full}");
    assert_eq!(full["input"], json!({"name": "ada", "n": 7}));

    // Async through the queue and the worker.
    let body = json!({"input": {"name": "bob", "n": 1}, "wait": false})
        .to_string()
        .into_bytes();
    let (status, queued) = call(&app, "POST", "/api/v1/flows/greet/runs", k, Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let done = wait_for_status(&app, queued["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["output"], json!({"path": "b"}));

    // Idempotency: the same key gives the same run.
    let body = json!({"input": {"name": "x", "n": 9}, "idempotency_key": "k-1"})
        .to_string()
        .into_bytes();
    let (_, first) = call(
        &app,
        "POST",
        "/api/v1/flows/greet/runs",
        k,
        Some(body.clone()),
    )
    .await;
    let (status, again) = call(&app, "POST", "/api/v1/flows/greet/runs", k, Some(body)).await;
    assert_eq!(
        (status, &again["run_id"]),
        (StatusCode::OK, &first["run_id"])
    );

    // A sync run that outlives the wait: 202, then it finishes.
    post(&app, "/api/v1/flows", &busy("slow", 2)).await;
    let (status, pending) = post(&app, "/api/v1/flows/slow/runs", b"{}").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    let done = wait_for_status(&app, pending["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["output"], json!("done"));

    // Cancel a running run.
    post(&app, "/api/v1/flows", &busy("long", 70)).await;
    let (_, started) = post(&app, "/api/v1/flows/long/runs", br#"{"wait": false}"#).await;
    let id = started["run_id"].as_str().unwrap().to_owned();
    wait_for_status(&app, &id, "running").await;
    let (status, cancelled) =
        call(&app, "POST", &format!("/api/v1/runs/{id}/cancel"), k, None).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{cancelled}"
    );
    let (status, again) = call(&app, "POST", &format!("/api/v1/runs/{id}/cancel"), k, None).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("run_finished"))
    );
    let (_, run) = get(&app, &format!("/api/v1/runs/{id}")).await;
    assert_eq!(
        run["actions"].as_array().map(|a| a.iter().map(|a| a["action"].clone()).collect()),
        Some(vec![json!("cancel")]),
        "one cancel recorded, not the refused one: {run}"
    );

    // Listing, filters, errors.
    let (status, list) = get(&app, "/api/v1/runs?flow_id=greet&status=succeeded&limit=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
    assert!(list["next_cursor"].is_string());
    assert_eq!(get(&app, "/api/v1/runs?status=bogus").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(get(&app, "/api/v1/runs/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(post(&app, "/api/v1/flows/nope/runs", b"{}").await.0, StatusCode::NOT_FOUND);
    let (status, body) = post(&app, "/api/v1/flows/greet/runs", br#"{"inptu": {}}"#).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );

    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_signals_and_parked_delays() {
    let (app, state, dir) = app_with_state(&[("WEBHOOK_TIMEOUT_SECONDS", "5")]).await;
    let worker = Worker::start(&state);
    let approval = json!({"id": "approval", "nodes": [
        {"id": "ask", "type": "set", "params": {"fields": {"order": "{{ input.order }}"}}},
        {"id": "approve", "type": "wait", "params": {"signal": "approve", "key": "{{ input.order }}", "timeout_ms": 60000}},
        {"id": "done", "type": "template", "params": {"template": "{{ nodes.ask.order }} by {{ nodes.approve.by }}"}}
    ], "edges": [{"from": "ask", "to": "approve"}, {"from": "approve", "to": "done"}], "output": "done"});
    assert_eq!(post(&app, "/api/v1/flows", approval.to_string().as_bytes()).await.0, StatusCode::CREATED);

    // A waited run that parks is answered at once: 202, waiting.
    let started = std::time::Instant::now();
    let (status, run) = post(&app, "/api/v1/flows/approval/runs", br#"{"input": {"order": "o-1"}}"#).await;
    assert_eq!((status, run["status"].as_str()), (StatusCode::ACCEPTED, Some("waiting")), "{run}");
    assert!(started.elapsed() < std::time::Duration::from_secs(4), "not after the sync wait");
    let id = run["run_id"].as_str().unwrap().to_owned();
    let (_, waiting) = get(&app, &format!("/api/v1/runs/{id}")).await;
    assert_eq!(waiting["status"], "waiting");
    let waits = waiting["waits"].as_array().expect("waits while waiting");
    assert_eq!(waits.len(), 1, "{waiting}");
    assert_eq!((waits[0]["node"].as_str(), waits[0]["signal"].as_str(), waits[0]["key"].as_str()), (Some("approve"), Some("approve"), Some("o-1")));
    assert!(waits[0]["deadline"].is_string());

    // A signal wakes it; its body is the wait's output. Who sent it is recorded with the run.
    let (_, ops) = post(&app, "/api/v1/api-keys", br#"{"name": "ops", "scopes": ["run"]}"#).await;
    let ops_key = ops["key"].as_str().expect("a key").to_owned();
    let path = format!("/api/v1/runs/{id}/signals/approve");
    let (status, sent) = call(&app, "POST", &path, Some(&ops_key), Some(br#"{"by": "ada"}"#.to_vec())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    assert_eq!((sent["run_id"].as_str(), sent["signal"].as_str()), (Some(id.as_str()), Some("approve")));
    let done = wait_for_status(&app, &id, "succeeded").await;
    assert_eq!(done["output"], json!("o-1 by ada"));
    assert!(done.get("waits").is_none(), "no waits once it ended");
    let actions = done["actions"].as_array().expect("actions");
    assert_eq!(actions.len(), 1, "{done}");
    assert_eq!((actions[0]["action"].as_str(), &actions[0]["actor"], &actions[0]["detail"]), (Some("signal"), &json!({"id": ops["id"], "name": "ops"}), &json!({"signal": "approve"})));
    assert!(actions[0]["at"].is_string());
    let stream = get_signed_text(&app, &format!("/api/v1/runs/{id}/events")).await;
    let names: Vec<&str> = fields(&stream, "event: ");
    let at = |name: &str| names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("{name}: {stream}"));
    assert!(at("run_started") < at("run_waiting") && at("run_waiting") < at("run_resumed"), "{names:?}");
    assert_eq!(names.last(), Some(&"run_finished"), "{names:?}");
    let (status, late) = post(&app, &path, b"{}").await;
    assert_eq!((status, late["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("run_finished")));
    let (status, _) = post(&app, "/api/v1/runs/nobody/signals/approve", b"{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, bad) = post(&app, &format!("/api/v1/runs/{id}/signals/a%20b"), b"{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let (status, bad) = post(&app, &path, b"not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");

    // Keyed signals reach the runs waiting with that key, and only them.
    let mut keyed = Vec::new();
    for order in ["o-2", "o-3"] {
        let body = json!({"input": {"order": order}, "wait": false}).to_string();
        let (_, run) = post(&app, "/api/v1/flows/approval/runs", body.as_bytes()).await;
        let id = run["run_id"].as_str().unwrap().to_owned();
        wait_for_status(&app, &id, "waiting").await;
        keyed.push(id);
    }
    let (status, reached) = post(&app, "/api/v1/signals/approve", br#"{"key": "o-3", "data": {"by": "bob"}}"#).await;
    assert_eq!(status, StatusCode::OK, "{reached}");
    assert_eq!(reached["run_ids"], json!([keyed[1]]));
    let keyed_done = wait_for_status(&app, &keyed[1], "succeeded").await;
    assert_eq!(keyed_done["output"], json!("o-3 by bob"));
    assert_eq!(keyed_done["actions"][0]["detail"], json!({"signal": "approve", "keyed": true}), "the key itself is not kept");
    assert_eq!(keyed_done["actions"][0]["actor"], json!({"id": "admin", "name": "admin"}));
    let (_, other) = get(&app, &format!("/api/v1/runs/{}", keyed[0])).await;
    assert_eq!(other["status"], "waiting", "another key's run waits on");

    // At most 100 signals wait per run.
    for i in 0..100 {
        let (status, _) = post(&app, &format!("/api/v1/runs/{}/signals/other", keyed[0]), i.to_string().as_bytes()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (status, full) = post(&app, &format!("/api/v1/runs/{}/signals/other", keyed[0]), b"1").await;
    assert_eq!((status, full["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("too_many_signals")));

    // Cancel works on a waiting run.
    let (status, cancelled) = call(&app, "POST", &format!("/api/v1/runs/{}/cancel", keyed[0]), Some(KEY), None).await;
    assert_eq!((status, cancelled["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    let (_, cancelled) = get(&app, &format!("/api/v1/runs/{}", keyed[0])).await;
    let actions = cancelled["actions"].as_array().expect("actions");
    assert_eq!(actions.len(), 101, "100 signals, then the cancel");
    assert_eq!((actions[100]["action"].as_str(), actions[100]["actor"]["name"].as_str()), (Some("cancel"), Some("admin")));
    assert_eq!(actions[100]["detail"], json!({"status": "cancelled"}));

    // A resume URL delivers its one signal to its one run, without a key: GET shows a page,
    // POST delivers.
    let link = json!({"id": "link", "nodes": [
        {"id": "mail", "type": "set", "params": {"fields": {"url": "{{ run.resume_urls.approve }}", "id": "{{ run.id }}"}}},
        {"id": "approve", "type": "wait", "params": {"signal": "approve"}}
    ], "edges": [{"from": "mail", "to": "approve"}], "output": "approve"});
    assert_eq!(post(&app, "/api/v1/flows", link.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let (_, run) = post(&app, "/api/v1/flows/link/runs", br#"{"wait": false}"#).await;
    let id = run["run_id"].as_str().unwrap().to_owned();
    let parked = wait_for_status(&app, &id, "waiting").await;
    let mail = &parked["steps"].as_array().unwrap().iter().find(|s| s["node"] == "mail").unwrap()["output"];
    assert_eq!(mail["id"], json!(id));
    let url = mail["url"].as_str().expect("a resume URL");
    let path = &url[url.find("/webhooks/resume/").expect("under /webhooks/resume/")..];
    assert!(url.starts_with("http://"), "{url}");
    let page = get_unsigned(&app, path).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(text_of(page).await.contains("<form method=\"post\">"));
    let tampered = format!("{}x", &path[..path.len() - 1]);
    assert_eq!(get_unsigned(&app, &tampered).await.status(), StatusCode::NOT_FOUND);
    let other_signal = path.replace(".approve.", ".reject.");
    let (status, _) = call(&app, "POST", &other_signal, None, Some(b"{}".to_vec())).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "valid for its own signal only");
    let (status, sent) = call(&app, "POST", path, None, Some(br#"{"ok": true}"#.to_vec())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let resumed = wait_for_status(&app, &id, "succeeded").await;
    assert_eq!(resumed["output"], json!({"ok": true}));
    assert_eq!(resumed["actions"][0]["actor"], Value::Null, "no key behind a resume link");
    assert_eq!(resumed["actions"][0]["detail"], json!({"signal": "approve", "via": "resume_link"}));
    let (status, again) = call(&app, "POST", path, None, Some(b"{}".to_vec())).await;
    assert_eq!((status, again["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("not_waiting")), "a link delivers only while its wait waits");
    let huge = vec![b' '; 1024 * 1024];
    assert_eq!(call(&app, "POST", path, None, Some(huge)).await.0, StatusCode::PAYLOAD_TOO_LARGE, "a resume link's body is bounded");
    // The page's button (a form) is answered with a page.
    let button = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::empty())
        .unwrap();
    let answer = app.clone().oneshot(button).await.unwrap();
    assert_eq!(answer.status(), StatusCode::CONFLICT);
    assert!(text_of(answer).await.contains("does not wait for `approve` now"));
    let reserved = json!({"id": "steal", "nodes": [{"id": "n", "type": "noop"}], "triggers": [{"type": "webhook", "path": "resume/x"}]});
    let (status, body) = post(&app, "/api/v1/flows", reserved.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(300 * 1024));
    let (status, body) = post(&app, &format!("/api/v1/runs/{}/signals/other", keyed[0]), big.as_bytes()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));

    // A delay of a second or more parks the run, and the timer wakes it at its time.
    let sleepy = br#"{"id": "sleepy", "nodes": [{"id": "d", "type": "delay", "params": {"ms": 1500}}, {"id": "t", "type": "template", "params": {"template": "awake"}}], "edges": [{"from": "d", "to": "t"}]}"#;
    post(&app, "/api/v1/flows", sleepy).await;
    let (status, run) = post(&app, "/api/v1/flows/sleepy/runs", br#"{"wait": false}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = run["run_id"].as_str().unwrap().to_owned();
    let parked = wait_for_status(&app, &id, "waiting").await;
    assert_eq!(parked["waits"][0]["signal"], Value::Null, "a parked delay waits for no signal");
    assert_eq!(wait_for_status(&app, &id, "succeeded").await["output"], json!("awake"));

    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_events() {
    let (app, state, dir) = app_with_state(&[]).await;
    let worker = Worker::start(&state);
    let k = Some(KEY);
    call(&app, "POST", "/api/v1/flows", k, Some(greet())).await;
    let async_flow = br#"{"id": "later", "nodes": [{"id": "t", "type": "template", "params": {"template": "got {{ input.body }}"}}],
        "triggers": [{"type": "webhook", "path": "hooks/later", "method": "PUT", "mode": "async"}]}"#;
    post(&app, "/api/v1/flows", async_flow).await;

    // Sync webhook: no API key needed, the body is the input, the answer has the output.
    let mut answer = (StatusCode::NOT_FOUND, Value::Null);
    for _ in 0..100 {
        answer = call(
            &app,
            "POST",
            "/webhooks/greet",
            None,
            Some(br#"{"name": "ada", "n": 9}"#.to_vec()),
        )
        .await;
        if answer.0 != StatusCode::NOT_FOUND {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    assert_eq!(answer.1["output"], json!({"path": "a", "msg": "hello ada"}));
    let run_id = answer.1["run_id"].as_str().unwrap().to_owned();

    // Async webhook with a text body.
    let req = Request::builder()
        .method("PUT")
        .uri("/webhooks/hooks/later")
        .header("content-type", "text/plain")
        .body(Body::from("plain words"))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let body: Value = serde_json::from_slice(&bytes_of(res).await).unwrap();
    let done = wait_for_status(&app, body["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["output"], json!("got plain words"));

    assert_eq!(
        call(&app, "GET", "/webhooks/greet", None, None).await.0,
        StatusCode::NOT_FOUND,
        "wrong method"
    );
    assert_eq!(
        call(&app, "POST", "/webhooks/nowhere", None, None).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = call(
        &app,
        "POST",
        "/webhooks/greet",
        None,
        Some(b"{broken".to_vec()),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );

    // SSE: every event of the run, in order, then the stream ends; resumable.
    let sse = |last: Option<&str>| {
        let mut req = Request::builder()
            .uri(format!("/api/v1/runs/{run_id}/events"))
            .header("x-api-key", KEY);
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        req.body(Body::empty()).unwrap()
    };
    let res = app.clone().oneshot(sse(None)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = text_of(res).await;
    let names: Vec<&str> = fields(&text, "event: ");
    assert_eq!(names.first(), Some(&"run_started"), "{text}");
    assert_eq!(names.last(), Some(&"run_finished"));
    assert_eq!(
        names.iter().filter(|n| **n == "node_finished").count(),
        4,
        "{text}"
    );
    let ids: Vec<&str> = fields(&text, "id: ");
    let res = app
        .clone()
        .oneshot(sse(Some(ids[ids.len() - 2])))
        .await
        .unwrap();
    let rest = text_of(res).await;
    let rest_names: Vec<&str> = fields(&rest, "event: ");
    assert_eq!(
        rest_names,
        vec!["run_finished"],
        "resume after Last-Event-ID"
    );
    assert_eq!(
        app.clone()
            .oneshot(
                Request::builder()
                    .uri("/api/v1/runs/nope/events")
                    .header("x-api-key", KEY)
                    .body(Body::empty())
                    .unwrap()
            )
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_stored_hashed_and_revocable() {
    let (app, dir) = app(&[]).await;
    let (status, created) = post(&app, "/api/v1/api-keys", br#"{"name": "ci"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    let (status, _) = call(&app, "GET", "/api/v1/flows", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "the new key works");
    let (_, list) = call(&app, "GET", "/api/v1/api-keys", Some(&key), None).await;
    let text = list.to_string();
    assert!(
        !text.contains(&key) && !text.contains("hash"),
        "listings never show the key or its hash: {text}"
    );
    let last = if key.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &key[..key.len() - 1]);
    assert_eq!(
        call(&app, "GET", "/api/v1/flows", Some(&tampered), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        call(
            &app,
            "DELETE",
            &format!("/api/v1/api-keys/{id}"),
            Some(KEY),
            None
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&app, "GET", "/api/v1/flows", Some(&key), None).await.0,
        StatusCode::UNAUTHORIZED,
        "revoked"
    );
    if BACKEND != Backend::Memory {
        let db = database_bytes(&dir);
        assert!(db.contains("fc_"), "the key's prefix is in the database");
        assert!(!db.contains(&key), "the key is not in the database");
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_the_contract_names() {
    let (app, dir) = app(&[]).await;
    call(&app, "POST", "/api/v1/flows", Some(KEY), Some(greet())).await;
    let body = json!({"input": {"name": "ada", "n": 7}})
        .to_string()
        .into_bytes();
    assert_eq!(
        call(
            &app,
            "POST",
            "/api/v1/flows/greet/runs",
            Some(KEY),
            Some(body)
        )
        .await
        .0,
        StatusCode::OK
    );
    let res = get_unsigned(&app, "/metrics").await;
    assert_eq!(res.status(), StatusCode::OK);
    let text = text_of(res).await;
    for name in [
        "flowcore_http_requests_total{",
        "flowcore_http_request_duration_seconds_bucket{",
        "flowcore_runs_total{status=\"succeeded\"} 1",
        "flowcore_run_duration_seconds_count 1",
        "flowcore_node_executions_total{node_type=\"set\",status=\"succeeded\"} 2",
        "flowcore_node_executions_total{node_type=\"set\",status=\"skipped\"} 1",
        "flowcore_queue_depth{group=\"default\"} 0",
        "flowcore_runs_in_flight 0",
        "process_resident_memory_bytes ",
    ] {
        assert!(text.contains(name), "missing `{name}` in:\n{text}");
    }
    assert!(
        text.contains("route=\"/api/v1/flows/{id}/runs\""),
        "routes are templates, not raw paths"
    );
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let (app, dir) = app(&[("RATE_LIMIT_PER_MINUTE", "3"), ("NUMBER_OF_PROXIES", "1")]).await;
    let get = |client: &str| {
        Request::builder()
            .uri("/api/v1/flows")
            .header("x-api-key", KEY)
            .header("x-forwarded-for", client)
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..3 {
        assert_eq!(
            app.clone().oneshot(get("1.1.1.1")).await.unwrap().status(),
            StatusCode::OK
        );
    }
    let refused = app.clone().oneshot(get("1.1.1.1")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    let body: Value = serde_json::from_slice(&bytes_of(refused).await).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // The same API key from another address is still limited by key.
    assert_eq!(
        app.clone().oneshot(get("2.2.2.2")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Health checks are not limited.
    assert_eq!(
        get_unsigned(&app, "/healthz").await.status(),
        StatusCode::OK
    );
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let (app, dir) = app(&[]).await;
    let res = get_unsigned(&app, "/healthz").await;
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a fresh id: {id}");
    let req = Request::builder()
        .uri("/api/v1/flows")
        .header("x-request-id", "client-chosen-1")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.headers()["x-request-id"],
        "client-chosen-1",
        "a client's id is kept, errors included"
    );
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_go_to_their_flows_worker_group() {
    let (app, state, dir) = app_with_state(&[]).await;
    let flow = br#"{"id": "gpu", "nodes": [{"id": "n", "type": "noop"}], "settings": {"worker_group": "gpu"}}"#;
    post(&app, "/api/v1/flows", flow).await;
    let (status, run) = post(&app, "/api/v1/flows/gpu/runs", br#"{"wait": false}"#).await;
    assert_eq!(
        (status, run["status"].as_str()),
        (StatusCode::ACCEPTED, Some("queued"))
    );
    assert_eq!(
        state.stores.queue.depth("gpu").await.unwrap().ready,
        1,
        "queued for the flow's group"
    );
    assert_eq!(state.stores.queue.depth("default").await.unwrap().ready, 0);
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_upload_stream_and_refuse_past_the_file_limit() {
    let (app, state, dir) =
        app_with_state(&[("MAX_FILE_SIZE_MB", "2"), ("MAX_PAYLOAD_SIZE_MB", "1")]).await;
    let upload = |body: Body, len: Option<usize>, query: &str| {
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("/api/v1/files{query}"))
            .header("x-api-key", KEY)
            .header("content-type", "text/csv");
        if let Some(len) = len {
            req = req.header("content-length", len);
        }
        app.clone().oneshot(req.body(body).unwrap())
    };
    let json_of = |res: axum::response::Response| async move {
        let bytes = bytes_of(res).await;
        serde_json::from_slice::<Value>(&bytes).unwrap()
    };

    // Over MAX_PAYLOAD_SIZE_MB but under MAX_FILE_SIZE_MB: accepted.
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let res = upload(
        Body::from(data.clone()),
        Some(data.len()),
        "?name=report%20q3.csv",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let file = json_of(res).await;
    assert_eq!(
        (file["name"].as_str(), file["size"].as_u64()),
        (Some("report q3.csv"), Some(1_500_000))
    );
    let id = file["id"].as_str().unwrap().to_owned();

    let req = Request::builder()
        .uri(format!("/api/v1/files/{id}"))
        .header("x-api-key", KEY)
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/csv");
    assert_eq!(
        res.headers()["content-disposition"],
        "attachment; filename=\"report_q3.csv\""
    );
    assert_eq!(
        bytes_of(res).await,
        data
    );
    let (status, meta) = get(&app, &format!("/api/v1/files/{id}/meta")).await;
    assert_eq!(
        (status, meta["size"].as_u64()),
        (StatusCode::OK, Some(1_500_000))
    );

    // Over the file limit: 413 whether the length is declared or the body is streamed, and
    // nothing is left behind.
    let big = vec![7u8; 2 * 1024 * 1024 + 1];
    let res = upload(Body::from(big.clone()), Some(big.len()), "")
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(res).await["error"]["code"], "payload_too_large");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let res = upload(Body::from_stream(futures::stream::iter(chunks)), None, "")
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        state.stores.blobs.list("files/").await.unwrap(),
        vec![format!("files/{id}")]
    );

    for (query, what) in [
        ("?name=", "empty name"),
        ("?name=a%0Ab", "control character"),
        ("?size=3", "unknown parameter"),
    ] {
        let res = upload(Body::from("x"), Some(1), query).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{what}");
    }

    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/api/v1/files/{id}"),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = get(&app, &format!("/api/v1/files/{id}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    assert_eq!(
        state.stores.blobs.stat(&format!("files/{id}")).await.unwrap(),
        None
    );
    cleanup(&dir);
}

/// A `map` over HTTP: inline and stored children, output in item order, failed items as
/// error entries, progress on the step, one run listed (items are not runs), its children's
/// node executions in usage, and bad params refused when the flow is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_runs_a_child_per_item() {
    let (app, state, dir) = app_with_state(&[]).await;
    let child = json!({"id": "shout", "nodes": [{"id": "s", "type": "script", "params": {"source": "if input.name == \"bad\" { throw \"no\" } input.name.to_upper() + input.n"}}]});
    assert_eq!(post(&app, "/api/v1/flows", child.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let each = json!({"id": "each", "nodes": [
        {"id": "stored", "type": "map", "params": {"items": "{{ input.names }}", "flow_id": "shout", "input": {"name": "{{ item }}", "n": "{{ index }}"}, "on_item_error": "continue", "concurrency": 2}},
        {"id": "inline", "type": "map", "params": {"items": "{{ input.names }}", "flow": {"nodes": [{"id": "t", "type": "template", "params": {"template": "hi {{ input }}"}}]}}}
    ]});
    assert_eq!(post(&app, "/api/v1/flows", each.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let (status, run) = post(&app, "/api/v1/flows/each/runs", br#"{"input": {"names": ["ada", "bad", "bob"]}}"#).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["output"]["inline"], json!(["hi ada", "hi bad", "hi bob"]));
    let stored = &run["output"]["stored"];
    assert_eq!((&stored[0], &stored[2]), (&json!("ADA0"), &json!("BOB2")), "{stored}");
    assert_eq!(stored[1]["code"], "node_failed", "{stored}");
    let id = run["run_id"].as_str().unwrap();
    let (_, shown) = get(&app, &format!("/api/v1/runs/{id}")).await;
    for step in shown["steps"].as_array().unwrap() {
        assert_eq!((step["items_total"].as_u64(), step["items_done"].as_u64()), (Some(3), Some(3)), "{step}");
    }
    let (_, listed) = get(&app, "/api/v1/runs?limit=100").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "items are not runs: {listed}");
    state.usage.flush().await.unwrap();
    let (_, usage) = get(&app, "/api/v1/usage?flow_id=each").await;
    assert_eq!(usage["items"][0]["runs"], 1);
    assert_eq!(usage["items"][0]["node_executions"], 8, "two maps and six children: {usage}");

    // Bad params are refused with the flow, naming the node.
    let bad = json!({"id": "bad", "nodes": [{"id": "m", "type": "map", "params": {"items": "{{ input }}", "flow": {"nodes": [{"id": "w", "type": "wait", "params": {"signal": "s"}}]}}}]});
    let (status, body) = post(&app, "/api/v1/flows", bad.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("`wait` is not allowed"), "{body}");
    let many = json!({"id": "many", "nodes": [{"id": "m", "type": "map", "params": {"items": "{{ input.items }}", "max_items": 2, "flow": {"nodes": [{"id": "n", "type": "noop"}]}}}]});
    assert_eq!(post(&app, "/api/v1/flows", many.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let (status, run) = post(&app, "/api/v1/flows/many/runs", br#"{"input": {"items": [1, 2, 3]}}"#).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "failed");
    assert!(run["error"].as_str().unwrap().contains("more than max_items (2)"), "{run}");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_per_flow_and_day_and_quotas_refuse_with_429() {
    let (app, state, dir) = app_with_state(&[("FLOWCORE_QUOTA_RUNS_PER_DAY", "3")]).await;
    let k = Some(KEY);
    assert_eq!(
        call(&app, "POST", "/api/v1/flows", k, Some(greet()))
            .await
            .0,
        StatusCode::CREATED
    );
    let other = json!({"id": "other", "nodes": [{"id": "n", "type": "noop"}]});
    assert_eq!(
        call(
            &app,
            "POST",
            "/api/v1/flows",
            k,
            Some(other.to_string().into_bytes())
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let start = |flow: &'static str| {
        let app = app.clone();
        async move {
            let input = br#"{"input": {"name": "x", "n": 9}}"#;
            post(&app, &format!("/api/v1/flows/{flow}/runs"), input).await
        }
    };
    for _ in 0..3 {
        assert_eq!(start("greet").await.0, StatusCode::OK);
    }
    let (status, body) = start("greet").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let (status, body) = call(&app, "POST", "/webhooks/greet", None, Some(b"{}".to_vec())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("quota_exceeded")),
        "webhooks count too"
    );
    assert_eq!(
        start("other").await.0,
        StatusCode::OK,
        "quotas are per flow"
    );

    state.usage.flush().await.unwrap();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (status, body) = get(&app, "/api/v1/usage?flow_id=greet").await;
    assert_eq!(status, StatusCode::OK);
    // greet runs hello, big and one of a/b: three node executions a run.
    assert_eq!(
        body["items"],
        json!([{"flow_id": "greet", "day": today, "runs": 3, "node_executions": 9, "tokens": 0, "models": []}])
    );
    assert_eq!(body["quota"]["runs_per_flow_per_day"], 3);
    let (_, all) = get(&app, &format!("/api/v1/usage?from={today}&to={today}")).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    for bad in [
        "?from=yesterday",
        "?from=2026-02-01&to=2026-01-01",
        "?flow_id=a%20b",
        "?color=red",
    ] {
        let (status, body) = get(&app, &format!("/api/v1/usage{bad}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{bad}"
        );
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_nodes_stream_tokens_count_usage_by_model_and_quotas_refuse() {
    use flowcore::testkit::openai::{FakeLlm, Reply};
    let server = FakeLlm::start(|_| Reply::text("fake-1", &["Hel", "lo", "!"])).await;
    let (app, state, dir) = app_with_state(&[
        ("FLOWCORE_HTTP_ALLOW", "127.0.0.1/32"),
        ("FLOWCORE_QUOTA_TOKENS_PER_DAY", "40"),
    ])
    .await;
    let worker = Worker::start(&state);
    let secret = "sk-test-0123456789abcdef";
    let (status, body) = post(
        &app,
        "/api/v1/credentials",
        json!({"name": "llm", "type": "bearer", "data": {"token": secret}})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let flow = json!({"id": "ask", "nodes": [{"id": "ask", "type": "llm_chat", "params": {
        "base_url": server.base_url(), "model": "fake-1", "credential": "llm",
        "messages": [{"role": "user", "content": "{{ input.q }}"}]}}]});
    let (status, body) = post(&app, "/api/v1/flows", flow.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let (status, run) = post(&app, "/api/v1/flows/ask/runs", br#"{"input": {"q": "Hi"}, "wait": false}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let id = run["run_id"].as_str().unwrap().to_owned();
    // The run's events: each token in order, before the node's end.
    let text = get_signed_text(&app, &format!("/api/v1/runs/{id}/events")).await;
    let names: Vec<&str> = fields(&text, "event: ");
    let first_token = names.iter().position(|n| *n == "token").expect("token events");
    let finished = names.iter().position(|n| *n == "node_finished").unwrap();
    assert!(first_token < finished, "{text}");
    let tokens: Vec<Value> = text
        .split("\n\n")
        .filter(|e| e.contains("event: token"))
        .map(|e| serde_json::from_str(fields(e, "data: ")[0]).unwrap())
        .collect();
    let deltas: Vec<&str> = tokens.iter().map(|t| t["delta"].as_str().unwrap()).collect();
    assert_eq!(deltas, ["Hel", "lo", "!"]);
    assert_eq!((tokens[0]["node"].as_str(), tokens[0]["turn"].as_u64(), tokens[0]["attempt"].as_u64()), (Some("ask"), Some(1), Some(1)));
    assert!(!names.contains(&"llm_usage"), "accounting is not streamed: {text}");
    let (_, shown) = get(&app, &format!("/api/v1/runs/{id}")).await;
    assert_eq!(shown["status"], "succeeded", "{shown}");
    assert_eq!(shown["output"]["content"], "Hello!");
    assert_eq!(
        server.requests()[0].authorization.as_deref(),
        Some(format!("Bearer {secret}").as_str()),
        "the credential went to the model server"
    );
    assert!(!shown.to_string().contains(secret));

    // Usage by model, the metric, and the quota: 13 tokens a run, 40 a day.
    for _ in 0..3 {
        let (status, run) = post(&app, "/api/v1/flows/ask/runs", br#"{"input": {"q": "Hi"}}"#).await;
        assert_eq!((status, run["status"].as_str()), (StatusCode::OK, Some("succeeded")), "{run}");
    }
    let (status, body) = post(&app, "/api/v1/flows/ask/runs", br#"{"input": {"q": "Hi"}}"#).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert!(body["error"]["message"].as_str().unwrap().contains("FLOWCORE_QUOTA_TOKENS_PER_DAY"), "{body}");
    state.usage.flush().await.unwrap();
    let (_, usage) = get(&app, "/api/v1/usage?flow_id=ask").await;
    assert_eq!(usage["items"][0]["tokens"], 52, "{usage}");
    assert_eq!(
        usage["items"][0]["models"],
        json!([{"model": "fake-1", "prompt_tokens": 40, "completion_tokens": 12}])
    );
    assert_eq!(usage["quota"]["tokens_per_flow_per_day"], 40);
    let metrics = get_signed_text(&app, "/metrics").await;
    let line = |kind: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("flowcore_llm_tokens_total{") && l.contains(&format!("kind=\"{kind}\"")))
            .map(str::to_owned)
    };
    assert!(line("prompt").is_some_and(|l| l.contains("model=\"fake-1\"") && l.ends_with(" 40")), "{metrics}");
    assert!(line("completion").is_some_and(|l| l.ends_with(" 12")), "{metrics}");
    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_router() {
    let (app, dir) = app(&[]).await;
    let (status, doc) = get(&app, "/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            let concrete = path
                .replace("{id}", "x")
                .replace("{path}", "nowhere")
                .replace("{name}", "s");
            // The route exists: whatever it answers, it is not the router's fallback or a 405.
            let body = (method == "POST" || method == "PUT").then(|| b"{}".to_vec());
            let (status, answer) = call(&app, &method, &concrete, Some(KEY), body).await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_ne!(
                answer["error"]["message"], "no such route",
                "{method} {path}"
            );
            assert!(status.as_u16() < 500, "{method} {path}: {status}");
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty())
            );
            if path.starts_with("/api/") {
                assert_eq!(
                    operation["security"],
                    json!([{"api_key": []}]),
                    "{method} {path}"
                );
                documented.push((method, concrete));
            }
        }
    }
    let mut expected: Vec<(String, String)> = API_ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    expected.sort();
    documented.sort();
    assert_eq!(
        documented, expected,
        "every /api/ route is documented, and only those"
    );
    for path in ["/healthz", "/readyz", "/metrics", "/webhooks/{path}"] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_requeues_runs_whose_worker_died_and_fails_those_lost_too_often() {
    use flowcore::ports::{Claim, NewRun};
    let (app, state, dir) = app_with_state(&[]).await;
    assert_eq!(call(&app, "POST", "/api/v1/flows", Some(KEY), Some(greet())).await.0, StatusCode::CREATED);
    let ttl = std::time::Duration::from_millis(20);
    let new = |owner: &str| {
        NewRun::new("greet", 1, json!({"name": "x", "n": 1})).claimed(Claim {
            owner: owner.into(),
            ttl,
        })
    };
    // A run whose worker died once: back in the queue.
    let (once, _) = state.stores.runs.create(new("dead-worker")).await.unwrap();
    // A run that five workers lost: failed.
    let (cursed, _) = state.stores.runs.create(new("dead-1")).await.unwrap();
    for owner in ["dead-2", "dead-3", "dead-4", "dead-5"] {
        tokio::time::sleep(ttl * 2).await;
        state.stores.runs.claim(&cursed.id, owner, ttl).await.unwrap();
    }
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(flowcore_server::lifecycle::recover(&state, false).await.unwrap(), 1);
    assert_eq!(state.stores.queue.depth("default").await.unwrap().ready, 1);
    let (_, failed) = get(&app, &format!("/api/v1/runs/{}", cursed.id)).await;
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("lost by 5 workers"), "{failed}");
    // A run whose worker died is cancelled at once (nobody would hear the request, and the
    // reaper would run it again).
    let (orphan, _) = state.stores.runs.create(new("dead-worker")).await.unwrap();
    tokio::time::sleep(ttl * 2).await;
    let (status, cancelled) = call(&app, "POST", &format!("/api/v1/runs/{}/cancel", orphan.id), Some(KEY), None).await;
    assert_eq!((status, cancelled["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    assert_eq!(state.stores.runs.get(&orphan.id).await.unwrap().status, flowcore::RunStatus::Cancelled);
    // A worker picks the first one up and finishes it.
    let worker = Worker::start(&state);
    wait_for_status(&app, once.id.as_str(), "succeeded").await;
    worker.stop().await;
    cleanup(&dir);
}


/// A keyed run that too many workers lost, taken by a worker through its job (before any
/// reaper looks): failed by that worker, and its key's slot goes to the next run. Its job was
/// never dead-lettered, so nothing else would have freed the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fails_a_keyed_run_lost_too_often_and_frees_its_key() {
    let (app, state, dir) = app_with_state(&[]).await;
    let flow = json!({"id": "keyed", "nodes": [{"id": "n", "type": "noop"}],
        "settings": {"concurrency": {"key": "{{ input.t }}", "limit": 1}}});
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow.to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::CREATED);
    let start = async || {
        let (status, run) = post(&app, "/api/v1/flows/keyed/runs", br#"{"input": {"t": "a"}, "wait": false}"#).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        flowcore::RunId::from(run["run_id"].as_str().unwrap().to_owned())
    };
    let (cursed, next) = (start().await, start().await);
    // Ten workers claimed it and died (their leases lapsed, each time before a reaper looked);
    // its job holds the key's slot.
    let ttl = std::time::Duration::from_millis(20);
    for i in 1..=10 {
        state.stores.runs.claim(&cursed, &format!("dead-{i}"), ttl).await.unwrap();
        tokio::time::sleep(ttl * 2).await;
    }
    assert_eq!(state.stores.queue.depth("default").await.unwrap().held_back, 1);
    let worker = Worker::start(&state);
    wait_for_status(&app, next.as_str(), "succeeded").await;
    worker.stop().await;
    let (_, failed) = get(&app, &format!("/api/v1/runs/{cursed}")).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("lost by 10 workers"), "{failed}");
    let depth = state.stores.queue.depth("default").await.unwrap();
    assert_eq!((depth.ready, depth.held_back, depth.dead), (0, 0, 0), "{depth:?}");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_finished_runs_by_age_and_by_count() {
    let (app, state, dir) = app_with_state(&[]).await;
    let keep = json!({"id": "keep", "nodes": [{"id": "n", "type": "noop"}], "settings": {"retention": {"max_count": 2}}});
    let long = json!({"id": "long", "nodes": [{"id": "n", "type": "noop"}], "settings": {"retention": {"days": 30}}});
    let plain = json!({"id": "plain", "nodes": [{"id": "n", "type": "set", "params": {"fields": {"text": "{{ input.text }}"}}}]});
    for flow in [&keep, &plain, &long] {
        let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow.to_string().into_bytes())).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let bad = json!({"id": "bad", "nodes": [{"id": "n", "type": "noop"}], "settings": {"retention": {"days": 0}}});
    let (status, refused) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(bad.to_string().into_bytes())).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_flow")), "{refused}");
    let mut ids = std::collections::HashMap::<&str, Vec<String>>::new();
    for flow in ["keep", "plain"] {
        for _ in 0..4 {
            let (status, run) = post(&app, &format!("/api/v1/flows/{flow}/runs"), b"{}").await;
            assert_eq!(status, StatusCode::OK, "{run}");
            ids.entry(flow).or_default().push(run["run_id"].as_str().unwrap().to_owned());
        }
    }
    // A flow that keeps its runs 30 days: past the default 14, they stay.
    let (_, long_run) = post(&app, "/api/v1/flows/long/runs", b"{}").await;
    let long_id = long_run["run_id"].as_str().unwrap().to_owned();
    // A run whose output was too large for the database: its blob goes with it.
    let big = json!({"input": {"text": "x".repeat(100_000)}});
    let (status, run) = call(&app, "POST", "/api/v1/flows/plain/runs", Some(KEY), Some(big.to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    let big_id = run["run_id"].as_str().unwrap().to_owned();
    let blobs_of = async |id: &str| state.stores.blobs.list(&format!("runs/{id}/")).await.unwrap();
    assert!(!blobs_of(&big_id).await.is_empty(), "the output was offloaded");
    // A queued run of the plain flow: never pruned.
    let (_, queued) = post(&app, "/api/v1/flows/plain/runs", br#"{"wait": false}"#).await;
    let exists = async |id: &str| get(&app, &format!("/api/v1/runs/{id}")).await.0 == StatusCode::OK;
    // Now: the count applies, the age does not yet.
    let now = chrono::Utc::now();
    assert_eq!(flowcore_server::retention::prune_once(&state, now).await.unwrap(), 2);
    for (i, id) in ids["keep"].iter().enumerate() {
        assert_eq!(exists(id).await, i >= 2, "the two newest of `keep` stay");
    }
    for id in &ids["plain"] {
        assert!(exists(id).await, "within FLOWCORE_RUN_RETENTION_DAYS");
    }
    // Fifteen days on: past the default 14, every finished run goes; queued ones stay.
    let later = now + chrono::Duration::days(15);
    assert_eq!(flowcore_server::retention::prune_once(&state, later).await.unwrap(), 7);
    for id in ids["plain"].iter().chain(&ids["keep"]) {
        assert!(!exists(id).await, "pruned");
    }
    assert!(!exists(&big_id).await, "pruned");
    assert!(exists(&long_id).await, "a flow keeping its runs longer keeps them");
    let much_later = now + chrono::Duration::days(31);
    assert_eq!(flowcore_server::retention::prune_once(&state, much_later).await.unwrap(), 1);
    assert!(!exists(&long_id).await, "past its own 30 days");
    assert!(blobs_of(&big_id).await.is_empty(), "with its offloaded output");
    let queued_id = queued["run_id"].as_str().unwrap();
    let (_, run) = get(&app, &format!("/api/v1/runs/{queued_id}")).await;
    assert!(exists(queued_id).await, "a queued run stays: {run}");
    let (_, metrics) = {
        let req = Request::builder().uri("/metrics").body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        (res.status(), text_of(res).await)
    };
    assert!(metrics.contains("flowcore_runs_pruned_total 10"), "{metrics}");
    // The database's size, where the store can tell it.
    let size = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flowcore_database_bytes "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("a size");
    assert_eq!(size > 0, BACKEND != Backend::Memory, "{size}");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_runs_are_still_found_after_retention_deleted_them() {
    let (app, state, dir) = app_with_state(&[("FLOWCORE_ARCHIVE", "true")]).await;
    let flow = json!({"id": "plain", "nodes": [{"id": "n", "type": "set", "params": {"fields": {"text": "{{ input.text }}"}}}]});
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow.to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut before = Vec::new();
    // Two small runs and one whose output went to the blob store.
    for text in ["one".to_owned(), "two".to_owned(), "x".repeat(100_000)] {
        let body = json!({"input": {"text": text}}).to_string().into_bytes();
        let (status, run) = call(&app, "POST", "/api/v1/flows/plain/runs", Some(KEY), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{run}");
        let id = run["run_id"].as_str().unwrap().to_owned();
        let (_, stored) = get(&app, &format!("/api/v1/runs/{id}")).await;
        assert!(stored.get("archived").is_none(), "{stored}");
        before.push((id, stored));
    }
    let (_, queued) = post(&app, "/api/v1/flows/plain/runs", br#"{"wait": false}"#).await;
    let later = chrono::Utc::now() + chrono::Duration::days(15);
    assert_eq!(flowcore_server::retention::prune_once(&state, later).await.unwrap(), 3);
    for (id, stored) in &before {
        assert!(matches!(
            state.stores.runs.get(&flowcore::RunId::from(id.as_str())).await,
            Err(flowcore::StoreError::NotFound { .. })
        ), "deleted from the database");
        let (status, archived) = get(&app, &format!("/api/v1/runs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{archived}");
        assert_eq!(archived["archived"], true);
        let mut same = archived.clone();
        same.as_object_mut().unwrap().remove("archived");
        assert_eq!(&same, stored, "the archive gives the run back as it was, large output included");
    }
    assert_eq!(before[2].1["output"]["text"].as_str().map(str::len), Some(100_000));
    let objects = state.stores.blobs.list("archive/").await.unwrap();
    assert!((1..=2).contains(&objects.len()), "an object per hour of the flow: {objects:?}");
    // A queued run stays in the database; an id nobody made is not found.
    let queued_id = queued["run_id"].as_str().unwrap();
    let (_, stays) = get(&app, &format!("/api/v1/runs/{queued_id}")).await;
    assert!(stays.get("archived").is_none(), "{stays}");
    let nobody = flowcore::RunId::new();
    let (status, missing) = get(&app, &format!("/api/v1/runs/{nobody}")).await;
    assert_eq!((status, missing["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(flowcore_server::retention::prune_once(&state, later).await.unwrap(), 0);
    // An archived run can be rerun, its input read back from the archive.
    let worker = Worker::start(&state);
    let (status, rerun) = post(&app, &format!("/api/v1/runs/{}/rerun", before[2].0), br#"{"from": "start"}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{rerun}");
    let again = wait_for_status(&app, rerun["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(again["output"], before[2].1["output"]);
    assert_eq!(again["rerun_of"].as_str(), Some(before[2].0.as_str()));
    worker.stop().await;
    let metrics = text_of(get_unsigned(&app, "/metrics").await).await;
    assert!(metrics.contains("flowcore_runs_archived_total 3"), "{metrics}");
    assert!(metrics.contains("flowcore_archive_lag_seconds "), "{metrics}");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_runs_data_and_keeps_their_summary() {
    let (app, state, dir) = app_with_state(&[("FLOWCORE_RUN_DATA_RETENTION_DAYS", "3")]).await;
    let plain = json!({"id": "plain", "nodes": [{"id": "n", "type": "set", "params": {"fields": {"text": "{{ input.text }}"}}}]});
    let brief = json!({"id": "brief", "nodes": [{"id": "n", "type": "noop"}], "settings": {"retention": {"data_days": 1}}});
    for flow in [&plain, &brief] {
        let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow.to_string().into_bytes())).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let bad = json!({"id": "bad", "nodes": [{"id": "n", "type": "noop"}], "settings": {"retention": {"data_days": 0}}});
    let (status, refused) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(bad.to_string().into_bytes())).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_flow")), "{refused}");
    let start = async |flow: &str, input: Value| {
        let body = json!({"input": input}).to_string().into_bytes();
        let (status, run) = call(&app, "POST", &format!("/api/v1/flows/{flow}/runs"), Some(KEY), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{run}");
        run["run_id"].as_str().unwrap().to_owned()
    };
    let big = start("plain", json!({"text": "x".repeat(100_000)})).await;
    let brief_run = start("brief", json!({"secret": "s"})).await;
    let read = async |id: &str| get(&app, &format!("/api/v1/runs/{id}")).await.1;
    let blobs_of = async |id: &str| state.stores.blobs.list(&format!("runs/{id}/")).await.unwrap();
    assert!(!blobs_of(&big).await.is_empty(), "the output was offloaded");
    // Two days on: past the flow's own day, not yet past the server's three.
    let now = chrono::Utc::now();
    flowcore_server::retention::prune_once(&state, now + chrono::Duration::days(2)).await.unwrap();
    let summary = read(&brief_run).await;
    assert_eq!(summary["data_pruned"], true, "{summary}");
    assert_eq!((&summary["input"], &summary["output"]), (&Value::Null, &Value::Null));
    assert_eq!(summary["steps"], json!([]));
    assert_eq!(summary["status"], "succeeded", "the summary stays");
    assert!(summary["finished_at"].is_string());
    assert!(read(&big).await.get("data_pruned").is_none(), "the default is three days");
    // Four days on: past the default too; the offloaded output goes with the data.
    flowcore_server::retention::prune_once(&state, now + chrono::Duration::days(4)).await.unwrap();
    let summary = read(&big).await;
    assert_eq!((summary["data_pruned"].as_bool(), &summary["output"]), (Some(true), &Value::Null));
    assert!(blobs_of(&big).await.is_empty(), "{summary}");
    let (_, page) = get(&app, "/api/v1/runs?flow_id=plain").await;
    assert_eq!(page["items"][0]["data_pruned"], true, "{page}");
    // Past the run retention (14 days), the summaries go too.
    let pruned = flowcore_server::retention::prune_once(&state, now + chrono::Duration::days(15)).await.unwrap();
    assert_eq!(pruned, 2);
    let metrics = text_of(get_unsigned(&app, "/metrics").await).await;
    assert!(metrics.contains("flowcore_runs_data_dropped_total 2"), "{metrics}");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reruns_keep_what_came_before_and_run_the_rest() {
    let (app, state, dir) = app_with_state(&[("WEBHOOK_TIMEOUT_SECONDS", "5")]).await;
    let worker = Worker::start(&state);
    let chain = |template: &str| {
        json!({"id": "chain", "nodes": [
            {"id": "pad", "type": "set", "params": {"fields": {"text": "{{ input.pad }}"}}},
            {"id": "a", "type": "script", "params": {"source": "input.n + 1"}},
            {"id": "b", "type": "script", "params": {"source": "if input.fail { throw \"boom\" } input.n * 10"}},
            {"id": "c", "type": "template", "params": {"template": template}}
        ], "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}], "output": "c"})
        .to_string()
    };
    assert_eq!(post(&app, "/api/v1/flows", chain("{{ nodes.a }}-{{ nodes.b }}").as_bytes()).await.0, StatusCode::CREATED);
    let pad = "x".repeat(100_000);
    let body = json!({"input": {"n": 1, "fail": true, "pad": pad}}).to_string();
    let (_, failed) = post(&app, "/api/v1/flows/chain/runs", body.as_bytes()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let first = failed["run_id"].as_str().unwrap().to_owned();
    let (_, earlier) = get(&app, &format!("/api/v1/runs/{first}")).await;
    let step = |run: &Value, node: &str| run["steps"].as_array().unwrap().iter().find(|s| s["node"] == node).cloned().unwrap_or(Value::Null);
    // A newer version of the flow: a rerun runs the original unless asked for the latest.
    let (status, _) = call(&app, "PUT", "/api/v1/flows/chain", Some(KEY), Some(chain("v2 {{ nodes.a }}-{{ nodes.b }}").into_bytes())).await;
    assert_eq!(status, StatusCode::OK);

    let rerun = async |id: &str, body: Value| {
        let (status, answer) = post(&app, &format!("/api/v1/runs/{id}/rerun"), body.to_string().as_bytes()).await;
        (status, answer)
    };
    let (status, answer) = rerun(&first, json!({"from": "failed", "input": {"n": 1, "fail": false, "pad": "-"}})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let second = answer["run_id"].as_str().unwrap().to_owned();
    let done = wait_for_status(&app, &second, "succeeded").await;
    assert_eq!(done["output"], json!("2-10"), "the original version: {done}");
    assert_eq!((done["rerun_of"].as_str(), done["flow_version"].as_u64()), (Some(first.as_str()), Some(1)));
    let a = step(&done, "a");
    assert_eq!(a["reused"], true, "the step before the failure is kept: {done}");
    assert_eq!((&a["output"], &a["started_at"]), (&step(&earlier, "a")["output"], &step(&earlier, "a")["started_at"]), "as the earlier run did it");
    assert!(step(&done, "b").get("reused").is_none() && step(&done, "c").get("reused").is_none(), "the failed step and what follows it ran again");
    // A kept output that went to the blob store is the rerun's own copy (the earlier run's
    // blobs go with it), and reads back whole.
    assert_eq!(step(&done, "pad")["output"]["text"].as_str().map(str::len), Some(100_000));
    let stored = state.stores.runs.steps(&flowcore::RunId::from(second.as_str())).await.unwrap();
    let pad_ref = stored.iter().find(|s| &*s.node == "pad").and_then(|s| s.output.clone()).unwrap();
    assert!(pad_ref["$blob"].as_str().is_some_and(|k| k.starts_with(&format!("runs/{second}/"))), "{pad_ref}");
    assert_eq!(done["actions"][0]["action"], "rerun");
    assert_eq!(done["actions"][0]["actor"]["name"], "admin");
    assert_eq!(done["actions"][0]["detail"], json!({"rerun_of": first, "from": "failed", "version": 1}));
    let (_, earlier) = get(&app, &format!("/api/v1/runs/{first}")).await;
    assert_eq!(earlier["actions"][0]["detail"], json!({"rerun": second}), "the earlier run names its rerun");

    // The latest version, on the same kept step.
    let (_, answer) = rerun(&first, json!({"version": "latest", "input": {"n": 1, "fail": false, "pad": "-"}})).await;
    let latest = wait_for_status(&app, answer["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!((&latest["output"], latest["flow_version"].as_u64()), (&json!("v2 2-10"), Some(2)), "{latest}");
    assert_eq!(step(&latest, "a")["reused"], true);

    // From a node: it and what follows run again; from the start: nothing is kept.
    let (_, answer) = rerun(&second, json!({"from": "b"})).await;
    let from_b = wait_for_status(&app, answer["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(from_b["input"], json!({"n": 1, "fail": false, "pad": "-"}), "the earlier run's input");
    assert_eq!((step(&from_b, "a")["reused"].as_bool(), step(&from_b, "b").get("reused")), (Some(true), None));
    let (_, answer) = rerun(&second, json!({"from": "start"})).await;
    let fresh = wait_for_status(&app, answer["run_id"].as_str().unwrap(), "succeeded").await;
    assert!(fresh["steps"].as_array().unwrap().iter().all(|s| s.get("reused").is_none()), "{fresh}");

    // What cannot be rerun, and why.
    for (body, code) in [
        (json!({"from": "failed"}), "invalid_request"),
        (json!({"from": "nope"}), "invalid_request"),
        (json!({"version": "newest"}), "invalid_request"),
        (json!({"form": "failed"}), "invalid_json"),
    ] {
        let (status, answer) = rerun(&second, body.clone()).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{body}: {answer}");
    }
    let (status, _) = rerun("nobody", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let waits = br#"{"id": "waits", "nodes": [{"id": "w", "type": "wait", "params": {"signal": "go"}}]}"#;
    post(&app, "/api/v1/flows", waits).await;
    let (_, waiting) = post(&app, "/api/v1/flows/waits/runs", br#"{"wait": false}"#).await;
    let waiting = waiting["run_id"].as_str().unwrap().to_owned();
    wait_for_status(&app, &waiting, "waiting").await;
    let (status, answer) = rerun(&waiting, json!({})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("run_not_finished")));
    call(&app, "POST", &format!("/api/v1/runs/{waiting}/cancel"), Some(KEY), None).await;
    // A run whose data retention removed cannot be rerun.
    let rule = flowcore::ports::PruneRule {
        flow_id: Some("chain".into()),
        ..flowcore::ports::PruneRule::older_than(chrono::Utc::now() + chrono::Duration::seconds(1))
    };
    state.stores.runs.drop_data(&rule, 100).await.unwrap();
    let (status, answer) = rerun(&first, json!({})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("run_pruned")), "{answer}");

    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_handlers_start_once_and_never_for_a_handler() {
    let (app, state, dir) = app_with_state(&[("FLOWCORE_ON_FAILURE_FLOW", "broken"), ("WEBHOOK_TIMEOUT_SECONDS", "5")]).await;
    let worker = Worker::start(&state);
    let flows = [
        json!({"id": "alert", "nodes": [{"id": "t", "type": "template", "params": {"template": "{{ input.flow_id }} {{ input.status }} at {{ input.node }}"}}]}),
        json!({"id": "flaky", "nodes": [
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "script", "params": {"source": "if input.fail { throw \"boom\" } 1"}}
        ], "edges": [{"from": "a", "to": "b"}], "settings": {"on_failure": {"flow_id": "alert"}}}),
        // The server's default handler, which fails itself: its failure starts no handler.
        json!({"id": "broken", "nodes": [{"id": "s", "type": "script", "params": {"source": "throw \"handler down\""}}]}),
        json!({"id": "plain", "nodes": [{"id": "s", "type": "script", "params": {"source": "throw \"no\""}}]}),
        json!({"id": "slowpoke", "nodes": [
            {"id": "d1", "type": "delay", "params": {"ms": 700}}, {"id": "d2", "type": "delay", "params": {"ms": 700}}
        ], "edges": [{"from": "d1", "to": "d2"}], "settings": {"timeout_seconds": 1, "on_failure": {"flow_id": "alert"}}}),
    ];
    for flow in &flows {
        assert_eq!(post(&app, "/api/v1/flows", flow.to_string().as_bytes()).await.0, StatusCode::CREATED);
    }
    let handler_of = |id: &Value| flowcore::RunId::from(id.as_str().unwrap()).failure_handler().to_string();

    let (_, run) = post(&app, "/api/v1/flows/flaky/runs", br#"{"input": {"fail": true}}"#).await;
    assert_eq!(run["status"], "failed", "{run}");
    let handler = wait_for_status(&app, &handler_of(&run["run_id"]), "succeeded").await;
    assert_eq!(handler["flow_id"], "alert");
    assert_eq!(handler["output"], json!("flaky failed at b"));
    assert_eq!(
        handler["input"],
        json!({"run_id": run["run_id"], "flow_id": "flaky", "flow_version": 1, "status": "failed", "error": run["error"], "node": "b", "input": {"fail": true}}),
        "{handler}"
    );
    let (_, listed) = get(&app, "/api/v1/runs?flow_id=alert").await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "exactly one: {listed}");

    // A time-out names no node.
    let (_, run) = post(&app, "/api/v1/flows/slowpoke/runs", b"{}").await;
    let timed_out = wait_for_status(&app, run["run_id"].as_str().unwrap(), "timed_out").await;
    let handler = wait_for_status(&app, &handler_of(&timed_out["id"]), "succeeded").await;
    assert_eq!((handler["input"]["status"].as_str(), &handler["input"]["node"]), (Some("timed_out"), &Value::Null));

    // The server's default for a flow without its own; that handler's failure starts none.
    let (_, run) = post(&app, "/api/v1/flows/plain/runs", b"{}").await;
    assert_eq!(run["status"], "failed");
    let handler_id = handler_of(&run["run_id"]);
    let handler = wait_for_status(&app, &handler_id, "failed").await;
    assert_eq!(handler["flow_id"], "broken");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, _) = get(&app, &format!("/api/v1/runs/{}", handler_of(&json!(handler_id)))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a handler's failure starts no handler");

    // A run that succeeds starts nothing.
    let (_, run) = post(&app, "/api/v1/flows/flaky/runs", br#"{"input": {"fail": false}}"#).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(get(&app, &format!("/api/v1/runs/{}", handler_of(&run["run_id"]))).await.0, StatusCode::NOT_FOUND);

    // A handler that is not a flow id is refused with the flow.
    let bad = json!({"id": "bad", "nodes": [{"id": "n", "type": "noop"}], "settings": {"on_failure": {"flow_id": "no way"}}});
    assert_eq!(post(&app, "/api/v1/flows", bad.to_string().as_bytes()).await.0, StatusCode::BAD_REQUEST);
    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_keys_hold_runs_back_in_order_and_priorities_render_from_the_input() {
    let (app, state, dir) = app_with_state(&[("WORKER_CONCURRENCY", "4")]).await;
    let worker = Worker::start(&state);
    let keyed = json!({"id": "keyed", "nodes": [{"id": "d", "type": "delay", "params": {"ms": 300}}],
        "settings": {"concurrency": {"key": "{{ input.tenant }}", "limit": 1}, "priority": "{{ input.p }}"}});
    assert_eq!(post(&app, "/api/v1/flows", keyed.to_string().as_bytes()).await.0, StatusCode::CREATED);

    // Three runs of tenant a, one of tenant b: a's run one at a time, in order; b beside them.
    let mut ids = Vec::new();
    for (tenant, p) in [("a", 1), ("b", 1), ("a", 1), ("a", 1)] {
        let body = json!({"input": {"tenant": tenant, "p": p}, "wait": false});
        let (status, run) = post(&app, "/api/v1/flows/keyed/runs", body.to_string().as_bytes()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        ids.push(run["run_id"].as_str().unwrap().to_owned());
    }
    let mut runs = Vec::new();
    for id in &ids {
        runs.push(wait_for_status(&app, id, "succeeded").await);
    }
    let at = |run: &Value, field: &str| chrono::DateTime::parse_from_rfc3339(run[field].as_str().unwrap()).unwrap();
    let a: Vec<&Value> = [0, 2, 3].iter().map(|&i| &runs[i]).collect();
    for pair in a.windows(2) {
        assert!(
            at(pair[1], "started_at") >= at(pair[0], "finished_at"),
            "a run of key a started before the one before it ended: {} {}",
            pair[0],
            pair[1]
        );
    }
    assert!(at(&runs[1], "started_at") < at(&runs[0], "finished_at"), "key b did not wait for key a");
    assert_eq!((runs[0]["concurrency_key"].as_str(), &runs[0]["priority"]), (Some("a"), &json!(1)));

    // A synchronous call of a keyed flow goes through the queue, and is answered.
    let (status, run) = post(&app, "/api/v1/flows/keyed/runs", br#"{"input": {"tenant": "c", "p": "9"}}"#).await;
    assert_eq!((status, run["status"].as_str()), (StatusCode::OK, Some("succeeded")), "{run}");
    let (_, view) = get(&app, &format!("/api/v1/runs/{}", run["run_id"].as_str().unwrap())).await;
    assert_eq!(view["priority"], 9);

    // A waiting run holds no slot: two runs of one key at limit 1 both reach their wait, and
    // each queues for a slot again when its signal wakes it.
    let parking = json!({"id": "parking", "nodes": [
        {"id": "w", "type": "wait", "params": {"signal": "go", "timeout_ms": 60000}},
        {"id": "t", "type": "template", "params": {"template": "{{ nodes.w.n }}"}}
    ], "edges": [{"from": "w", "to": "t"}], "settings": {"concurrency": {"key": "one", "limit": 1}}});
    assert_eq!(post(&app, "/api/v1/flows", parking.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let mut parked = Vec::new();
    for _ in 0..2 {
        let (_, run) = post(&app, "/api/v1/flows/parking/runs", br#"{"wait": false}"#).await;
        parked.push(run["run_id"].as_str().unwrap().to_owned());
    }
    for id in &parked {
        wait_for_status(&app, id, "waiting").await;
    }
    for (i, id) in parked.iter().enumerate() {
        let body = json!({"n": i});
        let (status, _) = post(&app, &format!("/api/v1/runs/{id}/signals/go"), body.to_string().as_bytes()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    for (i, id) in parked.iter().enumerate() {
        let done = wait_for_status(&app, id, "succeeded").await;
        assert_eq!(done["output"], json!(i.to_string()));
    }

    // A key or priority the input cannot render refuses the run.
    for (input, says) in [
        (json!({"p": 1}), "settings.concurrency.key rendered null"),
        (json!({"tenant": {"x": 1}, "p": 1}), "settings.concurrency.key rendered an object"),
        (json!({"tenant": "x".repeat(300), "p": 1}), "more than 256"),
        (json!({"tenant": "a", "p": 10}), "settings.priority rendered 10"),
        (json!({"tenant": "a", "p": "high"}), "settings.priority rendered"),
    ] {
        let body = json!({"input": input, "wait": false});
        let (status, answer) = post(&app, "/api/v1/flows/keyed/runs", body.to_string().as_bytes()).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{answer}");
    }
    // ... and a flow whose settings are wrong is refused with the flow.
    for settings in [
        json!({"concurrency": {"key": "{{ input.t }}", "limit": 0}}),
        json!({"concurrency": {"key": "{{ input.t ", "limit": 1}}),
        json!({"priority": 12}),
        json!({"priority": true}),
    ] {
        let flow = json!({"id": "wrong", "nodes": [{"id": "n", "type": "noop"}], "settings": settings});
        let (status, answer) = post(&app, "/api/v1/flows", flow.to_string().as_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{settings}: {answer}");
    }
    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_calls_the_child_versions_current_when_it_started() {
    let (app, state, dir) = app_with_state(&[("WEBHOOK_TIMEOUT_SECONDS", "5")]).await;
    let worker = Worker::start(&state);
    let child = |word: &str| json!({"id": "child", "nodes": [{"id": "t", "type": "template", "params": {"template": word}}]});
    assert_eq!(post(&app, "/api/v1/flows", child("one").to_string().as_bytes()).await.0, StatusCode::CREATED);
    let parent = json!({"id": "parent", "nodes": [
        {"id": "w", "type": "wait", "params": {"signal": "go", "timeout_ms": 60000}},
        {"id": "sub", "type": "subflow", "params": {"flow_id": "child"}},
        {"id": "each", "type": "map", "params": {"items": "{{ input.list }}", "flow_id": "child"}}
    ], "edges": [{"from": "w", "to": "sub"}, {"from": "w", "to": "each"}]});
    assert_eq!(post(&app, "/api/v1/flows", parent.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let (_, early) = post(&app, "/api/v1/flows/parent/runs", br#"{"input": {"list": [1, 2]}, "wait": false}"#).await;
    let early = early["run_id"].as_str().unwrap().to_owned();
    wait_for_status(&app, &early, "waiting").await;

    // The child changes while the run waits; a run started after the change sees the change.
    let body = child("two").to_string().into_bytes();
    let (status, updated) = call(&app, "PUT", "/api/v1/flows/child", Some(KEY), Some(body)).await;
    assert_eq!((status, updated["version"].as_u64()), (StatusCode::OK, Some(2)), "{updated}");
    let (_, late) = post(&app, "/api/v1/flows/parent/runs", br#"{"input": {"list": [1, 2]}, "wait": false}"#).await;
    let late = late["run_id"].as_str().unwrap().to_owned();
    wait_for_status(&app, &late, "waiting").await;
    for id in [&early, &late] {
        let (status, _) = post(&app, &format!("/api/v1/runs/{id}/signals/go"), b"{}").await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let early = wait_for_status(&app, &early, "succeeded").await;
    assert_eq!(early["output"], json!({"sub": "one", "each": ["one", "one"]}), "the versions current when it started");
    let late = wait_for_status(&app, &late, "succeeded").await;
    assert_eq!(late["output"], json!({"sub": "two", "each": ["two", "two"]}));
    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_rerun_the_matching_runs_once_each_at_the_lowest_priority() {
    let (app, state, dir) = app_with_state(&[]).await;
    let worker = Worker::start(&state);
    let flow = json!({"id": "flaky", "nodes": [{"id": "s", "type": "script", "params": {"source": "if input.fail { throw \"boom\" } 1"}}]});
    assert_eq!(post(&app, "/api/v1/flows", flow.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let mut failed = Vec::new();
    for fail in [true, true, false, true] {
        let body = json!({"input": {"fail": fail}});
        let (_, run) = post(&app, "/api/v1/flows/flaky/runs", body.to_string().as_bytes()).await;
        if fail {
            assert_eq!(run["status"], "failed", "{run}");
            failed.push(run["run_id"].as_str().unwrap().to_owned());
        }
    }
    let replay_done = async |body: Value| {
        let (status, started) = post(&app, "/api/v1/runs/replay", body.to_string().as_bytes()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{started}");
        let path = format!("/api/v1/replays/{}", started["replay_id"].as_str().unwrap());
        for _ in 0..200 {
            let (status, progress) = get(&app, &path).await;
            assert_eq!(status, StatusCode::OK, "{progress}");
            if progress["status"] == "done" {
                assert_eq!(progress["count"], started["count"]);
                return progress;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the replay did not end");
    };
    let progress = replay_done(json!({"flow_id": "flaky"})).await;
    assert_eq!((progress["count"].as_u64(), progress["rerun"].as_u64(), progress["skipped"].as_u64()), (Some(3), Some(3), Some(0)), "{progress}");
    assert_eq!(progress["actor"]["name"], "admin", "{progress}");
    for id in &failed {
        let (_, run) = get(&app, &format!("/api/v1/runs/{id}")).await;
        let rerun = run["actions"].as_array().unwrap().iter().find(|a| a["action"] == "rerun").expect("recorded");
        let again = wait_for_status(&app, rerun["detail"]["rerun"].as_str().unwrap(), "failed").await;
        assert_eq!((again["rerun_of"].as_str(), &again["priority"]), (Some(id.as_str()), &json!(0)), "{again}");
    }
    // Again: the runs rerun before are left out; the reruns that failed are rerun.
    let progress = replay_done(json!({"flow_id": "flaky", "status": "failed", "limit": 100})).await;
    assert_eq!((progress["count"].as_u64(), progress["rerun"].as_u64(), progress["skipped"].as_u64()), (Some(6), Some(3), Some(3)), "{progress}");
    // A range that holds nothing; the succeeded run alone.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    assert_eq!(replay_done(json!({"flow_id": "flaky", "from": future})).await["count"], 0);
    let progress = replay_done(json!({"flow_id": "flaky", "status": "succeeded"})).await;
    assert_eq!((progress["count"].as_u64(), progress["rerun"].as_u64()), (Some(1), Some(1)), "{progress}");

    for (body, status) in [
        (json!({"flow_id": "flaky", "status": "running"}), StatusCode::BAD_REQUEST),
        (json!({"flow_id": "flaky", "limit": 0}), StatusCode::BAD_REQUEST),
        (json!({"flow_id": "flaky", "limit": 100_001}), StatusCode::BAD_REQUEST),
        (json!({"flow_id": "flaky", "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}), StatusCode::BAD_REQUEST),
        (json!({"flow_id": "no such flow"}), StatusCode::BAD_REQUEST),
        (json!({"flow_id": "nothere"}), StatusCode::NOT_FOUND),
        (json!({"flow": "flaky"}), StatusCode::BAD_REQUEST),
    ] {
        let (got, answer) = post(&app, "/api/v1/runs/replay", body.to_string().as_bytes()).await;
        assert_eq!(got, status, "{body}: {answer}");
    }
    assert_eq!(get(&app, "/api/v1/replays/nothere").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/api/v1/replays/..%2Fx").await.0, StatusCode::NOT_FOUND);
    worker.stop().await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_of_a_failed_map_executes_only_the_items_that_had_not_finished() {
    let (app, state, dir) = app_with_state(&[("WEBHOOK_TIMEOUT_SECONDS", "5")]).await;
    let worker = Worker::start(&state);
    let work = |source: &str| json!({"id": "work", "nodes": [{"id": "s", "type": "script", "params": {"source": source}}]});
    let v1 = work("if input == 2 { throw \"bad item\" } \"v1:\" + input");
    assert_eq!(post(&app, "/api/v1/flows", v1.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let each = json!({"id": "each", "nodes": [
        {"id": "m", "type": "map", "params": {"items": "{{ input.list }}", "flow_id": "work", "concurrency": 1}}
    ]});
    assert_eq!(post(&app, "/api/v1/flows", each.to_string().as_bytes()).await.0, StatusCode::CREATED);
    let (_, run) = post(&app, "/api/v1/flows/each/runs", br#"{"input": {"list": [1, 2, 3]}}"#).await;
    assert_eq!(run["status"], "failed", "{run}");
    let id = run["run_id"].as_str().unwrap().to_owned();

    // The child is fixed; a rerun from the failed step keeps item 0, done by the old child.
    let body = work("\"v2:\" + input").to_string().into_bytes();
    assert_eq!(call(&app, "PUT", "/api/v1/flows/work", Some(KEY), Some(body)).await.0, StatusCode::OK);
    let (status, rerun) = post(&app, &format!("/api/v1/runs/{id}/rerun"), b"{}").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{rerun}");
    let done = wait_for_status(&app, rerun["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["output"], json!(["v1:1", "v2:2", "v2:3"]), "only the items not finished ran again: {done}");
    // From the start, or with a new input, the map executes whole.
    let (_, again) = post(&app, &format!("/api/v1/runs/{id}/rerun"), br#"{"from": "start"}"#).await;
    let again = wait_for_status(&app, again["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(again["output"], json!(["v2:1", "v2:2", "v2:3"]));
    let (_, other) = post(&app, &format!("/api/v1/runs/{id}/rerun"), br#"{"input": {"list": [5, 1]}}"#).await;
    let other = wait_for_status(&app, other["run_id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(other["output"], json!(["v2:5", "v2:1"]));
    worker.stop().await;
    cleanup(&dir);
}

/// The console: `/` redirects to it; its page and modules carry a strict policy, go gzipped
/// when asked and answer 304 to their ETag; a name it does not serve is a 404, never a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_a_strict_policy() {
    use std::io::Read;
    let (app, dir) = app(&[]).await;
    let root = get_unsigned(&app, "/").await;
    assert!(root.status().is_redirection(), "{}", root.status());
    assert_eq!(root.headers()["location"], "/ui/");
    let page = get_unsigned(&app, "/ui/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    for part in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = text_of(page).await;
    assert!(html.contains(r#"<script type="module" src="app.js"></script>"#), "{html}");

    let gzipped = Request::builder()
        .uri("/ui/runs.js")
        .header("accept-encoding", "gzip, br")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(gzipped).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let etag = res.headers()["etag"].clone();
    let body = bytes_of(res).await;
    let mut js = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut js)
        .expect("gzip");
    assert!(js.contains("export async function runPage"), "the module, whole");
    let again = |encoding: &'static str| {
        Request::builder()
            .uri("/ui/runs.js")
            .header("if-none-match", etag.clone())
            .header("accept-encoding", encoding)
            .body(Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(again("gzip")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert!(res.headers().contains_key("content-security-policy"));
    // The plain copy has a tag of its own: the gzip copy's does not revalidate it.
    let res = app.clone().oneshot(again("identity")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_ne!(res.headers()["etag"], etag);
    let plain = get_unsigned(&app, "/ui/app.css").await;
    assert!(plain.headers().get("content-encoding").is_none());
    assert!(plain.headers()["content-type"].to_str().unwrap().starts_with("text/css"));

    for missing in ["/ui/nope.js", "/ui/..%2FCargo.toml", "/ui/%2e%2e", "/ui/console.rs"] {
        let res = get_unsigned(&app, missing).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{missing}");
        let body: Value = serde_json::from_slice(&bytes_of(res).await).unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{missing}");
    }
    cleanup(&dir);
}

/// `POST /api/v1/flows?dry_run=true` checks a flow as a create would and stores nothing: the
/// console's editor calls it as you type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_checks_a_flow_and_stores_nothing() {
    let (app, dir) = app(&[]).await;
    assert_eq!(
        post(&app, "/api/v1/flows?dry_run=true", &greet()).await,
        (StatusCode::OK, json!({"valid": true}))
    );
    assert_eq!(get(&app, "/api/v1/flows/greet").await.0, StatusCode::NOT_FOUND, "nothing stored");
    let broken = json!({"id": "b", "nodes": [
        {"id": "x", "type": "no_such_type"},
        {"id": "c", "type": "branch", "params": {"condition": "input.n >"}}
    ], "edges": [{"from": "c", "to": "ghost"}]});
    let (status, body) = post(&app, "/api/v1/flows?dry_run=true", broken.to_string().as_bytes()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_flow")));
    let nodes: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["node"].as_str())
        .collect();
    assert!(nodes.contains(&"x") && nodes.contains(&"c"), "every problem, on its node: {body}");
    assert_eq!(
        post(&app, "/api/v1/flows?dry_run=true", b"{\"nodes\": 3}").await.1["error"]["code"],
        "invalid_flow"
    );
    // A flow's own webhook is no conflict for its next version; another flow's is.
    assert_eq!(post(&app, "/api/v1/flows", &greet()).await.0, StatusCode::CREATED);
    assert_eq!(post(&app, "/api/v1/flows?dry_run=true", &greet()).await.0, StatusCode::OK);
    let mut other: Value = serde_json::from_slice(&greet()).unwrap();
    other["id"] = json!("other");
    let (status, _) = post(&app, "/api/v1/flows?dry_run=true", other.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = post(&app, "/api/v1/flows?dry_run=maybe", &greet()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    cleanup(&dir);
}

/// `GET /api/v1/runs` takes a window of creation times; a time that is not RFC 3339 is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_list_by_creation_time() {
    let (app, state, dir) = app_with_state(&[]).await;
    let worker = Worker::start(&state);
    assert_eq!(post(&app, "/api/v1/flows", &greet()).await.0, StatusCode::CREATED);
    let before = chrono::Utc::now();
    for n in [1, 9] {
        let body = json!({"input": {"name": "ada", "n": n}}).to_string();
        assert_eq!(post(&app, "/api/v1/flows/greet/runs", body.as_bytes()).await.0, StatusCode::OK);
    }
    let count = |q: String| {
        let app = app.clone();
        async move {
            let (status, body) = get(&app, &format!("/api/v1/runs?{q}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["items"].as_array().unwrap().len()
        }
    };
    let at = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let hour = chrono::Duration::hours(1);
    assert_eq!(count(format!("created_after={}", at(before))).await, 2);
    assert_eq!(count(format!("created_before={}", at(before))).await, 0);
    assert_eq!(count(format!("flow_id=greet&created_after={}&created_before={}", at(before - hour), at(before + hour))).await, 2);
    assert_eq!(count(format!("created_after={}", at(before + hour))).await, 0);
    let (status, body) = get(&app, "/api/v1/runs?created_after=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    worker.stop().await;
    cleanup(&dir);
}
