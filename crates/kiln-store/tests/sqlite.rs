//! The conformance suite on the embedded SQLite store, plus what is SQLite's own.

mod suite;

use kiln_store::{SqliteStore, Store, StoreError};

fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStore::open(dir.path().join("nested/kiln.db")).unwrap(), dir)
}

store_suite!(sqlite());

#[test]
fn records_survive_reopening() {
    let (store, dir) = sqlite();
    assert!(store.flow_runs(1).unwrap().is_empty());
    suite::lists_newest_first_within_the_limit(&store);
    store.close().unwrap();
    let reopened = SqliteStore::open(dir.path().join("nested/kiln.db")).unwrap();
    assert_eq!(reopened.flow_runs(10).unwrap().len(), 5);
}

#[test]
fn a_database_from_a_newer_kiln_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("upgrade Kiln"), "{err}");
}

#[test]
fn an_unwritable_home_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    let err = SqliteStore::open(file.join("kiln.db")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cannot open the state database") && text.contains("KILN_HOME"),
        "{text}"
    );
}

#[test]
fn writes_after_close_fail_clearly() {
    let (store, _dir) = sqlite();
    store.close().unwrap();
    let err = store.flush().unwrap_err();
    assert!(matches!(err, StoreError::WriterGone(_)), "{err}");
}
