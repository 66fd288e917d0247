//! A flow run's pictures, drawn on the server as SVG: the task graph (tasks in columns by
//! their depth, edges from producer to consumer) and the timeline of its task runs.
//!
//! Large maps stay readable: runs of one task at one depth become a single node counting
//! them (with a bar of their states) once there are more than [`GROUP_OVER`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use kiln_store::model::{Edge, Micros, StateRecord, TaskRun};
use kiln_store::state::StateType;
use maud::{Markup, PreEscaped, html};
use uuid::Uuid;

/// Runs of one task at one depth drawn one by one up to this many; a group node beyond.
pub(crate) const GROUP_OVER: usize = 12;

const NODE_W: f64 = 180.0;
const NODE_H: f64 = 34.0;
const COL_GAP: f64 = 70.0;
const ROW_GAP: f64 = 14.0;
const PAD: f64 = 10.0;

/// A node of the drawn graph: one task run, or a group of runs of one task.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) runs: Vec<usize>,
    pub(crate) depth: usize,
    pub(crate) row: usize,
}

/// The graph laid out: nodes with their column and row, edges between node indexes.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) nodes: Vec<Node>,
    pub(crate) edges: Vec<(usize, usize)>,
}

/// Lays out `runs` (in creation order) joined by `edges`: a run's depth is the longest path
/// to it from a run without upstream; within a column, nodes follow the rows of their
/// upstream nodes (fewer crossings), then creation order.
pub(crate) fn layout(runs: &[TaskRun], edges: &[Edge]) -> Layout {
    let index: HashMap<Uuid, usize> = runs.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); runs.len()];
    let mut incoming = vec![0usize; runs.len()];
    for e in edges {
        if let (Some(&u), Some(&d)) = (index.get(&e.upstream), index.get(&e.downstream))
            && u != d
        {
            downstream[u].push(d);
            incoming[d] += 1;
        }
    }
    // Depths in topological order (Kahn); a cycle, which the store never records, would
    // leave runs at depth 0 rather than loop.
    let mut depth = vec![0usize; runs.len()];
    let mut ready: Vec<usize> = (0..runs.len()).filter(|&i| incoming[i] == 0).collect();
    let mut order = Vec::with_capacity(runs.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        for &d in &downstream[i] {
            depth[d] = depth[d].max(depth[i] + 1);
            incoming[d] -= 1;
            if incoming[d] == 0 {
                ready.push(d);
            }
        }
    }
    // Runs grouped by (depth, task) when a task has many runs at one depth.
    let mut per_key: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        per_key.entry((depth[i], r.name.as_str())).or_default().push(i);
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut node_of = vec![0usize; runs.len()];
    for ((d, name), members) in per_key {
        if members.len() > GROUP_OVER {
            for &m in &members {
                node_of[m] = nodes.len();
            }
            nodes.push(Node {
                name: name.to_owned(),
                runs: members,
                depth: d,
                row: 0,
            });
        } else {
            for m in members {
                node_of[m] = nodes.len();
                nodes.push(Node {
                    name: name.to_owned(),
                    runs: vec![m],
                    depth: d,
                    row: 0,
                });
            }
        }
    }
    let mut edge_set: Vec<(usize, usize)> = Vec::new();
    for (u, ds) in downstream.iter().enumerate() {
        for &d in ds {
            edge_set.push((node_of[u], node_of[d]));
        }
    }
    edge_set.sort_unstable();
    edge_set.dedup();
    // Rows: column by column, by the mean row of the upstream nodes, then creation.
    let max_depth = nodes.iter().map(|n| n.depth).max().unwrap_or(0);
    let mut node_upstream: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for &(u, d) in &edge_set {
        node_upstream[d].push(u);
    }
    let mut columns: Vec<Vec<usize>> = vec![Vec::new(); max_depth + 1];
    for (n, node) in nodes.iter().enumerate() {
        columns[node.depth].push(n);
    }
    for mut column in columns {
        let key = |n: usize| -> (f64, usize) {
            let ups = &node_upstream[n];
            let mean = if ups.is_empty() {
                0.0
            } else {
                ups.iter().map(|&u| nodes[u].row as f64).sum::<f64>() / ups.len() as f64
            };
            (mean, nodes[n].runs[0])
        };
        column.sort_by(|&a, &b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal));
        for (row, n) in column.into_iter().enumerate() {
            nodes[n].row = row;
        }
    }
    Layout { nodes, edges: edge_set }
}

fn short(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_owned()
    } else {
        let cut: String = name.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

/// The graph as SVG: each node a link to its task run (a group: to the task run table of
/// the flow run at `page`, filtered to that task), coloured by state.
pub(crate) fn graph_svg(runs: &[TaskRun], edges: &[Edge], page: &str) -> Markup {
    let layout = layout(runs, edges);
    if layout.nodes.is_empty() {
        return html! { p.empty { "No task runs yet." } };
    }
    let columns = layout.nodes.iter().map(|n| n.depth).max().unwrap_or(0) + 1;
    let rows = layout.nodes.iter().map(|n| n.row).max().unwrap_or(0) + 1;
    let width = PAD * 2.0 + columns as f64 * NODE_W + (columns - 1) as f64 * COL_GAP;
    let height = PAD * 2.0 + rows as f64 * NODE_H + (rows - 1) as f64 * ROW_GAP;
    let at = |n: &Node| {
        (
            PAD + n.depth as f64 * (NODE_W + COL_GAP),
            PAD + n.row as f64 * (NODE_H + ROW_GAP),
        )
    };
    let mut paths = String::new();
    for &(u, d) in &layout.edges {
        let (ux, uy) = at(&layout.nodes[u]);
        let (dx, dy) = at(&layout.nodes[d]);
        let (x1, y1) = (ux + NODE_W, uy + NODE_H / 2.0);
        let (x2, y2) = (dx, dy + NODE_H / 2.0);
        let mid = (x1 + x2) / 2.0;
        let _ = write!(
            paths,
            r#"<path class="edge" d="M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}" data-from="{u}" data-to="{d}"/>"#
        );
    }
    html! {
        svg.graph role="group" aria-label={ "Task graph: " (layout.nodes.len()) " nodes, " (layout.edges.len()) " edges" }
            width=(format!("{width:.0}")) height=(format!("{height:.0}")) viewBox=(format!("0 0 {width:.0} {height:.0}")) {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" class="arrow" {}
                }
            }
            g.edges { (PreEscaped(paths)) }
            @for n in &layout.nodes {
                @let (x, y) = at(n);
                @let first = &runs[n.runs[0]];
                @if n.runs.len() == 1 {
                    a href={ "/task-runs/" (first.id) } {
                        g.node.(state_class(first.state)) data-run=(first.id) {
                            title { (first.name) " — " (first.state.as_str()) }
                            rect x=(fmt(x)) y=(fmt(y)) width=(fmt(NODE_W)) height=(fmt(NODE_H)) rx="6" {}
                            text x=(fmt(x + 10.0)) y=(fmt(y + 21.0)) { (short(&n.name, 22)) }
                        }
                    }
                } @else {
                    @let counts = state_counts(n.runs.iter().map(|&i| runs[i].state));
                    a href={ (page) "?task=" (super::session::encode(&n.name)) "#task-runs" } {
                        g.node.group data-runs=(n.runs.len()) {
                            title { (n.name) " — " (n.runs.len()) " runs: " (summary(&counts)) }
                            rect x=(fmt(x)) y=(fmt(y)) width=(fmt(NODE_W)) height=(fmt(NODE_H)) rx="6" {}
                            text x=(fmt(x + 10.0)) y=(fmt(y + 17.0)) { (short(&n.name, 16)) " ×" (n.runs.len()) }
                            (state_bar(&counts, x + 10.0, y + 23.0, NODE_W - 20.0, 5.0))
                        }
                    }
                }
            }
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

/// The CSS class of a state's colour.
pub(crate) fn state_class(state: StateType) -> String {
    format!("st-{}", state.as_str())
}

/// How many of `states` are in each state, in the order states are listed.
pub(crate) fn state_counts(states: impl Iterator<Item = StateType>) -> Vec<(StateType, usize)> {
    let mut counts: Vec<(StateType, usize)> = Vec::new();
    for s in states {
        match counts.iter_mut().find(|(t, _)| *t == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    counts.sort_by_key(|(s, _)| *s as u8);
    counts
}

fn summary(counts: &[(StateType, usize)]) -> String {
    counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A bar split by state, as SVG rectangles.
pub(crate) fn state_bar(counts: &[(StateType, usize)], x: f64, y: f64, w: f64, h: f64) -> Markup {
    let total = counts.iter().map(|(_, n)| n).sum::<usize>().max(1) as f64;
    let mut parts = Vec::with_capacity(counts.len());
    let mut left = x;
    for (state, n) in counts {
        let part = w * *n as f64 / total;
        parts.push((*state, left, part));
        left += part;
    }
    html! {
        @for (state, at, part) in parts {
            rect.bar.(state_class(state)) x=(fmt(at)) y=(fmt(y)) width=(fmt(part)) height=(fmt(h)) {}
        }
    }
}

/// Rows of the timeline drawn at most (the task run table lists every run).
pub(crate) const TIMELINE_ROWS: usize = 2_000;
const ROW_H: f64 = 16.0;
const LABEL_W: f64 = 190.0;
const PLOT_W: f64 = 760.0;

/// The timeline: a row per task run in order of start, a bar from its start to its end (or
/// now); a run with retries shows each attempt's time running, the failed ones marked.
/// `attempts` holds the state histories of the runs that were retried.
pub(crate) fn timeline_svg(runs: &[TaskRun], attempts: &HashMap<Uuid, Vec<StateRecord>>, now: Micros) -> Markup {
    let mut rows: Vec<&TaskRun> = runs.iter().filter(|r| r.start_time.is_some()).collect();
    if rows.is_empty() {
        return html! { p.empty { "No task run has started yet." } };
    }
    rows.sort_by_key(|r| (r.start_time, r.created));
    let cut = rows.len() > TIMELINE_ROWS;
    rows.truncate(TIMELINE_ROWS);
    let begin = rows.iter().filter_map(|r| r.start_time).min().unwrap_or(now);
    let end = rows
        .iter()
        .map(|r| r.end_time.unwrap_or(now))
        .max()
        .unwrap_or(now)
        .max(begin + 1);
    let scale = PLOT_W / (end - begin) as f64;
    let x_of = |t: Micros| LABEL_W + (t - begin) as f64 * scale;
    let height = 22.0 + rows.len() as f64 * ROW_H;
    let width = LABEL_W + PLOT_W + 10.0;
    let ticks = 5;
    html! {
        svg.timeline role="group" aria-label={ "Timeline of " (rows.len()) " task runs over " (super::pages::span(end - begin)) }
            width=(fmt(width)) height=(fmt(height)) viewBox=(format!("0 0 {width:.0} {height:.0}")) {
            @for i in 0..=ticks {
                @let t = begin + (end - begin) * i / ticks;
                line.tick x1=(fmt(x_of(t))) x2=(fmt(x_of(t))) y1="14" y2=(fmt(height)) {}
                text.tick x=(fmt(x_of(t))) y="11" text-anchor=(if i == ticks { "end" } else { "start" }) { "+" (super::pages::span(t - begin)) }
            }
            @for (i, r) in rows.iter().enumerate() {
                @let y = 18.0 + i as f64 * ROW_H;
                a href={ "/task-runs/" (r.id) } {
                    g.row data-run=(r.id) {
                        title { (r.name) " — " (r.state.as_str()) (attempts_note(r)) }
                        text.label x="4" y=(fmt(y + 11.0)) { (short(&r.name, 24)) }
                        @match attempts.get(&r.id) {
                            Some(history) if r.attempt > 1 => {
                                @for (from, to, failed) in running_spans(history, r, now) {
                                    rect.(if failed { "span retried" } else { "span" }).(state_class(if failed { StateType::AwaitingRetry } else { r.state }))
                                        x=(fmt(x_of(from))) y=(fmt(y + 2.0)) width=(fmt(((to - from) as f64 * scale).max(2.0))) height=(fmt(ROW_H - 4.0)) {}
                                }
                            }
                            _ => {
                                @let from = r.start_time.unwrap_or(begin);
                                @let to = r.end_time.unwrap_or(now).max(from);
                                rect.span.(state_class(r.state)) x=(fmt(x_of(from))) y=(fmt(y + 2.0))
                                    width=(fmt(((to - from) as f64 * scale).max(2.0))) height=(fmt(ROW_H - 4.0)) {}
                            }
                        }
                    }
                }
            }
        }
        @if cut {
            p.note { "The first " (TIMELINE_ROWS) " task runs to start are drawn; the table below lists all." }
        }
    }
}

fn attempts_note(r: &TaskRun) -> String {
    if r.attempt > 1 {
        format!(" ({} attempts)", r.attempt)
    } else {
        String::new()
    }
}

/// Each attempt's time Running, from its history: (start, end, whether it failed into a retry).
fn running_spans(history: &[StateRecord], run: &TaskRun, now: Micros) -> Vec<(Micros, Micros, bool)> {
    let mut spans = Vec::new();
    let mut started: Option<Micros> = None;
    for s in history {
        match s.state {
            StateType::Running => started = Some(s.timestamp),
            other => {
                if let Some(from) = started.take() {
                    spans.push((from, s.timestamp, other == StateType::AwaitingRetry));
                }
            }
        }
    }
    if let Some(from) = started {
        spans.push((from, run.end_time.unwrap_or(now), false));
    }
    spans
}
