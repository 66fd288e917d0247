//! Caching: policies, hits that load instead of running, expiration, refresh, and the
//! sharp edges users of other orchestrators hit.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use image::RgbImage;
use kiln::StateType::*;
use kiln::prelude::*;

fn home_with(toml: &str) -> support::Home {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kiln.toml"), toml).unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    support::Home { dir, engine }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_inputs_run_once_across_flow_runs() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[task(cache = inputs)]
    fn square(x: u64) -> u64 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        x * x
    }
    #[flow]
    async fn squares(x: u64) -> Result<u64, kiln::Error> {
        square(x).await
    }
    let home = support::home();
    for _ in 0..3 {
        assert_eq!(home.engine.scope(squares(7)).await.unwrap(), 49);
    }
    assert_eq!(RUNS.load(Ordering::SeqCst), 1, "computed once, loaded twice");
    assert_eq!(home.engine.scope(squares(8)).await.unwrap(), 64);
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "other inputs, another key");
    let runs = home.store().flow_runs(10).await.unwrap();
    let states: Vec<_> = runs.iter().rev().map(|f| home.tasks(f.id)[0].state).collect();
    assert_eq!(states, [Completed, Cached, Cached, Completed]);
    let hit = &home.tasks(runs[1].id)[0];
    assert!(
        hit.state_message
            .as_deref()
            .unwrap()
            .starts_with("cache hit: loaded 'cache/square/"),
        "{hit:?}"
    );
    assert!(hit.result.is_some(), "the Cached state points at the record it loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_caches_the_image_pipeline() {
    static MADE: AtomicU32 = AtomicU32::new(0);
    static CONSUMED: AtomicU32 = AtomicU32::new(0);
    #[task(serializer = RawPixels)]
    fn make_image() -> RgbImage {
        MADE.fetch_add(1, Ordering::SeqCst);
        RgbImage::from_pixel(64, 64, image::Rgb([255, 0, 255]))
    }
    #[task]
    fn consume_image(img: RgbImage) -> u64 {
        CONSUMED.fetch_add(1, Ordering::SeqCst);
        u64::from(img.width() * img.height())
    }
    #[flow]
    async fn pipeline() -> Result<u64, kiln::Error> {
        consume_image(make_image().await?).await
    }
    let home = home_with("[tasks]\ndefault_cache_policy = \"inputs\"\n");
    assert_eq!(home.engine.scope(pipeline()).await.unwrap(), 4096);
    assert_eq!(home.engine.scope(pipeline()).await.unwrap(), 4096);
    assert_eq!((MADE.load(Ordering::SeqCst), CONSUMED.load(Ordering::SeqCst)), (1, 1));
    let second = home.store().flow_runs(1).await.unwrap().pop().unwrap();
    assert!(home.tasks(second.id).iter().all(|t| t.state == Cached));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_and_refresh_run_again() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[task(cache = inputs, cache_expiration = 0.2)]
    fn fleeting(x: u32) -> u32 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        x
    }
    #[flow]
    async fn twice(refresh: bool) -> Result<u32, kiln::Error> {
        fleeting
            .with_options(Options::new().refresh_cache(refresh))
            .call(1)
            .await
    }
    let home = support::home();
    home.engine.scope(twice(false)).await.unwrap();
    home.engine.scope(twice(false)).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    home.engine.scope(twice(false)).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "an expired record is a miss");
    let last = home.store().flow_runs(1).await.unwrap().pop().unwrap();
    let run = &home.tasks(last.id)[0];
    assert_eq!(run.state, Completed);
    assert!(run.state_message.as_deref().unwrap().contains("had expired"), "{run:?}");
    home.engine.scope(twice(false)).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "the rewritten record is a hit again");
    home.engine.scope(twice(true)).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 3, "refresh runs and rewrites");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_record_is_reported_and_the_task_runs_again() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[task(cache = inputs)]
    fn word(n: u32) -> String {
        RUNS.fetch_add(1, Ordering::SeqCst);
        "x".repeat(n as usize)
    }
    #[flow]
    async fn words() -> Result<String, kiln::Error> {
        word(50).await
    }
    let home = support::home();
    home.engine.scope(words()).await.unwrap();
    let first = home.store().flow_runs(1).await.unwrap().pop().unwrap();
    let key = home.tasks(first.id)[0].result.clone().unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = home.dir.path().join("storage/local").join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(
        home.engine.scope(words()).await.unwrap(),
        "x".repeat(50),
        "never the damaged data"
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    let second = home.store().flow_runs(1).await.unwrap().pop().unwrap();
    let run = &home.tasks(second.id)[0];
    let message = run.state_message.as_deref().unwrap();
    assert!(
        message.contains("cache miss") && message.contains("hash mismatch"),
        "{message}"
    );
    home.engine.scope(words()).await.unwrap();
    assert_eq!(
        RUNS.load(Ordering::SeqCst),
        2,
        "the rewritten record serves the next run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_never_cached() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[task(cache = inputs)]
    fn fragile(x: u32) -> anyhow::Result<u32> {
        let n = RUNS.fetch_add(1, Ordering::SeqCst);
        anyhow::ensure!(n > 0, "first call fails");
        Ok(x)
    }
    #[flow]
    async fn calling() -> anyhow::Result<u32> {
        fragile(5).await
    }
    let home = support::home();
    assert!(home.engine.scope(calling()).await.is_err());
    assert_eq!(
        home.engine.scope(calling()).await.unwrap(),
        5,
        "the failure was not stored as a hit"
    );
    assert_eq!(home.engine.scope(calling()).await.unwrap(), 5);
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
}

struct Client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_cannot_be_hashed_fails_the_policy_unless_left_out() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[task(cache = inputs)]
    fn strict(_client: std::sync::Arc<Client>, x: u32) -> u32 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        x
    }
    #[task(cache = inputs - _client)]
    fn lenient(_client: std::sync::Arc<Client>, x: u32) -> u32 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        x
    }
    #[flow]
    async fn clients() -> Result<(String, u32, u32), kiln::Error> {
        let c = std::sync::Arc::new(Client);
        let err = strict(c.clone(), 1).await.unwrap_err().to_string();
        Ok((err, lenient(c.clone(), 1).await?, lenient(c, 1).await?))
    }
    let home = support::home();
    let (err, a, b) = home.engine.scope(clients()).await.unwrap();
    assert!(
        err.contains("input '_client' cannot be hashed") && err.contains("cache = inputs - _client"),
        "{err}"
    );
    assert_eq!((a, b), (1, 1));
    assert_eq!(
        RUNS.load(Ordering::SeqCst),
        1,
        "strict never ran; lenient ran once and hit once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_source_and_flow_parameter_policies() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    mod v1 {
        #[kiln::task(cache = inputs + task_source)]
        pub fn compute(x: u32) -> u32 {
            x + 1
        }
    }
    mod v2 {
        #[kiln::task(cache = inputs + task_source)]
        pub fn compute(x: u32) -> u32 {
            x + 2
        }
    }
    mod v1_again {
        #[kiln::task(cache = inputs + task_source)]
        pub fn compute(x: u32) -> u32 {
            x + 1
        }
    }
    use kiln::Body;
    assert_ne!(
        <v1::compute as Body>::SOURCE_HASH,
        <v2::compute as Body>::SOURCE_HASH,
        "changed source"
    );
    assert_eq!(
        <v1::compute as Body>::SOURCE_HASH,
        <v1_again::compute as Body>::SOURCE_HASH,
        "same source"
    );

    #[task(cache = flow_parameters)]
    fn per_parameters() -> u32 {
        RUNS.fetch_add(1, Ordering::SeqCst)
    }
    #[flow]
    async fn parametrised(day: u32) -> Result<u32, kiln::Error> {
        let _ = day;
        per_parameters().await
    }
    let home = support::home();
    for day in [1, 1, 2, 2, 1] {
        home.engine.scope(parametrised(day)).await.unwrap();
    }
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "one run per distinct flow parameters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_that_json_would_confuse_get_keys_of_their_own() {
    #[task(cache = inputs)]
    fn scaled(factor: f64) -> String {
        format!("{factor}")
    }
    #[task(cache = inputs)]
    fn nested(value: Option<Option<u32>>) -> String {
        format!("{value:?}")
    }
    #[flow]
    async fn confusing() -> Result<Vec<String>, kiln::Error> {
        let mut out = Vec::new();
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0] {
            out.push(scaled(f).await?);
        }
        for v in [None, Some(None), Some(Some(0))] {
            out.push(nested(v).await?);
        }
        Ok(out)
    }
    let home = support::home();
    let out = home.engine.scope(confusing()).await.unwrap();
    assert_eq!(
        out,
        ["NaN", "inf", "-inf", "0", "-0", "None", "Some(None)", "Some(Some(0))"]
    );
    let flow = home.flow("confusing");
    assert!(
        home.tasks(flow.id).iter().all(|t| t.state == Completed),
        "no call hit another's record"
    );
}

/// The key of a task cached on a set and a map, in a process of its own (printed for the test below).
#[test]
#[ignore = "started by cache_keys_are_the_same_in_every_process"]
fn print_a_cache_key() {
    #[task(cache = inputs)]
    fn count(names: std::collections::HashSet<String>, weights: std::collections::HashMap<String, f64>) -> usize {
        names.len() + weights.len()
    }
    #[flow]
    async fn counting() -> Result<usize, kiln::Error> {
        let names = (0..64).map(|i| format!("name {i}")).collect();
        let weights = (0..64).map(|i| (format!("w{i}"), f64::from(i) / 3.0)).collect();
        count(names, weights).await
    }
    let home = support::home();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(home.engine.scope(counting())).unwrap(), 128);
    let run = home.task(home.flow("counting").id, "count");
    println!("KEY {}", run.result.unwrap()["key"].as_str().unwrap());
}

#[test]
fn cache_keys_are_the_same_in_every_process() {
    let key = || {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "print_a_cache_key", "--ignored", "--nocapture"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let key = stdout.lines().find_map(|l| l.strip_prefix("KEY ")).expect("a key line");
        key.to_owned()
    };
    let keys: std::collections::BTreeSet<String> = (0..4).map(|_| key()).collect();
    assert_eq!(
        keys.len(),
        1,
        "hash sets and maps iterate differently per process: {keys:?}"
    );
}

struct Handle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_policy_skips_tasks_it_cannot_cache() {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[task]
    fn unhashable(_handle: std::sync::Arc<Handle>, x: u32) -> u32 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        x
    }
    #[task]
    fn unpersistable(x: u32) -> std::sync::Arc<Handle> {
        RUNS.fetch_add(x, Ordering::SeqCst);
        std::sync::Arc::new(Handle)
    }
    #[task(cache = inputs)]
    fn explicit(_handle: std::sync::Arc<Handle>) -> u32 {
        0
    }
    #[flow]
    async fn everyday() -> Result<String, kiln::Error> {
        let h = std::sync::Arc::new(Handle);
        unhashable(h.clone(), 1).await?;
        unpersistable(10).await?;
        // An explicit policy keeps its clear error.
        Ok(explicit(h).await.unwrap_err().to_string())
    }
    let home = home_with("[tasks]\ndefault_cache_policy = \"inputs\"\n");
    let err = home.engine.scope(everyday()).await.unwrap();
    assert!(err.contains("input '_handle' cannot be hashed"), "{err}");
    home.engine.scope(everyday()).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 22, "both ran, uncached, in both flow runs");
    let flow = home.flow("everyday");
    let states: Vec<_> = home.tasks(flow.id).iter().map(|t| t.state).collect();
    assert_eq!(states, [Completed, Completed, Failed]);
}
