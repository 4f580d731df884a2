//! Serve your own node type from the flowcore server, with no edit of the server: a
//! [`flowcore::Registry`] with the node (`shout`, in `src/lib.rs`) goes to
//! `flowcore_server::build_state_with`. The stores are those the environment names, as for
//! `flowcore serve` (by default SQLite and files in `./.flowcore`).
//!
//! ```sh
//! FLOWCORE_ADMIN_KEY=dev-key cargo run -p flowcore-examples --example custom_node_server
//! curl -s -H 'x-api-key: dev-key' -H 'content-type: application/json' \
//!   -d '{"id": "loud", "nodes": [{"id": "s", "type": "shout", "params": {"field": "name"}}]}' \
//!   127.0.0.1:3000/api/v1/flows
//! curl -s -H 'x-api-key: dev-key' -H 'content-type: application/json' \
//!   -d '{"input": {"name": "ada"}}' 127.0.0.1:3000/api/v1/flows/loud/runs
//! ```
use flowcore_server::config::Config;

/// The allocator that counts each thread's live bytes, so that a script is stopped past its
/// memory budget (`Limits::max_node_memory_bytes`), as in the `flowcore` binary.
#[global_allocator]
static ALLOCATOR: flowcore::memory::Counting<std::alloc::System> =
    flowcore::memory::Counting(std::alloc::System);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::from_env()?;
    let stores = flowcore_server::open_stores(&config).await?;
    let registry = flowcore_examples::registry_with_shout();
    let state = flowcore_server::build_state_with(config, stores, registry)?;
    let stop = flowcore::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        }
    });
    flowcore_server::serve(state, stop).await?;
    Ok(())
}
