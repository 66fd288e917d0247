//! The state store conformance suite: every backend runs these through `store_suite!`.
#![allow(dead_code)]

use kiln_store::model::*;
use kiln_store::state::StateType::{self, *};
use kiln_store::{Store, StoreError};
use uuid::Uuid;

/// Generates one `#[test]` per suite function for a backend built by `$make` (which returns
/// the store and a guard that keeps its resources alive).
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        $crate::store_suite!(@tests $make;
            records_a_run_lifecycle,
            state_changes_across_batches_update_the_row,
            edges_logs_and_subflows,
            ids_resolve_exactly_by_prefix_and_by_tail,
            refuses_illegal_transitions,
            a_failed_write_is_reported_and_loses_nothing_else,
            lists_newest_first_within_the_limit,
            concurrent_writers_lose_nothing,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let (store, _guard) = $make;
                suite::$name(&store);
            }
        )*
    };
}

fn flow(name: &str, parent: Option<Uuid>) -> NewFlowRun {
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
    }
}

fn task(name: &str, flow: Option<Uuid>) -> NewTaskRun {
    NewTaskRun {
        id: Uuid::now_v7(),
        flow_run_id: flow,
        name: name.into(),
        task_key: format!("suite::{name}"),
        inputs: serde_json::json!({ "x": { "type": "u64" } }),
        tags: vec![],
        created: now_micros(),
        initial_state: Pending,
        call_key: None,
    }
}

/// Moves a run through `states`, starting after its creation state.
fn walk(store: &dyn Store, kind: RunKind, id: Uuid, states: &[(StateType, u32, Option<&str>)]) {
    let mut from = Pending;
    for (i, &(state, attempt, message)) in states.iter().enumerate() {
        let record = StateRecord {
            run_id: id,
            seq: i as u32 + 1,
            state,
            message: message.map(str::to_owned),
            attempt,
            timestamp: now_micros(),
            result: None,
        };
        store.transition(kind, Some(from), record).unwrap();
        from = state;
    }
}

pub fn records_a_run_lifecycle(store: &dyn Store) {
    let f = flow("lifecycle", None);
    let t = task("step", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    store.send(Write::FlowRun(f)).unwrap();
    store.send(Write::TaskRun(t)).unwrap();
    walk(store, RunKind::Flow, fid, &[(Running, 1, None)]);
    walk(
        store,
        RunKind::Task,
        tid,
        &[
            (Running, 1, None),
            (AwaitingRetry, 1, Some("boom; retrying")),
            (Running, 2, None),
            (Completed, 2, None),
        ],
    );
    walk_from(store, RunKind::Flow, fid, Running, 2, &[(Completed, 1, None)]);
    store.flush().unwrap();

    let fr = store.flow_run(fid).unwrap().unwrap();
    assert_eq!((fr.state, fr.attempt, fr.task_count), (Completed, 1, 1));
    assert_eq!(fr.parameters, serde_json::json!({ "n": 1, "label": "x" }));
    assert_eq!(fr.tags, ["t1"]);
    assert!(fr.start_time.is_some() && fr.end_time >= fr.start_time);

    let tr = store.task_run(tid).unwrap().unwrap();
    assert_eq!((tr.state, tr.attempt, tr.flow_run_id), (Completed, 2, Some(fid)));
    assert_eq!(tr.inputs["x"]["type"], "u64");
    let history: Vec<(StateType, u32, u32)> = store
        .states(tid)
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
    assert_eq!(store.states(tid).unwrap()[2].message.as_deref(), Some("boom; retrying"));
    assert_eq!(store.task_runs(fid).unwrap().len(), 1);
}

fn walk_from(
    store: &dyn Store,
    kind: RunKind,
    id: Uuid,
    mut from: StateType,
    first_seq: u32,
    states: &[(StateType, u32, Option<&str>)],
) {
    for (i, &(state, attempt, message)) in states.iter().enumerate() {
        let record = StateRecord {
            run_id: id,
            seq: first_seq + i as u32,
            state,
            message: message.map(str::to_owned),
            attempt,
            timestamp: now_micros(),
            result: None,
        };
        store.transition(kind, Some(from), record).unwrap();
        from = state;
    }
}

pub fn state_changes_across_batches_update_the_row(store: &dyn Store) {
    let t = task("slow", None);
    let id = t.id;
    store.send(Write::TaskRun(t)).unwrap();
    store.flush().unwrap();
    assert_eq!(store.task_run(id).unwrap().unwrap().state, Pending);
    walk(store, RunKind::Task, id, &[(Running, 1, None)]);
    store.flush().unwrap();
    let running = store.task_run(id).unwrap().unwrap();
    assert_eq!((running.state, running.end_time), (Running, None));
    walk_from(store, RunKind::Task, id, Running, 2, &[(Failed, 1, Some("disk full"))]);
    store.flush().unwrap();
    let failed = store.task_run(id).unwrap().unwrap();
    assert_eq!(
        (failed.state, failed.state_message.as_deref()),
        (Failed, Some("disk full"))
    );
    assert_eq!(failed.start_time, running.start_time, "the start time is kept");
    assert!(failed.end_time.is_some());
    assert_eq!(store.states(id).unwrap().len(), 3);
}

pub fn edges_logs_and_subflows(store: &dyn Store) {
    let parent = flow("parent", None);
    let child = flow("child", Some(parent.id));
    let (a, b) = (task("a", Some(parent.id)), task("b", Some(parent.id)));
    let (pid, cid, aid, bid) = (parent.id, child.id, a.id, b.id);
    for w in [
        Write::FlowRun(parent),
        Write::FlowRun(child),
        Write::TaskRun(a),
        Write::TaskRun(b),
    ] {
        store.send(w).unwrap();
    }
    let edge = Edge {
        upstream: aid,
        downstream: bid,
    };
    store
        .send(Write::Edge {
            flow_run_id: Some(pid),
            edge: edge.clone(),
        })
        .unwrap();
    store
        .send(Write::Edge {
            flow_run_id: Some(pid),
            edge: edge.clone(),
        })
        .unwrap(); // recorded once
    for (run, msg) in [(aid, "from a"), (pid, "from the flow"), (cid, "from the child")] {
        store
            .send(Write::Log(LogRecord {
                run_id: run,
                flow_run_id: Some(if run == cid { cid } else { pid }),
                timestamp: now_micros(),
                level: "INFO".into(),
                target: "suite".into(),
                message: msg.into(),
            }))
            .unwrap();
    }
    store.flush().unwrap();
    assert_eq!(store.edges(pid).unwrap(), [edge]);
    let subs = store.subflow_runs(pid).unwrap();
    assert_eq!(subs.iter().map(|f| f.id).collect::<Vec<_>>(), [cid]);
    let msgs = |id| {
        store
            .logs(id)
            .unwrap()
            .into_iter()
            .map(|l| l.message)
            .collect::<Vec<_>>()
    };
    assert_eq!(msgs(aid), ["from a"]);
    assert_eq!(msgs(pid), ["from a", "from the flow"]);
    assert_eq!(msgs(cid), ["from the child"]);
}

pub fn ids_resolve_exactly_by_prefix_and_by_tail(store: &dyn Store) {
    let f = flow("ids", None);
    let t = task("ids", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    store.send(Write::FlowRun(f)).unwrap();
    store.send(Write::TaskRun(t)).unwrap();
    store.flush().unwrap();
    assert_eq!(store.resolve(&fid.to_string()).unwrap(), RunRef::Flow(fid));
    assert_eq!(
        store.resolve(&tid.simple().to_string().to_uppercase()).unwrap(),
        RunRef::Task(tid)
    );
    let tail = &tid.simple().to_string()[24..];
    assert_eq!(store.resolve(tail).unwrap(), RunRef::Task(tid));
    // Both were created in the same millisecond: the time prefix is shared.
    assert!(matches!(
        store.resolve(&fid.to_string()[..8]),
        Err(StoreError::AmbiguousRun { count: 2, .. })
    ));
    assert!(matches!(store.resolve("ffffffff"), Err(StoreError::UnknownRun(_))));
    assert!(matches!(store.resolve("not an id"), Err(StoreError::UnknownRun(_))));
    assert!(matches!(store.resolve(""), Err(StoreError::UnknownRun(_))));
}

pub fn refuses_illegal_transitions(store: &dyn Store) {
    let t = task("strict", None);
    let id = t.id;
    store.send(Write::TaskRun(t)).unwrap();
    let record = |state| StateRecord {
        run_id: id,
        seq: 1,
        state,
        message: None,
        attempt: 1,
        timestamp: 0,
        result: None,
    };
    let err = store
        .transition(RunKind::Task, Some(Pending), record(Completed))
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::IllegalTransition {
            from: Some(Pending),
            to: Completed
        }
    ));
    let err = store
        .transition(RunKind::Task, Some(Failed), record(Running))
        .unwrap_err();
    assert!(
        err.to_string().contains("a run in a final state cannot change"),
        "{err}"
    );
    store.flush().unwrap();
    assert_eq!(
        store.states(id).unwrap().len(),
        1,
        "refused transitions are not recorded"
    );
}

pub fn a_failed_write_is_reported_and_loses_nothing_else(store: &dyn Store) {
    let f = flow("dup", None);
    let dup = f.clone();
    let other = task("after", None);
    let (fid, oid) = (f.id, other.id);
    store.send(Write::FlowRun(f)).unwrap();
    store.flush().unwrap();
    store.send(Write::FlowRun(dup)).unwrap();
    store.send(Write::TaskRun(other)).unwrap();
    let err = store.flush().unwrap_err();
    assert!(err.to_string().contains(&format!("flow run {fid}")), "{err}");
    assert!(
        store.task_run(oid).unwrap().is_some(),
        "the other write of the batch was kept"
    );
    store.flush().expect("the failure was reported once");
}

pub fn lists_newest_first_within_the_limit(store: &dyn Store) {
    let ids: Vec<Uuid> = (0..5)
        .map(|i| {
            let f = flow(&format!("f{i}"), None);
            let id = f.id;
            store.send(Write::FlowRun(f)).unwrap();
            id
        })
        .collect();
    store.flush().unwrap();
    let listed: Vec<Uuid> = store.flow_runs(3).unwrap().into_iter().map(|f| f.id).collect();
    assert_eq!(listed, [ids[4], ids[3], ids[2]]);
}

pub fn concurrent_writers_lose_nothing(store: &dyn Store) {
    let f = flow("busy", None);
    let fid = f.id;
    store.send(Write::FlowRun(f)).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..500 {
                    let t = task("w", Some(fid));
                    let id = t.id;
                    store.send(Write::TaskRun(t)).unwrap();
                    walk(store, RunKind::Task, id, &[(Running, 1, None), (Completed, 1, None)]);
                }
            });
        }
    });
    store.flush().unwrap();
    let runs = store.task_runs(fid).unwrap();
    assert_eq!(runs.len(), 2000);
    assert!(runs.iter().all(|r| r.state == Completed && r.start_time.is_some()));
    assert_eq!(store.flow_run(fid).unwrap().unwrap().task_count, 2000);
}
