//! The web UI, served by the API's server on the same port: HTML rendered on the server
//! (maud), pictures drawn on the server as SVG, a stylesheet and a little JavaScript
//! compiled into the binary. Nothing to build, nothing to install.
//!
//! Pages: `/runs` (filtered, paged, live), `/runs/{id}` (a flow run: graph, timeline, task
//! runs, subflows, logs, retry and cancel), `/task-runs/{id}` (history, inputs, logs, the
//! result checked against its hash and previewed), `/deployments` (schedules, next runs, a
//! run form made from the flow's parameter schema), `/work-pools` (queues, processes and
//! their heartbeats, tag limits), `/storages` (secrets masked; cached results, deletable),
//! `/dashboard` (runs by state over time, failures, the slowest tasks), `/login`. Live parts of a page carry
//! `data-live`; the script fetches the page again when `/ui/events` says runs changed and
//! swaps those parts.

mod dashboard;
mod deployments;
mod graph;
mod live;
mod pages;
mod session;
mod storages;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

pub(crate) use session::session_secret;

use crate::api::App;
use crate::auth::Auth;

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// Changes with the assets' content, so that browsers never keep an old one (they are
/// cached as immutable under it).
fn assets_version() -> &'static str {
    static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let mut hasher = blake3::Hasher::new();
        hasher.update(APP_CSS.as_bytes()).update(APP_JS.as_bytes());
        hasher.finalize().to_hex()[..12].to_owned()
    });
    &VERSION
}

/// What the pages reach: the API's state, its token checker, and the live pulse.
pub(crate) struct Ui {
    app: App,
    auth: Arc<Auth>,
    pulse: Arc<live::Pulse>,
    /// The CSRF key of an open server (no tokens): this process's own, made at start.
    open_key: [u8; 32],
}

/// The UI's routes, each behind the session gate.
pub(crate) fn router(app: App, auth: Arc<Auth>) -> Router {
    let mut open_key = [0u8; 32];
    open_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    open_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let ui = Arc::new(Ui {
        app,
        auth,
        pulse: Arc::new(live::Pulse::new()),
        open_key,
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/runs") }))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::flow_run))
        .route("/runs/{id}/cancel", post(pages::cancel))
        .route("/runs/{id}/retry", post(pages::retry))
        .route("/task-runs/{id}", get(pages::task_run))
        .route("/deployments", get(deployments::list))
        .route("/deployments/{name}", get(deployments::show))
        .route("/deployments/{name}/run", post(deployments::run))
        .route("/work-pools", get(deployments::pools))
        .route("/storages", get(storages::list))
        .route("/storages/{name}/uncache", post(storages::uncache))
        .route("/storages/{name}/prune", post(storages::prune))
        .route("/dashboard", get(dashboard::show))
        .route("/login", get(pages::login).post(pages::log_in))
        .route("/logout", post(pages::log_out))
        .route("/ui/events", get(live::events))
        .route(
            "/ui/assets/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/assets/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route_layer(axum::middleware::from_fn_with_state(ui.clone(), session::gate))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(ui)
}

fn asset(body: &'static str, media: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, media),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

/// Pages may not be framed by other sites, and load scripts and styles from this server only.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// What the server answers for a path nobody serves: a problem under `/api`, a page elsewhere.
pub(crate) async fn fallback(request: Request) -> Response {
    let path = request.uri().path();
    if path.starts_with("/api") || path == "/metrics" {
        crate::Problem::new(
            axum::http::StatusCode::NOT_FOUND,
            "no such endpoint; the API is under /api/v1",
        )
        .into_response()
    } else {
        pages::not_found(path)
    }
}
