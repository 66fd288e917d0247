//! Kiln's server: the state store over HTTP, so that processes on many machines record
//! into one database and read it through one API.
//!
//! This first part serves the store contract itself (`kiln_store::Store`): batched writes
//! with one outcome each, reads, processes and crash detection, under `/api/v1`. The
//! `kiln-store-http` client is a `Store` over it and passes the same conformance suite as
//! the databases do. Errors are RFC 9457 problem details naming the cause.
//!
//! Once the database holds an API token (`kiln server token create`), every endpoint but
//! `/api/health` requires `Authorization: Bearer <secret>`; read-only tokens may only read.
//!
//! ```no_run
//! # async fn run(store: std::sync::Arc<dyn kiln_store::Store>) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4200").await?;
//! kiln_server::serve(listener, store, std::future::pending()).await
//! # }
//! ```
#![warn(missing_docs)]

mod api;
mod auth;
mod problem;

use std::future::Future;
use std::sync::Arc;

use kiln_store::Store;

pub use api::router;
pub use problem::Problem;

/// The largest request body accepted (a batch of writes): 32 MiB.
pub const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// Serves the API on `listener` until `shutdown` completes, then drains in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(store))
        .with_graceful_shutdown(shutdown)
        .await
}
