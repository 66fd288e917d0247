//! Result storages (secrets masked, as the API shows them) and each one's cached results:
//! size, expiry, the run that produced them, and a button that deletes one.

use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use kiln_store::model::now_micros;
use maud::html;
use serde::Deserialize;

use super::Ui;
use super::pages::{
    PageError, PageResult, bad_request, bytes, guard, head, html_response, layout, pretty, short_id, when,
};
use super::session::{Viewer, encode, segment};

/// How long the page waits for one storage's cache listing.
const LISTING_TIME: std::time::Duration = std::time::Duration::from_secs(10);
/// Cached results listed per storage.
const CACHE_ROWS: usize = 200;

/// `GET /storages`.
pub(crate) async fn list(State(ui): State<Arc<Ui>>, Extension(viewer): Extension<Viewer>) -> PageResult {
    let axum::Json(storages) = crate::storages::list(State(ui.app.clone())).await?;
    let now = now_micros();
    // Every storage's cache at once, each given LISTING_TIME: one that cannot be reached
    // does not hold up the page.
    let listings = futures::future::join_all(storages.iter().map(|s| {
        let app = ui.app.clone();
        async move {
            let listing = crate::storages::cache(State(app), Ok(Path(s.name.clone())));
            match tokio::time::timeout(LISTING_TIME, listing).await {
                Ok(listing) => listing,
                Err(_) => Err(crate::Problem::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "it did not answer within {} s (`kiln cache ls --storage {}` lists it without a limit)",
                        LISTING_TIME.as_secs(),
                        s.name
                    ),
                )),
            }
        }
    }))
    .await;
    let sections: Vec<_> = storages.iter().zip(listings).collect();
    let body = html! {
        h1 { "Storages" }
        p.note { "Where results are persisted; secrets are never shown. Add one with " code { "kiln storage add" } " or " code { "PUT /api/v1/storages/NAME" } "." }
        table {
            (head("Result storages", &["Storage", "Kind", "Location", "Configuration"]))
            tbody {
                @for s in &storages {
                    tr {
                        td { a href={ "#cache-" (encode(&s.name)) } { (s.name) } }
                        td { (s.kind) }
                        td { code { (s.location) } }
                        td { details { summary { "settings" } pre.json { (pretty(&s.config)) } } }
                    }
                }
            }
        }
        @for (s, listing) in &sections {
            section aria-labelledby=(format!("cache-h-{}", encode(&s.name))) #(format!("cache-{}", encode(&s.name))) {
                h2 #(format!("cache-h-{}", encode(&s.name))) { "Cache in " (s.name) }
                @match listing {
                    Err(problem) => p.alert role="alert" { "Its cache cannot be listed: " (problem.detail) },
                    Ok(axum::Json(l)) if l.entries.is_empty() && l.unreadable.is_empty() => p.empty { "No cached result." },
                    Ok(axum::Json(l)) => {
                        @let total: u64 = l.entries.iter().map(|e| e.size).sum();
                        p { (l.entries.len()) " cached results, " (bytes(total)) "." }
                        @if viewer.can_change {
                            form method="post" action={ "/storages/" (segment(&s.name)) "/prune" } {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                button type="submit" { "Delete the expired ones" }
                            }
                        }
                        table.cache {
                            caption.visually-hidden { "Cached results in " (s.name) }
                            thead { tr {
                                th scope="col" { "Key" } th scope="col" { "Size" } th scope="col" { "Created" }
                                th scope="col" { "Expires" } th scope="col" { "Produced by" } th scope="col" { "Serializer" }
                                @if viewer.can_change { th scope="col" { span.visually-hidden { "Delete" } } }
                            } }
                            tbody {
                                @for e in l.entries.iter().take(CACHE_ROWS) {
                                    tr {
                                        td { code { (e.key) } }
                                        td.num { (bytes(e.size)) }
                                        td { (when(e.created)) }
                                        td { @match e.expires { Some(x) if x <= now => { span.bad { "expired " } (when(x)) }, Some(x) => (when(x)), None => "never" } }
                                        td { @if let Some(id) = e.run_id { a href={ "/task-runs/" (id) } { (e.run_name) " " code.dim { (short_id(id)) } } } @else { (e.run_name) } }
                                        td { code { (e.serializer) } }
                                        @if viewer.can_change {
                                            td {
                                                form method="post" action={ "/storages/" (segment(&s.name)) "/uncache" } {
                                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                                    input type="hidden" name="key" value=(e.key);
                                                    button.danger type="submit" aria-label={ "Delete " (e.key) } { "Delete" }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        @if l.entries.len() > CACHE_ROWS { p.note { "The first " (CACHE_ROWS) " are listed (" code { "kiln cache ls" } " lists all)." } }
                        @for u in &l.unreadable { p.alert { code { (u.key) } ": " (u.error) } }
                    }
                }
            }
        }
    };
    Ok(html_response(layout("Storages", Some(&viewer), "/storages", body)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct Uncache {
    csrf: String,
    key: String,
}

/// `POST /storages/{name}/uncache`: deletes one cached result.
pub(crate) async fn uncache(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
    form: Result<Form<Uncache>, FormRejection>,
) -> PageResult {
    let Form(form) = form.map_err(|e| bad_request(e.body_text()))?;
    guard(&viewer, &form.csrf)?;
    let key = crate::storages::CacheKey { key: form.key };
    crate::storages::uncache(State(ui.app.clone()), Ok(Path(name.clone())), Ok(Query(key))).await?;
    Ok(Redirect::to(&format!("/storages#cache-{}", encode(&name))).into_response())
}

/// `POST /storages/{name}/prune`: deletes the expired cached results.
pub(crate) async fn prune(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
    form: Result<Form<super::pages::Action>, FormRejection>,
) -> PageResult {
    super::pages::checked(&viewer, form)?;
    let _pruned = crate::storages::prune(State(ui.app.clone()), Ok(Path(name.clone())))
        .await
        .map_err(PageError::from)?;
    Ok(Redirect::to(&format!("/storages#cache-{}", encode(&name))).into_response())
}
