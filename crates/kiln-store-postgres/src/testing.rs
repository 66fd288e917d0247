//! For tests that need a PostgreSQL database of their own (feature `testing`).

/// A fresh, empty database on the server at `KILN_TEST_DATABASE_URL`, as a URL; `None` when
/// that variable is not set (the caller's test then passes, saying so), a panic when it is
/// not set but `KILN_REQUIRE_SERVICES=1` (as in `scripts/test`).
pub async fn fresh_database() -> Option<String> {
    let Some(admin) = std::env::var("KILN_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        assert_ne!(
            std::env::var("KILN_REQUIRE_SERVICES").as_deref(),
            Ok("1"),
            "KILN_TEST_DATABASE_URL is not set but KILN_REQUIRE_SERVICES=1: start the services with scripts/services"
        );
        eprintln!("skipped: KILN_TEST_DATABASE_URL is not set (scripts/test starts PostgreSQL)");
        return None;
    };
    let name = format!("kiln_{}", uuid::Uuid::now_v7().simple());
    execute(&admin, &format!("CREATE DATABASE {name}")).await;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// Runs SQL on the database at `url` with a connection of its own.
pub async fn execute(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(connection);
    client.batch_execute(sql).await.expect("run SQL on the test server");
}

/// [`fresh_database`] from synchronous code.
pub fn fresh_database_blocking() -> Option<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(fresh_database())
}

/// The value of the run-time setting `name` in the sessions `store` opens (`SHOW name`).
pub async fn session_setting(store: &crate::PostgresStore, name: &str) -> String {
    let client = store.pool.get().await.expect("a session of the store");
    let row = client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .expect("SHOW a setting");
    row.get(0)
}
