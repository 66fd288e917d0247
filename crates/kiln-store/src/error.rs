use crate::state::StateType;

/// The error a backend hands up: its own type, boxed, so this crate names no driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the state store, whichever backend raised them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened, created or reached.
    #[error("cannot open the state database {target}: {source}; {advice}")]
    Open {
        /// The database (a file path, or a URL without its password).
        target: String,
        /// What the backend said.
        #[source]
        source: BoxError,
        /// What to check.
        advice: &'static str,
    },
    /// The database was written by a newer Kiln.
    #[error(
        "the state database {target} has schema version {found}, newer than this Kiln knows ({known}); upgrade Kiln, or point KILN_HOME / KILN_DATABASE_URL elsewhere"
    )]
    TooNew {
        /// The database.
        target: String,
        /// The version found in it.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The database is older than this Kiln and was opened read-only, so it cannot be migrated.
    #[error(
        "the state database {target} has schema version {found}, older than this Kiln's ({known}); run any flow with this home (or `kiln` commands that write) to upgrade it"
    )]
    TooOld {
        /// The database.
        target: String,
        /// The version found in it.
        found: i64,
        /// The version this build writes.
        known: i64,
    },
    /// A query or write failed in the backend.
    #[error("state database: {source}")]
    Backend {
        /// What the backend said.
        #[source]
        source: BoxError,
        /// Whether the same operation may succeed later (a busy database, a lost connection).
        retryable: bool,
    },
    /// A transition that the state rules forbid.
    #[error("illegal state transition {} -> {to}; {}", from.map_or("(new run)", StateType::as_str), if from.is_some_and(StateType::is_terminal) { "a run in a final state cannot change, start a new run instead" } else { "this is a bug in the caller of the store" })]
    IllegalTransition {
        /// The current state (`None`: the run is new).
        from: Option<StateType>,
        /// The refused state.
        to: StateType,
    },
    /// No run matches the id the user gave.
    #[error("no flow run or task run with id '{0}'; list runs with `kiln runs ls`")]
    UnknownRun(String),
    /// A partial id matches more than one run.
    #[error("id '{prefix}' matches {count} runs; give the full id (see `kiln runs ls` and `kiln runs show`)")]
    AmbiguousRun {
        /// What the user typed.
        prefix: String,
        /// How many runs start with it.
        count: usize,
    },
    /// A stored value could not be read back.
    #[error("the state database holds a value this Kiln cannot read: {0}")]
    Corrupt(String),
    /// The store was opened read-only.
    #[error("the state database {0} was opened read-only; writes are refused")]
    ReadOnly(String),
    /// A claim from a process the store has no record of: a claimer heartbeats first, so
    /// that its claims are taken back if it stops.
    #[error(
        "process {0} is not recorded: a claimer sends a heartbeat (Write::Heartbeat) before it claims, so that its claims are taken back if it stops"
    )]
    UnknownProcess(uuid::Uuid),
    /// The background writer stopped (its thread panicked or the store was closed).
    #[error("the state store's writer has stopped; writes after it are not recorded: {0}")]
    WriterGone(String),
}

impl StoreError {
    /// Whether trying the same operation again may succeed (a busy or locked database).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Backend { retryable: true, .. })
    }

    /// What went wrong, without the "state database:" a backend's error starts with: for a
    /// write the backend refused with a reason meant for the user ("there is no deployment
    /// named ...").
    pub fn reason(&self) -> String {
        match self {
            StoreError::Backend { source, .. } => source.to_string(),
            other => other.to_string(),
        }
    }

    /// A backend error (`retryable` says whether trying again may help).
    pub fn backend(source: impl Into<BoxError>, retryable: bool) -> StoreError {
        StoreError::Backend {
            source: source.into(),
            retryable,
        }
    }
}
