//! The embedded backend: one SQLite file, one background writer thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rusqlite::{CachedStatement, Connection, OpenFlags, OptionalExtension, Row, params};
use uuid::Uuid;

use crate::model::*;
use crate::state::StateType;
use crate::{FlushDone, Store, StoreError};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_runs.sql"),
    include_str!("../migrations/sqlite/0002_results.sql"),
];

/// Most writes applied in one transaction; bounds the latency of a flush behind a flood.
const MAX_BATCH: usize = 8192;

/// Writes queued ahead of the writer at most. A producer faster than SQLite waits for room
/// (microseconds) instead of growing memory without bound: a flow of a million task runs
/// holds at most this many pending writes (a few MiB), not a million.
const QUEUE: usize = 4 * MAX_BATCH;

enum Msg {
    Write(Write),
    Flush(FlushDone),
}

/// The embedded state store: a SQLite database file written by one background thread.
///
/// Readers use their own connection (WAL mode), so the CLI can read while a flow writes.
pub struct SqliteStore {
    path: PathBuf,
    tx: RwLock<Option<SyncSender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

impl SqliteStore {
    /// Opens (creating it and its folder if needed) the database at `path` and migrates it.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.clone(),
                source: rusqlite::Error::InvalidPath(format!("{}: {e}", dir.display()).into()),
            })?;
        }
        let mut conn = connect(&path, OpenFlags::default())?;
        migrate(&mut conn, &path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("kiln-store-writer".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| StoreError::WriterGone(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            path,
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(None),
        })
    }

    /// Opens an existing database for reading only (the CLI's view): never creates a file.
    pub fn open_existing(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if !path.exists() {
            return Err(StoreError::Open {
                source: rusqlite::Error::InvalidPath(
                    format!(
                        "{} does not exist (no flow has run with this KILN_HOME yet)",
                        path.display()
                    )
                    .into(),
                ),
                path,
            });
        }
        Self::open(path)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and stops the writer thread; later writes fail with [`StoreError::WriterGone`].
    pub fn close(&self) -> Result<(), StoreError> {
        let flushed = self.flush();
        drop(self.tx.write().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.join()
                .map_err(|_| StoreError::WriterGone("the writer thread panicked".into()))?;
        }
        flushed
    }

    /// Queues a message; gives it back (boxed: the failure path is rare) when the writer is gone.
    fn post(&self, msg: Msg) -> Result<(), Box<Msg>> {
        match &*self.tx.read().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(msg).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(msg)),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut guard = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(connect(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)?);
        }
        f(guard.as_ref().expect("reader connection was just opened"))
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let open = |flags| -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        if !flags.contains(OpenFlags::SQLITE_OPEN_READ_ONLY) {
            // WAL: readers never block the writer; NORMAL: a commit survives a process crash.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        Ok(conn)
    };
    open(flags).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            known,
        });
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

fn write_loop(mut conn: Connection, rx: Receiver<Msg>) {
    // A failed write is reported to the next flush rather than dropped silently.
    let mut failure: Option<String> = None;
    let mut batch = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut waiting = Vec::new();
        match apply_batch(&mut conn, &mut batch, &mut waiting) {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                failure.get_or_insert(e);
            }
        }
        for done in waiting {
            match failure.take() {
                None => done(Ok(())),
                Some(e) => done(Err(StoreError::WriterGone(format!(
                    "a write to the state database failed: {e}"
                )))),
            }
        }
    }
}

/// A run created in the current batch: its row is written once, with the latest state.
struct NewRow {
    run: Write,
    state: StateType,
    message: Option<String>,
    attempt: u32,
    start: Option<Micros>,
    end: Option<Micros>,
    result: Option<String>,
}

impl NewRow {
    fn apply(&mut self, s: &StateRecord) {
        self.state = s.state;
        self.message.clone_from(&s.message);
        if s.result.is_some() {
            self.result.clone_from(&s.result);
        }
        self.attempt = s.attempt;
        if s.state == StateType::Running {
            self.start = self.start.or(Some(s.timestamp));
        }
        if s.state.is_terminal() {
            self.end = Some(s.timestamp);
        }
    }
}

/// The statements of a batch, prepared once per transaction rather than looked up per write.
struct Statements<'t> {
    state: CachedStatement<'t>,
    flow_run: CachedStatement<'t>,
    task_run: CachedStatement<'t>,
    flow_state: CachedStatement<'t>,
    task_state: CachedStatement<'t>,
    edge: CachedStatement<'t>,
    log: CachedStatement<'t>,
}

impl<'t> Statements<'t> {
    fn prepare(tx: &'t rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Ok(Statements {
            state: tx.prepare_cached(
                "INSERT INTO states (run_id, seq, state, message, attempt, timestamp, result)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
            flow_run: tx.prepare_cached(
                "INSERT INTO flow_runs (id, name, parent_id, parameters, tags, state, state_message, attempt,
                                        created, start_time, end_time, result, command, retry_of)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?,
            task_run: tx.prepare_cached(
                "INSERT INTO task_runs (id, flow_run_id, name, task_key, inputs, tags, state, state_message, attempt,
                                        created, start_time, end_time, result, call_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?,
            flow_state: tx.prepare_cached(
                "UPDATE flow_runs SET state = ?2, state_message = ?3, attempt = ?4,
                 start_time = COALESCE(start_time, ?5), end_time = COALESCE(?6, end_time),
                 result = COALESCE(?7, result) WHERE id = ?1",
            )?,
            task_state: tx.prepare_cached(
                "UPDATE task_runs SET state = ?2, state_message = ?3, attempt = ?4,
                 start_time = COALESCE(start_time, ?5), end_time = COALESCE(?6, end_time),
                 result = COALESCE(?7, result) WHERE id = ?1",
            )?,
            edge: tx.prepare_cached(
                "INSERT OR IGNORE INTO edges (upstream, downstream, flow_run_id) VALUES (?1, ?2, ?3)",
            )?,
            log: tx.prepare_cached(
                "INSERT INTO logs (run_id, flow_run_id, timestamp, level, target, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
        })
    }

    fn insert_state(&mut self, s: &StateRecord) -> rusqlite::Result<()> {
        self.state.execute(params![
            s.run_id,
            s.seq,
            s.state.as_str(),
            s.message,
            s.attempt,
            s.timestamp,
            s.result
        ])?;
        Ok(())
    }

    fn update_state(&mut self, kind: RunKind, s: &StateRecord) -> rusqlite::Result<()> {
        let stmt = match kind {
            RunKind::Flow => &mut self.flow_state,
            RunKind::Task => &mut self.task_state,
        };
        let start = (s.state == StateType::Running).then_some(s.timestamp);
        let end = s.state.is_terminal().then_some(s.timestamp);
        stmt.execute(params![
            s.run_id,
            s.state.as_str(),
            s.message,
            s.attempt,
            start,
            end,
            s.result
        ])?;
        Ok(())
    }

    fn insert_run(&mut self, row: &NewRow) -> rusqlite::Result<()> {
        match &row.run {
            Write::FlowRun(r) => self.flow_run.execute(params![
                r.id,
                r.name,
                r.parent_id,
                r.parameters.to_string(),
                tags_json(&r.tags),
                row.state.as_str(),
                row.message,
                row.attempt,
                r.created,
                row.start,
                row.end,
                row.result,
                r.command,
                r.retry_of
            ])?,
            Write::TaskRun(r) => self.task_run.execute(params![
                r.id,
                r.flow_run_id,
                r.name,
                r.task_key,
                r.inputs.to_string(),
                tags_json(&r.tags),
                row.state.as_str(),
                row.message,
                row.attempt,
                r.created,
                row.start,
                row.end,
                row.result,
                r.call_key
            ])?,
            _ => unreachable!("only run creations are kept as new rows"),
        };
        Ok(())
    }

    fn insert_other(&mut self, w: &Write) -> rusqlite::Result<()> {
        match w {
            Write::Edge { flow_run_id, edge } => {
                self.edge
                    .execute(params![edge.upstream, edge.downstream, flow_run_id])?;
            }
            Write::Log(l) => {
                self.log.execute(params![
                    l.run_id,
                    l.flow_run_id,
                    l.timestamp,
                    l.level,
                    l.target,
                    l.message
                ])?;
            }
            Write::FlowRun(_) | Write::TaskRun(_) | Write::State { .. } => unreachable!("handled by apply_batch"),
        }
        Ok(())
    }
}

/// Applies the writes in one transaction; returns the first per-write error, if any.
///
/// Most runs are created and finished within one batch: their state changes are folded
/// into the one row insert instead of costing an UPDATE each (the history rows are kept).
fn apply_batch(
    conn: &mut Connection,
    batch: &mut Vec<Msg>,
    waiting: &mut Vec<FlushDone>,
) -> Result<Option<String>, String> {
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    let mut first_err = None;
    {
        let mut st = Statements::prepare(&tx).map_err(|e| e.to_string())?;
        let mut new_rows: Vec<NewRow> = Vec::new();
        let mut new_index: HashMap<Uuid, usize> = HashMap::new();
        for msg in batch.drain(..) {
            let w = match msg {
                Msg::Flush(done) => {
                    waiting.push(done);
                    continue;
                }
                Msg::Write(w) => w,
            };
            let outcome = match &w {
                Write::FlowRun(NewFlowRun {
                    id,
                    initial_state,
                    created,
                    ..
                })
                | Write::TaskRun(NewTaskRun {
                    id,
                    initial_state,
                    created,
                    ..
                }) => {
                    new_index.insert(*id, new_rows.len());
                    st.insert_state(&StateRecord::created(*id, *initial_state, *created))
                }
                Write::State { kind, record } => {
                    st.insert_state(record)
                        .and_then(|()| match new_index.get(&record.run_id) {
                            Some(&i) => {
                                new_rows[i].apply(record);
                                Ok(())
                            }
                            None => st.update_state(*kind, record),
                        })
                }
                Write::Edge { .. } | Write::Log(_) => st.insert_other(&w),
            };
            if let Err(e) = outcome {
                first_err.get_or_insert_with(|| format!("{e} (while recording {})", describe(&w)));
            }
            if let Write::FlowRun(NewFlowRun { initial_state, .. }) | Write::TaskRun(NewTaskRun { initial_state, .. }) =
                &w
            {
                let state = *initial_state;
                new_rows.push(NewRow {
                    run: w,
                    state,
                    message: None,
                    attempt: 0,
                    start: None,
                    end: None,
                    result: None,
                });
            }
        }
        for row in &new_rows {
            if let Err(e) = st.insert_run(row) {
                first_err.get_or_insert_with(|| format!("{e} (while recording {})", describe(&row.run)));
            }
        }
    }
    tx.commit().map_err(|e| e.to_string())?;
    Ok(first_err)
}

fn describe(w: &Write) -> String {
    match w {
        Write::FlowRun(r) => format!("flow run {}", r.id),
        Write::TaskRun(r) => format!("task run {}", r.id),
        Write::State { record, .. } => format!("state {} of run {}", record.state, record.run_id),
        Write::Edge { edge, .. } => format!("edge {} -> {}", edge.upstream, edge.downstream),
        Write::Log(l) => format!("a log of run {}", l.run_id),
    }
}

fn tags_json(tags: &[String]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

fn json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

fn state_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<StateType> {
    let s: String = row.get(idx)?;
    s.parse().map_err(|e: StoreError| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

const FLOW_COLUMNS: &str = "f.id, f.name, f.parent_id, f.parameters, f.tags, f.state, f.state_message, f.attempt,
     f.created, f.start_time, f.end_time,
     (SELECT COUNT(*) FROM task_runs t WHERE t.flow_run_id = f.id), f.result, f.command, f.retry_of";

fn flow_row(row: &Row<'_>) -> rusqlite::Result<FlowRun> {
    Ok(FlowRun {
        id: row.get(0)?,
        name: row.get(1)?,
        parent_id: row.get(2)?,
        parameters: json_col(row, 3)?,
        tags: json_col(row, 4)?,
        state: state_col(row, 5)?,
        state_message: row.get(6)?,
        attempt: row.get(7)?,
        created: row.get(8)?,
        start_time: row.get(9)?,
        end_time: row.get(10)?,
        task_count: row.get::<_, i64>(11)? as u64,
        result: opt_json_col(row, 12)?,
        command: opt_json_col(row, 13)?,
        retry_of: row.get(14)?,
    })
}

const TASK_COLUMNS: &str = "id, flow_run_id, name, task_key, inputs, tags, state, state_message, attempt,
     created, start_time, end_time, result, call_key";

fn task_row(row: &Row<'_>) -> rusqlite::Result<TaskRun> {
    Ok(TaskRun {
        id: row.get(0)?,
        flow_run_id: row.get(1)?,
        name: row.get(2)?,
        task_key: row.get(3)?,
        inputs: json_col(row, 4)?,
        tags: json_col(row, 5)?,
        state: state_col(row, 6)?,
        state_message: row.get(7)?,
        attempt: row.get(8)?,
        created: row.get(9)?,
        start_time: row.get(10)?,
        end_time: row.get(11)?,
        result: opt_json_col(row, 12)?,
        call_key: row.get(13)?,
    })
}

fn opt_json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| {
        serde_json::from_str(&s)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
    })
    .transpose()
}

fn collect<T>(rows: impl Iterator<Item = rusqlite::Result<T>>) -> Result<Vec<T>, StoreError> {
    rows.collect::<rusqlite::Result<Vec<T>>>().map_err(StoreError::from)
}

impl Store for SqliteStore {
    fn send(&self, write: Write) -> Result<(), StoreError> {
        self.post(Msg::Write(write))
            .map_err(|_| StoreError::WriterGone("the store was closed or its writer thread exited".into()))
    }

    fn flush_then(&self, done: FlushDone) {
        if let Err(msg) = self.post(Msg::Flush(done))
            && let Msg::Flush(done) = *msg
        {
            done(Err(StoreError::WriterGone(
                "the store was closed or its writer thread exited".into(),
            )));
        }
    }

    fn flow_runs(&self, limit: usize) -> Result<Vec<FlowRun>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {FLOW_COLUMNS} FROM flow_runs f ORDER BY f.id DESC LIMIT ?1"
            ))?;
            collect(st.query_map([limit as i64], flow_row)?)
        })
    }

    fn flow_run(&self, id: Uuid) -> Result<Option<FlowRun>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!("SELECT {FLOW_COLUMNS} FROM flow_runs f WHERE f.id = ?1"))?;
            Ok(st.query_row([id], flow_row).optional()?)
        })
    }

    fn subflow_runs(&self, parent: Uuid) -> Result<Vec<FlowRun>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {FLOW_COLUMNS} FROM flow_runs f WHERE f.parent_id = ?1 ORDER BY f.id"
            ))?;
            collect(st.query_map([parent], flow_row)?)
        })
    }

    fn task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM task_runs WHERE flow_run_id = ?1 ORDER BY id"
            ))?;
            collect(st.query_map([flow_run_id], task_row)?)
        })
    }

    fn task_run(&self, id: Uuid) -> Result<Option<TaskRun>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM task_runs WHERE id = ?1"))?;
            Ok(st.query_row([id], task_row).optional()?)
        })
    }

    fn states(&self, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT run_id, seq, state, message, attempt, timestamp, result FROM states WHERE run_id = ?1 ORDER BY seq",
            )?;
            collect(st.query_map([run_id], |r| {
                Ok(StateRecord {
                    run_id: r.get(0)?,
                    seq: r.get(1)?,
                    state: state_col(r, 2)?,
                    message: r.get(3)?,
                    attempt: r.get(4)?,
                    timestamp: r.get(5)?,
                    result: r.get(6)?,
                })
            })?)
        })
    }

    fn edges(&self, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT upstream, downstream FROM edges WHERE flow_run_id = ?1 ORDER BY downstream, upstream",
            )?;
            collect(st.query_map([flow_run_id], |r| {
                Ok(Edge {
                    upstream: r.get(0)?,
                    downstream: r.get(1)?,
                })
            })?)
        })
    }

    fn logs(&self, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT run_id, flow_run_id, timestamp, level, target, message FROM logs
                 WHERE run_id = ?1 OR flow_run_id = ?1 ORDER BY timestamp, seq",
            )?;
            collect(st.query_map([run_id], |r| {
                Ok(LogRecord {
                    run_id: r.get(0)?,
                    flow_run_id: r.get(1)?,
                    timestamp: r.get(2)?,
                    level: r.get(3)?,
                    target: r.get(4)?,
                    message: r.get(5)?,
                })
            })?)
        })
    }

    fn resolve(&self, id_or_prefix: &str) -> Result<RunRef, StoreError> {
        let hex: String = id_or_prefix
            .trim()
            .chars()
            .filter(|c| *c != '-')
            .collect::<String>()
            .to_ascii_uppercase();
        if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
        }
        let tables = [
            ("flow_runs", RunRef::Flow as fn(Uuid) -> RunRef),
            ("task_runs", RunRef::Task),
        ];
        self.read(|c| {
            // An exact id, else a prefix, else the id's tail (what the CLI prints in short form).
            if let Ok(id) = Uuid::parse_str(&hex) {
                for (table, make) in tables {
                    let mut st = c.prepare_cached(&format!("SELECT id FROM {table} WHERE id = ?1"))?;
                    if let Some(id) = st.query_row([id], |r| r.get::<_, Uuid>(0)).optional()? {
                        return Ok(make(id));
                    }
                }
            }
            for pattern in [format!("{hex}%"), format!("%{hex}")] {
                let mut found = Vec::new();
                for (table, make) in tables {
                    let mut st =
                        c.prepare_cached(&format!("SELECT id FROM {table} WHERE hex(id) LIKE ?1 LIMIT 100"))?;
                    for id in st.query_map([&pattern], |r| r.get::<_, Uuid>(0))? {
                        found.push(make(id?));
                    }
                }
                match found.len() {
                    0 => continue,
                    1 => return Ok(found[0]),
                    count => {
                        return Err(StoreError::AmbiguousRun {
                            prefix: id_or_prefix.to_owned(),
                            count,
                        });
                    }
                }
            }
            Err(StoreError::UnknownRun(id_or_prefix.to_owned()))
        })
    }
}
