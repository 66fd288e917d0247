//! The conformance suite on the embedded SQLite store, plus what is SQLite's own.

use std::sync::Arc;

use kiln_store::model::*;
use kiln_store::state::StateType::*;
use kiln_store::suite::{self, Collect};
use kiln_store::{Outcome, Report, Store, StoreError};
use kiln_store_sqlite::SqliteStore;

fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStore::open(dir.path().join("nested/kiln.db")).unwrap(), dir)
}

kiln_store::store_suite!(async { Some(sqlite()) });

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    suite::runtime().block_on(f)
}

#[test]
fn records_survive_reopening() {
    let (store, dir) = sqlite();
    block_on(async {
        assert!(store.flow_runs(1).await.unwrap().is_empty());
        suite::lists_newest_first_within_the_limit(&store).await;
    });
    store.close().unwrap();
    let reopened = SqliteStore::open(dir.path().join("nested/kiln.db")).unwrap();
    assert_eq!(block_on(reopened.flow_runs(10)).unwrap().len(), 5);
}

#[test]
fn a_database_from_a_newer_kiln_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    for err in [
        SqliteStore::open(&path).unwrap_err(),
        SqliteStore::open_read_only(&path).unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                StoreError::TooNew {
                    found: 99,
                    known,
                    ..
                } if (5..99).contains(&known)
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade Kiln"), "{err}");
    }
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
    let err = block_on(store.flush()).unwrap_err();
    assert!(matches!(err, StoreError::WriterGone(_)), "{err}");
    let err = store.send(Write::FlowRun(suite::flow("late", None)), None).unwrap_err();
    assert!(matches!(err, StoreError::WriterGone(_)), "{err}");
}

#[test]
fn a_read_only_store_reads_and_refuses_writes_without_migrating() {
    let (store, dir) = sqlite();
    let path = dir.path().join("nested/kiln.db");
    block_on(suite::lists_newest_first_within_the_limit(&store));
    store.close().unwrap();
    let before = std::fs::read(&path).unwrap();
    let ro = SqliteStore::open_read_only(&path).unwrap();
    assert_eq!(block_on(ro.flow_runs(10)).unwrap().len(), 5);
    assert!(ro.send(Write::FlowRun(suite::flow("no", None)), None).is_err());
    assert!(SqliteStore::open_read_only(dir.path().join("missing.db")).is_err());
    drop(ro);
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing was written");
}

/// Another connection holds the write lock for longer than SQLite's busy timeout (10 s):
/// the batch waits and is applied whole, nothing is dropped.
#[test]
fn a_batch_waits_out_a_locked_database_and_loses_nothing() {
    let (store, dir) = sqlite();
    let path = dir.path().join("nested/kiln.db");
    let report = Arc::new(Collect::default());
    let f = suite::flow("patient", None);
    let fid = f.id;
    store
        .send(Write::FlowRun(f), Some(report.clone() as Arc<dyn Report>))
        .unwrap();
    block_on(store.flush()).unwrap();

    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let tasks: Vec<_> = (0..300).map(|_| suite::task("t", Some(fid))).collect();
    for t in &tasks {
        let id = t.id;
        for w in [
            Write::TaskRun(t.clone()),
            Write::State(suite::change(RunKind::Task, id, Pending, Running, 1)),
            Write::State(suite::change(RunKind::Task, id, Running, Completed, 1)),
        ] {
            store.send(w, Some(report.clone() as Arc<dyn Report>)).unwrap();
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(12));
    locker.execute_batch("COMMIT").unwrap();
    block_on(store.flush()).unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    let runs = block_on(store.task_runs(fid)).unwrap();
    assert_eq!(runs.len(), 300);
    assert!(runs.iter().all(|r| r.state == Completed));
    for t in &tasks[..10] {
        assert_eq!(block_on(store.states(t.id)).unwrap().len(), 3);
    }
}

/// Reporter that counts failures, for the fault tests.
#[derive(Default)]
struct Failures(std::sync::Mutex<Vec<String>>);

impl Report for Failures {
    fn report(&self, write: &Write, outcome: Outcome) {
        if let Outcome::Failed(e) = outcome {
            self.0.lock().unwrap().push(format!("{write}: {e}"));
        }
    }
}

/// A write the database refuses is reported to its sender with the database's reason.
#[test]
fn a_refused_write_is_reported_with_the_database_reason() {
    let (store, dir) = sqlite();
    let path = dir.path().join("nested/kiln.db");
    // Another connection makes the file refuse writes: a trigger that aborts every insert.
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER no_room BEFORE INSERT ON flow_runs BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
        )
        .unwrap();
    let failures = Arc::new(Failures::default());
    let f = suite::flow("doomed", None);
    store
        .send(Write::FlowRun(f), Some(failures.clone() as Arc<dyn Report>))
        .unwrap();
    block_on(store.flush()).unwrap();
    let failed = failures.0.lock().unwrap().clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("database or disk is full"), "{failed:?}");
    assert!(block_on(store.flow_runs(10)).unwrap().is_empty());
}

/// A row this Kiln cannot read is an error that names the value, not a wrong answer.
#[test]
fn a_corrupt_row_is_reported_not_guessed() {
    let (store, dir) = sqlite();
    let t = suite::task("damaged", None);
    let id = t.id;
    store.send(Write::TaskRun(t), None).unwrap();
    block_on(store.flush()).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("nested/kiln.db")).unwrap();
    conn.execute("UPDATE task_runs SET state = 'Exploded'", []).unwrap();
    let err = block_on(store.task_run(id)).unwrap_err().to_string();
    assert!(err.contains("unknown state type 'Exploded'"), "{err}");
    // The store refuses to move a run whose stored state it cannot read.
    let change = suite::change(RunKind::Task, id, Pending, Running, 1);
    assert!(block_on(store.set_state(change)).is_err());
}

#[test]
fn api_tokens_are_kept_as_hashes() {
    let (store, _dir) = sqlite();
    block_on(suite::api_tokens_are_kept_as_hashes(&store));
}

/// A run's history is kept in its row and appended to state by state, byte for byte; the
/// states a run recorded in `states` before migration 0011 are read with it, in order.
#[test]
fn a_history_kept_in_the_row_reads_back_whole_with_older_rows_of_states() {
    let (store, dir) = sqlite();
    let t = suite::task("appended", None);
    let id = t.id;
    block_on(async {
        store.send(Write::TaskRun(t), None).unwrap();
        store.flush().await.unwrap();
    });
    // As a database from before migration 0011 holds it: the first state in `states`.
    let conn = rusqlite::Connection::open(dir.path().join("nested/kiln.db")).unwrap();
    conn.execute("UPDATE task_runs SET history = NULL WHERE id = ?1", [id])
        .unwrap();
    conn.execute(
        "INSERT INTO states (run_id, seq, state, attempt, timestamp) VALUES (?1, 0, 'Pending', 0, 1)",
        [id],
    )
    .unwrap();
    let mut running = suite::change(RunKind::Task, id, Pending, Running, 1);
    running.message = Some("nul \0 and é, \u{1b}[31m".into());
    let mut done = suite::change(RunKind::Task, id, Running, Completed, 1);
    done.result = Some(r#"{"key":"k","size":3}"#.into());
    block_on(async {
        for change in [running, done] {
            // Each in its own batch: the second is appended to what the first wrote.
            store.set_state(change).await.unwrap();
        }
        let history = store.states(id).await.unwrap();
        let states: Vec<_> = history.iter().map(|s| (s.seq, s.state)).collect();
        assert_eq!(states, [(0, Pending), (1, Running), (2, Completed)]);
        assert_eq!(history[1].message.as_deref(), Some("nul \0 and é, \u{1b}[31m"));
        assert_eq!(history[2].result.as_deref(), Some(r#"{"key":"k","size":3}"#));
    });
}

/// A batch writes the changes of an existing run as one row update, assuming what this
/// writer last saw; when another process moved the run meanwhile, the batch is decided
/// again on the database: a stale change is refused, the rest applied, nothing lost.
#[test]
fn changes_made_in_one_batch_hold_when_another_process_moved_the_run() {
    let (store, dir) = sqlite();
    let other = SqliteStore::open(dir.path().join("nested/kiln.db")).unwrap();
    let (a, b) = (suite::task("moved", None), suite::task("still", None));
    let (aid, bid) = (a.id, b.id);
    let report = Arc::new(Collect::default());
    let to_report = || Some(report.clone() as Arc<dyn Report>);
    block_on(async {
        store.send(Write::TaskRun(a), None).unwrap();
        store.send(Write::TaskRun(b), None).unwrap();
        store.flush().await.unwrap();
        // This writer last saw both Pending; another process starts `a`.
        other
            .set_state(suite::change(RunKind::Task, aid, Pending, Running, 1))
            .await
            .unwrap();
        let resent = suite::change(RunKind::Task, bid, Pending, Running, 1);
        for change in [
            suite::change(RunKind::Task, aid, Pending, Running, 1),
            suite::change(RunKind::Task, aid, Running, Completed, 1),
            resent.clone(),
            suite::change(RunKind::Task, bid, Running, Completed, 1),
            resent,
        ] {
            store.send(Write::State(change), to_report()).unwrap();
        }
        store.flush().await.unwrap();
        let problems = report.problems();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains(&format!("Pending -> Running of run {aid}")),
            "{problems:#?}"
        );
        assert!(problems[0].contains("Running"), "{problems:#?}");
        let store = &store;
        let seqs = |id| async move {
            let h = store.states(id).await.unwrap();
            h.iter().map(|s| (s.seq, s.state)).collect::<Vec<_>>()
        };
        assert_eq!(seqs(aid).await, [(0, Pending), (1, Running), (2, Completed)]);
        // The change sent twice is applied once, at one position.
        assert_eq!(seqs(bid).await, [(0, Pending), (1, Running), (2, Completed)]);
        let outcomes = report.outcomes();
        let resends: Vec<_> = outcomes
            .iter()
            .filter(|o| o.contains(&format!("Pending -> Running of run {bid}")))
            .collect();
        assert_eq!(resends.len(), 2, "{outcomes:#?}");
        assert!(resends.iter().all(|o| o.contains("seq: Some(1)")), "{outcomes:#?}");
        let row = store.task_run(aid).await.unwrap().unwrap();
        assert_eq!(row.state, Completed);
        assert!(row.start_time.is_some() && row.end_time.is_some());
    });
}

/// A database an older Kiln left (before the history moved into the rows), opened read-only
/// without migrating it, still gives each run's history, from `states`.
#[test]
fn an_older_database_opened_read_only_reads_histories_from_states() {
    let (store, dir) = sqlite();
    let path = dir.path().join("nested/kiln.db");
    let f = suite::flow("old", None);
    let id = f.id;
    block_on(async {
        store.send(Write::FlowRun(f), None).unwrap();
        store.flush().await.unwrap();
    });
    store.close().unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP INDEX flow_runs_open; DROP INDEX task_runs_open;
         ALTER TABLE flow_runs DROP COLUMN history; ALTER TABLE task_runs DROP COLUMN history;
         PRAGMA user_version = 10;",
    )
    .unwrap();
    conn.execute(
        "INSERT INTO states (run_id, seq, state, attempt, timestamp) VALUES (?1, 0, 'Pending', 0, 1)",
        [id],
    )
    .unwrap();
    drop(conn);
    let ro = SqliteStore::open_read_only(&path).unwrap();
    let history = block_on(ro.states(id)).unwrap();
    assert_eq!(
        history.iter().map(|s| (s.seq, s.state)).collect::<Vec<_>>(),
        [(0, Pending)]
    );
}

/// Flow runs and task runs share one id space: a run cannot take the id of one of the
/// other kind.
#[test]
fn a_run_cannot_take_the_id_of_a_run_of_the_other_kind() {
    let (store, _dir) = sqlite();
    let f = suite::flow("first", None);
    let mut t = suite::task("second", None);
    t.id = f.id;
    let report = Arc::new(Collect::default());
    block_on(async {
        store.send(Write::FlowRun(f), None).unwrap();
        store.flush().await.unwrap();
        store
            .send(Write::TaskRun(t), Some(report.clone() as Arc<dyn Report>))
            .unwrap();
        store.flush().await.unwrap();
    });
    let problems = report.problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("is taken by a flow run"), "{problems:#?}");

    // Among many task runs sent at once (a batch looks their ids up several at a time): the
    // ones with a flow run's id, made before and after theirs (the low and the high end of
    // their ids), are refused; the others are recorded.
    let before = suite::flow("before", None);
    let mut tasks: Vec<_> = (0..200).map(|i| suite::task(&format!("many_{i}"), None)).collect();
    let after = suite::flow("after", None);
    let taken = [(50, before.clone()), (150, after.clone())];
    for (i, f) in &taken {
        tasks[*i].id = f.id;
    }
    let report = Arc::new(Collect::default());
    block_on(async {
        store.send(Write::FlowRun(before.clone()), None).unwrap();
        store.send(Write::FlowRun(after.clone()), None).unwrap();
        store.flush().await.unwrap();
        // In two rounds: a batch that meets one taken id is retried carefully, which would
        // find the other one too if both were in it.
        for round in tasks.chunks(100) {
            for t in round {
                store
                    .send(Write::TaskRun(t.clone()), Some(report.clone() as Arc<dyn Report>))
                    .unwrap();
            }
            store.flush().await.unwrap();
        }
    });
    let problems = report.problems();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    for (_, f) in &taken {
        let refused = format!("run id {} is taken by a flow run", f.id);
        assert!(problems.iter().any(|p| p.contains(&refused)), "{problems:#?}");
        assert!(block_on(store.task_run(f.id)).unwrap().is_none());
        assert_eq!(block_on(store.flow_run(f.id)).unwrap().unwrap().name, f.name);
    }
    for (i, t) in tasks.iter().enumerate().filter(|(i, _)| *i != 50 && *i != 150) {
        let run = block_on(store.task_run(t.id)).unwrap();
        assert_eq!(run.map(|r| r.name), Some(format!("many_{i}")));
    }
}

/// A deletion sees what its own batch did before it: runs created and finished in the same
/// batch go with the flow run they belong to.
#[test]
fn a_deletion_takes_the_runs_its_own_batch_created() {
    let (store, _dir) = sqlite();
    let f = suite::flow("short-lived", None);
    let t = suite::task("inside", Some(f.id));
    let (fid, tid) = (f.id, t.id);
    let report = Arc::new(Collect::default());
    block_on(async {
        for w in [
            Write::FlowRun(f),
            Write::TaskRun(t),
            Write::State(suite::change(RunKind::Task, tid, Pending, Running, 1)),
            Write::State(suite::change(RunKind::Task, tid, Running, Completed, 1)),
            Write::State(suite::change(RunKind::Flow, fid, Pending, Running, 1)),
            Write::State(suite::change(RunKind::Flow, fid, Running, Completed, 1)),
            Write::DeleteRun { id: fid },
        ] {
            store.send(w, Some(report.clone() as Arc<dyn Report>)).unwrap();
        }
        store.flush().await.unwrap();
        assert!(report.problems().is_empty(), "{:#?}", report.problems());
        assert!(store.flow_run(fid).await.unwrap().is_none());
        assert!(
            store.task_run(tid).await.unwrap().is_none(),
            "no task run left without its flow run"
        );
    });
}

/// The log is copied into the database file while the store stays open (by a thread beside
/// the writer), and under a steady stream of writes it stays bounded: it starts again from its
/// beginning instead of growing with everything written.
#[test]
fn the_log_is_copied_while_writes_go_on_and_stays_bounded() {
    let (store, dir) = sqlite();
    let path = dir.path().join("nested/kiln.db");
    let wal = dir.path().join("nested/kiln.db-wal");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let report = Arc::new(Collect::default());
    let f = suite::flow("stream", None);
    let fid = f.id;
    store
        .send(Write::FlowRun(f), Some(report.clone() as Arc<dyn Report>))
        .unwrap();
    // 96 MiB of rows in chunks of 4 MiB: more than the log may hold (64 MiB, plus a batch).
    let padding = "x".repeat(4000);
    let mut largest_log = 0;
    for _ in 0..24 {
        for _ in 0..1000 {
            let mut t = suite::task("t", Some(fid));
            t.inputs = serde_json::json!({ "x": { "type": "str", "value": padding } }).into();
            store
                .send(Write::TaskRun(t), Some(report.clone() as Arc<dyn Report>))
                .unwrap();
        }
        block_on(store.flush()).unwrap();
        largest_log = largest_log.max(size(&wal));
    }
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    assert!(largest_log < 72 << 20, "the log grew to {largest_log} bytes");
    let copied = std::time::Instant::now();
    while size(&path) < 64 << 20 {
        assert!(
            copied.elapsed() < std::time::Duration::from_secs(30),
            "the database file holds {} bytes of 96 MiB written while open",
            size(&path)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    store.close().unwrap();
    let reopened = SqliteStore::open(&path).unwrap();
    assert_eq!(block_on(reopened.task_runs(fid)).unwrap().len(), 24_000);
}

/// Migration 0014 moves the task runs of an older database (a WITHOUT ROWID table) into a
/// rowid table whole: every row, its history, its indexes, and runs still open move on.
#[test]
fn task_runs_recorded_before_the_rowid_table_survive_the_migration() {
    let (store, dir) = sqlite();
    let path = dir.path().join("nested/kiln.db");
    let f = suite::flow("older", None);
    let fid = f.id;
    let tasks: Vec<_> = (0..3).map(|_| suite::task("t", Some(fid))).collect();
    block_on(async {
        store.send(Write::FlowRun(f), None).unwrap();
        for t in &tasks {
            store.send(Write::TaskRun(t.clone()), None).unwrap();
            store
                .send(
                    Write::State(suite::change(RunKind::Task, t.id, Pending, Running, 1)),
                    None,
                )
                .unwrap();
        }
        store
            .send(
                Write::State(suite::change(RunKind::Task, tasks[0].id, Running, Completed, 1)),
                None,
            )
            .unwrap();
        store.flush().await.unwrap();
    });
    store.close().unwrap();
    // The table as migrations 0001-0013 left it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let columns = "id, flow_run_id, name, task_key, inputs, tags, state, state_message, attempt, created, \
                   start_time, end_time, result, call_key, state_seq, process_id, history";
    conn.execute_batch(&format!(
        "CREATE TABLE older (id BLOB PRIMARY KEY NOT NULL, flow_run_id BLOB, name TEXT NOT NULL,
             task_key TEXT NOT NULL, inputs TEXT NOT NULL, tags TEXT NOT NULL, state TEXT NOT NULL,
             state_message TEXT, attempt INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL,
             start_time INTEGER, end_time INTEGER, result TEXT, call_key TEXT,
             state_seq INTEGER NOT NULL DEFAULT 0, process_id BLOB, history BLOB) WITHOUT ROWID;
         INSERT INTO older ({columns}) SELECT {columns} FROM task_runs;
         DROP TABLE task_runs;
         ALTER TABLE older RENAME TO task_runs;
         CREATE INDEX task_runs_flow ON task_runs (flow_run_id);
         CREATE INDEX task_runs_open ON task_runs (process_id)
             WHERE state = 'Pending' OR state = 'Running' OR state = 'AwaitingRetry' OR state = 'Cancelling';
         PRAGMA user_version = 13;"
    ))
    .unwrap();
    drop(conn);

    let store = SqliteStore::open(&path).unwrap();
    let table: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT sql FROM sqlite_master WHERE name = 'task_runs'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(!table.contains("WITHOUT ROWID"), "{table}");
    let runs = block_on(store.task_runs(fid)).unwrap();
    assert_eq!(runs.len(), 3);
    let states: Vec<_> = runs.iter().map(|r| (r.id, r.state)).collect();
    assert!(states.contains(&(tasks[0].id, Completed)), "{states:?}");
    assert_eq!(states.iter().filter(|(_, s)| *s == Running).count(), 2);
    assert_eq!(block_on(store.states(tasks[0].id)).unwrap().len(), 3);
    // A run left open before the migration moves on after it.
    let report = Arc::new(Collect::default());
    store
        .send(
            Write::State(suite::change(RunKind::Task, tasks[1].id, Running, Failed, 1)),
            Some(report.clone() as Arc<dyn Report>),
        )
        .unwrap();
    block_on(store.flush()).unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    assert_eq!(block_on(store.task_run(tasks[1].id)).unwrap().unwrap().state, Failed);
}
