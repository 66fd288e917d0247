//! The conformance suite on PostgreSQL, plus what is PostgreSQL's own. Each test gets a
//! database of its own in the server at `KILN_TEST_DATABASE_URL` (`scripts/test` starts one;
//! without it these tests say so and pass, unless `KILN_REQUIRE_SERVICES=1`).

use kiln_store::Store;
use kiln_store::StoreError;
use kiln_store::model::*;
use kiln_store_postgres::PostgresStore;
use kiln_store_postgres::testing::{execute as sql, fresh_database};

async fn postgres() -> Option<(PostgresStore, ())> {
    let url = fresh_database().await?;
    Some((PostgresStore::open(&url).unwrap(), ()))
}

kiln_store::store_suite!(postgres());

#[test]
fn a_database_from_a_newer_kiln_is_refused() {
    kiln_store::suite::runtime().block_on(async {
        let Some(url) = fresh_database().await else { return };
        drop(PostgresStore::open(&url).unwrap());
        sql(&url, "UPDATE kiln_schema SET version = 99").await;
        let err = PostgresStore::open(&url).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    });
}

#[test]
fn an_unreachable_database_fails_fast_and_names_it() {
    let started = std::time::Instant::now();
    // Nothing listens on port 1; the password must not appear in the message.
    let err = PostgresStore::open("postgres://kiln:s3cret@127.0.0.1:1/kiln").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("postgres://kiln:***@127.0.0.1:1/kiln") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(text.contains("check that PostgreSQL runs"), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn two_stores_on_one_database_see_each_other() {
    kiln_store::suite::runtime().block_on(async {
        let Some(url) = fresh_database().await else { return };
        let (a, b) = (PostgresStore::open(&url).unwrap(), PostgresStore::open(&url).unwrap());
        let t = kiln_store::suite::task("shared", None);
        let id = t.id;
        a.send(Write::TaskRun(t), None).unwrap();
        a.flush().await.unwrap();
        // B moves the run; A, believing it still Pending, is refused.
        let start = kiln_store::suite::change(
            RunKind::Task,
            id,
            kiln_store::state::StateType::Pending,
            kiln_store::state::StateType::Running,
            1,
        );
        assert!(matches!(
            b.set_state(start.clone()).await.unwrap(),
            kiln_store::Transition::Accepted { seq: 1 }
        ));
        // A's own change: another id (the same change delivered again would be acknowledged).
        let late = kiln_store::model::StateChange {
            id: kiln_store::model::write_id(),
            ..start
        };
        assert_eq!(
            a.set_state(late).await.unwrap(),
            kiln_store::Transition::Rejected {
                current: Some(kiln_store::state::StateType::Running)
            }
        );
        assert_eq!(a.states(id).await.unwrap().len(), 2);
    });
}

#[test]
fn api_tokens_are_kept_as_hashes() {
    kiln_store::suite::runtime().block_on(async {
        let Some((store, ())) = postgres().await else { return };
        kiln_store::suite::api_tokens_are_kept_as_hashes(&store).await;
    });
}
