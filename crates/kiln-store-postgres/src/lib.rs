//! Kiln's state store on PostgreSQL: many processes, and many machines, on one database.
//!
//! The same contract as the embedded store (`kiln_store`): writes are queued and applied in
//! batches, one transaction each, with multi-row statements (`UNNEST` of arrays), so a batch
//! of thousands of writes costs about ten round trips; state changes are compare-and-set on
//! rows locked with `SELECT ... FOR UPDATE`, so concurrent processes cannot both move a run;
//! a batch is retried whole while the database is unreachable or busy (serialization
//! failures, deadlocks, too many connections) and every write's outcome goes to its
//! reporter.
//!
//! The store runs its own small tokio runtime, so it works from any caller: async code of
//! any runtime, synchronous code, the CLI.
//!
//! ```no_run
//! use kiln_store::Store;
//! use kiln_store_postgres::PostgresStore;
//!
//! let store = PostgresStore::open("postgres://kiln@db.internal/kiln")?;
//! let recent = futures::executor::block_on(store.flow_runs(20))?;
//! # Ok::<_, kiln_store::StoreError>(())
//! ```
#![warn(missing_docs)]

mod limit;
mod read;
#[cfg(feature = "testing")]
pub mod testing;
mod work;
mod writer;

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use kiln_store::limit::{LimitUsage, SlotRequest, Slots};
use kiln_store::model::*;
use kiln_store::queue::WriteQueue;
use kiln_store::state::StateType;
use kiln_store::work::{Claim, ClaimRequest, Deployment, Holder, QueuedRun, WorkPool};
use kiln_store::{FlushDone, Reporter, Store, StoreError};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// Schema migrations, applied in order; the table `kiln_schema` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_runs.sql"),
    include_str!("../migrations/0002_processes.sql"),
    include_str!("../migrations/0003_api_tokens.sql"),
    include_str!("../migrations/0004_write_ids.sql"),
    include_str!("../migrations/0005_run_list_indexes.sql"),
    include_str!("../migrations/0006_work_pools.sql"),
    include_str!("../migrations/0007_concurrency_limits.sql"),
    include_str!("../migrations/0008_claim_cost.sql"),
    include_str!("../migrations/0009_open_cancelling.sql"),
    include_str!("../migrations/0010_ended_notify.sql"),
    include_str!("../migrations/0011_history_in_row.sql"),
    include_str!("../migrations/0012_process_lease.sql"),
];

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;

/// Writes queued ahead of the writer at most (backpressure, as in the embedded store).
const QUEUE: usize = 4 * MAX_BATCH;

/// How long PostgreSQL lets one of the store's sessions sit idle inside a transaction before
/// it ends the session, rolling the transaction back: only a stopped process does that, and
/// its row locks would otherwise hold up every other process until it woke.
pub(crate) const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// A key for the advisory lock that serialises migrations between processes.
const MIGRATION_LOCK: i64 = 0x6b69_6c6e_7363_6d61; // "kilnscma"

/// The state store on a PostgreSQL database.
pub struct PostgresStore {
    target: String,
    queue: WriteQueue,
    pool: Pool,
    listener: std::sync::Arc<work::Listener>,
    rt: Rt,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("database", &self.target).finish()
    }
}

/// The URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A database error, or a connection the pool could not give.
#[derive(Debug)]
pub(crate) enum DbError {
    Pg(tokio_postgres::Error),
    Pool(deadpool_postgres::PoolError),
    Data(String),
    /// A claim from a process with no heartbeat recorded.
    UnknownProcess(Uuid),
    /// A slot request for a run the store has no record of.
    UnknownRun(Uuid),
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The server's message, with its detail, rather than "db error".
            DbError::Pg(e) => match e.as_db_error() {
                Some(db) => write!(f, "{}: {}", db.severity(), db.message()),
                None => write!(f, "{e}"),
            },
            DbError::Pool(e) => write!(f, "{e}"),
            DbError::Data(m) => f.write_str(m),
            DbError::UnknownProcess(id) => write!(f, "{}", StoreError::UnknownProcess(*id)),
            DbError::UnknownRun(id) => write!(f, "{}", StoreError::UnknownRun(id.to_string())),
        }
    }
}

impl std::error::Error for DbError {}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Pg(e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e)
    }
}

pub(crate) fn backend(e: impl Into<DbError>) -> StoreError {
    let e = e.into();
    match e {
        DbError::UnknownProcess(id) => return StoreError::UnknownProcess(id),
        DbError::UnknownRun(id) => return StoreError::UnknownRun(id.to_string()),
        _ => {}
    }
    let retryable = writer::is_transient(&e);
    StoreError::backend(e, retryable)
}

impl PostgresStore {
    /// Connects to the database at `url`, migrates it and starts the writer. Fails within
    /// seconds, naming the database, when it cannot be reached.
    pub fn open(url: &str) -> Result<PostgresStore, StoreError> {
        Self::connect(url, true)
    }

    /// Connects without migrating (the CLI's view): refused when the schema is not exactly
    /// this Kiln's.
    pub fn open_existing(url: &str) -> Result<PostgresStore, StoreError> {
        Self::connect(url, false)
    }

    fn connect(url: &str, migrate_it: bool) -> Result<PostgresStore, StoreError> {
        let target = redact(url);
        let open_error = |e: DbError| StoreError::Open {
            target: target.clone(),
            source: Box::new(e),
            advice: "check that PostgreSQL runs at this address and accepts this user (KILN_DATABASE_URL)",
        };
        let rt = Rt(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kiln-store-postgres")
                .enable_all()
                .build()
                .map_err(|e| StoreError::WriterGone(format!("cannot start the store's runtime: {e}")))?,
        ));
        let config: tokio_postgres::Config = url.parse().map_err(|e| open_error(DbError::Pg(e)))?;
        let mut config = config;
        config.connect_timeout(Duration::from_secs(5));
        // No JIT: it compiles any query the planner costs high (a list of runs whose task
        // counts it overestimates), 5-30 ms each time, for queries that take 1 ms without.
        // A session idle inside a transaction belongs to a process that stopped (SIGSTOP, a
        // lost network) between two statements; PostgreSQL ends it, so that its row locks do
        // not hold up the other processes. Kiln's transactions never wait on their client.
        let mut options = config.get_options().unwrap_or_default().to_owned();
        options.push_str(" -c jit=off");
        if !options.contains("idle_in_transaction_session_timeout") {
            let ms = IDLE_IN_TRANSACTION.as_millis();
            options.push_str(&format!(" -c idle_in_transaction_session_timeout={ms}"));
        }
        config.options(&options);
        let listener = std::sync::Arc::new(work::Listener::new(config.clone()));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| open_error(DbError::Data(e.to_string())))?;
        // Connected and migrated on the store's runtime; the caller may be inside another one.
        let migrated = {
            let pool = pool.clone();
            let target = target.clone();
            run_on(rt.get(), async move { migrate(&pool, &target, migrate_it).await })
        };
        migrated?;
        let writer = writer::Writer {
            pool: pool.clone(),
            rt: rt.get().handle().clone(),
        };
        let queue = WriteQueue::start(target.clone(), "kiln-store-pg-writer", QUEUE, MAX_BATCH, writer)?;
        Ok(PostgresStore {
            target,
            queue,
            pool,
            listener,
            rt,
        })
    }

    /// Applies what is queued and stops the writer; later writes fail.
    pub fn close(&self) -> Result<(), StoreError> {
        self.queue.close()
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.rt
            .get()
            .spawn(query)
            .await
            .map_err(|e| StoreError::WriterGone(format!("a read was cancelled: {e}")))?
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The store's own runtime, shut down without blocking when dropped: the store may be
/// dropped (or fail to open) inside another runtime's async context.
struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives until the store is dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `rt` from any thread (even one inside another runtime) and waits for it.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the store's runtime ran the task")
}

async fn migrate(pool: &Pool, target: &str, migrate_it: bool) -> Result<(), StoreError> {
    let fail = |e: DbError| StoreError::Open {
        target: target.to_owned(),
        source: Box::new(e),
        advice: "check that PostgreSQL runs at this address, accepts this user, and lets it create tables (KILN_DATABASE_URL)",
    };
    let known = MIGRATIONS.len() as i64;
    let mut client = pool.get().await.map_err(|e| fail(e.into()))?;
    let tx = client.transaction().await.map_err(|e| fail(e.into()))?;
    let run = |e: tokio_postgres::Error| fail(e.into());
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(run)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS kiln_schema (version BIGINT NOT NULL)")
        .await
        .map_err(run)?;
    let version: Option<i64> = tx
        .query_one("SELECT max(version) FROM kiln_schema", &[])
        .await
        .map_err(run)?
        .get(0);
    let version = version.unwrap_or(0);
    if version > known {
        return Err(StoreError::TooNew {
            target: target.to_owned(),
            found: version,
            known,
        });
    }
    if version < known && !migrate_it {
        return Err(StoreError::TooOld {
            target: target.to_owned(),
            found: version,
            known,
        });
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.batch_execute(sql).await.map_err(run)?;
    }
    if version < known {
        tx.execute("DELETE FROM kiln_schema", &[]).await.map_err(run)?;
        tx.execute("INSERT INTO kiln_schema (version) VALUES ($1)", &[&known])
            .await
            .map_err(run)?;
    }
    tx.commit().await.map_err(run)?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
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
        let (pool, filter) = (self.pool.clone(), filter.clone());
        self.read(async move { read::list_flow_runs(&pool, &filter).await })
            .await
    }

    async fn flow_run(&self, id: Uuid) -> Result<Option<FlowRun>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::flow_run(&pool, id).await }).await
    }

    async fn subflow_runs(&self, parent: Uuid) -> Result<Vec<FlowRun>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::subflow_runs(&pool, parent).await }).await
    }

    async fn list_task_runs(&self, filter: &RunFilter) -> Result<TaskRunPage, StoreError> {
        let (pool, filter) = (self.pool.clone(), filter.clone());
        self.read(async move { read::list_task_runs(&pool, &filter).await })
            .await
    }

    async fn run_counts(&self) -> Result<Vec<RunCount>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::run_counts(&pool).await }).await
    }

    async fn list_logs(&self, run_id: Uuid, filter: &LogFilter) -> Result<LogPage, StoreError> {
        let (pool, filter) = (self.pool.clone(), filter.clone());
        self.read(async move { read::list_logs(&pool, run_id, &filter).await })
            .await
    }

    async fn task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::task_runs(&pool, flow_run_id).await })
            .await
    }

    async fn task_run(&self, id: Uuid) -> Result<Option<TaskRun>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::task_run(&pool, id).await }).await
    }

    async fn task_runs_in(&self, ids: &[Uuid], states: &[StateType]) -> Result<Vec<TaskRun>, StoreError> {
        if ids.len() > kiln_store::MAX_LOOKUP {
            return Err(StoreError::backend(
                format!("{} ids in one lookup; at most {}", ids.len(), kiln_store::MAX_LOOKUP),
                false,
            ));
        }
        let (pool, ids, states) = (self.pool.clone(), ids.to_vec(), states.to_vec());
        self.read(async move { read::task_runs_in(&pool, &ids, &states).await })
            .await
    }

    async fn states(&self, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::states(&pool, run_id).await }).await
    }

    async fn edges(&self, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::edges(&pool, flow_run_id).await }).await
    }

    async fn logs(&self, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::logs(&pool, run_id).await }).await
    }

    async fn resolve(&self, id_or_prefix: &str) -> Result<RunRef, StoreError> {
        let (pool, text) = (self.pool.clone(), id_or_prefix.to_owned());
        self.read(async move { read::resolve(&pool, &text).await }).await
    }

    async fn processes(&self, since: Micros) -> Result<Vec<Process>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::processes(&pool, since).await }).await
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { read::api_tokens(&pool).await }).await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Claim>, StoreError> {
        let (pool, listener, request) = (self.pool.clone(), self.listener.clone(), request.clone());
        self.read(async move { work::claim(&pool, &listener, &request).await.map_err(backend) })
            .await
    }

    async fn acquire_slots(&self, request: &SlotRequest) -> Result<Slots, StoreError> {
        let (pool, request) = (self.pool.clone(), request.clone());
        self.read(async move { limit::acquire(&pool, &request).await.map_err(backend) })
            .await
    }

    async fn limits(&self) -> Result<Vec<LimitUsage>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { limit::limits(&pool).await.map_err(backend) })
            .await
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { work::deployments(&pool).await.map_err(backend) })
            .await
    }

    async fn work_pools(&self) -> Result<Vec<WorkPool>, StoreError> {
        let pool = self.pool.clone();
        self.read(async move { work::work_pools(&pool).await.map_err(backend) })
            .await
    }

    async fn queued_runs(&self, name: Option<&str>, limit: usize) -> Result<Vec<QueuedRun>, StoreError> {
        let (pool, name) = (self.pool.clone(), name.map(str::to_owned));
        self.read(async move { work::queued_runs(&pool, name, limit).await.map_err(backend) })
            .await
    }

    async fn holders(&self, ids: &[Uuid]) -> Result<Vec<Holder>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (pool, ids) = (self.pool.clone(), ids.to_vec());
        self.read(async move { work::holders(&pool, &ids).await.map_err(backend) })
            .await
    }

    fn ended_runs(&self) -> Option<tokio::sync::broadcast::Receiver<kiln_store::work::Ended>> {
        Some(self.listener.subscribe(self.rt.get().handle()))
    }

    async fn crash_orphans(&self, dead: &[Uuid], stale_before: Micros) -> Result<Vec<(RunKind, Uuid)>, StoreError> {
        let (pool, dead) = (self.pool.clone(), dead.to_vec());
        // Straight to the database: the compare-and-set on locked rows orders it with the
        // writer's batches.
        self.read(async move { writer::reap(&pool, &dead, stale_before).await.map_err(backend) })
            .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            super::redact("postgres://kiln:s3cret@db:5432/kiln"),
            "postgres://kiln:***@db:5432/kiln"
        );
        assert_eq!(super::redact("postgres://kiln@db/kiln"), "postgres://kiln@db/kiln");
        assert_eq!(super::redact("postgres://db/kiln"), "postgres://db/kiln");
    }
}
