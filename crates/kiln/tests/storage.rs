//! The storage conformance suite: the same behaviour from every backend, each a real one.
//!
//! local and memory always run. S3 runs against the server at `KILN_TEST_S3_ENDPOINT`
//! (bucket `KILN_TEST_S3_BUCKET`) and Azure against `KILN_TEST_AZURE_ENDPOINT` (container
//! `KILN_TEST_AZURE_CONTAINER`); `scripts/test` starts moto and Azurite and sets them. Without
//! them the remote backends say so and pass, unless `KILN_REQUIRE_SERVICES=1` (as in
//! `scripts/test`), where a missing service fails the suite. GCS runs only with
//! `KILN_TEST_GCS_BUCKET` and real credentials: no emulator speaks the API object_store uses.

use std::collections::BTreeSet;

use bytes::Bytes;
use kiln::result::record::{RecordHeader, content_hash};
use kiln::result::{ResultError, ResultStorage, StorageConfig, StorageKey};

/// A storage for one test, isolated from the others (a fresh folder, name or prefix).
struct Backend {
    storage: ResultStorage,
    _dir: Option<tempfile::TempDir>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn missing(what: &str) -> Option<Backend> {
    if env("KILN_REQUIRE_SERVICES").as_deref() == Some("1") {
        panic!("{what} is not set but KILN_REQUIRE_SERVICES=1: start the services with scripts/services");
    }
    eprintln!("skipped: {what} is not set (scripts/test starts the services)");
    None
}

fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn local() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig::Local {
        path: Some(dir.path().join("results")),
    };
    Some(Backend {
        storage: ResultStorage::build("local-test", &config, dir.path()).unwrap(),
        _dir: Some(dir),
    })
}

fn memory() -> Option<Backend> {
    let name = format!("mem-{}", unique());
    Some(Backend {
        storage: ResultStorage::build(&name, &StorageConfig::Memory, "/nonexistent".as_ref()).unwrap(),
        _dir: None,
    })
}

fn s3() -> Option<Backend> {
    let Some(endpoint) = env("KILN_TEST_S3_ENDPOINT") else {
        return missing("KILN_TEST_S3_ENDPOINT");
    };
    let config = StorageConfig::S3 {
        bucket: env("KILN_TEST_S3_BUCKET").unwrap_or_else(|| "kiln-test".into()),
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
        prefix: Some(format!("suite/{}", unique())),
    };
    Some(Backend {
        storage: ResultStorage::build("s3-test", &config, "/nonexistent".as_ref()).unwrap(),
        _dir: None,
    })
}

fn azure() -> Option<Backend> {
    let Some(endpoint) = env("KILN_TEST_AZURE_ENDPOINT") else {
        return missing("KILN_TEST_AZURE_ENDPOINT");
    };
    let config = StorageConfig::Azure {
        container: env("KILN_TEST_AZURE_CONTAINER").unwrap_or_else(|| "kiln-test".into()),
        account: None,
        access_key: None,
        endpoint: Some(endpoint),
        use_emulator: true,
        allow_http: true,
        prefix: Some(format!("suite/{}", unique())),
    };
    Some(Backend {
        storage: ResultStorage::build("azure-test", &config, "/nonexistent".as_ref()).unwrap(),
        _dir: None,
    })
}

fn gcs() -> Option<Backend> {
    // No emulator speaks the XML API object_store uses: real credentials and bucket only.
    let Some(bucket) = env("KILN_TEST_GCS_BUCKET") else {
        eprintln!("skipped: KILN_TEST_GCS_BUCKET is not set (GCS needs a real bucket and credentials)");
        return None;
    };
    let config = StorageConfig::Gcs {
        bucket,
        service_account_path: None,
        prefix: Some(format!("suite/{}", unique())),
    };
    Some(Backend {
        storage: ResultStorage::build("gcs-test", &config, "/nonexistent".as_ref()).unwrap(),
        _dir: None,
    })
}

fn header(payload: &[u8]) -> RecordHeader {
    RecordHeader {
        serializer: "raw".into(),
        value_type: String::new(),
        hash: content_hash(payload),
        length: payload.len() as u64,
        created: 1,
        expires: None,
        run_id: None,
        run_name: "suite".into(),
    }
}

fn key(k: &str) -> StorageKey {
    StorageKey::new(k).unwrap()
}

async fn records_round_trip(s: &ResultStorage) {
    for (name, payload) in [
        ("empty", Vec::new()),
        ("small", b"hello".to_vec()),
        ("binary", (0..=255u8).collect::<Vec<_>>()),
        ("large", (0..6 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect()),
    ] {
        let k = key(&format!("round/{name}"));
        s.put_record(&k, &header(&payload), Bytes::from(payload.clone()), false)
            .await
            .unwrap();
        let (h, back) = s.get_record(&k).await.unwrap();
        assert_eq!((h.length, &back[..]), (payload.len() as u64, &payload[..]), "{name}");
    }
}

async fn overwrite_replaces_the_whole_record(s: &ResultStorage) {
    let k = key("over/write");
    s.put_record(
        &k,
        &header(b"first version, longer"),
        Bytes::from_static(b"first version, longer"),
        false,
    )
    .await
    .unwrap();
    s.put_record(&k, &header(b"second"), Bytes::from_static(b"second"), false)
        .await
        .unwrap();
    assert_eq!(&s.get_record(&k).await.unwrap().1[..], b"second");
}

async fn create_only_never_replaces(s: &ResultStorage) {
    let k = key("create/once");
    s.put_record(&k, &header(b"a"), Bytes::from_static(b"a"), true)
        .await
        .unwrap();
    let err = s
        .put_record(&k, &header(b"b"), Bytes::from_static(b"b"), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ResultError::AlreadyExists { .. }), "{err}");
    assert_eq!(&s.get_record(&k).await.unwrap().1[..], b"a");
}

async fn a_create_race_has_one_winner(s: &ResultStorage) {
    let k = key("race/key");
    let attempts = (0..8u8).map(|i| {
        let (s, k) = (s.clone(), k.clone());
        tokio::spawn(async move {
            let payload = vec![i; 1024];
            s.put_record(&k, &header(&payload), Bytes::from(payload), true).await
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(()) | Err(ResultError::AlreadyExists { .. }))),
        "{outcomes:?}"
    );
    let (_, winner) = s.get_record(&k).await.unwrap();
    assert!(winner.iter().all(|b| *b == winner[0]), "one writer's bytes, not a mix");
}

/// Cache-lock leases are renewed and taken over with a put conditional on the version read
/// (If-Match): a stale version must be refused. (A `local` storage locks with OS file locks.)
async fn a_stale_conditional_update_is_refused(s: &ResultStorage) {
    use object_store::{ObjectStoreExt, PutMode, UpdateVersion};
    if s.kind() == "local" {
        return;
    }
    let store = s.object_store();
    let path = object_store::path::Path::from(format!("{}/lease", unique()));
    let first = store.put(&path, Bytes::from_static(b"one").into()).await.unwrap();
    let seen = UpdateVersion {
        e_tag: first.e_tag,
        version: first.version,
    };
    let second = store
        .put_opts(
            &path,
            Bytes::from_static(b"two").into(),
            PutMode::Update(seen.clone()).into(),
        )
        .await
        .expect("an update at the version read succeeds");
    let stale = store
        .put_opts(&path, Bytes::from_static(b"three").into(), PutMode::Update(seen).into())
        .await;
    assert!(
        matches!(stale, Err(object_store::Error::Precondition { .. })),
        "an update at a stale version must be refused: {stale:?}"
    );
    let now = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&now[..], b"two");
    assert!(second.e_tag.is_some() || second.version.is_some());
    store.delete(&path).await.unwrap();
}

async fn missing_objects_are_named(s: &ResultStorage) {
    let k = key("no/such/record");
    let err = s.get_record(&k).await.unwrap_err();
    assert!(matches!(err, ResultError::Missing { .. }), "{err}");
    assert!(
        err.to_string().contains("'no/such/record'") && err.to_string().contains(s.name()),
        "{err}"
    );
    assert!(!s.exists(&k).await.unwrap());
    s.delete(&k).await.expect("deleting a missing object is not an error");
}

async fn damaged_objects_are_refused(s: &ResultStorage) {
    let k = key("damaged/one");
    let mut bytes = kiln::result::record::encode_prefix(&header(b"payload!")).to_vec();
    bytes.extend_from_slice(b"payloaD!");
    s.put_bytes(&k, Bytes::from(bytes)).await.unwrap();
    let err = s.get_record(&k).await.unwrap_err();
    assert!(err.to_string().contains("hash mismatch"), "{err}");
    let foreign = key("damaged/foreign");
    s.put_bytes(&foreign, Bytes::from_static(b"GIF89a....")).await.unwrap();
    let err = s.get_record(&foreign).await.unwrap_err();
    assert!(err.to_string().contains("not a Kiln result record"), "{err}");
}

async fn listing_and_deleting(s: &ResultStorage) {
    for k in ["list/a/1", "list/a/2", "list/b/ünïcode ☃", "other/x"] {
        s.put_record(&key(k), &header(b"x"), Bytes::from_static(b"x"), false)
            .await
            .unwrap();
    }
    let listed: Vec<String> = s.list(Some("list")).await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(listed, ["list/a/1", "list/a/2", "list/b/ünïcode ☃"]);
    let all: BTreeSet<String> = s.list(None).await.unwrap().into_iter().map(|o| o.key).collect();
    assert!(all.contains("other/x") && all.contains("list/a/1"));
    s.delete(&key("list/a/1")).await.unwrap();
    assert!(!s.exists(&key("list/a/1")).await.unwrap());
    assert!(s.exists(&key("list/a/2")).await.unwrap());
}

macro_rules! storage_suite {
    ($($backend:ident),*) => {$(
        mod $backend {
            storage_suite!(@tests $backend:
                records_round_trip,
                overwrite_replaces_the_whole_record,
                create_only_never_replaces,
                a_create_race_has_one_winner,
                a_stale_conditional_update_is_refused,
                missing_objects_are_named,
                damaged_objects_are_refused,
                listing_and_deleting
            );
        }
    )*};
    (@tests $backend:ident: $($test:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let Some(backend) = super::$backend() else { return };
            super::$test(&backend.storage).await;
        }
    )*};
}

storage_suite!(local, memory, s3, azure, gcs);

#[tokio::test]
async fn an_unreachable_endpoint_fails_fast_with_advice() {
    let config = StorageConfig::S3 {
        bucket: "b".into(),
        endpoint: Some("http://127.0.0.1:1".into()),
        region: None,
        access_key_id: Some("k".into()),
        secret_access_key: Some("s".into()),
        allow_http: true,
        prefix: None,
    };
    let s = ResultStorage::build("dead", &config, "/nonexistent".as_ref()).unwrap();
    let err = s.get_record(&key("x")).await.unwrap_err().to_string();
    assert!(
        err.contains("storage 'dead': cannot read 'x'") && err.contains("kiln storage test dead"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_bucket_is_reported() {
    let Some(endpoint) = env("KILN_TEST_S3_ENDPOINT") else {
        return drop(missing("KILN_TEST_S3_ENDPOINT"));
    };
    let config = StorageConfig::S3 {
        bucket: format!("no-such-bucket-{}", unique()),
        endpoint: Some(endpoint),
        region: None,
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
        prefix: None,
    };
    let s = ResultStorage::build("nobucket", &config, "/nonexistent".as_ref()).unwrap();
    let err = s
        .put_record(&key("x"), &header(b"x"), Bytes::from_static(b"x"), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("storage 'nobucket' cannot be used: writing 'x' failed"),
        "{err}"
    );
    assert!(err.contains("bucket or container does not exist"), "{err}");
}
