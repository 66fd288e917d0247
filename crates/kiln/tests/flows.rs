//! Flow runs: parameters, subflows, flow-level retries and timeouts, durability on return.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kiln::StateType::*;
use kiln::prelude::*;
use kiln::store::Store;

#[task]
fn square(x: i64) -> i64 {
    x * x
}

#[flow]
async fn child(n: i64) -> Result<i64, kiln::Error> {
    square(n).await
}

#[derive(Clone, serde::Serialize)]
struct Settings {
    scale: f64,
    label: String,
}

struct Handle;

#[flow]
async fn parent(settings: Settings, _handle: std::sync::Arc<Handle>) -> Result<i64, kiln::Error> {
    let a = child(2).await?;
    let b = child(3).await?;
    Ok(((a + b) as f64 * settings.scale) as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subflows_are_recorded_under_their_parent_with_parameters() {
    let home = support::home();
    let settings = Settings {
        scale: 2.0,
        label: "x".into(),
    };
    let out = home
        .engine
        .scope(parent(settings, std::sync::Arc::new(Handle)))
        .await
        .unwrap();
    assert_eq!(out, 26);
    let top = home.flow("parent");
    assert_eq!(top.parent_id, None);
    assert_eq!(
        top.parameters["settings"],
        serde_json::json!({ "scale": 2.0, "label": "x" })
    );
    // A parameter that is not Serialize is recorded by its type.
    assert!(top.parameters["_handle"]["type"].as_str().unwrap().contains("Handle"));
    let subs = home.store().subflow_runs(top.id).await.unwrap();
    assert_eq!(subs.len(), 2);
    for (sub, n) in subs.iter().zip([2, 3]) {
        assert_eq!(
            (sub.name.as_str(), sub.state, sub.parent_id),
            ("child", Completed, Some(top.id))
        );
        assert_eq!(sub.parameters, serde_json::json!({ "n": n }));
        assert_eq!(home.tasks(sub.id).len(), 1, "the task run belongs to the subflow");
    }
    assert_eq!(home.tasks(top.id).len(), 0);
    // Only top-level flow runs and subflows are flow runs: 3 in all.
    assert_eq!(home.store().flow_runs(10).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_retry_reruns_its_body() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[flow(retries = 2, retry_delay = 0)]
    async fn eventually(n: i64) -> anyhow::Result<i64> {
        let attempt = CALLS.fetch_add(1, Ordering::SeqCst);
        let v = square(n).await?;
        anyhow::ensure!(attempt >= 1, "warming up");
        Ok(v)
    }
    let home = support::home();
    assert_eq!(home.engine.scope(eventually(4)).await.unwrap(), 16);
    let flow = home.flow("eventually");
    assert_eq!((flow.state, flow.attempt), (Completed, 2));
    assert_eq!(
        home.history(flow.id),
        [
            (Pending, 0),
            (Running, 1),
            (AwaitingRetry, 1),
            (Running, 2),
            (Completed, 2)
        ]
    );
    assert_eq!(home.tasks(flow.id).len(), 2, "one task run per attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_timeout_cancels_the_task_runs_it_left_running() {
    #[task]
    async fn forever() -> u32 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        0
    }
    #[flow(timeout = 0.1)]
    async fn bounded() -> Result<u32, kiln::Error> {
        let _a = forever.submit();
        let _b = forever.submit();
        forever().await
    }
    let home = support::home();
    let err = home.engine.scope(bounded()).await.unwrap_err();
    assert!(matches!(err, kiln::Error::TimedOut { .. }), "{err}");
    let flow = home.flow("bounded");
    assert_eq!(flow.state, TimedOut);
    let runs = home.tasks(flow.id);
    assert_eq!(runs.len(), 3);
    for run in runs {
        assert_eq!(run.state, Cancelled, "{}", run.id);
        assert_eq!(home.history(run.id), [(Pending, 0), (Running, 1), (Cancelled, 1)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_waits_for_task_runs_nobody_awaited() {
    #[task]
    async fn background(i: u32) -> u32 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        i
    }
    #[flow]
    async fn fire_and_forget() -> Result<(), kiln::Error> {
        for i in 0..5 {
            background.submit(i);
        }
        Ok(())
    }
    let home = support::home();
    home.engine.scope(fire_and_forget()).await.unwrap();
    let flow = home.flow("fire_and_forget");
    let runs = home.tasks(flow.id);
    assert_eq!(runs.len(), 5);
    assert!(runs.iter().all(|r| r.state == Completed));
    assert!(runs.iter().all(|r| r.end_time.unwrap() <= flow.end_time.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_is_durable_when_the_flow_returns() {
    #[flow]
    async fn many(n: i64) -> Result<i64, kiln::Error> {
        let futures = square.map(0..n);
        Ok(kiln::join_all(futures).await?.into_iter().sum())
    }
    let home = support::home();
    home.engine.scope(many(500)).await.unwrap();
    // Another connection, as another process would open it, sees every record at once.
    let other = kiln_store_sqlite::SqliteStore::open_read_only(home.dir.path().join("kiln.db")).unwrap();
    let flow = other.flow_runs(1).await.unwrap().pop().unwrap();
    assert_eq!((flow.state, flow.task_count), (Completed, 500));
    let tasks = other.task_runs(flow.id).await.unwrap();
    assert!(tasks.iter().all(|t| t.state == Completed));
    assert_eq!(other.states(tasks[499].id).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_changed_by_someone_else_fails_loudly() {
    #[flow]
    async fn overtaken() -> Result<u32, kiln::Error> {
        // Another process (a crash detector, `kiln runs cancel`) ends this flow run first.
        let id = kiln::current_flow_run_id().unwrap();
        let engine = kiln::Engine::current()?;
        let change = kiln::store::model::StateChange {
            id: kiln::store::model::write_id(),
            kind: kiln::store::model::RunKind::Flow,
            run_id: id,
            from: Running,
            to: Crashed,
            message: Some("its process stopped heartbeating".into()),
            attempt: 1,
            timestamp: kiln::store::model::now_micros(),
            result: None,
            fence: None,
        };
        let t = engine.store().set_state(change).await?;
        assert!(matches!(t, kiln::store::Transition::Accepted { .. }), "{t:?}");
        Ok(7)
    }
    let home = support::home();
    let err = home.engine.scope(overtaken()).await.unwrap_err();
    assert!(matches!(err, kiln::Error::NotRecorded { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("was refused: the run is Crashed"), "{text}");
    let flow = home.flow("overtaken");
    assert_eq!(flow.state, Crashed, "the store kept the state it accepted first");
}
