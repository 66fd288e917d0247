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
            "--no-test",
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

#[test]
fn storage_add_takes_secrets_out_of_sight_keeps_the_file_s_comments_and_refuses_foot_guns() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("kiln.toml");
    std::fs::write(&file, "# written by hand\n[results]\ninline_max = 64 # bytes\n").unwrap();
    let add = |args: &[&str], stdin: Option<&str>| -> Output {
        use std::io::Write as _;
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--home")
            .arg(home.path())
            .args(["storage", "add"])
            .args(args)
            .env("LAKE_SECRET", "from-the-environment")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    };
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let s3 = [
        "--kind",
        "s3",
        "--bucket",
        "b",
        "--endpoint",
        "http://127.0.0.1:1",
        "--no-test",
    ];

    let by_env = add(
        &[&["lake"][..], &s3, &["--secret-access-key-env", "LAKE_SECRET"]].concat(),
        None,
    );
    assert!(by_env.status.success(), "{}", err(&by_env));
    assert!(!err(&by_env).contains("note:"), "{}", err(&by_env));
    let by_stdin = add(
        &[&["pond"][..], &s3, &["--secret-access-key-stdin"]].concat(),
        Some("typed-in\n"),
    );
    assert!(by_stdin.status.success(), "{}", err(&by_stdin));
    let by_flag = add(
        &[&["sea"][..], &s3, &["--secret-access-key", "on-the-command-line"]].concat(),
        None,
    );
    assert!(by_flag.status.success(), "{}", err(&by_flag));
    assert!(err(&by_flag).contains("shows in `ps`"), "{}", err(&by_flag));
    let missing = add(
        &[&["bog"][..], &s3, &["--secret-access-key-env", "NOT_SET_ANYWHERE"]].concat(),
        None,
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        err(&missing).contains("NOT_SET_ANYWHERE is not set"),
        "{}",
        err(&missing)
    );

    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with("# written by hand\n[results]\ninline_max = 64 # bytes\n"),
        "{text}"
    );
    for secret in ["from-the-environment", "typed-in", "on-the-command-line"] {
        assert!(text.contains(secret), "{text}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "kiln.toml holds secrets: {mode:o}");
    }

    // Foot-guns: refused, and nothing saved.
    let before = std::fs::read_to_string(&file).unwrap();
    let blocker = home.path().join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let unwritable = blocker.join("results");
    for (args, why) in [
        (vec!["local", "--kind", "memory"], "stays a local folder"),
        (
            vec!["scratch", "--kind", "memory", "--bucket", "b"],
            "--bucket does not apply to a storage of kind memory",
        ),
        (
            vec!["box", "--kind", "local", "--region", "eu", "--prefix", "p"],
            "--region, --prefix do not apply to a storage of kind local",
        ),
        (
            vec!["archive", "--kind", "local", "--path", "relative/dir"],
            "must be an absolute path",
        ),
        (
            vec!["archive", "--kind", "local", "--path", unwritable.to_str().unwrap()],
            "was not saved",
        ),
        (
            vec![
                "dead",
                "--kind",
                "s3",
                "--bucket",
                "b",
                "--endpoint",
                "http://127.0.0.1:1",
            ],
            "was not saved",
        ),
    ] {
        let out = add(&args, None);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", err(&out));
        assert!(err(&out).contains(why), "{args:?}: {}", err(&out));
        assert!(
            !err(&out).contains("kiln storage test"),
            "no advice to test a storage that was not saved: {}",
            err(&out)
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before, "nothing saved");
    // A folder it can write is tried and saved.
    let folder = home.path().join("archive");
    ok(add(
        &["archive", "--kind", "local", "--path", folder.to_str().unwrap()],
        None,
    ));
    assert!(std::fs::read_to_string(&file).unwrap().contains("[storage.archive]"));
}
