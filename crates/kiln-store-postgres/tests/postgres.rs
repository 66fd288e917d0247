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

/// A process stopped inside a transaction (SIGSTOP, a lost network) holds row locks until
/// PostgreSQL ends its session. The reaper of the processes still alive must not wait on
/// them: it runs on their heartbeat thread, and waiting would stop their heartbeats too,
/// so that they would look dead in turn. The locked runs are reaped once the lock is gone.
#[test]
fn a_session_stalled_in_a_transaction_does_not_hold_up_the_reaper() {
    use kiln_store::state::StateType::*;
    use kiln_store::suite::{change, claim_request, queued, task};
    kiln_store::suite::runtime().block_on(async {
        let Some(url) = fresh_database().await else { return };
        let store = PostgresStore::open(&url).unwrap();
        let now = now_micros();
        let silent = Process {
            id: uuid::Uuid::now_v7(),
            host: "stalled-host".into(),
            pid: 77,
            started: 7,
            heartbeat: now,
            lease: 0,
        };
        store.write(Write::Heartbeat(silent.clone())).await.unwrap();
        let owned = |name: &str| {
            let mut t = task(name, None);
            t.process_id = Some(silent.id);
            t
        };
        let (locked, free) = (owned("locked"), owned("free"));
        let [flow, entry] = queued("claimed", "pool", None, now - 1_000, 2);
        let claimed = flow.run_id();
        for w in [
            Write::TaskRun(locked.clone()),
            Write::TaskRun(free.clone()),
            flow,
            entry,
        ] {
            store.write(w).await.unwrap();
        }
        for id in [locked.id, free.id] {
            store
                .set_state(change(RunKind::Task, id, Pending, Running, 1))
                .await
                .unwrap();
        }
        let claim = store
            .claim(&claim_request(silent.id, &["pool"], 1))
            .await
            .unwrap()
            .remove(0);
        let start = StateChange {
            fence: Some(claim.fence),
            ..change(RunKind::Flow, claimed, Pending, Running, 1)
        };
        store.set_state(start).await.unwrap();

        // The stalled process: inside a transaction that locked one task run, and the
        // claimed run's row (but not its queue entry).
        let (stalled, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        stalled
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM task_runs WHERE id = '{}' FOR UPDATE; \
                 SELECT 1 FROM flow_runs WHERE id = '{claimed}' FOR UPDATE",
                locked.id
            ))
            .await
            .unwrap();
        let later = now + 60_000_000;
        let reap = || async {
            let mut ids: Vec<uuid::Uuid> =
                tokio::time::timeout(std::time::Duration::from_secs(30), store.crash_orphans(&[], later))
                    .await
                    .expect("the reaper waited on the stalled session's locks")
                    .unwrap()
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect();
            ids.sort();
            ids
        };
        assert_eq!(reap().await, [free.id], "what is not locked is reaped at once");
        assert_eq!(store.task_run(locked.id).await.unwrap().unwrap().state, Running);
        // The session ends (PostgreSQL ends one of Kiln's that idles inside a transaction
        // after a few seconds, see below): the rest follows.
        stalled.batch_execute("ROLLBACK").await.unwrap();
        let mut rest = vec![locked.id, claimed];
        rest.sort();
        assert_eq!(reap().await, rest);
        assert_eq!(store.task_run(locked.id).await.unwrap().unwrap().state, Crashed);
        assert_eq!(store.flow_run(claimed).await.unwrap().unwrap().state, AwaitingRetry);
    });
}

/// The store's sessions carry a limit on idling inside a transaction, so that a stopped
/// process's locks go with its session; one the URL sets is kept.
#[test]
fn the_store_s_sessions_end_when_idle_inside_a_transaction() {
    use kiln_store_postgres::testing::session_setting;
    kiln_store::suite::runtime().block_on(async {
        let Some(url) = fresh_database().await else { return };
        let store = PostgresStore::open(&url).unwrap();
        assert_eq!(
            session_setting(&store, "idle_in_transaction_session_timeout").await,
            "5s"
        );
        assert_eq!(session_setting(&store, "jit").await, "off");
        let own = format!("{url}?options=-c%20idle_in_transaction_session_timeout%3D1min");
        let store = PostgresStore::open(&own).unwrap();
        assert_eq!(
            session_setting(&store, "idle_in_transaction_session_timeout").await,
            "1min"
        );
        assert_eq!(session_setting(&store, "jit").await, "off");
    });
}

async fn next(ended: &mut tokio::sync::broadcast::Receiver<kiln_store::work::Ended>) -> kiln_store::work::Ended {
    tokio::time::timeout(std::time::Duration::from_secs(20), ended.recv())
        .await
        .expect("an announcement")
        .unwrap()
}

/// Runs that leave the queue are announced to subscribers once committed (`kiln_ended`),
/// and a lost listening connection is said (`Missed`) and opened again.
#[test]
fn runs_that_leave_the_queue_are_announced_and_a_lost_connection_is_said() {
    use kiln_store::state::StateType::*;
    use kiln_store::suite::{change, claim_request, queued};
    use kiln_store::work::Ended;
    kiln_store::suite::runtime().block_on(async {
        let Some(url) = fresh_database().await else { return };
        let store = PostgresStore::open(&url).unwrap();
        let mut ended = store.ended_runs().expect("PostgreSQL announces ended runs");
        assert_eq!(next(&mut ended).await, Ended::Missed, "listening from now on");
        let worker = Process {
            id: uuid::Uuid::now_v7(),
            host: "announce-host".into(),
            pid: 78,
            started: 7,
            heartbeat: now_micros(),
            lease: 0,
        };
        store.write(Write::Heartbeat(worker.clone())).await.unwrap();
        let now = now_micros();
        let mut runs = Vec::new();
        for name in ["one", "two", "three"] {
            let [run, entry] = queued(name, "pool", None, now - 1_000, 1);
            runs.push(run.run_id());
            store.write(run).await.unwrap();
            store.write(entry).await.unwrap();
        }
        let claims = store.claim(&claim_request(worker.id, &["pool"], 3)).await.unwrap();
        assert_eq!(claims.len(), 3);
        let third = claims.iter().find(|c| c.run_id == runs[2]).unwrap().fence;
        let start = StateChange {
            fence: Some(third),
            ..change(RunKind::Flow, runs[2], Pending, Running, 1)
        };
        store.set_state(start).await.unwrap();
        let finish = |id: uuid::Uuid| {
            let fence = claims.iter().find(|c| c.run_id == id).unwrap().fence;
            let store = &store;
            async move {
                for (from, to) in [(Pending, Running), (Running, Completed)] {
                    let c = StateChange {
                        fence: Some(fence),
                        ..change(RunKind::Flow, id, from, to, 1)
                    };
                    store.set_state(c).await.unwrap();
                }
            }
        };
        finish(runs[0]).await;
        assert_eq!(next(&mut ended).await, Ended::Runs(vec![runs[0]].into()));

        // The listening connection is lost: subscribers are told, and it listens again.
        sql(
            &url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .await;
        assert_eq!(next(&mut ended).await, Ended::Missed, "the connection was lost");
        assert_eq!(next(&mut ended).await, Ended::Missed, "listening again");
        finish(runs[1]).await;
        assert_eq!(next(&mut ended).await, Ended::Runs(vec![runs[1]].into()));
        // A claim taken back from a worker that exited, without attempts left, ends the run.
        store
            .crash_orphans(&[worker.id], now_micros() - 60_000_000)
            .await
            .unwrap();
        assert_eq!(next(&mut ended).await, Ended::Runs(vec![runs[2]].into()));
        assert_eq!(store.flow_run(runs[2]).await.unwrap().unwrap().state, Crashed);
    });
}

/// A run's history is kept in its row; a database from before migration 0011 has the first
/// states as rows of `states`: both read back as one history, in order, and a change
/// recorded either way is recognised when delivered again.
#[test]
fn a_history_kept_in_the_row_reads_back_whole_with_older_rows_of_states() {
    use kiln_store::state::StateType::*;
    use kiln_store::suite::{change, task};
    kiln_store::suite::runtime().block_on(async {
        let Some(url) = fresh_database().await else { return };
        let store = PostgresStore::open(&url).unwrap();
        let t = task("appended", None);
        let id = t.id;
        store.write(Write::TaskRun(t)).await.unwrap();
        let old = change(RunKind::Task, id, Pending, Running, 1);
        // As a database from before migration 0011 holds it: the first states in `states`.
        sql(
            &url,
            &format!(
                "UPDATE task_runs SET history = NULL, state = 'Running', state_seq = 1, attempt = 1 WHERE id = '{id}';
                 INSERT INTO states (run_id, seq, state, attempt, timestamp) VALUES ('{id}', 0, 'Pending', 0, 1);
                 INSERT INTO states (run_id, seq, state, attempt, timestamp, change_id)
                     VALUES ('{id}', 1, 'Running', 1, 2, '{}')",
                old.id
            ),
        )
        .await;
        let mut retrying = change(RunKind::Task, id, Running, AwaitingRetry, 1);
        retrying.message = Some("a \"quoted\" é, \u{1b}[31m".into());
        let mut done = change(RunKind::Task, id, AwaitingRetry, Running, 2);
        done.result = None;
        let mut completed = change(RunKind::Task, id, Running, Completed, 2);
        completed.result = Some(r#"{"key":"k","size":3}"#.into());
        for c in [retrying.clone(), done, completed] {
            // Each in its own batch: each is appended to what the one before wrote.
            store.set_state(c).await.unwrap();
        }
        let history = store.states(id).await.unwrap();
        let states: Vec<_> = history.iter().map(|s| (s.seq, s.state)).collect();
        assert_eq!(
            states,
            [
                (0, Pending),
                (1, Running),
                (2, AwaitingRetry),
                (3, Running),
                (4, Completed)
            ]
        );
        assert_eq!(history[2].message.as_deref(), Some("a \"quoted\" é, \u{1b}[31m"));
        assert_eq!(history[4].result.as_deref(), Some(r#"{"key":"k","size":3}"#));
        // Delivered again: acknowledged at the place each has, from `states` or from the row.
        for (again, seq) in [(old, 1), (retrying, 2)] {
            let outcome = store.write(Write::State(again)).await.unwrap();
            assert!(
                matches!(outcome, Outcome::Applied { seq: Some(s) } if s == seq),
                "{outcome:?}"
            );
        }
        assert_eq!(store.states(id).await.unwrap().len(), 5);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let rows: i64 = client
            .query_one("SELECT count(*) FROM states", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 2, "no more rows of `states` are written");
    });
}
