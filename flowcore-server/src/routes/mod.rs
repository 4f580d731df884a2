//! Route handlers, one module per resource.

pub mod flows;
pub mod runs;
