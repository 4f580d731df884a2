//! The `http_request` node against a real HTTP server on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flowcore::{Engine, FlowDef, RunStatus};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The last `Authorization` header the server received.
static LAST_AUTHORIZATION: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// A tiny HTTP/1.1 server: answers `/json` with JSON echoing the request, `/flaky` with 503
/// for the first two calls, `/missing` with 404, `/big` with a large body.
async fn server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let flaky = Arc::new(AtomicUsize::new(0));
    let counter = flaky.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut len = 0;
                let request = loop {
                    let n = sock.read(&mut buf[len..]).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    len += n;
                    let text = String::from_utf8_lossy(&buf[..len]).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let content_length = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if len >= head_end + 4 + content_length {
                            break text;
                        }
                    }
                };
                let first = request.lines().next().unwrap_or_default().to_owned();
                let path = first.split(' ').nth(1).unwrap_or("/").to_owned();
                let body = request
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let auth = request
                    .lines()
                    .find_map(|l| l.strip_prefix("x-token: "))
                    .unwrap_or_default()
                    .to_owned();
                let authorization = request
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .unwrap_or_default()
                    .to_owned();
                if !authorization.is_empty() {
                    *LAST_AUTHORIZATION.lock().unwrap() = authorization.clone();
                }
                if let Some(to) = path.strip_prefix("/redirect?to=") {
                    let response = format!(
                        "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    return;
                }
                let (status, ctype, payload) = match path.as_str() {
                    "/json" => (
                        "200 OK",
                        "application/json",
                        json!({"method": first.split(' ').next(), "body": body, "token": auth, "authorization": authorization})
                            .to_string(),
                    ),
                    "/flaky" if counter.fetch_add(1, Ordering::SeqCst) < 2 => {
                        ("503 Service Unavailable", "text/plain", "busy".into())
                    }
                    "/flaky" => ("200 OK", "text/plain", "finally".into()),
                    "/big" => ("200 OK", "text/plain", "x".repeat(5000)),
                    "/slow" => ("408 Request Timeout", "text/plain", "late".into()),
                    _ => ("404 Not Found", "text/plain", "nope".into()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{payload}",
                    payload.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), flaky)
}

/// Engines here call test servers on 127.0.0.1, which the default guard denies.
fn local() -> flowcore::net::Guard {
    flowcore::net::Guard::parse(None, Some("127.0.0.1/32")).unwrap()
}

async fn run(engine: &Engine, node: Value, input: Value) -> flowcore::RunResult {
    let flow = FlowDef::from_value(json!({"nodes": [node]})).unwrap();
    let plan = engine.compile(&flow).unwrap();
    engine.run(&plan, input).await
}

#[tokio::test]
async fn http_request_calls_a_real_server() {
    let (base, flaky) = server().await;
    let engine = Engine::builder().http_guard(local()).build();

    let result = run(
        &engine,
        json!({"id": "post", "type": "http_request", "params": {
            "method": "POST", "url": format!("{base}/json"), "headers": {"x-token": "{{ input.token }}"}, "body": {"n": "{{ input.n }}"}
        }}),
        json!({"n": 3, "token": "t0k"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"]["method"], "POST");
    assert_eq!(out["body"]["body"], r#"{"n":3}"#);
    assert_eq!(out["body"]["token"], "t0k");
    assert_eq!(out["headers"]["content-type"], "application/json");

    let result = run(
        &engine,
        json!({"id": "retry", "type": "http_request", "params": {"url": format!("{base}/flaky")}, "retry": {"max_attempts": 3, "backoff_ms": 1}}),
        json!({}),
    )
    .await;
    assert_eq!(
        result.status,
        RunStatus::Succeeded,
        "503s are retried: {:?}",
        result.error
    );
    assert_eq!(result.output.unwrap()["body"], "finally");
    assert_eq!(flaky.load(Ordering::SeqCst), 3);

    let result = run(
        &engine,
        json!({"id": "nf", "type": "http_request", "params": {"url": format!("{base}/missing")}, "retry": {"max_attempts": 3, "backoff_ms": 1}}),
        json!({}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    let step = result.step("nf").unwrap();
    assert_eq!(
        (step.attempts, step.error.as_deref()),
        (1, Some("HTTP 404 Not Found")),
        "a 404 is not retried"
    );
    let result = run(
        &engine,
        json!({"id": "late", "type": "http_request", "params": {"url": format!("{base}/slow")}, "retry": {"max_attempts": 2, "backoff_ms": 1}}),
        json!({}),
    )
    .await;
    assert_eq!(
        result.step("late").unwrap().attempts,
        2,
        "a 408 is retried as a 429 or a 5xx is"
    );

    let result = run(
        &engine,
        json!({"id": "nf", "type": "http_request", "params": {"url": format!("{base}/missing"), "fail_on_status": false}}),
        json!({}),
    )
    .await;
    assert_eq!(result.output.unwrap()["status"], 404);

    let small = Engine::builder()
        .http_guard(local())
        .limits(flowcore::Limits {
            max_output_bytes: 1000,
            ..Default::default()
        })
        .build();
    let result = run(
        &small,
        json!({"id": "big", "type": "http_request", "params": {"url": format!("{base}/big")}}),
        json!({}),
    )
    .await;
    assert_eq!(
        result.step("big").unwrap().error.as_deref(),
        Some("output is larger than the limit of 1000 bytes")
    );
}

#[tokio::test]
async fn http_request_refuses_bad_urls() {
    let flow = FlowDef::from_value(
        json!({"nodes": [{"id": "h", "type": "http_request", "params": {"url": "not a url"}}]}),
    )
    .unwrap();
    assert!(
        Engine::new().compile(&flow).unwrap_err().problems[0]
            .problem
            .contains("url")
    );
    let result = run(
        &Engine::new(),
        json!({"id": "h", "type": "http_request", "params": {"url": "{{ input.u }}"}}),
        json!({"u": "file:///etc/passwd"}),
    )
    .await;
    assert!(result.error.unwrap().contains("only http and https"));
}

#[tokio::test]
async fn credentials_are_sent_by_reference_and_scrubbed_from_outputs_and_errors() {
    use flowcore::secret::{MemorySecrets, Secret};
    let (base, _) = server().await;
    let secrets = Arc::new(MemorySecrets::default());
    secrets.insert(
        "api",
        Secret::new("bearer", json!({"token": "s3cr3t-t0ken"})),
    );
    secrets.insert(
        "odd",
        Secret::new("oauth", json!({"token": "other-s3cr3t"})),
    );
    let engine = Engine::builder()
        .secrets(secrets)
        .http_guard(local())
        .build();

    // The server gets the header; the stored output (which echoes it) and the events do not.
    let flow = FlowDef::from_value(json!({"nodes": [
        {"id": "call", "type": "http_request", "params": {"url": format!("{base}/json"), "credential": "api"}},
        {"id": "copy", "type": "set", "params": {"fields": {"seen": "{{ nodes.call.body.authorization }}"}}}
    ], "edges": [{"from": "call", "to": "copy"}]}))
    .unwrap();
    let plan = engine.compile(&flow).unwrap();
    let result = engine.run(&plan, json!({})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(*LAST_AUTHORIZATION.lock().unwrap(), "Bearer s3cr3t-t0ken");
    assert_eq!(result.output, Some(json!({"seen": "Bearer [redacted]"})));
    let everything = format!("{:?}", result.steps);
    assert!(!everything.contains("s3cr3t"), "{everything}");

    // Unknown credentials and unusable kinds fail with a message naming the credential only.
    for (name, expected) in [
        ("missing", "credential `missing` does not exist"),
        (
            "odd",
            "credential `odd` is of type `oauth`, which http_request cannot use",
        ),
    ] {
        let result = run(
            &engine,
            json!({"id": "call", "type": "http_request", "params": {"url": format!("{base}/json"), "credential": name}}),
            json!({}),
        )
        .await;
        assert_eq!(result.status, RunStatus::Failed);
        assert!(
            result.error.as_deref().unwrap().contains(expected),
            "{:?}",
            result.error
        );
        assert!(!result.error.unwrap().contains("s3cr3t"));
    }

    // An engine without a secret source says so.
    let result = run(
        &Engine::new(),
        json!({"id": "call", "type": "http_request", "params": {"url": format!("{base}/json"), "credential": "api"}}),
        json!({}),
    )
    .await;
    assert!(
        result
            .error
            .unwrap()
            .contains("credentials are not available")
    );
}

#[tokio::test]
async fn the_guard_refuses_this_machine_in_every_spelling_and_on_every_hop() {
    let (base, _) = server().await;
    let port = base.rsplit(':').next().unwrap().to_owned();
    let engine = Engine::new(); // the default guard
    for url in [
        format!("{base}/json"),
        format!("http://localhost:{port}/json"),
        format!("http://127.1:{port}/json"),
        format!("http://2130706433:{port}/json"),
        format!("http://0.0.0.0:{port}/json"),
        format!("http://[::ffff:127.0.0.1]:{port}/json"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        let result = run(
            &engine,
            json!({"id": "h", "type": "http_request", "params": {"url": "{{ input.url }}"}}),
            json!({"url": url}),
        )
        .await;
        assert_eq!(result.status, RunStatus::Failed, "{url}");
        let error = result.error.unwrap();
        assert!(
            error.contains("FLOWCORE_HTTP_DENY") && error.contains("FLOWCORE_HTTP_ALLOW"),
            "{url}: {error}"
        );
    }

    // A redirect from an allowed server to a denied address is not followed.
    let only_port = Engine::builder()
        .http_guard(flowcore::net::Guard::parse(None, Some(&format!("127.0.0.1:{port}"))).unwrap())
        .build();
    let result = run(
        &only_port,
        json!({"id": "h", "type": "http_request", "params": {"url": format!("{base}/redirect?to=http://127.0.0.1:9/json")}}),
        json!({}),
    )
    .await;
    let error = result.error.unwrap();
    assert!(
        error.contains("127.0.0.1:9") && error.contains("denied"),
        "{error}"
    );
    // ... and to an allowed one it is.
    let result = run(
        &only_port,
        json!({"id": "h", "type": "http_request", "params": {"url": format!("{base}/redirect?to={base}/json")}}),
        json!({}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
}

#[tokio::test]
async fn a_credential_goes_only_to_the_hosts_it_may() {
    use flowcore::secret::{MemorySecrets, Secret};
    let (base, _) = server().await;
    let (other, _) = server().await;
    let port = |url: &str| url.rsplit(':').next().unwrap().to_owned();
    let secrets = Arc::new(MemorySecrets::default());
    let header = Secret::new("header", json!({"name": "x-token", "value": "hdr-s3cr3t"}));
    secrets.insert("header", header.clone());
    secrets.insert(
        "pinned",
        header.with_allowed_hosts(vec![format!("127.0.0.1:{}", port(&base))]),
    );
    secrets.insert(
        "basic",
        Secret::new(
            "basic_auth",
            json!({"username": "ada", "password": "b4sic-s3cr3t"}),
        ),
    );
    let engine = Engine::builder()
        .secrets(secrets)
        .http_guard(local())
        .build();
    let call = |url: String, credential: &str| json!({"id": "h", "type": "http_request", "params": {"url": url, "credential": credential}});

    // A redirect to another port (another origin) is not followed with a credential.
    let result = run(
        &engine,
        call(format!("{base}/redirect?to={other}/json"), "header"),
        json!({}),
    )
    .await;
    let error = result.error.unwrap();
    assert!(
        error.contains("not followed with credential `header`"),
        "{error}"
    );
    // The same redirect within the origin is.
    let result = run(
        &engine,
        call(format!("{base}/redirect?to={base}/json"), "header"),
        json!({}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output.unwrap()["body"]["token"], "[redacted]");

    // Without allowed_hosts, a credential goes only to a host written in the flow.
    let result = run(
        &engine,
        call("{{ input.base }}/json".into(), "header"),
        json!({"base": base}),
    )
    .await;
    assert!(result.error.unwrap().contains("comes from a template"));
    // With them, a templated host is checked against the list.
    let result = run(
        &engine,
        call("{{ input.base }}/json".into(), "pinned"),
        json!({"base": base}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let result = run(
        &engine,
        call("{{ input.base }}/json".into(), "pinned"),
        json!({"base": other}),
    )
    .await;
    assert!(result.error.unwrap().contains("not in its allowed_hosts"));

    // basic_auth goes out as base64, and comes back redacted in that form too.
    let result = run(&engine, call(format!("{base}/json"), "basic"), json!({})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(
        *LAST_AUTHORIZATION.lock().unwrap(),
        "Basic YWRhOmI0c2ljLXMzY3IzdA=="
    );
    let echoed = result.output.unwrap()["body"]["authorization"].clone();
    assert_eq!(echoed, "Basic [redacted]==");
}
