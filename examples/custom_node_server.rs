//! Serve your own node type from the flowcore server, with no edit of the server: a
//! [`flowcore::Registry`] with the node (`shout`, in `src/lib.rs`) goes to
//! `flowcore_server::build_state_with`. The stores are those the environment names, as for
//! `flowcore serve` (by default SQLite and files in `./.flowcore`).
//!
//! ```sh
//! FLOWCORE_ADMIN_KEY=dev-key cargo run -p flowcore-examples --example custom_node_server
//! curl -s -H 'x-api-key: dev-key' -H 'content-type: application/json' \
//!   -d '{"id": "loud", "nodes": [{"id": "s", "type": "shout", "params": {"field": "name"}}]}' \
//!   localhost:8080/api/v1/flows
//! curl -s -H 'x-api-key: dev-key' -H 'content-type: application/json' \
//!   -d '{"input": {"name": "ada"}}' localhost:8080/api/v1/flows/loud/runs
//! ```
use flowcore_server::config::Config;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
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
