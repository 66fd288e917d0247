//! The conformance suite: what every backend must do, as async functions over `&dyn Store`.
//!
//! A backend's tests call [`store_suite!`](crate::store_suite) with an async expression that
//! makes a fresh store and a guard that keeps its resources alive, or `None` when the
//! backend's server is not available (the test then passes, saying so on stderr):
//!
//! ```ignore
//! kiln_store::store_suite!(async {
//!     let dir = tempfile::tempdir().unwrap();
//!     Some((kiln_store_sqlite::SqliteStore::open(dir.path().join("kiln.db")).unwrap(), dir))
//! });
//! ```

use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::model::*;
use crate::state::StateType::{self, *};
use crate::{Outcome, Report, Store, StoreError, Transition};

/// One `#[test]` per suite function, each on a fresh store made by `$make`.
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        $crate::store_suite!(@tests $make;
            records_a_run_lifecycle,
            state_changes_across_batches_update_the_row,
            the_store_refuses_changes_from_another_state,
            racing_state_changes_have_one_winner,
            edges_logs_and_subflows,
            a_deleted_run_takes_its_records_with_it,
            ids_resolve_exactly_by_prefix_and_by_tail,
            a_failed_write_is_reported_to_its_sender_and_loses_nothing_else,
            lists_newest_first_within_the_limit,
            concurrent_writers_lose_nothing,
            dead_processes_have_their_runs_crashed,
            flow_runs_filter_and_page,
            a_write_delivered_twice_is_applied_once,
            malformed_json_text_is_refused_alone,
            many_task_runs_created_at_once_are_each_recorded,
            task_runs_filter_and_page,
            logs_filter_by_level_and_page,
            counts_runs_by_state,
            claims_hand_each_run_to_one_worker,
            claims_of_dead_processes_are_taken_back,
            claims_respect_concurrency_limits,
            runs_held_back_by_a_limit_do_not_hold_up_the_others,
            queued_task_runs_carry_their_inputs_and_may_be_pinned_to_a_host,
            a_waiting_claim_wakes_when_work_arrives,
            tag_limits_grant_each_slot_once,
            tag_slots_free_when_their_runs_move_on,
            task_runs_are_looked_up_by_id_and_state,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::suite::runtime().block_on(async {
                    let Some((store, _guard)) = $make.await else { return };
                    $crate::suite::$name(&store).await;
                });
            }
        )*
    };
}

/// The runtime the suite's tests run on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Keeps every outcome it is given.
#[derive(Debug, Default)]
pub struct Collect(Mutex<Vec<(String, Outcome)>>);

impl Report for Collect {
    fn report(&self, write: &Write, outcome: Outcome) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((write.to_string(), outcome));
    }
}

impl Collect {
    /// Every write and its outcome, described, sorted by write.
    pub fn outcomes(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(w, o)| format!("{w}: {o:?}"))
            .collect();
        all.sort();
        all
    }

    /// The writes that failed or were rejected, described.
    pub fn problems(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, o)| !matches!(o, Outcome::Applied { .. }))
            .map(|(w, o)| format!("{w}: {o:?}"))
            .collect()
    }
}

/// A new flow run (Pending).
pub fn flow(name: &str, parent: Option<Uuid>) -> NewFlowRun {
    NewFlowRun {
        id: Uuid::now_v7(),
        name: name.into(),
        parent_id: parent,
        parameters: serde_json::json!({ "n": 1, "label": "x" }),
        tags: vec!["t1".into()],
        created: now_micros(),
        initial_state: Pending,
        command: None,
        retry_of: None,
        process_id: None,
    }
}

/// A new task run (Pending).
pub fn task(name: &str, flow: Option<Uuid>) -> NewTaskRun {
    NewTaskRun {
        id: Uuid::now_v7(),
        flow_run_id: flow,
        name: name.into(),
        task_key: format!("suite::{name}").into(),
        inputs: serde_json::json!({ "x": { "type": "u64" } }).into(),
        tags: vec![],
        created: now_micros(),
        initial_state: Pending,
        call_key: None,
        process_id: None,
    }
}

/// A state change of `id` from `from` to `to`.
pub fn change(kind: RunKind, id: Uuid, from: StateType, to: StateType, attempt: u32) -> StateChange {
    StateChange {
        id: write_id(),
        kind,
        run_id: id,
        from,
        to,
        message: None,
        attempt,
        timestamp: now_micros(),
        result: None,
        fence: None,
    }
}

/// The writes of `runs` trivial task runs of flow run `flow_run_id`, as the engine sends
/// them: each run's creation (Pending, with its inputs and call key), Running, Completed.
/// What the SQLite writer's benchmarks flood a store with.
pub fn task_run_flood(flow_run_id: Uuid, runs: usize) -> Vec<Write> {
    let mut writes = Vec::with_capacity(3 * runs);
    for i in 0..runs {
        let mut t = task("step", Some(flow_run_id));
        t.inputs = serde_json::json!({ "x": { "type": "u64", "value": i } }).into();
        t.call_key = Some(format!("suite::step#{i}"));
        t.process_id = Some(flow_run_id);
        let id = t.id;
        writes.push(Write::TaskRun(t));
        writes.push(Write::State(change(RunKind::Task, id, Pending, Running, 1)));
        writes.push(Write::State(change(RunKind::Task, id, Running, Completed, 1)));
    }
    writes
}

/// Moves a run through `states` from `from`, each change accepted.
async fn walk(
    store: &dyn Store,
    kind: RunKind,
    id: Uuid,
    mut from: StateType,
    states: &[(StateType, u32, Option<&str>)],
) {
    for &(state, attempt, message) in states {
        let mut c = change(kind, id, from, state, attempt);
        c.message = message.map(str::to_owned);
        let t = store.set_state(c).await.unwrap();
        assert!(matches!(t, Transition::Accepted { .. }), "{from} -> {state}: {t:?}");
        from = state;
    }
}

/// Sends fire-and-forget writes through `store` with `report`.
fn send(store: &dyn Store, report: &Arc<Collect>, writes: impl IntoIterator<Item = Write>) {
    for w in writes {
        store.send(w, Some(report.clone() as Arc<dyn Report>)).unwrap();
    }
}

/// Creation, a retry and completion: rows, history with positions, times, parameters.
pub async fn records_a_run_lifecycle(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let f = flow("lifecycle", None);
    let t = task("step", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    send(store, &report, [Write::FlowRun(f), Write::TaskRun(t)]);
    walk(store, RunKind::Flow, fid, Pending, &[(Running, 1, None)]).await;
    walk(
        store,
        RunKind::Task,
        tid,
        Pending,
        &[
            (Running, 1, None),
            (AwaitingRetry, 1, Some("boom; retrying")),
            (Running, 2, None),
            (Completed, 2, None),
        ],
    )
    .await;
    walk(store, RunKind::Flow, fid, Running, &[(Completed, 1, None)]).await;
    store.flush().await.unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());

    let fr = store.flow_run(fid).await.unwrap().unwrap();
    assert_eq!((fr.state, fr.attempt, fr.task_count), (Completed, 1, 1));
    assert_eq!(fr.parameters, serde_json::json!({ "n": 1, "label": "x" }));
    assert_eq!(fr.tags, ["t1"]);
    assert!(fr.start_time.is_some() && fr.end_time >= fr.start_time);

    let tr = store.task_run(tid).await.unwrap().unwrap();
    assert_eq!((tr.state, tr.attempt, tr.flow_run_id), (Completed, 2, Some(fid)));
    assert_eq!(tr.inputs["x"]["type"], "u64");
    let history: Vec<(StateType, u32, u32)> = store
        .states(tid)
        .await
        .unwrap()
        .iter()
        .map(|s| (s.state, s.seq, s.attempt))
        .collect();
    assert_eq!(
        history,
        [
            (Pending, 0, 0),
            (Running, 1, 1),
            (AwaitingRetry, 2, 1),
            (Running, 3, 2),
            (Completed, 4, 2)
        ]
    );
    assert_eq!(
        store.states(tid).await.unwrap()[2].message.as_deref(),
        Some("boom; retrying")
    );
    assert_eq!(store.task_runs(fid).await.unwrap().len(), 1);
}

/// State changes flushed one by one update the run's row.
pub async fn state_changes_across_batches_update_the_row(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let t = task("slow", None);
    let id = t.id;
    send(store, &report, [Write::TaskRun(t)]);
    store.flush().await.unwrap();
    assert_eq!(store.task_run(id).await.unwrap().unwrap().state, Pending);
    walk(store, RunKind::Task, id, Pending, &[(Running, 1, None)]).await;
    let running = store.task_run(id).await.unwrap().unwrap();
    assert_eq!((running.state, running.end_time), (Running, None));
    walk(store, RunKind::Task, id, Running, &[(Failed, 1, Some("disk full"))]).await;
    let failed = store.task_run(id).await.unwrap().unwrap();
    assert_eq!(
        (failed.state, failed.state_message.as_deref()),
        (Failed, Some("disk full"))
    );
    assert_eq!(failed.start_time, running.start_time, "the start time is kept");
    assert!(failed.end_time.is_some());
    assert_eq!(store.states(id).await.unwrap().len(), 3);
}

/// The store, not the caller, decides: a change from a state the run is not in, a move the
/// rules forbid, or a change of an unknown run is refused with the state found.
pub async fn the_store_refuses_changes_from_another_state(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let t = task("strict", None);
    let id = t.id;
    send(store, &report, [Write::TaskRun(t)]);
    let k = RunKind::Task;
    // The caller believes the run is Running; it is Pending.
    assert_eq!(
        store.set_state(change(k, id, Running, Completed, 1)).await.unwrap(),
        Transition::Rejected { current: Some(Pending) }
    );
    // Pending -> Completed is not a legal move, whatever the caller believes.
    assert_eq!(
        store.set_state(change(k, id, Pending, Completed, 1)).await.unwrap(),
        Transition::Rejected { current: Some(Pending) }
    );
    assert_eq!(
        store.set_state(change(k, id, Pending, Running, 1)).await.unwrap(),
        Transition::Accepted { seq: 1 }
    );
    assert_eq!(
        store.set_state(change(k, id, Running, Failed, 1)).await.unwrap(),
        Transition::Accepted { seq: 2 }
    );
    // A final state admits nothing.
    assert_eq!(
        store.set_state(change(k, id, Failed, Running, 2)).await.unwrap(),
        Transition::Rejected { current: Some(Failed) }
    );
    // A flow-run change of a task run's id, and an unknown run: no such run.
    assert_eq!(
        store
            .set_state(change(RunKind::Flow, id, Failed, Running, 2))
            .await
            .unwrap(),
        Transition::Rejected { current: None }
    );
    assert_eq!(
        store
            .set_state(change(k, Uuid::now_v7(), Pending, Running, 1))
            .await
            .unwrap(),
        Transition::Rejected { current: None }
    );
    let history: Vec<StateType> = store.states(id).await.unwrap().iter().map(|s| s.state).collect();
    assert_eq!(history, [Pending, Running, Failed], "refused changes are not recorded");
    assert_eq!(store.task_run(id).await.unwrap().unwrap().state, Failed);
}

/// Many callers race to move one run from Pending to Running: exactly one wins.
pub async fn racing_state_changes_have_one_winner(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let t = task("contested", None);
    let id = t.id;
    send(store, &report, [Write::TaskRun(t)]);
    store.flush().await.unwrap();
    let races = (0..16).map(|_| store.set_state(change(RunKind::Task, id, Pending, Running, 1)));
    let outcomes = futures::future::join_all(races).await;
    let accepted = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Transition::Accepted { seq: 1 })))
        .count();
    assert_eq!(accepted, 1, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Ok(Transition::Accepted { .. } | Transition::Rejected { current: Some(Running) })
        )),
        "{outcomes:?}"
    );
    assert_eq!(store.states(id).await.unwrap().len(), 2);
}

/// Edges (recorded once), logs of runs and subflows.
pub async fn edges_logs_and_subflows(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let parent = flow("parent", None);
    let child = flow("child", Some(parent.id));
    let (a, b) = (task("a", Some(parent.id)), task("b", Some(parent.id)));
    let (pid, cid, aid, bid) = (parent.id, child.id, a.id, b.id);
    let edge = Edge {
        upstream: aid,
        downstream: bid,
    };
    send(
        store,
        &report,
        [
            Write::FlowRun(parent),
            Write::FlowRun(child),
            Write::TaskRun(a),
            Write::TaskRun(b),
            Write::Edge {
                flow_run_id: Some(pid),
                edge: edge.clone(),
            },
            // Recorded once.
            Write::Edge {
                flow_run_id: Some(pid),
                edge: edge.clone(),
            },
        ],
    );
    for (run, msg) in [(aid, "from a"), (pid, "from the flow"), (cid, "from the child")] {
        send(
            store,
            &report,
            [Write::Log(LogRecord {
                id: write_id(),
                run_id: run,
                flow_run_id: Some(if run == cid { cid } else { pid }),
                timestamp: now_micros(),
                level: "INFO".into(),
                target: "suite".into(),
                message: msg.into(),
            })],
        );
    }
    store.flush().await.unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    assert_eq!(store.edges(pid).await.unwrap(), [edge]);
    let subs = store.subflow_runs(pid).await.unwrap();
    assert_eq!(subs.iter().map(|f| f.id).collect::<Vec<_>>(), [cid]);
    let msgs = |logs: Vec<LogRecord>| logs.into_iter().map(|l| l.message).collect::<Vec<_>>();
    assert_eq!(msgs(store.logs(aid).await.unwrap()), ["from a"]);
    assert_eq!(msgs(store.logs(pid).await.unwrap()), ["from a", "from the flow"]);
    assert_eq!(msgs(store.logs(cid).await.unwrap()), ["from the child"]);
}

/// Deleting a run: refused while it or one of its runs goes on, and for an id that is no
/// run; then the flow run, its subflow runs and task runs, their histories, edges and logs
/// are gone, and nothing else.
pub async fn a_deleted_run_takes_its_records_with_it(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let parent = flow("parent", None);
    let child = flow("child", Some(parent.id));
    let (a, b) = (task("a", Some(parent.id)), task("b", Some(child.id)));
    let other = flow("other", None);
    let kept = task("kept", Some(other.id));
    let alone = task("alone", None);
    let ids @ [pid, cid, aid, bid, oid, kid, lid] = [parent.id, child.id, a.id, b.id, other.id, kept.id, alone.id];
    send(
        store,
        &report,
        [
            Write::FlowRun(parent),
            Write::FlowRun(child),
            Write::FlowRun(other),
            Write::TaskRun(a),
            Write::TaskRun(b),
            Write::TaskRun(kept),
            Write::TaskRun(alone),
            Write::Edge {
                flow_run_id: Some(pid),
                edge: Edge {
                    upstream: aid,
                    downstream: cid,
                },
            },
        ],
    );
    for run in ids {
        send(
            store,
            &report,
            [Write::Log(LogRecord {
                id: write_id(),
                run_id: run,
                flow_run_id: None,
                timestamp: now_micros(),
                level: "INFO".into(),
                target: "suite".into(),
                message: format!("from {run}"),
            })],
        );
    }
    store.flush().await.unwrap();
    assert_eq!(report.problems(), Vec::<String>::new());
    for (kind, id) in [
        (RunKind::Flow, pid),
        (RunKind::Task, aid),
        (RunKind::Flow, oid),
        (RunKind::Task, kid),
        (RunKind::Task, lid),
    ] {
        walk(store, kind, id, Pending, &[(Running, 1, None), (Completed, 1, None)]).await;
    }
    walk(store, RunKind::Flow, cid, Pending, &[(Running, 1, None)]).await;
    let refused = |o: Outcome, what: &str| match o {
        Outcome::Failed(e) => assert!(e.to_string().contains(what), "{e}"),
        other => panic!("expected a refusal ({what}), got {other:?}"),
    };
    // Its subflow still runs.
    refused(
        store.write(Write::DeleteRun { id: pid }).await.unwrap(),
        "has not ended",
    );
    refused(
        store.write(Write::DeleteRun { id: bid }).await.unwrap(),
        "has not ended",
    );
    refused(
        store.write(Write::DeleteRun { id: Uuid::now_v7() }).await.unwrap(),
        "there is no run",
    );
    assert!(
        store.flow_run(pid).await.unwrap().is_some(),
        "nothing deleted when refused"
    );
    walk(store, RunKind::Flow, cid, Running, &[(Completed, 1, None)]).await;
    walk(store, RunKind::Task, bid, Pending, &[(Cancelled, 0, None)]).await;
    for id in [pid, lid] {
        let o = store.write(Write::DeleteRun { id }).await.unwrap();
        assert!(matches!(o, Outcome::Applied { .. }), "{o:?}");
    }
    for id in [pid, cid] {
        assert!(store.flow_run(id).await.unwrap().is_none(), "flow run {id} deleted");
    }
    for id in [aid, bid, lid] {
        assert!(store.task_run(id).await.unwrap().is_none(), "task run {id} deleted");
    }
    for id in [pid, cid, aid, bid, lid] {
        assert!(store.states(id).await.unwrap().is_empty(), "history of {id} deleted");
        assert!(store.logs(id).await.unwrap().is_empty(), "logs of {id} deleted");
    }
    assert!(store.edges(pid).await.unwrap().is_empty());
    assert_eq!(store.flow_run(oid).await.unwrap().map(|f| f.state), Some(Completed));
    assert_eq!(store.task_run(kid).await.unwrap().map(|t| t.state), Some(Completed));
    assert_eq!(store.states(kid).await.unwrap().len(), 3);
    assert_eq!(store.logs(oid).await.unwrap().len(), 1, "another run's logs stay");
    refused(
        store.write(Write::DeleteRun { id: pid }).await.unwrap(),
        "there is no run",
    );
}

/// Full ids, prefixes and tails; ambiguity and nonsense are errors that say so./// Full ids, prefixes and tails; ambiguity and nonsense are errors that say so.
pub async fn ids_resolve_exactly_by_prefix_and_by_tail(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let f = flow("ids", None);
    let t = task("ids", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    send(store, &report, [Write::FlowRun(f), Write::TaskRun(t)]);
    store.flush().await.unwrap();
    assert_eq!(store.resolve(&fid.to_string()).await.unwrap(), RunRef::Flow(fid));
    assert_eq!(
        store.resolve(&tid.simple().to_string().to_uppercase()).await.unwrap(),
        RunRef::Task(tid)
    );
    let tail = &tid.simple().to_string()[24..];
    assert_eq!(store.resolve(tail).await.unwrap(), RunRef::Task(tid));
    // Both were created in the same millisecond: the time prefix is shared.
    assert!(matches!(
        store.resolve(&fid.to_string()[..8]).await,
        Err(StoreError::AmbiguousRun { count: 2, .. })
    ));
    assert!(matches!(
        store.resolve("ffffffff").await,
        Err(StoreError::UnknownRun(_))
    ));
    assert!(matches!(
        store.resolve("not an id").await,
        Err(StoreError::UnknownRun(_))
    ));
    assert!(matches!(store.resolve("").await, Err(StoreError::UnknownRun(_))));
}

/// A write that cannot be recorded (a run created twice) is reported to its sender, the
/// other writes of its batch are recorded, and the next flush is not blamed for it.
pub async fn a_failed_write_is_reported_to_its_sender_and_loses_nothing_else(store: &dyn Store) {
    let first = Arc::new(Collect::default());
    let f = flow("dup", None);
    // Another run with the same id (not the same creation delivered again).
    let mut dup = f.clone();
    dup.name = "impostor".into();
    dup.created += 1;
    let other = task("after", None);
    let (fid, oid) = (f.id, other.id);
    send(store, &first, [Write::FlowRun(f)]);
    store.flush().await.unwrap();
    let second = Arc::new(Collect::default());
    send(store, &second, [Write::FlowRun(dup), Write::TaskRun(other)]);
    store
        .flush()
        .await
        .expect("a flush reports the store, not other runs' writes");
    let problems = second.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(&format!("flow run {fid}")), "{problems:?}");
    assert!(
        store.task_run(oid).await.unwrap().is_some(),
        "the other write of the batch was kept"
    );
    assert!(first.problems().is_empty());
}

/// `flow_runs(limit)` lists the newest first.
pub async fn lists_newest_first_within_the_limit(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let ids: Vec<Uuid> = (0..5)
        .map(|i| {
            let f = flow(&format!("f{i}"), None);
            let id = f.id;
            send(store, &report, [Write::FlowRun(f)]);
            id
        })
        .collect();
    store.flush().await.unwrap();
    let listed: Vec<Uuid> = store.flow_runs(3).await.unwrap().into_iter().map(|f| f.id).collect();
    assert_eq!(listed, [ids[4], ids[3], ids[2]]);
}

/// Four threads creating and finishing 500 task runs each: every row and state recorded.
pub async fn concurrent_writers_lose_nothing(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let f = flow("busy", None);
    let fid = f.id;
    send(store, &report, [Write::FlowRun(f)]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..500 {
                    let t = task("w", Some(fid));
                    let id = t.id;
                    send(
                        store,
                        &report,
                        [
                            Write::TaskRun(t),
                            Write::State(change(RunKind::Task, id, Pending, Running, 1)),
                            Write::State(change(RunKind::Task, id, Running, Completed, 1)),
                        ],
                    );
                }
            });
        }
    });
    store.flush().await.unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    let runs = store.task_runs(fid).await.unwrap();
    assert_eq!(runs.len(), 2000);
    assert!(runs.iter().all(|r| r.state == Completed && r.start_time.is_some()));
    assert_eq!(store.flow_run(fid).await.unwrap().unwrap().task_count, 2000);
}

/// A process that stopped heartbeating, or that its host saw die, has its unfinished runs
/// marked Crashed (once, with a message saying why); others' runs and finished runs stay.
pub async fn dead_processes_have_their_runs_crashed(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let now = now_micros();
    let process = |pid: u32, heartbeat: Micros| Process {
        id: Uuid::now_v7(),
        host: "suite-host".into(),
        pid,
        started: 7,
        heartbeat,
        lease: 0,
    };
    let (alive, silent, exited) = (process(101, now), process(102, now - 60_000_000), process(103, now));
    // Silent as long, but it beats every 100 s: not dead by its own lease (300 s), though
    // it is by the judge's (30 s below).
    let patient = Process {
        lease: 300_000_000,
        ..process(104, now - 60_000_000)
    };
    send(
        store,
        &report,
        [alive.clone(), silent.clone(), exited.clone(), patient.clone()].map(Write::Heartbeat),
    );
    let owned = |name: &str, p: &Process| {
        let mut t = task(name, None);
        t.process_id = Some(p.id);
        t
    };
    let mut silent_flow = flow("silent", None);
    silent_flow.process_id = Some(silent.id);
    let (a, b, c, done, slow) = (
        owned("alive", &alive),
        owned("silent", &silent),
        owned("exited", &exited),
        owned("done", &silent),
        owned("patient", &patient),
    );
    let ids = [a.id, b.id, c.id, done.id, silent_flow.id, slow.id];
    send(
        store,
        &report,
        [
            Write::TaskRun(a),
            Write::TaskRun(b),
            Write::TaskRun(c),
            Write::TaskRun(done),
            Write::FlowRun(silent_flow),
            Write::TaskRun(slow),
        ],
    );
    walk(store, RunKind::Task, ids[0], Pending, &[(Running, 1, None)]).await;
    walk(store, RunKind::Task, ids[5], Pending, &[(Running, 1, None)]).await;
    walk(
        store,
        RunKind::Task,
        ids[2],
        Pending,
        &[(Running, 1, None), (AwaitingRetry, 1, None)],
    )
    .await;
    walk(
        store,
        RunKind::Task,
        ids[3],
        Pending,
        &[(Running, 1, None), (Completed, 1, None)],
    )
    .await;
    walk(store, RunKind::Flow, ids[4], Pending, &[(Running, 1, None)]).await;
    store.flush().await.unwrap();

    let mut crashed = store.crash_orphans(&[exited.id], now - 30_000_000).await.unwrap();
    crashed.sort_by_key(|(_, id)| *id);
    let mut expected = vec![
        (RunKind::Task, ids[1]),
        (RunKind::Task, ids[2]),
        (RunKind::Flow, ids[4]),
    ];
    expected.sort_by_key(|(_, id)| *id);
    assert_eq!(crashed, expected);
    let task_state = |id| async move { store.task_run(id).await.unwrap().unwrap() };
    assert_eq!(task_state(ids[0]).await.state, Running, "a live process keeps its runs");
    assert_eq!(task_state(ids[3]).await.state, Completed, "finished runs stay finished");
    assert_eq!(
        task_state(ids[5]).await.state,
        Running,
        "a process is judged by its own lease when longer"
    );
    let silent_run = task_state(ids[1]).await;
    assert_eq!(silent_run.state, Crashed);
    let why = silent_run.state_message.unwrap();
    assert!(
        why.contains("pid 102") && why.contains("suite-host") && why.contains("heartbeat"),
        "{why}"
    );
    let exited_run = task_state(ids[2]).await;
    assert_eq!(exited_run.state, Crashed);
    assert!(exited_run.state_message.unwrap().contains("exited"));
    assert_eq!(store.flow_run(ids[4]).await.unwrap().unwrap().state, Crashed);
    let history: Vec<StateType> = store.states(ids[2]).await.unwrap().iter().map(|s| s.state).collect();
    assert_eq!(history, [Pending, Running, AwaitingRetry, Crashed]);
    assert!(
        store
            .crash_orphans(&[exited.id], now - 30_000_000)
            .await
            .unwrap()
            .is_empty(),
        "marked once"
    );
    let known: Vec<Uuid> = store
        .processes(now - 10_000_000)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert!(known.contains(&alive.id) && known.contains(&exited.id), "{known:?}");
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}

/// API tokens are kept by name with the hash of their secret; a name is taken once; a
/// revocation sticks; revoking an unknown name fails. (Database backends only: a server's
/// tokens are managed on its own database.)
pub async fn api_tokens_are_kept_as_hashes(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let secret = ApiToken::new_secret();
    assert!(secret.starts_with("kiln_") && secret.len() == 69, "{secret}");
    let token = |name: &str, read_only| ApiToken {
        name: name.into(),
        hash: ApiToken::hash_secret(&format!("{secret}-{name}")),
        read_only,
        created: now_micros(),
        revoked: None,
    };
    send(
        store,
        &report,
        [
            Write::PutToken(token("ci", false)),
            Write::PutToken(token("viewer", true)),
        ],
    );
    store.flush().await.unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    let tokens = store.api_tokens().await.unwrap();
    assert_eq!(
        tokens.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["ci", "viewer"]
    );
    assert!(
        tokens
            .iter()
            .all(|t| t.hash.starts_with("blake3:") && !t.hash.contains(&secret))
    );
    assert!(tokens[1].read_only);

    let again = Arc::new(Collect::default());
    send(
        store,
        &again,
        [
            Write::PutToken(token("ci", true)),
            Write::RevokeToken {
                name: "viewer".into(),
                at: now_micros(),
            },
            Write::RevokeToken {
                name: "nobody".into(),
                at: now_micros(),
            },
        ],
    );
    store.flush().await.unwrap();
    let problems = again.problems();
    assert_eq!(problems.len(), 2, "a taken name and an unknown token: {problems:?}");
    assert!(problems[1].contains("nobody"), "{problems:?}");
    let tokens = store.api_tokens().await.unwrap();
    assert!(!tokens[0].read_only, "the first 'ci' token is unchanged");
    assert!(tokens[1].revoked.is_some());
}

/// Flow runs are listed by state, flow, tag and time, newest first, a page at a time with a
/// cursor that stays right while new runs are recorded.
pub async fn flow_runs_filter_and_page(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut f = flow(if i % 2 == 0 { "even" } else { "odd" }, None);
        f.tags = if i < 3 { vec!["nightly".into()] } else { vec![] };
        ids.push(f.id);
        send(store, &report, [Write::FlowRun(f)]);
    }
    store.flush().await.unwrap();
    for &id in &ids[..2] {
        walk(
            store,
            RunKind::Flow,
            id,
            Pending,
            &[(Running, 1, None), (Failed, 1, Some("boom"))],
        )
        .await;
    }
    walk(store, RunKind::Flow, ids[2], Pending, &[(Running, 1, None)]).await;
    let list = |filter: RunFilter| async move {
        let page = store.list_flow_runs(&filter).await.unwrap();
        (page.runs.iter().map(|r| r.id).collect::<Vec<_>>(), page.next)
    };
    let base = RunFilter::newest(100);
    let failed = RunFilter {
        states: vec![Failed],
        ..base.clone()
    };
    assert_eq!(list(failed).await.0, [ids[1], ids[0]]);
    let running_or_failed = RunFilter {
        states: vec![Running, Failed],
        ..base.clone()
    };
    assert_eq!(list(running_or_failed).await.0, [ids[2], ids[1], ids[0]]);
    let odd = RunFilter {
        name: Some("odd".into()),
        ..base.clone()
    };
    assert_eq!(list(odd).await.0, [ids[5], ids[3], ids[1]]);
    let nightly_even = RunFilter {
        name: Some("even".into()),
        tag: Some("nightly".into()),
        ..base.clone()
    };
    assert_eq!(list(nightly_even).await.0, [ids[2], ids[0]]);
    let none = RunFilter {
        since: Some(now_micros() + 60_000_000),
        ..base.clone()
    };
    assert!(list(none).await.0.is_empty());

    // Pages of three, newest first; a run recorded meanwhile does not shift them.
    let page = |after| RunFilter {
        after,
        ..RunFilter::newest(3)
    };
    let (first, next) = list(page(None)).await;
    assert_eq!(first, [ids[6], ids[5], ids[4]]);
    send(store, &report, [Write::FlowRun(flow("late", None))]);
    store.flush().await.unwrap();
    let (second, next) = list(page(next)).await;
    assert_eq!(second, [ids[3], ids[2], ids[1]]);
    let (third, next) = list(page(next)).await;
    assert_eq!((third, next), (vec![ids[0]], None));
    // Oldest first, a page at a time.
    let oldest = |after| RunFilter {
        after,
        oldest_first: true,
        ..RunFilter::newest(4)
    };
    let (first, next) = list(oldest(None)).await;
    assert_eq!(first, ids[..4]);
    let (second, _) = list(oldest(next)).await;
    assert_eq!(second[..3], ids[4..]);
    // Subflows of a run.
    let child = flow("child", Some(ids[3]));
    let child_id = child.id;
    send(store, &report, [Write::FlowRun(child)]);
    store.flush().await.unwrap();
    let children = RunFilter {
        parent: Some(ids[3]),
        ..base.clone()
    };
    assert_eq!(list(children).await.0, [child_id]);
    let top = list(RunFilter {
        top_level: true,
        ..base.clone()
    })
    .await
    .0;
    assert!(
        !top.contains(&child_id) && top.contains(&ids[3]),
        "a subflow run is not top-level"
    );
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}

/// Task runs across flow runs (and outside any), filtered, sorted and paged like flow runs.
pub async fn task_runs_filter_and_page(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let (a, b) = (flow("a", None), flow("b", None));
    let (aid, bid) = (a.id, b.id);
    send(store, &report, [Write::FlowRun(a), Write::FlowRun(b)]);
    let mut ids = Vec::new();
    for (i, parent) in [Some(aid), Some(bid), Some(aid), None, Some(bid), Some(aid)]
        .into_iter()
        .enumerate()
    {
        let mut t = task(if i % 2 == 0 { "even" } else { "odd" }, parent);
        t.tags = if i < 3 { vec!["early".into()] } else { vec![] };
        ids.push(t.id);
        send(store, &report, [Write::TaskRun(t)]);
    }
    store.flush().await.unwrap();
    walk(
        store,
        RunKind::Task,
        ids[1],
        Pending,
        &[(Running, 1, None), (Failed, 1, Some("boom"))],
    )
    .await;
    let list = |filter: RunFilter| async move {
        let page = store.list_task_runs(&filter).await.unwrap();
        (page.runs.iter().map(|r| r.id).collect::<Vec<_>>(), page.next)
    };
    let base = RunFilter::newest(100);
    assert_eq!(
        list(base.clone()).await.0,
        ids.iter().rev().copied().collect::<Vec<_>>()
    );
    let of_a = RunFilter {
        parent: Some(aid),
        ..base.clone()
    };
    assert_eq!(list(of_a).await.0, [ids[5], ids[2], ids[0]]);
    let failed = RunFilter {
        states: vec![Failed],
        ..base.clone()
    };
    assert_eq!(list(failed).await.0, [ids[1]]);
    let odd_early = RunFilter {
        name: Some("odd".into()),
        tag: Some("early".into()),
        ..base.clone()
    };
    assert_eq!(list(odd_early).await.0, [ids[1]]);
    let outside_flows = RunFilter {
        top_level: true,
        ..base.clone()
    };
    assert_eq!(list(outside_flows).await.0, [ids[3]], "called outside any flow");
    let (first, next) = list(RunFilter {
        oldest_first: true,
        ..RunFilter::newest(4)
    })
    .await;
    assert_eq!(first, ids[..4]);
    let (rest, next) = list(RunFilter {
        oldest_first: true,
        after: next,
        ..RunFilter::newest(4)
    })
    .await;
    assert_eq!((rest, next), (ids[4..].to_vec(), None));
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}

/// A run's log lines by level, a page at a time; a flow run's include its task runs'.
pub async fn logs_filter_by_level_and_page(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let f = flow("logged", None);
    let t = task("step", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    send(store, &report, [Write::FlowRun(f), Write::TaskRun(t)]);
    let levels = ["INFO", "DEBUG", "ERROR", "WARN", "TRACE", "INFO", "ERROR"];
    for (i, level) in levels.iter().enumerate() {
        let line = LogRecord {
            id: write_id(),
            run_id: if i % 2 == 0 { fid } else { tid },
            flow_run_id: Some(fid),
            timestamp: now_micros(),
            level: (*level).into(),
            target: "suite".into(),
            message: format!("line {i}"),
        };
        send(store, &report, [Write::Log(line)]);
    }
    store.flush().await.unwrap();
    let messages = |page: &LogPage| page.logs.iter().map(|l| l.message.clone()).collect::<Vec<_>>();
    let filter = |level: Option<&str>, after, limit| LogFilter {
        level: level.map(str::to_owned),
        after,
        limit,
    };
    let all = store.list_logs(fid, &filter(None, None, 100)).await.unwrap();
    assert_eq!(all.logs.len(), 7);
    assert_eq!(all.next, None);
    let warn = store.list_logs(fid, &filter(Some("warn"), None, 100)).await.unwrap();
    assert_eq!(messages(&warn), ["line 2", "line 3", "line 6"]);
    let task_info = store.list_logs(tid, &filter(Some("INFO"), None, 100)).await.unwrap();
    assert_eq!(
        messages(&task_info),
        ["line 3", "line 5"],
        "a task run's own lines only"
    );
    // Pages of three.
    let first = store.list_logs(fid, &filter(None, None, 3)).await.unwrap();
    assert_eq!(messages(&first), ["line 0", "line 1", "line 2"]);
    let second = store.list_logs(fid, &filter(None, first.next, 3)).await.unwrap();
    assert_eq!(messages(&second), ["line 3", "line 4", "line 5"]);
    let third = store.list_logs(fid, &filter(None, second.next, 3)).await.unwrap();
    assert_eq!((messages(&third), third.next), (vec!["line 6".to_owned()], None));
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}

/// A batch sent again after its answer was lost (in part or whole, even after the runs moved
/// on): each write is applied once and answered as the first time. Another writer's change,
/// or a change without an id, is still checked against the run's state.
pub async fn a_write_delivered_twice_is_applied_once(store: &dyn Store) {
    let (flow_kind, task_kind) = (RunKind::Flow, RunKind::Task);
    let f = flow("resent", None);
    let t = task("resent_step", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    let line = LogRecord {
        id: write_id(),
        run_id: tid,
        flow_run_id: Some(fid),
        timestamp: now_micros(),
        level: "INFO".into(),
        target: "suite".into(),
        message: "logged once".into(),
    };
    let batch = vec![
        Write::FlowRun(f),
        Write::State(change(flow_kind, fid, Pending, Running, 1)),
        Write::TaskRun(t),
        Write::State(change(task_kind, tid, Pending, Running, 1)),
        Write::Log(line),
        Write::State(change(task_kind, tid, Running, Completed, 1)),
    ];
    let deliver = async |writes: &[Write]| {
        let report = Arc::new(Collect::default());
        send(store, &report, writes.iter().cloned());
        store.flush().await.unwrap();
        report.outcomes()
    };
    // The first three writes arrive, their answer is lost; then the whole batch, twice.
    deliver(&batch[..3]).await;
    let first = deliver(&batch).await;
    assert!(
        !first.iter().any(|o| o.contains("Rejected") || o.contains("Failed")),
        "{first:#?}"
    );
    assert_eq!(deliver(&batch).await, first);
    // The flow moves on; the batch arrives once more, late: still the same answers.
    let done = change(flow_kind, fid, Running, Completed, 1);
    assert_eq!(store.set_state(done).await.unwrap(), Transition::Accepted { seq: 2 });
    assert_eq!(deliver(&batch).await, first);

    let history = |id| async move {
        store
            .states(id)
            .await
            .unwrap()
            .iter()
            .map(|s| s.state)
            .collect::<Vec<_>>()
    };
    assert_eq!(history(fid).await, [Pending, Running, Completed]);
    assert_eq!(history(tid).await, [Pending, Running, Completed]);
    let lines: Vec<String> = store.logs(tid).await.unwrap().into_iter().map(|l| l.message).collect();
    assert_eq!(lines, ["logged once"]);
    // Another writer's change to the same state has its own id: refused, as before.
    assert_eq!(
        store
            .set_state(change(task_kind, tid, Running, Completed, 1))
            .await
            .unwrap(),
        Transition::Rejected {
            current: Some(Completed)
        }
    );
    // A change without an id cannot be recognised: a repeat is checked like any change.
    let anonymous = StateChange {
        id: Uuid::nil(),
        ..change(flow_kind, fid, Pending, Running, 1)
    };
    assert_eq!(
        store.set_state(anonymous).await.unwrap(),
        Transition::Rejected {
            current: Some(Completed)
        }
    );
}

/// Fields that hold JSON text (a flow run's command, a state's result) must hold JSON: a
/// write that breaks this fails alone and the store stays readable.
pub async fn malformed_json_text_is_refused_alone(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let mut bad = flow("bad_command", None);
    bad.command = Some("{not json".into());
    let good = flow("good_command", None);
    let (bad_id, good_id) = (bad.id, good.id);
    let t = task("bad_result", None);
    let tid = t.id;
    let mut done = change(RunKind::Task, tid, Running, Completed, 1);
    done.result = Some(String::new());
    send(
        store,
        &report,
        [
            Write::FlowRun(bad),
            Write::FlowRun(good),
            Write::TaskRun(t),
            Write::State(change(RunKind::Task, tid, Pending, Running, 1)),
            Write::State(done),
        ],
    );
    store.flush().await.unwrap();
    let problems = report.problems();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].contains(&bad_id.to_string()), "{problems:#?}");
    assert!(problems[1].contains("Running -> Completed"), "{problems:#?}");
    assert!(store.flow_run(bad_id).await.unwrap().is_none());
    assert!(store.flow_run(good_id).await.unwrap().is_some());
    assert_eq!(store.task_run(tid).await.unwrap().unwrap().state, Running);
    assert_eq!(
        store.list_flow_runs(&RunFilter::newest(10)).await.unwrap().runs.len(),
        1
    );
}

/// Many task runs created at once (a backend may write several rows to a statement): each
/// is recorded with its own fields and states; a creation delivered again is acknowledged;
/// one whose state breaks a rule fails alone.
pub async fn many_task_runs_created_at_once_are_each_recorded(store: &dyn Store) {
    let f = flow("many", None);
    let fid = f.id;
    let tasks: Vec<NewTaskRun> = (0..150)
        .map(|i| {
            let mut t = task(&format!("step_{i}"), Some(fid));
            t.tags = vec![format!("tag_{i}")];
            t.call_key = Some(format!("many#{i}"));
            t.inputs = serde_json::json!({ "i": i }).into();
            t.created += i as Micros;
            t
        })
        .collect();
    let report = Arc::new(Collect::default());
    let mut first = vec![Write::FlowRun(f)];
    first.extend(tasks[..40].iter().cloned().map(Write::TaskRun));
    send(store, &report, first);
    store.flush().await.unwrap();
    // All of them now, the first 40 again; half of them run, one ends with a broken result.
    let bad = tasks[97].id;
    let mut writes = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        writes.push(Write::TaskRun(t.clone()));
        if i % 2 == 1 {
            writes.push(Write::State(change(RunKind::Task, t.id, Pending, Running, 1)));
            let mut done = change(RunKind::Task, t.id, Running, Completed, 1);
            if t.id == bad {
                done.result = Some("{broken".into());
            }
            writes.push(Write::State(done));
        }
    }
    send(store, &report, writes);
    store.flush().await.unwrap();
    let problems = report.problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains(&bad.to_string()) && problems[0].contains("Running -> Completed"));
    let recorded = store.task_runs(fid).await.unwrap();
    assert_eq!(recorded.len(), tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        let r = recorded.iter().find(|r| r.id == t.id).expect("every task run recorded");
        assert_eq!(r.name, format!("step_{i}"));
        assert_eq!(r.tags, [format!("tag_{i}")]);
        assert_eq!(r.call_key.as_deref(), Some(format!("many#{i}").as_str()));
        assert_eq!(r.task_key, format!("suite::step_{i}"));
        assert_eq!(r.inputs, serde_json::json!({ "i": i }));
        assert_eq!(r.created, t.created, "step_{i}");
        let expected = match (i % 2, t.id == bad) {
            (0, _) => vec![Pending],
            (_, true) => vec![Pending, Running],
            _ => vec![Pending, Running, Completed],
        };
        assert_eq!(r.state, *expected.last().unwrap(), "step_{i}");
        let history: Vec<StateType> = store.states(t.id).await.unwrap().iter().map(|s| s.state).collect();
        assert_eq!(history, expected, "step_{i}'s history");
    }
}

/// How many runs are in each state, and no write left pending once flushed.
pub async fn counts_runs_by_state(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let f = flow("counted", None);
    let fid = f.id;
    let tasks: Vec<NewTaskRun> = (0..3).map(|_| task("counted", Some(fid))).collect();
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    send(store, &report, [Write::FlowRun(f)]);
    send(store, &report, tasks.into_iter().map(Write::TaskRun));
    store.flush().await.unwrap();
    walk(
        store,
        RunKind::Task,
        ids[0],
        Pending,
        &[(Running, 1, None), (Completed, 1, None)],
    )
    .await;
    walk(store, RunKind::Task, ids[1], Pending, &[(Running, 1, None)]).await;
    assert_eq!(store.pending_writes(), 0);
    let mut counts: Vec<(RunKind, StateType, u64)> = store
        .run_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.kind, c.state, c.count))
        .collect();
    counts.sort_by_key(|(k, s, _)| (*k == RunKind::Task, s.as_str()));
    assert_eq!(
        counts,
        [
            (RunKind::Flow, Pending, 1),
            (RunKind::Task, Completed, 1),
            (RunKind::Task, Pending, 1),
            (RunKind::Task, Running, 1),
        ]
    );
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}

/// A flow run created Scheduled and queued in `pool` (of `deployment`), claimable from `at`.
pub fn queued(name: &str, pool: &str, deployment: Option<&str>, at: Micros, max_attempts: u32) -> [Write; 2] {
    let mut run = flow(name, None);
    run.initial_state = Scheduled;
    let entry = crate::work::QueueEntry {
        run_id: run.id,
        kind: RunKind::Flow,
        pool: pool.into(),
        deployment: deployment.map(str::to_owned),
        target: name.into(),
        scheduled: at,
        max_attempts,
        host: None,
        payload: serde_json::Value::Null,
    };
    [Write::FlowRun(run), Write::Enqueue(entry)]
}

/// A process that heartbeats (a claimer must), as recorded in `store`.
async fn live(store: &dyn Store) -> Uuid {
    let id = Uuid::now_v7();
    let beat = Process {
        id,
        host: "suite-host".into(),
        pid: 4242,
        started: 1,
        heartbeat: now_micros(),
        lease: 0,
    };
    assert!(matches!(
        store.write(Write::Heartbeat(beat)).await.unwrap(),
        Outcome::Applied { .. }
    ));
    id
}

/// A claim for at most `limit` runs of `pools` by `process`, without waiting.
pub fn claim_request(process: Uuid, pools: &[&str], limit: u32) -> crate::work::ClaimRequest {
    crate::work::ClaimRequest {
        process_id: process,
        pools: pools.iter().map(|p| (*p).to_owned()).collect(),
        targets: Vec::new(),
        host: None,
        limit,
        wait_ms: 0,
        resend: false,
    }
}

/// A fenced change: the claim's token, from the state the worker believes.
fn fenced(id: Uuid, from: StateType, to: StateType, attempt: u32, fence: u64) -> StateChange {
    StateChange {
        fence: Some(fence),
        ..change(RunKind::Flow, id, from, to, attempt)
    }
}

/// Claims: each queued run to one claimer, oldest first, only when due, only from the pools
/// and targets named; a claimed Scheduled run enters Pending; fenced changes need the
/// current token; a run finished by its worker leaves the queue; one cancelled before any
/// claim is never handed out.
pub async fn claims_hand_each_run_to_one_worker(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let now = now_micros();
    let [a_run, a_entry] = queued("etl", "cpu", None, now - 2_000, 1);
    let [b_run, b_entry] = queued("etl", "cpu", None, now - 1_000, 1);
    let [later_run, later_entry] = queued("etl", "cpu", None, now + 3_600_000_000, 1);
    let [gpu_run, gpu_entry] = queued("train", "gpu", None, now - 3_000, 1);
    let [gone_run, gone_entry] = queued("etl", "cpu", None, now - 5_000, 1);
    let (a, b, gone) = (a_run.run_id(), b_run.run_id(), gone_run.run_id());
    send(
        store,
        &report,
        [
            a_run,
            a_entry,
            b_run,
            b_entry,
            later_run,
            later_entry,
            gpu_run,
            gpu_entry,
            gone_run,
            gone_entry,
        ],
    );
    store.flush().await.unwrap();
    assert_eq!(report.problems(), Vec::<String>::new());
    // Cancelled before anyone claimed it: never handed out.
    walk(store, RunKind::Flow, gone, Scheduled, &[(Cancelled, 0, None)]).await;
    let listed = store.queued_runs(None, 100).await.unwrap();
    assert!(
        listed.iter().all(|q| q.entry.run_id != gone) && listed.iter().any(|q| q.entry.run_id == a),
        "a run that ended before its claim is no longer listed as queued"
    );

    let stranger = store.claim(&claim_request(Uuid::now_v7(), &["cpu"], 1)).await;
    assert!(
        matches!(stranger, Err(StoreError::UnknownProcess(_)))
            || stranger.as_ref().is_err_and(|e| e.to_string().contains("heartbeat")),
        "a claimer that never heartbeated is refused: {stranger:?}"
    );
    let (w1, w2) = (live(store).await, live(store).await);
    let mut only_train = claim_request(w1, &["cpu", "gpu"], 10);
    only_train.targets = vec!["train".into()];
    let trains = store.claim(&only_train).await.unwrap();
    assert_eq!(trains.iter().map(|c| c.target.as_str()).collect::<Vec<_>>(), ["train"]);
    let first = store.claim(&claim_request(w1, &["cpu"], 1)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].run_id, a, "the oldest scheduled run first");
    assert_eq!(first[0].state, Pending, "a claimed Scheduled run enters Pending");
    assert_eq!(first[0].parameters, serde_json::json!({ "n": 1, "label": "x" }));
    let second = store.claim(&claim_request(w2, &["cpu"], 10)).await.unwrap();
    assert_eq!(
        second.iter().map(|c| c.run_id).collect::<Vec<_>>(),
        [b],
        "not yet due, taken, or cancelled: not claimable"
    );
    let nothing_new = store.claim(&claim_request(w2, &["cpu"], 10)).await.unwrap();
    assert!(nothing_new.is_empty(), "{nothing_new:?}");
    // Its answer lost, w2 asks again with `resend`: what it holds and has not started.
    let mut resend = claim_request(w2, &["cpu"], 10);
    resend.resend = true;
    let resent = store.claim(&resend).await.unwrap();
    assert_eq!(
        resent.iter().map(|c| (c.run_id, c.fence)).collect::<Vec<_>>(),
        [(b, second[0].fence)],
        "only what w2 holds, with the same token"
    );
    let history = store.states(a).await.unwrap();
    assert_eq!(
        history.iter().map(|s| s.state).collect::<Vec<_>>(),
        [Scheduled, Pending]
    );

    // Fenced changes: the claim's token moves the run; another token does not.
    let fence = first[0].fence;
    let wrong = store
        .set_state(fenced(a, Pending, Running, 1, fence + 1))
        .await
        .unwrap();
    assert_eq!(wrong, Transition::Rejected { current: Some(Pending) });
    let right = store.set_state(fenced(a, Pending, Running, 1, fence)).await.unwrap();
    assert!(matches!(right, Transition::Accepted { .. }), "{right:?}");
    let mut again = claim_request(w1, &["cpu"], 1);
    again.resend = true;
    let again = store.claim(&again).await.unwrap();
    assert!(
        again.iter().all(|c| c.run_id != a),
        "a started run is not handed out again"
    );
    let done = store.set_state(fenced(a, Running, Completed, 1, fence)).await.unwrap();
    assert!(matches!(done, Transition::Accepted { .. }), "{done:?}");
    let queue = store.queued_runs(Some("cpu"), 100).await.unwrap();
    assert!(
        queue.iter().all(|q| q.entry.run_id != a),
        "a run finished by its worker leaves the queue"
    );
    assert!(queue.iter().any(|q| q.entry.run_id == b && q.claimed_by == Some(w2)));

    // A worker of several pools gets the oldest run of any of them first, however deep
    // each pool's backlog.
    let mut writes = Vec::new();
    let mut order = Vec::new();
    for i in 0..60 {
        let pool = if i % 3 == 0 { "io" } else { "net" };
        let [run, entry] = queued("etl", pool, None, now - 1_000_000 + i * 7, 1);
        order.push(run.run_id());
        writes.extend([run, entry]);
    }
    send(store, &report, writes);
    store.flush().await.unwrap();
    assert_eq!(report.problems(), Vec::<String>::new());
    let mut got = Vec::new();
    for limit in [1, 5, 30, 40] {
        let claims = store.claim(&claim_request(w1, &["net", "io"], limit)).await.unwrap();
        got.extend(claims.into_iter().map(|c| c.run_id));
    }
    assert_eq!(got, order, "claimed oldest first across pools, each run once");
}

/// A claim ends with its process: a running run goes back to the queue (AwaitingRetry) while
/// attempts remain, and its old token is refused from then on; without attempts left it is
/// Crashed; a Cancelling one ends Cancelled.
pub async fn claims_of_dead_processes_are_taken_back(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let now = now_micros();
    let worker = |pid: u32, heartbeat: Micros| Process {
        id: Uuid::now_v7(),
        host: "suite-host".into(),
        pid,
        started: 7,
        heartbeat,
        lease: 0,
    };
    let (dead, alive) = (worker(201, now - 120_000_000), worker(202, now));
    send(
        store,
        &report,
        [Write::Heartbeat(dead.clone()), Write::Heartbeat(alive.clone())],
    );
    let [r_run, r_entry] = queued("retry-me", "pool", None, now - 1_000, 2);
    let [c_run, c_entry] = queued("crash-me", "pool", None, now - 900, 1);
    let [x_run, x_entry] = queued("cancel-me", "pool", None, now - 800, 3);
    let (r, c, x) = (r_run.run_id(), c_run.run_id(), x_run.run_id());
    send(store, &report, [r_run, r_entry, c_run, c_entry, x_run, x_entry]);
    store.flush().await.unwrap();
    let claims = store.claim(&claim_request(dead.id, &["pool"], 10)).await.unwrap();
    assert_eq!(claims.len(), 3);
    for claim in &claims {
        walk_fenced(store, claim.run_id, claim.fence, &[(Pending, Running, 1)]).await;
    }
    // Who holds what, with which token; an id the queue does not hold is left out.
    let holders = |ids: Vec<Uuid>| async move {
        let mut found = store.holders(&ids).await.unwrap();
        found.sort_by_key(|h| h.run_id);
        found
    };
    let mut held: Vec<crate::work::Holder> = claims
        .iter()
        .map(|cl| crate::work::Holder {
            run_id: cl.run_id,
            fence: cl.fence,
            claimed_by: Some(dead.id),
        })
        .collect();
    held.sort_by_key(|h| h.run_id);
    assert_eq!(holders(vec![r, c, x, Uuid::now_v7()]).await, held);
    assert!(store.holders(&[]).await.unwrap().is_empty());
    store
        .set_state(change(RunKind::Flow, x, Running, Cancelling, 1))
        .await
        .unwrap();
    let old = claims.iter().find(|cl| cl.run_id == r).unwrap().fence;

    let changed = store.crash_orphans(&[], now - 30_000_000).await.unwrap();
    let mut changed: Vec<Uuid> = changed.into_iter().map(|(_, id)| id).collect();
    changed.sort();
    let mut expected = vec![r, c, x];
    expected.sort();
    assert_eq!(changed, expected);
    assert_eq!(store.flow_run(r).await.unwrap().unwrap().state, AwaitingRetry);
    let crashed = store.flow_run(c).await.unwrap().unwrap();
    assert_eq!(crashed.state, Crashed);
    assert!(crashed.state_message.unwrap().contains("no attempts left"));
    assert_eq!(store.flow_run(x).await.unwrap().unwrap().state, Cancelled);
    // Taken back once: nothing more to do.
    assert!(store.crash_orphans(&[], now - 30_000_000).await.unwrap().is_empty());

    // Taken back: the finished ones left the queue; the other waits for a new claim.
    assert_eq!(
        holders(vec![r, c, x]).await,
        [crate::work::Holder {
            run_id: r,
            fence: old,
            claimed_by: None
        }]
    );

    // The late worker's result is refused; the run goes to another worker, with a new token.
    let late = store.set_state(fenced(r, Running, Completed, 1, old)).await.unwrap();
    assert!(matches!(late, Transition::Rejected { .. }), "{late:?}");
    let again = store.claim(&claim_request(alive.id, &["pool"], 10)).await.unwrap();
    assert_eq!(again.iter().map(|cl| cl.run_id).collect::<Vec<_>>(), [r]);
    assert_eq!((again[0].state, again[0].attempt), (AwaitingRetry, 1));
    assert!(again[0].fence > old);
    assert_eq!(
        holders(vec![r]).await,
        [crate::work::Holder {
            run_id: r,
            fence: again[0].fence,
            claimed_by: Some(alive.id)
        }]
    );
    walk_fenced(
        store,
        r,
        again[0].fence,
        &[(AwaitingRetry, Running, 2), (Running, Completed, 2)],
    )
    .await;
    let history: Vec<StateType> = store.states(r).await.unwrap().iter().map(|s| s.state).collect();
    assert_eq!(
        history,
        [Scheduled, Pending, Running, AwaitingRetry, Running, Completed]
    );
    assert!(store.queued_runs(None, 100).await.unwrap().is_empty());
    assert!(holders(vec![r]).await.is_empty(), "a finished run is held by no one");
}

async fn walk_fenced(store: &dyn Store, id: Uuid, fence: u64, steps: &[(StateType, StateType, u32)]) {
    for &(from, to, attempt) in steps {
        let t = store.set_state(fenced(id, from, to, attempt, fence)).await.unwrap();
        assert!(matches!(t, Transition::Accepted { .. }), "{from} -> {to}: {t:?}");
    }
}

/// Concurrency limits: a pool's and a deployment's count the claims held, across claimers;
/// a slot frees when its run finishes.
pub async fn claims_respect_concurrency_limits(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let now = now_micros();
    let deployment = crate::work::Deployment {
        name: "nightly".into(),
        flow: "etl".into(),
        pool: "big".into(),
        parameters: serde_json::json!({}),
        parameter_schema: serde_json::json!({ "type": "object" }),
        tags: vec!["t".into()],
        schedule: Some(crate::work::Schedule::Cron {
            expr: "0 3 * * *".into(),
            timezone: Some("Europe/Paris".into()),
        }),
        catchup: false,
        concurrency: Some(1),
        max_attempts: 1,
        updated: now,
    };
    send(
        store,
        &report,
        [
            Write::PutDeployment(Box::new(deployment.clone())),
            Write::PutPool(crate::work::WorkPool {
                name: "small".into(),
                concurrency: Some(2),
            }),
        ],
    );
    let mut runs = Vec::new();
    for i in 0..3 {
        let [run, entry] = queued("etl", "big", Some("nightly"), now - 1_000 + i, 1);
        runs.push(run.run_id());
        send(store, &report, [run, entry]);
    }
    for i in 0..3 {
        let [run, entry] = queued("etl", "small", None, now - 1_000 + i, 1);
        send(store, &report, [run, entry]);
    }
    store.flush().await.unwrap();
    assert_eq!(report.problems(), Vec::<String>::new());
    assert_eq!(store.deployments().await.unwrap(), [deployment]);
    assert_eq!(
        store.work_pools().await.unwrap(),
        [crate::work::WorkPool {
            name: "small".into(),
            concurrency: Some(2),
        }]
    );
    let (w1, w2) = (live(store).await, live(store).await);
    let big = store.claim(&claim_request(w1, &["big"], 10)).await.unwrap();
    assert_eq!(big.len(), 1, "deployment 'nightly' allows one run at a time");
    assert!(store.claim(&claim_request(w2, &["big"], 10)).await.unwrap().is_empty());
    let small = store.claim(&claim_request(w1, &["small"], 1)).await.unwrap().len()
        + store.claim(&claim_request(w2, &["small"], 10)).await.unwrap().len();
    assert_eq!(small, 2, "pool 'small' allows two");
    // The nightly run finishes: its slot frees.
    walk_fenced(
        store,
        big[0].run_id,
        big[0].fence,
        &[(Pending, Running, 1), (Running, Completed, 1)],
    )
    .await;
    let next = store.claim(&claim_request(w2, &["big"], 10)).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].run_id, big[0].run_id);
}

/// Runs held back by their deployment's limit are passed over, however many are queued
/// before the others: a run of another deployment in the same pool, or of the same pools
/// queued later, is claimed all the same; each claim reads the queue only as far as it
/// needs to.
pub async fn runs_held_back_by_a_limit_do_not_hold_up_the_others(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let now = now_micros();
    let deployment = |name: &str, concurrency| crate::work::Deployment {
        name: name.into(),
        flow: "etl".into(),
        pool: "shared".into(),
        parameters: serde_json::json!({}),
        parameter_schema: serde_json::json!({ "type": "object" }),
        tags: Vec::new(),
        schedule: None,
        catchup: false,
        concurrency,
        max_attempts: 1,
        updated: now,
    };
    send(
        store,
        &report,
        [
            Write::PutDeployment(Box::new(deployment("one-at-a-time", Some(1)))),
            Write::PutDeployment(Box::new(deployment("free", None))),
        ],
    );
    // 300 runs of the limited deployment first, then three others, in two pools.
    let mut writes = Vec::new();
    for i in 0..300 {
        writes.extend(queued("etl", "shared", Some("one-at-a-time"), now - 10_000 + i, 1));
    }
    let mut others = Vec::new();
    for (i, (pool, deployment)) in [("shared", Some("free")), ("shared", None), ("side", None)]
        .into_iter()
        .enumerate()
    {
        let [run, entry] = queued("etl", pool, deployment, now - 5_000 + i as i64, 1);
        others.push(run.run_id());
        writes.extend([run, entry]);
    }
    send(store, &report, writes);
    store.flush().await.unwrap();
    assert_eq!(report.problems(), Vec::<String>::new());
    let worker = live(store).await;
    // A pool named twice is read once.
    let first = store
        .claim(&claim_request(worker, &["shared", "side", "shared"], 10))
        .await
        .unwrap();
    let mut claimed: Vec<Uuid> = first.iter().map(|c| c.run_id).collect();
    assert_eq!(claimed.len(), 4, "one of the limited deployment, and the three others");
    claimed.sort();
    claimed.dedup();
    assert_eq!(claimed.len(), 4, "each run once");
    claimed.retain(|id| others.contains(id));
    claimed.sort();
    others.sort();
    assert_eq!(claimed, others);
    // Nothing else may go: the limited deployment's run is still held.
    assert!(
        store
            .claim(&claim_request(worker, &["shared", "side"], 10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A claim that waits is answered as soon as a run is queued (without polling where the
/// backend can), and after its wait when none is.
pub async fn a_waiting_claim_wakes_when_work_arrives(store: &dyn Store) {
    let worker = live(store).await;
    let mut request = claim_request(worker, &["wake"], 1);
    request.wait_ms = 300;
    let started = std::time::Instant::now();
    assert!(store.claim(&request).await.unwrap().is_empty());
    assert!(started.elapsed() >= std::time::Duration::from_millis(250), "it waited");
    request.wait_ms = 20_000;
    let waiting = store.claim(&request);
    let queue = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let [run, entry] = queued("late", "wake", None, now_micros(), 1);
        let id = run.run_id();
        assert!(matches!(store.write(run).await.unwrap(), Outcome::Applied { .. }));
        assert!(matches!(store.write(entry).await.unwrap(), Outcome::Applied { .. }));
        id
    };
    let (claims, id) = tokio::join!(waiting, queue);
    let claims = claims.unwrap();
    assert_eq!(claims.iter().map(|c| c.run_id).collect::<Vec<_>>(), [id]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "woken, not timed out"
    );
}

/// A queued task run hands its worker the inputs it was queued with; one pinned to a host
/// goes only to a claimer on that host.
pub async fn queued_task_runs_carry_their_inputs_and_may_be_pinned_to_a_host(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let run = task("render", None);
    let id = run.id;
    let inputs = serde_json::json!({ "img": { "storage": "shared", "key": "inputs/x/img" } });
    let entry = crate::work::QueueEntry {
        run_id: id,
        kind: RunKind::Task,
        pool: "gpu".into(),
        deployment: None,
        target: "suite::render".into(),
        scheduled: now_micros(),
        max_attempts: 1,
        host: Some("host-a".into()),
        payload: inputs.clone(),
    };
    send(store, &report, [Write::TaskRun(run), Write::Enqueue(entry)]);
    store.flush().await.unwrap();
    assert_eq!(report.problems(), Vec::<String>::new());
    let mut elsewhere = claim_request(live(store).await, &["gpu"], 5);
    elsewhere.host = Some("host-b".into());
    assert!(store.claim(&elsewhere).await.unwrap().is_empty(), "pinned to host-a");
    let mut here = claim_request(live(store).await, &["gpu"], 5);
    here.host = Some("host-a".into());
    let claims = store.claim(&here).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!((claims[0].kind, claims[0].state), (RunKind::Task, Pending));
    assert_eq!(claims[0].parameters, inputs);
    let queue = store.queued_runs(Some("gpu"), 10).await.unwrap();
    assert_eq!(queue[0].entry.payload, inputs);
    assert_eq!(queue[0].entry.host.as_deref(), Some("host-a"));
    walk_fenced_task(store, id, claims[0].fence).await;
}

async fn walk_fenced_task(store: &dyn Store, id: Uuid, fence: u64) {
    for (from, to) in [(Pending, Running), (Running, Completed)] {
        let c = StateChange {
            fence: Some(fence),
            ..change(RunKind::Task, id, from, to, 1)
        };
        let t = store.set_state(c).await.unwrap();
        assert!(matches!(t, Transition::Accepted { .. }), "{from} -> {to}: {t:?}");
    }
    assert!(store.queued_runs(None, 10).await.unwrap().is_empty());
}

/// A task run of `process` tagged `tags`, recorded and flushed.
async fn tagged(store: &dyn Store, report: &Arc<Collect>, process: Uuid, tags: &[&str]) -> Uuid {
    let mut t = task("limited", None);
    t.tags = tags.iter().map(|t| (*t).to_owned()).collect();
    t.process_id = Some(process);
    let id = t.id;
    send(store, report, [Write::TaskRun(t)]);
    store.flush().await.unwrap();
    id
}

fn slots(run_id: Uuid, tags: &[&str]) -> crate::limit::SlotRequest {
    crate::limit::SlotRequest {
        run_id,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    }
}

fn limit(tag: &str, slots: u32) -> Write {
    Write::PutLimit(crate::limit::ConcurrencyLimit {
        tag: tag.into(),
        slots,
        updated: now_micros(),
    })
}

/// A tag's slots go to that many runs, all or none per run, each exactly once even when
/// many ask at the same moment; asking again while holding is granted again; tags without
/// a limit need no slot; an unknown run is refused.
pub async fn tag_limits_grant_each_slot_once(store: &dyn Store) {
    use crate::limit::Slots;
    let report = Arc::new(Collect::default());
    let process = live(store).await;
    send(store, &report, [limit("db", 3), limit("gpu", 1)]);
    let mut runs = Vec::new();
    for _ in 0..12 {
        runs.push(tagged(store, &report, process, &["db", "other"]).await);
    }
    // Twelve at once for three slots.
    let asks = runs
        .iter()
        .map(|&run| async move { (run, store.acquire_slots(&slots(run, &["db", "other"])).await.unwrap()) });
    let answers = futures::future::join_all(asks).await;
    let granted: Vec<Uuid> = answers
        .iter()
        .filter(|(_, a)| *a == Slots::Granted)
        .map(|(run, _)| *run)
        .collect();
    assert_eq!(granted.len(), 3, "{answers:?}");
    for (_, a) in &answers {
        assert!(
            *a == Slots::Granted
                || *a
                    == Slots::Busy {
                        tag: "db".into(),
                        slots: 3
                    },
            "{a:?}"
        );
    }
    assert_eq!(
        store.acquire_slots(&slots(granted[0], &["db"])).await.unwrap(),
        Slots::Granted,
        "a holder asking again"
    );
    // All or none: a run that gets gpu but not db holds neither.
    let both = tagged(store, &report, process, &["gpu", "db"]).await;
    assert_eq!(
        store.acquire_slots(&slots(both, &["gpu", "db"])).await.unwrap(),
        Slots::Busy {
            tag: "db".into(),
            slots: 3
        }
    );
    let gpu_only = tagged(store, &report, process, &["gpu"]).await;
    assert_eq!(
        store.acquire_slots(&slots(gpu_only, &["gpu"])).await.unwrap(),
        Slots::Granted
    );
    let free = tagged(store, &report, process, &["unlimited"]).await;
    assert_eq!(
        store.acquire_slots(&slots(free, &["unlimited"])).await.unwrap(),
        Slots::Granted
    );
    assert!(matches!(
        store.acquire_slots(&slots(Uuid::now_v7(), &["db"])).await,
        Err(StoreError::UnknownRun(_))
    ));
    let usage = store.limits().await.unwrap();
    assert_eq!(
        usage
            .iter()
            .map(|u| (u.limit.tag.as_str(), u.limit.slots))
            .collect::<Vec<_>>(),
        [("db", 3), ("gpu", 1)]
    );
    let mut holders = usage[0].holders.clone();
    holders.sort();
    let mut expected = granted.clone();
    expected.sort();
    assert_eq!(holders, expected);
    assert_eq!(usage[1].holders, [gpu_only]);
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}

/// A slot frees when its run finishes or waits for a retry, when crash detection ends the
/// run of a dead process, and when its limit is removed; a lowered limit admits no one new
/// until enough holders finish; removing a limit that does not exist fails.
pub async fn tag_slots_free_when_their_runs_move_on(store: &dyn Store) {
    use crate::limit::Slots;
    let report = Arc::new(Collect::default());
    let (process, doomed) = (live(store).await, live(store).await);
    send(store, &report, [limit("db", 2)]);
    let (a, b, c) = (
        tagged(store, &report, process, &["db"]).await,
        tagged(store, &report, doomed, &["db"]).await,
        tagged(store, &report, process, &["db"]).await,
    );
    let ask = |run| async move { store.acquire_slots(&slots(run, &["db"])).await.unwrap() };
    assert_eq!(ask(a).await, Slots::Granted);
    assert_eq!(ask(b).await, Slots::Granted);
    let busy = Slots::Busy {
        tag: "db".into(),
        slots: 2,
    };
    assert_eq!(ask(c).await, busy);
    // Running keeps it; waiting for a retry frees it.
    walk(store, RunKind::Task, a, Pending, &[(Running, 1, None)]).await;
    assert_eq!(ask(c).await, busy);
    walk(store, RunKind::Task, a, Running, &[(AwaitingRetry, 1, None)]).await;
    assert_eq!(ask(c).await, Slots::Granted);
    // A's second attempt waits for a slot: granted while AwaitingRetry, it counts at once.
    assert_eq!(ask(a).await, busy);
    // B's process dies: crash detection ends b, its slot frees.
    walk(store, RunKind::Task, b, Pending, &[(Running, 1, None)]).await;
    assert_eq!(ask(a).await, busy);
    store.crash_orphans(&[doomed], 0).await.unwrap();
    assert_eq!(store.task_run(b).await.unwrap().unwrap().state, Crashed);
    assert_eq!(ask(a).await, Slots::Granted);
    let d = tagged(store, &report, process, &["db"]).await;
    assert_eq!(ask(d).await, busy, "a granted in AwaitingRetry holds its slot");
    // Lowered to 1 with two holders: nobody new until both have finished.
    send(store, &report, [limit("db", 1)]);
    store.flush().await.unwrap();
    walk(
        store,
        RunKind::Task,
        c,
        Pending,
        &[(Running, 1, None), (Completed, 1, None)],
    )
    .await;
    assert_eq!(
        ask(d).await,
        Slots::Busy {
            tag: "db".into(),
            slots: 1
        }
    );
    walk(
        store,
        RunKind::Task,
        a,
        AwaitingRetry,
        &[(Running, 2, None), (Failed, 2, None)],
    )
    .await;
    assert_eq!(ask(d).await, Slots::Granted);
    let e = tagged(store, &report, process, &["db"]).await;
    assert_eq!(
        ask(e).await,
        Slots::Busy {
            tag: "db".into(),
            slots: 1
        }
    );
    // Removed: no slot needed, and nothing listed.
    send(store, &report, [Write::DeleteLimit { tag: "db".into() }]);
    store.flush().await.unwrap();
    assert_eq!(ask(e).await, Slots::Granted);
    assert!(store.limits().await.unwrap().is_empty());
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    send(store, &report, [Write::DeleteLimit { tag: "db".into() }]);
    store.flush().await.unwrap();
    let problems = report.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("no concurrency limit"), "{problems:?}");
}

/// Many task runs looked up at once by id, all or only those in given states; unknown ids
/// are left out; more than [`MAX_LOOKUP`](crate::MAX_LOOKUP) ids are refused.
pub async fn task_runs_are_looked_up_by_id_and_state(store: &dyn Store) {
    let report = Arc::new(Collect::default());
    let runs: Vec<NewTaskRun> = (0..5).map(|i| task(&format!("t{i}"), None)).collect();
    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    send(store, &report, runs.into_iter().map(Write::TaskRun));
    walk(
        store,
        RunKind::Task,
        ids[1],
        Pending,
        &[(Running, 1, None), (Completed, 1, None)],
    )
    .await;
    walk(
        store,
        RunKind::Task,
        ids[3],
        Pending,
        &[(Running, 1, None), (Failed, 1, None)],
    )
    .await;
    walk(store, RunKind::Task, ids[4], Pending, &[(Running, 1, None)]).await;
    let mut asked = ids.clone();
    asked.push(Uuid::now_v7());
    let sorted = |mut runs: Vec<TaskRun>| {
        runs.sort_by_key(|r| r.id);
        runs.into_iter().map(|r| (r.name, r.state)).collect::<Vec<_>>()
    };
    let all = sorted(store.task_runs_in(&asked, &[]).await.unwrap());
    assert_eq!(
        all,
        [
            ("t0".to_owned(), Pending),
            ("t1".to_owned(), Completed),
            ("t2".to_owned(), Pending),
            ("t3".to_owned(), Failed),
            ("t4".to_owned(), Running),
        ]
    );
    let finished = sorted(store.task_runs_in(&asked, &crate::state::FINAL).await.unwrap());
    assert_eq!(finished, [("t1".to_owned(), Completed), ("t3".to_owned(), Failed)]);
    let one = store.task_runs_in(&ids[1..2], &[Completed]).await.unwrap();
    assert_eq!(one[0].result, None);
    assert!(store.task_runs_in(&[], &[]).await.unwrap().is_empty());
    let too_many: Vec<Uuid> = (0..=crate::MAX_LOOKUP).map(|_| Uuid::now_v7()).collect();
    assert!(store.task_runs_in(&too_many, &[]).await.is_err());
    assert!(report.problems().is_empty(), "{:?}", report.problems());
}
