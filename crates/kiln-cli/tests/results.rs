//! `kiln result` and `kiln storage` against records that a real flow run wrote.

use std::path::Path;
use std::process::{Command, Output};

use image::RgbImage;
use kiln::prelude::*;
use kiln::result::StorageConfig;

#[task(persist, storage = "my-results", serializer = Png::default())]
async fn make_image() -> anyhow::Result<RgbImage> {
    Ok(RgbImage::from_pixel(512, 512, image::Rgb([255, 0, 255])))
}

#[task(persist, storage = "my-results")]
fn stats(width: u32) -> Vec<u32> {
    vec![width, width * 2]
}

#[flow]
async fn images() -> anyhow::Result<u32> {
    let img = make_image().await?;
    Ok(stats(img.width()).await?[1])
}

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A home with one flow run of `images`; returns the task runs' ids and record keys.
fn populated() -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    engine
        .ensure_storage("my-results", StorageConfig::Local { path: None })
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(images())).unwrap(), 1024);
    let flow = rt.block_on(engine.store().flow_runs(1)).unwrap().pop().unwrap();
    let runs = rt
        .block_on(engine.store().task_runs(flow.id))
        .unwrap()
        .into_iter()
        .map(|t| (t.id.to_string(), t.result.unwrap()["key"].as_str().unwrap().to_owned()))
        .collect();
    (dir, runs)
}

#[test]
fn result_show_verifies_and_get_decodes_the_image() {
    let (home, runs) = populated();
    let (image_run, image_key) = &runs[0];
    let text = ok(kiln(home.path(), &["result", "show", image_run]));
    assert!(
        text.contains("serializer png") && text.contains("verified   yes"),
        "{text}"
    );
    assert!(text.contains(&format!("key        {image_key}")), "{text}");

    let out = home.path().join("out.png");
    ok(kiln(
        home.path(),
        &["result", "get", image_run, "-o", out.to_str().unwrap()],
    ));
    let img = image::open(&out).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), (512, 512));
    assert!(img.pixels().all(|p| p.0 == [255, 0, 255]), "magenta throughout");

    // A small msgpack result lives in the state database: it comes out as JSON all the same.
    let stats_run = &runs[1].0;
    let json = ok(kiln(home.path(), &["result", "get", stats_run, "-o", "-"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        serde_json::json!([512, 1024])
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(kiln(home.path(), &["result", "show", stats_run, "--json"]))).unwrap();
    assert_eq!(
        (
            shown["storage"].as_str(),
            shown["serializer"].as_str(),
            shown["verified"].as_bool()
        ),
        (Some("inline"), Some("msgpack"), Some(true))
    );
    // `storage:key` works as well as a run id.
    let uri = format!("my-results:{image_key}");
    let shown: serde_json::Value =
        serde_json::from_str(&ok(kiln(home.path(), &["result", "show", &uri, "--json"]))).unwrap();
    assert_eq!(
        (shown["serializer"].as_str(), shown["verified"].as_bool()),
        (Some("png"), Some(true))
    );
}

#[test]
fn a_corrupted_record_gives_the_hash_mismatch_error() {
    let (home, runs) = populated();
    let (image_run, image_key) = &runs[0];
    let path = home.path().join("storage/my-results").join(image_key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    for cmd in [["result", "show"], ["result", "get"]] {
        let mut args = vec![cmd[0], cmd[1], image_run.as_str()];
        if cmd[1] == "get" {
            args.extend(["-o", "/dev/null"]);
        }
        let out = kiln(home.path(), &args);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "result '{image_key}' in storage 'my-results': hash mismatch (expected blake3:"
            )),
            "{err}"
        );
        assert!(err.contains("the object was changed after it was written"), "{err}");
    }
    let out = kiln(home.path(), &["result", "show", "my-results:no/such/key"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn storages_are_added_listed_tested_and_removed_without_showing_secrets() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("elsewhere");
    ok(kiln(
        home.path(),
        &[
            "storage",
            "add",
            "archive",
            "--kind",
            "local",
            "--path",
            folder.to_str().unwrap(),
        ],
    ));
    ok(kiln(
        home.path(),
        &[
            "storage",
            "add",
            "lake",
            "--kind",
            "s3",
            "--bucket",
            "pipelines",
            "--access-key-id",
            "AKIDEXAMPLE",
            "--secret-access-key",
            "wJalrXUtnFEMI-SECRET",
            "--endpoint",
            "http://127.0.0.1:1",
        ],
    ));
    let listed = ok(kiln(home.path(), &["storage", "ls"]));
    assert!(
        listed.contains("archive") && listed.contains(folder.to_str().unwrap()),
        "{listed}"
    );
    assert!(listed.contains("s3://pipelines/"), "{listed}");
    let json = ok(kiln(home.path(), &["storage", "ls", "--json"]));
    for text in [&listed, &json] {
        assert!(!text.contains("SECRET"), "a secret was printed: {text}");
    }
    let tested = ok(kiln(home.path(), &["storage", "test", "archive"]));
    assert!(tested.contains("write, read back and delete: ok"), "{tested}");
    // A dead endpoint fails with the storage, the step and the advice.
    let dead = kiln(home.path(), &["storage", "test", "lake"]);
    assert_eq!(dead.status.code(), Some(1));
    let err = String::from_utf8_lossy(&dead.stderr);
    assert!(
        err.contains("storage 'lake': cannot write") && err.contains("kiln storage test lake"),
        "{err}"
    );
    assert!(!err.contains("SECRET"), "{err}");
    let unknown = kiln(home.path(), &["storage", "test", "nope"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown storage 'nope'"));
    ok(kiln(home.path(), &["storage", "rm", "lake"]));
    assert!(!ok(kiln(home.path(), &["storage", "ls"])).contains("lake"));
    assert_eq!(kiln(home.path(), &["storage", "rm", "lake"]).status.code(), Some(1));
}
