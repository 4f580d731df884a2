// What a stranger, a careless flow author and a hostile one can do (issue: hardening), on both
// backends. Included after `suite.rs`, whose helpers it uses.

/// Sends a request in process: its status, headers and JSON body (`Null` when not JSON).
async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let res = app.clone().oneshot(req).await.expect("response");
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, json)
}

/// A request with the admin key, a JSON body and, when given, an `X-Forwarded-For` address.
fn request(method: &str, path: &str, key: Option<&str>, body: Option<&str>, from: Option<&str>) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    if let Some(from) = from {
        req = req.header("x-forwarded-for", from);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    req.body(body.map(|b| Body::from(b.to_owned())).unwrap_or_else(Body::empty))
        .expect("request")
}

fn nested_arrays(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_a_clear_4xx_and_leave_every_read_working() {
    let (app, dir) = app(&[("MAX_PAYLOAD_SIZE_MB", "1")]).await;
    let flow = json!({"id": "hook", "nodes": [{"id": "n", "type": "noop"}],
        "triggers": [{"type": "webhook", "path": "hook", "mode": "async"}]});
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow.to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::CREATED);

    // 127 levels: under serde_json's read limit, over what a stored record can wrap.
    for body in [nested_arrays(127), format!("{{\"a\": {}}}", nested_arrays(100))] {
        let (status, _, answer) = send(&app, request("POST", "/webhooks/hook", None, Some(&body), None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_json");
        assert!(answer["error"]["message"].as_str().unwrap().contains("nested deeper than 64"));
    }
    let (status, _, answer) = send(&app, request("POST", "/webhooks/hook", None, Some(&nested_arrays(60)), None)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    for path in ["/api/v1/runs", "/api/v1/runs?status=queued", "/api/v1/runs?flow_id=hook"] {
        let (status, page) = get(&app, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
    }

    // A key twice is refused, wherever it is.
    let dup = r#"{"id": "d", "nodes": [{"id": "n", "type": "noop", "type": "set"}]}"#;
    let (status, _, answer) = send(&app, request("POST", "/api/v1/flows", Some(KEY), Some(dup), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(answer["error"]["message"].as_str().unwrap().contains("duplicate key `type`"), "{answer}");
    let (status, _, _) = send(&app, request("POST", "/webhooks/hook", None, Some(r#"{"a": 1, "a": 2}"#), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Every error is the JSON shape: the body limit (declared or streamed), a bad query, an
    // unknown method.
    let big = "x".repeat(2 * 1024 * 1024);
    let declared = Request::builder()
        .method("POST")
        .uri("/webhooks/hook")
        .header("content-type", "text/plain")
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let streamed = Request::builder()
        .method("POST")
        .uri("/api/v1/flows")
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from_stream(futures::stream::iter(
            (0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])),
        )))
        .unwrap();
    for req in [declared, streamed] {
        let (status, headers, answer) = send(&app, req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(answer["error"]["code"], "payload_too_large");
    }
    for (req, code) in [
        (request("GET", "/api/v1/runs?limit=many", Some(KEY), None, None), "invalid_request"),
        (request("PATCH", "/api/v1/flows", Some(KEY), None, None), "method_not_allowed"),
    ] {
        let (status, _, answer) = send(&app, req).await;
        assert!(status.is_client_error(), "{status}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_have_scopes_grant_only_what_they_have_and_fall_with_their_maker() {
    let (app, dir) = app(&[]).await;
    let create = |key: &str, body: Value| {
        request("POST", "/api/v1/api-keys", Some(key), Some(&body.to_string()), None)
    };
    let (status, _, maker) = send(&app, create(KEY, json!({"name": "maker", "scopes": ["read", "admin"]}))).await;
    assert_eq!(status, StatusCode::CREATED, "{maker}");
    assert_eq!(maker["scopes"], json!(["read", "admin"]));
    let maker_key = maker["key"].as_str().unwrap().to_owned();

    // A read key reads and does nothing else.
    let (_, _, reader) = send(&app, create(KEY, json!({"name": "reader", "scopes": ["read"]}))).await;
    let reader_key = reader["key"].as_str().unwrap();
    let (status, _) = call(&app, "GET", "/api/v1/flows", Some(reader_key), None).await;
    assert_eq!(status, StatusCode::OK);
    for (method, path, body) in [
        ("POST", "/api/v1/flows", Some(greet())),
        ("POST", "/api/v1/flows/greet/runs", Some(b"{}".to_vec())),
        ("POST", "/api/v1/credentials", Some(b"{}".to_vec())),
        ("DELETE", "/api/v1/api-keys/x", None),
    ] {
        let (status, answer) = call(&app, method, path, Some(reader_key), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(answer["error"]["code"], "forbidden");
    }

    // A key grants only what it has: the maker cannot mint a writer.
    let (status, _, answer) = send(&app, create(&maker_key, json!({"name": "w", "scopes": ["write"]}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, _, child) = send(&app, create(&maker_key, json!({"name": "child"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(child["scopes"], json!(["read", "admin"]), "by default, its maker's scopes");
    assert_eq!(child["parent_id"], maker["id"]);
    let child_key = child["key"].as_str().unwrap().to_owned();

    // The child cannot revoke its maker, nor a key it did not make.
    for target in [&maker["id"], &reader["id"]] {
        let path = format!("/api/v1/api-keys/{}", target.as_str().unwrap());
        let (status, _) = call(&app, "DELETE", &path, Some(&child_key), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    // Revoking the maker revokes the child.
    let path = format!("/api/v1/api-keys/{}", maker["id"].as_str().unwrap());
    let (status, _) = call(&app, "DELETE", &path, Some(&maker_key), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for key in [&maker_key, &child_key] {
        let (status, _) = call(&app, "GET", "/api/v1/flows", Some(key), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _) = call(&app, "GET", "/api/v1/flows", Some(reader_key), None).await;
    assert_eq!(status, StatusCode::OK, "an unrelated key stays");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_count_verified_keys_and_failed_attempts_per_address() {
    let (app, dir) = app(&[
        ("RATE_LIMIT_PER_MINUTE", "3"),
        ("FLOWCORE_AUTH_FAILURES_PER_MINUTE", "3"),
        ("NUMBER_OF_PROXIES", "1"),
    ])
    .await;
    let (_, _, made) = send(&app, request("POST", "/api/v1/api-keys", Some(KEY), Some(r#"{"name": "k"}"#), Some("10.0.0.1"))).await;
    let real = made["key"].as_str().unwrap().to_owned();
    // Wrong keys that share the real key's first 16 characters, each from its own address.
    let forged = format!("{}{}", &real[..16], "0".repeat(real.len() - 16));
    for i in 0..6 {
        let from = format!("10.1.0.{i}");
        let (status, _, _) = send(&app, request("GET", "/api/v1/flows", Some(&forged), None, Some(&from))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _, answer) = send(&app, request("GET", "/api/v1/flows", Some(&real), None, Some("10.2.0.1"))).await;
    assert_eq!(status, StatusCode::OK, "the real key is not limited by others' guesses: {answer}");

    // Failed attempts from one address: past the budget, 429 with Retry-After.
    for _ in 0..3 {
        let (status, _, _) = send(&app, request("GET", "/api/v1/flows", Some("wrong"), None, Some("10.3.0.1"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, answer) = send(&app, request("GET", "/api/v1/flows", Some("wrong"), None, Some("10.3.0.1"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(headers.contains_key("retry-after"));
    let (status, _, _) = send(&app, request("GET", "/api/v1/flows", Some("wrong"), None, Some("10.3.0.2"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "another address has its own budget");
    cleanup(&dir);
}

/// The hex HMAC-SHA256 of `payload` under `key`.
fn hmac_hex(key: &str, payload: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_check_tokens_and_signatures_and_pass_chosen_headers() {
    let (app, dir) = app(&[]).await;
    let credential = json!({"name": "hook-secret", "type": "bearer", "data": {"token": "whsec_0123456789"}});
    let (status, _) = call(&app, "POST", "/api/v1/credentials", Some(KEY), Some(credential.to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::CREATED);
    let flow = |id: &str, auth: Value| {
        json!({"id": id, "nodes": [{"id": "out", "type": "set", "params": {"fields": {
            "event": "{{ trigger.headers['x-github-event'] }}", "n": "{{ input.n }}"}}}],
            "triggers": [{"type": "webhook", "path": id, "auth": auth, "headers": ["X-GitHub-Event"]}]})
    };
    for (id, auth) in [
        ("token", json!({"type": "header", "name": "x-token", "credential": "hook-secret"})),
        ("github", json!({"type": "hmac_sha256", "header": "x-hub-signature-256", "prefix": "sha256=", "credential": "hook-secret"})),
        ("slack", json!({"type": "hmac_sha256", "header": "x-slack-signature", "prefix": "v0=", "credential": "hook-secret",
            "timestamp_header": "x-slack-request-timestamp", "payload": "v0:{timestamp}:{body}"})),
        ("stripe", json!({"type": "hmac_sha256", "header": "stripe-signature", "credential": "hook-secret", "timestamp_header": "stripe-signature"})),
    ] {
        let (status, answer) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow(id, auth).to_string().into_bytes())).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let (status, answer) = call(&app, "POST", "/api/v1/flows", Some(KEY),
        Some(flow("nocred", json!({"type": "header", "name": "x-token", "credential": "missing"})).to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(answer["error"]["message"].as_str().unwrap().contains("credential `missing` does not exist"));

    let body = r#"{"n": 7}"#;
    let now = chrono::Utc::now().timestamp().to_string();
    let stale = (chrono::Utc::now().timestamp() - 3600).to_string();
    let hook = |path: &str, headers: &[(&str, String)]| {
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("/webhooks/{path}"))
            .header("content-type", "application/json")
            .header("x-github-event", "push");
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        req.body(Body::from(body)).unwrap()
    };
    let good = [
        hook("token", &[("x-token", "whsec_0123456789".into())]),
        hook("github", &[("x-hub-signature-256", format!("sha256={}", hmac_hex("whsec_0123456789", body)))]),
        hook("slack", &[
            ("x-slack-request-timestamp", now.clone()),
            ("x-slack-signature", format!("v0={}", hmac_hex("whsec_0123456789", &format!("v0:{now}:{body}")))),
        ]),
        hook("stripe", &[("stripe-signature", format!("t={now},v1={}", hmac_hex("whsec_0123456789", &format!("{now}.{body}"))))]),
    ];
    for req in good {
        let path = req.uri().path().to_owned();
        let (status, _, answer) = send(&app, req).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        assert_eq!(answer["output"], json!({"event": "push", "n": 7}), "{path}");
    }
    let bad = [
        hook("token", &[]),
        hook("token", &[("x-token", "whsec_wrong".into())]),
        hook("github", &[]),
        hook("github", &[("x-hub-signature-256", format!("sha256={}", hmac_hex("other", body)))]),
        hook("github", &[("x-hub-signature-256", "sha256=zz".into())]),
        hook("slack", &[
            ("x-slack-request-timestamp", stale.clone()),
            ("x-slack-signature", format!("v0={}", hmac_hex("whsec_0123456789", &format!("v0:{stale}:{body}")))),
        ]),
        hook("stripe", &[("stripe-signature", format!("t={now},v1={}", hmac_hex("whsec_0123456789", body)))]),
    ];
    for req in bad {
        let path = req.uri().path().to_owned();
        let (status, _, answer) = send(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "unauthorized");
        assert!(!answer.to_string().contains("whsec"), "no secret in the answer");
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_path_belongs_to_one_flow() {
    let (app, dir) = app(&[]).await;
    let flow = |id: &str, method: &str| {
        json!({"id": id, "nodes": [{"id": "n", "type": "noop"}],
            "triggers": [{"type": "webhook", "path": "shared/path", "method": method}]})
        .to_string()
        .into_bytes()
    };
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow("first", "POST"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, answer) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow("second", "POST"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("flow `first`"));
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow("second", "GET"))).await;
    assert_eq!(status, StatusCode::CREATED, "another method is another hook");
    let (status, _) = call(&app, "PUT", "/api/v1/flows/first", Some(KEY), Some(flow("first", "POST"))).await;
    assert_eq!(status, StatusCode::OK, "a flow keeps its own path");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_slots_runs_queue_and_past_the_queue_they_are_refused() {
    let (app, state, dir) =
        app_with_state(&[("WORKER_CONCURRENCY", "1"), ("FLOWCORE_MAX_QUEUED_RUNS", "2")]).await;
    // The worker loop, which takes the queued runs when the slot frees.
    let background = flowcore_server::background::start(&state);
    let flow = json!({"id": "slow", "nodes": [{"id": "d", "type": "delay", "params": {"ms": 600}}]});
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(flow.to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut calls = Vec::new();
    for _ in 0..6 {
        let app = app.clone();
        calls.push(tokio::spawn(async move {
            send(&app, request("POST", "/api/v1/flows/slow/runs", Some(KEY), Some("{}"), None)).await
        }));
        // In order: the first takes the slot, the next two the queue.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let mut done = 0;
    let mut refused = 0;
    for call in calls {
        let (status, headers, answer) = call.await.unwrap();
        match status {
            StatusCode::OK => done += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer["error"]["code"], "overloaded");
                assert_eq!(headers["retry-after"], "1");
                refused += 1;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    assert_eq!((done, refused), (3, 3), "one slot, two queued, the rest refused");
    let (status, _) = call(&app, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    background.stop(std::time::Duration::from_secs(1)).await;
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_runs_events_end_for_a_client_that_resumes() {
    let (app, dir) = app(&[]).await;
    let (status, _) = call(&app, "POST", "/api/v1/flows", Some(KEY), Some(greet())).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, run) = call(&app, "POST", "/api/v1/flows/greet/runs", Some(KEY), Some(br#"{"input": {"name": "a", "n": 1}}"#.to_vec())).await;
    let path = format!("/api/v1/runs/{}/events", run["run_id"].as_str().unwrap());
    let req = || Request::builder().uri(path.as_str()).header("x-api-key", KEY);
    let res = app.clone().oneshot(req().body(Body::empty()).unwrap()).await.unwrap();
    let all = text_of(res).await;
    let last_id = all.lines().filter_map(|l| l.strip_prefix("id: ")).next_back().expect("events").to_owned();
    // What every reconnecting EventSource sends: the stream must end, not wait for ever.
    let resumed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let res = app.clone().oneshot(req().header("last-event-id", last_id).body(Body::empty()).unwrap()).await.unwrap();
        bytes_of(res).await
    })
    .await
    .expect("the stream of a finished run ends");
    assert!(!String::from_utf8_lossy(&resumed).contains("event: run_finished"), "nothing is sent twice");
    cleanup(&dir);
}
