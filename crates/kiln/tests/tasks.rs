//! Task runs inside flows: calling, submitting, mapping, edges, sync bodies, errors.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln::StateType::*;
use kiln::prelude::*;
use kiln::store::Store;

#[task]
fn double(x: u64) -> u64 {
    x * 2
}

#[task]
async fn add(a: u64, b: u64) -> anyhow::Result<u64> {
    Ok(a + b)
}

#[flow]
async fn arithmetic(n: u64) -> anyhow::Result<u64> {
    let a = double.submit(n);
    let b = double.submit(n + 1);
    let sum = add.submit(&a, &b).await?;
    let mapped = kiln::join_all(double.map([1, 2, 3])).await?;
    Ok(sum + mapped.iter().sum::<u64>() + double(1).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_map_and_call_record_runs_and_edges() {
    let home = support::home();
    let out = home.engine.scope(arithmetic(10)).await.unwrap();
    assert_eq!(out, 20 + 22 + 12 + 2);

    let flow = home.flow("arithmetic");
    assert_eq!(flow.state, Completed);
    assert_eq!(flow.parameters, serde_json::json!({ "n": 10 }));
    let tasks = home.tasks(flow.id);
    assert_eq!(tasks.len(), 7, "2 submitted + add + 3 mapped + 1 called");
    assert!(tasks.iter().all(|t| t.state == Completed && t.attempt == 1));
    assert_eq!(flow.task_count, 7);

    let add_run = home.task(flow.id, "add");
    let edges = home.store().edges(flow.id).await.unwrap();
    assert_eq!(edges.len(), 2);
    assert!(edges.iter().all(|e| e.downstream == add_run.id));
    let upstream_names: Vec<String> = edges
        .iter()
        .map(|e| tasks.iter().find(|t| t.id == e.upstream).unwrap().name.clone())
        .collect();
    assert_eq!(upstream_names, ["double", "double"]);
    assert_eq!(
        add_run.inputs["a"]["upstream"],
        serde_json::json!(edges[0].upstream.to_string())
    );
    assert_eq!(home.history(add_run.id), [(Pending, 0), (Running, 1), (Completed, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_runs_execute_concurrently() {
    // Every run waits at a barrier sized for all of them: only concurrent execution finishes.
    static BARRIER: std::sync::OnceLock<Arc<tokio::sync::Barrier>> = std::sync::OnceLock::new();
    #[task]
    async fn meet(i: usize) -> usize {
        BARRIER.get().unwrap().wait().await;
        i
    }
    #[flow]
    async fn gathering(n: usize) -> Result<usize, kiln::Error> {
        let all = kiln::join_all(meet.map(0..n)).await?;
        Ok(all.into_iter().sum())
    }
    BARRIER.set(Arc::new(tokio::sync::Barrier::new(50))).unwrap();
    let home = support::home();
    let run = home.engine.scope(gathering(50));
    let sum = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("submitted runs did not run concurrently")
        .unwrap();
    assert_eq!(sum, (0..50usize).sum::<usize>());
}

// One async worker: if the blocking body occupied it, `signal` could never run and the
// body would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn sync_bodies_never_block_the_async_executor() {
    use std::sync::mpsc::{Receiver, Sender};
    #[task]
    fn wait_for(rx: Receiver<u32>) -> u32 {
        rx.recv().unwrap()
    }
    #[task]
    async fn signal(tx: Sender<u32>) {
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
    }
    #[flow]
    async fn handshake() -> Result<u32, kiln::Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        let got = wait_for.submit(rx);
        signal(tx).await?;
        got.await
    }
    let home = support::home();
    let run = home.engine.scope(handshake());
    let got = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the executor was blocked");
    assert_eq!(got.unwrap(), 7);
}

#[derive(Debug, thiserror::Error)]
enum PipelineError {
    #[error("the input was empty")]
    Empty,
    #[error(transparent)]
    Kiln(#[from] kiln::Error),
}

#[task]
async fn first_char(s: String) -> Result<char, PipelineError> {
    s.chars().next().ok_or(PipelineError::Empty)
}

#[flow]
async fn initials(words: Vec<String>) -> Result<String, PipelineError> {
    let mut out = String::new();
    for w in words {
        out.push(first_char(w).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_gives_back_its_own_error_type() {
    let home = support::home();
    let ok = home
        .engine
        .scope(initials(vec!["kiln".into(), "flow".into()]))
        .await
        .unwrap();
    assert_eq!(ok, "kf");
    let err = home
        .engine
        .scope(initials(vec!["a".into(), String::new()]))
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::Empty), "{err:?}");

    let flow = home.flow("initials");
    assert_eq!(flow.state, Failed);
    assert_eq!(flow.state_message.as_deref(), Some("the input was empty"));
    let runs = home.tasks(flow.id);
    assert_eq!(runs.iter().map(|t| t.state).collect::<Vec<_>>(), [Completed, Failed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failed_state_keeps_the_error_chain() {
    #[task]
    async fn read_config() -> anyhow::Result<String> {
        use anyhow::Context;
        std::fs::read_to_string("/nonexistent/kiln.toml").context("reading the pipeline config")
    }
    #[flow]
    async fn configured() -> anyhow::Result<String> {
        read_config().await
    }
    let home = support::home();
    let err = home.engine.scope(configured()).await.unwrap_err();
    assert!(err.to_string().contains("reading the pipeline config"));
    let flow = home.flow("configured");
    let run = home.task(flow.id, "read_config");
    assert_eq!(run.state, Failed);
    assert_eq!(
        run.state_message.as_deref(),
        Some("reading the pipeline config: No such file or directory (os error 2)")
    );
    let last = home.store().states(run.id).await.unwrap().pop().unwrap();
    assert_eq!(last.state, Failed);
    assert!(last.message.unwrap().ends_with("(os error 2)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_fails_its_consumers_without_running_them() {
    static RAN: AtomicUsize = AtomicUsize::new(0);
    #[task]
    async fn broken() -> anyhow::Result<u64> {
        anyhow::bail!("sensor offline")
    }
    #[task]
    async fn consumer(x: u64) -> u64 {
        RAN.fetch_add(1, Ordering::SeqCst);
        x
    }
    #[flow]
    async fn fragile() -> Result<u64, kiln::Error> {
        let up = broken.submit();
        consumer.submit(up).await
    }
    let home = support::home();
    let err = home.engine.scope(fragile()).await.unwrap_err();
    assert!(matches!(err, kiln::Error::UpstreamFailed { .. }), "{err}");
    assert!(err.to_string().contains("did not complete"), "{err}");
    assert_eq!(RAN.load(Ordering::SeqCst), 0);
    let flow = home.flow("fragile");
    let consumer_run = home.task(flow.id, "consumer");
    assert_eq!(home.history(consumer_run.id), [(Pending, 0), (Failed, 0)]);
    assert!(consumer_run.state_message.unwrap().contains("sensor offline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_outside_any_flow_is_a_standalone_run() {
    let home = support::home();
    let fut = home.engine.scope(async { double.submit(21) }).await;
    let id = fut.id();
    assert_eq!(fut.await.unwrap(), 42);
    let direct = home.engine.scope(add(1, 2)).await.unwrap();
    assert_eq!(direct, 3);
    // Durable without any flow: a fresh connection sees both.
    let reopened = kiln_store_sqlite::SqliteStore::open_read_only(home.dir.path().join("kiln.db")).unwrap();
    let run = reopened.task_run(id).await.unwrap().expect("standalone run recorded");
    assert_eq!((run.flow_run_id, run.state), (None, Completed));
    assert!(reopened.flow_runs(10).await.unwrap().is_empty());
}

#[test]
fn synchronous_code_waits_for_flows_and_tasks() {
    #[flow]
    fn sync_flow(n: u64) -> u64 {
        double(n).wait().unwrap() + add(n, 1).wait().unwrap()
    }
    let home = support::home();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = home.engine.clone();
    let out = rt.block_on(engine.scope(async { sync_flow(5).await })).unwrap();
    assert_eq!(out, 16);
    let flow = home.flow("sync_flow");
    assert_eq!(home.tasks(flow.id).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_tags_come_from_options() {
    #[task(name = "resize-image", tags = ["images", "cpu"])]
    fn resize(x: u32) -> u32 {
        x / 2
    }
    #[flow(name = "nightly", tags = ["batch"])]
    async fn nightly_flow() -> Result<u32, kiln::Error> {
        let a = resize(8).await?;
        resize
            .with_options(Options::new().name("resize-again").tags(["override"]))
            .call(a)
            .await
    }
    let home = support::home();
    assert_eq!(home.engine.scope(nightly_flow()).await.unwrap(), 2);
    let flow = home.flow("nightly");
    assert_eq!(flow.tags, ["batch"]);
    let tasks = home.tasks(flow.id);
    assert_eq!(
        tasks
            .iter()
            .map(|t| (t.name.as_str(), t.tags.clone()))
            .collect::<Vec<_>>(),
        [
            ("resize-image", vec!["images".to_string(), "cpu".to_string()]),
            ("resize-again", vec!["override".to_string()])
        ]
    );
    assert!(tasks[0].task_key.ends_with("::resize"));
}

/// A submitted run is recorded when it starts: one waiting for its input shows as Pending
/// meanwhile, and one dropped before it ever started is still recorded, Cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_run_is_recorded_pending_while_it_waits_for_its_input() {
    #[task]
    async fn slow() -> u64 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        7
    }
    #[flow]
    async fn waiting() -> Result<(uuid::Uuid, Vec<kiln::StateType>, u64), kiln::Error> {
        let up = slow.submit();
        let down = double.submit(&up);
        let id = down.id();
        let store = kiln::Engine::current()?.store().clone();
        let started = std::time::Instant::now();
        let mut seen = Vec::new();
        while started.elapsed() < Duration::from_millis(300) {
            if let Some(run) = store.task_run(id).await? {
                seen.push(run.state);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((id, seen, down.await?))
    }
    let home = support::home();
    let (id, seen, value) = home.engine.scope(waiting()).await.unwrap();
    assert_eq!(value, 14);
    assert_eq!(seen, [Pending], "recorded while its input was still running");
    assert_eq!(home.history(id), [(Pending, 0), (Running, 1), (Completed, 1)]);
}

#[test]
fn a_submitted_run_dropped_before_it_started_is_recorded_cancelled() {
    let home = support::home();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The scope returns at once: a current-thread runtime never polls the submitted job.
    let id = runtime.block_on(home.engine.scope(async { double.submit(4).id() }));
    drop(runtime);
    support::wait(home.engine.flush()).unwrap();
    assert_eq!(home.history(id), [(Pending, 0), (Cancelled, 0)]);
}

/// The handles of a run that never reported (its runtime shut down first) get an error at
/// once instead of waiting forever; so do the copies of a handle.
#[test]
fn the_handles_of_a_run_whose_runtime_shut_down_get_an_error() {
    let home = support::home();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.block_on(home.engine.scope(async { double.submit(4) }));
    let copy = handle.clone();
    drop(runtime);
    let waited = support::wait(async { copy.wait().await }).unwrap_err();
    let taken = support::wait(async { handle.await }).unwrap_err();
    for err in [waited, taken] {
        assert!(err.to_string().contains("ended without reporting"), "{err}");
    }
}

/// `join_all` gives the values in order; with a failure, the first one in order, once every
/// run has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_all_gives_values_in_order_and_the_first_failure_after_all_finished() {
    static FINISHED: AtomicUsize = AtomicUsize::new(0);
    #[task]
    async fn step(i: u64, fail: bool) -> anyhow::Result<u64> {
        // Step 3 ends last, well after step 1 (the first failure) has.
        tokio::time::sleep(Duration::from_millis(if i == 3 { 150 } else { 10 * i })).await;
        FINISHED.fetch_add(1, Ordering::SeqCst);
        anyhow::ensure!(!fail, "step {i} failed");
        Ok(i * 10)
    }
    #[flow]
    async fn joined() -> Result<(Vec<u64>, String, usize), kiln::Error> {
        let ok = kiln::join_all((0..5).map(|i| step.submit(i, false)).collect()).await?;
        FINISHED.store(0, Ordering::SeqCst);
        let failures = [false, true, false, true, false];
        let futures = (0..5).map(|i| step.submit(i, failures[i as usize])).collect();
        let err = kiln::join_all(futures).await.unwrap_err();
        Ok((ok, err.to_string(), FINISHED.load(Ordering::SeqCst)))
    }
    let home = support::home();
    let (ok, err, finished) = home.engine.scope(joined()).await.unwrap();
    assert_eq!(ok, [0, 10, 20, 30, 40]);
    assert!(err.contains("step 1 failed"), "{err}");
    assert_eq!(finished, 5, "every run had finished when join_all returned");
}
