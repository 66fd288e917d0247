//! Watching and steering runs from the CLI, through its binary: `runs watch`, `runs cancel`
//! of a flow run in another process, `runs delete`, `runs ls --tasks`, what `runs show`
//! prints, escaped control characters, a home that does not exist. The programs are this
//! test binary (the ignored test `program`, in the mode `KILN_TEST_MODE` names).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Proc, eventually};
use kiln::prelude::*;

fn home() -> PathBuf {
    PathBuf::from(std::env::var("KILN_TEST_PROGRAM_HOME").unwrap())
}

#[task]
async fn step(i: u64) -> u64 {
    if i > 0 {
        std::fs::write(home().join("hanging"), b"").unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    i
}

#[flow]
async fn long_job() -> anyhow::Result<u64> {
    let first = step(0).await?;
    Ok(first + step(1).await?)
}

#[task(persist)]
fn describe(n: u64, text: String, upstream: u64) -> String {
    format!("{n} {} {upstream}", text.len())
}

#[task(persist)]
fn seven() -> u64 {
    7
}

#[flow]
async fn with_inputs() -> anyhow::Result<String> {
    let up = seven().submit();
    Ok(describe.call(7, "x".repeat(1000), &up).await?)
}

#[task]
fn shout() -> anyhow::Result<u32> {
    tracing::warn!("\x1b[2J\x1b[31mthe screen is gone");
    anyhow::bail!("bad \x1b[1mnews\rover")
}

#[flow(name = "evil\x1b[2Jflow")]
async fn evil() -> anyhow::Result<u32> {
    shout().await
}

#[test]
#[ignore = "the program the tests of this file start"]
fn program() {
    let engine = kiln::Engine::open(home()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    match std::env::var("KILN_TEST_MODE").unwrap().as_str() {
        "long" => {
            let outcome = rt.block_on(engine.scope(long_job()));
            std::fs::write(home().join("outcome"), format!("{outcome:?}")).unwrap();
        }
        "inputs" => {
            rt.block_on(engine.scope(with_inputs())).unwrap();
            // A task called outside any flow.
            assert_eq!(rt.block_on(engine.scope(async { seven().await })).unwrap(), 7);
        }
        "evil" => {
            let _ = rt.block_on(engine.scope(evil()));
        }
        other => panic!("unknown mode {other}"),
    }
}

fn program_in(home: &Path, mode: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "program", "--ignored", "--nocapture"])
        // Every result in the storage, none in the state database.
        .env("KILN_RESULTS_INLINE_MAX", "0")
        .env("KILN_TEST_PROGRAM_HOME", home)
        .env("KILN_TEST_MODE", mode)
        .env_remove("KILN_HOME")
        .env_remove("KILN_API_URL")
        .env_remove("KILN_DATABASE_URL");
    c
}

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("KILN_API_URL")
        .env_remove("KILN_DATABASE_URL")
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_flow_run_in_another_process_is_watched_and_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let mut program = Proc::spawn(program_in(home, "long"));
    eventually(Duration::from_secs(60), "the second step to run", || {
        home.join("hanging").exists()
    });
    let runs = json(&kiln(home, &["runs", "ls", "--json"]));
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(runs[0]["state"], "Running");

    // Watched from another process, output not a terminal: a line per change.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_kiln"));
    watch
        .arg("--home")
        .arg(home)
        .args(["runs", "watch", &id])
        .env_remove("KILN_API_URL");
    let watch = Proc::spawn(watch);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !watch.said("long_job Running: 1/2 task runs done, 1 running, 0 failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the watch shows no progress: {}",
            watch.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let cancel = kiln(home, &["runs", "cancel", &id, "--wait"]);
    assert!(cancel.status.success(), "{}", text(&cancel));
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("Cancelled"));
    let detail = json(&kiln(home, &["runs", "show", &id, "--json"]));
    let states: Vec<&str> = detail["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Pending", "Running", "Cancelling", "Cancelled"]);
    assert_eq!(detail["task_runs"][1]["state"], "Cancelled", "{detail}");
    // The program's flow call returned (its body was dropped) and the process ended.
    eventually(Duration::from_secs(20), "the program to exit", || {
        program.child.try_wait().unwrap().is_some()
    });
    let outcome = std::fs::read_to_string(home.join("outcome")).unwrap();
    assert!(outcome.contains("Err") && outcome.contains("cancel"), "{outcome}");

    let mut watch = watch;
    let status = watch.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "a watched run that did not complete: {}",
        watch.log()
    );
    assert!(watch.said("ended Cancelled"), "{}", watch.log());

    // A finished run: the watch prints its end at once.
    let ended = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(["runs", "watch", &id])
        .output()
        .unwrap();
    assert_eq!(ended.status.code(), Some(1));
    assert!(
        text(&ended).contains("1/2 task runs done, 0 running, 1 failed"),
        "{}",
        text(&ended)
    );

    // Deleting it takes its task runs and logs along.
    let deleted = kiln(home, &["runs", "delete", &id]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(text(&deleted).contains("(2 runs with it)"), "{}", text(&deleted));
    let show = kiln(home, &["runs", "show", &id]);
    assert!(!show.status.success());
    assert!(
        json(&kiln(home, &["runs", "ls", "--json"]))
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn show_prints_input_values_and_where_the_result_is_and_delete_can_take_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let done = program_in(home, "inputs").output().unwrap();
    assert!(done.status.success(), "{}", text(&done));
    let runs = json(&kiln(home, &["runs", "ls", "--json"]));
    let flow = runs[0]["id"].as_str().unwrap().to_owned();
    let detail = json(&kiln(home, &["runs", "show", &flow, "--json"]));
    let tasks = detail["task_runs"].as_array().unwrap();
    let described = tasks.iter().find(|t| t["name"] == "describe").unwrap();
    let shown = text(&kiln(home, &["runs", "show", described["id"].as_str().unwrap()]));
    assert!(shown.contains("n = 7  (u64)"), "{shown}");
    assert!(
        shown.contains(&format!("text = \"{}… (cut)  (alloc::string::String)", "x".repeat(119))),
        "{shown}"
    );
    assert!(shown.contains("upstream = the result of seven ("), "{shown}");
    assert!(shown.contains("in storage 'local' at key describe/"), "{shown}");

    // The task called outside any flow is listed with --tasks, and only there.
    let alone = json(&kiln(home, &["runs", "ls", "--tasks", "--json"]));
    let alone = alone.as_array().unwrap();
    assert_eq!(alone.len(), 1, "{alone:?}");
    assert_eq!(
        (alone[0]["name"].as_str(), alone[0]["flow_run_id"].as_null()),
        (Some("seven"), Some(()))
    );
    let table = text(&kiln(home, &["runs", "ls", "--tasks"]));
    assert!(table.contains("seven") && table.contains("Completed"), "{table}");

    // Deleted with its result records (the keys name their runs).
    let records = |home: &Path| -> usize { walk(&home.join("storage")) };
    let before = records(home);
    assert!(
        before >= 3,
        "the two persisted task results and the one outside: {before}"
    );
    let deleted = kiln(home, &["runs", "delete", &flow, "--results"]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(
        text(&deleted).contains("deleted 2 result records"),
        "{}",
        text(&deleted)
    );
    assert_eq!(
        records(home),
        before - 2,
        "the flow's two records are gone, the other stays"
    );
    let unknown = kiln(home, &["runs", "delete", &flow]);
    assert!(!unknown.status.success());
}

/// Files under `dir`, recursively.
fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map_while(Result::ok)
                .map(|e| {
                    if e.file_type().unwrap().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn control_characters_from_runs_are_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let done = program_in(home, "evil").output().unwrap();
    assert!(done.status.success(), "{}", text(&done));
    let id = json(&kiln(home, &["runs", "ls", "--json"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for args in [
        vec!["runs", "ls"],
        vec!["runs", "show", &id],
        vec!["runs", "logs", &id],
        vec!["runs", "watch", &id],
    ] {
        let out = kiln(home, &args);
        let all = text(&out);
        assert!(
            !all.contains('\x1b') && !all.contains('\r'),
            "`kiln {}` printed a control character: {all:?}",
            args.join(" ")
        );
        assert!(
            all.contains("\\x{1b}["),
            "`kiln {}` shows it escaped: {all}",
            args.join(" ")
        );
    }
    let logs = text(&kiln(home, &["runs", "logs", &id]));
    assert!(logs.contains("\\x{1b}[2J\\x{1b}[31mthe screen is gone"), "{logs}");
    let show = text(&kiln(home, &["runs", "show", &id]));
    assert!(show.contains("bad \\x{1b}[1mnews\\rover"), "{show}");
}

#[test]
fn a_home_that_does_not_exist_is_an_error_not_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let out = kiln(&missing, &["runs", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    let by_env = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runs", "ls"])
        .env("KILN_HOME", &missing)
        .env_remove("KILN_API_URL")
        .output()
        .unwrap();
    assert_eq!(by_env.status.code(), Some(1), "{}", text(&by_env));
    // The default home, before anything ran: nothing to list, and that is fine.
    let fresh = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runs", "ls"])
        .env("HOME", dir.path())
        .env_remove("KILN_HOME")
        .env_remove("KILN_API_URL")
        .output()
        .unwrap();
    assert!(fresh.status.success(), "{}", text(&fresh));
    assert!(text(&fresh).contains("no runs recorded yet"), "{}", text(&fresh));
}
