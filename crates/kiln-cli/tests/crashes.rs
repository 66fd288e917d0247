//! A process killed mid-run (SIGKILL: no chance to record anything) leaves runs that the next
//! `kiln` command marks Crashed, and `kiln runs retry` accepts. The program is this test
//! binary (the ignored test `program`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln::prelude::*;

fn home() -> PathBuf {
    PathBuf::from(std::env::var("KILN_TEST_PROGRAM_HOME").unwrap())
}

#[task]
fn hang() -> u32 {
    let home = home();
    if !home.join("allow").exists() {
        std::fs::write(home.join("started"), b"").unwrap();
        std::thread::sleep(Duration::from_secs(120));
    }
    7
}

#[flow]
async fn doomed() -> Result<u32, kiln::Error> {
    hang().await
}

#[test]
#[ignore = "the program that crash_detection kills"]
fn program() {
    let engine = kiln::Engine::open(home()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(doomed())).unwrap(), 7);
}

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env("KILN_TEST_PROGRAM_HOME", home)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_process_leaves_crashed_runs_that_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "program", "--ignored", "--nocapture"])
        .env("KILN_TEST_PROGRAM_HOME", home)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the task body runs", || home.join("started").exists());
    wait_until("the flow run is recorded Running", || {
        let runs = json(&kiln(home, &["runs", "ls", "--json"]));
        runs[0]["state"] == "Running"
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let runs = json(&kiln(home, &["runs", "ls", "--json"]));
    assert_eq!(runs[0]["state"], "Crashed", "{runs}");
    let message = runs[0]["state_message"].as_str().unwrap();
    assert!(message.contains("has exited") && message.contains("pid"), "{message}");
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    let detail = json(&kiln(home, &["runs", "show", &id, "--json"]));
    assert_eq!(detail["task_runs"][0]["state"], "Crashed", "{detail}");

    // The retry runs the program again, and this time it completes.
    std::fs::write(home.join("allow"), b"").unwrap();
    let retried = kiln(home, &["runs", "retry", &id]);
    assert!(retried.status.success(), "{}", String::from_utf8_lossy(&retried.stderr));
    let runs = json(&kiln(home, &["runs", "ls", "--json"]));
    assert_eq!(runs[0]["state"], "Completed");
    assert_eq!(runs[0]["retry_of"], id.as_str());
}
