//! The API suite (`common/suite.rs`) and the process tests (`common/processes.rs`) on SQLite,
//! the embedded default.

const BACKEND: Backend = Backend::Sqlite;

include!("common/suite.rs");
include!("common/hardening.rs");
include!("common/processes.rs");
include!("common/http.rs");
