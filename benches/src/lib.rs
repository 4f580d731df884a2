//! Benchmarks live beside this file as `[[bench]]` targets; this library holds what they share.

/// The runtime the benchmarks run on: two worker threads, as on the machine the figures of
/// BENCHMARKS.md come from.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
