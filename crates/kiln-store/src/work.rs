//! Work pools: deployments, the runs queued for workers, and the claims workers hold.
//!
//! A run created for a worker (a deployment's flow run) is queued in a **work pool** with a
//! [`QueueEntry`]. A worker serving that pool [claims](crate::Store::claim) it: the store
//! hands each queued run to one claimer, with a **fencing token** ([`Claim::fence`]) that
//! grows with every claim of the run. The worker sends its state changes with that token
//! ([`StateChange::fence`](crate::model::StateChange::fence)); once the run is claimed
//! again (its worker stopped heartbeating, and another took it over), the old token is
//! refused, so a run commits exactly one result.
//!
//! A claim lasts as long as its worker heartbeats: a worker that stops has its claims taken
//! back by [`crash_orphans`](crate::Store::crash_orphans): a run that was running goes to
//! AwaitingRetry for another worker while attempts remain, else to Crashed; a run not
//! started yet goes back to the queue as it was.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Micros, RunKind, StateChange, now_micros};
use crate::state::StateType;

/// A run waiting in a work pool (written with [`Write::Enqueue`](crate::model::Write::Enqueue),
/// after the run's creation in the same batch). Enqueuing a run twice keeps the first entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueEntry {
    /// The queued run (created before, in state Scheduled or Pending).
    pub run_id: Uuid,
    /// Flow run or task run.
    pub kind: RunKind,
    /// The work pool whose workers may claim it.
    pub pool: String,
    /// The deployment it was created for, if any (its concurrency limit applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// What the worker runs: the flow's (or task's) name in the worker's registry.
    pub target: String,
    /// Not claimable before this time.
    pub scheduled: Micros,
    /// How many attempts the run may take in all, counting those its crashed workers took.
    pub max_attempts: u32,
    /// Only workers on this host may claim it (its records are in a folder of this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// What the worker needs besides the run's row: for a task run, its inputs (JSON).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub payload: serde_json::Value,
}

impl QueueEntry {
    /// The claim a worker gets on this entry's run.
    pub fn claimed(
        self,
        fence: u64,
        state: StateType,
        attempt: u32,
        parameters: serde_json::Value,
        tags: Vec<String>,
    ) -> Claim {
        Claim {
            run_id: self.run_id,
            kind: self.kind,
            pool: self.pool,
            deployment: self.deployment,
            target: self.target,
            fence,
            state,
            attempt,
            max_attempts: self.max_attempts,
            parameters,
            tags,
        }
    }
}

/// What a worker asks for when it claims runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimRequest {
    /// The claiming process (it heartbeats; its claims end when it stops).
    pub process_id: Uuid,
    /// The pools it serves (at least one).
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub pools: Vec<String>,
    /// Only runs of these targets (the flows and tasks its binary holds); empty: any.
    #[serde(default)]
    pub targets: Vec<String>,
    /// The claimer's host: runs pinned to another host are not handed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// At most this many runs (1 to 1000).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1000))]
    pub limit: u32,
    /// When nothing is claimable, wait up to this many milliseconds for a run to become
    /// claimable (0: answer at once). Backends wait without polling where they can.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 60000))]
    pub wait_ms: u64,
    /// Also hand out again the runs this process holds and has not started: ask after a
    /// claim that failed on its way back (its answer may have been lost).
    #[serde(default)]
    pub resend: bool,
}

/// A run a worker claimed: it is the only one that may move it until the claim ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Claim {
    /// The run.
    pub run_id: Uuid,
    /// Flow run or task run.
    pub kind: RunKind,
    /// The pool it was claimed from.
    pub pool: String,
    /// The deployment it was created for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// What to run (see [`QueueEntry::target`]).
    pub target: String,
    /// The fencing token: send it with every state change of this run.
    pub fence: u64,
    /// The run's state when claimed (Pending, or AwaitingRetry after a crashed worker).
    pub state: StateType,
    /// The run's latest attempt number (0 before its first).
    pub attempt: u32,
    /// How many attempts it may take in all.
    pub max_attempts: u32,
    /// For a flow run, its parameters; for a task run, its inputs ([`QueueEntry::payload`]).
    pub parameters: serde_json::Value,
    /// Its tags.
    pub tags: Vec<String>,
}

/// When a deployment runs on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// A cron expression (5 fields, or 6 with seconds first) in a time zone.
    Cron {
        /// The expression, e.g. `0 3 * * *`.
        expr: String,
        /// An IANA time zone name (`Europe/Paris`); `UTC` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
    },
    /// Every `seconds`, counted from the Unix epoch (so every server computes the same slots).
    Interval {
        /// The period in seconds (at least 1).
        seconds: u64,
    },
}

/// A flow that serving processes offer for remote runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Deployment {
    /// Its name, unique (`nightly`).
    pub name: String,
    /// The flow it runs (the flow's name).
    pub flow: String,
    /// The work pool its runs are queued in.
    pub pool: String,
    /// Default parameters, merged under those given to a run (JSON object).
    pub parameters: serde_json::Value,
    /// A JSON Schema of the flow's parameters: each run's parameters are checked against
    /// it before the run is created.
    pub parameter_schema: serde_json::Value,
    /// Tags given to its runs.
    pub tags: Vec<String>,
    /// When it runs on its own, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Create the runs of slots missed while no scheduler ran (default: skip them).
    #[serde(default)]
    pub catchup: bool,
    /// At most this many of its runs claimed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Attempts per run in all (a crashed worker's attempt counts).
    pub max_attempts: u32,
    /// When it was last registered.
    pub updated: Micros,
}

impl Deployment {
    /// Whether it is well formed (names given, parameters an object, a usable period); the
    /// cron expression and time zone are checked by whoever computes the slots.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.flow.trim().is_empty() || self.pool.trim().is_empty() {
            return Err("a deployment needs a name, a flow and a pool".into());
        }
        if !self.parameters.is_object() {
            return Err(format!(
                "the parameters of deployment '{}' must be a JSON object",
                self.name
            ));
        }
        if self.max_attempts == 0 {
            return Err(format!("deployment '{}': max_attempts must be at least 1", self.name));
        }
        if matches!(self.schedule, Some(Schedule::Interval { seconds: 0 })) {
            return Err(format!(
                "deployment '{}': an interval must be at least 1 second",
                self.name
            ));
        }
        self.check_parameters(&self.parameters, true)
            .map_err(|e| format!("deployment '{}': its default {e}", self.name))
    }

    /// Checks parameters against [`parameter_schema`](Self::parameter_schema): every name
    /// known, and (unless `partial`: the defaults alone) every required one given. The error
    /// names the parameter.
    pub fn check_parameters(&self, parameters: &serde_json::Value, partial: bool) -> Result<(), String> {
        let Some(given) = parameters.as_object() else {
            return Err("parameters must be a JSON object (name: value)".into());
        };
        let schema = &self.parameter_schema;
        let known: Vec<&str> = schema["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        if let Some(unknown) = given.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "flow '{}' has no parameter '{unknown}'; its parameters: {}",
                self.flow,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        if !partial
            && let Some(missing) = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str())
                .find(|r| !given.contains_key(*r))
        {
            return Err(format!(
                "parameter '{missing}' of flow '{}' is missing: give it (`-p {missing}=...`) or set a default on the deployment",
                self.flow
            ));
        }
        Ok(())
    }
}

/// A work pool's limit, as written with [`Write::PutPool`](crate::model::Write::PutPool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkPool {
    /// Its name.
    pub name: String,
    /// At most this many of its runs claimed at once (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// A queued run as listed (for the CLI and the UI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueuedRun {
    /// The entry.
    #[serde(flatten)]
    pub entry: QueueEntry,
    /// The current fencing token (0: never claimed).
    pub fence: u64,
    /// The process holding it, if claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<Uuid>,
}

/// What [`Store::ended_runs`](crate::Store::ended_runs) announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// These runs left their queue.
    Runs(std::sync::Arc<[Uuid]>),
    /// Announcements may have been lost (the connection that receives them was lost, or has
    /// just been opened): what a receiver waits for must be looked up.
    Missed,
}

/// Who holds a queued run, and under which fencing token ([`Store::holders`](crate::Store::holders)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Holder {
    /// The run.
    pub run_id: Uuid,
    /// Its current fencing token (0: never claimed).
    pub fence: u64,
    /// The process holding it; none while it waits to be claimed (again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<Uuid>,
}

/// Queued runs to look up by id ([`Store::holders`](crate::Store::holders) over the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HolderLookup {
    /// The runs (at most 1000).
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub ids: Vec<Uuid>,
}

/// What a store does with a claim whose process died: the one rule set both backends apply.
#[derive(Debug, Clone, PartialEq)]
pub enum TakeBack {
    /// Queue it again for another claimer, after this state change (none: as it is).
    Requeue(Option<StateChange>),
    /// End it with this state change and remove it from the queue.
    End(StateChange),
    /// It has finished already: remove it from the queue.
    Drop,
}

/// The rule for taking back the claim on a run (of `kind`, in `state`, at `attempt`, that
/// may take `max_attempts`) whose process died; `why` says how (for the state's message).
pub fn take_back(
    kind: RunKind,
    run_id: Uuid,
    state: StateType,
    attempt: u32,
    max_attempts: u32,
    why: &str,
) -> TakeBack {
    let change = |to: StateType, message: String| StateChange {
        id: Uuid::nil(),
        kind,
        run_id,
        from: state,
        to,
        message: Some(message),
        attempt,
        timestamp: now_micros(),
        result: None,
        fence: None,
    };
    match state {
        s if s.is_terminal() => TakeBack::Drop,
        StateType::Running if attempt < max_attempts => TakeBack::Requeue(Some(change(
            StateType::AwaitingRetry,
            format!(
                "its worker stopped: {why}; attempt {} of {max_attempts} goes to another worker",
                attempt + 1
            ),
        ))),
        StateType::Running => TakeBack::End(change(
            StateType::Crashed,
            format!("its worker stopped: {why}; no attempts left (max_attempts {max_attempts})"),
        )),
        StateType::Cancelling => TakeBack::End(change(
            StateType::Cancelled,
            format!("its worker stopped while cancelling it: {why}"),
        )),
        _ => TakeBack::Requeue(None),
    }
}

/// Whether a queued run in `state` may be claimed.
pub fn is_claimable(state: StateType) -> bool {
    matches!(
        state,
        StateType::Scheduled | StateType::Pending | StateType::AwaitingRetry
    )
}

/// The state change a claim makes to a Scheduled run: it enters Pending, held by `by`.
pub fn claimed(kind: RunKind, run_id: Uuid, attempt: u32, by: Uuid) -> StateChange {
    StateChange {
        id: Uuid::nil(),
        kind,
        run_id,
        from: StateType::Scheduled,
        to: StateType::Pending,
        message: Some(format!("claimed by worker process {by}")),
        attempt,
        timestamp: now_micros(),
        result: None,
        fence: None,
    }
}

/// The id of the run a deployment's schedule creates for `slot` (microseconds): a UUIDv7
/// whose time is the slot's and whose other bits hash the deployment and the slot, so two
/// schedulers that create the same slot create the same run, and the store keeps one.
pub fn slot_run_id(deployment: &str, slot: Micros) -> Uuid {
    let hash = blake3::Hasher::new_derive_key("kiln 2026-11 schedule slot")
        .update(deployment.as_bytes())
        .update(&slot.to_le_bytes())
        .finalize();
    let mut random = [0u8; 10];
    random.copy_from_slice(&hash.as_bytes()[..10]);
    uuid::Builder::from_unix_timestamp_millis((slot.max(0) / 1000) as u64, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ids_are_deterministic_and_time_ordered() {
        let a = slot_run_id("nightly", 1_000_000_000);
        assert_eq!(a, slot_run_id("nightly", 1_000_000_000));
        assert_ne!(a, slot_run_id("hourly", 1_000_000_000));
        assert_eq!(a.get_version_num(), 7);
        assert!(slot_run_id("nightly", 2_000_000_000) > a);
    }
}
