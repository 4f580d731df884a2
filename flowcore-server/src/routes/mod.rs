//! Route handlers, one module per resource.

pub mod events;
pub mod flows;
pub mod runs;
pub mod webhooks;
