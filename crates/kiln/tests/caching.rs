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
    let runs = home.store().flow_runs(10).unwrap();
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
    let second = home.store().flow_runs(1).unwrap().pop().unwrap();
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
    let last = home.store().flow_runs(1).unwrap().pop().unwrap();
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
    let first = home.store().flow_runs(1).unwrap().pop().unwrap();
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
    let second = home.store().flow_runs(1).unwrap().pop().unwrap();
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
