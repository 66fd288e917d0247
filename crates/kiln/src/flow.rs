//! Flow runs: the top of a pipeline, and subflows called from other flows.

use std::future::IntoFuture;
use std::sync::Arc;

use futures::future::BoxFuture;
use kiln_store::model::{NewFlowRun, RunKind, Write, now_micros};
use kiln_store::state::StateType;
use tracing::Instrument;

use crate::Engine;
use crate::context::{self, FLOW, FlowContext};
use crate::run::{self, Body, Failure, Problems, Tracker};

/// A function marked `#[flow]`. Implemented by the macro, never by hand.
pub trait Flow: Body + Clone {
    /// The parameter names, in order.
    const ARG_NAMES: &'static [&'static str];
    /// The parameters as a JSON Schema (types that implement `schemars::JsonSchema` are
    /// described; others accept any value until the worker reads them).
    #[doc(hidden)]
    fn parameter_schema() -> serde_json::Value;
}

/// A call of a flow with its arguments, not started yet: `.await` it, or [`wait`](Self::wait)
/// for it from synchronous code.
#[must_use = "a flow call does nothing until it is awaited or waited for"]
pub struct FlowCall<F: Flow> {
    flow: F,
    args: F::Args,
}

impl<F: Flow> std::fmt::Debug for FlowCall<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowCall")
            .field("flow", &F::NAME)
            .finish_non_exhaustive()
    }
}

impl<F: Flow> FlowCall<F> {
    #[doc(hidden)]
    pub fn new(flow: F, args: F::Args) -> Self {
        FlowCall { flow, args }
    }

    /// Runs the flow run to completion, blocking this thread (for synchronous code).
    pub fn wait(self) -> Result<F::Output, F::Error> {
        context::block_on(self.into_future())
    }
}

impl<F: Flow> IntoFuture for FlowCall<F> {
    type Output = Result<F::Output, F::Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { run_flow(self.flow, self.args).await.map_err(Failure::into_declared) })
    }
}

async fn run_flow<F: Flow>(flow: F, args: F::Args) -> Result<F::Output, Failure<F::Error>> {
    let parent = context::current_flow();
    let engine = match &parent {
        Some(p) => p.engine.clone(),
        None => Engine::current()?,
    };
    let options = flow.options();
    let name = options.name.clone().unwrap_or_else(|| Arc::from(F::NAME));
    // A top-level flow run in a process that `kiln runs retry` started takes over the
    // results of the run it retries.
    let retry_of = if parent.is_none() {
        retry_request(&engine, &name).await
    } else {
        None
    };
    let parameters = Arc::new(F::parameters(&args));
    // The flow run and its task runs report their unrecorded writes here.
    let problems = Arc::new(Problems::default());
    let tracker = Tracker::new(
        RunKind::Flow,
        name,
        engine.clone(),
        StateType::Pending,
        problems.clone(),
    );
    let id = tracker.id();
    tracker.send(Write::FlowRun(NewFlowRun {
        id,
        name: tracker.label.name.to_string(),
        parent_id: parent.as_ref().map(|p| p.flow_run_id),
        parameters: (*parameters).clone(),
        tags: options.tag_list(),
        created: now_micros(),
        initial_state: StateType::Pending,
        command: parent.is_none().then(command_line),
        retry_of,
        process_id: Some(engine.process_id()),
    }))?;
    // A top-level flow run can be cancelled from outside (`kiln runs cancel`): this
    // process looks for Cancelling while it runs and stops it as a worker would. A subflow
    // is stopped with its parent.
    let runtime = tokio::runtime::Handle::try_current();
    let (cancel, watch) = match runtime.ok().filter(|_| parent.is_none()) {
        Some(runtime) => {
            let (stop, stopped) = futures::channel::oneshot::channel();
            let watch = runtime.spawn(watch_for_cancel(engine.store().clone(), id, stop));
            (Some(stopped), Some(watch))
        }
        None => (None, None),
    };
    let outcome = drive(
        flow,
        args,
        tracker,
        options,
        parameters,
        parent,
        retry_of.into_iter().collect(),
        cancel,
    )
    .await;
    if let Some(watch) = watch {
        watch.abort();
    }
    outcome
}

/// How often a process looks whether a user is cancelling one of its top-level flow runs.
const CANCEL_LOOK: std::time::Duration = std::time::Duration::from_millis(500);

/// Tells `stop` when flow run `id` enters Cancelling (or was cancelled outright).
async fn watch_for_cancel(
    store: Arc<dyn kiln_store::Store>,
    id: uuid::Uuid,
    stop: futures::channel::oneshot::Sender<crate::worker::Stop>,
) {
    loop {
        tokio::time::sleep(CANCEL_LOOK).await;
        if let Ok(Some(run)) = store.flow_run(id).await
            && matches!(run.state, StateType::Cancelling | StateType::Cancelled)
        {
            let _ = stop.send(crate::worker::Stop::Cancel(run.state));
            return;
        }
    }
}

/// Runs a flow run recorded before: the attempts, the children, and its final state.
#[allow(clippy::too_many_arguments)]
async fn drive<F: Flow>(
    flow: F,
    args: F::Args,
    mut tracker: Tracker,
    options: Arc<crate::Options<F::Error>>,
    parameters: Arc<serde_json::Value>,
    parent: Option<Arc<FlowContext>>,
    // The runs whose persisted task results this one loads (a later one's win).
    earlier: Vec<uuid::Uuid>,
    // Stopped when this says the run is being cancelled (a worker's run, or a top-level one).
    cancel: Option<crate::__private::CancelReceiver>,
) -> Result<F::Output, Failure<F::Error>> {
    let engine = tracker.engine.clone();
    let problems = tracker.problems.clone();
    let id = tracker.id();
    let label = tracker.label.clone();
    let started = std::time::Instant::now();
    // Lines about the run's life go to stderr and into its captured logs.
    let lifecycle = crate::context::RunScope::new(id, Some(id), engine.clone());
    let say = |line: &dyn Fn()| crate::context::with_run(Some(lifecycle.clone()), line);
    say(&|| tracing::info!("{label} started"));
    // A flow that may be retried persists its tasks' results, so a retry loads them.
    let ctx = FlowContext::new(
        engine.clone(),
        id,
        label.name.clone(),
        parameters,
        crate::cache::combine(&F::input_hashes(&args)),
        options.max_attempts() > 1,
        problems.clone(),
    );
    for earlier in earlier {
        // `kiln runs retry --refresh`: everything is computed again.
        if std::env::var_os("KILN_RETRY_REFRESH").is_some_and(|v| v == "1") {
            say(&|| tracing::info!("{label} retries flow run {earlier}, computing every task again"));
        } else {
            say(&|| {
                tracing::info!(
                    "{label} retries flow run {earlier}: its completed results are loaded, not computed again"
                )
            });
            ctx.preload_from(earlier).await;
        }
    }
    let parent_run = parent.as_ref().map(|p| (p.flow_run_id, &*p.flow_name));
    let planned = run::persist_plan(&flow, &engine, &options, &label, false, false)
        .and_then(|plan| run::persisting::<F>(plan, &label, parent_run, &args));
    let persisting = match planned {
        Ok(p) => p,
        Err(e) => {
            tracker.to(StateType::Failed, Some(e.to_string()))?;
            return Err(Failure::Kiln(e.into()));
        }
    };
    let span = tracing::info_span!("flow_run", name = %label.name, id = %id);
    // A flow run's own result is not part of a transaction its caller may be in.
    let run = run::attempts::<F>(&mut tracker, &options, args, Some(id), persisting, None, |body| {
        let ctx = ctx.clone();
        Box::pin(async move {
            ctx.begin_attempt().await;
            let result = FLOW.scope(ctx.clone(), body).await;
            // Submitted task runs nobody awaited still belong to this attempt.
            ctx.join_children().await;
            result
        })
    })
    .instrument(span);
    let outcome = match cancel {
        None => run.await.map(|done| done.value),
        Some(cancel) => {
            let stopped = tokio::select! {
                outcome = run => Err(outcome),
                stop = crate::worker::stop_requested(cancel) => Ok(stop),
            };
            match stopped {
                Err(outcome) => outcome.map(|done| done.value),
                Ok(crate::worker::Stop::ClaimLost) => {
                    // Another worker runs it now: this one records nothing more of it (the
                    // task runs its body left running are stopped below).
                    tracker.state = None;
                    Err(Failure::Kiln(crate::Error::Cancelled {
                        run: label.clone(),
                        reason: "its claim was taken over by another worker".into(),
                    }))
                }
                Ok(crate::worker::Stop::Cancel(state)) => {
                    // The body is dropped (a synchronous one is told through kiln::cancelled()).
                    tracker.state = Some(state);
                    if state == StateType::Cancelling {
                        tracker.to(
                            StateType::Cancelled,
                            Some("cancelled by a user; its process stopped it".into()),
                        )?;
                    }
                    Err(Failure::Kiln(crate::Error::Cancelled {
                        run: label.clone(),
                        reason: "a user cancelled it".into(),
                    }))
                }
            }
        }
    };
    // After a timeout or crash, stop what the body left running (those runs record Cancelled).
    ctx.cancel_children().await;
    let state = tracker.state;
    drop(tracker);
    // Said before the flush below, so the line is as durable as the state it reports.
    let took = humantime::format_duration(std::time::Duration::from_micros(
        started.elapsed().as_micros() as u64 / 100 * 100,
    ));
    let state = state.map_or("?", StateType::as_str);
    match &outcome {
        Ok(_) => say(&|| tracing::info!("{label} finished in state {state} after {took}")),
        Err(failure) => {
            let why = match failure {
                Failure::Body { message, .. } => message.clone(),
                Failure::Kiln(e) => e.to_string(),
            };
            say(&|| tracing::error!("{label} finished in state {state} after {took}: {why}"));
        }
    }
    // The flow run returns once its records are durable; a write the store refused or could
    // not record fails it, whatever its body returned.
    problems.recorded(&engine, &label).await?;
    outcome
}

/// Runs a flow run a worker claimed from a work pool, with the claim's fencing token, to
/// its final state (recorded in the store; nothing is returned). Parameters that do not
/// fit the flow fail the run, naming the parameter.
pub(crate) async fn run_claimed<F: Flow>(
    flow: F,
    engine: Engine,
    claim: kiln_store::work::Claim,
    cancel: crate::__private::CancelReceiver,
) where
    F::Args: serde::de::DeserializeOwned,
{
    let base = flow.options();
    let options = Arc::new(
        crate::Options::new()
            .retries(claim.max_attempts.saturating_sub(1))
            .over(&base),
    );
    let name = options.name.clone().unwrap_or_else(|| Arc::from(F::NAME));
    let label = crate::RunLabel {
        kind: RunKind::Flow,
        name,
        id: claim.run_id,
    };
    let problems = Arc::new(Problems::default());
    let mut tracker = Tracker::adopt(label.clone(), engine.clone(), &claim, problems.clone());
    let args = match args_from_json::<F>(&claim.parameters) {
        Ok(args) => args,
        Err(message) => {
            tracing::error!("{label}: {message}");
            if tracker.to(StateType::Failed, Some(message)).is_ok() {
                let _ = problems.recorded(&engine, &label).await;
            }
            return;
        }
    };
    let parameters = Arc::new(claim.parameters.clone());
    // The task results persisted by the run this one retries (a retry from the UI or the
    // API) are loaded, not computed again; so are those of its own earlier attempts (a
    // crashed worker's), which win.
    let mut earlier: Vec<uuid::Uuid> = engine
        .store()
        .flow_run(claim.run_id)
        .await
        .ok()
        .flatten()
        .and_then(|run| run.retry_of)
        .into_iter()
        .collect();
    if claim.attempt > 0 {
        earlier.push(claim.run_id);
    }
    let outcome = engine
        .scope(drive(
            flow,
            args,
            tracker,
            options,
            parameters,
            None,
            earlier,
            Some(cancel),
        ))
        .await;
    if let Err(failure) = outcome {
        tracing::info!("{label}: {}", failure.into_kiln(&label));
    }
}

/// A flow's arguments from its parameters as JSON (an object by name); the error names
/// the parameter that does not fit.
fn args_from_json<F: Flow>(parameters: &serde_json::Value) -> Result<F::Args, String>
where
    F::Args: serde::de::DeserializeOwned,
{
    let empty = serde_json::Map::new();
    let given = match parameters {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => &empty,
        _ => return Err("its parameters are not a JSON object".into()),
    };
    if let Some(unknown) = given.keys().find(|k| !F::ARG_NAMES.contains(&k.as_str())) {
        return Err(format!("flow '{}' has no parameter '{unknown}'", F::NAME));
    }
    let mut values = Vec::with_capacity(F::ARG_NAMES.len());
    for name in F::ARG_NAMES {
        match given.get(*name) {
            Some(v) => values.push(v.clone()),
            None => return Err(format!("parameter '{name}' of flow '{}' is missing", F::NAME)),
        }
    }
    // A tuple reads from a sequence; the empty tuple from `null`.
    let array = if values.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Array(values)
    };
    serde_path_to_error::deserialize(array).map_err(|e| {
        let index = e.path().iter().next().and_then(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(*index),
            _ => None,
        });
        match index.and_then(|i| F::ARG_NAMES.get(i)) {
            Some(name) => format!("parameter '{name}' of flow '{}' does not fit: {}", F::NAME, e.inner()),
            None => format!("the parameters of flow '{}' do not fit: {}", F::NAME, e.inner()),
        }
    })
}

/// How this process was started, as `kiln runs retry` needs it: JSON `{argv, cwd}`.
fn command_line() -> String {
    let argv: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    let cwd = std::env::current_dir()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut command = serde_json::json!({ "argv": argv, "cwd": cwd });
    // The binary, so that `kiln runs retry` can tell it was rebuilt since: its size and
    // modification time (hashing a binary of 100 MB would add tens of milliseconds to
    // every program's first flow run; any rebuild changes its modification time).
    if let Some((exe, size, modified)) = exe_fingerprint() {
        command["exe"] = exe.into();
        command["exe_size"] = size.into();
        command["exe_modified"] = modified.into();
    }
    command.to_string()
}

/// This process's binary: path, size and modification time (microseconds since the epoch).
fn exe_fingerprint() -> Option<(String, u64, i64)> {
    let exe = std::env::current_exe().ok()?;
    let meta = std::fs::metadata(&exe).ok()?;
    let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some((
        exe.to_string_lossy().into_owned(),
        meta.len(),
        modified.as_micros() as i64,
    ))
}

/// `KILN_RETRY_OF=<flow run id>`, taken by the first top-level flow run of the same name.
async fn retry_request(engine: &Engine, name: &str) -> Option<uuid::Uuid> {
    use std::sync::Mutex;
    static PENDING: Mutex<Option<Option<uuid::Uuid>>> = Mutex::new(None);
    let wanted = *PENDING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(|| {
            std::env::var("KILN_RETRY_OF")
                .ok()
                .and_then(|v| uuid::Uuid::parse_str(v.trim()).ok())
        });
    let id = wanted?;
    let earlier = engine.store().flow_run(id).await.ok().flatten()?;
    if earlier.name != name {
        return None;
    }
    // Taken once, by the first flow run that matches.
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    if *pending != Some(Some(id)) {
        return None;
    }
    *pending = Some(None);
    Some(id)
}

/// The id of the flow run whose body is executing, if any.
pub fn current_flow_run_id() -> Option<uuid::Uuid> {
    context::current_flow().map(|f: Arc<FlowContext>| f.flow_run_id)
}
