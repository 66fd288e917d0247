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

    // The flow run's logs include its own events and its task runs', between the lines
    // about its start and its end.
    let all: Vec<String> = home
        .store()
        .logs(flow.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(all[0], format!("flow run 'chatty' ({}) started", flow.id));
    assert_eq!(all[1..4], ["flow starting", "processing item x=1", "sync body says 2"]);
    let end = format!("flow run 'chatty' ({}) finished in state Completed after ", flow.id);
    assert!(all[4].starts_with(&end), "{all:?}");
}

#[flow]
async fn doomed() -> Result<u32, anyhow::Error> {
    anyhow::bail!("the input file is empty")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flow_run_logs_why() {
    let home = support::home();
    home.engine.scope(doomed()).await.unwrap_err();
    let flow = home.flow("doomed");
    let logs = home.store().logs(flow.id).await.unwrap();
    let last = logs.last().unwrap();
    assert_eq!(last.level, "ERROR");
    assert!(
        last.message.contains("finished in state Failed after") && last.message.contains("the input file is empty"),
        "{logs:?}"
    );
}

#[test]
#[ignore = "run by kiln_log_debug_shows_the_program_s_own_debug_events, with KILN_LOG set"]
fn chatty_child() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = kiln::Engine::current().unwrap();
    rt.block_on(engine.scope(chatty())).unwrap();
    tracing::debug!("a debug line of the program, outside any run");
}

/// `KILN_LOG=debug` shows DEBUG events on stderr, the program's own included; what is
/// captured with the runs stays at INFO.
#[test]
fn kiln_task_log_info_says_every_task_run_s_start_and_end() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "chatty_child", "--ignored", "--nocapture"])
        .env("KILN_HOME", home.path())
        .env("KILN_LOG", "info")
        .env("KILN_TASK_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let store = kiln::open_store(home.path(), None).unwrap();
    let flow = support::wait(store.flow_runs(1)).unwrap().remove(0);
    for task in support::wait(store.task_runs(flow.id)).unwrap() {
        let label = format!("task run '{}' ({})", task.name, task.id);
        let said: Vec<String> = support::wait(store.logs(task.id))
            .unwrap()
            .into_iter()
            .filter(|l| l.level == "INFO" && l.message.starts_with(&label))
            .map(|l| l.message)
            .collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0], format!("{label} started (attempt 1)"));
        assert!(said[1].starts_with(&format!("{label} completed after ")), "{said:?}");
        assert!(stderr.contains(&said[1]), "on stderr too: {stderr}");
    }
}

#[test]
fn kiln_log_debug_shows_the_program_s_own_debug_events() {
    let home = tempfile::tempdir().unwrap();
    let run = |filter: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "chatty_child", "--ignored", "--nocapture"])
            .env("KILN_HOME", home.path())
            .env("KILN_LOG", filter)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let debug = run("debug");
    assert!(
        debug.contains("a debug line of the program, outside any run"),
        "{debug}"
    );
    assert!(debug.contains("not captured at the default level"), "{debug}");
    let info = run("info");
    assert!(
        !info.contains("a debug line of the program") && info.contains("started"),
        "{info}"
    );
    // Per target, as tracing's filters read it.
    let targeted = run("info,logs=debug");
    assert!(targeted.contains("a debug line of the program"), "{targeted}");
    let store = kiln::open_store(home.path(), None).unwrap();
    let flows = support::wait(store.flow_runs(10)).unwrap();
    assert_eq!(flows.len(), 3);
    for flow in flows {
        let logs = support::wait(store.logs(flow.id)).unwrap();
        assert!(logs.iter().all(|l| l.level != "DEBUG"), "{logs:?}");
    }
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

static FLAKY_CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[task(retries = 1, retry_delay = 0.01)]
fn flaky() -> anyhow::Result<u32> {
    if FLAKY_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
        anyhow::bail!("the service said 503");
    }
    Ok(1)
}

#[task]
fn broken() -> anyhow::Result<u32> {
    Err(anyhow::anyhow!("disk on fire").context("cannot write the report"))
}

#[task(cache = inputs)]
fn squared(x: u32) -> u32 {
    x * x
}

#[flow]
async fn eventful() -> anyhow::Result<u32> {
    let a = flaky().await?;
    let b = squared(3).await? + squared(3).await?;
    let c = broken().await.unwrap_or(0);
    Ok(a + b + c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_runs_say_their_retries_failures_and_cache_hits() {
    let home = support::home();
    home.engine.scope(eventful()).await.unwrap();
    let store = home.engine.store();
    let flow = store.flow_runs(1).await.unwrap().remove(0);
    let tasks = store.task_runs(flow.id).await.unwrap();
    let lines = |i: usize| -> Vec<(String, String)> {
        support::wait(store.logs(tasks[i].id))
            .unwrap()
            .into_iter()
            .map(|l| (l.level, l.message))
            .collect()
    };
    let label = |i: usize| format!("task run '{}' ({})", tasks[i].name, tasks[i].id);
    let retried = lines(0);
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(retried[0].0, "WARN");
    assert!(
        retried[0].1.starts_with(&format!(
            "{} attempt 1 of 2 failed: the service said 503; retrying in",
            label(0)
        )),
        "{retried:?}"
    );
    assert!(
        lines(1).is_empty(),
        "a plain completion says nothing at INFO: {:?}",
        lines(1)
    );
    let hit = lines(2);
    assert_eq!(hit.len(), 1, "{hit:?}");
    assert_eq!(hit[0].0, "INFO");
    assert!(
        hit[0].1.starts_with(&format!("{} cached: cache hit: loaded", label(2))),
        "{hit:?}"
    );
    let failed = lines(3);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "ERROR");
    assert!(
        failed[0].1.starts_with(&format!("{} Failed after ", label(3)))
            && failed[0].1.contains("cannot write the report: disk on fire"),
        "the error chain: {failed:?}"
    );
    // And in the flow run's logs, in order, with its own lines.
    let all: Vec<String> = store
        .logs(flow.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(all.len(), 5, "{all:?}");
}
