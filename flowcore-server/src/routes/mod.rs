//! Route handlers, one module per resource.

pub mod api_keys;
pub mod credentials;
pub mod events;
pub mod files;
pub mod flows;
pub mod runs;
pub mod usage;
pub mod webhooks;
