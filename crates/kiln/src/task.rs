//! Task runs: calling, submitting and mapping tasks, and the futures that carry their results.

use std::future::{Future, IntoFuture};
use std::sync::{Arc, MutexGuard};
use std::task::{Poll, Waker};

use futures::future::BoxFuture;
use kiln_store::model::{Edge, JsonText, NewTaskRun, RunKind, Write, now_micros};
use kiln_store::state::StateType;
use tracing::Instrument;
use uuid::Uuid;

use crate::cache::{self, CachePolicy, KeyParts};
use crate::context::{self, FlowContext};
use crate::error::RunLabel;
use crate::isolation::{self, Acquired, CacheLock};
use crate::result::persist::{self, Plan};
use crate::result::{ResultError, ResultRef, StorageKey};
use crate::run::{self, Body, Done, Failure, Tracker};
use crate::{Engine, Error, Options};

/// A function marked `#[task]`. Implemented by the macro, never by hand.
pub trait Task: Body + Clone {
    /// The arguments as given by the caller: each a value or a [`TaskFuture`].
    type Inputs: Inputs<Values = Self::Args>;
    /// The parameter names, in order.
    const ARG_NAMES: &'static [&'static str];
    /// The arguments, each ready to be written as a record (a run on a worker).
    #[doc(hidden)]
    fn remote_inputs(args: Self::Args, default: &str) -> Vec<crate::remote::RemoteInput>;
    /// The arguments, loaded from the records a caller wrote (on a worker).
    #[doc(hidden)]
    fn remote_args(inputs: crate::remote::LoadedInputs) -> BoxFuture<'static, Result<Self::Args, String>>;
}

/// One argument as given by a caller: a value, or the future result of another task run.
#[doc(hidden)]
pub enum Arg<T> {
    /// A value, moved in.
    Value(T),
    /// Another task run's result; `clone` copies it when the future is shared.
    Future(TaskFuture<T>, fn(&T) -> T),
}

impl<T> std::fmt::Debug for Arg<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arg::Value(_) => f.write_str("Arg::Value(..)"),
            Arg::Future(fut, _) => write!(f, "Arg::Future({})", fut.label),
        }
    }
}

/// What a task accepts for a parameter of type `T`: a `T`, or a [`TaskFuture<T>`] (by value
/// or by reference), which makes the task wait for it and records the dependency edge.
pub trait Input<T>: Send {
    /// Converts into the argument form.
    #[doc(hidden)]
    fn into_arg(self) -> Arg<T>;
}

impl<T: Send> Input<T> for T {
    fn into_arg(self) -> Arg<T> {
        Arg::Value(self)
    }
}

impl<T: Clone + Send + 'static> Input<T> for TaskFuture<T> {
    fn into_arg(self) -> Arg<T> {
        Arg::Future(self, T::clone)
    }
}

impl<T: Clone + Send + 'static> Input<T> for &TaskFuture<T> {
    fn into_arg(self) -> Arg<T> {
        Arg::Future(self.clone(), T::clone)
    }
}

/// An upstream run whose result a task needed did not complete.
#[doc(hidden)]
#[derive(Debug)]
pub struct UpstreamError {
    upstream: RunLabel,
    cause: Error,
}

/// How much of an argument's JSON a task run records (`kiln runs show` prints it).
const PREVIEW_BYTES: usize = 256;

/// `value` as JSON for a task run's record, as the fields to add to its input's object:
/// whole when short (`"value":...`), its first [`PREVIEW_BYTES`] otherwise
/// (`"value_start":"..."`); a long value is not written out in full to find that out.
pub(crate) fn preview<T: serde::Serialize + ?Sized>(value: &T) -> Option<String> {
    struct Capped(Vec<u8>);
    impl std::io::Write for Capped {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = PREVIEW_BYTES + 1 + VALUE_FIELD.len() - self.0.len();
            if buf.len() > room {
                self.0.extend_from_slice(&buf[..room]);
                return Err(std::io::Error::other("preview full"));
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    const VALUE_FIELD: &str = "\"value\":";
    let mut out = Capped(Vec::with_capacity(32));
    out.0.extend_from_slice(VALUE_FIELD.as_bytes());
    match serde_json::to_writer(&mut out, value) {
        // serde_json writes UTF-8.
        Ok(()) => String::from_utf8(out.0).ok(),
        Err(_) if out.0.len() > PREVIEW_BYTES + VALUE_FIELD.len() => {
            let cut = &out.0[VALUE_FIELD.len()..VALUE_FIELD.len() + PREVIEW_BYTES];
            let mut start = String::from_utf8_lossy(cut).into_owned();
            // A character cut in two is dropped.
            while start.ends_with('\u{fffd}') {
                start.pop();
            }
            Some(format!("\"value_start\":{}", serde_json::Value::String(start)))
        }
        Err(_) => None,
    }
}

/// Appends `text` as a JSON string.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("a string is written as JSON");
}

impl<T: Send + 'static> Arg<T> {
    /// The value, if given as one (not the future result of another run).
    pub fn value(&self) -> Option<&T> {
        match self {
            Arg::Value(v) => Some(v),
            Arg::Future(..) => None,
        }
    }

    fn upstream(&self) -> Option<&RunLabel> {
        match self {
            Arg::Value(_) => None,
            Arg::Future(f, _) => Some(&f.label),
        }
    }

    async fn resolve(self) -> Result<T, UpstreamError> {
        match self {
            Arg::Value(v) => Ok(v),
            Arg::Future(f, clone) => {
                let upstream = f.label.clone();
                f.take_with(clone)
                    .await
                    .map_err(|cause| UpstreamError { upstream, cause })
            }
        }
    }

    /// Appends the input's JSON object: its type, the run it comes from, and `preview`.
    fn describe(&self, out: &mut Vec<u8>, preview: Option<&str>) {
        out.extend_from_slice(b"{\"type\":");
        push_json_str(out, std::any::type_name::<T>());
        if let Arg::Future(f, _) = self {
            use std::io::Write as _;
            let _ = write!(out, ",\"upstream\":\"{}\",\"upstream_name\":", f.label.id);
            push_json_str(out, &f.label.name);
        }
        if let Some(preview) = preview {
            out.push(b',');
            out.extend_from_slice(preview.as_bytes());
        }
        out.push(b'}');
    }
}

/// A tuple of [`Arg`]s: resolved together before a task run starts.
#[doc(hidden)]
pub trait Inputs: Send + 'static {
    /// The tuple of values.
    type Values: Send + 'static;
    /// The runs these inputs come from.
    fn upstreams(&self) -> Vec<&RunLabel>;
    /// Waits for the upstream runs and takes their values.
    fn resolve(self) -> impl Future<Output = Result<Self::Values, UpstreamError>> + Send;
    /// A JSON description (types, upstream run ids, the values' `previews` by position),
    /// keyed by parameter name.
    fn describe(&self, names: &[&str], previews: &[Option<String>]) -> JsonText;
}

macro_rules! impl_inputs {
    ($($t:ident $i:tt),*) => {
        impl<$($t: Send + 'static),*> Inputs for ($(Arg<$t>,)*) {
            type Values = ($($t,)*);
            fn upstreams(&self) -> Vec<&RunLabel> {
                #[allow(unused_mut)]
                let mut v = Vec::new();
                $(v.extend(self.$i.upstream());)*
                v
            }
            #[allow(clippy::manual_async_fn)]
            fn resolve(self) -> impl Future<Output = Result<Self::Values, UpstreamError>> + Send {
                async move { Ok(($(self.$i.resolve().await?,)*)) }
            }
            #[allow(unused_variables, unused_mut)]
            fn describe(&self, names: &[&str], previews: &[Option<String>]) -> JsonText {
                let mut out = Vec::with_capacity(64);
                out.push(b'{');
                $(
                    if $i > 0 {
                        out.push(b',');
                    }
                    push_json_str(&mut out, names.get($i).copied().unwrap_or("?"));
                    out.push(b':');
                    self.$i.describe(&mut out, previews.get($i).and_then(Option::as_deref));
                )*
                out.push(b'}');
                JsonText::trusted(String::from_utf8(out).expect("JSON is UTF-8"))
            }
        }
    };
}
impl_inputs!();
impl_inputs!(A 0);
impl_inputs!(A 0, B 1);
impl_inputs!(A 0, B 1, C 2);
impl_inputs!(A 0, B 1, C 2, D 3);
impl_inputs!(A 0, B 1, C 2, D 3, E 4);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
impl_inputs!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

/// A call of a task with its arguments, not started yet.
///
/// `.await` it to run the task run in the current async task and get the task's declared
/// return value; [`submit`](Self::submit) it to run it concurrently; [`wait`](Self::wait)
/// for it from synchronous code.
#[must_use = "a task call does nothing until it is awaited, submitted or waited for"]
pub struct TaskCall<T: Task> {
    task: T,
    inputs: T::Inputs,
    /// The arguments given as values, as recorded (see [`preview`]), by position.
    previews: Vec<Option<String>>,
}

impl<T: Task> std::fmt::Debug for TaskCall<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskCall")
            .field("task", &T::NAME)
            .finish_non_exhaustive()
    }
}

impl<T: Task> TaskCall<T> {
    #[doc(hidden)]
    pub fn new(task: T, inputs: T::Inputs) -> Self {
        TaskCall {
            task,
            inputs,
            previews: Vec::new(),
        }
    }

    /// The arguments' previews, by position, recorded with the run.
    #[doc(hidden)]
    pub fn with_previews(mut self, previews: Vec<Option<String>>) -> Self {
        self.previews = previews;
        self
    }

    /// Starts the task run concurrently and returns a future of its result.
    ///
    /// Inside a flow, the flow run waits for it before it ends even if nobody awaits it.
    pub fn submit(self) -> TaskFuture<T::Output> {
        let prepared = match prepare(&self.task, &self.inputs, self.previews) {
            Ok(p) => p,
            Err(e) => return TaskFuture::failed(T::NAME, e),
        };
        let label = prepared.tracker.label.clone();
        let slot = Arc::new(Shared::new(Slot::Waiting(Vec::new())));
        let inputs = self.inputs;
        let run_label = label.clone();
        let report = Report(Some(slot.clone()));
        let job = async move {
            // Boxed when it starts: a submitted run still waiting for a worker holds only its
            // inputs and records, not the state machine of a running one (1.2 KB).
            let outcome = Box::pin(execute::<T>(prepared, inputs))
                .await
                .map_err(|f| f.into_kiln(&run_label));
            report.send(outcome);
        };
        if let Err(e) = context::spawn(job) {
            return TaskFuture::failed(T::NAME, e);
        }
        TaskFuture { label, slot }
    }

    /// Runs the task run to completion, blocking this thread (for synchronous code).
    pub fn wait(self) -> Result<T::Output, T::Error> {
        context::block_on(self.into_future())
    }
}

impl<T: Task> IntoFuture for TaskCall<T> {
    type Output = Result<T::Output, T::Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let prepared = prepare(&self.task, &self.inputs, self.previews).map_err(T::Error::from)?;
            execute::<T>(prepared, self.inputs)
                .await
                .map_err(Failure::into_declared)
        })
    }
}

struct Prepared<T: Task> {
    tracker: Tracker,
    options: Arc<Options<T::Error>>,
    flow: Option<Arc<FlowContext>>,
    plan: Result<Option<Plan<T::Output>>, ResultError>,
    policy: Option<Arc<CachePolicy>>,
    /// The policy is the settings' default, not the task's own.
    default_cache: bool,
    refresh: bool,
}

/// Prepares the task run: its record (Pending) and edges, sent when it starts
/// ([`Tracker::defer`]); nothing waits here.
fn prepare<T: Task>(task: &T, inputs: &T::Inputs, previews: Vec<Option<String>>) -> Result<Prepared<T>, Error> {
    let flow = context::current_flow();
    let engine = match &flow {
        Some(f) => f.engine.clone(),
        None => Engine::current()?,
    };
    let options = task.options();
    let name = options.name.clone().unwrap_or_else(|| Arc::from(T::NAME));
    let problems = flow.as_ref().map_or_else(Default::default, |f| f.problems.clone());
    let mut tracker = Tracker::new(RunKind::Task, name, engine, StateType::Pending, problems);
    let upstreams = inputs.upstreams();
    tracker.reserve_deferred(1 + upstreams.len());
    tracker.slot_tags = options.tag_list();
    let call_key = flow.as_ref().map(|f| f.next_call_key(T::KEY));
    let flow_run_id = flow.as_ref().map(|f| f.flow_run_id);
    tracker.defer(Write::TaskRun(NewTaskRun {
        id: tracker.id(),
        flow_run_id,
        name: tracker.label.name.clone(),
        task_key: T::KEY.into(),
        inputs: inputs.describe(T::ARG_NAMES, &previews),
        tags: tracker.slot_tags.clone(),
        created: now_micros(),
        initial_state: StateType::Pending,
        call_key,
        process_id: Some(tracker.engine.process_id()),
    }));
    for upstream in upstreams {
        tracker.defer(Write::Edge {
            flow_run_id,
            edge: Edge {
                upstream: upstream.id,
                downstream: tracker.id(),
            },
        });
    }
    let (default_policy, default_refresh) = tracker.engine.cache_defaults();
    let mut policy = options
        .cache
        .clone()
        .or_else(|| default_policy.cloned())
        .filter(|p| !p.is_none());
    // A default policy (from the settings) applies where it can; one named on the task
    // makes an unpersistable type or an unhashable input an error.
    let default_cache = options.cache.is_none() && policy.is_some();
    let refresh = options.refresh_cache.unwrap_or(default_refresh);
    let implied = flow.as_ref().is_some_and(|f| f.persist_tasks) || default_cache;
    let caching = policy.is_some() && !default_cache;
    // A run on a worker must persist its result: it crosses back as a record.
    let explicit = caching || options.pool.is_some();
    let plan = run::persist_plan(task, &tracker.engine, &options, &tracker.label, implied, explicit);
    if default_cache && matches!(plan, Ok(None)) {
        tracing::debug!(
            "{}: not cached by the default policy: its result cannot be persisted",
            tracker.label
        );
        policy = None;
    }
    Ok(Prepared {
        tracker,
        options,
        flow,
        plan,
        policy,
        default_cache,
        refresh,
    })
}

/// Waits for the inputs, then runs the attempts.
async fn execute<T: Task>(prepared: Prepared<T>, inputs: T::Inputs) -> Result<T::Output, Failure<T::Error>> {
    let Prepared {
        mut tracker,
        options,
        flow,
        plan,
        policy,
        default_cache,
        refresh,
    } = prepared;
    let span = tracing::debug_span!("task_run", name = %tracker.label.name, id = %tracker.id());
    let flow_run_id = flow.as_ref().map(|f| f.flow_run_id);
    let tx = crate::transaction::current();
    let outcome = async {
        // Recorded (Pending) when it starts: a submitted run waiting for its inputs or a
        // slot shows as such meanwhile.
        tracker.send_deferred()?;
        let args = match inputs.resolve().await {
            Ok(args) => args,
            Err(UpstreamError { upstream, cause }) => {
                tracker.to(
                    StateType::Failed,
                    Some(format!("its input from {upstream} did not complete: {cause}")),
                )?;
                return Err(Failure::Kiln(Error::UpstreamFailed {
                    run: tracker.label.clone(),
                    upstream,
                    cause: Box::new(cause),
                }));
            }
        };
        if let Some(pool) = options.pool.clone() {
            let plan = match plan {
                Ok(plan) => plan,
                Err(e) => {
                    tracker.to(StateType::Failed, Some(e.to_string()))?;
                    return Err(Failure::Kiln(e.into()));
                }
            };
            let flow_run = flow.as_ref().map(|f| (f.flow_run_id, f.flow_name.clone()));
            // Boxed, like every large future on a path most runs do not take: the state of
            // `execute` (allocated per submitted run) is as large as its largest await.
            return Box::pin(crate::remote::call::<T>(
                &mut tracker,
                &options,
                flow_run,
                plan,
                args,
                &pool,
            ))
            .await;
        }
        // Input hashes serve the call identity (reuse across retries) and the cache key.
        let wants_identity = flow.is_some() && matches!(plan, Ok(Some(_)));
        let hashes = (wants_identity || policy.is_some()).then(|| T::input_hashes(&args));
        let identity = match (&hashes, wants_identity) {
            (Some(h), true) => cache::call_identity(T::KEY, T::SOURCE_HASH, h),
            _ => None,
        };
        if let Some(value) = reload::<T>(&mut tracker, flow.as_deref(), identity.as_deref(), &plan).await? {
            return Ok(Done::now(value));
        }
        let flow_run = flow.as_ref().map(|f| (f.flow_run_id, &*f.flow_name));
        let mut persisting = match plan.and_then(|p| run::persisting::<T>(p, &tracker.label, flow_run, &args)) {
            Ok(p) => p,
            Err(e) => {
                tracker.to(StateType::Failed, Some(e.to_string()))?;
                return Err(Failure::Kiln(e.into()));
            }
        };
        if let Some(p) = persisting.as_mut() {
            p.call = identity;
            if let Err(e) = tracker
                .engine
                .storage(&p.plan.storage)
                .and_then(|s| s.check_key(&p.key))
            {
                tracker.to(StateType::Failed, Some(e.to_string()))?;
                return Err(Failure::Kiln(e.into()));
            }
        }
        let mut lock = None;
        if let (Some(policy), Some(p)) = (&policy, persisting.as_mut()) {
            let inputs = hashes.unwrap_or_default();
            let key = cache_key::<T>(&tracker, flow.as_deref(), policy, &args, inputs);
            match key {
                Ok(Some(key)) => match Box::pin(lookup::<T>(&mut tracker, refresh, &options, p, key)).await? {
                    Lookup::Hit(value) => return Ok(Done::now(value)),
                    Lookup::Miss(held) => lock = held,
                },
                Ok(None) => {}
                Err(e @ ResultError::CacheKey { .. }) if default_cache => {
                    tracing::debug!("{e}; the default cache policy does not apply, running uncached");
                }
                Err(e @ ResultError::CacheKey { .. }) if options.cache_skip_unhashable == Some(true) => {
                    tracing::warn!("{e}; running without the cache (cache_skip_unhashable)");
                    p.note = Some(format!("not cached: {e}"));
                }
                Err(e) => {
                    tracker.to(StateType::Failed, Some(e.to_string()))?;
                    return Err(Failure::Kiln(e.into()));
                }
            }
        }
        let outcome = run::attempts::<T>(
            &mut tracker,
            &options,
            args,
            flow_run_id,
            persisting,
            tx.as_deref(),
            |body| body,
        )
        .await;
        if let Some(lock) = lock {
            Box::pin(lock.release()).await;
        }
        outcome
    }
    .instrument(span)
    .await;
    let (label, engine, problems) = (tracker.label.clone(), tracker.engine.clone(), tracker.problems.clone());
    let outcome = match (tx, outcome) {
        (None, outcome) => outcome.map(|done| done.value),
        // In a transaction, the run enters Completed (or RolledBack) when the transaction ends.
        (Some(tx), Ok(Done { value, deferred })) => {
            if let Some(completion) = deferred {
                tx.completed(tracker, completion, options.on_commit, options.on_rollback);
            }
            Ok(value)
        }
        (Some(tx), Err(failure)) => {
            tx.failed(&label);
            Err(failure)
        }
    };
    if flow.is_none() {
        // A task run outside any flow is its own top-level run: durable when it returns,
        // and failed when its records are not.
        Box::pin(problems.recorded(&engine, &label)).await?;
    }
    outcome
}

/// With a cache policy: the key, then a hit (the value, state Cached) or a miss (the run
/// will write its record at the key). The key's parts that cannot be hashed fail the run.
/// The cache key of this run under `policy`; reads the arguments (so it is not async:
/// they need not be Sync).
fn cache_key<T: Task>(
    tracker: &Tracker,
    flow: Option<&FlowContext>,
    policy: &CachePolicy,
    args: &T::Args,
    inputs: Vec<(&'static str, cache::InputHash)>,
) -> Result<Option<StorageKey>, ResultError> {
    let parameters = T::parameters(args);
    let parts = KeyParts {
        task_key: T::KEY,
        task_name: &tracker.label.name,
        source_hash: T::SOURCE_HASH,
        inputs,
        parameters: &parameters,
        flow_run_id: flow.map(|f| f.flow_run_id),
        flow_parameters: flow.map(|f| &*f.parameters),
        flow_parameters_hash: flow.map(|f| &f.parameters_hash),
    };
    match cache::key(policy, &parts) {
        Ok(Some(key)) => StorageKey::new(key).map(Some).map_err(ResultError::InvalidKey),
        Ok(None) => Ok(None),
        Err(message) => Err(ResultError::CacheKey {
            run: tracker.label.to_string(),
            message,
        }),
    }
}

/// What the cache said: a value, or a miss (holding the key's lock under serializable isolation).
enum Lookup<T> {
    Hit(T),
    Miss(Option<CacheLock>),
}

async fn lookup<T: Task>(
    tracker: &mut Tracker,
    refresh: bool,
    options: &Options<T::Error>,
    persisting: &mut run::Persisting<T::Output>,
    key: StorageKey,
) -> Result<Lookup<T::Output>, Failure<T::Error>> {
    // The cache key is the storage key, unless the task names its own. A cached record must
    // be where other runs look for it: never inline.
    if options.storage_key.is_none() {
        persisting.key = key.clone();
    }
    persisting.inline = false;
    let now = now_micros();
    persisting.expires = options.cache_expiration.map(|d| now + d.as_micros() as i64);
    if refresh {
        persisting.note = Some("refresh_cache: ran and rewrote the cached record".into());
        return Ok(Lookup::Miss(None));
    }
    let storage = match tracker.engine.storage(&persisting.plan.storage) {
        Ok(s) => s,
        Err(e) => {
            tracker.to(StateType::Failed, Some(e.to_string()))?;
            return Err(Failure::Kiln(e.into()));
        }
    };
    let hit = try_hit::<T>(tracker, &storage, persisting, now).await?;
    if let Some(value) = hit {
        return Ok(Lookup::Hit(value));
    }
    if options.isolation != Some(crate::Isolation::Serializable) {
        return Ok(Lookup::Miss(None));
    }
    // Serializable: one run computes the record, the others wait for it and load it.
    match isolation::acquire(&storage, &persisting.key).await {
        Ok(Acquired::RecordExists) => Ok(match try_hit::<T>(tracker, &storage, persisting, now).await? {
            Some(value) => Lookup::Hit(value),
            None => Lookup::Miss(None),
        }),
        Ok(Acquired::Lock(lock)) => match try_hit::<T>(tracker, &storage, persisting, now).await? {
            Some(value) => {
                lock.release().await;
                Ok(Lookup::Hit(value))
            }
            None => Ok(Lookup::Miss(Some(lock))),
        },
        Err(e) => {
            tracing::warn!(
                "{}: cannot take the cache lock ({e}); running without it",
                tracker.label
            );
            Ok(Lookup::Miss(None))
        }
    }
}

/// A verified, unexpired record at the cache key written by the same serializer: the value
/// (state Cached). Anything else is a miss, and the Completed state will say why.
async fn try_hit<T: Task>(
    tracker: &mut Tracker,
    storage: &crate::result::ResultStorage,
    persisting: &mut run::Persisting<T::Output>,
    now: i64,
) -> Result<Option<T::Output>, Failure<T::Error>> {
    let plan = &persisting.plan;
    let found = storage.get_record(&persisting.key).await;
    let miss = |why: String| -> Option<String> { Some(format!("cache miss: {why}; ran and rewrote the record")) };
    let (header, payload) = match found {
        Ok(record) => record,
        Err(ResultError::Missing { .. }) => return Ok(None),
        Err(e) => {
            tracing::warn!("{}: {e}; running instead", tracker.label);
            persisting.note = miss(e.to_string());
            return Ok(None);
        }
    };
    if header.expires.is_some_and(|at| at <= now) {
        persisting.note = miss("the cached record had expired".into());
        return Ok(None);
    }
    let decoded = persist::decode(
        &plan.storage,
        &persisting.key,
        &header,
        payload,
        plan.serializer.clone(),
        &tracker.label.to_string(),
    )
    .await;
    match decoded {
        Ok(value) => {
            let reference = ResultRef {
                storage: plan.storage.to_string(),
                key: persisting.key.to_string(),
                serializer: header.serializer,
                size: header.length,
                hash: header.hash,
                call: persisting.call.clone(),
                inline: None,
            };
            let by = header
                .run_id
                .map(|r| format!(" written by task run {r}"))
                .unwrap_or_default();
            let message = format!("cache hit: loaded '{}'{by}", persisting.key);
            tracker.enter_with_result(StateType::Cached, Some(message), Some(&reference))?;
            Ok(Some(value))
        }
        Err(e) => {
            persisting.note = miss(e.to_string());
            Ok(None)
        }
    }
}

/// In a retried flow run: loads the result that a call with the same identity (task, code
/// and inputs) persisted in an earlier attempt, and ends the task run as Cached. No match,
/// or a record that is gone or damaged, means running again.
async fn reload<T: Task>(
    tracker: &mut Tracker,
    flow: Option<&FlowContext>,
    identity: Option<&str>,
    plan: &Result<Option<Plan<T::Output>>, ResultError>,
) -> Result<Option<T::Output>, Failure<T::Error>> {
    let (Some(flow), Ok(Some(plan))) = (flow, plan) else {
        return Ok(None);
    };
    let Some(identity) = identity else {
        if flow.has_previous() {
            tracing::debug!(
                "{}: not reusing an earlier result: an input cannot be hashed, so the call cannot be matched",
                tracker.label
            );
        }
        return Ok(None);
    };
    let Some((earlier, reference)) = flow.previous_result(identity) else {
        return Ok(None);
    };
    match Box::pin(persist::load(
        &tracker.engine,
        &reference,
        plan.serializer.clone(),
        &tracker.label.to_string(),
    ))
    .await
    {
        Ok(value) => {
            let message = format!("loaded the result of task run {earlier} instead of running again");
            tracker.enter_with_result(StateType::Cached, Some(message), Some(&reference))?;
            Ok(Some(value))
        }
        Err(e) => {
            tracing::warn!(
                "{}: running again, the earlier result cannot be used: {e}",
                tracker.label
            );
            Ok(None)
        }
    }
}

/// A submitted run's outcome, shared by its handles: set once by the run, read by each.
struct Shared<T> {
    state: std::sync::Mutex<Slot<T>>,
}

enum Slot<T> {
    /// Not in yet: the tasks to wake when it is (one per distinct waiter: a handle
    /// dropped while waiting leaves its waker here until the outcome comes).
    Waiting(Vec<Waker>),
    Ready(Result<T, Error>),
    /// Moved out by the last handle.
    Taken,
}

impl<T> Shared<T> {
    fn new(slot: Slot<T>) -> Self {
        Shared {
            state: std::sync::Mutex::new(slot),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the outcome, and lets go of the run's own reference before waking the handles:
    /// the last handle then sees itself last and moves the value out instead of cloning it.
    fn set(self: Arc<Self>, outcome: Result<T, Error>) {
        let before = std::mem::replace(&mut *self.lock(), Slot::Ready(outcome));
        drop(self);
        if let Slot::Waiting(wakers) = before {
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// `read` of the outcome once it is in; until then the caller is woken when it comes.
    fn poll_with<R>(&self, cx: &mut std::task::Context<'_>, read: impl FnOnce(&mut Slot<T>) -> R) -> Poll<R> {
        let mut slot = self.lock();
        if let Slot::Waiting(wakers) = &mut *slot {
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        Poll::Ready(read(&mut slot))
    }
}

/// The run's side of its [`Shared`] outcome: a run dropped before it reported (its runtime
/// shut down) reports that instead, so no handle waits forever.
struct Report<T>(Option<Arc<Shared<T>>>);

impl<T> Report<T> {
    fn send(mut self, outcome: Result<T, Error>) {
        if let Some(shared) = self.0.take() {
            shared.set(outcome);
        }
    }
}

impl<T> Drop for Report<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.set(Err(Error::Setup(
                "a submitted task run ended without reporting (its runtime shut down)".into(),
            )));
        }
    }
}

/// The result of a submitted task run, to await or to pass to other tasks.
///
/// Cheap to clone: clones share one result. Awaiting the last handle moves the value out
/// without copying it; awaiting one of several shared handles clones it (hence `T: Clone`
/// for awaiting; wrap values that are not `Clone` in an `Arc`).
pub struct TaskFuture<T> {
    label: RunLabel,
    slot: Arc<Shared<T>>,
}

impl<T> Clone for TaskFuture<T> {
    fn clone(&self) -> Self {
        TaskFuture {
            label: self.label.clone(),
            slot: self.slot.clone(),
        }
    }
}

impl<T> std::fmt::Debug for TaskFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskFuture")
            .field("run", &self.label)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> TaskFuture<T> {
    fn failed(name: &str, error: Error) -> Self {
        let label = RunLabel {
            kind: RunKind::Task,
            name: Arc::from(name),
            id: Uuid::nil(),
        };
        TaskFuture {
            label,
            slot: Arc::new(Shared::new(Slot::Ready(Err(error)))),
        }
    }

    /// The task run's id.
    pub fn id(&self) -> Uuid {
        self.label.id
    }

    /// The task run's name.
    pub fn name(&self) -> &str {
        &self.label.name
    }

    /// Waits for the run to finish, leaving its value in place for others.
    pub async fn wait(&self) -> Result<(), Error> {
        std::future::poll_fn(|cx| {
            self.slot.poll_with(cx, |slot| match slot {
                Slot::Ready(Ok(_)) | Slot::Taken => Ok(()),
                Slot::Ready(Err(e)) => Err(e.clone()),
                Slot::Waiting(_) => unreachable!("read once in"),
            })
        })
        .await
    }

    async fn take_with(self, clone: fn(&T) -> T) -> Result<T, Error> {
        std::future::poll_fn(|cx| {
            self.slot.poll_with(cx, |slot| {
                // The last handle owns the value: move it out, no copy. Other handles copy it.
                let last = Arc::strong_count(&self.slot) == 1;
                match slot {
                    Slot::Ready(Ok(_)) if last => match std::mem::replace(slot, Slot::Taken) {
                        Slot::Ready(Ok(value)) => Ok(value),
                        _ => unreachable!("matched above"),
                    },
                    Slot::Ready(Ok(value)) => Ok(clone(value)),
                    Slot::Ready(Err(e)) => Err(e.clone()),
                    Slot::Taken | Slot::Waiting(_) => unreachable!("only the last handle takes the value"),
                }
            })
        })
        .await
    }
}

impl<T: Clone + Send + 'static> IntoFuture for TaskFuture<T> {
    type Output = Result<T, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.take_with(T::clone))
    }
}

/// Waits for all futures, in order; the first failure is returned after all have finished.
pub async fn join_all<T: Clone + Send + 'static>(futures: Vec<TaskFuture<T>>) -> Result<Vec<T>, Error> {
    // The runs are under way already (submitted): waiting for one after the other takes as
    // long as waiting for all at once, wakes this task once per run it waits on rather than
    // once per run that ends, and needs no set of futures to poll.
    let mut values = Vec::with_capacity(futures.len());
    let mut failure = None;
    for future in futures {
        match future.take_with(T::clone).await {
            Ok(value) if failure.is_none() => values.push(value),
            Ok(_) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_recorded_as_json_with_their_values_cut_when_long() {
        let long = "é".repeat(200); // 400 bytes of UTF-8: cut, never in the middle of a character
        let args = (Arg::Value(7u64), Arg::Value(long.clone()), Arg::Value(vec![0u8; 3]));
        let previews = vec![preview(&7u64), preview(&long), None];
        let text = args.describe(&["n", "quote \"s\"", "raw"], &previews);
        let json: serde_json::Value = serde_json::from_str(text.as_str()).expect("valid JSON");
        assert_eq!(json["n"], serde_json::json!({ "type": "u64", "value": 7 }));
        let start = json["quote \"s\""]["value_start"].as_str().unwrap();
        // The first bytes of the value's JSON: its opening quote, then the text.
        let text = start.strip_prefix('"').unwrap();
        assert!(
            long.starts_with(text) && start.len() > 200 && start.len() <= PREVIEW_BYTES,
            "{start}"
        );
        assert!(json["quote \"s\""].get("value").is_none());
        assert_eq!(json["raw"], serde_json::json!({ "type": "alloc::vec::Vec<u8>" }));
        assert_eq!(().describe(&[], &[]).as_str(), "{}");
    }
}
