//! Arbitrary requests into the whole router, in process, on the embedded stores: whatever the
//! method, path, headers and body, the answer is never a 5xx (but 503 `overloaded`), and every
//! error is the JSON shape with a code.
//!
//! Input: byte 0 picks a route, byte 1 a content type, then header lines (`name: value`) up to
//! an empty line, then the body.
#![no_main]

use std::sync::LazyLock;

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const KEY: &str = "fuzz-admin-key";

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/webhooks/open"),
    ("POST", "/webhooks/signed"),
    ("GET", "/webhooks/open"),
    ("POST", "/api/v1/flows"),
    ("PUT", "/api/v1/flows/open"),
    ("POST", "/api/v1/flows/open/runs"),
    ("GET", "/api/v1/runs?limit=5"),
    ("POST", "/api/v1/api-keys"),
    ("POST", "/api/v1/credentials"),
    ("POST", "/api/v1/files?name=f"),
    ("GET", "/api/v1/usage?flow_id=open"),
    ("GET", "/healthz"),
];

const TYPES: &[Option<&str>] = &[
    Some("application/json"),
    Some("text/plain"),
    None,
    Some("application/x-www-form-urlencoded"),
    Some("application/merge-patch+json; charset=utf-8"),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("flowcore-fuzz-http-{}", std::process::id()));
    let app = runtime.block_on(async {
        let vars = [
            ("FLOWCORE_DATA_DIR", dir.display().to_string()),
            ("DATABASE_URL", "sqlite::memory:".to_owned()),
            ("STORAGE_TYPE", "memory".to_owned()),
            ("FLOWCORE_ADMIN_KEY", KEY.to_owned()),
            ("FLOWCORE_AUTH_FAILURES_PER_MINUTE", "0".to_owned()),
            ("MAX_PAYLOAD_SIZE_MB", "1".to_owned()),
            ("MAX_FILE_SIZE_MB", "1".to_owned()),
            ("WEBHOOK_TIMEOUT_SECONDS", "2".to_owned()),
        ];
        let config = flowcore_server::config::Config::from_vars(
            vars.into_iter().map(|(k, v)| (k.to_owned(), v)),
        )
        .expect("config");
        let state = flowcore_server::build_state(config).await.expect("state");
        let app = flowcore_server::app::app(state);
        let setup = [
            serde_json::json!({"name": "hook", "type": "bearer", "data": {"token": "fuzz-secret"}}),
        ];
        for credential in setup {
            call(&app, "POST", "/api/v1/credentials", credential).await;
        }
        for flow in [
            serde_json::json!({"id": "open", "nodes": [
                {"id": "s", "type": "set", "params": {"fields": {"got": "{{ input }}", "h": "{{ trigger.headers }}"}}}],
                "triggers": [{"type": "webhook", "path": "open", "headers": ["x-event"]},
                             {"type": "webhook", "path": "open", "method": "GET"}]}),
            serde_json::json!({"id": "signed", "nodes": [{"id": "n", "type": "noop"}],
                "triggers": [{"type": "webhook", "path": "signed", "auth": {"type": "hmac_sha256",
                    "header": "x-sig", "prefix": "sha256=", "credential": "hook",
                    "timestamp_header": "x-ts"}}]}),
        ] {
            call(&app, "POST", "/api/v1/flows", flow).await;
        }
        app
    });
    Fixture { runtime, app }
});

async fn call(app: &axum::Router, method: &str, path: &str, body: serde_json::Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("answer");
    assert!(response.status().is_success(), "setup: {path} {}", response.status());
}

fuzz_target!(|data: &[u8]| {
    let [route, content_type, rest @ ..] = data else { return };
    let (method, path) = ROUTES[usize::from(*route) % ROUTES.len()];
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&rest[..at], &rest[at + 2..]),
        None => (&[][..], rest),
    };
    let mut request = Request::builder().method(method).uri(path);
    if path.starts_with("/api/") {
        request = request.header("x-api-key", KEY);
    }
    if let Some(content_type) = TYPES[usize::from(*content_type) % TYPES.len()] {
        request = request.header("content-type", content_type);
    }
    for line in head.split(|b| *b == b'\n').take(16) {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(&line[..colon]),
            axum::http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        request = request.header(name, value);
    }
    let Ok(request) = request.body(Body::from(body.to_vec())) else { return };
    let fixture = &*FIXTURE;
    let (status, content_type, bytes) = fixture.runtime.block_on(async {
        let response = fixture.app.clone().oneshot(request).await.expect("answer");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap_or_default();
        (status, content_type, bytes)
    });
    if status.is_server_error() {
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        assert!(
            status.as_u16() == 503 && body["error"]["code"] == "overloaded",
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    if status.is_client_error() {
        assert_eq!(content_type, "application/json", "{method} {path}: {status}");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error");
        assert!(body["error"]["code"].is_string(), "{method} {path}: {body}");
    }
});
