//! The API suite (`common/suite.rs`) on the memory stores (`Stores::memory()`): the server
//! composed on the ports, with no database.

const BACKEND: Backend = Backend::Memory;

include!("common/suite.rs");
include!("common/hardening.rs");
