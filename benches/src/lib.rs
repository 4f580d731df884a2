//! Benchmarks live beside this file as `[[bench]]` targets.
