//! The API suite (`common/suite.rs`) and the process tests (`common/processes.rs`) on
//! PostgreSQL: a fresh database per test on the machine's server (127.0.0.1:5432, or
//! FLOWCORE_TEST_POSTGRES_URL). PostgreSQL missing is a failure.

const BACKEND: Backend = Backend::Postgres;

include!("common/suite.rs");
include!("common/hardening.rs");
include!("common/processes.rs");
include!("common/http.rs");
