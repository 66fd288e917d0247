//! Global concurrency limits by tag across processes (this test binary's ignored `crowd`):
//! several processes run task runs tagged `db` at once and never more than the limit run
//! together; a holder SIGKILLed mid-task frees its slot once crash detection finds it; on
//! SQLite (one file shared by the processes) and PostgreSQL.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Proc, block, eventually, kiln_on as kiln};

use kiln::StateType;
use kiln::prelude::*;
use kiln::store::Store;

#[task(tags = ["db"])]
async fn query(i: u64, pause_ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    i
}

/// `n` task runs tagged `db`, all submitted at once.
#[flow]
async fn crowd(n: u64, pause_ms: u64) -> Result<u64, kiln::Error> {
    let futures: Vec<_> = (0..n).map(|i| query(i, pause_ms).submit()).collect();
    Ok(kiln::join_all(futures).await?.into_iter().sum())
}

#[test]
#[ignore = "a process running `crowd` with CROWD_N tasks of CROWD_PAUSE_MS each"]
fn crowd_process() {
    let n = std::env::var("CROWD_N").unwrap().parse().unwrap();
    let pause = std::env::var("CROWD_PAUSE_MS").unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sum = rt
        .block_on(async { kiln::Engine::current()?.scope(crowd(n, pause)).await })
        .unwrap();
    assert_eq!(sum, n * (n - 1) / 2);
    println!("crowd done");
}

fn spawn_crowd(home: &Path, database: Option<&str>, n: u64, pause_ms: u64) -> Proc {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "crowd_process", "--ignored", "--nocapture"])
        .env("KILN_HOME", home)
        .env("KILN_HEARTBEAT_SECONDS", "1")
        .env("KILN_LOG", "info")
        .env("CROWD_N", n.to_string())
        .env("CROWD_PAUSE_MS", pause_ms.to_string())
        .env_remove("KILN_API_URL");
    match database {
        Some(url) => c.env("KILN_DATABASE_URL", url),
        None => c.env_remove("KILN_DATABASE_URL"),
    };
    Proc::spawn(c)
}

fn kiln_ok(home: &Path, database: Option<&str>, args: &[&str]) -> String {
    let out = kiln(home, database, args);
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits for `p` to print "crowd done"; the failure shows its log.
fn until_done(p: &mut Proc, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success() && p.said("crowd done"), "{}", p.log());
            return;
        }
        assert!(
            started.elapsed() < within,
            "still running after {within:?}:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each task run of `name` with its Running state's time and its final state's time.
fn intervals(store: &dyn Store, name: &str) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for flow in block(store.flow_runs(1000)).unwrap().iter().filter(|r| r.name == name) {
        for task in block(store.task_runs(flow.id)).unwrap() {
            if task.state == StateType::Crashed {
                continue;
            }
            let states = block(store.states(task.id)).unwrap();
            let start = states.iter().find(|s| s.state == StateType::Running).unwrap().timestamp;
            let end = states.last().unwrap();
            assert_eq!(end.state, StateType::Completed, "{states:?}");
            out.push((start, end.timestamp));
        }
    }
    out
}

/// The most intervals that overlap at one moment.
fn most_at_once(intervals: &[(i64, i64)]) -> usize {
    let mut edges: Vec<(i64, i32)> = intervals.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    // An end and a start at the same microsecond do not overlap.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn never_more_than_the_limit(home: &Path, database: Option<&str>) {
    kiln_ok(home, database, &["limit", "set", "db", "2"]);
    let ls = kiln_ok(home, database, &["limit", "ls"]);
    assert!(ls.contains("db") && ls.contains('2'), "{ls}");
    // Three processes, four task runs each, every one tagged `db`.
    let mut crowds: Vec<Proc> = (0..3).map(|_| spawn_crowd(home, database, 4, 150)).collect();
    for p in &mut crowds {
        until_done(p, Duration::from_secs(120));
    }
    assert!(
        crowds
            .iter()
            .any(|p| p.said("waits for a slot of tag 'db': all 2 are in use")),
        "some task run waited:\n{}",
        crowds[0].log()
    );
    let store: Arc<dyn Store> = kiln::open_store(home, database).unwrap();
    let runs = intervals(&*store, "crowd");
    assert_eq!(runs.len(), 12);
    assert_eq!(most_at_once(&runs), 2, "{runs:?}");
    // Every slot is free again.
    let usage: serde_json::Value = serde_json::from_str(&kiln_ok(home, database, &["limit", "ls", "--json"])).unwrap();
    assert_eq!(usage[0]["tag"], "db");
    assert_eq!(usage[0]["holders"], serde_json::json!([]));

    // A holder killed mid-task: its slot frees once crash detection finds it, and the run
    // that waited for it completes.
    kiln_ok(home, database, &["limit", "set", "db", "1"]);
    let holder = spawn_crowd(home, database, 1, 600_000);
    eventually(Duration::from_secs(60), "the holder to take the slot", || {
        let usage: serde_json::Value =
            serde_json::from_str(&kiln_ok(home, database, &["limit", "ls", "--json"])).unwrap();
        usage[0]["holders"].as_array().is_some_and(|h| h.len() == 1)
    });
    let mut waiter = spawn_crowd(home, database, 1, 10);
    eventually(Duration::from_secs(60), "the second process to wait", || {
        waiter.said("waits for a slot of tag 'db': all 1 are in use")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(waiter.child.try_wait().unwrap().is_none(), "{}", waiter.log());
    drop(holder); // SIGKILL
    until_done(&mut waiter, Duration::from_secs(60));
    let crashed = block(store.flow_runs(1000))
        .unwrap()
        .iter()
        .flat_map(|f| block(store.task_runs(f.id)).unwrap())
        .filter(|t| t.state == StateType::Crashed)
        .count();
    assert_eq!(crashed, 1, "the killed holder's task run is Crashed");

    // Removed: nothing waits any more; removing it twice says there is none.
    kiln_ok(home, database, &["limit", "rm", "db"]);
    let out = kiln(home, database, &["limit", "rm", "db"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tag 'db' has no concurrency limit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tag_limits_hold_across_processes_on_sqlite() {
    let home = tempfile::tempdir().unwrap();
    never_more_than_the_limit(home.path(), None);
}

#[test]
fn tag_limits_hold_across_processes_on_postgres() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    never_more_than_the_limit(home.path(), Some(&url));
}
