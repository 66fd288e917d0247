//! `kiln cache ls/rm/prune` against records that cached task runs wrote.

use std::process::{Command, Output};

use kiln::prelude::*;

#[task(cache = inputs)]
fn kept(x: u32) -> u32 {
    x
}

#[task(cache = inputs, cache_expiration = 0.1)]
fn short_lived(x: u32) -> u32 {
    x
}

#[flow]
async fn fill() -> Result<u32, kiln::Error> {
    Ok(kept(1).await? + kept(2).await? + short_lived(3).await?)
}

fn kiln(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

fn listed(home: &std::path::Path) -> Vec<serde_json::Value> {
    let out = kiln(home, &["cache", "ls", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

#[test]
fn cached_results_are_listed_removed_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(fill())).unwrap(), 6);

    let entries = listed(dir.path());
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(|e| e["key"].as_str().unwrap().starts_with("cache/")));
    let producers: Vec<&str> = entries.iter().map(|e| e["run_name"].as_str().unwrap()).collect();
    assert_eq!(producers.iter().filter(|p| **p == "kept").count(), 2);
    assert_eq!(entries.iter().filter(|e| e["expires"].is_i64()).count(), 1);
    let table = String::from_utf8(kiln(dir.path(), &["cache", "ls"]).stdout).unwrap();
    assert!(
        table.starts_with("KEY") && table.contains("never") && table.contains("kept ("),
        "{table}"
    );

    std::thread::sleep(std::time::Duration::from_millis(200));
    let pruned = kiln(dir.path(), &["cache", "prune", "--expired"]);
    assert!(
        String::from_utf8_lossy(&pruned.stderr).contains("pruned 1 expired"),
        "{pruned:?}"
    );
    assert_eq!(listed(dir.path()).len(), 2);

    let key = listed(dir.path())[0]["key"].as_str().unwrap().to_owned();
    assert!(kiln(dir.path(), &["cache", "rm", &key]).status.success());
    assert_eq!(listed(dir.path()).len(), 1);
    let again = kiln(dir.path(), &["cache", "rm", &key]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no cached result"));
    assert_eq!(
        kiln(dir.path(), &["cache", "rm", "my-results/x"]).status.code(),
        Some(1)
    );
}
