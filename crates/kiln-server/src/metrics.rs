//! Prometheus metrics (`GET /metrics`, OpenMetrics text): requests and their latencies by
//! route, runs by state, and the writes waiting for the database.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Problem;
use crate::api::App;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    kind: String,
    state: String,
}

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    runs: Family<StateLabels, Gauge>,
    pending: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kiln");
        let requests = Family::<RequestLabels, Counter>::default();
        // 100 µs to ~13 s.
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-4, 4.0, 9))
        });
        let runs = Family::<StateLabels, Gauge>::default();
        let pending = Gauge::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer, by method and route",
            latency.clone(),
        );
        registry.register("runs", "Runs in the state database, by kind and state", runs.clone());
        registry.register(
            "store_pending_writes",
            "Writes accepted and not yet applied to the state database (the write queue's depth)",
            pending.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            runs,
            pending,
        }
    }
}

/// Counts and times every request by its route (the template, not the ids in it).
pub(crate) async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    metrics
        .latency
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels { method, route, status })
        .inc();
    response
}

/// The metrics, in Prometheus' text format (OpenMetrics).
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Requests, latencies, runs by state, write queue depth",
        content((String = "application/openmetrics-text"))), crate::openapi::ReadErrors))]
pub(crate) async fn metrics(State(app): State<App>) -> Result<Response, Problem> {
    let metrics = &app.metrics;
    let counts = app.store.run_counts().await?;
    metrics.runs.clear();
    for c in counts {
        let kind = match c.kind {
            kiln_store::model::RunKind::Flow => "flow",
            kiln_store::model::RunKind::Task => "task",
        };
        metrics
            .runs
            .get_or_create(&StateLabels {
                kind: kind.into(),
                state: c.state.as_str().into(),
            })
            .set(c.count as i64);
    }
    metrics.pending.set(app.store.pending_writes() as i64);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry)
        .map_err(|e| Problem::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}
