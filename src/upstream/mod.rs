//! Upstreams: which route serves a request's model, which endpoint of it takes the request
//! (balance, health), and on which connection.

pub mod balance;
pub mod dns;
pub mod endpoint;
pub mod health;
pub mod pool;
pub mod routes;

pub use crate::http1::client::{RequestBody, SendError};
pub use endpoint::{Endpoint, UpstreamResponse};
pub use pool::Pool;
pub use routes::{Failed, Route, Routes};
