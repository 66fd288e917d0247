//! Run states and the one rule set that says which transitions are legal.
//!
//! Both orchestrator backends (the embedded store and, later, the server) check every
//! transition with [`check_transition`], so a run's history can be trusted whichever
//! backend recorded it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::StoreError;

/// The state a flow run or task run is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub enum StateType {
    /// Created, waiting for its start time.
    Scheduled,
    /// Created and about to run (waiting for inputs or a slot).
    Pending,
    /// The body is executing.
    Running,
    /// An attempt failed and another one will follow after the retry delay.
    AwaitingRetry,
    /// A user asked to cancel it while it ran; its worker is stopping it.
    Cancelling,
    /// Finished successfully.
    Completed,
    /// Finished without running: the result came from the cache.
    Cached,
    /// The body returned an error (after all retries).
    Failed,
    /// The body panicked or the process running it died.
    Crashed,
    /// Stopped before finishing, by a user or because its parent ended.
    Cancelled,
    /// The body ran longer than its timeout.
    TimedOut,
    /// The body succeeded inside a transaction that then rolled back: its result was discarded.
    RolledBack,
}

/// The final states (those [`StateType::is_terminal`] holds for).
pub const FINAL: [StateType; 7] = [
    StateType::Completed,
    StateType::Cached,
    StateType::Failed,
    StateType::Crashed,
    StateType::Cancelled,
    StateType::TimedOut,
    StateType::RolledBack,
];

/// [`FINAL`] as an SQL list, for `state IN (...)` in either backend's queries.
pub const FINAL_SQL: &str = "('Completed', 'Cached', 'Failed', 'Crashed', 'Cancelled', 'TimedOut', 'RolledBack')";

impl StateType {
    /// Every state, in lifecycle order.
    pub const ALL: [StateType; 12] = [
        StateType::Scheduled,
        StateType::Pending,
        StateType::Running,
        StateType::AwaitingRetry,
        StateType::Cancelling,
        StateType::Completed,
        StateType::Cached,
        StateType::Failed,
        StateType::Crashed,
        StateType::Cancelled,
        StateType::TimedOut,
        StateType::RolledBack,
    ];

    /// The name stored in the database and shown by the CLI.
    pub const fn as_str(self) -> &'static str {
        match self {
            StateType::Scheduled => "Scheduled",
            StateType::Pending => "Pending",
            StateType::Running => "Running",
            StateType::AwaitingRetry => "AwaitingRetry",
            StateType::Cancelling => "Cancelling",
            StateType::Completed => "Completed",
            StateType::Cached => "Cached",
            StateType::Failed => "Failed",
            StateType::Crashed => "Crashed",
            StateType::Cancelled => "Cancelled",
            StateType::TimedOut => "TimedOut",
            StateType::RolledBack => "RolledBack",
        }
    }

    /// A final state: nothing follows it.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            StateType::Completed
                | StateType::Cached
                | StateType::Failed
                | StateType::Crashed
                | StateType::Cancelled
                | StateType::TimedOut
                | StateType::RolledBack
        )
    }

    /// A final state that produced a value.
    pub const fn is_success(self) -> bool {
        matches!(self, StateType::Completed | StateType::Cached)
    }
}

impl fmt::Display for StateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StateType {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StateType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown state type '{s}'")))
    }
}

/// Whether a run may move from `from` (`None`: the run is new) to `to`.
pub const fn is_legal(from: Option<StateType>, to: StateType) -> bool {
    use StateType::*;
    match from {
        None => matches!(to, Scheduled | Pending),
        Some(Scheduled) => matches!(to, Pending | Cancelled),
        Some(Pending) => matches!(to, Running | Cached | Failed | Crashed | Cancelled),
        // A task run in a transaction stays Running until the transaction ends.
        Some(Running) => matches!(
            to,
            Completed | Failed | Crashed | Cancelled | TimedOut | AwaitingRetry | RolledBack | Cancelling
        ),
        // The worker stops it, or dies first.
        Some(Cancelling) => matches!(to, Cancelled | Crashed),
        Some(AwaitingRetry) => matches!(to, Running | Cancelled | Crashed),
        // Terminal states end a run; a retry of the whole run starts a new attempt.
        Some(Completed | Cached | Failed | Crashed | Cancelled | TimedOut | RolledBack) => false,
    }
}

/// Refuses an illegal transition with an error that names both states.
pub fn check_transition(from: Option<StateType>, to: StateType) -> Result<(), StoreError> {
    if is_legal(from, to) {
        Ok(())
    } else {
        Err(StoreError::IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_sql_list_of_final_states_is_final() {
        let listed: Vec<String> = FINAL.iter().map(|s| format!("'{}'", s.as_str())).collect();
        assert_eq!(FINAL_SQL, format!("({})", listed.join(", ")));
    }

    use super::*;
    use StateType::*;

    #[test]
    fn lifecycle_paths_are_legal() {
        let paths: &[&[StateType]] = &[
            &[Pending, Running, Completed],
            &[Scheduled, Pending, Running, AwaitingRetry, Running, Failed],
            &[Pending, Cached],
            &[Pending, Running, TimedOut],
            &[Pending, Running, RolledBack],
            &[Pending, Failed],
            &[Pending, Running, Cancelling, Cancelled],
        ];
        for path in paths {
            let mut from = None;
            for &to in *path {
                check_transition(from, to).unwrap();
                from = Some(to);
            }
        }
    }

    #[test]
    fn terminal_states_admit_nothing() {
        let terminal: Vec<StateType> = StateType::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, FINAL);
        for from in StateType::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in StateType::ALL {
                assert!(!is_legal(Some(from), to), "{from} -> {to} must be refused");
            }
        }
    }

    #[test]
    fn refusal_names_both_states() {
        let err = check_transition(Some(Completed), Running).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal state transition Completed -> Running; a run in a final state cannot change, start a new run instead"
        );
        assert!(check_transition(None, Running).is_err());
    }

    #[test]
    fn names_round_trip() {
        for s in StateType::ALL {
            assert_eq!(s.as_str().parse::<StateType>().unwrap(), s);
        }
        assert!("Bogus".parse::<StateType>().is_err());
    }
}
