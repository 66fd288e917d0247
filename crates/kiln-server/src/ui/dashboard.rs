//! The dashboard: flow runs by state over a window (stacked bars drawn as SVG), the latest
//! failures, and the slowest task runs of the window.

use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use kiln_store::model::{FlowRun, Micros, RunFilter, TaskRun, now_micros};
use kiln_store::state::StateType;
use maud::{Markup, html};
use serde::Deserialize;

use super::Ui;
use super::graph::{state_bar, state_counts};
use super::pages::{PageResult, badge, head, html_response, layout, query, short_id, span, when};
use super::session::Viewer;

/// Runs read for the chart at most (pages of the store's listing).
const CHART_RUNS: usize = 20_000;
/// Task runs looked at for the slowest.
const TASK_SAMPLE: usize = 5_000;
const BARS: i64 = 24;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct DashboardQuery {
    /// The window, in hours (24 by default; 1 to 720).
    hours: Option<i64>,
}

/// `GET /dashboard`.
pub(crate) async fn show(
    State(ui): State<Arc<Ui>>,
    Extension(viewer): Extension<Viewer>,
    q: Result<Query<DashboardQuery>, QueryRejection>,
) -> PageResult {
    let q = query(q)?;
    let hours = q.hours.unwrap_or(24).clamp(1, 720);
    let store = &ui.app.store;
    let now = now_micros();
    let since = now - hours * 3_600_000_000;
    let mut runs: Vec<FlowRun> = Vec::new();
    let mut after = None;
    loop {
        let filter = RunFilter {
            since: Some(since),
            after,
            ..RunFilter::newest(1_000)
        };
        let page = store.list_flow_runs(&filter).await?;
        runs.extend(page.runs);
        after = page.next;
        if after.is_none() || runs.len() >= CHART_RUNS {
            break;
        }
    }
    let failures_filter = RunFilter {
        states: vec![StateType::Failed, StateType::Crashed, StateType::TimedOut],
        ..RunFilter::newest(10)
    };
    let tasks_filter = RunFilter {
        since: Some(since),
        ..RunFilter::newest(TASK_SAMPLE)
    };
    let (failures, tasks) = tokio::try_join!(
        store.list_flow_runs(&failures_filter),
        store.list_task_runs(&tasks_filter)
    )?;
    // Runs that never started (cached, cancelled while waiting) have no duration.
    let mut slowest: Vec<&TaskRun> = tasks
        .runs
        .iter()
        .filter(|t| t.start_time.is_some() && t.end_time.is_some())
        .collect();
    slowest.sort_by_key(|t| std::cmp::Reverse(t.end_time.unwrap_or(0) - t.start_time.unwrap_or(0)));
    slowest.truncate(10);
    let totals = state_counts(runs.iter().map(|r| r.state));
    let body = html! {
        h1 { "Dashboard" }
        nav.levels aria-label="Window" {
            "Window: "
            @for (h, label) in [(1, "1 hour"), (24, "24 hours"), (168, "7 days"), (720, "30 days")] {
                @if h == hours { strong aria-current="true" { (label) } } @else { a href={ "/dashboard?hours=" (h) } { (label) } }
                " "
            }
        }
        section #dash-chart data-live aria-labelledby="chart-h" {
            h2 #chart-h { "Flow runs by state" }
            p {
                (runs.len()) " flow runs in the window"
                @if runs.len() >= CHART_RUNS { " (the newest " (CHART_RUNS) " are drawn)" }
                @for (s, n) in &totals { " · " (badge(*s)) " " (n) }
            }
            (chart(&runs, since, now))
        }
        section #dash-failures data-live aria-labelledby="failures-h" {
            h2 #failures-h { "Latest failures" }
            @if failures.runs.is_empty() { p.empty { "No failed flow run." } } @else {
                table {
                    (head("The latest failed flow runs", &["Run", "Flow", "State", "Ended", "Why"]))
                    tbody {
                        @for r in &failures.runs {
                            tr {
                                td { a href={ "/runs/" (r.id) } { code { (short_id(r.id)) } } }
                                td { (r.name) }
                                td { (badge(r.state)) }
                                td { @if let Some(e) = r.end_time { (when(e)) } }
                                td.message { (r.state_message.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        section #dash-slowest data-live aria-labelledby="slowest-h" {
            h2 #slowest-h { "Slowest task runs" }
            p.note { "Among the newest " (TASK_SAMPLE) " task runs of the window." }
            @if slowest.is_empty() { p.empty { "No finished task run in the window." } } @else {
                table {
                    (head("The slowest task runs", &["Task run", "State", "Duration", "Flow run"]))
                    tbody {
                        @for t in &slowest {
                            tr {
                                td { a href={ "/task-runs/" (t.id) } { (t.name) } " " code.dim { (short_id(t.id)) } }
                                td { (badge(t.state)) }
                                td { (span(t.end_time.unwrap_or(0) - t.start_time.unwrap_or(0))) }
                                td { @if let Some(f) = t.flow_run_id { a href={ "/runs/" (f) } { code { (short_id(f)) } } } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(html_response(layout("Dashboard", Some(&viewer), "/dashboard", body)))
}

/// Stacked bars: the window cut in [`BARS`] slices, each bar the runs created in it by state.
fn chart(runs: &[FlowRun], since: Micros, now: Micros) -> Markup {
    const W: f64 = 900.0;
    const H: f64 = 160.0;
    let slice = ((now - since) / BARS).max(1);
    let mut buckets: Vec<Vec<StateType>> = vec![Vec::new(); BARS as usize];
    for r in runs {
        let i = ((r.created - since) / slice).clamp(0, BARS - 1) as usize;
        buckets[i].push(r.state);
    }
    let most = buckets.iter().map(Vec::len).max().unwrap_or(0).max(1) as f64;
    let bar_w = W / BARS as f64;
    html! {
        svg.chart role="img" width=(W) height=(H + 20.0) viewBox=(format!("0 0 {W} {}", H + 20.0))
            aria-label={ "Flow runs created per " (span(slice)) ", by state; the tallest bar is " (most) " runs" } {
            @for (i, states) in buckets.iter().enumerate() {
                @let counts = state_counts(states.iter().copied());
                @let height = H * states.len() as f64 / most;
                @let x = i as f64 * bar_w;
                g.bar-slice {
                    title { (states.len()) " runs from " (span(slice * i as i64)) " into the window" }
                    (vertical_bar(&counts, x + 2.0, H - height, bar_w - 4.0, height))
                }
            }
            text.tick x="0" y=(H + 15.0) { "−" (span(now - since)) }
            text.tick x=(W) y=(H + 15.0) text-anchor="end" { "now" }
        }
    }
}

/// One bar of the chart, its states stacked bottom to top.
fn vertical_bar(counts: &[(StateType, usize)], x: f64, y: f64, w: f64, h: f64) -> Markup {
    // state_bar lays parts along x; the chart wants them along y: draw it rotated.
    html! {
        g transform=(format!("translate({x:.1},{:.1}) rotate(-90)", y + h)) {
            (state_bar(counts, 0.0, 0.0, h, w))
        }
    }
}
