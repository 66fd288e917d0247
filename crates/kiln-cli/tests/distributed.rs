//! The seed pipeline across machines (`crates/kiln/examples/distributed_pipeline.rs`): two
//! worker processes of the example, pools `cpu` and `gpu`, results in the S3-compatible
//! server, everything recorded through `kiln server` on PostgreSQL, the flow started with
//! `kiln deployment run`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, eventually};

/// The example's binary, which `cargo test` (and nextest) build with the workspace.
fn example() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/distributed_pipeline");
    assert!(
        path.exists(),
        "{} is missing: build the examples with the workspace (cargo build --workspace --examples)",
        path.display()
    );
    path
}

fn kiln(home: &Path, api: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home")
        .arg(home)
        .env("KILN_API_URL", api)
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_API_KEY");
    c
}

#[test]
fn the_seed_pipeline_runs_across_two_workers_with_s3_and_postgresql() {
    let Some(database) = kiln_store_postgres::testing::fresh_database_blocking() else {
        return;
    };
    let Some((endpoint, bucket)) = common::s3() else { return };
    let (server_home, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // The server, on PostgreSQL.
    let mut server = Command::new(env!("CARGO_BIN_EXE_kiln"));
    server
        .arg("--home")
        .arg(server_home.path())
        .args(["server", "start", "--port", "0"])
        .env("KILN_DATABASE_URL", &database)
        .env_remove("KILN_API_URL");
    let server = Proc::spawn(server);
    let api = common::listening_address(&server);

    // The storage both workers reach.
    let prefix = format!("distributed/{}", uuid::Uuid::now_v7().simple());
    std::fs::write(
        home.path().join("kiln.toml"),
        format!(
            "[storage.shared]\nkind = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\naccess_key_id = \"test\"\n\
             secret_access_key = \"test\"\nallow_http = true\nprefix = \"{prefix}\"\n"
        ),
    )
    .unwrap();

    let worker = |pool: &str| {
        let mut c = Command::new(example());
        c.arg(pool)
            .env("KILN_HOME", home.path())
            .env("KILN_API_URL", &api)
            .env("KILN_HEARTBEAT_SECONDS", "1")
            .env_remove("KILN_DATABASE_URL")
            .env_remove("KILN_API_KEY");
        Proc::spawn(c)
    };
    let (cpu, gpu) = (worker("cpu"), worker("gpu"));
    eventually(Duration::from_secs(60), "both workers to serve", || {
        cpu.said("worker ") && gpu.said("worker ")
    });

    let out = kiln(home.path(), &api)
        .args(["deployment", "run", "images", "--wait", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\ncpu:\n{}\ngpu:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cpu.log(),
        gpu.log()
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["state"], "Completed");
    let flow_id = run["id"].as_str().unwrap().to_owned();

    let show = kiln(home.path(), &api)
        .args(["runs", "show", &flow_id, "--json"])
        .output()
        .unwrap();
    assert!(show.status.success(), "{}", String::from_utf8_lossy(&show.stderr));
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let tasks = detail["task_runs"].as_array().expect("task runs").clone();
    let task = |name: &str| {
        tasks
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no task run {name} in {detail:#}"))
            .clone()
    };
    let (make, consume) = (task("make_image"), task("consume_image"));
    for t in [&make, &consume] {
        assert_eq!(t["state"], "Completed", "{t:#}");
        assert_eq!(t["result"]["storage"], "shared");
        assert_eq!(t["result"]["serializer"], "png");
    }
    // Each ran on the worker of its pool, not in the flow's process.
    let (make_id, consume_id) = (make["id"].as_str().unwrap(), consume["id"].as_str().unwrap());
    assert!(cpu.said(&format!("claimed task run {make_id}")), "{}", cpu.log());
    assert!(gpu.said(&format!("claimed task run {consume_id}")), "{}", gpu.log());
    assert!(cpu.said(&format!("claimed flow run {flow_id}")));

    // The image that crossed: green, 512x512, read back from S3.
    let png = home.path().join("out.png");
    let got = kiln(home.path(), &api)
        .args(["result", "get", consume_id, "-o"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (512, 512));
    assert_eq!(img.get_pixel(100, 100).0, [0, 255, 0]);
}
