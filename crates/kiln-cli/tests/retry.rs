//! `kiln runs retry` re-runs a failed flow run in the program that ran it. Here the program
//! is this test binary itself: the ignored test `program` runs the flow, so its recorded
//! command line (`<this binary> --exact program --ignored`) is what the retry starts again.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::prelude::*;

fn home() -> PathBuf {
    PathBuf::from(std::env::var("KILN_TEST_PROGRAM_HOME").expect("set by the test that starts the program"))
}

#[task(persist)]
fn expensive(x: u64) -> u64 {
    // Count executions across processes in a file.
    let log = home().join("expensive.log");
    let mut runs = std::fs::read_to_string(&log).unwrap_or_default();
    runs.push_str(&format!("{x}\n"));
    std::fs::write(log, runs).unwrap();
    x * 10
}

#[task(persist)]
fn flaky(x: u64) -> anyhow::Result<u64> {
    anyhow::ensure!(home().join("allow").exists(), "the downstream service is not ready yet");
    Ok(x + 1)
}

#[flow]
async fn resumable_job() -> anyhow::Result<u64> {
    let a = expensive(1).await?;
    let b = expensive(2).await?;
    flaky(a + b).await
}

#[test]
#[ignore = "the program that `kiln runs retry` starts; run by retry_loads_what_the_failed_run_completed"]
fn program() {
    let engine = kiln::Engine::open(home()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(resumable_job())).unwrap(), 31);
}

fn flow_runs(home: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(["runs", "ls", "--json"])
        .output();
    serde_json::from_slice(&out.unwrap().stdout).unwrap()
}

#[test]
fn retry_loads_what_the_failed_run_completed() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let first = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "program", "--ignored", "--nocapture"])
        .env("KILN_TEST_PROGRAM_HOME", home)
        .output()
        .unwrap();
    assert!(!first.status.success(), "the first run must fail");
    let runs = flow_runs(home);
    let failed = runs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(runs[0]["state"], "Failed");
    assert_eq!(std::fs::read_to_string(home.join("expensive.log")).unwrap(), "1\n2\n");

    // Retrying a run that has not failed is refused.
    std::fs::write(home.join("allow"), "").unwrap();
    let kiln = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--home")
            .arg(home)
            .args(args)
            .env("KILN_TEST_PROGRAM_HOME", home)
            .output()
            .unwrap()
    };
    let retried = kiln(&["runs", "retry", &failed]);
    let stderr = String::from_utf8_lossy(&retried.stderr);
    assert!(retried.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("retried {failed} and ended Completed")),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("expensive.log")).unwrap(),
        "1\n2\n",
        "the completed expensive task runs were loaded, not run again"
    );

    let runs = flow_runs(home);
    let new = &runs[0];
    assert_eq!(
        (new["state"].as_str(), new["retry_of"].as_str()),
        (Some("Completed"), Some(failed.as_str()))
    );
    let show = kiln(&["runs", "show", new["id"].as_str().unwrap(), "--json"]);
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let states: Vec<&str> = detail["task_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Cached", "Cached", "Completed"]);

    let again = kiln(&["runs", "retry", new["id"].as_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("only a run that ended without success can be retried"));
}

#[test]
#[ignore = "the program of retry_runs_in_the_same_home_and_says_how_it_went: the flow on the default engine"]
fn program_on_the_default_home() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(async { resumable_job().await }).unwrap(), 31);
}

#[test]
fn retry_runs_in_the_same_home_and_says_how_it_went() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    // A copy of the program, so that "rebuilding" it touches nothing else.
    let program = dir.path().join("program");
    std::fs::copy(std::env::current_exe().unwrap(), &program).unwrap();
    let first = Command::new(&program)
        .args(["--exact", "program_on_the_default_home", "--ignored"])
        .env("KILN_TEST_PROGRAM_HOME", &home)
        .env("KILN_HOME", &home)
        .output()
        .unwrap();
    assert!(!first.status.success(), "the first run must fail");
    let failed = flow_runs(&home)[0]["id"].as_str().unwrap().to_owned();
    // The CLI is given the home with --home only: the program gets it too.
    let kiln = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--home")
            .arg(&home)
            .args(args)
            .env("KILN_TEST_PROGRAM_HOME", &home)
            .env_remove("KILN_HOME")
            .output()
            .unwrap()
    };
    let output = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // It fails again: the retry says so, and exits non-zero.
    let again = kiln(&["runs", "retry", &failed]);
    assert_eq!(again.status.code(), Some(1), "{}", output(&again));
    assert!(
        output(&again).contains(&format!("retried {failed} and ended Failed")),
        "{}",
        output(&again)
    );
    let runs = flow_runs(&home);
    assert_eq!(runs.as_array().unwrap().len(), 2, "the retry ran in this home: {runs}");
    let failed = runs[0]["id"].as_str().unwrap().to_owned();

    // The program was rebuilt since: refused, unless forced or recomputed.
    let mut bytes = std::fs::read(&program).unwrap();
    bytes.push(0);
    std::fs::write(&program, bytes).unwrap();
    std::fs::write(home.join("allow"), "").unwrap();
    let refused = kiln(&["runs", "retry", &failed]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(output(&refused).contains("was rebuilt"), "{}", output(&refused));
    assert_eq!(flow_runs(&home).as_array().unwrap().len(), 2, "nothing ran");
    let runs_of_expensive = || {
        std::fs::read_to_string(home.join("expensive.log"))
            .unwrap()
            .lines()
            .count()
    };
    let before = runs_of_expensive();
    let refreshed = kiln(&["runs", "retry", &failed, "--refresh"]);
    assert!(refreshed.status.success(), "{}", output(&refreshed));
    assert_eq!(runs_of_expensive(), before + 2, "--refresh computes the tasks again");
    let runs = flow_runs(&home);
    assert_eq!(
        (runs[0]["state"].as_str(), runs[0]["retry_of"].as_str()),
        (Some("Completed"), Some(failed.as_str()))
    );
}
