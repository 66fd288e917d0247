//! `tracing` events inside runs are captured per run.

mod support;

use kiln::prelude::*;

#[task]
async fn noisy(x: u32) -> u32 {
    tracing::info!(x, "processing item");
    tracing::debug!("not captured at the default level");
    x + 1
}

#[task]
fn noisy_sync(x: u32) -> u32 {
    tracing::warn!("sync body says {x}");
    x
}

#[flow]
async fn chatty() -> Result<u32, kiln::Error> {
    tracing::info!("flow starting");
    let a = noisy(1).await?;
    let b = noisy_sync.submit(a).await?;
    Ok(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_captured_per_run() {
    let home = support::home();
    assert_eq!(home.engine.scope(chatty()).await.unwrap(), 2);
    let flow = home.flow("chatty");
    let noisy_run = home.task(flow.id, "noisy");
    let sync_run = home.task(flow.id, "noisy_sync");

    let task_logs = home.store().logs(noisy_run.id).await.unwrap();
    assert_eq!(task_logs.len(), 1);
    assert_eq!(task_logs[0].level, "INFO");
    assert_eq!(task_logs[0].message, "processing item x=1");
    assert_eq!(task_logs[0].flow_run_id, Some(flow.id));

    let sync_logs = home.store().logs(sync_run.id).await.unwrap();
    assert_eq!(sync_logs.len(), 1);
    assert_eq!(
        (sync_logs[0].level.as_str(), sync_logs[0].message.as_str()),
        ("WARN", "sync body says 2")
    );

    // The flow run's logs include its own events and its task runs'.
    let all: Vec<String> = home
        .store()
        .logs(flow.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(all, ["flow starting", "processing item x=1", "sync body says 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_outside_runs_are_not_captured() {
    let home = support::home();
    tracing::info!("outside any run");
    home.engine.scope(chatty()).await.unwrap();
    let flow = home.flow("chatty");
    let all = home.store().logs(flow.id).await.unwrap();
    assert!(all.iter().all(|l| l.message != "outside any run"));
}
