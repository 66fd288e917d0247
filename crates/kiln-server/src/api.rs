//! The routes: the store contract under `/api/v1`, and `/api/health`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::routing::get;
use kiln_store::model::*;
use kiln_store::{Outcome, Report, Store};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::body::JsonBody;
use crate::openapi::{ReadErrors, WriteErrors};
use crate::{BODY_LIMIT, Problem};

pub(crate) type Shared = Arc<dyn Store>;

/// What every handler can reach: the store, and the result storages.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) results: Option<Arc<crate::Results>>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl axum::extract::FromRef<App> for Shared {
    fn from_ref(app: &App) -> Shared {
        app.store.clone()
    }
}
type Json<T> = axum::Json<T>;
type Reply<T> = Result<Json<T>, Problem>;

/// The API's routes over `app`, and `/api/openapi.json` describing them.
pub(crate) fn router(app: App) -> Router {
    let auth = Arc::new(crate::auth::Auth::new(app.store.clone()));
    let (routes, doc) = OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(health))
        .routes(routes!(version))
        .routes(routes!(writes))
        .routes(routes!(flow_runs))
        .routes(routes!(flow_run))
        .routes(routes!(flow_run_detail))
        .routes(routes!(set_state))
        .routes(routes!(subflow_runs))
        .routes(routes!(task_runs))
        .routes(routes!(edges))
        .routes(routes!(task_run))
        .routes(routes!(task_runs_lookup))
        .routes(routes!(list_task_runs))
        .routes(routes!(states))
        .routes(routes!(logs))
        .routes(routes!(resolve))
        .routes(routes!(crate::results::info))
        .routes(routes!(crate::results::content))
        .routes(routes!(crate::results::thumbnail))
        .routes(routes!(run_counts))
        .routes(routes!(crate::metrics::metrics))
        .routes(routes!(crate::storages::list))
        .routes(routes!(
            crate::storages::get,
            crate::storages::put,
            crate::storages::delete
        ))
        .routes(routes!(crate::storages::test))
        .routes(routes!(crate::storages::cache, crate::storages::uncache))
        .routes(routes!(crate::storages::prune))
        .routes(routes!(processes))
        .routes(routes!(crash_orphans))
        .routes(routes!(crate::work::claim))
        .routes(routes!(crate::work::queue))
        .routes(routes!(crate::work::holders))
        .routes(routes!(crate::work::work_pools))
        .routes(routes!(crate::work::limits))
        .routes(routes!(crate::work::acquire_slots))
        .routes(routes!(crate::work::deployments))
        .routes(routes!(crate::work::deployment))
        .routes(routes!(crate::work::run))
        .routes(routes!(crate::work::cancel))
        .split_for_parts();
    let doc = Arc::new(crate::openapi::document(doc));
    routes
        .route(
            "/api/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], doc.as_str().to_owned()) }
            }),
        )
        // Inside the routes, so that requests are counted by their route, refused ones too.
        .route_layer(axum::middleware::from_fn_with_state(auth.clone(), crate::auth::check))
        .route_layer(axum::middleware::from_fn_with_state(
            app.metrics.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(too_large))
        .with_state(app.clone())
        // The web UI has its own gate (a session cookie, or a login page).
        .merge(crate::ui::router(app, auth))
        .fallback(crate::ui::fallback)
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

/// The server answers, and which Kiln it is.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`.
    status: &'static str,
    /// Kiln's version.
    version: &'static str,
}

fn health_now() -> Json<Health> {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Whether the server answers (no token needed).
#[utoipa::path(get, path = "/api/health", tag = "server", security(()),
    responses((status = 200, description = "The server answers", body = Health)))]
async fn health() -> Json<Health> {
    health_now()
}

/// The server's version.
#[utoipa::path(get, path = "/api/version", tag = "server",
    responses((status = 200, description = "Kiln's version", body = Health), ReadErrors))]
async fn version() -> Json<Health> {
    health_now()
}

/// A run marked Crashed, as the answer's `[kind, id]` pairs (a tuple: `prefixItems`).
struct Crashed;

impl utoipa::PartialSchema for Crashed {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ArrayItems, KnownFormat, ObjectBuilder, SchemaFormat, Type};
        let kind = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["flow", "task"]));
        let id = ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)));
        ArrayBuilder::new()
            .description(Some("A run marked Crashed: its kind and id"))
            .prefix_items([kind, id])
            .items(ArrayItems::False)
            .min_items(Some(2))
            .max_items(Some(2))
            .into()
    }
}

impl ToSchema for Crashed {}

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

/// Applies a batch of writes in order and answers once each has its outcome: applied (and
/// durable), rejected by the state rules, or failed. A write delivered again (same id) is
/// applied once and answered as the first time.
#[utoipa::path(post, path = "/api/v1/writes", tag = "store", request_body = WriteBatch,
    responses((status = 200, description = "One outcome per write, in order", body = OutcomeBatch), WriteErrors))]
async fn writes(State(store): State<Shared>, JsonBody(batch): JsonBody<WriteBatch>) -> Reply<OutcomeBatch> {
    let WriteBatch { writes } = batch;

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
        // A malformed write fails alone, as it would in the database; the others go on.
        if let Err(e) = write.check() {
            outcomes.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(WireOutcome::Failed {
                message: format!("{write} is malformed: {e}"),
                retryable: false,
            });
            continue;
        }
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

/// The run id in a path. Text that is no id names no run: 404, saying why.
pub(crate) fn id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, Problem> {
    let Path(text) = path.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    Uuid::parse_str(&text).map_err(|e| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("'{text}' is not a run id ({e}); resolve a short id with /api/v1/runs/resolve/{{text}}"),
        )
    })
}

fn found<T>(value: Option<T>, what: &str, id: Uuid) -> Reply<T> {
    value
        .map(axum::Json)
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, format!("no {what} with id {id}")))
}

const STATES: &str =
    "Scheduled|Pending|Running|AwaitingRetry|Completed|Cached|Failed|Crashed|Cancelled|TimedOut|RolledBack";

/// The order of a list.
#[derive(Deserialize, ToSchema, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum Sort {
    /// Newest first (the default).
    #[default]
    Newest,
    /// Oldest first.
    Oldest,
}

/// A list query: the fields of every list of runs, and `$extra` ones (serde's `flatten`
/// cannot be used: query strings carry numbers as text).
macro_rules! list_query {
    ($(#[$doc:meta])* $name:ident { $($extra:tt)* }) => {
        $(#[$doc])*
        #[derive(Deserialize, IntoParams)]
        #[into_params(parameter_in = Query)]
        struct $name {
            $($extra)*
            /// The most runs to list (default 100).
            #[param(minimum = 0, maximum = 10000)]
            limit: Option<usize>,
            /// Only runs in these states, comma-separated (`Failed,Crashed`).
            #[param(pattern = r"^\s*(Scheduled|Pending|Running|AwaitingRetry|Completed|Cached|Failed|Crashed|Cancelled|TimedOut|RolledBack)?\s*(,\s*(Scheduled|Pending|Running|AwaitingRetry|Completed|Cached|Failed|Crashed|Cancelled|TimedOut|RolledBack)?\s*)*$")]
            state: Option<String>,
            /// Only runs with this tag.
            tag: Option<String>,
            /// Only runs created at or after this time (microseconds since the Unix epoch).
            since: Option<Micros>,
            /// Only runs created before this time (microseconds since the Unix epoch).
            until: Option<Micros>,
            /// The page after this run id (the previous page's `next`).
            after: Option<Uuid>,
            /// `newest` first (the default) or `oldest` first.
            #[param(inline)]
            sort: Option<Sort>,
            /// Only runs without a parent: flow runs that are not subflows, task runs
            /// called outside any flow.
            top_level: Option<bool>,
        }

        impl $name {
            fn common(&self) -> ListQuery {
                ListQuery {
                    limit: self.limit,
                    state: self.state.clone(),
                    tag: self.tag.clone(),
                    since: self.since,
                    until: self.until,
                    after: self.after,
                    sort: self.sort,
                    top_level: self.top_level,
                }
            }
        }
    };
}

list_query! {
    /// `GET /api/v1/flow_runs`'s query.
    FlowRunQuery {
        /// Only runs of this flow.
        flow: Option<String>,
        /// Only subflow runs of this flow run.
        parent: Option<Uuid>,
    }
}

list_query! {
    /// `GET /api/v1/task_runs`'s query.
    TaskRunQuery {
        /// Only runs of this task (its name).
        task: Option<String>,
        /// Only task runs of this flow run.
        flow_run: Option<Uuid>,
    }
}

/// What lists of flow runs and task runs share.
struct ListQuery {
    limit: Option<usize>,
    state: Option<String>,
    tag: Option<String>,
    since: Option<Micros>,
    until: Option<Micros>,
    after: Option<Uuid>,
    sort: Option<Sort>,
    top_level: Option<bool>,
}

impl ListQuery {
    /// The filter, with `name` and `parent`; `None` when no run can match (a NUL
    /// character in a text, which no run's text holds, and PostgreSQL's cannot).
    fn filter(self, name: Option<String>, parent: Option<Uuid>) -> Result<Option<RunFilter>, Problem> {
        let limit = self.limit.unwrap_or(100);
        if limit > 10_000 {
            return Err(Problem::new(StatusCode::BAD_REQUEST, "limit is at most 10000"));
        }
        let states = self
            .state
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse::<kiln_store::state::StateType>().map_err(|_| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        format!("unknown state '{s}'; states: {}", STATES.replace('|', ", ")),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if [&name, &self.tag].into_iter().flatten().any(|t| t.contains('\0')) {
            return Ok(None);
        }
        Ok(Some(RunFilter {
            states,
            name,
            tag: self.tag,
            parent,
            top_level: self.top_level.unwrap_or(false),
            since: self.since,
            until: self.until,
            after: self.after,
            oldest_first: matches!(self.sort.unwrap_or_default(), Sort::Oldest),
            limit,
        }))
    }
}

/// A query string's parameters, or a 400 saying what is wrong with them.
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Problem> {
    q.map(|Query(q)| q)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))
}

/// Flow runs, filtered, a page at a time (`next` is the cursor of the next page).
#[utoipa::path(get, path = "/api/v1/flow_runs", tag = "runs", params(FlowRunQuery),
    responses((status = 200, description = "A page of flow runs", body = FlowRunPage), ReadErrors))]
async fn flow_runs(State(store): State<Shared>, q: Result<Query<FlowRunQuery>, QueryRejection>) -> Reply<FlowRunPage> {
    let q = query(q)?;
    Ok(axum::Json(match q.common().filter(q.flow, q.parent)? {
        Some(filter) => store.list_flow_runs(&filter).await?,
        None => FlowRunPage {
            runs: Vec::new(),
            next: None,
        },
    }))
}

/// Task runs across flow runs (or of one), filtered, a page at a time.
#[utoipa::path(get, path = "/api/v1/task_runs", tag = "runs", params(TaskRunQuery),
    responses((status = 200, description = "A page of task runs", body = TaskRunPage), ReadErrors))]
async fn list_task_runs(
    State(store): State<Shared>,
    q: Result<Query<TaskRunQuery>, QueryRejection>,
) -> Reply<TaskRunPage> {
    let q = query(q)?;
    Ok(axum::Json(match q.common().filter(q.task, q.flow_run)? {
        Some(filter) => store.list_task_runs(&filter).await?,
        None => TaskRunPage {
            runs: Vec::new(),
            next: None,
        },
    }))
}

/// One flow run.
#[utoipa::path(get, path = "/api/v1/flow_runs/{id}", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The flow run", body = FlowRun), ReadErrors))]
async fn flow_run(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<FlowRun> {
    let id = id(path)?;
    found(store.flow_run(id).await?, "flow run", id)
}

/// A flow run with everything a page about it shows: its states (attempts included), its
/// task runs, the edges between them, and its subflow runs.
#[derive(Serialize, ToSchema)]
struct FlowRunDetail {
    run: FlowRun,
    states: Vec<StateRecord>,
    task_runs: Vec<TaskRun>,
    edges: Vec<Edge>,
    subflows: Vec<FlowRun>,
}

/// One flow run with its states, task runs, edges and subflows, in one call.
#[utoipa::path(get, path = "/api/v1/flow_runs/{id}/detail", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The flow run and what belongs to it", body = FlowRunDetail), ReadErrors))]
async fn flow_run_detail(
    State(store): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Reply<FlowRunDetail> {
    let id = id(path)?;
    let axum::Json(run) = found(store.flow_run(id).await?, "flow run", id)?;
    let (states, task_runs, edges, subflows) = tokio::try_join!(
        store.states(id),
        store.task_runs(id),
        store.edges(id),
        store.subflow_runs(id)
    )?;
    Ok(axum::Json(FlowRunDetail {
        run,
        states,
        task_runs,
        edges,
        subflows,
    }))
}

/// What `POST /api/v1/runs/{id}/state` asks: move the run from the state the caller believes
/// it is in to another, as the store's rules allow.
#[derive(Deserialize, ToSchema)]
pub(crate) struct SetState {
    /// The state the caller believes the run is in.
    from: kiln_store::state::StateType,
    /// The state to enter.
    to: kiln_store::state::StateType,
    /// Why.
    #[serde(default)]
    message: Option<String>,
    /// This change's identity: sent again (a retry after a lost answer), it is applied once.
    #[serde(default)]
    id: Option<Uuid>,
}

/// The change made.
#[derive(Serialize, ToSchema)]
struct StateSet {
    /// The run's kind.
    kind: RunKind,
    /// The state entered.
    state: kiln_store::state::StateType,
    /// Its position in the run's history.
    seq: u32,
}

/// Changes a run's state through the store's compare-and-set: applied only if the run is in
/// `from` and the rules allow `from -> to` (409 naming the state it is in otherwise).
#[utoipa::path(post, path = "/api/v1/runs/{id}/state", tag = "runs", request_body = SetState,
    params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The change was applied", body = StateSet),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run is not in `from`, or the rules forbid the move", body = Problem,
            content_type = "application/problem+json"),
        WriteErrors))]
async fn set_state(
    State(store): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<SetState>,
) -> Reply<StateSet> {
    let id = id(path)?;
    let (kind, attempt) = match store.task_run(id).await? {
        Some(run) => (RunKind::Task, run.attempt),
        None => match store.flow_run(id).await? {
            Some(run) => (RunKind::Flow, run.attempt),
            None => {
                return Err(Problem::new(
                    StatusCode::NOT_FOUND,
                    format!("no flow run or task run with id {id}"),
                ));
            }
        },
    };
    if req.message.as_deref().is_some_and(|m| m.contains('\0')) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "message contains a NUL character",
        ));
    }
    let change = StateChange {
        id: req.id.unwrap_or_else(write_id),
        kind,
        run_id: id,
        from: req.from,
        to: req.to,
        message: req.message,
        attempt,
        timestamp: now_micros(),
        result: None,
        fence: None,
    };
    match store.set_state(change).await? {
        kiln_store::Transition::Accepted { seq } => Ok(axum::Json(StateSet {
            kind,
            state: req.to,
            seq,
        })),
        kiln_store::Transition::Rejected { current } => Err(Problem::new(
            StatusCode::CONFLICT,
            match current {
                Some(current) if current != req.from => format!(
                    "run {id} is {current}, not {}; read it again and decide on what it is now",
                    req.from
                ),
                Some(current) => format!("the rules do not allow {current} -> {} (run {id})", req.to),
                None => format!("run {id} is gone"),
            },
        )),
    }
}

/// The flow runs this flow run called (its subflows).
#[utoipa::path(get, path = "/api/v1/flow_runs/{id}/subflows", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "Its subflow runs", body = Vec<FlowRun>), ReadErrors))]
async fn subflow_runs(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<FlowRun>> {
    Ok(axum::Json(store.subflow_runs(id(path)?).await?))
}

/// The task runs of a flow run, in creation order.
#[utoipa::path(get, path = "/api/v1/flow_runs/{id}/task_runs", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "Its task runs", body = Vec<TaskRun>), ReadErrors))]
async fn task_runs(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<TaskRun>> {
    Ok(axum::Json(store.task_runs(id(path)?).await?))
}

/// The dependency edges between a flow run's task runs.
#[utoipa::path(get, path = "/api/v1/flow_runs/{id}/edges", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "Its edges", body = Vec<Edge>), ReadErrors))]
async fn edges(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<Edge>> {
    Ok(axum::Json(store.edges(id(path)?).await?))
}

/// One task run.
#[utoipa::path(get, path = "/api/v1/task_runs/{id}", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The task run", body = TaskRun), ReadErrors))]
async fn task_run(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<TaskRun> {
    let id = id(path)?;
    found(store.task_run(id).await?, "task run", id)
}

/// Task runs by id (at most 1000), those in one of `states` (none: any), in no particular
/// order: how a caller follows many runs it waits for with one request.
#[utoipa::path(post, path = "/api/v1/task_runs/lookup", tag = "runs", request_body = TaskRunLookup,
    responses((status = 200, description = "The task runs found", body = Vec<TaskRun>), WriteErrors))]
async fn task_runs_lookup(
    State(store): State<Shared>,
    JsonBody(lookup): JsonBody<TaskRunLookup>,
) -> Reply<Vec<TaskRun>> {
    at_most_one_lookup(&lookup.ids)?;
    Ok(axum::Json(store.task_runs_in(&lookup.ids, &lookup.states).await?))
}

/// Refuses a lookup of more ids than a store answers at once.
pub(crate) fn at_most_one_lookup(ids: &[Uuid]) -> Result<(), Problem> {
    if ids.len() > kiln_store::MAX_LOOKUP {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{} ids; look up at most {} at once", ids.len(), kiln_store::MAX_LOOKUP),
        ));
    }
    Ok(())
}

/// A run's state history, oldest first.
#[utoipa::path(get, path = "/api/v1/runs/{id}/states", tag = "runs", params(("id" = Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "Its states", body = Vec<StateRecord>), ReadErrors))]
async fn states(State(store): State<Shared>, path: Result<Path<String>, PathRejection>) -> Reply<Vec<StateRecord>> {
    Ok(axum::Json(store.states(id(path)?).await?))
}

/// `GET /api/v1/runs/{id}/logs`'s query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Only lines at this level or more severe.
    #[param(pattern = "^(error|warn|warning|info|debug|trace|ERROR|WARN|WARNING|INFO|DEBUG|TRACE)$")]
    level: Option<String>,
    /// The page after this position (the previous page's `next`).
    after: Option<i64>,
    /// The most lines to list (default 1000).
    #[param(minimum = 0, maximum = 10000)]
    limit: Option<usize>,
}

/// The log lines a run captured (a flow run's include its task runs'), oldest first, a
/// page at a time.
#[utoipa::path(get, path = "/api/v1/runs/{id}/logs", tag = "runs",
    params(("id" = Uuid, Path, description = "The run's id"), LogQuery),
    responses((status = 200, description = "A page of its log lines", body = LogPage), ReadErrors))]
async fn logs(
    State(store): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Reply<LogPage> {
    let id = id(path)?;
    let q = query(q)?;
    let filter = LogFilter {
        level: q.level,
        after: q.after,
        limit: q.limit.unwrap_or(1000),
    };
    if filter.limit > 10_000 {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "limit is at most 10000"));
    }
    let known = |l: &str| filter.levels().is_ok() && (l == l.to_ascii_lowercase() || l == l.to_ascii_uppercase());
    if let Some(level) = filter.level.as_deref().filter(|l| !known(l)) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("unknown log level '{level}'; levels: error, warn, info, debug, trace (or in capitals)"),
        ));
    }
    Ok(axum::Json(store.list_logs(id, &filter).await?))
}

/// How many flow runs and task runs are in each state.
#[utoipa::path(get, path = "/api/v1/runs/counts", tag = "runs",
    responses((status = 200, description = "Counts by kind and state", body = Vec<RunCount>), ReadErrors))]
async fn run_counts(State(store): State<Shared>) -> Reply<Vec<RunCount>> {
    Ok(axum::Json(store.run_counts().await?))
}

/// The run an id, a unique prefix of one, or its last characters name.
#[utoipa::path(get, path = "/api/v1/runs/resolve/{text}", tag = "runs", params(("text" = String, Path, description = "An id or a unique prefix or tail of one")),
    responses((status = 200, description = "The run it names", body = RunRef),
        (status = 409, description = "A prefix that several runs share", body = Problem,
            content_type = "application/problem+json"), ReadErrors))]
async fn resolve(State(store): State<Shared>, Path(text): Path<String>) -> Reply<RunRef> {
    Ok(axum::Json(store.resolve(&text).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Since {
    /// Only processes heard from at or after this time (microseconds since the Unix epoch).
    since: Option<Micros>,
}

/// The processes that heartbeat since a time.
#[utoipa::path(get, path = "/api/v1/processes", tag = "processes", params(Since),
    responses((status = 200, description = "Processes", body = Vec<Process>), ReadErrors))]
async fn processes(State(store): State<Shared>, q: Result<Query<Since>, QueryRejection>) -> Reply<Vec<Process>> {
    let q = query(q)?;
    Ok(axum::Json(store.processes(q.since.unwrap_or(0)).await?))
}

/// Marks Crashed the unfinished runs of processes that exited (`dead`) or fell silent before
/// `stale_before`; the runs marked.
#[utoipa::path(post, path = "/api/v1/processes/crash_orphans", tag = "processes", request_body = CrashOrphans,
    responses((status = 200, description = "The runs marked Crashed", body = Vec<Crashed>), WriteErrors))]
async fn crash_orphans(
    State(store): State<Shared>,
    JsonBody(req): JsonBody<CrashOrphans>,
) -> Reply<Vec<(RunKind, Uuid)>> {
    Ok(axum::Json(store.crash_orphans(&req.dead, req.stale_before).await?))
}
