//! `kiln server start`, a program recording through it (`KILN_API_URL`), and another
//! home's CLI reading through it. The program is this test binary (the ignored `program`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

#[task]
fn slow_step(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(5));
    x + 1
}

/// A chain of `n` steps of 5 ms each: long enough to restart the server under it.
#[flow]
async fn long_remote(n: u64) -> Result<u64, kiln::Error> {
    let mut x = 0;
    for _ in 0..n {
        x = slow_step(x).await?;
    }
    Ok(x)
}

const LONG_STEPS: u64 = 800;

#[test]
#[ignore = "the program that records through a server being restarted"]
fn long_program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(long_remote(LONG_STEPS))).unwrap(), LONG_STEPS);
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
    start_on(home, 0, None)
}

/// `kiln server start` on `port` (0: a free one) over `home`, or over the PostgreSQL
/// database at `database`.
fn start_on(home: &Path, port: u16, database: Option<&str>) -> (Server, String) {
    let mut server = kiln(home);
    if let Some(url) = database {
        server.env("KILN_DATABASE_URL", url);
    }
    let mut child = server
        .args(["server", "start", "--port", &port.to_string()])
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

/// A TCP proxy in front of the server that can lose answers: while `cuts` is above zero,
/// the next answer coming back from the server is swallowed and the connection closed, so
/// the server applied a batch whose client never hears of it (and sends it again).
struct LossyProxy {
    url: String,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LossyProxy {
    fn start(upstream: std::net::SocketAddr) -> LossyProxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let shared = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue; // the server is down: the client sees the connection close
                };
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let cuts = shared.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut from, mut to) = (server, client);
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let cut = cuts
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                            .is_ok();
                        if cut || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                });
            }
        });
        LossyProxy { url, cuts }
    }

    fn lose_answers(&self, n: usize) {
        self.cuts.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The server stops twice under a running flow: killed (SIGKILL), then stopped (SIGTERM:
/// in-flight requests drained), each time back on the same address after a pause; and the
/// network loses answers to batches the server applied. The client buffers and resends; the
/// flow completes and every state is recorded exactly once.
#[test]
fn a_server_restarted_under_a_flow_loses_nothing_and_records_nothing_twice() {
    restarted_under_a_flow(None);
}

/// The same with the server on PostgreSQL.
#[test]
fn a_server_on_postgres_restarted_under_a_flow_loses_nothing() {
    let Some(url) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    restarted_under_a_flow(Some(&url));
}

fn restarted_under_a_flow(database: Option<&str>) {
    let (server_home, client_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut server, _) = start_on(server_home.path(), port, database);
    let proxy = LossyProxy::start(([127, 0, 0, 1], port).into());
    let started = Instant::now();
    let mut program = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "long_program", "--ignored", "--nocapture"])
        .env("KILN_HOME", client_home.path())
        .env("KILN_API_URL", &proxy.url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = program.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let still_running = |program: &mut std::process::Child| {
        assert!(
            program.try_wait().unwrap().is_none(),
            "the flow ended too soon ({:?} in); make it longer",
            started.elapsed()
        );
    };

    std::thread::sleep(Duration::from_millis(400));
    proxy.lose_answers(3);
    for signal in ["KILL", "TERM"] {
        std::thread::sleep(Duration::from_millis(500));
        still_running(&mut program);
        let status = Command::new("kill")
            .args([format!("-{signal}"), server.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = server.0.wait().unwrap();
        assert!(
            signal == "KILL" || exit.success(),
            "a stopped server exits cleanly: {exit:?}"
        );
        std::thread::sleep(Duration::from_millis(700));
        (server, _) = start_on(server_home.path(), port, database);
        proxy.lose_answers(2);
    }
    still_running(&mut program);
    let status = program.wait().unwrap();
    let err = err_reader.join().unwrap();
    assert!(status.success(), "{err}");
    assert_eq!(
        proxy.cuts.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "every planned loss happened"
    );

    // Read what the server's database holds.
    let store = kiln::open_store(server_home.path(), database).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let runs = rt.block_on(store.flow_runs(10)).unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].state, kiln::store::state::StateType::Completed);
    let tasks = rt.block_on(store.task_runs(runs[0].id)).unwrap();
    assert_eq!(tasks.len() as u64, LONG_STEPS);
    use kiln::store::state::StateType::{Completed, Pending, Running};
    for t in &tasks {
        let history: Vec<_> = rt
            .block_on(store.states(t.id))
            .unwrap()
            .iter()
            .map(|s| s.state)
            .collect();
        assert_eq!(history, [Pending, Running, Completed], "task run {}", t.id);
    }
    let flow: Vec<_> = rt
        .block_on(store.states(runs[0].id))
        .unwrap()
        .iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(flow, [Pending, Running, Completed]);
}

/// Every pixel differs, so a wrong byte anywhere shows.
fn picture() -> image::RgbImage {
    image::RgbImage::from_fn(512, 512, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]))
}

#[task(persist, storage = "shared", serializer = Png::default())]
async fn make_picture() -> anyhow::Result<image::RgbImage> {
    Ok(picture())
}

#[flow]
async fn picture_pipeline() -> anyhow::Result<u32> {
    Ok(make_picture().await?.width())
}

#[test]
#[ignore = "the program that records a PNG result through the server"]
fn png_program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(picture_pipeline())).unwrap(), 512);
}

/// A GET over plain HTTP/1.1: the status and the body.
fn http_get(url: &str, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let host = url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let (mut plain, mut rest) = (Vec::new(), &body[..]);
        loop {
            let line = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            plain.extend_from_slice(&rest[line + 2..line + 2 + size]);
            rest = &rest[line + 2 + size + 2..];
        }
        body = plain;
    }
    (status, body)
}

/// The check the server issue names: a program recording through the server (with a token)
/// shows up in GET /api/v1/flow_runs with the token and not without; its PNG result, written
/// to a folder both the program and the server use, downloads through the API bit-exact.
#[test]
fn a_png_result_recorded_through_the_server_downloads_bit_exact() {
    let (server_home, client_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shared = server_home.path().join("shared");
    for home in [server_home.path(), client_home.path()] {
        let added = kiln(home)
            .args(["storage", "add", "shared", "--kind", "local", "--path"])
            .arg(&shared)
            .output()
            .unwrap();
        assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    }
    let created = kiln(server_home.path())
        .args(["server", "token", "create", "ci"])
        .output()
        .unwrap();
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let (_server, url) = start(server_home.path());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "png_program", "--ignored", "--nocapture"])
        .env("KILN_HOME", client_home.path())
        .env("KILN_API_URL", &url)
        .env("KILN_API_KEY", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    for path in ["/api/v1/flow_runs", "/api/openapi.json", "/metrics"] {
        let (status, _) = http_get(&url, path, None);
        assert_eq!(status, 401, "{path} is refused without a token");
    }
    let (status, _) = http_get(&url, "/api/health", None);
    assert_eq!(status, 200, "health needs no token");
    let (status, body) = http_get(&url, "/api/v1/flow_runs", Some(&token));
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["runs"][0]["name"], "picture_pipeline", "{page}");
    let flow = page["runs"][0]["id"].as_str().unwrap();
    let (_, body) = http_get(&url, &format!("/api/v1/flow_runs/{flow}/task_runs"), Some(&token));
    let tasks: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let task = tasks[0]["id"].as_str().unwrap();
    let (status, body) = http_get(&url, &format!("/api/v1/runs/{task}/result"), Some(&token));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let (status, png) = http_get(&url, &format!("/api/v1/runs/{task}/result/content"), Some(&token));
    assert_eq!(status, 200);
    assert_eq!(
        Some(kiln::result::record::content_hash(&png).as_str()),
        info["hash"].as_str()
    );
    assert_eq!(png.len() as u64, info["size"].as_u64().unwrap());
    assert_eq!(image::load_from_memory(&png).unwrap().into_rgb8(), picture());
}

/// The scale-out path: two servers over one PostgreSQL database. A token created once is
/// honoured by both; a flow recorded through one is read through the other.
#[test]
fn two_servers_share_one_postgres_database() {
    let Some(database) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let (home_a, home_b, client, reader) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let created = kiln(home_a.path())
        .env("KILN_DATABASE_URL", &database)
        .args(["server", "token", "create", "shared"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let (_a, url_a) = start_on(home_a.path(), 0, Some(&database));
    let (_b, url_b) = start_on(home_b.path(), 0, Some(&database));
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "program", "--ignored", "--nocapture"])
        .env("KILN_HOME", client.path())
        .env("KILN_API_URL", &url_a)
        .env("KILN_API_KEY", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ls = kiln(reader.path())
        .args(["runs", "ls", "--json"])
        .env("KILN_API_URL", &url_b)
        .env("KILN_API_KEY", &token)
        .output()
        .unwrap();
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    let runs: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(
        (
            runs[0]["name"].as_str(),
            runs[0]["state"].as_str(),
            runs[0]["task_count"].as_u64()
        ),
        (Some("remote"), Some("Completed"), Some(100))
    );
    let (status, _) = http_get(&url_b, "/api/v1/flow_runs", None);
    assert_eq!(status, 401, "server B knows the token exists");
}
