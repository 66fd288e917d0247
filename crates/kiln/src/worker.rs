//! The worker: a loop inside the user's binary that serves deployments, claiming their runs
//! from work pools and running them.
//!
//! Tasks and flows are compiled code, so the worker is the user's own binary: it runs the
//! flows it was given ([`Worker::deployment`]) and claims only runs of those. It registers
//! its deployments, creates their scheduled runs (as the server does: a slot is created
//! once however many schedulers run), claims runs (waiting on the store, without polling
//! where the backend allows), heartbeats (a worker that stops has its claims taken back and
//! its runs retried elsewhere), watches its runs for cancellation, and on SIGINT or SIGTERM
//! stops claiming and lets its runs finish.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::channel::oneshot;
use kiln_store::model::{RunKind, Write};
use kiln_store::state::StateType;
use kiln_store::work::{Claim, ClaimRequest};
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::deployment::{DeploymentSpec, Runner};
use crate::{Engine, Error, Flow};

/// How long one claim waits for work before the worker looks around (schedules,
/// cancellations, shutdown) and claims again.
const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// How often the worker looks whether its runs were cancelled, and creates scheduled runs.
const TICK: Duration = Duration::from_millis(500);
const SCHEDULE_EVERY: Duration = Duration::from_secs(5);

/// While the pool has a backlog, how long a claim waits for more of the worker's slots to
/// free before it claims for those free (see `claim_loop`).
const GATHER: Duration = Duration::from_millis(2);

/// Why a worker stops a run it is running.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A user is cancelling it: the state the store shows (Cancelling or Cancelled).
    Cancel(StateType),
    /// Its claim was taken over (the store thought this worker dead): another worker runs it,
    /// and this one must neither go on nor record anything more of it.
    ClaimLost,
}

/// Resolves when the worker asks its run to stop; never when the worker lets it be (its
/// sender dropped).
pub(crate) async fn stop_requested(stop: crate::__private::CancelReceiver) -> Stop {
    match stop.await {
        Ok(stop) => stop,
        Err(_) => std::future::pending().await,
    }
}

/// A run in progress on this worker: its kind, the claim's fencing token, and how to stop it.
struct InProgress {
    kind: RunKind,
    fence: u64,
    stop: oneshot::Sender<Stop>,
}

/// A worker serving deployments; see [`serve`].
#[must_use = "a worker does nothing until `.run().await`"]
pub struct Worker {
    deployments: Vec<(kiln_store::work::Deployment, Runner)>,
    errors: Vec<Error>,
    pools: Vec<String>,
    /// The pools whose task runs it serves.
    task_pools: Vec<String>,
    limit: usize,
    engine: Option<Engine>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.deployments.iter().map(|(d, _)| d.name.as_str()).collect();
        f.debug_struct("Worker")
            .field("deployments", &names)
            .field("pools", &self.pools)
            .field("limit", &self.limit)
            .finish()
    }
}

/// A worker for this binary's deployments:
/// `kiln::serve().deployment(pipeline.deploy("nightly").cron("0 3 * * *")).run().await`.
pub fn serve() -> Worker {
    Worker {
        deployments: Vec::new(),
        errors: Vec::new(),
        pools: Vec::new(),
        task_pools: Vec::new(),
        limit: 4,
        engine: None,
    }
}

impl Worker {
    /// Serves this deployment: registers it, schedules it, runs its runs.
    pub fn deployment<F: Flow>(mut self, spec: DeploymentSpec<F>) -> Self
    where
        F::Args: DeserializeOwned,
    {
        match spec.record() {
            Ok(record) => {
                if !self.pools.contains(&record.pool) {
                    self.pools.push(record.pool.clone());
                }
                self.deployments.push((record, spec.runner()));
            }
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// Runs the task runs queued in work pool `pool` (tasks with `pool = "..."`), for any
    /// task this binary holds.
    pub fn pool(mut self, pool: &str) -> Self {
        if !self.task_pools.iter().any(|p| p == pool) {
            self.task_pools.push(pool.to_owned());
        }
        if !self.pools.iter().any(|p| p == pool) {
            self.pools.push(pool.to_owned());
        }
        self
    }

    /// At most `n` runs at once in this process (default 4).
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n.max(1);
        self
    }

    /// Uses this engine instead of [`Engine::current`].
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Serves until SIGINT or SIGTERM, then lets the runs in progress finish.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` completes, then lets the runs in progress finish.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(e);
        }
        if self.deployments.is_empty() && self.task_pools.is_empty() {
            return Err(Error::Setup(
                "the worker serves nothing: add a deployment (.deployment(my_flow.deploy(\"name\"))) or a pool of \
                 task runs (.pool(\"gpu\"))"
                    .into(),
            ));
        }
        let engine = match self.engine {
            Some(e) => e,
            None => Engine::current()?,
        };
        let store = engine.store().clone();
        for (record, _) in &self.deployments {
            match store.write(Write::PutDeployment(Box::new(record.clone()))).await? {
                kiln_store::Outcome::Applied { .. } => {}
                kiln_store::Outcome::Failed(e) => return Err(Error::Store(e)),
                kiln_store::Outcome::Rejected { .. } => {
                    return Err(Error::Setup(format!("deployment '{}' was refused", record.name)));
                }
            }
        }
        // The claimer's heartbeat is recorded before its first claim (the store refuses claims
        // of processes it has no record of: it could never take them back).
        engine.flush().await?;
        let mut runners: HashMap<String, Runner> = self
            .deployments
            .iter()
            .map(|(d, r)| (d.flow.clone(), r.clone()))
            .collect();
        if !self.task_pools.is_empty() {
            for task in crate::remote::registry() {
                runners.insert(task.key.to_owned(), Arc::new(task.run));
            }
        }
        let names: Vec<&str> = self.deployments.iter().map(|(d, _)| d.name.as_str()).collect();
        tracing::info!(
            "worker {} serving deployment(s) {} and the task runs of pool(s) {} (from pool(s) {})",
            engine.process_id(),
            if names.is_empty() {
                "-".to_owned()
            } else {
                names.join(", ")
            },
            if self.task_pools.is_empty() {
                "-".to_owned()
            } else {
                self.task_pools.join(", ")
            },
            self.pools.join(", ")
        );
        let request = ClaimRequest {
            process_id: engine.process_id(),
            pools: self.pools.clone(),
            targets: runners.keys().cloned().collect(),
            host: Some(crate::heartbeat::host_name()),
            limit: 0,
            wait_ms: CLAIM_WAIT.as_millis() as u64,
            resend: false,
        };
        // Claims come from a task of their own, so that nothing cancels a claim in flight
        // (its answer would be lost); a slot is a permit, held by the run it was claimed for.
        let slots = Arc::new(Semaphore::new(self.limit));
        let stopping = Arc::new(AtomicBool::new(false));
        let (claimed, mut claims) = tokio::sync::mpsc::unbounded_channel();
        let claimer = tokio::spawn(claim_loop(
            store.clone(),
            request,
            slots.clone(),
            self.limit,
            claimed,
            stopping.clone(),
        ));
        let mut running: JoinSet<Uuid> = JoinSet::new();
        // The runs in progress, and how to tell each it is being cancelled.
        let mut cancels: HashMap<Uuid, InProgress> = HashMap::new();
        // The claims this worker started, by run and token: a claim handed out again (its
        // first answer may have been lost, or the store answered before this worker's first
        // state change reached it) is started once. A new token is a new claim.
        let mut started = Started::default();
        let mut start = |claim: Claim,
                         permit: Option<OwnedSemaphorePermit>,
                         running: &mut JoinSet<Uuid>,
                         cancels: &mut HashMap<Uuid, InProgress>| {
            // A run in progress here (handed out again with the same token) is not started twice.
            if cancels.get(&claim.run_id).is_some_and(|r| r.fence == claim.fence)
                || !started.first(claim.run_id, claim.fence)
            {
                return;
            }
            let Some(runner) = runners.get(&claim.target) else {
                return;
            };
            let (tx, rx) = oneshot::channel();
            cancels.insert(
                claim.run_id,
                InProgress {
                    kind: claim.kind,
                    fence: claim.fence,
                    stop: tx,
                },
            );
            let id = claim.run_id;
            tracing::info!(
                "claimed {} run {id} of {} (attempt {} of {})",
                match claim.kind {
                    RunKind::Flow => "flow",
                    RunKind::Task => "task",
                },
                claim.deployment.as_deref().unwrap_or(&claim.target),
                claim.attempt + 1,
                claim.max_attempts
            );
            let run = runner(engine.clone(), claim, rx);
            running.spawn(async move {
                run.await;
                drop(permit);
                id
            });
        };
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        let mut last_schedule: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some((claim, permit)) = claims.recv() => start(claim, permit, &mut running, &mut cancels),
                Some(done) = running.join_next() => {
                    if let Ok(id) = done {
                        cancels.remove(&id);
                    }
                }
                _ = tick.tick() => {
                    watch_cancellations(&*store, engine.process_id(), &mut cancels).await;
                    if last_schedule.is_none_or(|t| t.elapsed() >= SCHEDULE_EVERY) {
                        last_schedule = Some(tokio::time::Instant::now());
                        if let Err(e) = crate::deployment::schedule_due(&*store).await {
                            tracing::warn!("cannot create scheduled runs: {e}");
                        }
                    }
                }
            }
        }
        // No new claims; what the claim in flight brings still runs here.
        stopping.store(true, Ordering::SeqCst);
        tracing::info!("worker stopping: no new claims; letting the runs in progress finish");
        while let Some((claim, permit)) = claims.recv().await {
            start(claim, permit, &mut running, &mut cancels);
        }
        let _ = claimer.await;
        while let Some(done) = running.join_next().await {
            if let Ok(id) = done {
                cancels.remove(&id);
            }
        }
        engine.flush().await?;
        Ok(())
    }
}

/// The claims a worker started, the latest ones (run and fencing token).
#[derive(Default)]
struct Started {
    set: std::collections::HashSet<(Uuid, u64)>,
    order: std::collections::VecDeque<(Uuid, u64)>,
}

impl Started {
    /// Kept: far more than one claim answer holds (a re-delivery comes with the next answers).
    const KEPT: usize = 100_000;

    /// Whether this claim is new to this worker (and now remembered).
    fn first(&mut self, run: Uuid, fence: u64) -> bool {
        if !self.set.insert((run, fence)) {
            return false;
        }
        self.order.push_back((run, fence));
        if self.order.len() > Self::KEPT
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Claims runs while slots are free, until `stopping`; each claim goes to the worker with
/// a slot's permit (none for a run handed out again, which the worker runs already or must).
async fn claim_loop(
    store: Arc<dyn kiln_store::Store>,
    request: ClaimRequest,
    slots: Arc<Semaphore>,
    limit: usize,
    claimed: tokio::sync::mpsc::UnboundedSender<(Claim, Option<OwnedSemaphorePermit>)>,
    stopping: Arc<AtomicBool>,
) {
    // After a failed claim, the next one asks for what this worker holds and has not
    // started: the failed one may have claimed runs whose answer never arrived.
    let mut resend = false;
    // Whether the last claim brought all it asked for: the pool probably holds more.
    let mut full = false;
    loop {
        let Ok(first) = slots.clone().acquire_owned().await else {
            return;
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut permits = vec![first];
        // With a backlog, short runs end one after another: rather than one claim per run
        // that ends, gather a quarter of the slots, or what frees within GATHER.
        if full {
            let until = tokio::time::Instant::now() + GATHER;
            while permits.len() < limit.div_ceil(4) {
                match tokio::time::timeout_at(until, slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => permits.push(p),
                    _ => break,
                }
            }
        }
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let request = ClaimRequest {
            limit: permits.len() as u32,
            resend,
            ..request.clone()
        };
        match store.claim(&request).await {
            Ok(claims) => {
                resend = false;
                full = claims.len() >= request.limit as usize;
                for claim in claims {
                    if claimed.send((claim, permits.pop())).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                resend = true;
                tracing::warn!("cannot claim runs: {e}; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Tells the runs that a user is cancelling that they must stop (task runs looked up
/// together, flow runs, of which a worker runs few at once, one by one), and those whose
/// claim was taken over (the store thought this worker dead: it stalled, or lost the
/// network, longer than the lease) that another worker runs them now.
async fn watch_cancellations(store: &dyn kiln_store::Store, me: Uuid, runs: &mut HashMap<Uuid, InProgress>) {
    const STOPPING: [StateType; 2] = [StateType::Cancelling, StateType::Cancelled];
    let stop = |runs: &mut HashMap<Uuid, InProgress>, id: Uuid, why: Stop| {
        if let Some(run) = runs.remove(&id) {
            let _ = run.stop.send(why);
        }
    };
    let ids: Vec<Uuid> = runs.keys().copied().collect();
    for chunk in ids.chunks(kiln_store::MAX_LOOKUP) {
        let Ok(holders) = store.holders(chunk).await else {
            continue;
        };
        let held: HashMap<Uuid, (u64, Option<Uuid>)> =
            holders.iter().map(|h| (h.run_id, (h.fence, h.claimed_by))).collect();
        for id in chunk {
            let ours = runs.get(id).map(|r| r.fence);
            match held.get(id) {
                // It left the queue: it ended, here (its future is finishing and ignores
                // this) or on the worker that took it over.
                None => stop(runs, *id, Stop::ClaimLost),
                Some((fence, holder)) if Some(*fence) != ours || *holder != Some(me) => {
                    tracing::warn!(
                        "run {id}: its claim was taken over (this worker was thought dead: it stalled or lost \
                         the database for longer than the lease); stopping it here, another worker runs it"
                    );
                    stop(runs, *id, Stop::ClaimLost);
                }
                Some(_) => {}
            }
        }
    }
    let mut cancelled: Vec<(Uuid, StateType)> = Vec::new();
    let of_kind = |runs: &HashMap<Uuid, InProgress>, kind: RunKind| -> Vec<Uuid> {
        runs.iter().filter(|(_, r)| r.kind == kind).map(|(id, _)| *id).collect()
    };
    for chunk in of_kind(runs, RunKind::Task).chunks(kiln_store::MAX_LOOKUP) {
        if let Ok(found) = store.task_runs_in(chunk, &STOPPING).await {
            cancelled.extend(found.iter().map(|r| (r.id, r.state)));
        }
    }
    for id in of_kind(runs, RunKind::Flow) {
        if let Ok(Some(run)) = store.flow_run(id).await
            && STOPPING.contains(&run.state)
        {
            cancelled.push((id, run.state));
        }
    }
    for (id, state) in cancelled {
        tracing::info!("run {id} is being cancelled: stopping it");
        stop(runs, id, Stop::Cancel(state));
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
