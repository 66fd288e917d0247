//! The `kiln` binary against a home that real flow runs wrote.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use kiln::prelude::*;

#[task]
async fn make_numbers(n: u32) -> Vec<u32> {
    tracing::info!(n, "making numbers");
    (0..n).collect()
}

#[task]
fn total(values: Vec<u32>) -> u32 {
    values.iter().sum()
}

/// The flow runs whose `flaky` already failed once (per flow run, so the tests may share a process).
static FLAKY_FAILED: Mutex<Option<HashSet<uuid::Uuid>>> = Mutex::new(None);

#[task(retries = 1)]
async fn flaky() -> anyhow::Result<()> {
    let flow_run = kiln::current_flow_run_id().expect("called in a flow");
    if FLAKY_FAILED.lock().unwrap().get_or_insert_default().insert(flow_run) {
        anyhow::bail!("disk busy");
    }
    Ok(())
}

#[flow]
async fn numbers(n: u32) -> anyhow::Result<u32> {
    flaky().await?;
    let values = make_numbers.submit(n);
    Ok(total.submit(values).await?)
}

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("run the kiln binary")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).expect("valid JSON")
}

fn populated_home() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(engine.scope(async {
        assert_eq!(numbers(4).await.unwrap(), 6);
        assert_eq!(numbers(5).await.unwrap(), 10);
    }));
    dir
}

#[test]
fn runs_ls_lists_flow_runs_newest_first() {
    let home = populated_home();
    let text = stdout(&kiln(home.path(), &["runs", "ls"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATE") && lines[0].contains("TASKS"));
    for line in &lines[1..] {
        assert!(line.contains("numbers") && line.contains("Completed"), "{line}");
        assert!(line.trim_end().ends_with(" 3"), "three task runs: {line}");
    }
    let listed = json(&kiln(home.path(), &["runs", "ls", "--json"]));
    let runs = listed.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["parameters"], serde_json::json!({ "n": 5 }), "newest first");
    assert_eq!(runs[1]["parameters"], serde_json::json!({ "n": 4 }));
    assert!(lines[1].starts_with(runs[0]["id"].as_str().unwrap()));
    let limited = json(&kiln(home.path(), &["runs", "ls", "--json", "-n", "1"]));
    assert_eq!(limited.as_array().unwrap().len(), 1);
}

#[test]
fn runs_show_gives_task_runs_attempts_and_edges() {
    let home = populated_home();
    let listed = json(&kiln(home.path(), &["runs", "ls", "--json"]));
    let flow_id = listed[1]["id"].as_str().unwrap();

    let detail = json(&kiln(home.path(), &["runs", "show", flow_id, "--json"]));
    let tasks = detail["task_runs"].as_array().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["flaky", "make_numbers", "total"]);
    assert_eq!(tasks[0]["attempt"], 2);
    assert_eq!(tasks[0]["states"].as_array().unwrap().len(), 5);
    let edge = &detail["edges"][0];
    assert_eq!(edge["upstream"], tasks[1]["id"]);
    assert_eq!(edge["downstream"], tasks[2]["id"]);

    let text = stdout(&kiln(home.path(), &["runs", "show", flow_id]));
    assert!(text.contains(&format!("flow run   {flow_id}")), "{text}");
    assert!(text.contains("parameters {\"n\":4}"), "{text}");
    let total_line = text.lines().find(|l| l.contains(" total ")).unwrap();
    assert!(
        total_line.contains("Completed") && total_line.contains("make_numbers ("),
        "{total_line}"
    );
    let flaky_line = text.lines().find(|l| l.contains(" flaky ")).unwrap();
    assert!(flaky_line.contains(" 2 "), "two attempts: {flaky_line}");

    // A task run by its full id, and by the short tail shown in the WAITS FOR column.
    let flaky_id = tasks[0]["id"].as_str().unwrap();
    let text = stdout(&kiln(home.path(), &["runs", "show", flaky_id]));
    assert!(
        text.contains("AwaitingRetry") && text.contains("attempt 1 of 2 failed: disk busy"),
        "{text}"
    );
    let tail = &tasks[1]["id"].as_str().unwrap().replace('-', "")[24..];
    let text = stdout(&kiln(home.path(), &["runs", "show", tail]));
    assert!(text.contains("name       make_numbers"), "{text}");
}

#[test]
fn runs_logs_prints_captured_events() {
    let home = populated_home();
    let listed = json(&kiln(home.path(), &["runs", "ls", "--json"]));
    let flow_id = listed[0]["id"].as_str().unwrap();
    let text = stdout(&kiln(home.path(), &["runs", "logs", flow_id]));
    let line = text
        .lines()
        .find(|l| l.contains("making numbers"))
        .expect("captured log line");
    assert!(line.contains("INFO") && line.contains("n=5"), "{line}");
    assert!(
        text.contains("started") && text.contains("finished in state Completed after"),
        "{text}"
    );
    let logs = json(&kiln(home.path(), &["runs", "logs", flow_id, "--json"]));
    let messages: Vec<&str> = logs
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert!(messages[0].ends_with(&format!("({flow_id}) started")), "{messages:?}");
    // The task run that failed once says so, and when it tries again.
    assert!(
        messages[1].starts_with("task run 'flaky' (")
            && messages[1].ends_with(") attempt 1 of 2 failed: disk busy; retrying in 0s"),
        "{messages:?}"
    );
    assert_eq!(messages[2], "making numbers n=5");
    assert!(
        messages[3].contains("finished in state Completed after"),
        "{messages:?}"
    );
}

#[test]
fn unknown_ids_and_empty_homes_get_clear_answers() {
    let home = populated_home();
    let out = kiln(home.path(), &["runs", "show", "deadbeef"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: no flow run or task run with id 'deadbeef'; list runs with `kiln runs ls`"
    );
    let out = kiln(home.path(), &["runs", "logs", "not-an-id!"]);
    assert_eq!(out.status.code(), Some(1));

    let empty = tempfile::tempdir().unwrap();
    let out = kiln(empty.path(), &["runs", "ls"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no runs recorded yet"));
    assert!(
        !empty.path().join("kiln.db").exists(),
        "listing must not create a database"
    );
    let out = kiln(empty.path(), &["runs", "show", "0190"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn runs_ls_filters_and_pages() {
    let home = populated_home();
    let count = |args: &[&str]| {
        let mut all = vec!["runs", "ls", "--json"];
        all.extend_from_slice(args);
        json(&kiln(home.path(), &all)).as_array().unwrap().len()
    };
    assert_eq!(count(&["--state", "Completed"]), 2);
    assert_eq!(count(&["--state", "Failed", "--state", "Crashed"]), 0);
    assert_eq!(count(&["--flow", "numbers"]), 2);
    assert_eq!(count(&["--flow", "other"]), 0);
    assert_eq!(count(&["--since", "1h"]), 2);

    let first = kiln(home.path(), &["runs", "ls", "--json", "-n", "1"]);
    let hint = String::from_utf8_lossy(&first.stderr).to_string();
    let newest = json(&first)[0]["id"].as_str().unwrap().to_owned();
    assert!(hint.contains(&format!("--after {newest}")), "{hint}");
    let second = json(&kiln(
        home.path(),
        &["runs", "ls", "--json", "-n", "1", "--after", &newest],
    ));
    assert_eq!(second[0]["parameters"], serde_json::json!({ "n": 4 }), "the older run");

    let bad = kiln(home.path(), &["runs", "ls", "--state", "Bogus"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown state 'Bogus'"));
}
