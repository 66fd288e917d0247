//! Storages through the API: secrets write-only, folders confined, the settings file private.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

struct Fixture {
    home: tempfile::TempDir,
    app: axum::Router,
}

impl Fixture {
    fn new() -> Fixture {
        let home = tempfile::tempdir().unwrap();
        let store = kiln::open_store(home.path(), None).unwrap();
        let settings = kiln::settings::Settings::load_file(home.path(), &home.path().join("kiln.toml")).unwrap();
        let app = kiln_server::Server::new(store).with_results(settings).router();
        Fixture { home, app }
    }

    async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (StatusCode, String) {
        let mut request = Request::builder().method(method).uri(path);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
        let response = self.app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn file(&self) -> String {
        std::fs::read_to_string(self.home.path().join("kiln.toml")).unwrap_or_default()
    }
}

/// The S3-compatible test server (moto), or `None` when it is not running.
fn moto() -> Option<(String, String)> {
    let Ok(endpoint) = std::env::var("KILN_TEST_S3_ENDPOINT") else {
        assert_ne!(
            std::env::var("KILN_REQUIRE_SERVICES").as_deref(),
            Ok("1"),
            "start scripts/services"
        );
        eprintln!("skipped: KILN_TEST_S3_ENDPOINT is not set (scripts/test starts moto)");
        return None;
    };
    Some((endpoint, std::env::var("KILN_TEST_S3_BUCKET").unwrap()))
}

#[tokio::test]
async fn secrets_are_write_only_and_kept_in_a_private_file() {
    let Some((endpoint, bucket)) = moto() else { return };
    let f = Fixture::new();
    let s3 = |extra: serde_json::Value| {
        let mut config = serde_json::json!({
            "kind": "s3", "bucket": bucket, "endpoint": endpoint, "allow_http": true, "access_key_id": "AKIDEXAMPLE"
        });
        config
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        config
    };
    let (status, body) = f
        .call(
            "PUT",
            "/api/v1/storages/shared",
            Some(s3(serde_json::json!({"secret_access_key": "very-secret-value"}))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !body.contains("very-secret-value") && body.contains("********"),
        "{body}"
    );
    for path in ["/api/v1/storages", "/api/v1/storages/shared"] {
        let (status, body) = f.call("GET", path, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.contains("very-secret-value"), "{path}: {body}");
        assert!(
            body.contains("AKIDEXAMPLE") && body.contains("********"),
            "{path}: {body}"
        );
    }
    assert!(f.file().contains("very-secret-value"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f.home.path().join("kiln.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only the server's user reads the file");
    }
    // An update without the secret keeps it (a PUT gives every other field again).
    let (status, body) = f
        .call(
            "PUT",
            "/api/v1/storages/shared",
            Some(s3(serde_json::json!({"region": "eu-west-1"}))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(f.file().contains("very-secret-value") && f.file().contains("eu-west-1"));
    // An empty secret removes it; here the storage cannot work without one, so the change
    // is refused (tested before saving) and the file keeps what worked.
    let (status, body) = f
        .call(
            "PUT",
            "/api/v1/storages/shared",
            Some(s3(serde_json::json!({"secret_access_key": ""}))),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body.contains("SecretAccessKey") && !body.contains("very-secret-value"),
        "{body}"
    );
    assert!(f.file().contains("very-secret-value"));
    // A storage that cannot be reached is not saved.
    let nowhere = serde_json::json!({ "kind": "s3", "bucket": "b", "endpoint": "http://127.0.0.1:9", "allow_http": true,
        "access_key_id": "a", "secret_access_key": "b" });
    let (status, body) = f.call("PUT", "/api/v1/storages/nowhere", Some(nowhere)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(!f.file().contains("nowhere"));

    let (status, _) = f.call("DELETE", "/api/v1/storages/shared", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = f.call("DELETE", "/api/v1/storages/shared", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn local_folders_stay_inside_the_servers_roots() {
    let f = Fixture::new();
    let inside = f.home.path().join("pictures");
    let ok = serde_json::json!({ "kind": "local", "path": inside });
    let (status, body) = f.call("PUT", "/api/v1/storages/pictures", Some(ok)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = f.call("POST", "/api/v1/storages/pictures/test", None).await;
    assert_eq!(status, StatusCode::OK);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ok"], true, "{report}");

    let cases = [
        (
            serde_json::json!({ "kind": "local", "path": "/etc/kiln" }),
            StatusCode::FORBIDDEN,
            "outside the folders",
        ),
        (
            serde_json::json!({ "kind": "local", "path": "relative/dir" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "absolute",
        ),
        (
            serde_json::json!({ "kind": "local", "path": inside.join("../../escape") }),
            StatusCode::FORBIDDEN,
            "may not climb",
        ),
        (
            serde_json::json!({ "kind": "memory" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "storage configuration",
        ),
        (
            serde_json::json!({ "kind": "local", "paht": "/x" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
    ];
    for (body, status, words) in cases {
        let (got, answer) = f.call("PUT", "/api/v1/storages/elsewhere", Some(body.clone())).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer.contains(words), "{body}: {answer}");
    }
    let s3 = serde_json::json!({ "kind": "s3", "bucket": "b" });
    let (status, body) = f.call("PUT", "/api/v1/storages/local", Some(s3)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = f.call("DELETE", "/api/v1/storages/local", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = f
        .call(
            "PUT",
            "/api/v1/storages/bad%20name",
            Some(serde_json::json!({"kind": "local"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn a_storage_test_reports_what_failed() {
    let Some((endpoint, bucket)) = moto() else { return };
    let f = Fixture::new();
    let config = |bucket: &str| {
        serde_json::json!({
            "kind": "s3", "bucket": bucket, "endpoint": endpoint, "allow_http": true,
            "access_key_id": "test", "secret_access_key": "test"
        })
    };
    let (status, body) = f.call("PUT", "/api/v1/storages/moto", Some(config(&bucket))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = f.call("POST", "/api/v1/storages/moto/test", None).await;
    assert_eq!(status, StatusCode::OK);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    // A bucket that does not exist: not saved, and the answer says which.
    let (status, body) = f
        .call("PUT", "/api/v1/storages/missing", Some(config("no-such-bucket-kiln")))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body.contains("no-such-bucket-kiln") && !body.contains("\"test\""),
        "{body}"
    );
    // A storage that stops working later (its bucket set by hand in kiln.toml): the test says so.
    let toml = f
        .file()
        .replace(&format!("bucket = \"{bucket}\""), "bucket = \"no-such-bucket-kiln\"");
    std::fs::write(f.home.path().join("kiln.toml"), toml).unwrap();
    let (status, body) = f.call("POST", "/api/v1/storages/moto/test", None).await;
    assert_eq!(status, StatusCode::OK);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("no-such-bucket-kiln"),
        "{report}"
    );
}

use kiln::prelude::*;

#[task(cache = inputs)]
fn kept(x: u32) -> u32 {
    x
}

#[task(cache = inputs, cache_expiration = 0.1)]
fn short_lived(x: u32) -> u32 {
    x
}

#[flow]
async fn fill() -> Result<u32, kiln::Error> {
    Ok(kept(1).await? + kept(2).await? + short_lived(3).await?)
}

#[test]
fn cached_results_are_listed_deleted_and_pruned() {
    let f = Fixture::new();
    let engine = kiln::Engine::open(f.home.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(fill())).unwrap(), 6);
    rt.block_on(async {
        let listing = async |f: &Fixture| {
            let (status, body) = f.call("GET", "/api/v1/storages/local/cache", None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        };
        let all = listing(&f).await;
        let entries = all["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 3, "{all}");
        assert!(
            entries
                .iter()
                .all(|e| e["key"].as_str().unwrap().starts_with("cache/") && e["run_id"].is_string())
        );
        let kept_key = entries
            .iter()
            .find(|e| e["run_name"].as_str().unwrap().starts_with("kept") && e["expires"].is_null())
            .unwrap()["key"]
            .as_str()
            .unwrap()
            .to_owned();

        for (key, status) in [
            ("../../kiln.db", StatusCode::BAD_REQUEST),
            ("runs/elsewhere", StatusCode::BAD_REQUEST),
            ("cache/../../kiln.toml", StatusCode::NOT_FOUND),
            ("cache/none/such", StatusCode::NOT_FOUND),
            (kept_key.as_str(), StatusCode::NO_CONTENT),
            (kept_key.as_str(), StatusCode::NOT_FOUND),
        ] {
            let path = format!("/api/v1/storages/local/cache?key={}", key.replace('/', "%2F"));
            let (got, body) = f.call("DELETE", &path, None).await;
            assert_eq!(got, status, "{key}: {body}");
        }
        assert!(f.home.path().join("kiln.db").exists());
        assert_eq!(listing(&f).await["entries"].as_array().unwrap().len(), 2);

        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let (status, body) = f.call("POST", "/api/v1/storages/local/cache/prune", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["pruned"], 1);
        assert_eq!(listing(&f).await["entries"].as_array().unwrap().len(), 1);
        let (status, _) = f.call("GET", "/api/v1/storages/nowhere/cache", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    });
}
