//! Runs the greet flow in a loop for profiling: `cargo run --release -p flowcore-examples --example profile_greet -- 200000`.
use flowcore::{Engine, FlowDef};
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let engine = Engine::new();
    let flow = FlowDef::from_json(include_str!("flows/greet.json")).expect("flow");
    let plan = engine.compile(&flow).expect("compiles");
    let started = std::time::Instant::now();
    // Inside a spawned task, as in a server: `block_on`'s own task pays for a driver wake-up
    // (an eventfd write) on every self-wake, which would distort the profile.
    tokio::spawn(async move {
        for i in 0..runs {
            let result = engine.run(&plan, json!({"name": "ada", "n": i % 10})).await;
            assert_eq!(result.status, flowcore::RunStatus::Succeeded);
        }
    })
    .await
    .expect("the loop task");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{runs} runs in {secs:.3} s: {:.0} runs/s on one thread",
        runs as f64 / secs
    );
}
