//! Upstreams: where a request goes and on which connection.

pub mod pool;

pub use crate::http1::client::{RequestBody, SendError, UpstreamResponse};
pub use pool::Pool;
