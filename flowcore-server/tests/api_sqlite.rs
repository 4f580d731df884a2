//! The API suite (`common/suite.rs`) on SQLite, the embedded default.

const POSTGRES: bool = false;

include!("common/suite.rs");
include!("common/hardening.rs");
