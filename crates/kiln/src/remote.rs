//! Task runs on other machines: a task with a `pool` is queued in that work pool and run by
//! a worker serving it (`kiln::serve().pool("gpu")`), in another process or on another
//! machine running a binary that holds the task.
//!
//! This is where results must be persisted: a value cannot cross to another machine in
//! memory. The caller writes each input as a record (small ones inline in the reference),
//! queues the task run with their references, and waits for it to end; the worker loads
//! the inputs, runs the body with the claim's fencing token, persists the output, and the
//! caller loads it. The storage must be one both reach: `memory` is refused before anything
//! is queued, and a `local` folder pins the run to workers on the caller's host.
//!
//! Workers find a task by its key (module path and function name) in a registry that
//! `#[task]` fills, so any binary that contains the task can run it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_store::model::{RunKind, TaskRun, Write, now_micros};
use kiln_store::state::StateType;
use kiln_store::work::{Claim, QueueEntry};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::RunLabel;
use crate::result::persist::{self, Plan};
use crate::result::{ResultRef, StorageKey};
use crate::run::{self, Done, Failure, Problems, Tracker};
use crate::serializer::{Serializer, short_type};
use crate::{Engine, Error, Options, Task};

/// A task this binary can run for a worker: its key and how to run a claim of it.
#[doc(hidden)]
#[derive(Debug)]
pub struct RemoteTask {
    /// The task's key ([`Body::KEY`]).
    pub key: &'static str,
    /// Runs one claimed task run to its end.
    pub run: fn(Engine, Claim, crate::__private::CancelReceiver) -> BoxFuture<'static, ()>,
}

inventory::collect!(RemoteTask);

/// The tasks this binary holds, by key.
pub(crate) fn registry() -> impl Iterator<Item = &'static RemoteTask> {
    inventory::iter::<RemoteTask>.into_iter()
}

/// What a queued task run's worker is handed besides its row.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    /// Each input's record, by parameter name.
    inputs: serde_json::Map<String, serde_json::Value>,
    /// The storage the output goes to (the caller's plan).
    storage: String,
    /// The flow run that called it, and that flow's name.
    #[serde(default)]
    flow_run: Option<(Uuid, String)>,
}

/// What a caller needs to persist one input.
#[doc(hidden)]
#[derive(Clone)]
pub struct InputContext {
    engine: Engine,
    storage: Arc<str>,
    run_id: Uuid,
    run_name: Arc<str>,
}

/// One argument of a task run, ready to be written as a record.
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub struct RemoteInput {
    name: &'static str,
    persist: Box<dyn FnOnce(InputContext) -> BoxFuture<'static, Result<ResultRef, Error>> + Send>,
}

impl std::fmt::Debug for RemoteInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteInput").field("name", &self.name).finish()
    }
}

impl RemoteInput {
    /// The argument `name` with the serializer its type has (`None`: it cannot cross).
    pub fn new<T: Send + 'static>(name: &'static str, value: T, serializer: Option<Arc<dyn Serializer<T>>>) -> Self {
        let persist = move |ctx: InputContext| -> BoxFuture<'static, Result<ResultRef, Error>> {
            Box::pin(async move {
                let Some(serializer) = serializer else {
                    return Err(Error::Setup(format!(
                        "{}: its input '{name}' of type {} cannot cross to a worker: it has no serializer \
                         (derive Serialize and Deserialize for it, or pass a key to a persisted object)",
                        ctx.run_name,
                        short_type::<T>()
                    )));
                };
                let plan = Plan {
                    storage: ctx.storage.clone(),
                    template: None,
                    serializer,
                };
                let key = StorageKey::new(format!("inputs/{}/{name}", ctx.run_id))
                    .map_err(crate::result::ResultError::InvalidKey)?;
                let inline = Some(ctx.engine.inline_max());
                persist::persist(
                    &ctx.engine,
                    &plan,
                    key,
                    None,
                    (ctx.run_id, &ctx.run_name),
                    inline,
                    value,
                )
                .await
                .map(|(_, reference)| reference)
                .map_err(|(_, e)| e.into())
            })
        };
        RemoteInput {
            name,
            persist: Box::new(persist),
        }
    }
}

/// The inputs of a claimed task run, loaded by parameter name.
#[doc(hidden)]
#[derive(Debug)]
pub struct LoadedInputs {
    engine: Engine,
    refs: serde_json::Map<String, serde_json::Value>,
    reader: String,
}

impl LoadedInputs {
    /// Loads input `name` with the serializer `serializer_for` gives for the serializer
    /// name its record carries (the caller's default may differ from this process's).
    pub async fn take<T: Send + 'static>(
        &self,
        name: &str,
        serializer_for: impl Fn(&str) -> Option<Arc<dyn Serializer<T>>>,
    ) -> Result<T, String> {
        let reference: ResultRef = self
            .refs
            .get(name)
            .cloned()
            .and_then(|r| serde_json::from_value(r).ok())
            .ok_or_else(|| format!("input '{name}' is missing from the queued run"))?;
        let serializer = serializer_for(&reference.serializer)
            .ok_or_else(|| format!("input '{name}' of type {} has no serializer", short_type::<T>()))?;
        persist::load(&self.engine, &reference, serializer, &self.reader)
            .await
            .map_err(|e| format!("cannot load input '{name}': {e}"))
    }
}

/// Watches a queued task run from the caller: asks it to stop if the caller goes away first.
struct Waiting {
    engine: Engine,
    id: Uuid,
    done: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (store, id) = (self.engine.store().clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = crate::deployment::cancel(&*store, id).await {
                    tracing::warn!("cannot cancel task run {id}, whose caller stopped: {e}");
                }
            });
        }
    }
}

/// The caller's side: persists the inputs, queues the task run in `pool`, waits for it to
/// end and loads its result.
pub(crate) async fn call<T: Task>(
    tracker: &mut Tracker,
    options: &Options<T::Error>,
    flow_run: Option<(Uuid, Arc<str>)>,
    plan: Option<Plan<T::Output>>,
    args: T::Args,
    pool: &str,
) -> Result<Done<T::Output>, Failure<T::Error>> {
    let label = tracker.label.clone();
    let engine = tracker.engine.clone();
    let fail = |tracker: &mut Tracker, message: String| -> Failure<T::Error> {
        if let Err(e) = tracker.to(StateType::Failed, Some(message.clone())) {
            return Failure::Kiln(e);
        }
        Failure::Kiln(Error::Setup(message))
    };
    let Some(plan) = plan else {
        let message = format!(
            "{label} runs in pool '{pool}', on a worker: its {} result must cross back as a record, but it is not \
             persisted; give the task a storage both reach (`storage = \"...\"`)",
            short_type::<T::Output>()
        );
        return Err(fail(tracker, message));
    };
    let storage = match engine.storage(&plan.storage) {
        Ok(s) => s,
        Err(e) => return Err(fail(tracker, e.to_string())),
    };
    let host = match storage.kind() {
        "memory" => {
            let message = format!(
                "{label} runs in pool '{pool}', on a worker in another process: its records go to storage '{}', \
                 which is memory of this process and cannot reach it; use a storage both reach (s3, gcs, azure, \
                 or a local folder on one host)",
                plan.storage
            );
            return Err(fail(tracker, message));
        }
        "local" => {
            let host = crate::heartbeat::host_name();
            // Said once per task and storage, not for every run of a fan-out.
            static SAID: std::sync::Mutex<Vec<(&'static str, String)>> = std::sync::Mutex::new(Vec::new());
            let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
            if !said.iter().any(|(k, s)| *k == T::KEY && **s == *plan.storage) {
                said.push((T::KEY, plan.storage.to_string()));
                tracing::info!(
                    "{} runs in pool '{pool}' with records in the local storage '{}': only workers on this host ({host}) \
                     can run it",
                    label.name,
                    plan.storage
                );
            }
            Some(host)
        }
        _ => None,
    };
    let ctx = InputContext {
        engine: engine.clone(),
        storage: plan.storage.clone(),
        run_id: label.id,
        run_name: Arc::from(label.to_string()),
    };
    let mut inputs = serde_json::Map::new();
    for input in T::remote_inputs(args, engine.default_serializer()) {
        match (input.persist)(ctx.clone()).await {
            Ok(reference) => {
                inputs.insert(
                    input.name.to_owned(),
                    serde_json::to_value(&reference).expect("a reference serializes"),
                );
            }
            Err(e) => return Err(fail(tracker, e.to_string())),
        }
    }
    let payload = Payload {
        inputs,
        storage: plan.storage.to_string(),
        flow_run: flow_run.map(|(id, name)| (id, name.to_string())),
    };
    tracker.send(Write::Enqueue(QueueEntry {
        run_id: label.id,
        kind: RunKind::Task,
        pool: pool.to_owned(),
        deployment: None,
        target: T::KEY.to_owned(),
        scheduled: now_micros(),
        max_attempts: options.max_attempts(),
        host,
        payload: serde_json::to_value(&payload).expect("a payload serializes"),
    }))?;
    // The worker moves the run from here on; this side only watches.
    tracker.state = None;
    let mut waiting = Waiting {
        engine: engine.clone(),
        id: label.id,
        done: false,
    };
    let run = wait_until_done(&engine, label.id).await?;
    waiting.done = true;
    match run.state {
        StateType::Completed | StateType::Cached => {
            let reference: ResultRef = run
                .result
                .and_then(|r| serde_json::from_value(r).ok())
                .ok_or_else(|| Error::Setup(format!("{label} completed on its worker without a result record")))?;
            let value = persist::load(&engine, &reference, plan.serializer.clone(), &label.to_string())
                .await
                .map_err(Error::from)?;
            Ok(Done::now(value))
        }
        state => Err(Failure::Kiln(Error::Failed {
            run: label,
            attempts: run.attempt,
            message: format!(
                "{state} on its worker: {}",
                run.state_message.as_deref().unwrap_or("no message")
            ),
        })),
    }
}

/// Waits for a task run to reach a final state, through the engine's [`Watcher`].
async fn wait_until_done(engine: &Engine, id: Uuid) -> Result<kiln_store::model::TaskRun, Error> {
    let watcher = engine.watcher();
    // Dropped last: a waiter cancelled meanwhile leaves nothing behind.
    let _gone = Unregister { watcher, id };
    let (tx, mut answer) = futures::channel::oneshot::channel();
    watcher.waiting.lock().unwrap_or_else(|p| p.into_inner()).add(id, tx);
    let gone = |_| Error::Setup(format!("task run {id}: its watcher stopped"));
    loop {
        // One waiter polls for everyone until its own run has ended, then hands over; the
        // others sleep until their answer comes or the poller hands over (no timers: with
        // thousands waiting, waking each one every millisecond would cost more than the runs).
        let Ok(poll) = watcher.poll.try_lock() else {
            tokio::select! {
                run = &mut answer => return run.map_err(gone),
                _ = watcher.handover.notified() => continue,
            }
        };
        let mut poller = Poller {
            poll: Some(poll),
            watcher,
        };
        loop {
            let poll = poller.poll.as_mut().expect("held until the poller is dropped");
            let pause = match poll.once(watcher, engine.store().as_ref()).await {
                Ok(pause) => pause,
                // The run goes on on its worker: a store that is briefly unreachable does
                // not fail the call that waits for it.
                Err(e) if e.is_retryable() => {
                    tracing::warn!("cannot look up the task runs this process waits for: {e}; trying again");
                    POLL_MAX
                }
                Err(e) => return Err(e.into()),
            };
            if let Ok(Some(run)) = answer.try_recv() {
                return Ok(run);
            }
            poll.idle(pause).await;
        }
    }
}

/// The waiter that polls: when it stops (answered, failed or cancelled), it lets go of the
/// poll, then wakes another waiter to take it.
struct Poller<'a> {
    poll: Option<tokio::sync::MutexGuard<'a, Poll>>,
    watcher: &'a Watcher,
}

impl Drop for Poller<'_> {
    fn drop(&mut self) {
        drop(self.poll.take());
        self.watcher.handover.notify_one();
    }
}

/// The shortest and longest pause between two looks at the runs being waited for, when
/// the store does not announce ended runs: a short task is seen within a few milliseconds;
/// while nothing ends, looks slow down.
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(100);

/// When the store announces ended runs, the pause between two looks at every run waited
/// for all the same (in case an announcement was lost without word).
const SWEEP: Duration = Duration::from_secs(1);

/// How many waiting runs the watcher looks up per second at most (see [`Poll::once`]).
const LOOKUPS_PER_SECOND: f64 = 50_000.0;

/// Follows the task runs this process waits for on workers with one query for all of them
/// (however many thousands wait), rather than one per waiting call; where the store
/// announces the runs that end ([`Store::ended_runs`](kiln_store::Store::ended_runs)), it
/// looks up those it is told of.
#[derive(Default)]
pub(crate) struct Watcher {
    /// Who waits for which run.
    waiting: std::sync::Mutex<Waiters>,
    /// Held by the caller that polls.
    poll: tokio::sync::Mutex<Poll>,
    /// Wakes one waiter to poll in place of the one that stopped.
    handover: tokio::sync::Notify,
}

/// Who waits for which run, in the order the runs were first waited for.
#[derive(Default)]
struct Waiters {
    by_run: std::collections::HashMap<Uuid, (u64, Vec<futures::channel::oneshot::Sender<TaskRun>>)>,
    order: std::collections::BTreeMap<u64, Uuid>,
    next: u64,
}

/// How many of the runs waited for longest every look includes, and how many of the others
/// it takes in turn (see [`Waiters::pick`]).
const OLDEST: usize = 500;
const IN_TURN: usize = 500;

impl Waiters {
    fn add(&mut self, id: Uuid, tx: futures::channel::oneshot::Sender<TaskRun>) {
        let next = &mut self.next;
        let order = &mut self.order;
        let (_, list) = self.by_run.entry(id).or_insert_with(|| {
            let seq = *next;
            *next += 1;
            order.insert(seq, id);
            (seq, Vec::new())
        });
        list.push(tx);
    }

    /// Everyone waiting for `id`, forgotten.
    fn take(&mut self, id: Uuid) -> Vec<futures::channel::oneshot::Sender<TaskRun>> {
        match self.by_run.remove(&id) {
            Some((seq, list)) => {
                self.order.remove(&seq);
                list
            }
            None => Vec::new(),
        }
    }

    /// Forgets the waiters of `id` that have gone.
    fn forget_gone(&mut self, id: Uuid) {
        if let Some((_, list)) = self.by_run.get_mut(&id) {
            list.retain(|tx| !tx.is_canceled());
            if list.is_empty() {
                self.take(id);
            }
        }
    }

    /// The runs to look up now, at most OLDEST + IN_TURN: those waited for longest (work
    /// pools hand runs out oldest first, so they end first), then the next of the others
    /// from `cursor` on, which moves past them (back to the start after the last).
    fn pick(&self, cursor: &mut u64) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self.order.values().take(OLDEST).copied().collect();
        let Some((&rest, _)) = self.order.iter().nth(OLDEST) else {
            return ids;
        };
        let turn: Vec<(u64, Uuid)> = self
            .order
            .range((*cursor).max(rest)..)
            .take(IN_TURN)
            .map(|(seq, id)| (*seq, *id))
            .collect();
        *cursor = match turn.last() {
            Some((seq, _)) if turn.len() == IN_TURN => seq + 1,
            _ => 0,
        };
        ids.extend(turn.into_iter().map(|(_, id)| id));
        ids
    }
}

/// When the last look at every waiting run happened, the pause until the next, where the
/// next look's turn through the runs waited for starts, and the store's announcements of
/// ended runs.
struct Poll {
    last: Option<tokio::time::Instant>,
    pause: Duration,
    cursor: u64,
    /// The store's announcements, once asked for (`Some(None)`: it makes none).
    ended: Option<Option<tokio::sync::broadcast::Receiver<kiln_store::work::Ended>>>,
    /// Runs announced and not looked up yet (of this process or not).
    announced: Vec<Uuid>,
    /// Every waiting run must be looked up at the next look: announcements may be lost.
    sweep: bool,
}

impl Default for Poll {
    fn default() -> Self {
        Poll {
            last: None,
            pause: POLL_MIN,
            cursor: 0,
            ended: None,
            announced: Vec::new(),
            sweep: true,
        }
    }
}

impl Poll {
    /// Looks up the waited-for runs that have ended and hands each to its waiters: those
    /// announced since the last look, and every one when the last look at all of them was
    /// a pause ago (or announcements were lost); the pause before the next look at all.
    async fn once(
        &mut self,
        watcher: &Watcher,
        store: &dyn kiln_store::Store,
    ) -> Result<Duration, kiln_store::StoreError> {
        if self.ended.is_none() {
            self.ended = Some(store.ended_runs());
        }
        self.drain();
        let announcing = matches!(self.ended, Some(Some(_)));
        let all = self.sweep || self.last.is_none_or(|last| last.elapsed() >= self.pause);
        let ids = {
            let waiting = watcher.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let mut ids: Vec<Uuid> = self
                .announced
                .drain(..)
                .filter(|id| waiting.by_run.contains_key(id))
                .collect();
            if announcing && self.sweep {
                // Announcements may have been lost: every run waited for, at once.
                ids.extend(waiting.order.values());
            } else if all {
                ids.extend(waiting.pick(&mut self.cursor));
            }
            ids
        };
        if all {
            self.last = Some(tokio::time::Instant::now());
            self.sweep = false;
        }
        let mut ended = 0;
        for chunk in ids.chunks(kiln_store::MAX_LOOKUP) {
            let runs = match store.task_runs_in(chunk, &kiln_store::state::FINAL).await {
                Ok(runs) => runs,
                Err(e) => {
                    // What this look was to find is looked for again, all of it.
                    self.sweep = true;
                    return Err(e);
                }
            };
            for run in runs {
                let waiters = watcher.waiting.lock().unwrap_or_else(|p| p.into_inner()).take(run.id);
                for tx in waiters {
                    let _ = tx.send(run.clone());
                }
                ended += 1;
            }
        }
        if all {
            // A look costs the database one index lookup per waiting run: with thousands
            // waiting, looks are spaced so that it does at most LOOKUPS_PER_SECOND of them.
            let floor = POLL_MIN.max(Duration::from_secs_f64(ids.len() as f64 / LOOKUPS_PER_SECOND));
            self.pause = if announcing {
                floor.max(SWEEP)
            } else if ended > 0 {
                floor
            } else {
                (self.pause * 2).clamp(floor, POLL_MAX.max(floor))
            };
        }
        let since = self.last.map_or(Duration::ZERO, |last| last.elapsed());
        Ok(self.pause.saturating_sub(since))
    }

    /// Takes in the announcements that have arrived, without waiting.
    fn drain(&mut self) {
        use tokio::sync::broadcast::error::TryRecvError;
        let Some(Some(receiver)) = self.ended.as_mut() else {
            return;
        };
        loop {
            match receiver.try_recv() {
                Ok(kiln_store::work::Ended::Runs(ids)) => self.announced.extend(ids.iter()),
                Ok(kiln_store::work::Ended::Missed) | Err(TryRecvError::Lagged(_)) => self.sweep = true,
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Closed) => {
                    self.ended = Some(None);
                    self.sweep = true;
                    return;
                }
            }
        }
    }

    /// Waits `pause`, or less when the store announces that runs ended.
    async fn idle(&mut self, pause: Duration) {
        use tokio::sync::broadcast::error::RecvError;
        let Some(Some(receiver)) = self.ended.as_mut() else {
            return tokio::time::sleep(pause).await;
        };
        match tokio::time::timeout(pause, receiver.recv()).await {
            Err(_) => {}
            Ok(Ok(kiln_store::work::Ended::Runs(ids))) => self.announced.extend(ids.iter()),
            Ok(Ok(kiln_store::work::Ended::Missed) | Err(RecvError::Lagged(_))) => self.sweep = true,
            Ok(Err(RecvError::Closed)) => {
                self.ended = Some(None);
                self.sweep = true;
            }
        }
    }
}

/// Forgets a waiter that has gone (answered, or cancelled).
struct Unregister<'a> {
    watcher: &'a Watcher,
    id: Uuid,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.watcher
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget_gone(self.id);
    }
}

/// The worker's side: loads the inputs of a claimed task run, runs its attempts with the
/// claim's fencing token and persists its output.
#[doc(hidden)]
pub fn run_claimed<T: Task>(
    task: T,
    engine: Engine,
    claim: Claim,
    cancel: crate::__private::CancelReceiver,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let scope = engine.clone();
        scope.scope(run_claimed_inner(task, engine, claim, cancel)).await;
    })
}

async fn run_claimed_inner<T: Task>(task: T, engine: Engine, claim: Claim, cancel: crate::__private::CancelReceiver) {
    let options = Arc::new(
        Options::new()
            .retries(claim.max_attempts.saturating_sub(1))
            .over(&task.options()),
    );
    let name = options.name.clone().unwrap_or_else(|| Arc::from(T::NAME));
    let label = RunLabel {
        kind: RunKind::Task,
        name,
        id: claim.run_id,
    };
    let problems = Arc::new(Problems::default());
    let mut tracker = Tracker::adopt(label.clone(), engine.clone(), &claim, problems.clone());
    tracker.slot_tags = claim.tags.clone();
    let outcome = async {
        let payload: Payload = serde_json::from_value(claim.parameters.clone())
            .map_err(|e| format!("its queued inputs cannot be read: {e}"))?;
        let loaded = LoadedInputs {
            engine: engine.clone(),
            refs: payload.inputs,
            reader: label.to_string(),
        };
        let args = T::remote_args(loaded).await?;
        let mut plan = run::persist_plan(&task, &engine, &options, &label, true, true)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "its result cannot be persisted".to_owned())?;
        plan.storage = Arc::from(payload.storage.as_str());
        let flow_run = payload.flow_run.as_ref().map(|(id, name)| (*id, name.as_str()));
        let persisting = run::persisting::<T>(Some(plan), &label, flow_run, &args).map_err(|e| e.to_string())?;
        Ok::<_, String>((args, persisting, flow_run.map(|f| f.0)))
    }
    .await;
    let (args, persisting, flow_run_id) = match outcome {
        Ok(ready) => ready,
        Err(message) => {
            tracing::error!("{label}: {message}");
            if tracker.to(StateType::Failed, Some(message)).is_ok() {
                let _ = problems.recorded(&engine, &label).await;
            }
            return;
        }
    };
    let stopped = {
        let run = run::attempts::<T>(&mut tracker, &options, args, flow_run_id, persisting, None, |b| b);
        tokio::select! {
            outcome = run => Err(outcome.map(drop)),
            stop = crate::worker::stop_requested(cancel) => Ok(stop),
        }
    };
    match stopped {
        Ok(crate::worker::Stop::Cancel(state)) => {
            tracker.state = Some(state);
            if state == StateType::Cancelling {
                let _ = tracker.to(StateType::Cancelled, Some("cancelled; its worker stopped it".into()));
            }
        }
        // Another worker runs it now: this one records nothing more of it.
        Ok(crate::worker::Stop::ClaimLost) => tracker.state = None,
        Err(_) => {}
    }
    drop(tracker);
    if let Err(e) = problems.recorded(&engine, &label).await {
        tracing::warn!("{label}: {e}");
    }
}

/// Support for `#[task]`: the serializer an input of type `T` crosses with.
#[doc(hidden)]
pub mod probe {
    use super::*;
    use crate::__private::TypeProbe;

    /// Images cross as raw pixels (exact, and the fastest to write and read).
    pub trait ViaImageInput<T> {
        /// The serializer.
        fn kiln_input_serializer(&self, default: &str) -> Option<Arc<dyn Serializer<T>>>;
    }
    #[cfg(feature = "images")]
    impl<T: crate::serializer::ImageValue> ViaImageInput<T> for &&TypeProbe<T> {
        fn kiln_input_serializer(&self, _default: &str) -> Option<Arc<dyn Serializer<T>>> {
            Some(Arc::new(crate::serializer::RawPixels))
        }
    }
    /// Serde values cross with the default serializer.
    pub trait ViaSerdeInput<T> {
        /// The serializer.
        fn kiln_input_serializer(&self, default: &str) -> Option<Arc<dyn Serializer<T>>>;
    }
    impl<T: Serialize + serde::de::DeserializeOwned + 'static> ViaSerdeInput<T> for &TypeProbe<T> {
        fn kiln_input_serializer(&self, default: &str) -> Option<Arc<dyn Serializer<T>>> {
            Some(match default {
                "json" => Arc::new(crate::serializer::Json),
                _ => Arc::new(crate::serializer::MsgPack),
            })
        }
    }
    /// Anything else cannot cross.
    pub trait NoInput<T> {
        /// `None`.
        fn kiln_input_serializer(&self, default: &str) -> Option<Arc<dyn Serializer<T>>>;
    }
    impl<T> NoInput<T> for TypeProbe<T> {
        fn kiln_input_serializer(&self, _default: &str) -> Option<Arc<dyn Serializer<T>>> {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_take_the_oldest_waiting_runs_and_the_others_in_turn() {
        let mut waiters = Waiters::default();
        let ids: Vec<Uuid> = (0..1200).map(|_| Uuid::now_v7()).collect();
        let mut receivers = Vec::new();
        for id in &ids {
            let (tx, rx) = futures::channel::oneshot::channel();
            waiters.add(*id, tx);
            receivers.push(rx);
        }
        let mut cursor = 0;
        let first = waiters.pick(&mut cursor);
        assert_eq!(first, ids[..1000]);
        let second = waiters.pick(&mut cursor);
        assert_eq!(second[..500], ids[..500]);
        assert_eq!(second[500..], ids[1000..], "the rest of the turn");
        assert_eq!(waiters.pick(&mut cursor), first, "a new turn");
        // Answered runs leave the look; runs whose waiters have all gone too.
        assert_eq!(waiters.take(ids[0]).len(), 1);
        drop(receivers.remove(1));
        waiters.forget_gone(ids[1]);
        let mut cursor = 0;
        let after = waiters.pick(&mut cursor);
        assert_eq!(after[..500], ids[2..502]);
        assert_eq!(after[500..], ids[502..1002]);
        assert!(waiters.take(ids[0]).is_empty());
    }
}
