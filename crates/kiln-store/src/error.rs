use std::path::PathBuf;

use crate::state::StateType;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error(
        "cannot open the state database {path}: {source}; check that the folder exists and is writable, or set KILN_HOME to another folder"
    )]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer Kiln.
    #[error(
        "the state database {path} has schema version {found}, newer than this Kiln knows ({known}); upgrade Kiln or point KILN_HOME elsewhere"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A query or write failed.
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
    /// The background writer stopped (its thread panicked or the store was closed).
    #[error("the state store's writer has stopped; earlier writes may be lost: {0}")]
    WriterGone(String),
}

impl StoreError {
    /// Whether trying the same operation again may succeed (a busy or locked database).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}
