//! Who is running: the current engine, flow run and run (for log capture).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::Engine;

tokio::task_local! {
    /// The engine set by [`Engine::scope`].
    pub(crate) static ENGINE: Engine;
    /// The flow run whose body is executing.
    pub(crate) static FLOW: Arc<FlowContext>;
}

/// What a flow run shares with the task runs and subflows it starts.
#[derive(Debug)]
pub(crate) struct FlowContext {
    pub(crate) engine: Engine,
    pub(crate) flow_run_id: Uuid,
    pub(crate) flow_name: Arc<str>,
    /// The flow run's parameters as recorded (what a `cache_key_fn` sees).
    pub(crate) parameters: Arc<serde_json::Value>,
    /// The hash of the flow run's arguments (the `flow_parameters` cache policy).
    pub(crate) parameters_hash: crate::cache::InputHash,
    /// Task results are persisted when possible (the flow run may be retried).
    pub(crate) persist_tasks: bool,
    /// How many times each task was called in this attempt: names a call across retries.
    calls: Mutex<std::collections::HashMap<&'static str, u32>>,
    /// Results persisted by task runs of earlier attempts, by call identity (task, code, inputs).
    previous: Mutex<std::collections::HashMap<String, (Uuid, crate::result::ResultRef)>>,
    attempt: std::sync::atomic::AtomicU32,
    /// Submitted task runs, joined (or aborted) before the flow run ends.
    children: Mutex<Vec<JoinHandle<()>>>,
    /// Where the store reports writes of this flow run's runs it refused or could not record.
    pub(crate) problems: Arc<crate::run::Problems>,
}

impl FlowContext {
    pub(crate) fn new(
        engine: Engine,
        flow_run_id: Uuid,
        flow_name: Arc<str>,
        parameters: Arc<serde_json::Value>,
        parameters_hash: crate::cache::InputHash,
        persist_tasks: bool,
        problems: Arc<crate::run::Problems>,
    ) -> Arc<Self> {
        Arc::new(FlowContext {
            engine,
            flow_run_id,
            flow_name,
            parameters,
            parameters_hash,
            persist_tasks,
            calls: Mutex::new(Default::default()),
            previous: Mutex::new(Default::default()),
            attempt: std::sync::atomic::AtomicU32::new(0),
            children: Mutex::new(Vec::new()),
            problems,
        })
    }

    /// Starts an attempt of the flow run's body. From the second on, the results that task
    /// runs of earlier attempts persisted are loaded instead of computed again.
    pub(crate) async fn begin_attempt(&self) {
        let attempt = self.attempt.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if attempt == 1 {
            return;
        }
        if let Err(e) = self.engine.flush().await {
            tracing::warn!("cannot read the results of earlier attempts: {e}");
            return;
        }
        self.add_previous(self.flow_run_id).await;
    }

    /// Takes the persisted results of another flow run (the one this run retries).
    pub(crate) async fn preload_from(&self, earlier: Uuid) {
        self.add_previous(earlier).await;
    }

    async fn add_previous(&self, flow_run: Uuid) {
        match self.engine.store().task_runs(flow_run).await {
            Ok(runs) => {
                let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
                for run in runs.into_iter().filter(|r| r.state.is_success()) {
                    let reference = run
                        .result
                        .and_then(|r| serde_json::from_value::<crate::result::ResultRef>(r).ok());
                    // A result without a call identity (an input that cannot be hashed) is never reused.
                    if let Some(reference) = reference.filter(|r| r.call.is_some()) {
                        let call = reference.call.clone().unwrap_or_default();
                        previous.insert(call, (run.id, reference));
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the results of flow run {flow_run}: {e}"),
        }
    }

    /// The result an earlier attempt persisted for a call with this identity, if any.
    pub(crate) fn previous_result(&self, identity: &str) -> Option<(Uuid, crate::result::ResultRef)> {
        self.previous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .cloned()
    }

    /// Whether an earlier attempt (or the run this one retries) left results to reuse.
    pub(crate) fn has_previous(&self) -> bool {
        !self.previous.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// `task_key#n`: the n-th call of this task in the current attempt of the flow run
    /// (recorded for reading; reuse matches call identities, not positions).
    pub(crate) fn next_call_key(&self, task_key: &'static str) -> String {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let n = calls.entry(task_key).or_insert(0);
        *n += 1;
        // One allocation of the right size (`format!` guesses, then grows).
        let mut key = String::with_capacity(task_key.len() + 21);
        key.push_str(task_key);
        key.push('#');
        let _ = std::fmt::Write::write_fmt(&mut key, format_args!("{}", *n - 1));
        key
    }

    pub(crate) fn adopt(&self, child: JoinHandle<()>) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        // Finished children are let go before the list grows: the flow holds (and keeps the
        // memory of) only the runs still going, at amortized constant cost per child.
        if children.len() == children.capacity() {
            children.retain(|c| !c.is_finished());
            // At least as many pushes again before the next look, even when few had finished.
            let still_going = children.len();
            if still_going > children.capacity() / 2 {
                children.reserve(still_going);
            }
        }
        children.push(child);
    }

    /// Waits for every submitted task run, including ones submitted while waiting.
    pub(crate) async fn join_children(&self) {
        loop {
            let batch = std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
            if batch.is_empty() {
                return;
            }
            for child in batch {
                // A child's outcome is recorded by the child itself; a panic was caught there.
                // A finished one is only let go (its output is `()`).
                if !child.is_finished() {
                    let _ = child.await;
                }
            }
        }
    }

    /// Stops submitted task runs still going and waits until they have recorded Cancelled.
    pub(crate) async fn cancel_children(&self) {
        let children = std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for child in &children {
            child.abort();
        }
        for child in children {
            let _ = child.await;
        }
    }
}

pub(crate) fn current_flow() -> Option<Arc<FlowContext>> {
    FLOW.try_with(Arc::clone).ok()
}

pub(crate) fn scoped_engine() -> Option<Engine> {
    current_flow()
        .map(|f| f.engine.clone())
        .or_else(|| ENGINE.try_with(Clone::clone).ok())
}

/// Spawns `job` on `handle` inside the current flow (which adopts it) or engine scope:
/// generic, so the job goes into tokio's task without a box of its own first.
fn spawn_here(handle: &tokio::runtime::Handle, job: impl Future<Output = ()> + Send + 'static) {
    match current_flow() {
        Some(flow) => {
            let child = handle.spawn(FLOW.scope(flow.clone(), job));
            flow.adopt(child);
        }
        None => match ENGINE.try_with(Clone::clone) {
            Ok(engine) => drop(handle.spawn(ENGINE.scope(engine, job))),
            Err(_) => drop(handle.spawn(job)),
        },
    }
}

/// The run whose code is executing on this thread (read by the log capture layer).
#[derive(Debug)]
pub(crate) struct RunScope {
    pub(crate) run_id: Uuid,
    pub(crate) flow_run_id: Option<Uuid>,
    pub(crate) engine: Engine,
    /// Set when the attempt must stop (it timed out): what [`cancelled`] reads.
    pub(crate) cancel: AtomicBool,
    /// Synchronous bodies of this attempt still running on the blocking pool.
    pub(crate) blocking: AtomicUsize,
}

impl RunScope {
    /// The scope of one attempt of a run.
    pub(crate) fn new(run_id: Uuid, flow_run_id: Option<Uuid>, engine: Engine) -> Arc<RunScope> {
        Arc::new(RunScope {
            run_id,
            flow_run_id,
            engine,
            cancel: AtomicBool::new(false),
            blocking: AtomicUsize::new(0),
        })
    }

    /// Whether a synchronous body of this attempt is still running.
    pub(crate) fn blocking_in_flight(&self) -> bool {
        self.blocking.load(Ordering::SeqCst) > 0
    }
}

/// Whether the run whose code calls this was asked to stop: its attempt exceeded its
/// `timeout`, or the run was cancelled (`kiln runs cancel`, its flow run ended).
///
/// An async body is stopped at its next `.await` when it times out. A synchronous body
/// runs on a thread, and threads cannot be stopped from outside: it keeps running until it
/// returns. Poll `kiln::cancelled()` in long loops and return early when it says `true`;
/// the retry of a timed-out synchronous attempt starts only once its body has returned
/// (the run's state says it is waiting), so two attempts never run at once.
///
/// ```
/// use kiln::prelude::*;
///
/// #[task(timeout = "10s", retries = 1)]
/// fn crunch(rows: u64) -> anyhow::Result<u64> {
///     let mut sum = 0;
///     for row in 0..rows {
///         if row % 10_000 == 0 && kiln::cancelled() {
///             anyhow::bail!("stopped at row {row}: the attempt timed out");
///         }
///         sum += row;
///     }
///     Ok(sum)
/// }
/// ```
pub fn cancelled() -> bool {
    current_run().is_some_and(|r| r.cancel.load(Ordering::SeqCst))
}

thread_local! {
    static CURRENT_RUN: RefCell<Option<Arc<RunScope>>> = const { RefCell::new(None) };
}

pub(crate) fn current_run() -> Option<Arc<RunScope>> {
    CURRENT_RUN.with(|c| c.borrow().clone())
}

/// Runs `f` with `scope` as this thread's current run.
pub(crate) fn with_run<R>(scope: Option<Arc<RunScope>>, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT_RUN.with(|c| c.replace(scope));
    struct Restore(Option<Option<Arc<RunScope>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take().flatten();
            CURRENT_RUN.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(Some(previous));
    f()
}

/// A future that is the current run on whichever thread polls it.
pub(crate) struct InRun<F> {
    pub(crate) scope: Arc<RunScope>,
    /// The body, boxed already (a run's body is a `BoxFuture`).
    pub(crate) inner: F,
}

impl<F: Future + Unpin> Future for InRun<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        with_run(Some(this.scope.clone()), || Pin::new(&mut this.inner).poll(cx))
    }
}

/// Runs a synchronous body on tokio's blocking pool, carrying the run and flow context along.
pub async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let run = current_run();
    let flow = current_flow();
    let engine = ENGINE.try_with(Clone::clone).ok();
    // Counted while it runs: a timed-out attempt waits for it before the retry starts.
    struct Running(Option<Arc<RunScope>>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(run) = &self.0 {
                run.blocking.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    if let Some(run) = &run {
        run.blocking.fetch_add(1, Ordering::SeqCst);
    }
    let running = Running(run.clone());
    let handle = tokio::task::spawn_blocking(move || {
        let _running = running;
        with_run(run, || match (flow, engine) {
            (Some(flow), _) => FLOW.sync_scope(flow, f),
            (None, Some(engine)) => ENGINE.sync_scope(engine, f),
            (None, None) => f(),
        })
    });
    match handle.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a blocking task body was cancelled by the runtime: {e}"),
    }
}

/// Blocks the current thread on `fut`, inside or outside a tokio runtime.
pub(crate) fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    use std::sync::OnceLock;
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let flow = current_flow();
    let engine = ENGINE.try_with(Clone::clone).ok();
    let fut = async move {
        match (flow, engine) {
            (Some(flow), _) => FLOW.scope(flow, fut).await,
            (None, Some(engine)) => ENGINE.scope(engine, fut).await,
            (None, None) => fut.await,
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => match handle.runtime_flavor() {
            // On a blocking-pool thread (a sync task or flow body) this is allowed directly;
            // on a worker thread, step off it first.
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| handle.block_on(fut)),
            _ => std::thread::scope(|s| {
                s.spawn(|| {
                    RUNTIME
                        .get_or_init(|| tokio::runtime::Runtime::new().expect("cannot start a tokio runtime"))
                        .block_on(fut)
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
        },
        Err(_) => RUNTIME
            .get_or_init(|| tokio::runtime::Runtime::new().expect("cannot start a tokio runtime"))
            .block_on(fut),
    }
}

/// Spawns `job` on the current runtime with the current flow and engine; inside a flow, the
/// flow run adopts it (joins it before ending, aborts it on timeout).
pub(crate) fn spawn(job: impl Future<Output = ()> + Send + 'static) -> Result<(), crate::Error> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        crate::Error::Setup(
            "submitting a task run needs a tokio runtime: call it inside a flow, an async main, or use .wait()".into(),
        )
    })?;
    // A submitted run belongs to the caller's transaction, if any.
    match crate::transaction::current() {
        Some(tx) => spawn_here(&handle, crate::transaction::TRANSACTION.scope(tx, job)),
        None => spawn_here(&handle, job),
    }
    Ok(())
}
