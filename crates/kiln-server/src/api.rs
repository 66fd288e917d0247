//! The routes: the store contract under `/api/v1`, and `/api/health`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use kiln_store::model::*;
use kiln_store::{Outcome, Report, Store};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{BODY_LIMIT, Problem};

type Shared = Arc<dyn Store>;

/// What every handler can reach: the store, and the result storages.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) results: Option<Arc<crate::Results>>,
}

impl axum::extract::FromRef<App> for Shared {
    fn from_ref(app: &App) -> Shared {
        app.store.clone()
    }
}
type Json<T> = axum::Json<T>;
type Reply<T> = Result<Json<T>, Problem>;

/// The API's routes over `app`.
pub(crate) fn router(app: App) -> Router {
    let auth = Arc::new(crate::auth::Auth::new(app.store.clone()));
    Router::new()
        .route("/api/health", get(health))
        .route("/api/version", get(health))
        .route("/api/v1/writes", post(writes))
        .route("/api/v1/flow_runs", get(flow_runs))
        .route("/api/v1/flow_runs/{id}", get(flow_run))
        .route("/api/v1/flow_runs/{id}/subflows", get(subflow_runs))
        .route("/api/v1/flow_runs/{id}/task_runs", get(task_runs))
        .route("/api/v1/flow_runs/{id}/edges", get(edges))
        .route("/api/v1/task_runs/{id}", get(task_run))
        .route("/api/v1/runs/{id}/states", get(states))
        .route("/api/v1/runs/{id}/logs", get(logs))
        .route("/api/v1/runs/resolve/{text}", get(resolve))
        .route("/api/v1/runs/{id}/result", get(crate::results::info))
        .route("/api/v1/runs/{id}/result/content", get(crate::results::content))
        .route("/api/v1/runs/{id}/result/thumbnail", get(crate::results::thumbnail))
        .route("/api/v1/processes", get(processes))
        .route("/api/v1/processes/crash_orphans", post(crash_orphans))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such endpoint; the API is under /api/v1") })
        .layer(axum::middleware::from_fn_with_state(auth, crate::auth::check))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(too_large))
        .with_state(app)
}

/// A body over the limit is refused by axum with plain text: say which limit, as a problem.
async fn too_large(response: axum::response::Response) -> axum::response::Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    use axum::response::IntoResponse;
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is larger than the server's limit of {} MiB (kiln_server::BODY_LIMIT); send the \
             writes in smaller batches",
            BODY_LIMIT >> 20
        ),
    )
    .into_response()
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

async fn health() -> Json<Health> {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Where the outcome of the n-th write of a request goes.
struct Slot {
    outcomes: Arc<Mutex<Vec<Option<WireOutcome>>>>,
    index: usize,
}

impl Report for Slot {
    fn report(&self, _write: &Write, outcome: Outcome) {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner())[self.index] = Some(WireOutcome::from(&outcome));
    }
}

fn bad_body(e: JsonRejection) -> Problem {
    Problem::new(
        e.status(),
        format!("the request body is not a valid batch of writes: {}", e.body_text()),
    )
}

/// Applies the writes and answers once each has its outcome (they are durable, or failed).
async fn writes(State(store): State<Shared>, body: Result<Json<WriteBatch>, JsonRejection>) -> Reply<OutcomeBatch> {
    let axum::Json(WriteBatch { writes }) = body.map_err(bad_body)?;
    if writes
        .iter()
        .any(|w| matches!(w, Write::PutToken(_) | Write::RevokeToken { .. }))
    {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "API tokens cannot be created or revoked through the API; use `kiln server token` on the server",
        ));
    }
    let outcomes = Arc::new(Mutex::new(vec![None; writes.len()]));
    for (index, write) in writes.into_iter().enumerate() {
        let slot = Slot {
            outcomes: outcomes.clone(),
            index,
        };
        store.send(write, Some(Arc::new(slot)))?;
    }
    store.flush().await?;
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
    let outcomes = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(WireOutcome::Failed {
                message: "the store gave this write no outcome".into(),
                retryable: true,
            })
        })
        .collect();
    Ok(axum::Json(OutcomeBatch { outcomes }))
}

pub(crate) fn id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, Problem> {
    let Path(text) = path.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    Uuid::parse_str(&text).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("'{text}' is not a run id ({e}); resolve a short id with /api/v1/runs/resolve/{{text}}"),
        )
    })
}

fn found<T>(value: Option<T>, what: &str, id: Uuid) -> Reply<T> {
    value
        .map(axum::Json)
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, format!("no {what} with id {id}")))
}

/// `GET /api/v1/flow_runs`'s query: a [`RunFilter`] with states as a comma-separated list.
#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    state: Option<String>,
    flow: Option<String>,
    tag: Option<String>,
    since: Option<Micros>,
    until: Option<Micros>,
    after: Option<Uuid>,
}

async fn flow_runs(State(store): State<Shared>, q: Result<Query<ListQuery>, QueryRejection>) -> Reply<FlowRunPage> {
    let Query(q) = q.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit > 10_000 {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "limit is at most 10000"));
    }
    let states = q
        .state
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim().parse::<kiln_store::state::StateType>().map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown state '{s}'; states: Scheduled, Pending, Running, AwaitingRetry, Completed, Cached, Failed, Crashed, Cancelled, TimedOut, RolledBack"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = RunFilter {
        states,
        flow: q.flow,
        tag: q.tag,
        since: q.since,
        until: q.until,
        after: q.after,
        limit,
    };
    Ok(axum::Json(store.list_flow_runs(&filter).await?))
}

async fn flow_run(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<FlowRun> {
    let id = id(path)?;
    found(store.flow_run(id).await?, "flow run", id)
}

async fn subflow_runs(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<FlowRun>> {
    Ok(axum::Json(store.subflow_runs(id(path)?).await?))
}

async fn task_runs(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<TaskRun>> {
    Ok(axum::Json(store.task_runs(id(path)?).await?))
}

async fn edges(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<Edge>> {
    Ok(axum::Json(store.edges(id(path)?).await?))
}

async fn task_run(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<TaskRun> {
    let id = id(path)?;
    found(store.task_run(id).await?, "task run", id)
}

async fn states(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<StateRecord>> {
    Ok(axum::Json(store.states(id(path)?).await?))
}

async fn logs(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<LogRecord>> {
    Ok(axum::Json(store.logs(id(path)?).await?))
}

async fn resolve(State(store): State<Shared>, Path(text): Path<String>) -> Reply<RunRef> {
    Ok(axum::Json(store.resolve(&text).await?))
}

#[derive(Deserialize)]
struct Since {
    since: Option<Micros>,
}

async fn processes(State(store): State<Shared>, q: Result<Query<Since>, QueryRejection>) -> Reply<Vec<Process>> {
    let Query(q) = q.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(axum::Json(store.processes(q.since.unwrap_or(0)).await?))
}

async fn crash_orphans(
    State(store): State<Shared>,
    body: Result<Json<CrashOrphans>, JsonRejection>,
) -> Reply<Vec<(RunKind, Uuid)>> {
    let axum::Json(req) = body.map_err(|e| Problem::new(e.status(), e.body_text()))?;
    Ok(axum::Json(store.crash_orphans(&req.dead, req.stale_before).await?))
}
