//! Durable execution over the in-memory run store.

use std::sync::Arc;

use flowcore::ports::memory::MemoryRunStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_runs_on_the_memory_store() {
    flowcore::testkit::durable_runs(Arc::new(MemoryRunStore::new())).await;
}
