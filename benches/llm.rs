//! What `llm_chat` costs per streamed token: a run of the node over a stream of 2,000 tokens
//! from the stand-in OpenAI server on loopback (each token parsed and sent as an event to a
//! channel, as the server's event bus sink does), against reading the same stream raw with
//! reqwest. Per-token overhead = (node - raw) / 2,000.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowcore::testkit::openai::{FakeLlm, Reply};
use flowcore::{Engine, FlowDef, RunEvent, RunOptions, RunStatus};
use serde_json::json;

const TOKENS: usize = 2_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn tokens(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(FakeLlm::start(|_| {
        let parts: Vec<String> = (0..TOKENS).map(|i| format!("tok{i} ")).collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Reply::text("bench", &parts)
    }));
    let url = format!("{}/chat/completions", server.base_url());
    let body = json!({"model": "bench", "stream": true,
        "messages": [{"role": "user", "content": "go"}]});
    let engine = Engine::builder()
        .http_guard(flowcore::net::Guard::parse(None, Some("127.0.0.1/32")).expect("guard"))
        .build();
    let flow = FlowDef::from_value(
        json!({"nodes": [{"id": "ask", "type": "llm_chat", "params": {
        "base_url": server.base_url(), "model": "bench",
        "messages": [{"role": "user", "content": "go"}]}}]}),
    )
    .expect("flow");
    let plan = engine.compile(&flow).expect("compiles");
    // The client the node uses (guarded, no proxy), for a like-for-like read.
    let client = engine.http_client().expect("client");

    let mut g = c.benchmark_group("llm_stream");
    g.throughput(Throughput::Elements(TOKENS as u64));
    g.bench_function("raw_reqwest_2000_tokens", |b| {
        b.to_async(&rt).iter(|| async {
            let mut response = client.post(&url).json(&body).send().await.expect("send");
            let mut bytes = 0usize;
            while let Some(chunk) = response.chunk().await.expect("chunk") {
                bytes += chunk.len();
            }
            black_box(bytes)
        });
    });
    g.bench_function("llm_chat_node_2000_tokens", |b| {
        b.to_async(&rt).iter(|| async {
            // Events go to a channel drained by another task, as the server's bus sink does.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RunEvent>();
            let drain = tokio::spawn(async move {
                let mut n = 0usize;
                while let Some(event) = rx.recv().await {
                    n += usize::from(matches!(event, RunEvent::Token { .. }));
                }
                n
            });
            let sink: Arc<dyn flowcore::EventSink> = Arc::new(move |e: &RunEvent| {
                let _ = tx.send(e.clone());
            });
            let options = RunOptions {
                events: Some(sink),
                ..RunOptions::default()
            };
            let result = engine.execute(&plan, json!({}), options).await;
            assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
            assert_eq!(drain.await.expect("drain"), TOKENS);
        });
    });
    g.bench_function("llm_chat_node_2000_tokens_counted_in_place", |b| {
        b.to_async(&rt).iter(|| async {
            // Events counted where they are made: the node's parse and event alone.
            let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = count.clone();
            let sink: Arc<dyn flowcore::EventSink> = Arc::new(move |e: &RunEvent| {
                if matches!(e, RunEvent::Token { .. }) {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            let options = RunOptions {
                events: Some(sink),
                ..RunOptions::default()
            };
            let result = engine.execute(&plan, json!({}), options).await;
            assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
            assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), TOKENS);
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(5));
    targets = tokens
}
criterion_main!(benches);
