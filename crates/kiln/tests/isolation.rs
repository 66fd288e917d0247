//! Serializable isolation: of many concurrent runs that miss one cache key, exactly one
//! runs; the others wait and load its record. In one process and across processes.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln::prelude::*;

/// Appends a line per execution to `$KILN_TEST_EXECUTIONS` (across processes). In one
/// process, the tests count executions by the Completed runs in their own home, so they
/// pass whether tests run in one process or one each.
fn executed() {
    if let Ok(log) = std::env::var("KILN_TEST_EXECUTIONS") {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        writeln!(f, "{}", std::process::id()).unwrap();
    }
}

#[task(cache = inputs, isolation = serializable)]
async fn slow_square(x: u64) -> u64 {
    executed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    x * x
}

#[task(cache = inputs, isolation = serializable, storage = "shared")]
async fn shared_square(x: u64) -> u64 {
    executed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    x * x
}

#[flow]
async fn crowd(n: usize) -> Result<Vec<u64>, kiln::Error> {
    kiln::join_all((0..n).map(|_| slow_square.submit(12)).collect()).await
}

#[flow]
async fn shared_crowd(n: usize) -> Result<Vec<u64>, kiln::Error> {
    kiln::join_all((0..n).map(|_| shared_square.submit(12)).collect()).await
}

/// Completed (computed) and Cached (loaded) task runs of the newest flow run.
fn states(home: &support::Home) -> (usize, usize) {
    let flow = support::wait(home.store().flow_runs(1)).unwrap().pop().unwrap();
    count(home, flow.id)
}

fn count(home: &support::Home, flow: uuid::Uuid) -> (usize, usize) {
    let runs = home.tasks(flow);
    let completed = runs.iter().filter(|r| r.state == kiln::StateType::Completed).count();
    let cached = runs.iter().filter(|r| r.state == kiln::StateType::Cached).count();
    (completed, cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_run_it_once() {
    let home = support::home();
    let out = home.engine.scope(crowd(50)).await.unwrap();
    assert!(out.iter().all(|v| *v == 144));
    assert_eq!(states(&home), (1, 49));
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_tasks_of_one_flow_on_one_thread_run_it_once() {
    let home = support::home();
    let out = home.engine.scope(crowd(20)).await.unwrap();
    assert_eq!(out.len(), 20);
    assert_eq!(states(&home), (1, 19));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_a_dead_process_does_not_block() {
    let home = support::home();
    home.engine.scope(crowd(1)).await.unwrap();
    let flow = home.store().flow_runs(1).await.unwrap().pop().unwrap();
    let key = home.tasks(flow.id)[0].result.clone().unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let root = home.dir.path().join("storage/local");
    std::fs::remove_file(root.join(&key)).unwrap();
    // A lease whose holder died a minute ago.
    let lock = root.join(format!("locks/{key}.lock"));
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let expired = kiln::store::model::now_micros() - 60_000_000;
    std::fs::write(&lock, format!("{{\"owner\":\"dead\",\"expires\":{expired}}}")).unwrap();
    let run = home.engine.scope(crowd(3));
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the dead process's lock file blocked the run");
    assert_eq!(out.unwrap(), [144, 144, 144]);
    assert_eq!(states(&home), (1, 2), "computed again once, the others loaded it");
    assert!(!lock.exists(), "the lock is removed once the record is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_while_holding_the_lock_releases_it() {
    static FIRST: AtomicBool = AtomicBool::new(true);
    #[task(cache = inputs, isolation = serializable)]
    async fn stalls_once(x: u64) -> u64 {
        if FIRST.swap(false, Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        x * 2
    }
    #[flow]
    async fn holding(x: u64) -> Result<u64, kiln::Error> {
        stalls_once(x).await
    }
    let home = support::home();
    // The first run takes the lock, then its caller gives up on it.
    let abandoned = tokio::time::timeout(Duration::from_millis(300), home.engine.scope(holding(5))).await;
    assert!(abandoned.is_err(), "the first run was still holding the lock");
    let again = tokio::time::timeout(Duration::from_secs(20), home.engine.scope(holding(5)))
        .await
        .expect("the cancelled run's lock was never released");
    assert_eq!(again.unwrap(), 10);
    assert_eq!(
        support::files_below(&home.dir.path().join("storage/local/locks")),
        0,
        "no lock file is left"
    );
}

/// The program the cross-process tests start twice: a flow of 10 concurrent callers.
#[test]
#[ignore = "started by the cross-process tests"]
fn program() {
    let home = PathBuf::from(std::env::var("KILN_TEST_PROGRAM_HOME").unwrap());
    let engine = kiln::Engine::open(home).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = rt.block_on(engine.scope(shared_crowd(10))).unwrap();
    assert!(out.iter().all(|v| *v == 144));
}

fn two_processes_share(storage_toml: &str) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let executions = dir.path().join("executions.log");
    let children: Vec<_> = (0..2)
        .map(|i| {
            let home = dir.path().join(format!("home{i}"));
            std::fs::create_dir_all(&home).unwrap();
            std::fs::write(home.join("kiln.toml"), storage_toml).unwrap();
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "program", "--ignored", "--nocapture"])
                .env("KILN_TEST_PROGRAM_HOME", &home)
                .env("KILN_TEST_EXECUTIONS", &executions)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::read_to_string(executions).unwrap_or_default().lines().count()
}

fn local_toml(path: &Path) -> String {
    format!("[storage.shared]\nkind = \"local\"\npath = \"{}\"\n", path.display())
}

#[test]
fn two_processes_sharing_a_local_storage_run_it_once() {
    let shared = tempfile::tempdir().unwrap();
    assert_eq!(two_processes_share(&local_toml(shared.path())), 1);
}

#[test]
fn two_processes_sharing_the_s3_server_run_it_once() {
    let Some(endpoint) = std::env::var("KILN_TEST_S3_ENDPOINT").ok().filter(|e| !e.is_empty()) else {
        assert_ne!(
            std::env::var("KILN_REQUIRE_SERVICES").as_deref(),
            Ok("1"),
            "KILN_TEST_S3_ENDPOINT is not set"
        );
        eprintln!("skipped: KILN_TEST_S3_ENDPOINT is not set (scripts/test starts the services)");
        return;
    };
    let bucket = std::env::var("KILN_TEST_S3_BUCKET").unwrap_or_else(|_| "kiln-test".into());
    let prefix = format!("isolation/{}", uuid::Uuid::now_v7().simple());
    let toml = format!(
        "[storage.shared]\nkind = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\naccess_key_id = \"test\"\n\
         secret_access_key = \"test\"\nallow_http = true\nprefix = \"{prefix}\"\n"
    );
    assert_eq!(two_processes_share(&toml), 1);
}
