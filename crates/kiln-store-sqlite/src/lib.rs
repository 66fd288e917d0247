//! Kiln's embedded state store: one SQLite file, written by one background thread.
//!
//! Writes are queued and applied in batches, one `BEGIN IMMEDIATE` transaction each (group
//! commit), so recording a state costs the caller a channel send. A batch is applied whole:
//! while another connection holds the database's write lock it is retried whole, with
//! backoff, for minutes; a write that cannot be applied on its own (a constraint) fails
//! alone; a database that cannot take writes at all (a full disk) fails the batch. Every
//! write's outcome goes to the reporter it was sent with. State changes are compare-and-set
//! on the run row's `(state, state_seq)` under the rules of `kiln_store::state`.
//!
//! ```
//! use kiln_store::model::*;
//! use kiln_store::state::StateType;
//! use kiln_store::{Store, Transition};
//! use kiln_store_sqlite::SqliteStore;
//!
//! # futures::executor::block_on(async {
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(dir.path().join("kiln.db"))?;
//! let id = uuid::Uuid::now_v7();
//! store.send(Write::FlowRun(NewFlowRun {
//!     id,
//!     name: "nightly".into(),
//!     parent_id: None,
//!     parameters: serde_json::json!({ "day": 3 }),
//!     tags: vec![],
//!     created: now_micros(),
//!     initial_state: StateType::Pending,
//!     command: None,
//!     retry_of: None,
//!     process_id: None,
//! }), None)?;
//! let running = StateChange {
//!     id: write_id(),
//!     kind: RunKind::Flow,
//!     run_id: id,
//!     from: StateType::Pending,
//!     to: StateType::Running,
//!     message: None,
//!     attempt: 1,
//!     timestamp: now_micros(),
//!     result: None,
//!     fence: None,
//! };
//! assert_eq!(store.set_state(running.clone()).await?, Transition::Accepted { seq: 1 });
//! // The same change delivered again (its answer was lost, say) is applied once.
//! assert_eq!(store.set_state(running.clone()).await?, Transition::Accepted { seq: 1 });
//! // Another change from Pending: the run is no longer Pending, so the store refuses it.
//! let late = StateChange { id: write_id(), ..running };
//! assert_eq!(
//!     store.set_state(late).await?,
//!     Transition::Rejected { current: Some(StateType::Running) }
//! );
//! assert_eq!(store.flow_run(id).await?.unwrap().state, StateType::Running);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
#![warn(missing_docs)]

mod checkpoint;
mod limit;
mod read;
mod work;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_store::limit::{LimitUsage, SlotRequest, Slots};
use kiln_store::model::*;
use kiln_store::queue::WriteQueue;
use kiln_store::state::StateType;
use kiln_store::work::{Claim, ClaimRequest, Deployment, Holder, QueuedRun, WorkPool};
use kiln_store::{FlushDone, Reporter, Store, StoreError};
use rusqlite::{Connection, ErrorCode, OpenFlags};
use uuid::Uuid;

use writer::{Job, MAX_BATCH, Reap, Writer};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_runs.sql"),
    include_str!("../migrations/0002_results.sql"),
    include_str!("../migrations/0003_state_seq.sql"),
    include_str!("../migrations/0004_processes.sql"),
    include_str!("../migrations/0005_api_tokens.sql"),
    include_str!("../migrations/0006_write_ids.sql"),
    include_str!("../migrations/0007_run_list_indexes.sql"),
    include_str!("../migrations/0008_work_pools.sql"),
    include_str!("../migrations/0009_concurrency_limits.sql"),
    include_str!("../migrations/0010_open_cancelling.sql"),
    include_str!("../migrations/0011_history_in_row.sql"),
    include_str!("../migrations/0012_open_without_in.sql"),
    include_str!("../migrations/0013_process_lease.sql"),
    include_str!("../migrations/0014_task_runs_rowid.sql"),
];

/// The condition of a run that has not ended, as the `*_open` indexes spell it (migration
/// 0012): a query that uses those indexes must say it the same way.
pub(crate) const OPEN: &str =
    "(state = 'Pending' OR state = 'Running' OR state = 'AwaitingRetry' OR state = 'Cancelling')";

/// Writes queued ahead of the writer at most. A producer faster than SQLite waits for room
/// (microseconds) instead of growing memory without bound: a flow of a million task runs
/// holds at most this many pending writes (a few MiB), not a million.
const QUEUE: usize = 4 * MAX_BATCH;

/// The longest a claim waits for work (its request may ask less).
const MAX_WAIT_MS: u64 = 60_000;

/// How often a waiting claim looks again for runs that other processes queued (they cannot
/// wake it) or that came due.
const POLL: Duration = Duration::from_millis(200);

/// The embedded state store: a SQLite database file written by one background thread.
///
/// Reads use their own connection on their own thread (WAL mode), so the CLI can read
/// while a flow writes, and an async caller never waits on SQLite.
pub struct SqliteStore {
    path: PathBuf,
    queue: WriteQueue<Job>,
    /// Copies the log into the database file beside the writer; ends after it.
    checkpointer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: read::Reader,
    /// Woken when this process queues a run or takes a claim back; claims by other
    /// processes on the same file are seen by polling (see `claim`).
    work: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

fn open_error(path: &Path, source: impl Into<kiln_store::BoxError>) -> StoreError {
    StoreError::Open {
        target: path.display().to_string(),
        source: source.into(),
        advice: "check that the folder exists and is writable, or set KILN_HOME to another folder",
    }
}

/// The ids of one lookup, refused beyond [`kiln_store::MAX_LOOKUP`].
fn lookup(ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
    if ids.len() > kiln_store::MAX_LOOKUP {
        return Err(StoreError::backend(
            format!("{} ids in one lookup; at most {}", ids.len(), kiln_store::MAX_LOOKUP),
            false,
        ));
    }
    Ok(ids.to_vec())
}

pub(crate) fn backend(e: rusqlite::Error) -> StoreError {
    let retryable = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    StoreError::backend(e, retryable)
}

impl SqliteStore {
    /// Opens (creating it and its folder if needed) the database at `path`, migrates it and
    /// starts its writer.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_error(&path, format!("{}: {e}", dir.display())))?;
        }
        let mut conn = connect(&path, OpenFlags::default())?;
        migrate(&mut conn, &path)?;
        Self::with_writer(path, conn)
    }

    /// The store over `conn` (migrated), with its writer and reader threads started.
    fn with_writer(path: PathBuf, mut conn: Connection) -> Result<Self, StoreError> {
        let name = path.display().to_string();
        let work = Arc::new(tokio::sync::Notify::new());
        let checkpointer = checkpoint::start(&path, &mut conn)?;
        let writer = Writer::new(conn, work.clone());
        let queue = WriteQueue::start(name, "kiln-store-writer", QUEUE, MAX_BATCH, writer)?;
        Ok(SqliteStore {
            reader: read::Reader::start(path.clone())?,
            path,
            queue,
            checkpointer: std::sync::Mutex::new(Some(checkpointer)),
            work,
        })
    }

    /// Opens an existing database for reading and writing without creating or migrating it
    /// (the CLI's view: it may mark the runs of dead processes Crashed): refused when the
    /// schema is not exactly this Kiln's.
    pub fn open_existing(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if !path.exists() {
            return Err(open_error(
                &path,
                "the file does not exist (no flow has run with this KILN_HOME yet)",
            ));
        }
        let conn = connect(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| open_error(&path, e))?;
        let known = MIGRATIONS.len() as i64;
        let target = path.display().to_string();
        match version.cmp(&known) {
            std::cmp::Ordering::Greater => {
                return Err(StoreError::TooNew {
                    target,
                    found: version,
                    known,
                });
            }
            std::cmp::Ordering::Less => {
                return Err(StoreError::TooOld {
                    target,
                    found: version,
                    known,
                });
            }
            std::cmp::Ordering::Equal => {}
        }
        Self::with_writer(path, conn)
    }

    /// Opens an existing database for reading only (the CLI's view of a home it cannot
    /// write): never creates a file, never migrates, and refuses every write.
    pub fn open_read_only(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if !path.exists() {
            return Err(open_error(
                &path,
                "the file does not exist (no flow has run with this KILN_HOME yet)",
            ));
        }
        let conn = connect_read_only(&path)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| open_error(&path, e))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                target: path.display().to_string(),
                found: version,
                known,
            });
        }
        Ok(SqliteStore {
            reader: read::Reader::start(path.clone())?,
            queue: WriteQueue::closed(path.display().to_string()),
            checkpointer: std::sync::Mutex::new(None),
            path,
            work: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies what is queued and stops the writer; later writes fail with
    /// [`StoreError::WriterGone`].
    pub fn close(&self) -> Result<(), StoreError> {
        let closed = self.queue.close();
        // The writer's connection is gone with its thread, and with it the checkpointer's signal.
        let checkpointer = self.checkpointer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = checkpointer {
            h.join()
                .map_err(|_| StoreError::WriterGone("the checkpoint thread panicked".into()))?;
        }
        closed
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A read-only connection. A WAL database on a read-only medium cannot create its
/// shared-memory file: it is then read as immutable (no locks; nobody can write it there).
pub(crate) fn connect_read_only(path: &Path) -> Result<Connection, StoreError> {
    let read_only = OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = connect(path, read_only)?;
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)) {
        Ok(_) => Ok(conn),
        Err(_) => {
            let uri = PathBuf::from(format!("file:{}?immutable=1", path.display()));
            connect(&uri, read_only | OpenFlags::SQLITE_OPEN_URI)
        }
    }
}

pub(crate) fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let open = |flags| -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The writer holds its 20-odd statements at once in every batch (`writer::Statements`):
        // with rusqlite's default room for 16, a few were compiled again every batch.
        conn.set_prepared_statement_cache_capacity(64);
        if !flags.contains(OpenFlags::SQLITE_OPEN_READ_ONLY) {
            // WAL: readers never block the writer; NORMAL: a commit survives a process crash.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        Ok(conn)
    };
    patiently(|| open(flags)).map_err(|e| open_error(path, e))
}

/// How long opening a database waits for other processes opening it at the same moment.
const OPEN_PATIENCE: Duration = Duration::from_secs(20);

/// `f`, tried again while SQLite answers busy. Its busy handler (`busy_timeout`) does not
/// cover every case: switching a new file to WAL while another process opens it too answers
/// busy at once (seen with twelve processes starting on one new home).
fn patiently<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                    && started.elapsed() < OPEN_PATIENCE =>
            {
                // Apart in time, so that the processes do not collide again in step.
                let jitter = Duration::from_micros(u64::from(std::process::id() % 97) * 100);
                std::thread::sleep(delay + jitter);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    // The version found, applied up to `known` unless it is newer.
    let found = patiently(|| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > known {
            return Ok(version);
        }
        for sql in &MIGRATIONS[version as usize..] {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", known)?;
        tx.commit()?;
        Ok(version)
    })
    .map_err(|e| open_error(path, e))?;
    if found > known {
        return Err(StoreError::TooNew {
            target: path.display().to_string(),
            found,
            known,
        });
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn send(&self, write: Write, reporter: Reporter) -> Result<(), StoreError> {
        self.queue.send(write, reporter)
    }

    fn flush_then(&self, done: FlushDone) {
        self.queue.flush_then(done);
    }

    fn pending_writes(&self) -> usize {
        self.queue.pending()
    }

    async fn list_flow_runs(&self, filter: &RunFilter) -> Result<FlowRunPage, StoreError> {
        let filter = filter.clone();
        self.reader.run(move |c| read::list_flow_runs(c, &filter)).await
    }

    async fn list_task_runs(&self, filter: &RunFilter) -> Result<TaskRunPage, StoreError> {
        let filter = filter.clone();
        self.reader.run(move |c| read::list_task_runs(c, &filter)).await
    }

    async fn run_counts(&self) -> Result<Vec<RunCount>, StoreError> {
        self.reader.run(read::run_counts).await
    }

    async fn list_logs(&self, run_id: Uuid, filter: &LogFilter) -> Result<LogPage, StoreError> {
        let filter = filter.clone();
        self.reader.run(move |c| read::list_logs(c, run_id, &filter)).await
    }

    async fn flow_run(&self, id: Uuid) -> Result<Option<FlowRun>, StoreError> {
        self.reader.run(move |c| read::flow_run(c, id)).await
    }

    async fn subflow_runs(&self, parent: Uuid) -> Result<Vec<FlowRun>, StoreError> {
        self.reader.run(move |c| read::subflow_runs(c, parent)).await
    }

    async fn task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError> {
        self.reader.run(move |c| read::task_runs(c, flow_run_id)).await
    }

    async fn task_run(&self, id: Uuid) -> Result<Option<TaskRun>, StoreError> {
        self.reader.run(move |c| read::task_run(c, id)).await
    }

    async fn task_runs_in(&self, ids: &[Uuid], states: &[StateType]) -> Result<Vec<TaskRun>, StoreError> {
        let (ids, states) = (lookup(ids)?, states.to_vec());
        self.reader.run(move |c| read::task_runs_in(c, &ids, &states)).await
    }

    async fn states(&self, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError> {
        self.reader.run(move |c| read::states(c, run_id)).await
    }

    async fn edges(&self, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError> {
        self.reader.run(move |c| read::edges(c, flow_run_id)).await
    }

    async fn logs(&self, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError> {
        self.reader.run(move |c| read::logs(c, run_id)).await
    }

    async fn resolve(&self, id_or_prefix: &str) -> Result<RunRef, StoreError> {
        let text = id_or_prefix.to_owned();
        self.reader.run(move |c| read::resolve(c, &text)).await
    }

    async fn processes(&self, since: Micros) -> Result<Vec<Process>, StoreError> {
        self.reader.run(move |c| read::processes(c, since)).await
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.reader.run(read::api_tokens).await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Claim>, StoreError> {
        let deadline = Instant::now() + Duration::from_millis(request.wait_ms.min(MAX_WAIT_MS));
        loop {
            // Registered before the claim: a run queued meanwhile wakes the wait below.
            let queued = self.work.notified();
            let (reply, answer) = futures::channel::oneshot::channel();
            self.queue.send_other(Job::Claim(work::ClaimJob {
                request: request.clone(),
                reply,
            }))?;
            let claims = answer
                .await
                .map_err(|_| StoreError::WriterGone("the writer dropped a claim".into()))??;
            let left = deadline.saturating_duration_since(Instant::now());
            if !claims.is_empty() || left.is_zero() || tokio::runtime::Handle::try_current().is_err() {
                return Ok(claims);
            }
            // Other processes on this file queue runs too, and scheduled runs come due:
            // look again after a short while even without a wake-up.
            let _ = tokio::time::timeout(left.min(POLL), queued).await;
        }
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        self.reader.run(work::deployments).await
    }

    async fn acquire_slots(&self, request: &SlotRequest) -> Result<Slots, StoreError> {
        let (reply, answer) = futures::channel::oneshot::channel();
        self.queue.send_other(Job::Acquire(limit::AcquireJob {
            request: request.clone(),
            reply,
        }))?;
        answer
            .await
            .map_err(|_| StoreError::WriterGone("the writer dropped a slot request".into()))?
    }

    async fn limits(&self) -> Result<Vec<LimitUsage>, StoreError> {
        self.reader.run(limit::limits).await
    }

    async fn work_pools(&self) -> Result<Vec<WorkPool>, StoreError> {
        self.reader.run(work::work_pools).await
    }

    async fn queued_runs(&self, pool: Option<&str>, limit: usize) -> Result<Vec<QueuedRun>, StoreError> {
        let pool = pool.map(str::to_owned);
        self.reader
            .run(move |c| work::queued_runs(c, pool.as_deref(), limit))
            .await
    }

    async fn holders(&self, ids: &[Uuid]) -> Result<Vec<Holder>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        self.reader.run(move |c| work::holders(c, &ids)).await
    }

    async fn crash_orphans(&self, dead: &[Uuid], stale_before: Micros) -> Result<Vec<(RunKind, Uuid)>, StoreError> {
        let (reply, answer) = futures::channel::oneshot::channel();
        self.queue.send_other(Job::Reap(Reap {
            dead: dead.to_vec(),
            stale_before,
            reply,
        }))?;
        answer
            .await
            .map_err(|_| StoreError::WriterGone("the writer dropped a reap".into()))?
    }
}
