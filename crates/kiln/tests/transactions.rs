//! Transactions: results committed together or not at all, with commit and rollback hooks.

mod support;

use std::sync::Mutex;

use kiln::prelude::*;

/// Hook calls as (record key, event); tests run in parallel threads under `cargo test`, so
/// each reads only the events of its own keys.
static EVENTS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn committed(run: &kiln::TransactionRun) {
    let key = run.key.clone().unwrap_or_default();
    EVENTS.lock().unwrap().push((key, format!("commit {}", run.name)));
}

fn undone(run: &kiln::TransactionRun) {
    let key = run.key.clone().unwrap_or_default();
    EVENTS.lock().unwrap().push((key, format!("undo {}", run.name)));
}

/// Takes the events of the runs that wrote (or would have written) these keys, in order.
fn events(keys: &[&str]) -> Vec<String> {
    let mut all = EVENTS.lock().unwrap();
    let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(k, _)| keys.contains(&k.as_str()));
    *all = rest;
    mine.into_iter().map(|(_, e)| e).collect()
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
    support::files_below(&staging) == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_together_or_roll_back_together() {
    let home = support::home();

    // Both succeed: both records at their keys, both commit hooks ran, nothing staged.
    assert_eq!(home.engine.scope(load(5, false)).await.unwrap(), 15);
    assert!(exists(&home, "rows/5") && exists(&home, "index/5"));
    assert_eq!(
        events(&["rows/5", "index/5"]),
        ["commit write_rows", "commit write_index"]
    );
    assert!(staging_is_empty(&home));

    // The second task fails: the first one's staged record is not committed, its undo ran.
    let err = home.engine.scope(load(13, false)).await.unwrap_err();
    assert!(err.to_string().contains("the index rejects 13"), "{err}");
    assert!(!exists(&home, "rows/13") && !exists(&home, "index/13"));
    assert_eq!(events(&["rows/13", "index/13"]), ["undo write_rows"]);
    assert!(staging_is_empty(&home));

    // The body fails after both tasks succeeded: both undone, newest first.
    home.engine.scope(load(7, true)).await.unwrap_err();
    assert!(!exists(&home, "rows/7") && !exists(&home, "index/7"));
    assert_eq!(events(&["rows/7", "index/7"]), ["undo write_index", "undo write_rows"]);
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
    assert_eq!(events(&["rows/21", "rows/22"]), ["undo write_rows"]);
    assert_eq!(home.engine.scope(nested(false)).await.unwrap(), 43);
    assert!(exists(&home, "rows/21") && exists(&home, "rows/22"));
    assert_eq!(
        events(&["rows/21", "rows/22"]),
        ["commit write_rows", "commit write_rows"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_task_runs_belong_to_the_transaction() {
    #[flow]
    async fn fanned() -> anyhow::Result<Vec<u32>> {
        kiln::transaction(async {
            let a = write_rows.submit(31);
            let b = write_index.submit(13); // fails (index/13 is this test's own key: no hook)
            let a = a.await?;
            Ok(vec![a, b.await?])
        })
        .await
    }
    let home = support::home();
    home.engine.scope(fanned()).await.unwrap_err();
    assert!(!exists(&home, "rows/31"), "the submitted run's record was rolled back");
    assert_eq!(events(&["rows/31"]), ["undo write_rows"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handled_failure_rolls_back_and_says_so() {
    #[flow]
    async fn forgiving() -> anyhow::Result<u32> {
        kiln::transaction(async {
            let rows = write_rows(41).await?;
            // The body handles the failure, but the transaction must not commit.
            let index = write_index(13).await.unwrap_or(0);
            Ok(rows + index)
        })
        .await
    }
    let home = support::home();
    let err = home.engine.scope(forgiving()).await.unwrap_err();
    let rolled_back = err.downcast_ref::<kiln::Error>();
    assert!(
        matches!(rolled_back, Some(kiln::Error::RolledBack { .. })),
        "the caller learns the transaction rolled back: {err:#}"
    );
    assert!(err.to_string().contains("'write_index'"), "names the failed run: {err}");
    assert!(!exists(&home, "rows/41"));
    assert!(staging_is_empty(&home));
    assert_eq!(events(&["rows/41"]), ["undo write_rows"]);
    let flow = home.flow("forgiving");
    let rows = home.task(flow.id, "write_rows");
    assert_eq!(rows.state, kiln::StateType::RolledBack);
    assert_eq!(rows.result, None, "no reference to a record that was never committed");
    assert!(rows.state_message.unwrap().contains("rolled back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_half_way_commits_nothing() {
    #[flow]
    async fn two_rows() -> anyhow::Result<u32> {
        kiln::transaction(async { Ok(write_rows(51).await? + write_rows(52).await?) }).await
    }
    let home = support::home();
    let root = home.dir.path().join("storage/local");
    // rows/51 holds an earlier record; rows/52 cannot be written (a folder is in the way).
    std::fs::create_dir_all(root.join("rows/52/blocker")).unwrap();
    std::fs::write(root.join("rows/51"), b"the earlier record").unwrap();

    let err = home.engine.scope(two_rows()).await.unwrap_err();
    assert!(err.to_string().contains("commit failed"), "{err:#}");
    assert_eq!(
        std::fs::read(root.join("rows/51")).unwrap(),
        b"the earlier record",
        "the record the commit had replaced is back"
    );
    assert!(staging_is_empty(&home), "nothing is left under staging/");
    let flow = home.flow("two_rows");
    let states: Vec<_> = home
        .tasks(flow.id)
        .iter()
        .map(|t| (t.state, t.result.is_none()))
        .collect();
    assert_eq!(states, [(kiln::StateType::RolledBack, true); 2]);
    assert_eq!(events(&["rows/51", "rows/52"]), ["undo write_rows", "undo write_rows"]);

    // With the way clear, the same flow commits both.
    std::fs::remove_dir_all(root.join("rows/52")).unwrap();
    assert_eq!(home.engine.scope(two_rows()).await.unwrap(), 103);
    assert!(exists(&home, "rows/51") && exists(&home, "rows/52"));
    let flow = home.flow("two_rows");
    let committed = home.task(flow.id, "write_rows");
    assert_eq!(committed.state, kiln::StateType::Completed);
    assert!(committed.result.is_some());
    assert_eq!(
        events(&["rows/51", "rows/52"]),
        ["commit write_rows", "commit write_rows"]
    );
}
