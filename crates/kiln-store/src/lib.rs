//! Kiln's state database: flow runs, task runs, their state histories, dependency edges and
//! captured logs.
//!
//! The SDK writes through the [`Store`] trait; [`SqliteStore`] is the embedded backend (a
//! SQLite file in `$KILN_HOME`, nothing to start). Writes are queued and applied by one
//! background thread in batches (one transaction per batch: group commit), so recording a
//! state costs the caller a channel send; [`Store::flush`] waits until everything queued is
//! durable.
//!
//! ```
//! use kiln_store::{model::*, state::StateType, SqliteStore, Store};
//!
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
//! }))?;
//! let running = StateRecord {
//!     run_id: id,
//!     seq: 1,
//!     state: StateType::Running,
//!     message: None,
//!     attempt: 1,
//!     timestamp: now_micros(),
//!     result: None,
//! };
//! store.transition(RunKind::Flow, Some(StateType::Pending), running)?;
//! store.flush()?;
//! assert_eq!(store.flow_run(id)?.unwrap().state, StateType::Running);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod embedded;
mod error;
pub mod model;
pub mod state;

use std::fmt;

use uuid::Uuid;

pub use embedded::SqliteStore;
pub use error::StoreError;
use model::{Edge, FlowRun, LogRecord, RunKind, RunRef, StateRecord, TaskRun, Write};
use state::StateType;

/// A callback run once the writes queued before it are durable (or failed).
pub type FlushDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// An orchestrator backend's view of the state database.
///
/// Writes are asynchronous and ordered; reads see everything flushed before them.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Queues one write. Never blocks on the database.
    fn send(&self, write: Write) -> Result<(), StoreError>;

    /// Calls `done` once every write queued before this call is durable.
    fn flush_then(&self, done: FlushDone);

    /// Blocks until every write queued before this call is durable.
    fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.flush_then(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv()
            .map_err(|_| StoreError::WriterGone("no answer to a flush".into()))?
    }

    /// Checks a transition against the rules of [`state`] and queues it.
    fn transition(&self, kind: RunKind, from: Option<StateType>, to: StateRecord) -> Result<(), StoreError> {
        state::check_transition(from, to.state)?;
        self.send(Write::State { kind, record: to })
    }

    /// The newest flow runs first, at most `limit`.
    fn flow_runs(&self, limit: usize) -> Result<Vec<FlowRun>, StoreError>;
    /// One flow run.
    fn flow_run(&self, id: Uuid) -> Result<Option<FlowRun>, StoreError>;
    /// The flow runs started by `parent` (subflows), oldest first.
    fn subflow_runs(&self, parent: Uuid) -> Result<Vec<FlowRun>, StoreError>;
    /// The task runs of a flow run, oldest first.
    fn task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError>;
    /// One task run.
    fn task_run(&self, id: Uuid) -> Result<Option<TaskRun>, StoreError>;
    /// A run's state history, oldest first.
    fn states(&self, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError>;
    /// The dependency edges between task runs of a flow run.
    fn edges(&self, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError>;
    /// The logs of a run (for a flow run: its own and its task runs'), oldest first.
    fn logs(&self, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError>;
    /// Finds the run a full id or an unambiguous id prefix names.
    fn resolve(&self, id_or_prefix: &str) -> Result<RunRef, StoreError>;
}
