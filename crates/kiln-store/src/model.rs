//! What the store records: runs, states, edges and logs.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::StateType;

/// Microseconds since the Unix epoch (UTC): the store's clock unit.
pub type Micros = i64;

/// The current time in [`Micros`].
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Micros)
}

/// Which kind of run a state or log belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// A flow run.
    Flow,
    /// A task run.
    Task,
}

/// A new flow run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewFlowRun {
    /// Its id (UUIDv7).
    pub id: Uuid,
    /// The flow's name.
    pub name: String,
    /// The flow run that called this one, for a subflow.
    pub parent_id: Option<Uuid>,
    /// The flow's parameters as JSON.
    pub parameters: serde_json::Value,
    /// User tags.
    pub tags: Vec<String>,
    /// Creation time.
    pub created: Micros,
    /// The state it starts in (recorded as the first entry of its history).
    pub initial_state: StateType,
    /// How the process was started (JSON: `argv`, `cwd`), for top-level flow runs.
    pub command: Option<String>,
    /// The flow run this one retries.
    pub retry_of: Option<Uuid>,
    /// The process running it (see [`Process`]): its runs are marked Crashed if it dies.
    pub process_id: Option<Uuid>,
}

/// JSON kept as text: stored as it is (no value tree built, walked and dropped on the way)
/// and serialized as the JSON it holds, so an API sees an object, not a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonText(String);

impl JsonText {
    /// Text its maker guarantees is valid JSON (written with `serde_json`); the stores that
    /// check JSON refuse the write otherwise, the others fail when it is read back.
    pub fn trusted(text: String) -> Self {
        JsonText(text)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(value: serde_json::Value) -> Self {
        JsonText(value.to_string())
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Only writes sent to a server take this path: parsing here keeps the hot path free.
        let value: serde_json::Value = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        value.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(JsonText::from)
    }
}

/// A new task run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewTaskRun {
    /// Its id (UUIDv7).
    pub id: Uuid,
    /// The flow run it belongs to; `None` for a task called outside any flow.
    pub flow_run_id: Option<Uuid>,
    /// The task's name (shared with the task's other runs, not copied for each).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub name: Arc<str>,
    /// Identifies the task's code (module path and function): the task's own static text
    /// when made in this process.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub task_key: Cow<'static, str>,
    /// A description of its inputs as JSON (values, or references to upstream runs).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub inputs: JsonText,
    /// User tags.
    pub tags: Vec<String>,
    /// Creation time.
    pub created: Micros,
    /// The state it starts in (recorded as the first entry of its history).
    pub initial_state: StateType,
    /// The call's position in its flow run's attempt (`key#n`: the n-th call of the task),
    /// for reading; results are reused across retries by call identity, not position.
    pub call_key: Option<String>,
    /// The process running it (see [`Process`]): its runs are marked Crashed if it dies.
    pub process_id: Option<Uuid>,
}

/// A process that runs flows and tasks, as its heartbeats record it. A process that stops
/// heartbeating for longer than the lease, or that is seen dead on its host, has its
/// unfinished runs marked Crashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Process {
    /// Chosen by the process when it opens the store.
    pub id: Uuid,
    /// The host name.
    pub host: String,
    /// The operating system's process id.
    pub pid: u32,
    /// When the operating system started it (Linux: clock ticks since boot), so that a
    /// reused pid is not mistaken for it; 0 when unknown.
    pub started: u64,
    /// Its latest heartbeat.
    pub heartbeat: Micros,
    /// How long it may stay silent before it counts as dead (three of its heartbeat
    /// periods): a process that beats slowly is not judged by a faster one's lease. 0 when
    /// unknown (recorded by an older version): the judge's own lease applies.
    #[serde(default)]
    pub lease: Micros,
}

/// An API token of the Kiln server. Only a hash of its secret is stored; the secret is shown
/// once, when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiToken {
    /// A name for people (`ci`, `alice-laptop`); unique.
    pub name: String,
    /// `blake3:<hex>` of the secret (see [`ApiToken::hash_secret`]).
    pub hash: String,
    /// Reads only: every request that changes something is refused.
    pub read_only: bool,
    /// When it was created.
    pub created: Micros,
    /// When it was revoked; a revoked token is refused.
    pub revoked: Option<Micros>,
}

impl ApiToken {
    /// A new secret (`kiln_` and 64 hex digits from the OS's random source).
    pub fn new_secret() -> String {
        format!("kiln_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
    }

    /// The stored form of `secret`.
    pub fn hash_secret(secret: &str) -> String {
        let hash = blake3::Hasher::new_derive_key("kiln 2026-11 api token")
            .update(secret.as_bytes())
            .finalize();
        format!("blake3:{}", hash.to_hex())
    }
}

/// One entry of a run's state history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateRecord {
    /// The run that entered the state.
    pub run_id: Uuid,
    /// Its position in the run's history (0 is the state the run was created in).
    pub seq: u32,
    /// The state entered.
    pub state: StateType,
    /// Why (an error chain for Failed, the delay for AwaitingRetry, ...).
    pub message: Option<String>,
    /// The attempt number, from 1 (0 before the first attempt starts).
    pub attempt: u32,
    /// When.
    pub timestamp: Micros,
    /// For a Completed or Cached state: the persisted result it refers to, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

impl StateRecord {
    /// The first entry of a run's history: the state it was created in.
    pub fn created(run_id: Uuid, state: StateType, timestamp: Micros) -> Self {
        StateRecord {
            run_id,
            seq: 0,
            state,
            message: None,
            attempt: 0,
            timestamp,
            result: None,
        }
    }
}

/// A fresh identity for a write ([`StateChange::id`], [`LogRecord::id`]): a random 64-bit
/// prefix chosen once per process and a counter, so it costs an atomic add, not a clock read.
pub fn write_id() -> Uuid {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = *PREFIX.get_or_init(|| Uuid::new_v4().as_u64_pair().0);
    Uuid::from_u64_pair(prefix, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A dependency: `downstream` consumed the result of `upstream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Edge {
    /// The producing task run.
    pub upstream: Uuid,
    /// The consuming task run.
    pub downstream: Uuid,
}

/// A log event captured inside a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogRecord {
    /// The line's identity ([`write_id`]): a line delivered twice is kept once. Nil: none.
    #[serde(default, skip_serializing_if = "Uuid::is_nil")]
    pub id: Uuid,
    /// The task run or flow run that emitted it.
    pub run_id: Uuid,
    /// The flow run it happened in (the run itself for a flow run).
    pub flow_run_id: Option<Uuid>,
    /// When.
    pub timestamp: Micros,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module that emitted it.
    pub target: String,
    /// The message with its fields.
    pub message: String,
}

/// A state change the store checks and applies: a compare-and-set on the run's state.
///
/// The store accepts it only if the run's stored state is `from` and the rules of
/// [`state`](crate::state) allow `from -> to`; it then assigns the change its position in the
/// run's history. Anything else is [`Transition::Rejected`] with the state found.
///
/// A change delivered twice (a batch sent again after its answer was lost) is applied once:
/// the store recognises it by `id` and answers with the position it got the first time.
/// Another writer's change, even to the same state, has another id and is checked as usual.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateChange {
    /// This change's identity ([`write_id`]); nil: none, a repeat is checked like any change.
    #[serde(default, skip_serializing_if = "Uuid::is_nil")]
    pub id: Uuid,
    /// Flow or task run.
    pub kind: RunKind,
    /// The run.
    pub run_id: Uuid,
    /// The state the caller believes the run is in.
    pub from: StateType,
    /// The state to enter.
    pub to: StateType,
    /// Why (an error chain for Failed, the delay for AwaitingRetry, ...).
    pub message: Option<String>,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// When.
    pub timestamp: Micros,
    /// For a Completed or Cached state: the result it refers to, as JSON.
    pub result: Option<String>,
    /// For a run claimed from a work pool: the claim's fencing token
    /// ([`Claim::fence`](crate::work::Claim::fence)). The store refuses the change unless
    /// the run is still claimed with this token: a worker that lost its claim cannot move
    /// the run. `None` for changes by anyone else (a user cancelling, the engine's own runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// What the store made of a [`StateChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Transition {
    /// Applied as entry `seq` of the run's history.
    Accepted {
        /// The position assigned.
        seq: u32,
    },
    /// Not applied: the run is in `current` (`None`: no such run), not in the state the
    /// change expected, or the rules forbid the move.
    Rejected {
        /// The state the run is in.
        current: Option<StateType>,
    },
}

/// One write to the store. Writes are applied in the order they are sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "write", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Write {
    /// Record a new flow run (its creation state is the first entry of its history).
    FlowRun(NewFlowRun),
    /// Record a new task run.
    TaskRun(NewTaskRun),
    /// Change a run's state (checked by the store).
    State(StateChange),
    /// A dependency edge inside a flow run.
    Edge {
        /// The flow run both runs belong to.
        flow_run_id: Option<Uuid>,
        /// The edge.
        edge: Edge,
    },
    /// A captured log event.
    Log(LogRecord),
    /// A process says it is alive (recorded, or its heartbeat moved forward).
    Heartbeat(Process),
    /// Record a new API token (refused when the name is taken).
    PutToken(ApiToken),
    /// Revoke the API token of this name, from this time.
    RevokeToken {
        /// The token's name.
        name: String,
        /// When.
        at: Micros,
    },
    /// Queue a run (created before it, in state Scheduled or Pending) in a work pool; a run
    /// queued twice keeps its first entry.
    Enqueue(crate::work::QueueEntry),
    /// Record a deployment, or replace the one of the same name.
    PutDeployment(Box<crate::work::Deployment>),
    /// Remove a deployment (refused when there is none of that name). Its runs stay; the
    /// scheduler creates no more of them.
    DeleteDeployment {
        /// The deployment's name.
        name: String,
    },
    /// Record a work pool's limit, or replace it.
    PutPool(crate::work::WorkPool),
    /// Set a tag's concurrency limit (see [`crate::limit`]), replacing the one before.
    PutLimit(crate::limit::ConcurrencyLimit),
    /// Remove a tag's concurrency limit (refused when it has none).
    DeleteLimit {
        /// The tag.
        tag: String,
    },
    /// Delete a run that has ended, with its history, edges and logs; a flow run with its
    /// task runs and subflow runs too. Refused when the run, or one of those, has not
    /// ended (it would go on writing to a run that is gone), and when there is no such run.
    DeleteRun {
        /// The flow run or task run.
        id: Uuid,
    },
}

impl Write {
    /// The run this write is about.
    pub fn run_id(&self) -> Uuid {
        match self {
            Write::FlowRun(r) => r.id,
            Write::TaskRun(r) => r.id,
            Write::State(c) => c.run_id,
            Write::Edge { edge, .. } => edge.downstream,
            Write::Log(l) => l.run_id,
            Write::Heartbeat(p) => p.id,
            Write::Enqueue(e) => e.run_id,
            Write::DeleteRun { id } => *id,
            Write::PutToken(_)
            | Write::RevokeToken { .. }
            | Write::PutDeployment(_)
            | Write::DeleteDeployment { .. }
            | Write::PutPool(_)
            | Write::PutLimit(_)
            | Write::DeleteLimit { .. } => Uuid::nil(),
        }
    }
}

impl Write {
    /// Whether the write is well formed: fields that hold JSON text hold JSON. Backends
    /// refuse malformed ones too; a server checks first, to answer the request that sent it.
    pub fn check(&self) -> Result<(), String> {
        let json = |field: &str, text: &Option<String>| match text {
            // As readers parse it (a number out of range or a lone surrogate is refused here,
            // not found unreadable later).
            Some(t) => serde_json::from_str::<serde_json::Value>(t)
                .map(drop)
                .map_err(|e| format!("{field} is not JSON text ({e})")),
            None => Ok(()),
        };
        match self {
            Write::FlowRun(r) => json("command", &r.command),
            Write::State(c) => json("result", &c.result),
            Write::Enqueue(e) if e.pool.trim().is_empty() || e.target.is_empty() => {
                Err("a queued run needs a pool and a target".into())
            }
            Write::Enqueue(e) if e.max_attempts == 0 => Err("max_attempts must be at least 1".into()),
            Write::PutDeployment(d) => d.check(),
            Write::PutPool(p) if p.name.trim().is_empty() => Err("a work pool needs a name".into()),
            Write::PutLimit(l) => l.check(),
            Write::DeleteLimit { tag } => crate::limit::check_tag(tag),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::FlowRun(r) => write!(f, "the creation of flow run {}", r.id),
            Write::TaskRun(r) => write!(f, "the creation of task run {}", r.id),
            Write::State(c) => write!(f, "state {} -> {} of run {}", c.from, c.to, c.run_id),
            Write::Edge { edge, .. } => write!(f, "edge {} -> {}", edge.upstream, edge.downstream),
            Write::Log(l) => write!(f, "a log line of run {}", l.run_id),
            Write::Heartbeat(p) => write!(f, "a heartbeat of process {} (pid {} on {})", p.id, p.pid, p.host),
            Write::PutToken(t) => write!(f, "the API token '{}'", t.name),
            Write::RevokeToken { name, .. } => write!(f, "the revocation of API token '{name}'"),
            Write::Enqueue(e) => write!(f, "the queueing of run {} in work pool '{}'", e.run_id, e.pool),
            Write::PutDeployment(d) => write!(f, "the deployment '{}'", d.name),
            Write::DeleteDeployment { name } => write!(f, "the removal of deployment '{name}'"),
            Write::PutPool(p) => write!(f, "the work pool '{}'", p.name),
            Write::PutLimit(l) => write!(f, "the concurrency limit of tag '{}'", l.tag),
            Write::DeleteLimit { tag } => write!(f, "the removal of the concurrency limit of tag '{tag}'"),
            Write::DeleteRun { id } => write!(f, "the deletion of run {id}"),
        }
    }
}

/// A run's current-state columns, and what a state change does to them: the one
/// definition every backend applies (the first Running sets the start time, a final state
/// the end time, a change without a result keeps the one before).
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    /// The current state.
    pub state: StateType,
    /// Its position in the run's history.
    pub seq: u32,
    /// The current state's message.
    pub message: Option<String>,
    /// The latest attempt.
    pub attempt: u32,
    /// When the first attempt started running.
    pub start_time: Option<Micros>,
    /// When the run reached a final state.
    pub end_time: Option<Micros>,
    /// The latest result reference, as JSON.
    pub result: Option<String>,
}

impl RunState {
    /// The state of a run just created in `initial`.
    pub fn created(initial: StateType) -> Self {
        RunState {
            state: initial,
            seq: 0,
            message: None,
            attempt: 0,
            start_time: None,
            end_time: None,
            result: None,
        }
    }

    /// Whether the store accepts `change` on a run in this state: the state the change
    /// expects, and a move the rules allow.
    pub fn accepts(&self, change: &StateChange) -> bool {
        self.state == change.from && crate::state::is_legal(Some(self.state), change.to)
    }

    /// Applies an accepted change as history entry `seq`.
    pub fn apply(&mut self, change: &StateChange, seq: u32) {
        self.state = change.to;
        self.seq = seq;
        self.message.clone_from(&change.message);
        if change.result.is_some() {
            self.result.clone_from(&change.result);
        }
        self.attempt = change.attempt;
        if change.to == StateType::Running {
            self.start_time = self.start_time.or(Some(change.timestamp));
        }
        if change.to.is_terminal() {
            self.end_time = Some(change.timestamp);
        }
    }

    /// The history entry of `change` applied as entry `seq`.
    pub fn record(change: &StateChange, seq: u32) -> StateRecord {
        StateRecord {
            run_id: change.run_id,
            seq,
            state: change.to,
            message: change.message.clone(),
            attempt: change.attempt,
            timestamp: change.timestamp,
            result: change.result.clone(),
        }
    }
}

/// Why a process's runs are orphans, for the Crashed state's message.
pub fn orphan_message(pid: i64, host: &str, heartbeat: Micros, exited: bool) -> String {
    if exited {
        format!("its process (pid {pid} on {host}) has exited without finishing it")
    } else {
        let silent = (now_micros() - heartbeat).max(0) / 1_000_000;
        format!(
            "its process (pid {pid} on {host}) stopped heartbeating {silent} s ago; it was killed, lost power or hangs"
        )
    }
}

/// What became of one write.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It is durable; a state change got this position in its run's history.
    Applied {
        /// For a state change: its position.
        seq: Option<u32>,
    },
    /// A state change the store refused (see [`Transition::Rejected`]).
    Rejected {
        /// The state the run is in.
        current: Option<StateType>,
    },
    /// It could not be recorded, even after retries.
    Failed(std::sync::Arc<crate::StoreError>),
}

/// An [`Outcome`] as it crosses a wire (the server's API): a failure travels as its message
/// and whether it is retryable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WireOutcome {
    /// See [`Outcome::Applied`].
    Applied {
        /// For a state change: its position.
        seq: Option<u32>,
    },
    /// See [`Outcome::Rejected`].
    Rejected {
        /// The state the run is in.
        current: Option<StateType>,
    },
    /// See [`Outcome::Failed`].
    Failed {
        /// The error, as text.
        message: String,
        /// Whether trying again may succeed.
        retryable: bool,
    },
}

impl From<&Outcome> for WireOutcome {
    fn from(o: &Outcome) -> Self {
        match o {
            Outcome::Applied { seq } => WireOutcome::Applied { seq: *seq },
            Outcome::Rejected { current } => WireOutcome::Rejected { current: *current },
            Outcome::Failed(e) => WireOutcome::Failed {
                // The receiver wraps it as a backend error again: send what the backend said.
                message: match &**e {
                    crate::StoreError::Backend { source, .. } => source.to_string(),
                    e => e.to_string(),
                },
                retryable: e.is_retryable(),
            },
        }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Applied { seq } => Outcome::Applied { seq },
            WireOutcome::Rejected { current } => Outcome::Rejected { current },
            WireOutcome::Failed { message, retryable } => {
                Outcome::Failed(std::sync::Arc::new(crate::StoreError::backend(message, retryable)))
            }
        }
    }
}

/// A batch of writes as it crosses a wire (`POST /api/v1/writes`), applied in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WriteBatch {
    /// The writes.
    pub writes: Vec<Write>,
}

/// One outcome per write of a [`WriteBatch`], in the same order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutcomeBatch {
    /// The outcomes.
    pub outcomes: Vec<WireOutcome>,
}

/// A request to mark the runs of dead processes Crashed (see `Store::crash_orphans`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CrashOrphans {
    /// Processes known dead.
    pub dead: Vec<Uuid>,
    /// Processes whose last heartbeat is older than this are dead too.
    pub stale_before: Micros,
}

/// Task runs to look up by id ([`Store::task_runs_in`](crate::Store::task_runs_in) over the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskRunLookup {
    /// The runs (at most 1000).
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub ids: Vec<Uuid>,
    /// Only those in one of these states (none: any).
    #[serde(default)]
    pub states: Vec<StateType>,
}

/// Which runs to list (flow runs, or task runs): all the conditions hold; newest first
/// unless `oldest_first`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFilter {
    /// In any of these states (none: any state).
    #[serde(default)]
    pub states: Vec<StateType>,
    /// Runs of this flow, or of this task (its name).
    #[serde(default)]
    pub name: Option<String>,
    /// Runs with this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Flow runs called by this flow run (subflows); task runs of this flow run.
    #[serde(default)]
    pub parent: Option<Uuid>,
    /// Only runs without a parent: flow runs that are not subflows, task runs called
    /// outside any flow.
    #[serde(default)]
    pub top_level: bool,
    /// Created at or after this time.
    #[serde(default)]
    pub since: Option<Micros>,
    /// Created before this time.
    #[serde(default)]
    pub until: Option<Micros>,
    /// The page after this run (the `next` of the page before): ids are time-ordered, so
    /// this is a stable cursor whatever is recorded meanwhile.
    #[serde(default)]
    pub after: Option<Uuid>,
    /// Oldest first instead of newest first.
    #[serde(default)]
    pub oldest_first: bool,
    /// At most this many runs.
    pub limit: usize,
}

impl RunFilter {
    /// Cuts `rows`, read one more than [`limit`](Self::limit) so as to know, to the page;
    /// the cursor of the next page (`None`: this is the last).
    pub fn page<T>(&self, rows: &mut Vec<T>, id: fn(&T) -> Uuid) -> Option<Uuid> {
        if rows.len() <= self.limit {
            return None;
        }
        rows.truncate(self.limit);
        rows.last().map(id)
    }

    /// The newest `limit` runs, unfiltered.
    pub fn newest(limit: usize) -> RunFilter {
        RunFilter {
            states: Vec::new(),
            name: None,
            tag: None,
            parent: None,
            top_level: false,
            since: None,
            until: None,
            after: None,
            oldest_first: false,
            limit,
        }
    }
}

/// Which log lines of a run to list: oldest first, a page at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFilter {
    /// Only lines at this level or more severe (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`).
    #[serde(default)]
    pub level: Option<String>,
    /// The page after this position (the `next` of the page before).
    #[serde(default)]
    pub after: Option<i64>,
    /// At most this many lines.
    pub limit: usize,
}

impl LogFilter {
    /// The levels at `level` or more severe, or an error naming the levels.
    pub fn levels(&self) -> Result<Vec<&'static str>, String> {
        const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
        let Some(level) = &self.level else {
            return Ok(LEVELS.to_vec());
        };
        let wanted = level.trim().to_ascii_uppercase();
        let wanted = if wanted == "WARNING" { "WARN".to_owned() } else { wanted };
        LEVELS
            .iter()
            .position(|l| *l == wanted)
            .map(|i| LEVELS[..=i].to_vec())
            .ok_or_else(|| format!("unknown log level '{level}'; levels: error, warn, info, debug, trace"))
    }
}

/// One page of a run's log lines, and the cursor of the next one (`None`: this is the last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogPage {
    /// The lines, oldest first.
    pub logs: Vec<LogRecord>,
    /// Pass as [`LogFilter::after`] for the next page.
    pub next: Option<i64>,
}

/// How many runs of a kind are in a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunCount {
    /// Flow runs or task runs.
    pub kind: RunKind,
    /// The state.
    pub state: StateType,
    /// How many.
    pub count: u64,
}

/// One page of task runs, and the cursor of the next one (`None`: this is the last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskRunPage {
    /// The runs, in the order asked.
    pub runs: Vec<TaskRun>,
    /// Pass as [`RunFilter::after`] for the next page.
    pub next: Option<Uuid>,
}

/// One page of flow runs, and the cursor of the next one (`None`: this is the last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FlowRunPage {
    /// The runs, newest first.
    pub runs: Vec<FlowRun>,
    /// Pass as [`RunFilter::after`] for the next page.
    pub next: Option<Uuid>,
}

/// A flow run as read back from the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FlowRun {
    /// Its id.
    pub id: Uuid,
    /// The flow's name.
    pub name: String,
    /// The calling flow run, for a subflow.
    pub parent_id: Option<Uuid>,
    /// Parameters as JSON.
    pub parameters: serde_json::Value,
    /// User tags.
    pub tags: Vec<String>,
    /// Current state.
    pub state: StateType,
    /// The message of the current state.
    pub state_message: Option<String>,
    /// The latest attempt number.
    pub attempt: u32,
    /// Creation time.
    pub created: Micros,
    /// When the first attempt started running.
    pub start_time: Option<Micros>,
    /// When it reached a final state.
    pub end_time: Option<Micros>,
    /// How many task runs it recorded directly.
    pub task_count: u64,
    /// The persisted result of its return value, if any (JSON: storage, key, serializer, ...).
    pub result: Option<serde_json::Value>,
    /// How its process was started (JSON: `argv`, `cwd`), for top-level flow runs.
    pub command: Option<serde_json::Value>,
    /// The flow run this one retries.
    pub retry_of: Option<Uuid>,
}

/// A task run as read back from the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskRun {
    /// Its id.
    pub id: Uuid,
    /// Its flow run, if any.
    pub flow_run_id: Option<Uuid>,
    /// The task's name.
    pub name: String,
    /// Identifies the task's code.
    pub task_key: String,
    /// Inputs as JSON.
    pub inputs: serde_json::Value,
    /// User tags.
    pub tags: Vec<String>,
    /// Current state.
    pub state: StateType,
    /// The message of the current state.
    pub state_message: Option<String>,
    /// The latest attempt number.
    pub attempt: u32,
    /// Creation time.
    pub created: Micros,
    /// When the first attempt started running.
    pub start_time: Option<Micros>,
    /// When it reached a final state.
    pub end_time: Option<Micros>,
    /// The persisted result, if any (JSON: storage, key, serializer, size, hash).
    pub result: Option<serde_json::Value>,
    /// The call's position in its flow run's attempt (`key#n`).
    pub call_key: Option<String>,
}

/// What a user-given id (or id prefix) refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum RunRef {
    /// A flow run.
    Flow(Uuid),
    /// A task run.
    Task(Uuid),
}
