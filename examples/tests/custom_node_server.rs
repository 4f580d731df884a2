//! The server serves a node type it does not know, given in a `Registry` by the embedder (what
//! `examples/custom_node_server.rs` does over TCP), here in process on the memory stores.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flowcore_server::Stores;
use flowcore_server::config::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn call(app: &axum::Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::post(uri)
        .header("x-api-key", "example-key")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("a request");
    let response = app.clone().oneshot(request).await.expect("an answer");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_node_type_is_served_without_a_server_edit() {
    let dir = std::env::temp_dir().join(format!("flowcore-example-{}", std::process::id()));
    let config = Config::from_vars([
        ("FLOWCORE_ADMIN_KEY".to_owned(), "example-key".to_owned()),
        ("FLOWCORE_DATA_DIR".to_owned(), dir.display().to_string()),
    ])
    .expect("config");
    let registry = flowcore_examples::registry_with_shout();
    let state =
        flowcore_server::build_state_with(config, Stores::memory(), registry).expect("state");
    let app = flowcore_server::app::app(state);
    let flow = json!({"id": "loud", "nodes": [{"id": "s", "type": "shout", "params": {"field": "name", "times": 2}}]});
    let (status, created) = call(&app, "/api/v1/flows", flow).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, run) = call(
        &app,
        "/api/v1/flows/loud/runs",
        json!({"input": {"name": "ada"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["output"], "ADA!!");
    // A server without the node refuses the flow, naming the type.
    let plain = flowcore_server::build_state_with(
        Config::from_vars([
            ("FLOWCORE_ADMIN_KEY".to_owned(), "example-key".to_owned()),
            ("FLOWCORE_DATA_DIR".to_owned(), dir.display().to_string()),
        ])
        .expect("config"),
        Stores::memory(),
        flowcore::Registry::with_builtins(),
    )
    .expect("state");
    let flow =
        json!({"id": "loud", "nodes": [{"id": "s", "type": "shout", "params": {"field": "name"}}]});
    let (status, refused) = call(&flowcore_server::app::app(plain), "/api/v1/flows", flow).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused.to_string().contains("shout"), "{refused}");
    std::fs::remove_dir_all(&dir).ok();
}
