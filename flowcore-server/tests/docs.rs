//! The walk through the HTTP API (`docs/api.md`) runs as written: each `http` block is sent,
//! in order, to one server on the memory stores (admin key `dev-key`, a worker running), and
//! its answer must match the `json STATUS` or `text STATUS` block after it.
//!
//! How an answer matches: the status is equal; a JSON object matches when each of its fields
//! matches (the answer may have more); an array when it has as many elements, each matching;
//! `"…"` matches anything; `"{name}"` takes the value the first time and must be equal after,
//! and `{name}` in a later request is that value. A text answer holds each line, in order,
//! `…` standing for anything within a line. A `GET` is asked again for up to 10 s until it
//! matches, as a client polls for a run to end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flowcore::testkit::docs::fenced_blocks;
use serde_json::Value;
use tower::ServiceExt;

const WALK: &str = include_str!("../../docs/api.md");

fn substitute(text: &str, vars: &HashMap<String, String>) -> String {
    let mut text = text.to_owned();
    for (name, value) in vars {
        text = text.replace(&format!("{{{name}}}"), value);
    }
    text
}

/// The name of a `"{name}"` placeholder.
fn placeholder(s: &str) -> Option<&str> {
    let name = s.strip_prefix('{')?.strip_suffix('}')?;
    name.chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(name)
}

/// Whether `actual` matches `expected` (the rules above); new captures go to `vars`.
fn matches(
    expected: &Value,
    actual: &Value,
    vars: &mut HashMap<String, String>,
    at: &str,
) -> Result<(), String> {
    match (expected, actual) {
        (Value::String(e), _) if e == "…" => Ok(()),
        (Value::String(e), Value::String(a)) if placeholder(e).is_some() => {
            let name = placeholder(e).unwrap_or_default();
            match vars.get(name) {
                Some(v) if v != a => Err(format!("{at}: {a} is not {{{name}}} = {v}")),
                Some(_) => Ok(()),
                None => {
                    vars.insert(name.to_owned(), a.clone());
                    Ok(())
                }
            }
        }
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let av = a
                    .get(k)
                    .ok_or_else(|| format!("{at}.{k}: missing in {actual}"))?;
                matches(ev, av, vars, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!(
                    "{at}: {} elements, not {}: {actual}",
                    a.len(),
                    e.len()
                ));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                matches(ev, av, vars, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{at}: {actual} is not {expected}")),
    }
}

/// Whether `actual` holds each line of `expected` in order (`…`: anything within a line).
fn text_matches(expected: &str, actual: &str) -> Result<(), String> {
    let mut from = 0;
    for line in expected.lines().filter(|l| !l.trim().is_empty()) {
        for piece in line.split('…').filter(|p| !p.is_empty()) {
            match actual[from..].find(piece) {
                Some(i) => from += i + piece.len(),
                None => {
                    return Err(format!(
                        "`{piece}` (of `{line}`) not found in order in:\n{actual}"
                    ));
                }
            }
        }
    }
    Ok(())
}

struct Call {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn parse_request(text: &str) -> Call {
    let mut lines = text.lines();
    let first = lines.next().expect("a request line");
    let (method, path) = first.split_once(' ').expect("METHOD PATH");
    let mut headers = Vec::new();
    for line in lines.by_ref() {
        if line.trim().is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').expect("a header line");
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let body = lines.collect::<Vec<_>>().join("\n");
    Call {
        method: method.to_owned(),
        path: path.trim().to_owned(),
        headers,
        body: body.trim_end().to_owned(),
    }
}

async fn send(app: &axum::Router, call: &Call) -> (StatusCode, String) {
    let mut request = Request::builder()
        .method(call.method.as_str())
        .uri(call.path.as_str());
    for (name, value) in &call.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Body::from(call.body.clone()))
        .expect("a request");
    let response = app.clone().oneshot(request).await.expect("an answer");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .expect("a body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_the_api_runs_as_written() {
    let dir = std::env::temp_dir().join(format!("flowcore-docs-{}", std::process::id()));
    let config = flowcore_server::config::Config::from_vars(
        [
            ("FLOWCORE_DATA_DIR", dir.display().to_string()),
            ("FLOWCORE_ADMIN_KEY", "dev-key".to_owned()),
            ("STORAGE_TYPE", "memory".to_owned()),
            ("WEBHOOK_TIMEOUT_SECONDS", "10".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    )
    .expect("config");
    let state = flowcore_server::build_state_with(
        config,
        flowcore_server::Stores::memory(),
        flowcore::Registry::with_builtins(),
    )
    .expect("state");
    let stop = flowcore::CancellationToken::new();
    let tasks = [
        tokio::spawn(flowcore_server::worker::work(state.clone(), stop.clone())),
        tokio::spawn(flowcore_server::lifecycle::wake_timers(
            state.clone(),
            stop.clone(),
        )),
        tokio::spawn(state.usage.clone().run_flusher(stop.clone())),
    ];
    let app = flowcore_server::app::app(state);
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut pending: Option<(usize, Call)> = None;
    let mut checked = 0;
    for (n, (info, body)) in fenced_blocks(WALK).into_iter().enumerate() {
        if info == "http" {
            assert!(
                pending.is_none(),
                "block {n}: a request without an answer before it"
            );
            pending = Some((n, parse_request(&body)));
            continue;
        }
        let Some((kind, status)) = info.split_once(' ') else {
            continue;
        };
        let (at, call) = pending
            .take()
            .unwrap_or_else(|| panic!("block {n}: an answer without a request"));
        let want: u16 = status.parse().expect("a status");
        let call = Call {
            path: substitute(&call.path, &vars),
            body: substitute(&call.body, &vars),
            ..call
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (got, text) = send(&app, &call).await;
            let mut trial = vars.clone();
            let outcome = if got.as_u16() != want {
                Err(format!("status {got}, not {want}: {text}"))
            } else if kind == "json" && body.trim().is_empty() {
                if text.is_empty() {
                    Ok(())
                } else {
                    Err(format!("a body: {text}"))
                }
            } else if kind == "json" {
                let expected: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("block {n} is not JSON: {e}"));
                let actual: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("not JSON ({e}): {text}"))
                    .unwrap_or(Value::Null);
                matches(&expected, &actual, &mut trial, "answer")
            } else {
                text_matches(&body, &text)
            };
            match outcome {
                Ok(()) => {
                    vars = trial;
                    break;
                }
                Err(e) if call.method == "GET" && Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!(
                    "docs/api.md, the request of block {at} ({} {}): {e}",
                    call.method, call.path
                ),
            }
        }
        checked += 1;
    }
    stop.cancel();
    for task in tasks {
        task.await.expect("stopped");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(checked >= 30, "{checked} calls");
}
