//! Global concurrency limits by tag: at most N task runs carrying a tag run at once,
//! wherever they run.
//!
//! A limit ([`Write::PutLimit`](crate::model::Write::PutLimit)) gives a tag a number of
//! **slots**. Before each attempt, a task run carrying limited tags
//! [acquires](crate::Store::acquire_slots) one slot of each, all or none; when one of them is
//! full it gets [`Slots::Busy`] and tries again later, staying Pending meanwhile.
//!
//! A slot is held from its grant until the run's next state change, and after that for as
//! long as the run is Pending, Running or Cancelling: it is freed by the run's own move to
//! a final state or to AwaitingRetry, with no release to send and none to forget. A holder
//! whose process dies is freed when crash detection
//! ([`crash_orphans`](crate::Store::crash_orphans)) moves its run on. The store counts
//! holders inside the transaction that grants a slot, so two processes can never both take
//! the last one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::Micros;
use crate::state::StateType;

/// How many task runs carrying `tag` may run at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConcurrencyLimit {
    /// The tag.
    pub tag: String,
    /// The number of slots (0 holds every run with the tag until the limit is raised or removed).
    pub slots: u32,
    /// When it was set.
    pub updated: Micros,
}

impl ConcurrencyLimit {
    /// Whether the limit is well formed.
    pub fn check(&self) -> Result<(), String> {
        check_tag(&self.tag)
    }
}

/// Refuses an empty tag or one with surrounding spaces.
pub(crate) fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.trim() != tag {
        return Err(format!(
            "'{tag}' is not a tag a limit can name: give a tag without leading or trailing spaces"
        ));
    }
    Ok(())
}

/// A task run asks for one slot of each of its limited tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SlotRequest {
    /// The task run (recorded before the request: the store refuses an unknown run).
    pub run_id: Uuid,
    /// Its tags; those without a limit need no slot.
    pub tags: Vec<String>,
}

/// The answer to a [`SlotRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Slots {
    /// The run holds a slot of each limited tag (asking again while it holds them grants
    /// them again).
    Granted,
    /// A tag's slots are all taken; the run holds none and may ask again.
    Busy {
        /// The tag.
        tag: String,
        /// Its number of slots.
        slots: u32,
    },
}

/// A limit and the runs holding its slots, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LimitUsage {
    /// The limit.
    #[serde(flatten)]
    pub limit: ConcurrencyLimit,
    /// The task runs holding a slot, oldest grant first.
    pub holders: Vec<Uuid>,
}

/// Whether a run in `state` at history position `seq` holds a slot granted to it at
/// position `granted_seq`.
pub fn holds_slot(state: StateType, seq: u32, granted_seq: u32) -> bool {
    seq == granted_seq || matches!(state, StateType::Pending | StateType::Running | StateType::Cancelling)
}

/// [`holds_slot`] as an SQL condition, the same in both databases (`s`: the slot row,
/// `t`: its task run).
pub const HOLDS_SLOT_SQL: &str = "(t.state_seq = s.granted_seq OR t.state IN ('Pending', 'Running', 'Cancelling'))";
