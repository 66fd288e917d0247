//! Deployments (schedules, next runs, a run form made from the flow's parameter schema) and
//! work pools (limits, queued runs, the processes that serve them and their heartbeats).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use kiln_store::model::{Micros, RunFilter, now_micros};
use kiln_store::work::{Deployment, Schedule};
use maud::{Markup, html};
use serde_json::Value;

use super::Ui;
use super::pages::{
    PageError, PageResult, bad_request, badge, duration, guard, head, html_response, layout, pretty, short_id, span,
    when,
};
use super::session::{Viewer, encode, segment};
use crate::Problem;

/// Next runs of a schedule shown.
const NEXT_RUNS: usize = 3;
/// Recent runs of a deployment shown on its page.
const RECENT: usize = 20;

fn schedule_text(schedule: &Option<Schedule>) -> String {
    match schedule {
        None => "—".into(),
        Some(Schedule::Cron { expr, timezone }) => {
            format!("cron {expr} ({})", timezone.as_deref().unwrap_or("UTC"))
        }
        Some(Schedule::Interval { seconds }) => format!("every {}", span(*seconds as i64 * 1_000_000)),
    }
}

fn next_runs(d: &Deployment, now: Micros) -> Markup {
    let Some(schedule) = &d.schedule else {
        return html! { "—" };
    };
    match kiln::deployment::next_slots(schedule, now, now + 366 * 86_400 * 1_000_000, NEXT_RUNS) {
        Ok(slots) if !slots.is_empty() => html! {
            ul.plain { @for s in slots { li { (when(s)) } } }
        },
        Ok(_) => html! { "none within a year" },
        Err(e) => html! { span.bad { (e) } },
    }
}

/// `GET /deployments`.
pub(crate) async fn list(State(ui): State<Arc<Ui>>, Extension(viewer): Extension<Viewer>) -> PageResult {
    let deployments = ui.app.store.deployments().await?;
    let now = now_micros();
    let body = html! {
        h1 { "Deployments" }
        @if deployments.is_empty() {
            p.empty { "No deployment yet: a serving process registers them (" code { "kiln::serve().deployment(flow.deploy(\"name\"))" } ")." }
        } @else {
            table {
                (head("Deployments", &["Deployment", "Flow", "Work pool", "Schedule", "Next runs", "Concurrency", "Attempts", "Tags", "Runs"]))
                tbody {
                    @for d in &deployments {
                        tr {
                            td { a href={ "/deployments/" (segment(&d.name)) } { (d.name) } }
                            td { (d.flow) }
                            td { a href={ "/work-pools#pool-" (encode(&d.pool)) } { (d.pool) } }
                            td { (schedule_text(&d.schedule)) @if d.catchup { " · catches up" } }
                            td { (next_runs(d, now)) }
                            td.num { @if let Some(c) = d.concurrency { (c) } @else { "—" } }
                            td.num { (d.max_attempts) }
                            td.tags { @for t in &d.tags { span.tag { (t) } " " } }
                            td { a href={ "/runs?deployment=" (encode(&d.name)) } { "runs" } }
                        }
                    }
                }
            }
        }
    };
    Ok(html_response(layout(
        "Deployments",
        Some(&viewer),
        "/deployments",
        body,
    )))
}

/// The form's fields for the flow's parameters, from its JSON Schema: numbers, booleans and
/// strings as inputs of their kind, anything else as JSON; defaults filled in.
fn parameter_fields(d: &Deployment, given: Option<&HashMap<String, String>>) -> Markup {
    let properties = d.parameter_schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let required: Vec<&str> = d.parameter_schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    html! {
        @if properties.is_empty() { p.note { "This flow takes no parameters." } }
        @for (name, schema) in &properties {
            @let id = format!("p-{name}");
            @let default = &d.parameters[name.as_str()];
            @let kind = kind_of(schema);
            @let given = given.and_then(|g| g.get(&field(name))).cloned();
            @let value = given.unwrap_or_else(|| match default {
                Value::Null => String::new(),
                // A JSON field shows JSON (a string quoted); the others the bare value.
                Value::String(s) if kind != "JSON" => s.clone(),
                v => v.to_string(),
            });
            div.field {
                label for=(id) { code { (name) } " " span.dim { (kind) @if required.contains(&name.as_str()) && default.is_null() { ", required" } } }
                @match kind {
                    "integer" | "number" => input #(id) type="number" name=(field(name)) value=(value) step=(if kind == "integer" { "1" } else { "any" });,
                    "boolean" => {
                        select #(id) name=(field(name)) {
                            option value="true" selected[value == "true"] { "true" }
                            option value="false" selected[value != "true"] { "false" }
                        }
                    },
                    "string" => input #(id) type="text" name=(field(name)) value=(value);,
                    _ => textarea #(id) name=(field(name)) rows="3" { (value) },
                }
                @if let Some(description) = schema["description"].as_str() { p.note { (description) } }
            }
        }
    }
}

/// The form field of parameter `name` (prefixed: a parameter may be called `csrf`).
fn field(name: &str) -> String {
    format!("p.{name}")
}

/// A property's type, as the form treats it.
fn kind_of(schema: &Value) -> &'static str {
    let ty = match &schema["type"] {
        Value::String(t) => Some(t.as_str()),
        // `["integer", "null"]`: an Option.
        Value::Array(types) => types.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    };
    match ty {
        Some("integer") => "integer",
        Some("number") => "number",
        Some("boolean") => "boolean",
        Some("string") => "string",
        _ => "JSON",
    }
}

async fn find(ui: &Ui, name: &str) -> Result<Deployment, PageError> {
    ui.app
        .store
        .deployments()
        .await?
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            PageError(Problem::new(
                StatusCode::NOT_FOUND,
                format!("no deployment named '{name}'"),
            ))
        })
}

/// `GET /deployments/{name}`: the deployment, its recent runs, and a form that runs it.
pub(crate) async fn show(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> PageResult {
    let d = find(&ui, &name).await?;
    Ok(html_response(page(&ui, &viewer, &d, None, None).await?))
}

async fn page(
    ui: &Ui,
    viewer: &Viewer,
    d: &Deployment,
    given: Option<&HashMap<String, String>>,
    error: Option<&str>,
) -> Result<Markup, PageError> {
    let filter = RunFilter {
        tag: Some(kiln::deployment::deployment_tag(&d.name)),
        ..RunFilter::newest(RECENT)
    };
    let recent = ui.app.store.list_flow_runs(&filter).await?.runs;
    let now = now_micros();
    let body = html! {
        h1 { "Deployment " (d.name) }
        dl.facts {
            dt { "Flow" } dd { (d.flow) }
            dt { "Work pool" } dd { a href={ "/work-pools#pool-" (encode(&d.pool)) } { (d.pool) } }
            dt { "Schedule" } dd { (schedule_text(&d.schedule)) @if d.catchup { " · missed slots are caught up" } }
            dt { "Next runs" } dd { (next_runs(d, now)) }
            dt { "Concurrency" } dd { @if let Some(c) = d.concurrency { (c) " at once" } @else { "no limit" } }
            dt { "Attempts" } dd { (d.max_attempts) }
            dt { "Registered" } dd { (when(d.updated)) }
        }
        section aria-labelledby="run-h" {
            h2 #run-h { "Run it" }
            @if let Some(e) = error { p.alert role="alert" { (e) } }
            @if viewer.can_change {
                form.run method="post" action={ "/deployments/" (segment(&d.name)) "/run" } {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    (parameter_fields(d, given))
                    button type="submit" { "Run " (d.name) }
                }
            } @else {
                p.note { "A read-only token cannot start runs." }
            }
        }
        section aria-labelledby="defaults-h" {
            h2 #defaults-h { "Default parameters" }
            pre.json { (pretty(&d.parameters)) }
        }
        section aria-labelledby="recent-h" {
            h2 #recent-h { "Recent runs" }
            @if recent.is_empty() { p.empty { "No run yet." } } @else {
                table {
                    (head("Recent runs of this deployment", &["Run", "State", "Created", "Duration"]))
                    tbody {
                        @for r in &recent {
                            tr { td { a href={ "/runs/" (r.id) } { code { (short_id(r.id)) } } } td { (badge(r.state)) } td { (when(r.created)) } td { (duration(r.start_time, r.end_time, now)) } }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(
        &format!("Deployment {}", d.name),
        Some(viewer),
        "/deployments",
        body,
    ))
}

/// The form's values as the flow's parameters: each field parsed as its schema's type says
/// (an empty field is left out, so the deployment's default applies).
fn parameters(d: &Deployment, fields: &HashMap<String, String>) -> Result<Value, String> {
    let properties = d.parameter_schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut out = serde_json::Map::new();
    for (name, schema) in &properties {
        let Some(text) = fields.get(&field(name)).map(|t| t.trim()).filter(|t| !t.is_empty()) else {
            continue;
        };
        let value = match kind_of(schema) {
            "string" => Value::String(text.to_owned()),
            kind => serde_json::from_str(text)
                .map_err(|e| format!("parameter '{name}' is not a valid {kind} ({e}): {text}"))?,
        };
        out.insert(name.clone(), value);
    }
    Ok(Value::Object(out))
}

/// `POST /deployments/{name}/run`: a run of the deployment with the form's parameters,
/// checked against the flow's schema; the form again, saying what is wrong, when they do not fit.
pub(crate) async fn run(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> PageResult {
    let Form(mut fields) = form.map_err(|e| bad_request(e.body_text()))?;
    guard(&viewer, fields.remove("csrf").as_deref().unwrap_or(""))?;
    let d = find(&ui, &name).await?;
    let outcome = match parameters(&d, &fields) {
        Ok(parameters) => {
            let request = kiln::deployment::RunRequest {
                parameters,
                ..Default::default()
            };
            kiln::deployment::run_deployment(&*ui.app.store, &d.name, request).await
        }
        Err(message) => Err(kiln::Error::InvalidParameters(message)),
    };
    match outcome {
        Ok(id) => Ok(Redirect::to(&format!("/runs/{id}")).into_response()),
        Err(kiln::Error::InvalidParameters(message)) => {
            let page = page(&ui, &viewer, &d, Some(&fields), Some(&message)).await?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, html_response(page)).into_response())
        }
        Err(e) => Err(PageError(Problem::from(e))),
    }
}

/// `GET /work-pools`: pools with their limits and queues, and the processes that heartbeat.
pub(crate) async fn pools(State(ui): State<Arc<Ui>>, Extension(viewer): Extension<Viewer>) -> PageResult {
    let store = &ui.app.store;
    let now = now_micros();
    let lease = kiln::heartbeat::lease().as_micros() as i64;
    let (pools, queued, processes, limits, deployments) = tokio::try_join!(
        store.work_pools(),
        store.queued_runs(None, 10_000),
        store.processes(now - 24 * 3_600_000_000),
        store.limits(),
        store.deployments(),
    )?;
    let mut names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    names.extend(deployments.iter().map(|d| d.pool.clone()));
    names.extend(queued.iter().map(|q| q.entry.pool.clone()));
    names.sort();
    names.dedup();
    let body = html! {
        h1 { "Work pools" }
        @if names.is_empty() { p.empty { "No work pool yet." } } @else {
            table {
                (head("Work pools", &["Pool", "Concurrency", "Queued", "Claimed", "Deployments"]))
                tbody {
                    @for name in &names {
                        @let limit = pools.iter().find(|p| &p.name == name).and_then(|p| p.concurrency);
                        @let waiting = queued.iter().filter(|q| &q.entry.pool == name && q.claimed_by.is_none()).count();
                        @let claimed = queued.iter().filter(|q| &q.entry.pool == name && q.claimed_by.is_some()).count();
                        tr #(format!("pool-{}", encode(name))) {
                            td { (name) }
                            td.num { @if let Some(c) = limit { (c) } @else { "no limit" } }
                            td.num { (waiting) }
                            td.num { (claimed) }
                            td { @for d in deployments.iter().filter(|d| &d.pool == name) { a href={ "/deployments/" (segment(&d.name)) } { (d.name) } " " } }
                        }
                    }
                }
            }
        }
        h2 { "Processes (workers and programs)" }
        @if processes.is_empty() { p.empty { "No process has heartbeat in the last day." } } @else {
            table {
                (head("Processes and their heartbeats", &["Process", "Host", "Pid", "Last heartbeat", "Status", "Runs held"]))
                tbody {
                    @for p in &processes {
                        @let silent = now - p.heartbeat;
                        @let own = if p.lease > 0 { p.lease } else { lease };
                        @let held = queued.iter().filter(|q| q.claimed_by == Some(p.id)).count();
                        tr {
                            td { code { (short_id(p.id)) } }
                            td { (p.host) }
                            td.num { (p.pid) }
                            td { (when(p.heartbeat)) " (" (span(silent)) " ago)" }
                            td { @if silent <= own { span.state.st-Running { "alive" } } @else { span.state.st-Crashed { "silent" } } }
                            td.num { (held) }
                        }
                    }
                }
            }
        }
        h2 { "Concurrency limits by tag" }
        @if limits.is_empty() { p.empty { "No tag limit (" code { "kiln limit set TAG N" } ")." } } @else {
            table {
                (head("Concurrency limits by tag", &["Tag", "Slots", "In use"]))
                tbody {
                    @for l in &limits {
                        tr { td { span.tag { (l.limit.tag) } } td.num { (l.limit.slots) } td.num { (l.holders.len()) } }
                    }
                }
            }
        }
    };
    Ok(html_response(layout("Work pools", Some(&viewer), "/work-pools", body)))
}
