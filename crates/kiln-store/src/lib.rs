//! The contract of Kiln's state database: what every backend promises, and nothing that
//! names a driver.
//!
//! A backend records flow runs, task runs, their state histories, dependency edges and
//! logs behind the [`Store`] trait. `kiln-store-sqlite` is the embedded backend (a file in
//! `$KILN_HOME`, nothing to start); `kiln-store-postgres` serves many processes and
//! machines. Both pass the conformance suite exported here under the `suite` feature.
//!
//! What a backend promises:
//! - **The store decides state changes.** A [`StateChange`] names the state the caller
//!   believes the run is in; the store applies it only if that is the stored state and the
//!   one rule set of [`state`] allows the move, assigns its position in the history, and
//!   otherwise refuses it ([`Transition::Rejected`]). No caller can record a history the
//!   rules forbid, whatever it believes.
//! - **Writes are ordered and batched** (group commit), and **every write has an outcome**
//!   that reaches the [`Report`] it was sent with: applied, rejected, or failed after the
//!   backend's retries. A batch is applied whole or retried whole; nothing is dropped
//!   silently, and an error is reported to the run whose write it was, never to whichever
//!   flush comes next.
//! - **Reads are async** and see everything flushed before them.
//!
//! ```
//! use kiln_store::model::*;
//! use kiln_store::state::StateType;
//! use kiln_store::{Store, Transition};
//!
//! async fn start(store: &dyn Store, run: uuid::Uuid) -> Result<(), kiln_store::StoreError> {
//!     let change = StateChange {
//!         id: write_id(),
//!         kind: RunKind::Task,
//!         run_id: run,
//!         from: StateType::Pending,
//!         to: StateType::Running,
//!         message: None,
//!         attempt: 1,
//!         timestamp: now_micros(),
//!         result: None,
//!         fence: None,
//!     };
//!     match store.set_state(change).await? {
//!         Transition::Accepted { seq } => println!("running (history entry {seq})"),
//!         Transition::Rejected { current } => println!("not started: the run is {current:?}"),
//!     }
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]

mod error;
#[doc(hidden)]
pub mod history;
pub mod limit;
pub mod model;
pub mod queue;
pub mod state;
#[cfg(feature = "suite")]
pub mod suite;
pub mod work;

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use uuid::Uuid;

pub use error::{BoxError, StoreError};
use model::{
    ApiToken, Edge, FlowRun, FlowRunPage, LogFilter, LogPage, LogRecord, Micros, Process, RunCount, RunFilter, RunKind,
    RunRef, StateChange, StateRecord, TaskRun, TaskRunPage, Write,
};
pub use model::{Outcome, Transition};
use state::StateType;

/// The most ids one [`Store::task_runs_in`] or [`Store::holders`] looks up.
pub const MAX_LOOKUP: usize = 1000;

/// A callback run once the writes queued before it are applied (or reported failed).
pub type FlushDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Receives the outcome of each write sent with it.
///
/// The engine gives every write of a flow run the same reporter and fails the flow run
/// when one of them failed or was rejected; [`Store::set_state`] uses a one-shot reporter.
pub trait Report: Send + Sync + 'static {
    /// Called once per write, from the backend's writer, after the write's batch ended.
    /// Must be quick and must not block.
    fn report(&self, write: &Write, outcome: Outcome);
}

/// Where a write's outcome goes; `None`: failures are logged at error level.
pub type Reporter = Option<Arc<dyn Report>>;

/// Hands one write's outcome to whoever awaits it.
struct Once(Mutex<Option<futures::channel::oneshot::Sender<Outcome>>>);

impl Report for Once {
    fn report(&self, _write: &Write, outcome: Outcome) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(outcome);
        }
    }
}

/// An orchestrator backend's view of the state database.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Queues one write; its outcome goes to `reporter`. Never waits for the database
    /// (only for room in a bounded queue).
    fn send(&self, write: Write, reporter: Reporter) -> Result<(), StoreError>;

    /// Calls `done` once every write queued before this call has its outcome. `Ok` when
    /// they were processed (their own failures went to their reporters); `Err` when the
    /// store itself cannot go on.
    fn flush_then(&self, done: FlushDone);

    /// How many writes were sent and are not applied yet (a gauge for monitoring).
    fn pending_writes(&self) -> usize {
        0
    }

    /// Waits until every write queued before this call has its outcome.
    async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.flush_then(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await
            .map_err(|_| StoreError::WriterGone("no answer to a flush".into()))?
    }

    /// Changes a run's state if it is in `change.from` and the rules allow it, and says
    /// which happened.
    async fn set_state(&self, change: StateChange) -> Result<Transition, StoreError> {
        match self.write(Write::State(change)).await? {
            Outcome::Applied { seq } => Ok(Transition::Accepted { seq: seq.unwrap_or(0) }),
            Outcome::Rejected { current } => Ok(Transition::Rejected { current }),
            Outcome::Failed(e) => Err(StoreError::backend(e.clone(), e.is_retryable())),
        }
    }

    /// Sends one write and waits for its outcome.
    async fn write(&self, write: Write) -> Result<Outcome, StoreError> {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.send(write, Some(Arc::new(Once(Mutex::new(Some(tx))))))?;
        rx.await
            .map_err(|_| StoreError::WriterGone("the write was dropped without an outcome".into()))
    }

    /// The newest flow runs first, at most `limit`.
    async fn flow_runs(&self, limit: usize) -> Result<Vec<FlowRun>, StoreError> {
        Ok(self.list_flow_runs(&RunFilter::newest(limit)).await?.runs)
    }
    /// The flow runs `filter` selects, one page at a time (`parent`: subflows of that run).
    async fn list_flow_runs(&self, filter: &RunFilter) -> Result<FlowRunPage, StoreError>;
    /// The task runs `filter` selects, across flow runs, one page at a time (`parent`: the
    /// task runs of that flow run).
    async fn list_task_runs(&self, filter: &RunFilter) -> Result<TaskRunPage, StoreError>;
    /// One flow run.
    async fn flow_run(&self, id: Uuid) -> Result<Option<FlowRun>, StoreError>;
    /// The flow runs started by `parent` (subflows), oldest first.
    async fn subflow_runs(&self, parent: Uuid) -> Result<Vec<FlowRun>, StoreError>;
    /// The task runs of a flow run, oldest first.
    async fn task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError>;
    /// One task run.
    async fn task_run(&self, id: Uuid) -> Result<Option<TaskRun>, StoreError>;

    /// The task runs among `ids` (at most [`MAX_LOOKUP`]) that are in one of `states` (none:
    /// any state), in no particular order: how one watcher follows thousands of runs with
    /// one query.
    async fn task_runs_in(&self, ids: &[Uuid], states: &[StateType]) -> Result<Vec<TaskRun>, StoreError>;
    /// A run's state history, oldest first.
    async fn states(&self, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError>;
    /// The dependency edges between task runs of a flow run.
    async fn edges(&self, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError>;
    /// The logs of a run (for a flow run: its own and its task runs'), oldest first.
    async fn logs(&self, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError>;
    /// A page of a run's logs (as [`logs`](Self::logs)), at a level or more severe.
    async fn list_logs(&self, run_id: Uuid, filter: &LogFilter) -> Result<LogPage, StoreError>;
    /// Finds the run a full id or an unambiguous id prefix (or tail) names.
    async fn resolve(&self, id_or_prefix: &str) -> Result<RunRef, StoreError>;

    /// The processes that have unfinished runs, or heartbeated since `since`.
    async fn processes(&self, since: Micros) -> Result<Vec<Process>, StoreError>;

    /// Marks Crashed every unfinished run (Pending, Running, AwaitingRetry) of a process in
    /// `dead` or whose last heartbeat is older than `stale_before`, each through the same
    /// compare-and-set as any state change, with a message naming the process and why.
    ///
    /// Takes back the claims of those processes too: a claimed run that was Running goes to
    /// AwaitingRetry (queued again for another worker) while it has attempts left, else to
    /// Crashed; a Cancelling one to Cancelled; one not started yet is queued again as it is.
    /// Returns the runs whose state it changed.
    async fn crash_orphans(&self, dead: &[Uuid], stale_before: Micros) -> Result<Vec<(RunKind, Uuid)>, StoreError>;

    /// Claims up to `request.limit` queued runs of the pools it names for its process,
    /// oldest scheduled first, within the pools' and deployments' concurrency limits: each
    /// run to one claimer only, with a fresh fencing token. A claimed Scheduled run enters
    /// Pending. Waits up to `request.wait_ms` when none is claimable.
    ///
    /// An answer lost on its way (a dropped connection, a cancelled call) loses no run: a
    /// claim with [`resend`](work::ClaimRequest::resend) gets, besides new runs, the runs its
    /// process holds and has not started (Pending, AwaitingRetry), with the same token; a
    /// worker skips those it is running.
    async fn claim(&self, request: &work::ClaimRequest) -> Result<Vec<work::Claim>, StoreError>;

    /// The deployments, by name.
    async fn deployments(&self) -> Result<Vec<work::Deployment>, StoreError>;

    /// The work pools that have a limit, by name.
    async fn work_pools(&self) -> Result<Vec<work::WorkPool>, StoreError>;

    /// The runs queued in `pool` (every pool: `None`) that have not finished, oldest
    /// scheduled first, at most `limit`.
    async fn queued_runs(&self, pool: Option<&str>, limit: usize) -> Result<Vec<work::QueuedRun>, StoreError>;

    /// Who holds each of the queued runs among `ids` (at most [`MAX_LOOKUP`]), in no
    /// particular order; a run that is not queued (it finished) is left out. How a worker
    /// learns that a claim it still runs was taken over.
    async fn holders(&self, ids: &[Uuid]) -> Result<Vec<work::Holder>, StoreError>;

    /// Announcements of queued runs that left their queue (finished, cancelled, crashed
    /// without attempts left, deleted), each sent once what made it is committed: how a
    /// process that waits for runs on workers learns of their ends without looking every
    /// waiting run up again and again. `None` when this backend makes none: callers look
    /// their runs up on a timer. A receiver told [`Ended::Missed`](work::Ended::Missed), or
    /// that lags behind the channel, may have lost some and looks up all it waits for.
    fn ended_runs(&self) -> Option<tokio::sync::broadcast::Receiver<work::Ended>> {
        None
    }

    /// Grants `request.run_id` one slot of each of its limited tags, or none (see
    /// [`limit`]). Refused with [`StoreError::UnknownRun`] when the run is not recorded.
    async fn acquire_slots(&self, request: &limit::SlotRequest) -> Result<limit::Slots, StoreError>;

    /// Every concurrency limit, by tag, with the runs holding its slots.
    async fn limits(&self) -> Result<Vec<limit::LimitUsage>, StoreError>;

    /// How many flow runs and task runs are in each state (states with none left out).
    async fn run_counts(&self) -> Result<Vec<RunCount>, StoreError>;

    /// The Kiln server's API tokens (hashes only), revoked ones included.
    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
}

/// Logs a failed or rejected write that had no reporter: nothing fails silently.
pub fn log_unreported(write: &Write, outcome: &Outcome) {
    match outcome {
        Outcome::Applied { .. } => {}
        Outcome::Rejected { current } => {
            tracing::error!("the state store refused {write}: the run is {current:?}")
        }
        Outcome::Failed(e) => tracing::error!("the state store could not record {write}: {e}"),
    }
}

/// The hex digits of an id or id prefix the user typed (dashes removed, upper case), or
/// `None` when it cannot be part of an id.
pub fn id_hex(id_or_prefix: &str) -> Option<String> {
    let hex: String = id_or_prefix
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_ascii_uppercase();
    (!hex.is_empty() && hex.len() <= 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}
