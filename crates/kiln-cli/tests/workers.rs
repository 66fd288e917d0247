//! Deployments served by worker processes (this test binary's ignored `worker`): runs from
//! `kiln deployment run`, a worker SIGKILLed mid-run, cancellation, and a cron schedule
//! across a restart of every scheduler, on SQLite and PostgreSQL.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln::StateType::{self, *};
use kiln::prelude::*;
use kiln::store::Store;

#[task]
async fn step(i: u64, pause_ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    i
}

/// `n` steps of `pause_ms` each, one after the other; the sum of 0..n.
#[flow]
async fn sum_to(n: u64, pause_ms: u64) -> Result<u64, kiln::Error> {
    let mut total = 0;
    for i in 0..n {
        total += step(i, pause_ms).await?;
    }
    Ok(total)
}

#[flow]
async fn tick() -> Result<u64, kiln::Error> {
    Ok(1)
}

/// Runs until cancelled.
#[flow]
async fn hang() -> Result<(), kiln::Error> {
    loop {
        step(0, 50).await?;
    }
}

#[test]
#[ignore = "a worker process serving the deployments below"]
fn worker() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        kiln::serve()
            .deployment(sum_to.deploy("sum").pool("cpu").retries(1))
            .deployment(hang.deploy("hang").pool("cpu"))
            .deployment(tick.deploy("tick").pool("cron").cron("*/2 * * * * *"))
            .run()
            .await
            .unwrap();
    });
}

/// A worker process: killed when dropped; its stderr lines collected.
struct Worker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(home: &Path, database: Option<&str>) -> Worker {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "worker", "--ignored", "--nocapture"])
            .env("KILN_HOME", home)
            .env("KILN_HEARTBEAT_SECONDS", "1")
            .env_remove("KILN_API_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match database {
            Some(url) => c.env("KILN_DATABASE_URL", url),
            None => c.env_remove("KILN_DATABASE_URL"),
        };
        let mut child = c.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Worker { child, lines }
    }

    fn said(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// SIGTERM, and waits for it to stop.
    fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kiln(home: &Path, database: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home").arg(home).args(args).env_remove("KILN_API_URL");
    match database {
        Some(url) => c.env("KILN_DATABASE_URL", url),
        None => c.env_remove("KILN_DATABASE_URL"),
    };
    c.output().unwrap()
}

fn open(home: &Path, database: Option<&str>) -> Arc<dyn Store> {
    kiln::open_store(home, database).unwrap()
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Waits until `check` holds, or fails after `limit` saying `what`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn history(store: &dyn Store, id: uuid::Uuid) -> Vec<StateType> {
    block(store.states(id)).unwrap().iter().map(|s| s.state).collect()
}

fn state(store: &dyn Store, id: uuid::Uuid) -> StateType {
    block(store.flow_run(id)).unwrap().unwrap().state
}

/// Starts a run of `deployment` with `kiln deployment run`; its id.
fn start_run(home: &Path, database: Option<&str>, deployment: &str, params: &[&str]) -> uuid::Uuid {
    let mut args = vec!["deployment", "run", deployment];
    for p in params {
        args.extend(["-p", p]);
    }
    let out = kiln(home, database, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

#[test]
fn a_deployment_runs_on_a_worker_and_can_be_cancelled() {
    let home = tempfile::tempdir().unwrap();
    let worker = Worker::start(home.path(), None);
    eventually(
        Duration::from_secs(60),
        "the worker to register its deployments",
        || kiln(home.path(), None, &["deployment", "ls", "--json"]).stdout.len() > 10,
    );
    let ls = kiln(home.path(), None, &["deployment", "ls"]);
    let table = String::from_utf8_lossy(&ls.stdout);
    assert!(
        table.contains("sum") && table.contains("cpu") && table.contains("cron '*/2 * * * * *' UTC"),
        "{table}"
    );

    // A run from the CLI, waited for: Completed with its result, its tasks recorded.
    let out = kiln(
        home.path(),
        None,
        &[
            "deployment",
            "run",
            "sum",
            "-p",
            "n=5",
            "-p",
            "pause_ms=10",
            "--wait",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["state"], "Completed");
    assert_eq!(run["parameters"], serde_json::json!({ "n": 5, "pause_ms": 10 }));
    assert!(
        run["tags"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("deployment:sum"))
    );
    let store = open(home.path(), None);
    let id: uuid::Uuid = run["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(history(&*store, id), [Scheduled, Pending, Running, Completed]);
    assert_eq!(block(store.task_runs(id)).unwrap().len(), 5);

    // Parameters that do not fit: refused before any run is created, naming the parameter.
    let sums = || {
        block(store.flow_runs(1000))
            .unwrap()
            .iter()
            .filter(|r| r.name == "sum_to")
            .count()
    };
    let before = sums();
    let out = kiln(
        home.path(),
        None,
        &["deployment", "run", "sum", "-p", "m=3", "-p", "n=1", "-p", "pause_ms=1"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no parameter 'm'") && err.contains("n, pause_ms"), "{err}");
    let out = kiln(home.path(), None, &["deployment", "run", "sum", "-p", "n=1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("parameter 'pause_ms' of flow 'sum_to' is missing"));
    let out = kiln(home.path(), None, &["deployment", "run", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no deployment named 'nope'; deployments: hang, sum, tick"));
    assert_eq!(sums(), before, "no run was created");

    // A type that does not fit fails the run at the worker, naming the parameter.
    let bad = start_run(home.path(), None, "sum", &["n=\"many\"", "pause_ms=1"]);
    eventually(Duration::from_secs(30), "the bad run to fail", || {
        state(&*store, bad) == Failed
    });
    let failed = block(store.flow_run(bad)).unwrap().unwrap();
    assert!(
        failed
            .state_message
            .unwrap()
            .contains("parameter 'n' of flow 'sum_to' does not fit")
    );

    // Cancelling a running run: its worker stops it, its task runs end Cancelled too.
    let hanging = start_run(home.path(), None, "hang", &[]);
    eventually(Duration::from_secs(30), "the hanging run to start", || {
        let s = state(&*store, hanging);
        assert!(
            !s.is_terminal(),
            "{:?}\n{}",
            block(store.flow_run(hanging)),
            worker.log()
        );
        s == Running
    });
    let out = kiln(home.path(), None, &["runs", "cancel", &hanging.to_string(), "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Cancelled"));
    assert_eq!(
        history(&*store, hanging),
        [Scheduled, Pending, Running, Cancelling, Cancelled]
    );
    eventually(Duration::from_secs(10), "its task runs to end", || {
        block(store.task_runs(hanging))
            .unwrap()
            .iter()
            .all(|t| t.state.is_terminal())
    });
    let tasks = block(store.task_runs(hanging)).unwrap();
    assert_eq!(
        tasks.last().unwrap().state,
        Cancelled,
        "the step in progress was stopped"
    );
    // Not started yet (scheduled in an hour): Cancelled at once, and never claimed.
    let request = kiln::deployment::RunRequest {
        scheduled: Some(kiln::store::model::now_micros() + 3_600_000_000),
        ..Default::default()
    };
    let later = block(kiln::deployment::run_deployment(&*store, "hang", request)).unwrap();
    assert_eq!(state(&*store, later), Scheduled);
    let out = kiln(home.path(), None, &["runs", "cancel", &later.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(history(&*store, later), [Scheduled, Cancelled]);
    worker.stop();
}

#[test]
fn a_sigkilled_worker_s_run_completes_on_the_other_worker() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let a = Worker::start(home.path(), Some(&url));
    let b = Worker::start(home.path(), Some(&url));
    eventually(Duration::from_secs(60), "the workers to register", || {
        a.said("serving deployment") && b.said("serving deployment")
    });
    let store = open(home.path(), Some(&url));
    let id = start_run(home.path(), Some(&url), "sum", &["n=30", "pause_ms=100"]);
    let claimed = format!("claimed flow run {id}");
    eventually(Duration::from_secs(30), "a worker to claim the run", || {
        a.said(&claimed) || b.said(&claimed)
    });
    let (holder, other) = if a.said(&claimed) { (a, b) } else { (b, a) };
    eventually(Duration::from_secs(30), "five steps to complete", || {
        block(store.task_runs(id))
            .unwrap()
            .iter()
            .filter(|t| t.state == Completed)
            .count()
            >= 5
    });
    drop(holder); // SIGKILL
    eventually(
        Duration::from_secs(60),
        "the run to complete on the other worker",
        || state(&*store, id).is_terminal(),
    );
    let run = block(store.flow_run(id)).unwrap().unwrap();
    assert_eq!(run.state, Completed, "{:?}\n{}", run.state_message, other.log());
    assert!(other.said(&claimed), "the other worker took it over");
    let states = block(store.states(id)).unwrap();
    let kinds: Vec<StateType> = states.iter().map(|s| s.state).collect();
    assert_eq!(kinds, [Scheduled, Pending, Running, AwaitingRetry, Running, Completed]);
    assert!(
        states[3].message.as_deref().unwrap().contains("its worker stopped"),
        "{:?}",
        states[3]
    );
    assert_eq!(
        states.iter().filter(|s| s.state == Completed).count(),
        1,
        "one committed result"
    );
    // The steps the killed worker finished were loaded, not run again.
    let tasks = block(store.task_runs(id)).unwrap();
    assert!(
        tasks.iter().filter(|t| t.state == Cached).count() >= 5,
        "{:?}",
        tasks.iter().map(|t| t.state).collect::<Vec<_>>()
    );
    assert!(
        tasks.iter().any(|t| t.state == Crashed),
        "the step in progress on the killed worker"
    );
    other.stop();
}

#[test]
fn a_cron_schedule_fires_once_per_slot_across_a_restart() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path(), Some(&url));
    let completed = || -> Vec<kiln::store::model::FlowRun> {
        let mut runs: Vec<_> = block(store.flow_runs(10_000))
            .unwrap()
            .into_iter()
            .filter(|r| r.name == "tick" && r.state == Completed)
            .collect();
        runs.sort_by_key(|r| r.created);
        runs
    };
    for round in 0..2 {
        // Two schedulers at once: both create every slot; the store keeps one run each.
        let a = Worker::start(home.path(), Some(&url));
        let b = Worker::start(home.path(), Some(&url));
        let target = 3 * (round + 1);
        eventually(Duration::from_secs(90), "the schedule to fire", || {
            completed().len() >= target
        });
        a.stop();
        b.stop();
        std::thread::sleep(Duration::from_secs(3));
    }
    let runs = completed();
    for run in &runs {
        assert_eq!(run.created % 2_000_000, 0, "a slot every 2 s: {}", run.created);
        let h = history(&*store, run.id);
        assert_eq!(
            h.iter().filter(|s| **s == Running).count(),
            1,
            "run {} ran once: {h:?}",
            run.id
        );
    }
    let slots: Vec<i64> = runs.iter().map(|r| r.created).collect();
    let mut unique = slots.clone();
    unique.dedup();
    assert_eq!(unique, slots, "no slot twice");
    for pair in slots.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            2_000_000,
            "no slot lost between {} and {}: {slots:?}",
            pair[0],
            pair[1]
        );
    }
}
