//! The web UI in a real browser: Debian's Chromium driven by playwright-core
//! (`tests/browser/ui.mjs`, installed by `scripts/browser`), against `kiln server start` over
//! a home where the image pipeline ran, a worker serves a deployment, and a flow runs on.
//!
//! The browser logs in with a token, clicks from the runs list to the pipeline's flow run
//! (a graph of two nodes and one edge, logs) to `make_image` (its picture, 512 pixels
//! wide), sees a flow started after the page opened appear and complete without a reload,
//! cancels a running flow run, retries a failed deployment run, runs a deployment from its
//! parameters form, deletes a cached result, sees a damaged record reported in red and no
//! buttons with a read-only token, and runs axe-core on every page. Screenshots of every
//! page go to the folder it prints.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Proc, block, eventually, kiln_on};
use kiln::StateType::*;
use kiln::prelude::*;
use kiln::result::StorageConfig;
use kiln::store::Store;
use kiln::store::model::FlowRun;

/// A 512x512 magenta image (as in examples/image_pipeline.rs).
#[task(persist, storage = "my-results", serializer = Png::default())]
async fn make_image() -> anyhow::Result<image::RgbImage> {
    tracing::info!("drawing a 512x512 image");
    Ok(image::RgbImage::from_pixel(512, 512, image::Rgb([255, 0, 255])))
}

#[task(persist, storage = "my-results", serializer = Png::default())]
async fn consume_image(mut img: image::RgbImage) -> anyhow::Result<image::RgbImage> {
    image::imageops::invert(&mut img);
    Ok(img)
}

#[flow]
async fn pipeline() -> anyhow::Result<u64> {
    let out = consume_image.submit(make_image.submit()).await?;
    Ok(u64::from(out.width()) * u64::from(out.height()))
}

#[test]
#[ignore = "the image pipeline, run by the browser test"]
fn pipeline_program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    engine
        .ensure_storage("my-results", StorageConfig::Local { path: None })
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(pipeline())).unwrap(), 512 * 512);
}

/// Fails its first attempt: the timeline shows both.
#[task(retries = 1, retry_delay = 0.01)]
async fn wobbly() -> anyhow::Result<u64> {
    static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    tokio::time::sleep(Duration::from_millis(20)).await;
    if !FAILED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("the first attempt fails on purpose");
    }
    Ok(7)
}

#[flow]
async fn inner() -> Result<u64, kiln::Error> {
    nap(5).await
}

/// A subflow and a retried task.
#[flow]
async fn outer() -> anyhow::Result<u64> {
    Ok(inner().await? + wobbly().await?)
}

#[test]
#[ignore = "a flow with a subflow and a retried task, run by the browser test"]
fn nested_program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(outer())).unwrap(), 12);
}

#[task]
async fn nap(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Runs until cancelled.
#[flow]
async fn slow() -> Result<(), kiln::Error> {
    loop {
        nap(100).await?;
    }
}

#[test]
#[ignore = "a flow that runs until the browser cancels it"]
fn slow_program() {
    let engine = kiln::Engine::open(std::env::var("KILN_HOME").unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _ = rt.block_on(engine.scope(slow()));
}

/// Fails the first time it runs (it leaves a marker), succeeds after.
#[flow]
async fn flaky() -> anyhow::Result<u64> {
    let marker = PathBuf::from(std::env::var("KILN_UI_MARKER").expect("KILN_UI_MARKER"));
    nap(10).await?;
    if !marker.exists() {
        std::fs::write(&marker, b"failed once")?;
        anyhow::bail!("the first run fails on purpose");
    }
    Ok(1)
}

/// Its result is cached (the storages page lists it, and deletes it).
#[task(cache = inputs)]
fn shout(name: String) -> String {
    name.to_uppercase()
}

/// Run from the deployment page's form.
#[flow]
async fn greet(name: String, times: u32) -> anyhow::Result<String> {
    let loud = shout(name).await?;
    Ok(vec![loud; times as usize].join(" "))
}

#[test]
#[ignore = "a worker serving the deployments the browser runs and retries"]
fn worker() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        kiln::serve()
            .deployment(flaky.deploy("flaky").pool("ui"))
            .deployment(
                greet
                    .deploy("greet")
                    .pool("ui")
                    .cron("0 3 * * *")
                    .parameters(serde_json::json!({ "times": 2 })),
            )
            .run()
            .await
            .unwrap();
    });
}

fn program(home: &Path, name: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", name, "--ignored", "--nocapture"])
        .env("KILN_HOME", home)
        .env("KILN_UI_MARKER", home.join("flaky-marker"))
        .env_remove("KILN_API_URL")
        .env_remove("KILN_DATABASE_URL");
    c
}

/// The folder with the browser test's script and its npm packages, or `None` (the test
/// then passes, saying so) when they or Chromium are not installed; a panic when
/// `KILN_REQUIRE_SERVICES=1` (scripts/test installs them).
fn browser_tools() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("KILN_UI_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing = if !dir.join("node_modules/playwright-core").exists() {
        Some("playwright-core is not installed (scripts/browser installs it)")
    } else if !Path::new(&chromium).exists() {
        Some("Chromium is not installed (scripts/browser installs Debian's)")
    } else {
        None
    };
    match missing {
        None => Some(dir),
        Some(why) => {
            assert_ne!(std::env::var("KILN_REQUIRE_SERVICES").as_deref(), Ok("1"), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

fn newest(store: &dyn Store, name: &str) -> Option<FlowRun> {
    block(store.flow_runs(100))
        .unwrap()
        .into_iter()
        .filter(|r| r.name == name)
        .max_by_key(|r| r.created)
}

/// Flips a byte near the end of the record whose file name holds `id`, below `folder`.
fn damage_record(folder: &Path, id: &str) {
    let mut stack = vec![folder.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().contains(id) {
                let mut bytes = std::fs::read(&path).unwrap();
                let at = bytes.len() - 20;
                bytes[at] ^= 0xff;
                std::fs::write(&path, bytes).unwrap();
                return;
            }
        }
    }
    panic!("no record of {id} below {}", folder.display());
}

fn token(home: &Path, name: &str, read_only: bool) -> String {
    let mut args = vec!["server", "token", "create", name];
    if read_only {
        args.push("--read-only");
    }
    let out = kiln_on(home, None, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_web_ui_in_a_browser() {
    let Some(browser) = browser_tools() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let store: Arc<dyn Store> = kiln::open_store(home, None).unwrap();

    let out = program(home, "pipeline_program").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pipeline_run = newest(&*store, "pipeline").expect("the pipeline's flow run");
    // A second one whose consume_image record is then damaged on disk (same length).
    let out = program(home, "pipeline_program").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let damaged = block(store.task_runs(newest(&*store, "pipeline").unwrap().id))
        .unwrap()
        .into_iter()
        .find(|t| t.name == "consume_image")
        .unwrap();
    damage_record(&home.join("storage/my-results"), &damaged.id.to_string());

    let out = program(home, "nested_program").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nested = newest(&*store, "outer").expect("the nested flow run");

    // A deployment run that fails, on a worker that stays to run its retry.
    let worker = Proc::spawn(program(home, "worker"));
    eventually(Duration::from_secs(60), "the worker to serve", || {
        worker.said("serving")
    });
    let failed = block(kiln::deployment::run_deployment(&*store, "flaky", Default::default())).unwrap();
    eventually(Duration::from_secs(60), "the deployment run to fail", || {
        block(store.flow_run(failed))
            .unwrap()
            .is_some_and(|r| r.state == Failed)
    });

    // A flow run that runs until cancelled.
    let slow_program = Proc::spawn(program(home, "slow_program"));
    eventually(Duration::from_secs(60), "the slow flow run to start", || {
        newest(&*store, "slow").is_some_and(|r| r.state == Running)
    });
    let slow_run = newest(&*store, "slow").unwrap();

    let (admin, reader) = (token(home, "admin", false), token(home, "reader", true));
    let mut server = Command::new(env!("CARGO_BIN_EXE_kiln"));
    server
        .arg("--home")
        .arg(home)
        .args(["server", "start", "--port", "0"])
        .env_remove("KILN_API_URL")
        .env_remove("KILN_DATABASE_URL");
    let server = Proc::spawn(server);
    let url = common::listening_address(&server);

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let mut node = Command::new("node")
        .arg("ui.mjs")
        .current_dir(&browser)
        .env("KILN_UI_URL", &url)
        .env("KILN_UI_TOKEN", &admin)
        .env("KILN_UI_READ_TOKEN", &reader)
        .env("KILN_UI_PIPELINE", pipeline_run.id.to_string())
        .env("KILN_UI_SLOW", slow_run.id.to_string())
        .env("KILN_UI_FAILED", failed.to_string())
        .env("KILN_UI_DAMAGED", damaged.id.to_string())
        .env("KILN_UI_NESTED", nested.id.to_string())
        .env("KILN_UI_SHOTS", &shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (Node.js) runs the browser test");
    let mut said = Vec::new();
    let mut live_runs = Vec::new();
    for line in BufReader::new(node.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        eprintln!("browser: {line}");
        if line == "start-live-flow" {
            live_runs.push(program(home, "pipeline_program").spawn().unwrap());
        }
        said.push(line);
    }
    let status = node.wait().unwrap();
    for mut p in live_runs {
        let _ = p.wait();
    }
    eprintln!("screenshots of every page: {}", shots.display());
    assert!(
        status.success(),
        "the browser test failed:\n{}\nserver:\n{}\nworker:\n{}",
        said.join("\n"),
        server.log(),
        worker.log()
    );
    assert!(said.iter().any(|l| l == "all checks passed"));
    drop(slow_program);
}
