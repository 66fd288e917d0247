//! What task runs and flow runs share: the body contract, state tracking, the attempt loop.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use kiln_store::model::{RunKind, StateChange, Write};
use kiln_store::state::StateType;
use kiln_store::{Outcome, Report};
use uuid::Uuid;

use crate::context::{InRun, RunScope};
use crate::error::RunLabel;
use crate::result::persist::{self, KeyFields, Plan};
use crate::result::{ResultError, ResultRef, StorageKey};
use crate::serializer::{Serializer, short_type};
use crate::transaction::TransactionContext;
use crate::{Engine, Error, Options};

/// A function Kiln runs: what `#[task]` and `#[flow]` generate. Not implemented by hand.
pub trait Body: Send + Sync + 'static {
    /// The arguments, as a tuple.
    type Args: Send + 'static;
    /// The value a successful run returns.
    type Output: Send + 'static;
    /// The error type the function declares (`kiln::Error` for functions that return a plain value).
    type Error: From<Error> + Send + 'static;

    /// The default name of its runs (the function's name).
    const NAME: &'static str;
    /// Identifies the code: module path and function name.
    const KEY: &'static str;

    /// The options in effect (attribute defaults merged with any override).
    fn options(&self) -> Arc<Options<Self::Error>>;
    /// Runs the body once.
    fn run(args: Self::Args) -> BoxFuture<'static, Result<Self::Output, Self::Error>>;
    /// A copy of the arguments for another attempt, or `None` when they are not `Clone`.
    fn clone_args(args: &Self::Args) -> Option<Self::Args>;
    /// The error with its chain of causes, for the Failed state's message.
    fn describe_error(error: &Self::Error) -> String;
    /// The serializer that persists results: the one named on the attribute, else `default`
    /// (`msgpack` or `json`) for serde types, else none.
    fn serializer(&self, default: &str) -> Option<Arc<dyn Serializer<Self::Output>>>;
    /// The arguments as JSON: values that implement `Serialize`, others by type name.
    fn parameters(args: &Self::Args) -> serde_json::Value;
    /// A BLAKE3 hash of the function's tokens (the `task_source` cache policy).
    const SOURCE_HASH: &'static str;
    /// Each argument's hash, by name (the `inputs` cache policy).
    fn input_hashes(args: &Self::Args) -> Vec<(&'static str, crate::cache::InputHash)>;
}

/// How a run ended, when it did not produce a value.
pub(crate) enum Failure<E> {
    /// The body returned an error (after all attempts).
    Body { error: E, message: String, attempts: u32 },
    /// Everything else.
    Kiln(Error),
}

impl<E> Failure<E> {
    /// For callers that declared `E`: the body's own error, or ours converted into it.
    pub(crate) fn into_declared(self) -> E
    where
        E: From<Error>,
    {
        match self {
            Failure::Body { error, .. } => error,
            Failure::Kiln(e) => E::from(e),
        }
    }

    /// For callers that share the outcome (futures, upstream inputs): our error type.
    pub(crate) fn into_kiln(self, run: &RunLabel) -> Error {
        match self {
            Failure::Body { message, attempts, .. } => Error::Failed {
                run: run.clone(),
                attempts,
                message,
            },
            Failure::Kiln(e) => e,
        }
    }
}

impl<E> From<Error> for Failure<E> {
    fn from(e: Error) -> Self {
        Failure::Kiln(e)
    }
}

/// The writes of a flow run (and its task runs) that the store refused or could not record.
///
/// Every write a run sends carries this reporter; the flow run checks it once its records
/// are flushed and fails if anything is missing, so no run "succeeds" with a history the
/// database does not hold.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    list: Mutex<(Vec<String>, usize)>,
}

/// Problems kept word for word; beyond them, only counted (a full disk fails every write).
const KEPT: usize = 20;

impl Report for Problems {
    fn report(&self, write: &Write, outcome: Outcome) {
        let problem = match outcome {
            Outcome::Applied { .. } => return,
            Outcome::Rejected { current } => format!(
                "{write} was refused: the run is {}",
                current.map_or("unknown to the store", StateType::as_str)
            ),
            Outcome::Failed(e) => format!("{write} was not recorded: {e}"),
        };
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if list.1 == 0 {
            tracing::error!("{problem}");
        }
        list.1 += 1;
        if list.0.len() < KEPT {
            list.0.push(problem);
        }
    }
}

impl Problems {
    /// Waits until `run`'s writes have their outcomes; an error (logged) when any of them
    /// was refused or not recorded, or the store cannot flush.
    pub(crate) async fn recorded(&self, engine: &Engine, run: &RunLabel) -> Result<(), Error> {
        let checked = match engine.flush().await {
            Ok(()) => self.check(run),
            Err(e) => Err(e),
        };
        if let Err(e) = &checked {
            tracing::error!("{e}");
        }
        checked
    }

    /// An error for `run` when its records are not all in the store (after a flush).
    pub(crate) fn check(&self, run: &RunLabel) -> Result<(), Error> {
        let (problems, total) = std::mem::take(&mut *self.list.lock().unwrap_or_else(|p| p.into_inner()));
        if total == 0 {
            return Ok(());
        }
        Err(Error::NotRecorded {
            run: run.clone(),
            problems,
            total,
        })
    }
}

/// A run's current state, moved only through state changes the store checks.
///
/// Dropped before reaching a final state (its future was cancelled, its flow ended), it
/// records Cancelled, so no run is left Running forever.
pub(crate) struct Tracker {
    pub(crate) label: RunLabel,
    pub(crate) engine: Engine,
    pub(crate) state: Option<StateType>,
    pub(crate) attempt: u32,
    /// Where the store reports the writes of this run it refused or could not record.
    pub(crate) problems: Arc<Problems>,
    /// The fencing token of the claim this process holds on the run (a worker's run).
    pub(crate) fence: Option<u64>,
    /// A task run's tags: before each attempt it waits for a slot of those that have a
    /// concurrency limit (see [`kiln_store::limit`]).
    pub(crate) slot_tags: Vec<String>,
    /// When its latest attempt started (for the duration its lifecycle lines give).
    started: Option<std::time::Instant>,
    /// Its creation and edges, held back until it starts (see [`Tracker::defer`]).
    deferred: Held,
}

/// Writes held back: the first in place (a run's creation: most runs hold nothing else),
/// the others in a list. A list for all of them was an allocation per task run made on the
/// flow's thread and freed on a worker's, 4% of the CPU of 20,000 submitted runs.
#[derive(Default)]
struct Held {
    first: Option<Write>,
    rest: Vec<Write>,
}

impl Tracker {
    pub(crate) fn new(
        kind: RunKind,
        name: Arc<str>,
        engine: Engine,
        initial: StateType,
        problems: Arc<Problems>,
    ) -> Tracker {
        Tracker {
            label: RunLabel {
                kind,
                name,
                id: Uuid::now_v7(),
            },
            engine,
            state: Some(initial),
            attempt: 0,
            problems,
            fence: None,
            slot_tags: Vec::new(),
            started: None,
            deferred: Held::default(),
        }
    }

    /// Takes over a run recorded before (a claimed run of a work pool): in `state`, at
    /// `attempt`, moved with the claim's fencing token.
    pub(crate) fn adopt(
        label: RunLabel,
        engine: Engine,
        claim: &kiln_store::work::Claim,
        problems: Arc<Problems>,
    ) -> Tracker {
        Tracker {
            label,
            engine,
            state: Some(claim.state),
            attempt: claim.attempt,
            problems,
            fence: Some(claim.fence),
            slot_tags: Vec::new(),
            started: None,
            deferred: Held::default(),
        }
    }

    pub(crate) fn id(&self) -> Uuid {
        self.label.id
    }

    /// Holds `write` (the run's creation, its edges) back until the run starts or changes
    /// state: a submitted run that starts at once is then created, run and ended in one
    /// batch of the store (one row written once) instead of created in one and moved in
    /// another. A run dropped before it started still records its creation, then Cancelled.
    pub(crate) fn defer(&mut self, write: Write) {
        let held = &mut self.deferred;
        match held.first {
            None if held.rest.is_empty() => held.first = Some(write),
            _ => held.rest.push(write),
        }
    }

    /// Room for `n` writes held back, allocated once.
    pub(crate) fn reserve_deferred(&mut self, n: usize) {
        self.deferred.rest.reserve_exact(n.saturating_sub(1));
    }

    /// Sends the writes held back by [`defer`](Self::defer), in order.
    pub(crate) fn send_deferred(&mut self) -> Result<(), Error> {
        // Taken together: after a failed send, nothing held back is sent later (edges
        // without the run's creation).
        let (first, rest) = (self.deferred.first.take(), std::mem::take(&mut self.deferred.rest));
        for write in first.into_iter().chain(rest) {
            self.send(write)?;
        }
        Ok(())
    }

    /// Sends a write about this run, its outcome reported to the run's problems.
    pub(crate) fn send(&self, write: Write) -> Result<(), Error> {
        let reporter: Arc<dyn Report> = self.problems.clone();
        Ok(self.engine.store().send(write, Some(reporter))?)
    }

    pub(crate) fn to(&mut self, state: StateType, message: Option<String>) -> Result<(), Error> {
        self.enter_with_result(state, message, None)
    }

    /// A transition whose state carries a persisted result (Completed, Cached).
    ///
    /// Checked here against the rules (a bug shows at once), and by the store against the
    /// state it holds (another process may have moved the run: that is reported as a problem).
    pub(crate) fn enter_with_result(
        &mut self,
        state: StateType,
        message: Option<String>,
        result: Option<&ResultRef>,
    ) -> Result<(), Error> {
        kiln_store::state::check_transition(self.state, state)?;
        self.send_deferred()?;
        if state == StateType::Running {
            self.started = Some(std::time::Instant::now());
        }
        self.tell(state, message.as_deref());
        let from = self.state.expect("checked above: a run being changed has a state");
        self.send(Write::State(StateChange {
            id: kiln_store::model::write_id(),
            kind: self.label.kind,
            run_id: self.label.id,
            from,
            to: state,
            message,
            attempt: self.attempt,
            timestamp: kiln_store::model::now_micros(),
            result: result.map(|r| serde_json::to_string(r).expect("a result reference serializes")),
            fence: self.fence,
        }))?;
        self.state = Some(state);
        Ok(())
    }
}

impl Tracker {
    /// Says a task run's change of state on stderr and in the run's captured logs
    /// (`kiln runs logs`): its failures, retries, crashes, cache hits and cancellation at
    /// INFO and above, its start and completion at DEBUG (a line per run would cost
    /// pipelines of many small tasks a log record each). A flow run says its start and end
    /// itself, with their duration; only its retries are said here.
    ///
    /// `KILN_TASK_LOG=info` says starts and completions at INFO too (captured with the run).
    fn tell(&self, state: StateType, message: Option<&str>) {
        use StateType::*;
        let routine = matches!(state, Scheduled | Pending | Running | Completed);
        let loud = routine && routine_at_info();
        let wanted = match (routine, loud) {
            (false, _) => true,
            (true, true) => tracing::enabled!(tracing::Level::INFO),
            (true, false) => tracing::enabled!(tracing::Level::DEBUG),
        };
        if (self.label.kind == RunKind::Flow && state != AwaitingRetry) || !wanted {
            return;
        }
        let label = &self.label;
        let took = self
            .started
            .map(|t| human(Duration::from_millis(t.elapsed().as_millis() as u64)))
            .unwrap_or_else(|| "0s".into());
        let why = message.unwrap_or("-");
        let flow_run_id = crate::context::current_flow().map(|f| f.flow_run_id);
        let scope = RunScope::new(label.id, flow_run_id, self.engine.clone());
        crate::context::with_run(Some(scope), || match state {
            Scheduled | Pending if loud => tracing::info!("{label} is {state}"),
            Scheduled | Pending => tracing::debug!("{label} is {state}"),
            Running if loud => tracing::info!("{label} started (attempt {})", self.attempt),
            Running => tracing::debug!("{label} started (attempt {})", self.attempt),
            Completed if loud => tracing::info!("{label} completed after {took}"),
            Completed => tracing::debug!("{label} completed after {took}"),
            Cached => tracing::info!("{label} cached: {why}"),
            AwaitingRetry => tracing::warn!("{label} {why}"),
            Failed | Crashed | TimedOut => tracing::error!("{label} {state} after {took}: {why}"),
            // Cancelled, rolled back, and any state added later.
            _ => tracing::warn!("{label} {state} after {took}: {why}"),
        });
    }
}

/// `KILN_TASK_LOG=info`: task runs' starts and completions are INFO lines (printed and
/// captured), as some users of other orchestrators expect; they cost a trivial task run
/// about twice its time (docs/PERFORMANCE.md), so the default is DEBUG.
fn routine_at_info() -> bool {
    static AT_INFO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AT_INFO.get_or_init(|| std::env::var("KILN_TASK_LOG").is_ok_and(|v| v.trim().eq_ignore_ascii_case("info")))
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.state.is_some_and(|s| !s.is_terminal()) {
            let _ = self.to(
                StateType::Cancelled,
                Some("stopped before it finished: its caller was cancelled or its flow run ended".into()),
            );
        }
    }
}

/// Decides whether and where a run persists its value; fails before any work when the
/// storage is unknown or the type has no serializer.
///
/// `implied`: a feature needs the result persisted (a flow with retries). Like
/// `persist_by_default`, it applies where the type has a serializer and is silent elsewhere;
/// only `persist`/`storage` on the task make a missing serializer an error.
pub(crate) fn persist_plan<B: Body>(
    body: &B,
    engine: &Engine,
    options: &Options<B::Error>,
    label: &RunLabel,
    implied: bool,
    caching: bool,
) -> Result<Option<Plan<B::Output>>, ResultError> {
    // Asked for on the task (or at call time): a type without a serializer is an error.
    // Wanted by a setting or a feature: applied where the type allows it.
    let explicit = caching || options.persist.unwrap_or(options.storage.is_some());
    let wanted = explicit || (options.persist.is_none() && (implied || engine.persist_by_default()));
    if !wanted {
        return Ok(None);
    }
    let Some(serializer) = body.serializer(engine.default_serializer()) else {
        if !explicit {
            tracing::debug!(
                "{label}: not persisted, its type {} has no serializer",
                short_type::<B::Output>()
            );
            return Ok(None);
        }
        return Err(ResultError::NotPersistable(format!(
            "{label} must persist its result, but its type {} has no serializer: name one on the task \
             (`serializer = Png`, or your own) or derive Serialize and Deserialize for the type",
            short_type::<B::Output>()
        )));
    };
    let storage = options.storage.clone().unwrap_or_else(|| engine.default_storage());
    engine.storage(&storage)?;
    Ok(Some(Plan {
        storage,
        template: options.storage_key.clone(),
        serializer,
    }))
}

/// What a run needs to persist its value: the plan and the rendered key.
pub(crate) struct Persisting<T> {
    pub(crate) plan: Plan<T>,
    pub(crate) key: StorageKey,
    /// When the record stops counting (cached results).
    pub(crate) expires: Option<i64>,
    /// Said on the Completed state (why a cached record was not used).
    pub(crate) note: Option<String>,
    /// The call's identity, recorded with the result so a retry can match it.
    pub(crate) call: Option<String>,
    /// A small record may live in the state database (no key template, no cache, no
    /// transaction: nothing expects it at a key).
    pub(crate) inline: bool,
}

/// Fills in the key of a planned persistence (before the run starts: a bad template fails early).
pub(crate) fn persisting<B: Body>(
    plan: Option<Plan<B::Output>>,
    label: &RunLabel,
    flow_run: Option<(Uuid, &str)>,
    args: &B::Args,
) -> Result<Option<Persisting<B::Output>>, ResultError> {
    let Some(plan) = plan else { return Ok(None) };
    let parameters = plan.needs_parameters().then(|| B::parameters(args));
    let inline = plan.template.is_none();
    let key = persist::render_key(
        plan.template.as_deref(),
        &KeyFields {
            run_id: label.id,
            run_name: &label.name,
            flow_run,
            parameters: parameters.as_ref(),
        },
    )?;
    Ok(Some(Persisting {
        plan,
        key,
        expires: None,
        note: None,
        call: None,
        inline,
    }))
}

/// The longest pause between two asks for a slot: how late at most a waiting task run
/// learns that a slot has freed.
const SLOT_POLL_MAX: Duration = Duration::from_millis(500);

/// Waits until the store grants this task run a slot of each of its limited tags; the run
/// stays Pending (or AwaitingRetry) meanwhile, and its caller may cancel it.
async fn wait_for_slots(tracker: &Tracker) -> Result<(), Error> {
    use kiln_store::limit::{SlotRequest, Slots};
    let store = tracker.engine.store();
    // The store counts holders by their runs' states: this run's record goes first.
    store.flush().await?;
    let request = SlotRequest {
        run_id: tracker.id(),
        tags: tracker.slot_tags.clone(),
    };
    let mut pause = Duration::from_millis(5);
    let mut told = false;
    loop {
        match store.acquire_slots(&request).await {
            Ok(Slots::Granted) => {
                if told {
                    tracing::info!("{} got its slot and starts", tracker.label);
                }
                return Ok(());
            }
            Ok(Slots::Busy { tag, slots }) if !told => {
                tracing::info!(
                    "{} waits for a slot of tag '{tag}': all {slots} are in use (see `kiln limit ls`)",
                    tracker.label
                );
                told = true;
            }
            Ok(Slots::Busy { .. }) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!("{} cannot ask for its concurrency slots yet: {e}", tracker.label);
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(SLOT_POLL_MAX);
    }
}

/// Runs attempts of `B` until one succeeds, the retries are spent, or retry_if says no.
pub(crate) async fn attempts<B: Body>(
    tracker: &mut Tracker,
    options: &Options<B::Error>,
    args: B::Args,
    flow_run_id: Option<Uuid>,
    persisting: Option<Persisting<B::Output>>,
    // A task run's transaction: its record is staged and its Completed state deferred.
    tx: Option<&TransactionContext>,
    // Wraps each attempt's body (flows run theirs inside their context and join children).
    wrap: impl Fn(BoxFuture<'static, Result<B::Output, B::Error>>) -> BoxFuture<'static, Result<B::Output, B::Error>>,
) -> Result<Done<B::Output>, Failure<B::Error>> {
    let mut max_attempts = options.max_attempts();
    if max_attempts > 1 && B::clone_args(&args).is_none() {
        tracing::warn!(
            "{} has retries={} but its arguments are not Clone, so it cannot be retried; running it once",
            tracker.label,
            max_attempts - 1
        );
        max_attempts = 1;
    }
    let mut args = Some(args);
    loop {
        let scope = RunScope::new(tracker.id(), flow_run_id, tracker.engine.clone());
        // Dropped before its body returns (the run was cancelled): a synchronous body still
        // running on its thread learns it through kiln::cancelled().
        let _stop = StopOnDrop(scope.clone());
        if !tracker.slot_tags.is_empty() {
            wait_for_slots(tracker).await?;
        }
        tracker.attempt += 1;
        tracker.to(StateType::Running, None)?;
        let last = tracker.attempt >= max_attempts;
        let attempt_args = if last {
            args.take().expect("arguments are kept until the last attempt")
        } else {
            B::clone_args(args.as_ref().expect("arguments are kept until the last attempt"))
                .expect("arguments were Clone before the first attempt")
        };
        let body = InRun {
            scope: scope.clone(),
            inner: wrap(B::run(attempt_args)),
        };
        let mut guarded = std::pin::pin!(AssertUnwindSafe(body).catch_unwind());
        let outcome = match options.timeout {
            Some(limit) => tokio::time::timeout(limit, &mut guarded).await.ok(),
            None => Some(guarded.as_mut().await),
        };
        // A synchronous body that timed out is still running on its thread: ask it to stop.
        let mut still_running = None;
        if outcome.is_none() {
            scope.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            if scope.blocking_in_flight() {
                still_running = Some(guarded);
            }
        }
        let retry_message = match outcome {
            Some(Ok(Ok(value))) => match succeeded::<B>(tracker, persisting.as_ref(), tx, value, !last).await? {
                Persisted::Done(done) => return Ok(done),
                // The storage failed in a way that may pass (unreachable, throttled): the
                // attempt counts as failed and the next one runs after the retry delay.
                Persisted::Retry(message) => message,
            },
            Some(Ok(Err(error))) => {
                let message = B::describe_error(&error);
                if last || !options.should_retry(&error) {
                    tracker.to(StateType::Failed, Some(message.clone()))?;
                    return Err(Failure::Body {
                        error,
                        message,
                        attempts: tracker.attempt,
                    });
                }
                message
            }
            Some(Err(panic)) => {
                let message = panic_message(&*panic);
                tracker.to(StateType::Crashed, Some(format!("panicked: {message}")))?;
                return Err(Failure::Kiln(Error::Crashed {
                    run: tracker.label.clone(),
                    message,
                }));
            }
            None => {
                let after = options.timeout.unwrap_or_default();
                let running = if still_running.is_some() {
                    "; its synchronous body is still running and was asked to stop (kiln::cancelled())"
                } else {
                    ""
                };
                if last {
                    tracker.to(
                        StateType::TimedOut,
                        Some(format!("exceeded its timeout of {after:?}{running}")),
                    )?;
                    return Err(Failure::Kiln(Error::TimedOut {
                        run: tracker.label.clone(),
                        after,
                    }));
                }
                format!("exceeded its timeout of {after:?}{running}")
            }
        };
        let delay = options.delay_before(tracker.attempt);
        let wait = if still_running.is_some() {
            format!("once its body has returned, and in {} at the earliest", human(delay))
        } else {
            format!("in {}", human(delay))
        };
        tracker.to(
            StateType::AwaitingRetry,
            Some(format!(
                "attempt {} of {max_attempts} failed: {retry_message}; retrying {wait}",
                tracker.attempt,
            )),
        )?;
        // Attempts never overlap: the next starts after the delay and after the timed-out
        // synchronous body has returned (its late result is dropped).
        let returned = async {
            if let Some(body) = still_running {
                let _ = body.await;
                tracing::debug!("{}: the timed-out synchronous body returned", tracker.label);
            }
        };
        tokio::join!(returned, tokio::time::sleep(delay));
    }
}

/// Tells an attempt's bodies to stop when the attempt is over, however it ended.
struct StopOnDrop(Arc<crate::context::RunScope>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A successful run's value, and, inside a transaction, the Completed state it enters when
/// the transaction commits.
pub(crate) struct Done<T> {
    pub(crate) value: T,
    pub(crate) deferred: Option<Completion>,
}

impl<T> Done<T> {
    pub(crate) fn now(value: T) -> Self {
        Done { value, deferred: None }
    }
}

/// What a Completed state will carry: the result reference and a note.
pub(crate) struct Completion {
    pub(crate) reference: Option<ResultRef>,
    pub(crate) note: Option<String>,
}

/// What became of a successful body's value.
enum Persisted<T> {
    /// Persisted (or nothing to persist), and the run entered its state.
    Done(Done<T>),
    /// Its record could not be written for a reason that may pass: retry the attempt.
    Retry(String),
}

/// The body returned a value: persist it (to a staging key inside a transaction), then
/// enter Completed, or, inside a transaction, leave that to the commit. A storage error
/// that may pass is a retry when `may_retry` (attempts remain), else the run fails.
async fn succeeded<B: Body>(
    tracker: &mut Tracker,
    persisting: Option<&Persisting<B::Output>>,
    tx: Option<&TransactionContext>,
    value: B::Output,
    may_retry: bool,
) -> Result<Persisted<B::Output>, Failure<B::Error>> {
    let mut value = value;
    let mut reference = None;
    if let Some(p) = persisting {
        let key = tx.map_or_else(|| p.key.clone(), |tx| tx.staging_key(&p.key));
        let (id, name) = (tracker.id(), tracker.label.name.clone());
        let inline_max = (p.inline && tx.is_none()).then(|| tracker.engine.inline_max());
        // Boxed: its state would otherwise make every run's future larger (see `execute`).
        let persisted = Box::pin(persist::persist(
            &tracker.engine,
            &p.plan,
            key.clone(),
            p.expires,
            (id, &name),
            inline_max,
            value,
        ))
        .await;
        let (v, mut r) = match persisted {
            Ok(done) => done,
            Err((_, e)) if may_retry && e.is_retryable() => {
                return Ok(Persisted::Retry(format!(
                    "its body succeeded, but its result could not be persisted: {e}"
                )));
            }
            Err((_, e)) => {
                tracker.to(
                    StateType::Failed,
                    Some(format!(
                        "its body succeeded, but its result could not be persisted: {e}"
                    )),
                )?;
                return Err(Failure::Kiln(e.into()));
            }
        };
        r.call = p.call.clone();
        if let Some(tx) = tx {
            tx.stage(
                tracker.engine.storage(&p.plan.storage).map_err(Error::from)?,
                key,
                p.key.clone(),
            );
            r.key = p.key.to_string();
        }
        value = v;
        reference = Some(r);
    }
    let completion = Completion {
        reference,
        note: persisting.and_then(|p| p.note.clone()),
    };
    if tx.is_some() {
        return Ok(Persisted::Done(Done {
            value,
            deferred: Some(completion),
        }));
    }
    tracker.enter_with_result(StateType::Completed, completion.note, completion.reference.as_ref())?;
    Ok(Persisted::Done(Done::now(value)))
}

fn human(d: Duration) -> String {
    if d.is_zero() { "0s".into() } else { format!("{d:?}") }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic payload that is not a string)".into())
}
