//! A home on a full filesystem: the flow fails loudly (non-zero exit, the database named),
//! never "succeeds" unrecorded; and read commands still work there, and on a read-only home.
//! Needs to mount a small tmpfs (root); elsewhere it says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::prelude::*;

#[task]
async fn trivial(i: u64) -> u64 {
    i + 1
}

#[flow]
async fn big(n: u64) -> Result<u64, kiln::Error> {
    Ok(kiln::join_all(trivial.map(0..n)).await?.into_iter().sum())
}

#[test]
#[ignore = "the program that full_disk starts"]
fn program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(engine.scope(big(60_000))) {
        Ok(sum) => println!("{sum}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn read_only(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn kiln(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_full_disk_fails_the_flow_loudly_and_reads_still_work() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let home: PathBuf = fs.path().join("home");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "program", "--ignored", "--nocapture"])
        .env("KILN_HOME", &home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a flow whose records did not fit must not exit 0: {stderr}"
    );
    assert!(
        stderr.contains("disk is full") && stderr.contains(&home.join("kiln.db").display().to_string()),
        "the error names the cause and the database: {stderr}"
    );
    let sum: u64 = (1..=60_000).sum();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&sum.to_string()),
        "no result was printed"
    );

    // Reading works on the full disk, and once the filesystem is read-only.
    let ls = kiln(&home, &["runs", "ls", "--json"]);
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    fs.read_only();
    let ls = kiln(&home, &["runs", "ls", "--json"]);
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    let runs: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert!(runs.is_array());
}
