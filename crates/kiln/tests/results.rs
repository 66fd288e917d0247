//! Persisted results: records, references in the state database, reloads and errors.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};

use kiln::StateType::*;
use kiln::prelude::*;
use kiln::result::{ResultError, ResultRef, StorageConfig, StorageKey};

fn reference(run: &kiln::store::model::TaskRun) -> ResultRef {
    serde_json::from_value(run.result.clone().expect("a persisted result")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_result_is_a_verified_record_referenced_by_the_database() {
    #[task(storage = "scratch", storage_key = "numbers/{parameters.n}.bin")]
    fn numbers(n: u32) -> Vec<u32> {
        (0..n).collect()
    }
    #[flow]
    async fn counting() -> Result<usize, kiln::Error> {
        Ok(numbers(5).await?.len())
    }
    let home = support::home();
    home.engine.put_storage("scratch", StorageConfig::Memory).unwrap();
    assert_eq!(home.engine.scope(counting()).await.unwrap(), 5);
    let run = home.task(home.flow("counting").id, "numbers");
    let r = reference(&run);
    assert_eq!(
        (r.storage.as_str(), r.key.as_str(), r.serializer.as_str()),
        ("scratch", "numbers/5.bin", "msgpack")
    );
    let completed = home.store().states(run.id).await.unwrap().pop().unwrap();
    assert_eq!(completed.state, Completed);
    assert!(
        completed.result.unwrap().contains("numbers/5.bin"),
        "the Completed state carries the reference"
    );
    let loaded: Vec<u32> = home.engine.load_result(&r, MsgPack).await.unwrap();
    assert_eq!(loaded, [0, 1, 2, 3, 4]);
    let err = home.engine.load_result::<Vec<u32>>(&r, Json).await.unwrap_err();
    assert!(matches!(err, ResultError::WrongSerializer { .. }), "{err}");
    assert!(err.to_string().contains("written by serializer 'msgpack'"), "{err}");
    assert!(
        err.to_string().contains("but Engine::load_result reads it with 'json'"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_long_for_its_storage_fails_before_the_body_runs() {
    static RAN: AtomicU32 = AtomicU32::new(0);
    #[task(persist, storage_key = "reports/{parameters.title}")]
    fn report(title: String) -> u32 {
        RAN.fetch_add(1, Ordering::SeqCst);
        title.len() as u32
    }
    #[flow]
    async fn reporting(title: String) -> Result<u32, kiln::Error> {
        report(title).await
    }
    let home = support::home();
    let err = home
        .engine
        .scope(reporting("x".repeat(300)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("too long for storage 'local'") && err.contains("a file or folder name of 300 bytes"),
        "{err}"
    );
    assert!(!err.contains("credentials"), "{err}");
    assert_eq!(RAN.load(Ordering::SeqCst), 0, "the body never ran");
    assert_eq!(home.engine.scope(reporting("short".into())).await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_retry_loads_completed_results_instead_of_running_again() {
    static EXPENSIVE: AtomicU32 = AtomicU32::new(0);
    static FLAKY: AtomicU32 = AtomicU32::new(0);
    #[task]
    fn expensive(x: u64) -> u64 {
        EXPENSIVE.fetch_add(1, Ordering::SeqCst);
        x * 10
    }
    #[task]
    fn flaky(x: u64) -> anyhow::Result<u64> {
        anyhow::ensure!(FLAKY.fetch_add(1, Ordering::SeqCst) > 0, "first try fails");
        Ok(x + 1)
    }
    #[flow(retries = 1)]
    async fn resumable() -> anyhow::Result<u64> {
        let a = expensive(1).await?;
        let b = expensive(2).await?;
        flaky(a + b).await
    }
    let home = support::home();
    assert_eq!(home.engine.scope(resumable()).await.unwrap(), 31);
    assert_eq!(EXPENSIVE.load(Ordering::SeqCst), 2, "each expensive call ran once");
    assert_eq!(FLAKY.load(Ordering::SeqCst), 2);
    let flow = home.flow("resumable");
    assert_eq!((flow.state, flow.attempt), (Completed, 2));
    let states: Vec<_> = home.tasks(flow.id).iter().map(|t| (t.name.clone(), t.state)).collect();
    assert_eq!(
        states,
        [
            ("expensive".to_string(), Completed),
            ("expensive".to_string(), Completed),
            ("flaky".to_string(), Failed),
            ("expensive".to_string(), Cached),
            ("expensive".to_string(), Cached),
            ("flaky".to_string(), Completed),
        ]
    );
    let cached = &home.tasks(flow.id)[3];
    assert!(
        cached
            .state_message
            .as_deref()
            .unwrap()
            .contains("instead of running again")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_stays_out_of_the_database() {
    #[task(persist)]
    fn big() -> Vec<u8> {
        (0..50 * 1024 * 1024).map(|i| (i % 251) as u8).collect()
    }
    #[flow]
    async fn heavy() -> Result<usize, kiln::Error> {
        Ok(big().await?.len())
    }
    let home = support::home();
    assert_eq!(home.engine.scope(heavy()).await.unwrap(), 50 * 1024 * 1024);
    let run = home.task(home.flow("heavy").id, "big");
    let r = reference(&run);
    assert!(r.size > 50 * 1024 * 1024, "msgpack of 50 MiB: {}", r.size);
    let db: u64 = ["kiln.db", "kiln.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(home.dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(db < 1024 * 1024, "the database grew to {db} bytes");
    let record = home.dir.path().join("storage/local").join(&r.key);
    assert!(
        std::fs::metadata(record).unwrap().len() > r.size,
        "the record is in the local storage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_persistence_fails_before_the_body_runs() {
    static RAN: AtomicU32 = AtomicU32::new(0);
    #[task(storage = "nowhere")]
    fn unknown_storage() -> u32 {
        RAN.fetch_add(1, Ordering::SeqCst);
        1
    }
    struct Opaque;
    #[task(persist)]
    fn no_serializer() -> Opaque {
        RAN.fetch_add(1, Ordering::SeqCst);
        Opaque
    }
    #[task(persist, storage_key = "x/{parameters.name}")]
    fn escaping(name: String) -> u32 {
        RAN.fetch_add(1, Ordering::SeqCst);
        name.len() as u32
    }
    #[flow]
    async fn misconfigured() -> Result<Vec<String>, kiln::Error> {
        let a = unknown_storage().await.unwrap_err().to_string();
        let b = no_serializer().await.err().unwrap().to_string();
        let c = escaping("../../etc".into()).await.unwrap_err().to_string();
        Ok(vec![a, b, c])
    }
    let home = support::home();
    let errors = home.engine.scope(misconfigured()).await.unwrap();
    assert_eq!(RAN.load(Ordering::SeqCst), 0, "no body ran");
    assert!(
        errors[0].contains("unknown storage 'nowhere'") && errors[0].contains("kiln storage add nowhere"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("no_serializer") && errors[1].contains("Opaque") && errors[1].contains("has no serializer"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("'..'") && errors[2].contains("storage_key template"),
        "{}",
        errors[2]
    );
    let runs = home.tasks(home.flow("misconfigured").id);
    assert!(runs.iter().all(|r| r.state == Failed && r.attempt == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_and_missing_records_are_reported_with_their_key() {
    // Large enough to go to the storage, not inline into the database.
    #[task(persist, storage = "files")]
    fn greeting() -> String {
        "hello".repeat(1000)
    }
    #[flow]
    async fn writing() -> Result<String, kiln::Error> {
        greeting().await
    }
    let home = support::home();
    let folder = home.dir.path().join("files");
    home.engine
        .put_storage(
            "files",
            StorageConfig::Local {
                path: Some(folder.clone()),
            },
        )
        .unwrap();
    home.engine.scope(writing()).await.unwrap();
    let r = reference(&home.task(home.flow("writing").id, "greeting"));
    let path = folder.join(&r.key);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let err = home.engine.load_result::<String>(&r, MsgPack).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "result '{}' in storage 'files': hash mismatch (expected blake3:",
            r.key
        )),
        "{text}"
    );
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = home
        .engine
        .load_result::<String>(&r, MsgPack)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    std::fs::remove_file(&path).unwrap();
    let err = home.engine.load_result::<String>(&r, MsgPack).await.unwrap_err();
    assert!(matches!(err, ResultError::Missing { .. }), "{err}");
    let storage = home.engine.storage("files").unwrap();
    assert!(!storage.exists(&StorageKey::new(r.key.clone()).unwrap()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_turn_persistence_on_and_choose_storage_and_serializer() {
    #[task]
    fn listed() -> Vec<u32> {
        vec![1, 2, 3]
    }
    struct Handle;
    #[task]
    fn opaque() -> std::sync::Arc<Handle> {
        std::sync::Arc::new(Handle)
    }
    #[flow]
    async fn defaults() -> Result<usize, kiln::Error> {
        let a = listed().await?;
        let _ = opaque().await?; // no serializer: the default cannot apply, and that is fine
        let b = listed.with_options(Options::new().persist(false)).call().await?;
        Ok(a.len() + b.len())
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[results]\npersist_by_default = true\ndefault_serializer = \"json\"\ndefault_storage = \"shelf\"\ninline_max = 0\n\n\
         [storage.shelf]\nkind = \"memory\"\n",
    )
    .unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    assert_eq!(engine.scope(defaults()).await.unwrap(), 6);
    let flow = engine.store().flow_runs(1).await.unwrap().pop().unwrap();
    let runs = engine.store().task_runs(flow.id).await.unwrap();
    let r = reference(&runs[0]);
    assert_eq!((r.storage.as_str(), r.serializer.as_str()), ("shelf", "json"));
    assert!(
        runs[1].result.is_none() && runs[1].state == Completed,
        "opaque ran, unpersisted"
    );
    assert!(runs[2].result.is_none(), "persist(false) wins over the default");
    let back: Vec<u32> = engine.load_result(&r, Json).await.unwrap();
    assert_eq!(back, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_records_are_kept_in_memory_only_within_the_budget() {
    #[task(persist)]
    fn payload() -> Vec<u64> {
        (0..1000).collect()
    }
    #[flow]
    async fn producing() -> Result<usize, kiln::Error> {
        Ok(payload().await?.len())
    }
    for (budget, served_from_memory) in [(1024 * 1024, true), (0, false)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kiln.toml"),
            format!("[results]\nmemory_cache_max = {budget}\ninline_max = 0\n"),
        )
        .unwrap();
        let engine = kiln::Engine::open(dir.path()).unwrap();
        engine.scope(producing()).await.unwrap();
        let flow = engine.store().flow_runs(1).await.unwrap().pop().unwrap();
        let r = reference(&engine.store().task_runs(flow.id).await.unwrap()[0]);
        let first: Vec<u64> = engine.load_result(&r, MsgPack).await.unwrap();
        assert_eq!(first.len(), 1000);
        std::fs::remove_file(dir.path().join("storage/local").join(&r.key)).unwrap();
        let second = engine.load_result::<Vec<u64>>(&r, MsgPack).await;
        assert_eq!(second.is_ok(), served_from_memory, "budget {budget}: {second:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_values_live_in_the_database_and_load_back() {
    static ATTEMPT: AtomicU32 = AtomicU32::new(0);
    #[task(persist)]
    fn small(n: u32) -> Vec<u32> {
        (0..n).collect()
    }
    #[task(persist)]
    fn large(n: usize) -> Vec<u8> {
        vec![7; n]
    }
    #[flow(retries = 1)]
    async fn sizes() -> anyhow::Result<usize> {
        let a = small(3).await?;
        let b = large(10_000).await?;
        anyhow::ensure!(ATTEMPT.fetch_add(1, Ordering::SeqCst) > 0, "the first attempt fails");
        Ok(a.len() + b.len())
    }
    let home = support::home();
    assert_eq!(home.engine.scope(sizes()).await.unwrap(), 10_003);
    let flow = home.flow("sizes");
    let runs = home.tasks(flow.id);
    let (small_run, large_run) = (&runs[0], &runs[1]);
    let s = reference(small_run);
    assert_eq!(s.storage, kiln::result::INLINE);
    assert!(s.inline.is_some() && s.key.is_empty(), "{s:?}");
    assert_eq!(
        reference(large_run).storage,
        "local",
        "a value over the limit is a reference"
    );
    let stored = support::files_below(&home.dir.path().join("storage/local"));
    assert_eq!(stored, 1, "only the large record is in the storage");
    // Both load through the same path; the retry reloaded the inline one too.
    let back: Vec<u32> = home.engine.load_result(&s, MsgPack).await.unwrap();
    assert_eq!(back, [0, 1, 2]);
    assert_eq!((runs[2].state, runs[3].state), (Cached, Cached), "{runs:?}");
    // A reference whose inline record was tampered with is refused.
    let mut bad = s.clone();
    bad.hash = format!("blake3:{}", "0".repeat(64));
    let err = home.engine.load_result::<Vec<u32>>(&bad, MsgPack).await.unwrap_err();
    assert!(err.to_string().contains("hash mismatch"), "{err}");
}

/// Panics on the values and bytes it is told to.
struct Fragile;

impl kiln::serializer::Serializer<u64> for Fragile {
    fn name(&self) -> std::borrow::Cow<'static, str> {
        "fragile".into()
    }
    fn encode(&self, value: &u64, out: &mut Vec<u8>) -> Result<(), kiln::serializer::SerializeError> {
        assert!(*value != 13, "thirteen cannot be written");
        out.extend_from_slice(&value.to_le_bytes());
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<u64, kiln::serializer::SerializeError> {
        let value = u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
        assert!(value != 7, "seven cannot be read");
        Ok(value)
    }
}

impl kiln::serializer::Serializer<String> for Fragile {
    fn name(&self) -> std::borrow::Cow<'static, str> {
        "fragile".into()
    }
    fn encode(&self, value: &String, out: &mut Vec<u8>) -> Result<(), kiln::serializer::SerializeError> {
        assert!(value != "boom", "'boom' cannot be written");
        out.extend_from_slice(value.as_bytes());
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<String, kiln::serializer::SerializeError> {
        assert!(bytes != b"bang", "'bang' cannot be read");
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_serializer_fails_its_run_not_the_process() {
    #[task(persist, serializer = Fragile)]
    fn number(n: u64) -> u64 {
        n
    }
    #[task(persist, serializer = Fragile)]
    fn word(w: String) -> String {
        w
    }
    #[flow]
    async fn writes(n: u64, w: String) -> Result<(u64, String), kiln::Error> {
        Ok((number(n).await?, word(w).await?))
    }
    let home = support::home();
    // Small plain values are encoded in place, others on a blocking thread: a panic in
    // either is the run's error, with its message.
    for (n, w, said) in [
        (13, "calm", "thirteen cannot be written"),
        (1, "boom", "'boom' cannot be written"),
    ] {
        let e = home
            .engine
            .scope(writes(n, w.to_owned()))
            .await
            .expect_err("the serializer panicked")
            .to_string();
        assert!(e.contains("panicked") && e.contains(said), "{e}");
    }
    assert_eq!(
        home.engine.scope(writes(7, "bang".into())).await.unwrap(),
        (7, "bang".to_owned())
    );
    let flow = home.store().flow_runs(1).await.unwrap().remove(0);
    let runs = home.store().task_runs(flow.id).await.unwrap();
    let by_name = |name: &str| reference(runs.iter().find(|r| r.name == name).unwrap());
    let number_error = home
        .engine
        .load_result::<u64>(&by_name("number"), Fragile)
        .await
        .expect_err("seven cannot be read")
        .to_string();
    assert!(number_error.contains("seven cannot be read"), "{number_error}");
    let word_error = home
        .engine
        .load_result::<String>(&by_name("word"), Fragile)
        .await
        .expect_err("'bang' cannot be read")
        .to_string();
    assert!(word_error.contains("'bang' cannot be read"), "{word_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_records_and_transaction_commits_are_written_and_load_back() {
    // Durability itself shows only after a power loss; this checks that the flushing path
    // writes, commits and reads back like the other.
    #[task(persist)]
    fn written() -> Vec<u64> {
        (0..10_000).collect()
    }
    #[flow]
    async fn durable() -> Result<usize, kiln::Error> {
        Ok(written().await?.len())
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[results]\nfsync = true\ninline_max = 0\n",
    )
    .unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    assert!(engine.settings().fsync);
    assert_eq!(engine.scope(durable()).await.unwrap(), 10_000);
    let flow = engine.store().flow_runs(1).await.unwrap().pop().unwrap();
    let run = engine.store().task_runs(flow.id).await.unwrap().remove(0);
    let r = reference(&run);
    assert_eq!(r.storage, "local");
    let back: Vec<u64> = engine.load_result(&r, MsgPack).await.unwrap();
    assert_eq!(back.len(), 10_000);
    // A move (a transaction's commit) flushes its destination.
    let storage = engine.storage("local").unwrap();
    let (from, to) = (
        StorageKey::new("staged/x").unwrap(),
        StorageKey::new("final/x").unwrap(),
    );
    storage
        .put_bytes(&from, bytes::Bytes::from_static(b"abc"))
        .await
        .unwrap();
    storage.rename(&from, &to).await.unwrap();
    assert_eq!(storage.get_bytes(&to).await.unwrap(), &b"abc"[..]);
}
