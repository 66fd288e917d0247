//! Helpers the multi-process tests share (each test file uses some of them).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process, killed (SIGKILL) when dropped, whose output lines are kept.
pub struct Proc {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut command: Command) -> Proc {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Proc { child, lines }
    }

    pub fn said(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// SIGTERM, and waits for it to stop.
    #[allow(dead_code)]
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address `kiln server start` (run as `server`) listens on, from its "listening on"
/// line, once it said it (other lines name URLs too, such as the web UI's).
pub fn listening_address(server: &Proc) -> String {
    eventually(Duration::from_secs(30), "the server to listen", || {
        server.said("listening on http://")
    });
    let log = server.log();
    let line = log.lines().find(|l| l.contains("listening on http://")).unwrap();
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned()
}

/// `kiln --home HOME ARGS` on the database at `database` (`None`: the home's SQLite file).
pub fn kiln_on(home: &std::path::Path, database: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home").arg(home).args(args).env_remove("KILN_API_URL");
    match database {
        Some(url) => c.env("KILN_DATABASE_URL", url),
        None => c.env_remove("KILN_DATABASE_URL"),
    };
    c.output().unwrap()
}

/// Runs a future on a runtime of its own.
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Waits until `check` holds, or fails after `limit` saying `what`.
pub fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The S3-compatible server `scripts/services` started (endpoint, bucket); `None` (the test
/// then passes, saying so) when it is not set, a panic when `KILN_REQUIRE_SERVICES=1`.
pub fn s3() -> Option<(String, String)> {
    let Some(endpoint) = std::env::var("KILN_TEST_S3_ENDPOINT").ok().filter(|e| !e.is_empty()) else {
        assert_ne!(
            std::env::var("KILN_REQUIRE_SERVICES").as_deref(),
            Ok("1"),
            "KILN_TEST_S3_ENDPOINT is not set"
        );
        eprintln!("skipped: KILN_TEST_S3_ENDPOINT is not set (scripts/test starts moto)");
        return None;
    };
    let bucket = std::env::var("KILN_TEST_S3_BUCKET").unwrap_or_else(|_| "kiln-test".into());
    Some((endpoint, bucket))
}
