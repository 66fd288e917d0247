//! Kiln's server: the state store over HTTP, so that processes on many machines record
//! into one database and read it through one API.
//!
//! This first part serves the store contract itself (`kiln_store::Store`): batched writes
//! with one outcome each, reads, processes and crash detection, under `/api/v1`. The
//! `kiln-store-http` client is a `Store` over it and passes the same conformance suite as
//! the databases do. Errors are RFC 9457 problem details naming the cause.
//!
//! The same port serves the web UI (`/runs`, a flow run's graph and timeline, a task run's
//! result previewed), rendered on the server from code and assets compiled into it.
//!
//! Once the database holds an API token (`kiln server token create`), every endpoint but
//! `/api/health` requires `Authorization: Bearer <secret>`; read-only tokens may only read.
//!
//! ```no_run
//! # async fn run(store: std::sync::Arc<dyn kiln_store::Store>) -> Result<(), Box<dyn std::error::Error>> {
//! let settings = kiln::settings::Settings::load(std::path::Path::new("/srv/kiln"))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4200").await?;
//! kiln_server::Server::new(store)
//!     .with_results(settings)
//!     .serve(listener, std::future::pending())
//!     .await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod api;
mod auth;
mod body;
mod metrics;
mod openapi;
mod problem;
mod results;
mod storages;
mod ui;
mod work;

use std::future::Future;
use std::sync::Arc;

use kiln_store::Store;

pub use problem::Problem;
use results::Results;
pub use results::{CONVERT_LIMIT, Links, ResultInfo};

/// The largest request body accepted (a batch of writes): 32 MiB.
pub const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The API over a store, with the result storages it reads values from.
#[derive(Debug)]
pub struct Server {
    store: Arc<dyn Store>,
    results: Option<Arc<Results>>,
}

impl Server {
    /// The API over `store`; results are not readable until [`with_results`](Self::with_results).
    pub fn new(store: Arc<dyn Store>) -> Server {
        Server { store, results: None }
    }

    /// Reads persisted results through the storages `settings` defines (the server home's
    /// `kiln.toml`).
    pub fn with_results(mut self, settings: kiln::settings::Settings) -> Server {
        self.results = Some(Arc::new(Results::new(settings)));
        self
    }

    /// The API's routes.
    pub fn router(self) -> axum::Router {
        api::router(api::App {
            store: self.store,
            results: self.results,
            metrics: Arc::new(metrics::Metrics::new()),
        })
    }

    /// Serves the API on `listener` until `shutdown` completes, then drains in-flight requests.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let scheduler = tokio::spawn(work::scheduler(self.store.clone()));
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        scheduler.abort();
        served
    }
}
