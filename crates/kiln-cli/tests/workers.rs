//! Deployments served by worker processes (this test binary's ignored `worker`): runs from
//! `kiln deployment run`, a worker SIGKILLed mid-run, cancellation, and a cron schedule
//! across a restart of every scheduler, on SQLite and PostgreSQL.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Proc, block, eventually, kiln_on as kiln};

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

/// Runs on a worker serving pool `remote`; its records are in the local storage, so only a
/// worker on this host may take it.
#[task(pool = "remote", storage = "local")]
async fn remote_square(x: u64) -> u64 {
    x * x
}

#[flow]
async fn squares(n: u64) -> Result<u64, kiln::Error> {
    let futures: Vec<_> = (0..n).map(|i| remote_square(i).submit()).collect();
    Ok(kiln::join_all(futures).await?.into_iter().sum())
}

/// Its records would be in memory of the caller: no worker could read them.
#[task(pool = "remote", storage = "scratch")]
async fn unreachable(x: u64) -> u64 {
    x
}

#[flow]
async fn uses_unreachable() -> Result<u64, kiln::Error> {
    unreachable(1).await
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
            .pool("remote")
            .run()
            .await
            .unwrap();
    });
}

/// A worker process (this binary's `worker`), SIGKILLed when dropped.
struct Worker(Proc);

impl Worker {
    fn start(home: &Path, database: Option<&str>) -> Worker {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "worker", "--ignored", "--nocapture"])
            .env("KILN_HOME", home)
            .env("KILN_HEARTBEAT_SECONDS", "1")
            .env_remove("KILN_API_URL");
        match database {
            Some(url) => c.env("KILN_DATABASE_URL", url),
            None => c.env_remove("KILN_DATABASE_URL"),
        };
        Worker(Proc::spawn(c))
    }

    fn said(&self, text: &str) -> bool {
        self.0.said(text)
    }

    fn log(&self) -> String {
        self.0.log()
    }

    fn stop(self) {
        self.0.stop();
    }
}

fn open(home: &Path, database: Option<&str>) -> Arc<dyn Store> {
    kiln::open_store(home, database).unwrap()
}

fn history(store: &dyn Store, id: uuid::Uuid) -> Vec<StateType> {
    block(store.states(id)).unwrap().iter().map(|s| s.state).collect()
}

/// How many task runs of flow run `id` have Completed.
fn completed_steps(store: &dyn Store, id: uuid::Uuid) -> usize {
    block(store.task_runs(id))
        .unwrap()
        .iter()
        .filter(|t| t.state == Completed)
        .count()
}

fn state(store: &dyn Store, id: uuid::Uuid) -> StateType {
    block(store.flow_run(id)).unwrap().unwrap().state
}

/// Waits up to 60 s for flow run `id` to finish; the failure shows its history and `worker`'s log.
fn until_finished(store: &dyn Store, id: uuid::Uuid, worker: &Worker) {
    let started = std::time::Instant::now();
    while !state(store, id).is_terminal() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run {id} did not finish: {:?}\n{}",
            block(store.states(id)),
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

    // A value of the wrong type: refused before any run is created, naming the parameter
    // (the flow's parameter types give its deployment a JSON Schema).
    let out = kiln(
        home.path(),
        None,
        &["deployment", "run", "sum", "-p", "n=\"many\"", "-p", "pause_ms=1"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parameter 'n' of flow 'sum_to' does not fit"), "{err}");
    let out = kiln(
        home.path(),
        None,
        &["deployment", "run", "sum", "-p", "n=-1", "-p", "pause_ms=1"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("parameter 'n'"),
        "a u64 is not negative"
    );
    assert_eq!(sums(), before, "no run was created");
    let schema = kiln(home.path(), None, &["deployment", "ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&schema.stdout).unwrap();
    let sum = listed.as_array().unwrap().iter().find(|d| d["name"] == "sum").unwrap();
    assert_eq!(sum["parameter_schema"]["properties"]["n"]["type"], "integer");
    assert_eq!(
        sum["parameter_schema"]["required"],
        serde_json::json!(["n", "pause_ms"])
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
        retry_of: None,
        ..Default::default()
    };
    let later = block(kiln::deployment::run_deployment(&*store, "hang", request)).unwrap();
    assert_eq!(state(&*store, later), Scheduled);
    let out = kiln(home.path(), None, &["runs", "cancel", &later.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(history(&*store, later), [Scheduled, Cancelled]);
    worker.stop();
}

/// Two workers on database `url`, and a run of `sum` with `steps` steps of 100 ms: its id,
/// the worker that claimed it, and the other.
fn one_of_two_claims(home: &Path, url: &str, steps: usize) -> (uuid::Uuid, Worker, Worker) {
    let a = Worker::start(home, Some(url));
    let b = Worker::start(home, Some(url));
    eventually(Duration::from_secs(60), "the workers to register", || {
        a.said("serving deployment") && b.said("serving deployment")
    });
    let id = start_run(home, Some(url), "sum", &[&format!("n={steps}"), "pause_ms=100"]);
    let claimed = format!("claimed flow run {id}");
    eventually(Duration::from_secs(30), "a worker to claim the run", || {
        a.said(&claimed) || b.said(&claimed)
    });
    if a.said(&claimed) { (id, a, b) } else { (id, b, a) }
}

#[test]
fn a_sigkilled_worker_s_run_completes_on_the_other_worker() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let (id, holder, other) = one_of_two_claims(home.path(), &url, 30);
    let claimed = format!("claimed flow run {id}");
    let store = open(home.path(), Some(&url));
    // Kill it while a step has just started (steps take 100 ms), so that step is in progress.
    let started = std::time::Instant::now();
    loop {
        let tasks = block(store.task_runs(id)).unwrap();
        let done = tasks.iter().filter(|t| t.state == Completed).count();
        let fresh = |t: &kiln::store::model::TaskRun| {
            let age = kiln::store::model::now_micros() - t.start_time.unwrap_or(0);
            t.state == Running && age < 40_000
        };
        if done >= 5 && tasks.iter().any(fresh) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "five steps to complete");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(holder); // SIGKILL
    let in_progress: Vec<uuid::Uuid> = block(store.task_runs(id))
        .unwrap()
        .iter()
        .filter(|t| t.state == Running)
        .map(|t| t.id)
        .collect();
    assert!(!in_progress.is_empty(), "a step was running when the worker was killed");
    until_finished(&*store, id, &other);
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
    for running in &in_progress {
        let crashed = tasks.iter().find(|t| t.id == *running).map(|t| t.state);
        assert_eq!(crashed, Some(Crashed), "the step in progress on the killed worker");
    }
    other.stop();
}

/// `kiln deployment rm`: no more runs of it; the ones still waiting for a worker are
/// Cancelled, named on stdout; removing it twice is an error naming it.
fn removing_a_deployment_cancels_its_waiting_runs(database: Option<&str>) {
    let home = tempfile::tempdir().unwrap();
    let worker = Worker::start(home.path(), database);
    eventually(
        Duration::from_secs(60),
        "the worker to register its deployments",
        || worker.said("serving deployment"),
    );
    worker.stop();
    let waiting: Vec<uuid::Uuid> = (0..2)
        .map(|_| start_run(home.path(), database, "sum", &["n=1", "pause_ms=1"]))
        .collect();
    let out = kiln(home.path(), database, &["deployment", "rm", "sum"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("removed deployment 'sum'") && stderr.contains("cancelled its 2 runs"),
        "{stderr}"
    );
    let mut said: Vec<uuid::Uuid> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches(" Cancelled").parse().unwrap())
        .collect();
    said.sort();
    let mut expected = waiting.clone();
    expected.sort();
    assert_eq!(said, expected);
    let store = open(home.path(), database);
    for id in &waiting {
        let run = block(store.flow_run(*id)).unwrap().unwrap();
        assert_eq!(run.state, Cancelled);
        assert!(run.state_message.unwrap().contains("deployment 'sum' was removed"));
    }
    assert!(
        block(store.queued_runs(None, 100))
            .unwrap()
            .iter()
            .all(|q| q.entry.deployment.as_deref() != Some("sum"))
    );
    let ls = kiln(home.path(), database, &["deployment", "ls", "--json"]);
    let names: Vec<String> = serde_json::from_slice::<Vec<serde_json::Value>>(&ls.stdout)
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !names.contains(&"sum".to_owned()) && names.contains(&"hang".to_owned()),
        "{names:?}"
    );
    for args in [&["deployment", "rm", "sum"][..], &["deployment", "run", "sum"]] {
        let again = kiln(home.path(), database, args);
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(!again.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("no deployment named 'sum'"), "{args:?}: {stderr}");
    }
}

#[test]
fn removing_a_deployment_cancels_its_waiting_runs_on_sqlite() {
    removing_a_deployment_cancels_its_waiting_runs(None);
}

#[test]
fn removing_a_deployment_cancels_its_waiting_runs_on_postgres() {
    if let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() {
        removing_a_deployment_cancels_its_waiting_runs(Some(&url));
    }
}

/// A worker that stalls (SIGSTOP) past its lease has its claim taken over; when it wakes,
/// it learns so and stops its copy of the run instead of running it to the end beside the
/// new holder.
#[test]
fn a_stalled_worker_stops_the_run_another_worker_took_over() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let steps = 40;
    let (id, holder, other) = one_of_two_claims(home.path(), &url, steps);
    let claimed = format!("claimed flow run {id}");
    let store = open(home.path(), Some(&url));
    eventually(Duration::from_secs(30), "three steps to complete", || {
        completed_steps(&*store, id) >= 3
    });
    let signal = |name: &str| {
        let pid = holder.0.child.id().to_string();
        assert!(Command::new("kill").args([name, &pid]).status().unwrap().success());
    };
    signal("-STOP");
    // Its heartbeat stops with it: after the lease (3 s with 1 s beats) the other worker
    // takes the run back and claims it.
    eventually(Duration::from_secs(30), "the other worker to take the run over", || {
        other.said(&claimed)
    });
    signal("-CONT");
    until_finished(&*store, id, &other);
    let run = block(store.flow_run(id)).unwrap().unwrap();
    assert_eq!(run.state, Completed, "{:?}\n{}", run.state_message, other.log());
    eventually(
        Duration::from_secs(10),
        "the stalled worker to learn it lost the claim",
        || holder.said("its claim was taken over"),
    );
    // Had it gone on, its copy would have run every step too: twice `steps` task runs.
    let tasks = block(store.task_runs(id)).unwrap();
    assert!(
        tasks.len() < steps + steps * 3 / 4,
        "{} task runs: the stalled worker went on\n{}",
        tasks.len(),
        holder.log()
    );
    let history: Vec<StateType> = block(store.states(id)).unwrap().iter().map(|s| s.state).collect();
    assert_eq!(
        history,
        [Scheduled, Pending, Running, AwaitingRetry, Running, Completed],
        "one committed result"
    );
    other.stop();
    holder.stop();
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

#[test]
fn task_runs_in_a_pool_run_on_the_worker_and_their_results_come_back_on_sqlite() {
    task_runs_in_a_pool_run_on_the_worker_and_their_results_come_back(None);
}

#[test]
fn task_runs_in_a_pool_run_on_the_worker_and_their_results_come_back_on_postgres() {
    if let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() {
        task_runs_in_a_pool_run_on_the_worker_and_their_results_come_back(Some(&url));
    }
}

/// A home whose `kiln.toml` names `database` (`None`: the home's SQLite file) and a
/// `memory` storage `scratch`.
fn home_on(database: Option<&str>) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let mut toml = String::from("[storage.scratch]\nkind = \"memory\"\n");
    if let Some(url) = database {
        toml.push_str(&format!("[database]\nurl = \"{url}\"\n"));
    }
    std::fs::write(home.path().join("kiln.toml"), toml).unwrap();
    home
}

/// On PostgreSQL the waiting flow learns of its task runs' ends from notifications: losing
/// the connection that receives them, again and again, loses no result.
#[test]
fn a_flow_waiting_on_workers_survives_losing_its_notifications() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let home = home_on(Some(&url));
    let worker = Worker::start(home.path(), Some(&url));
    eventually(Duration::from_secs(60), "the worker to serve", || {
        worker.said("serving")
    });
    let engine = kiln::Engine::open(home.path()).unwrap();
    let n = 300;
    let flow = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(engine.scope(squares(n)))
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cuts = 0;
    while !flow.is_finished() {
        rt.block_on(kiln_store_postgres::testing::execute(
            &url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        ));
        cuts += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let total = flow.join().unwrap().unwrap();
    assert_eq!(
        total,
        (0..n).map(|x| x * x).sum::<u64>(),
        "{cuts} cuts\n{}",
        worker.log()
    );
    worker.stop();
}

fn task_runs_in_a_pool_run_on_the_worker_and_their_results_come_back(database: Option<&str>) {
    let home = home_on(database);
    let worker = Worker::start(home.path(), database);
    eventually(Duration::from_secs(60), "the worker to serve", || {
        worker.said("serving")
    });
    let engine = kiln::Engine::open(home.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let total = rt.block_on(engine.scope(squares(6))).unwrap();
    assert_eq!(total, 55);
    let store = engine.store().clone();
    let flow = block(store.flow_runs(100))
        .unwrap()
        .into_iter()
        .find(|r| r.name == "squares")
        .unwrap();
    let tasks = block(store.task_runs(flow.id)).unwrap();
    assert_eq!(tasks.len(), 6);
    for t in &tasks {
        assert_eq!(
            history(&*store, t.id),
            [Pending, Running, Completed],
            "{}",
            worker.log()
        );
        assert!(
            worker.said(&format!("claimed task run {}", t.id)),
            "ran on the worker: {}",
            worker.log()
        );
        // Inputs crossed as records: here small, so inline in their references.
        let payload_inputs = t.inputs.as_object().unwrap();
        assert!(payload_inputs.contains_key("x"));
    }
    assert!(
        block(store.queued_runs(Some("remote"), 100)).unwrap().is_empty(),
        "finished runs leave the queue"
    );

    // A storage the worker cannot reach: refused before anything is queued.
    let err = rt.block_on(engine.scope(uses_unreachable())).unwrap_err().to_string();
    assert!(
        err.contains("'scratch'") && err.contains("memory of this process"),
        "{err}"
    );
    assert!(block(store.queued_runs(Some("remote"), 100)).unwrap().is_empty());
    worker.stop();
}

/// `kiln server start` on `port` over PostgreSQL at `database`; ready when it prints its address.
fn server(home: &Path, port: u16, database: &str) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home")
        .arg(home)
        .args(["server", "start", "--port", &port.to_string()])
        .env("KILN_DATABASE_URL", database)
        .env_remove("KILN_API_URL")
        .env_remove("KILN_API_KEY");
    let server = Proc::spawn(c);
    eventually(Duration::from_secs(30), "the server to listen", || {
        server.said("http://")
    });
    server
}

#[test]
fn a_worker_s_run_survives_a_server_restart() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let (server_home, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("http://127.0.0.1:{port}");
    let first = server(server_home.path(), port, &url);
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "worker", "--ignored", "--nocapture"])
        .env("KILN_HOME", home.path())
        .env("KILN_API_URL", &api)
        .env("KILN_HEARTBEAT_SECONDS", "1")
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_API_KEY");
    let worker = Worker(Proc::spawn(c));
    eventually(Duration::from_secs(60), "the worker to serve", || {
        worker.said("serving")
    });
    let store = open(home.path(), Some(&url));
    let request = kiln::deployment::RunRequest {
        parameters: serde_json::json!({ "n": 40, "pause_ms": 100 }),
        ..Default::default()
    };
    let id = block(kiln::deployment::run_deployment(&*store, "sum", request)).unwrap();
    eventually(Duration::from_secs(30), "five steps", || {
        completed_steps(&*store, id) >= 5
    });
    drop(first); // SIGKILL, mid-run
    std::thread::sleep(Duration::from_secs(2));
    let _second = server(server_home.path(), port, &url);
    until_finished(&*store, id, &worker);
    assert_eq!(
        history(&*store, id),
        [Scheduled, Pending, Running, Completed],
        "{}",
        worker.log()
    );
    let tasks = block(store.task_runs(id)).unwrap();
    assert_eq!(tasks.len(), 40, "every step recorded once");
    for t in &tasks {
        assert_eq!(history(&*store, t.id), [Pending, Running, Completed]);
    }
    worker.stop();
}
