//! Transactions: results committed together or not at all, with commit and rollback hooks.

mod support;

use std::sync::Mutex;

use kiln::prelude::*;

static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn committed(run: &kiln::TransactionRun) {
    EVENTS.lock().unwrap().push(format!("commit {}", run.name));
}

fn undone(run: &kiln::TransactionRun) {
    EVENTS.lock().unwrap().push(format!("undo {}", run.name));
}

fn events() -> Vec<String> {
    std::mem::take(&mut *EVENTS.lock().unwrap())
}

#[task(persist, storage_key = "rows/{parameters.n}", on_commit = committed, on_rollback = undone)]
fn write_rows(n: u32) -> u32 {
    n
}

#[task(persist, storage_key = "index/{parameters.n}", on_commit = committed, on_rollback = undone)]
fn write_index(n: u32) -> anyhow::Result<u32> {
    anyhow::ensure!(n != 13, "the index rejects 13");
    Ok(n * 2)
}

#[flow]
async fn load(n: u32, fail_after: bool) -> anyhow::Result<u32> {
    kiln::transaction(async {
        let rows = write_rows(n).await?;
        let index = write_index(n).await?;
        anyhow::ensure!(!fail_after, "the body failed after both tasks");
        Ok(rows + index)
    })
    .await
}

fn exists(home: &support::Home, key: &str) -> bool {
    home.dir.path().join("storage/local").join(key).exists()
}

fn staging_is_empty(home: &support::Home) -> bool {
    let staging = home.dir.path().join("storage/local/staging");
    !staging.exists() || walk(&staging) == 0
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_together_or_roll_back_together() {
    let home = support::home();

    // Both succeed: both records at their keys, both commit hooks ran, nothing staged.
    assert_eq!(home.engine.scope(load(5, false)).await.unwrap(), 15);
    assert!(exists(&home, "rows/5") && exists(&home, "index/5"));
    assert_eq!(events(), ["commit write_rows", "commit write_index"]);
    assert!(staging_is_empty(&home));

    // The second task fails: the first one's staged record is not committed, its undo ran.
    let err = home.engine.scope(load(13, false)).await.unwrap_err();
    assert!(err.to_string().contains("the index rejects 13"), "{err}");
    assert!(!exists(&home, "rows/13") && !exists(&home, "index/13"));
    assert_eq!(events(), ["undo write_rows"]);
    assert!(staging_is_empty(&home));

    // The body fails after both tasks succeeded: both undone, newest first.
    home.engine.scope(load(7, true)).await.unwrap_err();
    assert!(!exists(&home, "rows/7") && !exists(&home, "index/7"));
    assert_eq!(events(), ["undo write_index", "undo write_rows"]);
}

#[flow]
async fn nested(fail_outer: bool) -> anyhow::Result<u32> {
    kiln::transaction(async {
        let inner: anyhow::Result<u32> = kiln::transaction(async { Ok(write_rows(21).await?) }).await;
        let inner = inner?;
        anyhow::ensure!(!fail_outer, "the outer body failed");
        Ok(inner + write_rows(22).await?)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_transaction_follows_the_outer_one() {
    let home = support::home();
    home.engine.scope(nested(true)).await.unwrap_err();
    assert!(
        !exists(&home, "rows/21"),
        "the inner transaction's record was rolled back with the outer"
    );
    assert_eq!(events(), ["undo write_rows"]);
    assert_eq!(home.engine.scope(nested(false)).await.unwrap(), 43);
    assert!(exists(&home, "rows/21") && exists(&home, "rows/22"));
    assert_eq!(events(), ["commit write_rows", "commit write_rows"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_task_runs_belong_to_the_transaction() {
    #[flow]
    async fn fanned() -> anyhow::Result<Vec<u32>> {
        kiln::transaction(async {
            let a = write_rows.submit(31);
            let b = write_index.submit(13); // fails
            let a = a.await?;
            Ok(vec![a, b.await?])
        })
        .await
    }
    let home = support::home();
    home.engine.scope(fanned()).await.unwrap_err();
    assert!(!exists(&home, "rows/31"), "the submitted run's record was rolled back");
    assert_eq!(events(), ["undo write_rows"]);
}
