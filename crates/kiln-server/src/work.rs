//! Work pools over the API: deployments and their runs, claims for workers that reach the
//! database through this server, cancellation, and the scheduler.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use kiln_store::Store;
use kiln_store::limit::{LimitUsage, SlotRequest, Slots};
use kiln_store::state::StateType;
use kiln_store::work::{Claim, ClaimRequest, Deployment, Holder, HolderLookup, QueuedRun, WorkPool};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::Problem;
use crate::api::{Shared, id};
use crate::body::JsonBody;
use crate::openapi::{ReadErrors, WriteErrors};

type Reply<T> = Result<axum::Json<T>, Problem>;

/// The longest a claim request waits for work here (a worker asks again after; its own
/// requests wait 5 s).
const MAX_CLAIM_WAIT_MS: u64 = 5_000;

/// How often the server creates scheduled runs and looks for dead processes.
pub(crate) const SCHEDULER_TICK: Duration = Duration::from_secs(5);

impl From<kiln::Error> for Problem {
    fn from(e: kiln::Error) -> Problem {
        let status = match &e {
            kiln::Error::NotFound(_) => StatusCode::NOT_FOUND,
            kiln::Error::InvalidParameters(_) => StatusCode::UNPROCESSABLE_ENTITY,
            kiln::Error::Store(s) => {
                return Problem::from(kiln_store::StoreError::backend(s.to_string(), s.is_retryable()));
            }
            kiln::Error::Setup(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Problem::new(status, e.to_string())
    }
}

/// Claims queued runs for a worker process (waits up to `wait_ms`, at most 5 s, when none is claimable).
#[utoipa::path(post, path = "/api/v1/work/claim", tag = "work", request_body = ClaimRequest,
    responses((status = 200, description = "The runs claimed (none: nothing was claimable in time)", body = Vec<Claim>),
        (status = 409, description = "The claiming process has sent no heartbeat", body = Problem, content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn claim(State(store): State<Shared>, JsonBody(mut req): JsonBody<ClaimRequest>) -> Reply<Vec<Claim>> {
    if req.pools.is_empty() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name at least one pool to claim from",
        ));
    }
    if req.wait_ms > 60_000 || req.limit > 1000 {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wait_ms is at most 60000 and limit at most 1000",
        ));
    }
    // No pool, target or host name holds a NUL (the databases cannot store one): such a
    // name matches nothing.
    let named = |v: &mut Vec<String>| {
        let before = v.len();
        v.retain(|p| !p.contains('\0'));
        before > 0 && v.is_empty()
    };
    if named(&mut req.pools) || named(&mut req.targets) {
        return Ok(axum::Json(Vec::new()));
    }
    if req.host.as_deref().is_some_and(|h| h.contains('\0')) {
        req.host = None;
    }
    req.wait_ms = req.wait_ms.min(MAX_CLAIM_WAIT_MS);
    req.limit = req.limit.clamp(1, 1000);
    Ok(axum::Json(store.claim(&req).await?))
}

/// Which queued runs to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct QueueQuery {
    /// Only this pool's.
    pool: Option<String>,
    /// At most this many (default 100, at most 10,000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
}

/// The runs queued in work pools that have not finished, oldest scheduled first.
#[utoipa::path(get, path = "/api/v1/work/queue", tag = "work", params(QueueQuery),
    responses((status = 200, description = "Queued runs", body = Vec<QueuedRun>), ReadErrors))]
pub(crate) async fn queue(
    State(store): State<Shared>,
    query: Result<Query<QueueQuery>, QueryRejection>,
) -> Reply<Vec<QueuedRun>> {
    let Query(q) = query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "limit must be from 1 to 10000"));
    }
    let limit = limit as usize;
    if q.pool.as_deref().is_some_and(|p| p.contains('\0')) {
        return Ok(axum::Json(Vec::new()));
    }
    Ok(axum::Json(store.queued_runs(q.pool.as_deref(), limit).await?))
}

/// Who holds each of these queued runs (at most 1000 ids), under which fencing token; runs
/// not queued are left out: how a worker learns that a claim it still runs was taken over.
#[utoipa::path(post, path = "/api/v1/work/holders", tag = "work", request_body = HolderLookup,
    responses((status = 200, description = "The holders of the queued runs among the ids", body = Vec<Holder>), WriteErrors))]
pub(crate) async fn holders(
    State(store): State<Shared>,
    JsonBody(lookup): JsonBody<HolderLookup>,
) -> Reply<Vec<Holder>> {
    crate::api::at_most_one_lookup(&lookup.ids)?;
    Ok(axum::Json(store.holders(&lookup.ids).await?))
}

/// The work pools that have a concurrency limit.
#[utoipa::path(get, path = "/api/v1/work_pools", tag = "work",
    responses((status = 200, description = "Work pools", body = Vec<WorkPool>), ReadErrors))]
pub(crate) async fn work_pools(State(store): State<Shared>) -> Reply<Vec<WorkPool>> {
    Ok(axum::Json(store.work_pools().await?))
}

/// Every tag's concurrency limit, with the task runs holding its slots.
#[utoipa::path(get, path = "/api/v1/limits", tag = "work",
    responses((status = 200, description = "Concurrency limits, by tag", body = Vec<LimitUsage>), ReadErrors))]
pub(crate) async fn limits(State(store): State<Shared>) -> Reply<Vec<LimitUsage>> {
    Ok(axum::Json(store.limits().await?))
}

/// Grants a task run one slot of each of its limited tags, or none (`busy` names a full tag:
/// ask again later).
#[utoipa::path(post, path = "/api/v1/limits/slots", tag = "work", request_body = SlotRequest,
    responses((status = 200, description = "Granted, or the tag whose slots are all taken", body = Slots),
        (status = 404, description = "No task run with this id", body = Problem, content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn acquire_slots(
    State(store): State<Shared>,
    JsonBody(mut req): JsonBody<SlotRequest>,
) -> Reply<Slots> {
    // A tag holding NUL has no limit (the databases cannot store one).
    req.tags.retain(|t| !t.contains('\0'));
    Ok(axum::Json(store.acquire_slots(&req).await?))
}

/// The deployments serving processes registered.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments",
    responses((status = 200, description = "Deployments, by name", body = Vec<Deployment>), ReadErrors))]
pub(crate) async fn deployments(State(store): State<Shared>) -> Reply<Vec<Deployment>> {
    Ok(axum::Json(store.deployments().await?))
}

/// One deployment, with its parameter schema.
#[utoipa::path(get, path = "/api/v1/deployments/{name}", tag = "deployments",
    params(("name" = String, Path, description = "The deployment's name")),
    responses((status = 200, description = "The deployment", body = Deployment),
        (status = 404, description = "No such deployment", body = Problem, content_type = "application/problem+json"),
        ReadErrors))]
pub(crate) async fn deployment(
    State(store): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Reply<Deployment> {
    let Path(name) = path.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    store
        .deployments()
        .await?
        .into_iter()
        .find(|d| d.name == name)
        .map(axum::Json)
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, format!("no deployment named '{name}'")))
}

/// A run to create for a deployment.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewRun {
    /// Parameters over the deployment's defaults (a JSON object).
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: serde_json::Map<String, serde_json::Value>,
    /// Tags besides the deployment's.
    #[serde(default)]
    tags: Vec<String>,
    /// Not before this time (microseconds since the Unix epoch; default: now).
    #[serde(default)]
    scheduled: Option<i64>,
}

/// A run created.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RunCreated {
    /// The flow run's id.
    id: Uuid,
    /// Its state (Scheduled until a worker claims it).
    state: StateType,
}

/// Creates a run of a deployment once its parameters fit the flow's schema (422 names the
/// parameter that does not).
#[utoipa::path(post, path = "/api/v1/deployments/{name}/runs", tag = "deployments", request_body = NewRun,
    params(("name" = String, Path, description = "The deployment's name")),
    responses((status = 201, description = "The run was created and queued", body = RunCreated),
        (status = 404, description = "No such deployment", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The parameters do not fit the flow", body = Problem, content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn run(
    State(store): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<NewRun>,
) -> Result<(StatusCode, axum::Json<RunCreated>), Problem> {
    let Path(name) = path.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if req.tags.iter().any(|t| t.contains('\0')) {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "a tag contains a NUL character"));
    }
    let request = kiln::deployment::RunRequest {
        parameters: serde_json::Value::Object(req.parameters),
        tags: req.tags,
        scheduled: req.scheduled,
        retry_of: None,
    };
    let id = kiln::deployment::run_deployment(&*store, &name, request).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(RunCreated {
            id,
            state: StateType::Scheduled,
        }),
    ))
}

/// What a cancellation did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CancelOutcome {
    /// The run's state now: Cancelled, Cancelling (its worker is stopping it), or the final
    /// state it had reached.
    state: StateType,
}

/// Cancels a run: one not started is Cancelled at once; a running one goes to Cancelling and
/// its worker stops it.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "Cancelled, being cancelled, or already finished", body = CancelOutcome),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run cannot be cancelled from here", body = Problem, content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn cancel(
    State(store): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Reply<CancelOutcome> {
    let id = id(path)?;
    let state = kiln::deployment::cancel(&*store, id).await?;
    Ok(axum::Json(CancelOutcome { state }))
}

/// Creates scheduled runs and marks the runs of dead processes Crashed (their claims taken
/// back), every [`SCHEDULER_TICK`], until dropped. Safe with any number of servers: a slot's
/// run is created once, and every take-back is a compare-and-set.
///
/// A server that just started judges no process by its silence for one lease: its clients
/// could not reach it while it was down (a restart is not every worker's death).
pub(crate) async fn scheduler(store: std::sync::Arc<dyn Store>) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(SCHEDULER_TICK);
    loop {
        tick.tick().await;
        if let Err(e) = kiln::deployment::schedule_due(&*store).await {
            tracing::warn!("cannot create scheduled runs: {e}");
        }
        if started.elapsed() < kiln::heartbeat::lease() {
            continue;
        }
        if let Err(e) = kiln::heartbeat::crash_dead_processes(&*store, None).await {
            tracing::warn!("cannot look for dead processes: {e}");
        }
    }
}
