//! Many processes on one state database, as the normal case: twelve programs run a flow of
//! many task runs each at once, on one SQLite home and on one PostgreSQL database, and every
//! run and state is recorded. The program is this test binary (the ignored test `program`).

use std::path::Path;
use std::process::{Command, Output};

use kiln::prelude::*;

/// Task runs per process (the figure: twelve processes of 20,000).
const TASKS: u64 = 20_000;
const PROCESSES: usize = 12;

#[task]
async fn trivial(i: u64) -> u64 {
    i + 1
}

#[flow]
async fn crowd(n: u64) -> Result<u64, kiln::Error> {
    Ok(kiln::join_all(trivial.map(0..n)).await?.into_iter().sum())
}

#[test]
#[ignore = "the program the many-process tests start"]
fn program() {
    let home = std::env::var("KILN_HOME").unwrap();
    let n: u64 = std::env::var("KILN_TEST_TASKS").unwrap().parse().unwrap();
    let engine = kiln::Engine::open(home).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sum = rt.block_on(engine.scope(crowd(n))).unwrap();
    assert_eq!(sum, n * (n + 1) / 2);
}

fn run_many(home: &Path, database_url: Option<&str>) -> Vec<Output> {
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args(["--exact", "program", "--ignored", "--nocapture"])
                .env("KILN_HOME", home)
                .env("KILN_TEST_TASKS", TASKS.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            match database_url {
                Some(url) => c.env("KILN_DATABASE_URL", url),
                None => c.env_remove("KILN_DATABASE_URL"),
            };
            c.spawn().unwrap()
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// Every flow run Completed with all its task runs Completed; a sample of histories whole.
fn check_everything_recorded(home: &Path, database_url: Option<&str>) {
    let mut kiln = Command::new(env!("CARGO_BIN_EXE_kiln"));
    kiln.arg("--home").arg(home).args(["runs", "ls", "--json", "-n", "100"]);
    if let Some(url) = database_url {
        kiln.env("KILN_DATABASE_URL", url);
    }
    let out = kiln.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), PROCESSES);
    for f in flows {
        assert_eq!(f["state"], "Completed", "{f}");
        assert_eq!(f["task_count"], TASKS, "{f}");
    }
    let store = kiln::open_existing_store(home, database_url).unwrap().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for f in flows {
        let id = uuid::Uuid::parse_str(f["id"].as_str().unwrap()).unwrap();
        let tasks = rt.block_on(store.task_runs(id)).unwrap();
        assert_eq!(tasks.len() as u64, TASKS);
        let unfinished: Vec<_> = tasks.iter().filter(|t| t.state != kiln::StateType::Completed).collect();
        assert!(
            unfinished.is_empty(),
            "{} task runs not Completed: {:?}",
            unfinished.len(),
            unfinished.first()
        );
        for t in tasks.iter().step_by(997) {
            let states: Vec<_> = rt
                .block_on(store.states(t.id))
                .unwrap()
                .iter()
                .map(|s| (s.seq, s.state))
                .collect();
            use kiln::StateType::*;
            assert_eq!(states, [(0, Pending), (1, Running), (2, Completed)]);
        }
    }
}

fn all_succeeded(outputs: &[Output]) {
    for o in outputs {
        assert!(
            o.status.success(),
            "a process failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn twelve_processes_on_one_sqlite_home_record_every_state() {
    let dir = tempfile::tempdir().unwrap();
    all_succeeded(&run_many(dir.path(), None));
    check_everything_recorded(dir.path(), None);
}

#[test]
fn twelve_processes_on_one_postgres_database_record_every_state() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    all_succeeded(&run_many(dir.path(), Some(&url)));
    check_everything_recorded(dir.path(), Some(&url));
}
