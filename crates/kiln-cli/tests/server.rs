//! `kiln server start`, a program recording through it (`KILN_API_URL`), and another
//! home's CLI reading through it. The program is this test binary (the ignored `program`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use kiln::prelude::*;

#[task]
fn double(x: u64) -> u64 {
    x * 2
}

#[flow]
async fn remote(n: u64) -> Result<u64, kiln::Error> {
    let doubled = kiln::join_all(double.map(0..n)).await?;
    Ok(doubled.into_iter().sum())
}

#[test]
#[ignore = "the program that records through the server"]
fn program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(remote(100))).unwrap(), 9900);
}

fn kiln(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home")
        .arg(home)
        .env_remove("KILN_API_URL")
        .env_remove("KILN_DATABASE_URL");
    c
}

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kiln server start` on a free port over `home`; the server and its address.
fn start(home: &Path) -> (Server, String) {
    let mut child = kiln(home)
        .args(["server", "start", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_owned();
    (Server(child), url)
}

#[test]
fn a_flow_recorded_through_the_server_is_read_from_another_home() {
    let (server_home, client_home, reader_home) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (_server, url) = start(server_home.path());

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "program", "--ignored", "--nocapture"])
        .env("KILN_HOME", client_home.path())
        .env("KILN_API_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !client_home.path().join("kiln.db").exists(),
        "the client recorded through the server, not locally"
    );

    let ls = kiln(reader_home.path())
        .args(["runs", "ls", "--json"])
        .env("KILN_API_URL", &url)
        .output()
        .unwrap();
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    let runs: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    assert_eq!(
        (runs[0]["name"].as_str(), runs[0]["state"].as_str()),
        (Some("remote"), Some("Completed"))
    );
    assert_eq!(runs[0]["task_count"], 100);
    // The server's own database has it too.
    let local = kiln(server_home.path())
        .args(["runs", "ls", "--json"])
        .output()
        .unwrap();
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(local[0]["id"], runs[0]["id"]);
}

#[test]
fn listening_beyond_loopback_without_tokens_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args(["server", "start", "--host", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0") && err.contains("127.0.0.1"),
        "{err}"
    );
}

#[test]
fn tokens_are_shown_once_required_then_and_revoked() {
    let (server_home, client_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let created = kiln(server_home.path())
        .args(["server", "token", "create", "ci"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let secret = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("kiln_"), "{secret}");
    assert!(String::from_utf8_lossy(&created.stderr).contains("shown only now"));
    let again = kiln(server_home.path())
        .args(["server", "token", "create", "ci"])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a name is taken once");
    let ls = kiln(server_home.path())
        .args(["server", "token", "ls", "--json"])
        .output()
        .unwrap();
    let listed = String::from_utf8(ls.stdout).unwrap();
    assert!(!listed.contains(&secret[5..]), "the secret is never listed");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        (listed[0]["name"].as_str(), listed[0]["revoked"].is_null()),
        (Some("ci"), true)
    );

    let (_server, url) = start(server_home.path());

    let run = |key: Option<&str>| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "program", "--ignored", "--nocapture"])
            .env("KILN_HOME", client_home.path())
            .env("KILN_API_URL", &url)
            .env_remove("KILN_API_KEY");
        if let Some(key) = key {
            c.env("KILN_API_KEY", key);
        }
        c.output().unwrap()
    };
    let refused = run(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("KILN_API_KEY"));
    assert!(run(Some(&secret)).status.success());

    let revoked = kiln(server_home.path())
        .args(["server", "token", "revoke", "ci"])
        .output()
        .unwrap();
    assert!(revoked.status.success());
    let ls = kiln(server_home.path())
        .args(["server", "token", "ls", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert!(!listed[0]["revoked"].is_null());
}
