use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kiln_store::StoreError;
use kiln_store::model::RunKind;
use uuid::Uuid;

/// Names a run in messages: `task run 'make_image' (0193…)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLabel {
    /// Flow run or task run.
    pub kind: RunKind,
    /// The task's or flow's name.
    pub name: Arc<str>,
    /// The run's id.
    pub id: Uuid,
}

impl fmt::Display for RunLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RunKind::Flow => "flow run",
            RunKind::Task => "task run",
        };
        write!(f, "{kind} '{}' ({})", self.name, self.id)
    }
}

/// Errors of Kiln's engine.
///
/// A task that returns `Result<T, E>` gives its own `E` back to its caller when its body
/// fails; this type describes everything else (timeouts, panics, cancellation, upstream
/// failures, the state store). `E` must therefore implement `From<kiln::Error>`, which
/// `anyhow::Error` and `Box<dyn Error + Send + Sync>` do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The run's body returned an error on its last attempt.
    #[error("{run} failed after {attempts} attempt(s): {message}")]
    Failed {
        /// The run.
        run: RunLabel,
        /// How many attempts ran.
        attempts: u32,
        /// The body's error with its chain of causes.
        message: String,
    },
    /// The run's body ran longer than its `timeout` on its last attempt.
    #[error("{run} timed out after {after:?}; raise its `timeout` option if it needs longer")]
    TimedOut {
        /// The run.
        run: RunLabel,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The run's body panicked.
    #[error("{run} crashed: its body panicked: {message}")]
    Crashed {
        /// The run.
        run: RunLabel,
        /// The panic message.
        message: String,
    },
    /// The run was stopped before it finished.
    #[error("{run} was cancelled: {reason}")]
    Cancelled {
        /// The run.
        run: RunLabel,
        /// Why.
        reason: String,
    },
    /// A task run could not start because a run it takes input from did not complete.
    #[error("{run} did not start: its input from {upstream} did not complete")]
    UpstreamFailed {
        /// The run that did not start.
        run: RunLabel,
        /// The upstream run.
        upstream: RunLabel,
        /// What happened upstream.
        #[source]
        cause: Box<Error>,
    },
    /// A transaction rolled back although its body returned `Ok`: a task run inside it
    /// failed (and the body handled the error), or its commit failed.
    #[error("transaction {transaction} rolled back: {cause}; nothing it staged was committed")]
    RolledBack {
        /// The transaction's id.
        transaction: Uuid,
        /// Why.
        cause: String,
    },
    /// The run finished, but the state database refused or could not record some of its
    /// writes (a full disk, a locked database, another process that changed the run).
    #[error(
        "{run} ran, but the state database did not record all of it ({total} write(s)): {}; its recorded history is incomplete, check the database (disk space, locks, KILN_DATABASE_URL) and run it again",
        problems.first().map_or("", String::as_str)
    )]
    NotRecorded {
        /// The run (a flow run: its own writes and its task runs').
        run: RunLabel,
        /// What went wrong, one line per write (the first ones).
        problems: Vec<String>,
        /// How many writes went wrong.
        total: usize,
    },
    /// The state store failed.
    #[error("state store: {0}")]
    Store(Arc<StoreError>),
    /// Persisting or loading a result failed.
    #[error("{0}")]
    Result(Arc<crate::result::ResultError>),
    /// Kiln is not set up to run here (no state directory, no async runtime, ...).
    #[error("{0}")]
    Setup(String),
    /// What was asked for does not exist (a deployment, a run); the message names it.
    #[error("{0}")]
    NotFound(String),
    /// A run's parameters do not fit its flow; the message names the parameter.
    #[error("{0}")]
    InvalidParameters(String),
}

impl Error {
    /// Whether the same run may succeed when tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Failed { .. } | Error::TimedOut { .. } | Error::Crashed { .. } => true,
            Error::Store(e) => e.is_retryable(),
            Error::Result(e) => e.is_retryable(),
            Error::RolledBack { .. } | Error::NotRecorded { .. } => true,
            Error::Cancelled { .. }
            | Error::UpstreamFailed { .. }
            | Error::Setup(_)
            | Error::NotFound(_)
            | Error::InvalidParameters(_) => false,
        }
    }

    /// The run this error is about, if it is about one.
    pub fn run(&self) -> Option<&RunLabel> {
        match self {
            Error::Failed { run, .. }
            | Error::TimedOut { run, .. }
            | Error::Crashed { run, .. }
            | Error::Cancelled { run, .. }
            | Error::UpstreamFailed { run, .. }
            | Error::NotRecorded { run, .. } => Some(run),
            Error::RolledBack { .. }
            | Error::Store(_)
            | Error::Result(_)
            | Error::Setup(_)
            | Error::NotFound(_)
            | Error::InvalidParameters(_) => None,
        }
    }
}

impl From<crate::result::ResultError> for Error {
    fn from(e: crate::result::ResultError) -> Self {
        Error::Result(Arc::new(e))
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(Arc::new(e))
    }
}
