//! The pages: every one a URL whose query string holds its state (filters, cursor, log
//! level), so that a link shows what its sender saw.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use kiln_store::StoreError;
use kiln_store::model::*;
use kiln_store::state::StateType;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::Ui;
use super::graph::{graph_svg, state_bar, state_class, state_counts, timeline_svg};
use super::session::{Viewer, encode};
use crate::Problem;
use crate::results::Preview;

/// Pages read at most to fill a page filtered by a deployment and a tag.
const TAG_READS: usize = 20;
/// Parameters and inputs shown up to this many bytes.
const JSON_SHOWN: usize = 16 * 1024;
/// Runs per page of the runs list.
const PAGE: usize = 50;
/// Log lines per page.
const LOG_PAGE: usize = 300;
/// Task runs listed on a flow run's page before "show all".
const TASK_ROWS: usize = 500;
/// Subflows whose graphs a flow run's page draws (each costs two reads); the others are listed.
const SUBFLOW_GRAPHS: usize = 20;
/// Retried task runs whose attempts the timeline draws (each costs a read).
const ATTEMPT_LOOKUPS: usize = 200;

/// A page that could not be made: an HTML page saying why, with the problem's status.
#[derive(Debug)]
pub(super) struct PageError(pub(super) Problem);

impl From<Problem> for PageError {
    fn from(p: Problem) -> Self {
        PageError(p)
    }
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        error_page(&self.0)
    }
}

pub(super) type PageResult = Result<Response, PageError>;

pub(super) fn bad_request(text: impl Into<String>) -> PageError {
    PageError(Problem::new(StatusCode::BAD_REQUEST, text))
}

/// A problem as a page.
pub(crate) fn error_page(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = layout(
        &problem.title,
        None,
        "",
        html! {
            h1 { (problem.title) }
            p.alert role="alert" { (problem.detail) }
            p { a href="/runs" { "Back to the runs" } }
        },
    );
    (status, axum::response::Html(body.into_string())).into_response()
}

/// A refusal (forbidden, unknown) as a page.
pub(crate) fn refusal(status: StatusCode, detail: &str) -> Response {
    error_page(&Problem::new(status, detail))
}

/// The frame around every page.
pub(super) fn layout(title: &str, viewer: Option<&Viewer>, current: &str, body: Markup) -> Markup {
    let nav = [
        ("/dashboard", "Dashboard"),
        ("/runs", "Runs"),
        ("/deployments", "Deployments"),
        ("/work-pools", "Work pools"),
        ("/storages", "Storages"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Kiln" }
                link rel="stylesheet" href=(format!("/ui/assets/app.css?v={}", super::assets_version()));
                script src=(format!("/ui/assets/app.js?v={}", super::assets_version())) defer {}
            }
            body {
                a.skip href="#main" { "Skip to the content" }
                header.top {
                    a.brand href="/runs" { "Kiln" }
                    nav aria-label="Main" {
                        ul {
                            @for (href, label) in nav {
                                li {
                                    @if href == current {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    @if let Some(v) = viewer {
                        @if let Some(name) = &v.name {
                            form.logout method="post" action="/logout" {
                                span.who { (name) @if !v.can_change { " (read-only)" } }
                                input type="hidden" name="csrf" value=(v.csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// A table's caption (for screen readers) and header row.
pub(super) fn head(caption: &str, columns: &[&str]) -> Markup {
    html! {
        caption.visually-hidden { (caption) }
        thead { tr { @for c in columns { th scope="col" { (c) } } } }
    }
}

/// A state as a coloured label.
pub(super) fn badge(state: StateType) -> Markup {
    html! { span.state.(state_class(state)) { (state.as_str()) } }
}

/// A time as UTC, to the second.
pub(crate) fn when(t: Micros) -> Markup {
    // RFC 3339 ends at the year 9999 (a far expiry, a time written through the API).
    const LAST: Micros = 253_402_300_799_000_000;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(t.clamp(0, LAST) as u64);
    let text = humantime::format_rfc3339_seconds(at).to_string();
    html! { time datetime=(text) { (text.replace('T', " ").trim_end_matches('Z')) " UTC" } }
}

/// A length of time for people: `850 µs`, `12.4 ms`, `3.20 s`, `4 min 05 s`, `2 h 03 min`.
pub(crate) fn span(us: Micros) -> String {
    let us = us.max(0);
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        1_000_000..60_000_000 => format!("{:.2} s", us as f64 / 1e6),
        60_000_000..3_600_000_000 => format!("{} min {:02} s", us / 60_000_000, us / 1_000_000 % 60),
        _ => format!("{} h {:02} min", us / 3_600_000_000, us / 60_000_000 % 60),
    }
}

pub(super) fn duration(start: Option<Micros>, end: Option<Micros>, now: Micros) -> String {
    match (start, end) {
        (Some(s), Some(e)) => span(e - s),
        (Some(s), None) => format!("{} so far", span(now - s)),
        _ => "—".into(),
    }
}

/// The last 8 hex digits of an id: its random part (the first ones are its creation time,
/// shared by runs made together); `kiln runs show` takes them too.
pub(super) fn short_id(id: Uuid) -> String {
    let hex = id.simple().to_string();
    hex[hex.len() - 8..].to_owned()
}

/// The deployment a flow run belongs to (from its `deployment:NAME` tag).
pub(super) fn deployment_of(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix("deployment:"))
}

/// Pretty JSON, cut after [`JSON_SHOWN`] bytes (the value can be downloaded whole from the API).
pub(super) fn pretty(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    crate::results::cut_text(&mut text, JSON_SHOWN, "\n… (cut: the whole value is in the API's JSON)");
    text
}

pub(super) fn html_response(markup: Markup) -> Response {
    let mut response = axum::response::Html(markup.into_string()).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, PageError> {
    q.map(|Query(q)| q).map_err(|e| bad_request(e.body_text()))
}

// ---------------------------------------------------------------------------------------
// Runs

/// The runs list's query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunsQuery {
    /// States, comma-separated.
    state: Option<String>,
    flow: Option<String>,
    tag: Option<String>,
    deployment: Option<String>,
    /// A run id (or its start or end), or a flow's name.
    q: Option<String>,
    after: Option<String>,
    /// `1`: subflow runs too.
    subflows: Option<String>,
}

impl RunsQuery {
    fn states(&self) -> Result<Vec<StateType>, PageError> {
        let Some(text) = self.state.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(Vec::new());
        };
        text.split(',')
            .map(|s| {
                s.trim().parse::<StateType>().map_err(|_| {
                    bad_request(format!(
                        "unknown state '{s}'; states: {}",
                        StateType::ALL.map(|s| s.as_str()).join(", ")
                    ))
                })
            })
            .collect()
    }

    /// This query with one parameter changed (`None`: removed), as a URL.
    fn with(&self, key: &str, value: Option<&str>) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        let fields = [
            ("state", &self.state),
            ("flow", &self.flow),
            ("tag", &self.tag),
            ("deployment", &self.deployment),
            ("subflows", &self.subflows),
        ];
        for (k, v) in fields {
            if k != key
                && let Some(v) = v.as_deref().filter(|v| !v.is_empty())
            {
                pairs.push((k, v.to_owned()));
            }
        }
        if let Some(v) = value {
            pairs.push((key, v.to_owned()));
        }
        let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        if query.is_empty() {
            "/runs".into()
        } else {
            format!("/runs?{}", query.join("&"))
        }
    }
}

/// `GET /runs`: flow runs, newest first, filtered, a page at a time.
pub(crate) async fn runs(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> PageResult {
    let mut q = query(q)?;
    let store = &ui.app.store;
    if let Some(text) = q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        if kiln_store::id_hex(text).is_some()
            && let Ok(found) = store.resolve(text).await
        {
            let target = match found {
                RunRef::Flow(id) => format!("/runs/{id}"),
                RunRef::Task(id) => format!("/task-runs/{id}"),
            };
            return Ok(Redirect::to(&target).into_response());
        }
        q.flow = Some(text.to_owned());
    }
    let states = q.states()?;
    let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => Some(Uuid::parse_str(a).map_err(|_| bad_request(format!("'{a}' is not a page cursor")))?),
        None => None,
    };
    let deployment_tag = q
        .deployment
        .as_deref()
        .filter(|d| !d.is_empty())
        .map(kiln::deployment::deployment_tag);
    let tag = q.tag.clone().filter(|t| !t.is_empty());
    let filter = RunFilter {
        states,
        name: q.flow.clone().filter(|f| !f.is_empty()),
        tag: deployment_tag.clone().or_else(|| tag.clone()),
        top_level: q.subflows.as_deref() != Some("1"),
        after,
        ..RunFilter::newest(PAGE)
    };
    let (mut page, counts) = tokio::try_join!(store.list_flow_runs(&filter), store.run_counts())?;
    let mut runs = std::mem::take(&mut page.runs);
    // The store filters by one tag: with a deployment and a tag, the deployment's runs are
    // read on until a page's worth carries the tag too (or a bound is reached).
    if deployment_tag.is_some()
        && let Some(tag) = &tag
    {
        runs.retain(|r| r.tags.contains(tag));
        let mut reads = 1;
        while runs.len() < PAGE && reads < TAG_READS {
            let Some(next) = page.next else { break };
            page = store
                .list_flow_runs(&RunFilter {
                    after: Some(next),
                    ..filter.clone()
                })
                .await?;
            reads += 1;
            runs.extend(
                std::mem::take(&mut page.runs)
                    .into_iter()
                    .filter(|r| r.tags.contains(tag)),
            );
        }
        if runs.len() > PAGE {
            runs.truncate(PAGE);
            page.next = runs.last().map(|r| r.id);
        }
    }
    let now = now_micros();
    let flow_counts: Vec<(StateType, u64)> = StateType::ALL
        .iter()
        .filter_map(|s| {
            counts
                .iter()
                .find(|c| c.kind == RunKind::Flow && c.state == *s)
                .map(|c| (*s, c.count))
        })
        .collect();
    let chosen = q.state.clone().unwrap_or_default();
    let body = html! {
        h1 { "Flow runs" }
        form.filters method="get" action="/runs" role="search" {
            label { "Search " input type="search" name="q" placeholder="run id or flow name" value=[q.q.as_deref()]; }
            label { "State "
                select name="state" {
                    option value="" selected[chosen.is_empty()] { "any" }
                    @for s in StateType::ALL {
                        option value=(s.as_str()) selected[chosen == s.as_str()] { (s.as_str()) }
                    }
                    option value="Failed,Crashed,TimedOut" selected[chosen == "Failed,Crashed,TimedOut"] { "failed, crashed or timed out" }
                }
            }
            label { "Flow " input type="text" name="flow" value=[q.flow.as_deref()]; }
            label { "Deployment " input type="text" name="deployment" value=[q.deployment.as_deref()]; }
            label { "Tag " input type="text" name="tag" value=[q.tag.as_deref()]; }
            label.check { input type="checkbox" name="subflows" value="1" checked[q.subflows.as_deref() == Some("1")]; " subflows too" }
            button type="submit" { "Filter" }
            " " a href="/runs" { "Clear" }
        }
        section #runs-live data-live {
            ul.chips aria-label="All flow runs by state, subflows included" {
                @for (s, n) in &flow_counts {
                    li { a href=(q.with("state", Some(s.as_str()))) { (badge(*s)) " " (n) } }
                }
            }
            @if runs.is_empty() {
                p.empty { "No flow run matches." }
            } @else {
                table.runs {
                    (head("Flow runs, newest first", &["Run", "Flow", "State", "Deployment", "Tags", "Start", "Duration", "Tasks"]))
                    tbody {
                        @for r in &runs {
                            tr data-run=(r.id) data-state=(r.state.as_str()) {
                                td { a href={ "/runs/" (r.id) } { code { (short_id(r.id)) } } }
                                td { a href=(q.with("flow", Some(&r.name))) { (r.name) } }
                                td { (badge(r.state)) }
                                td { @if let Some(d) = deployment_of(&r.tags) { a href=(q.with("deployment", Some(d))) { (d) } } }
                                td.tags { @for t in r.tags.iter().filter(|t| !t.starts_with("deployment:")) { a.tag href=(q.with("tag", Some(t))) { (t) } " " } }
                                td { @if let Some(s) = r.start_time { (when(s)) } @else { "—" } }
                                td { (duration(r.start_time, r.end_time, now)) }
                                td.num { (r.task_count) }
                            }
                        }
                    }
                }
            }
            nav.pages aria-label="Pages" {
                @if after.is_some() { a href=(q.with("after", None)) { "← Newest" } }
                @if let Some(next) = page.next { " " a rel="next" href=(q.with("after", Some(&next.to_string()))) { "Older →" } }
            }
        }
    };
    Ok(html_response(layout("Flow runs", Some(&viewer), "/runs", body)))
}

// ---------------------------------------------------------------------------------------
// A flow run

/// A run page's query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunQuery {
    /// The lowest log level shown (`info` shows info, warnings and errors).
    level: Option<String>,
    /// The log page after this line.
    logs_after: Option<i64>,
    /// Task runs of this task only (the table).
    task: Option<String>,
    /// `all`: every task run in the table.
    tasks: Option<String>,
}

impl RunQuery {
    fn log_filter(&self) -> Result<LogFilter, PageError> {
        let filter = LogFilter {
            level: self.level.clone().filter(|l| !l.is_empty()),
            after: self.logs_after,
            limit: LOG_PAGE,
        };
        filter.levels().map_err(bad_request)?;
        Ok(filter)
    }
}

/// The page of run `id`, which is not of the kind a page was asked for: sent there if it
/// is of the other kind, else a 404.
async fn elsewhere(store: &dyn kiln_store::Store, id: Uuid, asked: RunKind) -> PageResult {
    let (found, page, what) = match asked {
        RunKind::Flow => (store.task_run(id).await?.is_some(), "task-runs", "flow run"),
        RunKind::Task => (store.flow_run(id).await?.is_some(), "runs", "task run"),
    };
    if found {
        return Ok(Redirect::to(&format!("/{page}/{id}")).into_response());
    }
    Err(PageError(Problem::new(
        StatusCode::NOT_FOUND,
        format!("no {what} with id {id}"),
    )))
}

/// `GET /runs/{id}`: a flow run, its graph, timeline, task runs, subflows and logs.
pub(crate) async fn flow_run(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<RunQuery>, QueryRejection>,
) -> PageResult {
    let q = query(q)?;
    let id = run_id(&id)?;
    let store = &ui.app.store;
    let Some(run) = store.flow_run(id).await? else {
        return elsewhere(&**store, id, RunKind::Flow).await;
    };
    let log_filter = q.log_filter()?;
    let (states, task_runs, edges, subflows, logs) = tokio::try_join!(
        store.states(id),
        store.task_runs(id),
        store.edges(id),
        store.subflow_runs(id),
        store.list_logs(id, &log_filter),
    )?;
    let retried: Vec<Uuid> = task_runs
        .iter()
        .filter(|r| r.attempt > 1)
        .take(ATTEMPT_LOOKUPS)
        .map(|r| r.id)
        .collect();
    let histories = futures::future::try_join_all(retried.iter().map(|id| store.states(*id))).await?;
    let attempts: HashMap<Uuid, Vec<StateRecord>> = retried.into_iter().zip(histories).collect();
    let mut sub_graphs = Vec::new();
    for s in subflows.iter().take(SUBFLOW_GRAPHS) {
        let (runs, edges) = tokio::try_join!(store.task_runs(s.id), store.edges(s.id))?;
        sub_graphs.push((s, runs, edges));
    }
    let kept = shown_final(&headers, "result") && run.state.is_terminal();
    let result = result_of(&ui, id, run.result.is_some() && !kept).await;
    let now = now_micros();
    let deployment = deployment_of(&run.tags).map(str::to_owned);
    let can_cancel = viewer.can_change && !run.state.is_terminal() && run.parent_id.is_none();
    let can_retry = viewer.can_change && deployment.is_some() && run.state.is_terminal() && !run.state.is_success();
    let shown: Vec<&TaskRun> = task_runs
        .iter()
        .filter(|t| q.task.as_deref().is_none_or(|name| t.name == name))
        .collect();
    let all_tasks = q.tasks.as_deref() == Some("all");
    let title = format!("{} {}", run.name, short_id(id));
    let body = html! {
        div #run-head data-live data-poll[!run.state.is_terminal()] {
            h1 { "Flow run " (run.name) " " (badge(run.state)) }
            @if let Some(m) = &run.state_message { p.message { (m) } }
            div.actions {
                @if can_retry {
                    (action_form(id, "retry", "Retry", &viewer, None))
                }
                @if can_cancel {
                    (action_form(id, "cancel", "Cancel", &viewer, Some("Cancel this run?")))
                }
            }
            dl.facts {
                dt { "Id" } dd { code { (id) } }
                @if let Some(d) = &deployment { dt { "Deployment" } dd { a href={ "/runs?deployment=" (encode(d)) } { (d) } } }
                @if let Some(p) = run.parent_id { dt { "Parent" } dd { a href={ "/runs/" (p) } { code { (p) } } } }
                @if let Some(r) = run.retry_of { dt { "Retries" } dd { a href={ "/runs/" (r) } { code { (r) } } } }
                (times(run.created, run.start_time, run.end_time, now))
                dt { "Attempt" } dd { (run.attempt) }
                dt { "Tags" } dd { @for t in &run.tags { a.tag href={ "/runs?tag=" (encode(t)) } { (t) } " " } }
                dt { "Task runs" } dd { (task_runs.len()) }
            }
            @if !can_retry && run.state.is_terminal() && !run.state.is_success() && deployment.is_none() && run.parent_id.is_none() {
                p.note { "Retry it where it ran: " code { "kiln runs retry " (id) } }
            }
        }
        section aria-labelledby="params-h" {
            h2 #params-h { "Parameters" }
            pre.json { (pretty(&run.parameters)) }
        }
        @if result.is_some() {
            section #result data-live data-final[run.state.is_terminal()] aria-labelledby="result-h" {
                h2 #result-h { "Result" }
                (result_markup(id, &result, "the flow does not persist its result"))
            }
        }
        section #graph data-live aria-labelledby="graph-h" {
            h2 #graph-h { "Task graph" }
            div.scroll { (graph_svg(&task_runs, &edges, &format!("/runs/{id}"))) }
            @for (s, runs, edges) in &sub_graphs {
                details.subflow {
                    summary { "Subflow " a href={ "/runs/" (s.id) } { (s.name) } " " (badge(s.state)) " · " (runs.len()) " task runs" }
                    div.scroll { (graph_svg(runs, edges, &format!("/runs/{}", s.id))) }
                }
            }
            @if subflows.len() > SUBFLOW_GRAPHS {
                p { "More subflows: "
                    @for s in subflows.iter().skip(SUBFLOW_GRAPHS) { a href={ "/runs/" (s.id) } { (s.name) " " (short_id(s.id)) } " " (badge(s.state)) " " }
                }
            }
        }
        section #timeline data-live aria-labelledby="timeline-h" {
            h2 #timeline-h { "Timeline" }
            div.scroll { (timeline_svg(&task_runs, &attempts, now)) }
        }
        section #task-runs data-live aria-labelledby="tasks-h" {
            h2 #tasks-h { "Task runs" }
            @let counts = state_counts(task_runs.iter().map(|t| t.state));
            @if !counts.is_empty() {
                svg.statebar width="300" height="10" role="img" aria-label={ "Task runs by state: " @for (s, n) in &counts { (n) " " (s.as_str()) "; " } } {
                    (state_bar(&counts, 0.0, 0.0, 300.0, 10.0))
                }
            }
            @if let Some(task) = &q.task { p { "Only task " code { (task) } ". " a href={ "/runs/" (id) "#task-runs" } { "All tasks" } } }
            table.task-runs {
                (head("Task runs of this flow run", &["Task run", "State", "Attempts", "Start", "Duration", "Result"]))
                tbody {
                    @for t in shown.iter().take(if all_tasks { usize::MAX } else { TASK_ROWS }) {
                        tr data-run=(t.id) {
                            td { a href={ "/task-runs/" (t.id) } { (t.name) } " " code.dim { (short_id(t.id)) } }
                            td { (badge(t.state)) }
                            td.num { (t.attempt) }
                            td { @if let Some(s) = t.start_time { (when(s)) } @else { "—" } }
                            td { (duration(t.start_time, t.end_time, now)) }
                            td { @if t.result.is_some() { a href={ "/task-runs/" (t.id) "#result" } { "persisted" } } @else { "—" } }
                        }
                    }
                }
            }
            @if shown.len() > TASK_ROWS && !all_tasks {
                p { (TASK_ROWS) " of " (shown.len()) " shown. " a href={ "/runs/" (id) "?tasks=all#task-runs" } { "Show all" } }
            }
        }
        (logs_section(&format!("/runs/{id}"), &q, &logs))
        section aria-labelledby="history-h" {
            h2 #history-h { "State history" }
            (history_table(&states))
        }
    };
    Ok(html_response(layout(&title, Some(&viewer), "/runs", body)))
}

/// A button that changes run `id` (`POST /runs/{id}/{action}`), asking `confirm` first.
fn action_form(id: Uuid, action: &str, label: &str, viewer: &Viewer, confirm: Option<&str>) -> Markup {
    html! {
        form method="post" action={ "/runs/" (id) "/" (action) } data-confirm=[confirm] {
            input type="hidden" name="csrf" value=(viewer.csrf);
            button.danger[confirm.is_some()] type="submit" { (label) }
        }
    }
}

/// A run's times, as entries of a `dl.facts`.
fn times(created: Micros, start: Option<Micros>, end: Option<Micros>, now: Micros) -> Markup {
    html! {
        dt { "Created" } dd { (when(created)) }
        dt { "Started" } dd { @if let Some(s) = start { (when(s)) } @else { "—" } }
        dt { "Ended" } dd { @if let Some(e) = end { (when(e)) } @else { "—" } }
        dt { "Duration" } dd { (duration(start, end, now)) }
    }
}

fn logs_section(base: &str, q: &RunQuery, logs: &LogPage) -> Markup {
    let level = q.level.clone().unwrap_or_default().to_ascii_lowercase();
    html! {
        section #logs data-live aria-labelledby="logs-h" {
            h2 #logs-h { "Logs" }
            nav.levels aria-label="Log level" {
                "Level: "
                @for (value, label) in [("", "all"), ("debug", "debug"), ("info", "info"), ("warn", "warnings"), ("error", "errors")] {
                    @if level == value {
                        strong aria-current="true" { (label) }
                    } @else {
                        a href={ (base) @if !value.is_empty() { "?level=" (value) } "#logs" } { (label) }
                    }
                    " "
                }
            }
            @if logs.logs.is_empty() {
                p.empty { "No log lines" @if !level.is_empty() { " at this level" } "." }
            } @else {
                ol.logs {
                    @for l in &logs.logs {
                        li.(format!("lv-{}", l.level.to_ascii_lowercase())) {
                            span.ts { (when(l.timestamp)) } " "
                            span.lv { (l.level) } " "
                            @if l.run_id.to_string() != base.rsplit('/').next().unwrap_or("") {
                                a.dim href={ "/task-runs/" (l.run_id) } { (short_id(l.run_id)) } " "
                            }
                            span.msg { (l.message) }
                        }
                    }
                }
            }
            @if let Some(next) = logs.next {
                p { a href={ (base) "?logs_after=" (next) @if !level.is_empty() { "&level=" (level) } "#logs" } { "Later lines →" } }
            }
        }
    }
}

fn history_table(states: &[StateRecord]) -> Markup {
    html! {
        table.history {
            (head("State history", &["#", "State", "Attempt", "At", "Message"]))
            tbody {
                @for s in states {
                    tr { td.num { (s.seq) } td { (badge(s.state)) } td.num { (s.attempt) } td { (when(s.timestamp)) } td { (s.message.as_deref().unwrap_or("")) } }
                }
            }
        }
    }
}

pub(super) fn run_id(text: &str) -> Result<Uuid, PageError> {
    Uuid::parse_str(text).map_err(|_| {
        PageError(Problem::new(
            StatusCode::NOT_FOUND,
            format!("'{text}' is not a run id; search for it on the runs page"),
        ))
    })
}

// ---------------------------------------------------------------------------------------
// A task run

/// `GET /task-runs/{id}`: a task run, its history, inputs, logs and result.
pub(crate) async fn task_run(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<RunQuery>, QueryRejection>,
) -> PageResult {
    let q = query(q)?;
    let id = run_id(&id)?;
    let store = &ui.app.store;
    let Some(run) = store.task_run(id).await? else {
        return elsewhere(&**store, id, RunKind::Task).await;
    };
    let log_filter = q.log_filter()?;
    let (states, logs) = tokio::try_join!(store.states(id), store.list_logs(id, &log_filter))?;
    let kept = shown_final(&headers, "result") && run.state.is_terminal();
    let result = result_of(&ui, id, run.result.is_some() && !kept).await;
    let now = now_micros();
    let can_cancel = viewer.can_change && !run.state.is_terminal();
    let body = html! {
        div #run-head data-live data-poll[!run.state.is_terminal()] {
            h1 { "Task run " (run.name) " " (badge(run.state)) }
            @if let Some(m) = &run.state_message { p.message { (m) } }
            @if can_cancel {
                div.actions {
                    (action_form(id, "cancel", "Cancel", &viewer, Some("Cancel this task run?")))
                }
            }
            dl.facts {
                dt { "Id" } dd { code { (id) } }
                @if let Some(f) = run.flow_run_id { dt { "Flow run" } dd { a href={ "/runs/" (f) } { code { (f) } } } }
                dt { "Task" } dd { code { (run.task_key) } }
                (times(run.created, run.start_time, run.end_time, now))
                dt { "Attempts" } dd { (run.attempt) }
                @if !run.tags.is_empty() { dt { "Tags" } dd { @for t in &run.tags { span.tag { (t) } " " } } }
            }
        }
        @if !kept {
            section #result data-live data-final[run.state.is_terminal()] aria-labelledby="result-h" {
                h2 #result-h { "Result" }
                (result_markup(id, &result, "the task is not finished, or it does not persist its result"))
            }
        }
        section aria-labelledby="inputs-h" {
            h2 #inputs-h { "Inputs" }
            pre.json { (pretty(&run.inputs)) }
        }
        (logs_section(&format!("/task-runs/{id}"), &q, &logs))
        section aria-labelledby="history-h" {
            h2 #history-h { "State history" }
            (history_table(&states))
        }
    };
    let title = format!("{} {}", run.name, short_id(id));
    Ok(html_response(layout(&title, Some(&viewer), "/runs", body)))
}

/// Whether the page asking (a live refresh) holds the final version of its part `id`
/// already (`X-Kiln-Final`): then it is neither computed nor sent again.
fn shown_final(headers: &HeaderMap, id: &str) -> bool {
    headers
        .get("x-kiln-final")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|part| part.trim() == id))
}

type ResultView = Option<Result<(crate::results::Reference, Preview), Problem>>;

/// The result of run `id` read and checked, if it has one.
async fn result_of(ui: &Ui, id: Uuid, has_result: bool) -> ResultView {
    if has_result {
        Some(crate::results::preview(&ui.app, id).await)
    } else {
        None
    }
}

fn result_markup(id: Uuid, result: &ResultView, why_none: &str) -> Markup {
    html! {
        @match result {
            None => p.empty { "No persisted result (" (why_none) ")." },
            Some(Err(problem)) => p.alert role="alert" { "This result cannot be read: " (problem.detail) },
            Some(Ok((r, preview))) => (result_section(id, r, preview)),
        }
    }
}

fn result_section(id: Uuid, r: &crate::results::Reference, preview: &Preview) -> Markup {
    let content = format!("/api/v1/runs/{id}/result/content");
    html! {
        dl.facts.result-meta {
            dt { "Serializer" } dd { code { (r.serializer) } }
            dt { "Size" } dd { (bytes(r.size)) " (" (r.size) " bytes)" }
            dt { "Hash" } dd { code.hash { (r.hash) } }
            dt { "Storage" } dd { code { (r.storage) } }
            dt { "Key" } dd { code { (r.key) } }
            @if let Some(expires) = r.expires { dt { "Expires" } dd { (when(expires)) } }
        }
        @match preview {
            Preview::Corrupt(detail) => {
                p.alert.corrupt role="alert" { "The record does not verify: " (detail) }
                p { a href=(content) download { "Download the raw record anyway" } }
            }
            Preview::Image { width, height } => {
                p.verified { "✓ hash verified · image " (width) " × " (height) " pixels" }
                figure.preview {
                    img #result-image src={ (content) "?as=png" } alt={ "The result of task run " (id) ", " (width) " by " (height) " pixels" }
                        width=(width) height=(height) loading="lazy";
                }
                p { a href={ (content) "?as=png" } download { "Download as PNG" } " · " a href=(content) download { "raw" } }
            }
            Preview::Json { text, truncated } => {
                p.verified { "✓ hash verified" }
                pre.json.preview { (text) }
                @if *truncated { p.note { "Truncated. " } }
                p { a href={ (content) "?as=json" } download { "Download as JSON" } " · " a href=(content) download { "raw" } }
            }
            Preview::Raw => {
                p.verified { "✓ hash verified" }
                p { "No preview for this serializer. " a href=(content) download { "Download" } }
            }
            Preview::TooLarge => {
                p.note { "Too large to check and preview here. " a href=(content) download { "Download" } " (verified as it streams)" }
            }
        }
    }
}

pub(super) fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", n as f64 / 1_073_741_824.0),
    }
}

// ---------------------------------------------------------------------------------------
// Actions

/// The CSRF field of a form that changes something.
#[derive(Debug, Deserialize)]
pub(super) struct Action {
    pub(super) csrf: String,
}

pub(super) fn checked(viewer: &Viewer, form: Result<Form<Action>, FormRejection>) -> Result<(), PageError> {
    let Form(action) = form.map_err(|e| bad_request(e.body_text()))?;
    guard(viewer, &action.csrf)
}

/// A change is allowed: the form's CSRF token is the session's, and the token may change things.
pub(super) fn guard(viewer: &Viewer, csrf: &str) -> Result<(), PageError> {
    if !viewer.csrf_ok(csrf) {
        return Err(PageError(Problem::new(
            StatusCode::FORBIDDEN,
            "this form is stale or came from elsewhere (its CSRF token does not match your session); reload the page and try again",
        )));
    }
    if !viewer.can_change {
        return Err(PageError(Problem::new(
            StatusCode::FORBIDDEN,
            "a read-only token cannot change runs",
        )));
    }
    Ok(())
}

/// `POST /runs/{id}/cancel`: as `kiln runs cancel`.
pub(crate) async fn cancel(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    form: Result<Form<Action>, FormRejection>,
) -> PageResult {
    checked(&viewer, form)?;
    let id = run_id(&id)?;
    kiln::deployment::cancel(&*ui.app.store, id)
        .await
        .map_err(|e| PageError(Problem::from(e)))?;
    Ok(Redirect::to(&format!("/runs/{id}")).into_response())
}

/// `POST /runs/{id}/retry`: a new run of the flow run's deployment with the same
/// parameters, which loads the results the first one persisted.
pub(crate) async fn retry(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    form: Result<Form<Action>, FormRejection>,
) -> PageResult {
    checked(&viewer, form)?;
    let id = run_id(&id)?;
    let store = &ui.app.store;
    let run = store
        .flow_run(id)
        .await?
        .ok_or_else(|| PageError(Problem::new(StatusCode::NOT_FOUND, format!("no flow run with id {id}"))))?;
    let Some(name) = deployment_of(&run.tags) else {
        return Err(PageError(Problem::new(
            StatusCode::CONFLICT,
            format!("flow run {id} did not come from a deployment: retry it where it ran (`kiln runs retry {id}`)"),
        )));
    };
    if !run.state.is_terminal() || run.state.is_success() {
        return Err(PageError(Problem::new(
            StatusCode::CONFLICT,
            format!(
                "flow run {id} is {}; only a run that ended without success is retried",
                run.state.as_str()
            ),
        )));
    }
    let deployments = store.deployments().await?;
    let own: Vec<String> = deployments
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.tags.clone())
        .unwrap_or_default();
    let tags = run
        .tags
        .iter()
        .filter(|t| !t.starts_with("deployment:") && !own.contains(t))
        .cloned()
        .collect();
    let request = kiln::deployment::RunRequest {
        parameters: run.parameters.clone(),
        tags,
        scheduled: None,
        retry_of: Some(id),
    };
    let new = kiln::deployment::run_deployment(&**store, name, request)
        .await
        .map_err(|e| PageError(Problem::from(e)))?;
    Ok(Redirect::to(&format!("/runs/{new}")).into_response())
}

// ---------------------------------------------------------------------------------------
// Login

#[derive(Debug, Default, Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    next: Option<String>,
}

fn login_page(next: &str, error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        "",
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.alert role="alert" { (e) } }
            form.login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
            p.note { "Tokens are made on the server: " code { "kiln server token create NAME" } " (add " code { "--read-only" } " for one that may only look)." }
        },
    )
}

/// `GET /login`.
pub(crate) async fn login(State(ui): State<Arc<Ui>>, q: Result<Query<LoginQuery>, QueryRejection>) -> PageResult {
    let q = query(q)?;
    let next = super::session::safe_next(q.next.as_deref());
    if !super::session::server_has_tokens(&ui).await? {
        return Ok(Redirect::to(&next).into_response());
    }
    Ok(html_response(login_page(&next, None)))
}

/// `POST /login`: sets the session cookie when the token is valid.
pub(crate) async fn log_in(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> PageResult {
    let Form(form) = form.map_err(|e| bad_request(e.body_text()))?;
    let next = super::session::safe_next(form.next.as_deref());
    if let Some(refused) = super::session::foreign_origin(&headers) {
        return Ok(refused);
    }
    match super::session::token_for(&ui, &form.token).await? {
        Some(_) => {
            let mut response = Redirect::to(&next).into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                super::session::cookie(Some(form.token.trim()), &headers),
            );
            Ok(response)
        }
        None => Ok((
            StatusCode::UNAUTHORIZED,
            html_response(login_page(&next, Some("This token is unknown or was revoked."))),
        )
            .into_response()),
    }
}

/// `POST /logout`.
pub(crate) async fn log_out(
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    form: Result<Form<Action>, FormRejection>,
) -> PageResult {
    let Form(action) = form.map_err(|e| bad_request(e.body_text()))?;
    if !viewer.csrf_ok(&action.csrf) {
        return Err(bad_request("this form is stale; reload the page"));
    }
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, super::session::cookie(None, &headers));
    Ok(response)
}

/// Pages that are not there.
pub(crate) fn not_found(path: &str) -> Response {
    refusal(StatusCode::NOT_FOUND, &format!("there is no page at {path}"))
}
