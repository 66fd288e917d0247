//! The conformance suite through a real Kiln server (over SQLite, and over PostgreSQL when
//! `KILN_TEST_DATABASE_URL` is set), plus what is HTTP's own.

use std::sync::Arc;

use kiln_store::Store;
use kiln_store_http::HttpStore;

/// Starts a server on a free loopback port over `store`, on the current runtime.
async fn serve(store: Arc<dyn Store>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kiln_server::Server::new(store).serve(listener, std::future::pending()));
    format!("http://{addr}")
}

/// A client through a server over a fresh SQLite file.
async fn over_sqlite() -> Option<(HttpStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let db = kiln_store_sqlite::SqliteStore::open(dir.path().join("kiln.db")).unwrap();
    let url = serve(Arc::new(db)).await;
    let store = tokio::task::spawn_blocking(move || HttpStore::open(&url).unwrap())
        .await
        .unwrap();
    Some((store, dir))
}

mod sqlite {
    use super::*;
    kiln_store::store_suite!(over_sqlite());
}

/// A client through a server over a fresh PostgreSQL database.
async fn over_postgres() -> Option<(HttpStore, ())> {
    let url = kiln_store_postgres::testing::fresh_database().await?;
    let db = tokio::task::spawn_blocking(move || kiln_store_postgres::PostgresStore::open(&url).unwrap())
        .await
        .unwrap();
    let server = serve(Arc::new(db)).await;
    let store = tokio::task::spawn_blocking(move || HttpStore::open(&server).unwrap())
        .await
        .unwrap();
    Some((store, ()))
}

mod postgres {
    use super::*;
    kiln_store::store_suite!(over_postgres());
}

#[test]
fn a_wrong_address_fails_fast_naming_it() {
    let started = std::time::Instant::now();
    let err = HttpStore::open("http://127.0.0.1:1").unwrap_err().to_string();
    assert!(
        err.contains("http://127.0.0.1:1") && err.contains("kiln server start"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
}

#[test]
fn malformed_requests_get_problem_details() {
    kiln_store::suite::runtime().block_on(async {
        let (_store, dir) = over_sqlite().await.unwrap();
        let db = kiln_store_sqlite::SqliteStore::open(dir.path().join("other.db")).unwrap();
        let base = serve(Arc::new(db)).await;
        let client = reqwest::Client::new();
        for (path, status, says) in [
            ("/api/v1/flow_runs/not-a-uuid", 404, "is not a run id"),
            (
                "/api/v1/flow_runs/0193f6a0-0000-7000-8000-000000000000",
                404,
                "no flow run with id",
            ),
            ("/api/v1/flow_runs?limit=many", 400, "limit"),
            ("/api/v2/anything", 404, "/api/v1"),
        ] {
            let r = client.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{path}");
            assert_eq!(r.headers()["content-type"], "application/problem+json", "{path}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(body["detail"].as_str().unwrap().contains(says), "{path}: {body}");
        }
        let version: serde_json::Value = client
            .get(format!("{base}/api/version"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(version["version"].is_string(), "{version}");
        let huge = client
            .post(format!("{base}/api/v1/writes"))
            .header("content-type", "application/json")
            .body(vec![b' '; kiln_server::BODY_LIMIT + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(huge.status().as_u16(), 413);
        assert_eq!(huge.headers()["content-type"], "application/problem+json");
        let body: serde_json::Value = huge.json().await.unwrap();
        assert!(body["detail"].as_str().unwrap().contains("BODY_LIMIT"), "{body}");
        let r = client
            .post(format!("{base}/api/v1/writes"))
            .header("content-type", "application/json")
            .body("{\"writes\": [{\"write\": \"explode\"}]}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 422);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["detail"].as_str().unwrap().contains("not a valid batch of writes"),
            "{body}"
        );
    });
}

#[test]
fn tokens_guard_the_api() {
    use kiln_store::model::{ApiToken, Write, now_micros};
    kiln_store::suite::runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(kiln_store_sqlite::SqliteStore::open(dir.path().join("kiln.db")).unwrap());
        let (rw, ro) = (ApiToken::new_secret(), ApiToken::new_secret());
        for (name, secret, read_only) in [("ci", &rw, false), ("viewer", &ro, true)] {
            let token = ApiToken {
                name: name.into(),
                hash: ApiToken::hash_secret(secret),
                read_only,
                created: now_micros(),
                revoked: None,
            };
            db.send(Write::PutToken(token), None).unwrap();
        }
        db.flush().await.unwrap();
        let base = serve(db.clone()).await;
        let client = reqwest::Client::new();

        let health = client.get(format!("{base}/api/health")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200, "health needs no token");
        let anonymous = client.get(format!("{base}/api/v1/flow_runs")).send().await.unwrap();
        assert_eq!(anonymous.status().as_u16(), 401);
        assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
        let wrong = client
            .get(format!("{base}/api/v1/flow_runs"))
            .bearer_auth("kiln_guess")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 401);

        let open = |key: Option<String>| {
            let base = base.clone();
            tokio::task::spawn_blocking(move || HttpStore::open_with_key(&base, key.as_deref()))
        };
        let err = open(None).await.unwrap().unwrap_err().to_string();
        assert!(err.contains("KILN_API_KEY"), "{err}");

        // A read-only token reads, and its writes are refused.
        let viewer = open(Some(ro.clone())).await.unwrap().unwrap();
        assert!(viewer.flow_runs(10).await.unwrap().is_empty());
        let refused = viewer.set_state(kiln_store::suite::change(
            kiln_store::model::RunKind::Task,
            uuid::Uuid::now_v7(),
            kiln_store::state::StateType::Pending,
            kiln_store::state::StateType::Running,
            1,
        ));
        let err = refused.await.unwrap_err().to_string();
        assert!(err.contains("read-only"), "{err}");

        // A read-write token writes, but cannot mint tokens through the API.
        let ci = open(Some(rw.clone())).await.unwrap().unwrap();
        kiln_store::suite::records_a_run_lifecycle(&ci).await;
        let minted = client
            .post(format!("{base}/api/v1/writes"))
            .bearer_auth(&rw)
            .json(&serde_json::json!({ "writes": [{
                "write": "put_token", "name": "mine", "hash": "blake3:00", "read_only": false,
                "created": 0, "revoked": null
            }]}))
            .send()
            .await
            .unwrap();
        assert_eq!(minted.status().as_u16(), 403);

        // Revoked: refused within seconds.
        db.send(
            Write::RevokeToken {
                name: "ci".into(),
                at: now_micros(),
            },
            None,
        )
        .unwrap();
        db.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
        let after = client
            .get(format!("{base}/api/v1/flow_runs"))
            .bearer_auth(&rw)
            .send()
            .await
            .unwrap();
        assert_eq!(after.status().as_u16(), 401);
    });
}
