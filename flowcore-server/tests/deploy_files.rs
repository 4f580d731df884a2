//! The files of `deploy/` checked by what runs here (Docker does not): every variable they set
//! is one the server reads, the shared settings file is accepted by the configuration, and the
//! Grafana dashboard asks only for metrics and labels that `/metrics` serves. (The processes of
//! the topology are started through `deploy/local/run.sh` by the fault suite, `tests/faults.rs`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flowcore_server::config::Config;
use serde_json::Value;
use tower::ServiceExt;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// The variables other images of the topology read (PostgreSQL, MinIO), not flowcore.
const OTHER_IMAGES: &[&str] = &[
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MINIO_USER",
    "MINIO_PASSWORD",
];

/// The names a file sets: `NAME=`, `NAME:` or `name: NAME` at the start of a line (after
/// indentation and list dashes), upper case with an underscore.
fn variables_set(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut rest = line.trim_start();
        if rest.starts_with('#') {
            continue;
        }
        for prefix in ["- ", "{", "name: ", "ENV ", "    "] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest).trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let next = rest[name.len()..].chars().next();
        if name.contains('_') && name.len() > 3 && matches!(next, Some(':' | '=' | ',' | '}')) {
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_variable_in_deploy_is_one_the_server_reads() {
    // RUST_LOG is read by the log filter, not by the configuration.
    let variables = Config::variables();
    let known: BTreeSet<&str> = variables
        .iter()
        .map(|v| v.name.as_str())
        .chain(["RUST_LOG"])
        .collect();
    let files = [
        "flowcore.env",
        "docker-compose.yml",
        "Dockerfile",
        "k8s/api.yaml",
        "k8s/worker.yaml",
        "k8s/migrate-job.yaml",
        "k8s/secret.example.yaml",
    ];
    let mut seen = BTreeSet::new();
    for file in files {
        for name in variables_set(&read(file)) {
            if OTHER_IMAGES.contains(&name.as_str()) {
                continue;
            }
            assert!(
                known.contains(name.as_str()),
                "deploy/{file} sets {name}, which flowcore does not read"
            );
            seen.insert(name);
        }
    }
    for needed in [
        "DATABASE_URL",
        "REDIS_URL",
        "FLOWCORE_ROLE",
        "FLOWCORE_ENCRYPTION_KEY",
        "S3_ENDPOINT_URL",
        "NUMBER_OF_PROXIES",
        "WORKER_CONCURRENCY",
    ] {
        assert!(seen.contains(needed), "no deploy file sets {needed}");
    }
}

#[test]
fn the_shared_settings_file_is_accepted_by_the_configuration() {
    let vars: Vec<(String, String)> = read("flowcore.env")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(vars.len() >= 10, "the file holds the shared settings");
    let config = Config::from_vars(vars).expect("deploy/flowcore.env is a valid configuration");
    assert_eq!(config.number_of_proxies, 1, "one proxy in front");
    // Every process's setting, as the docs page explains them.
    let docs = std::fs::read_to_string(deploy("../docs/deployment.md")).expect("docs page");
    for v in Config::variables() {
        let name = &v.name;
        // The table gives the default the server has.
        if let Some(default) = &v.default
            && let Some(row) = docs
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
        {
            let cell = row.split('|').nth(2).unwrap_or_default();
            assert!(
                cell.contains(default.as_str()),
                "docs/deployment.md gives {name} the default `{cell}`, the server `{default}`"
            );
        }
        assert!(
            docs.contains(name.as_str()),
            "docs/deployment.md does not explain {name}"
        );
    }
}

/// Metric names and label names used by the dashboard's queries.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&read("grafana/flowcore-dashboard.json")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

fn identifiers(expr: &str) -> impl Iterator<Item = &str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("flowcore_") || w.starts_with("process_"))
}

/// The label names of `by (...)` clauses and `{name="..."}` matchers.
fn labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in expr.split("by (").skip(1) {
        if let Some((inside, _)) = part.split_once(')') {
            out.extend(inside.split(',').map(|l| l.trim().to_owned()));
        }
    }
    for part in expr.split('{').skip(1) {
        if let Some((inside, _)) = part.split_once('}') {
            out.extend(
                inside
                    .split(',')
                    .filter_map(|m| m.split_once('=').map(|(l, _)| l.trim().to_owned())),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_metrics_that_exist() {
    let dir = std::env::temp_dir().join(format!("flowcore-deploy-{}", fastrand::u64(..)));
    let config = Config::from_vars([
        ("FLOWCORE_DATA_DIR".to_owned(), dir.display().to_string()),
        ("FLOWCORE_ADMIN_KEY".to_owned(), "k".to_owned()),
    ])
    .expect("config");
    let state = flowcore_server::build_state(config).await.expect("state");
    let app = flowcore_server::app::app(state);
    let send = |method: &str, uri: &str, body: &'static str| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-api-key", "k")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        app.clone().oneshot(request)
    };
    // Some traffic, so that every family has a series.
    let flow = r#"{"id": "m", "nodes": [{"id": "a", "type": "noop"}]}"#;
    let res = send("POST", "/api/v1/flows", flow).await.expect("answer");
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = send("POST", "/api/v1/flows/m/runs", "{}")
        .await
        .expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    let res = send("GET", "/metrics", "").await.expect("answer");
    let text = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body")
            .to_vec(),
    )
    .expect("utf-8");
    let mut samples = BTreeSet::new();
    let mut label_names: BTreeSet<String> = ["le", "instance", "job"].map(String::from).into();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if let Some((_, rest)) = line.split_once('{')
            && let Some((inside, _)) = rest.split_once('}')
        {
            label_names.extend(
                inside
                    .split(',')
                    .filter_map(|p| p.split_once('=').map(|(l, _)| l.to_owned())),
            );
        }
        samples.insert(name);
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 8, "the dashboard covers the metrics");
    for expr in &queries {
        for metric in identifiers(expr) {
            assert!(
                samples.contains(metric),
                "the dashboard asks for {metric}, which /metrics does not serve: {samples:?}"
            );
        }
        for label in labels(expr) {
            assert!(
                label_names.contains(&label),
                "the dashboard groups by `{label}`, a label no metric has"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
