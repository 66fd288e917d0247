//! Deployments: flows offered for remote runs, their schedules, and the runs they create.
//!
//! A deployment names a flow of the serving binary, the work pool its runs are queued in,
//! default parameters, tags and optionally a schedule. The binary serves it with
//! [`serve`](crate::serve); runs come from [`run_deployment`] (what `kiln deployment run`
//! and the server's API call) or from the schedule ([`schedule_due`], which the server and
//! every serving process call: a slot's run has an id derived from the slot, so however many
//! schedulers create it, the store keeps one).
//!
//! ```no_run
//! use kiln::prelude::*;
//!
//! #[flow]
//! async fn report(day: u32) -> anyhow::Result<u32> {
//!     Ok(day * 2)
//! }
//!
//! # async fn serve() -> Result<(), kiln::Error> {
//! kiln::serve()
//!     .deployment(
//!         report
//!             .deploy("nightly-report")
//!             .cron("0 3 * * *")
//!             .timezone("Europe/Paris")
//!             .parameters(serde_json::json!({ "day": 1 })),
//!     )
//!     .run()
//!     .await
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_store::Store;
use kiln_store::model::{Micros, NewFlowRun, Outcome, RunFilter, Write, now_micros};
use kiln_store::state::StateType;
use kiln_store::work::{self, Claim, QueueEntry, Schedule};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::{Error, Flow};

/// The pool a deployment's runs go to unless it names one.
pub const DEFAULT_POOL: &str = "default";

/// How far ahead a schedule's runs are created: they show as Scheduled meanwhile, and a
/// scheduler that stops for less than this loses none.
pub const HORIZON: Duration = Duration::from_secs(120);

/// Most runs one schedule creates per pass (a schedule every second creates them as time
/// goes, not all of the horizon at once).
const MAX_AHEAD: usize = 20;

/// A slot missed by more than this (no scheduler ran) is skipped, unless the deployment
/// catches up.
const GRACE: Duration = Duration::from_secs(60);

/// The tag every run of a deployment carries (`deployment:<name>`), to list them.
pub fn deployment_tag(name: &str) -> String {
    format!("deployment:{name}")
}

/// Turns a flow into a deployment: `my_flow.deploy("nightly")`. Implemented for every
/// `#[flow]` whose parameters can be read from JSON.
pub trait Deploy: Flow + Sized
where
    Self::Args: DeserializeOwned,
{
    /// A deployment of this flow named `name`, in the pool `default`, unscheduled.
    fn deploy(&self, name: &str) -> DeploymentSpec<Self> {
        DeploymentSpec {
            flow: self.clone(),
            record: work::Deployment {
                name: name.to_owned(),
                flow: crate::run::Body::options(self)
                    .name
                    .as_deref()
                    .unwrap_or(Self::NAME)
                    .to_owned(),
                pool: DEFAULT_POOL.to_owned(),
                parameters: serde_json::Value::Object(Default::default()),
                parameter_schema: Self::parameter_schema(),
                tags: Vec::new(),
                schedule: None,
                catchup: false,
                concurrency: None,
                max_attempts: crate::run::Body::options(self).max_attempts(),
                updated: 0,
            },
            timezone: None,
        }
    }
}

impl<F: Flow> Deploy for F where F::Args: DeserializeOwned {}

/// A deployment being declared (see [`Deploy::deploy`]); hand it to
/// [`Worker::deployment`](crate::Worker::deployment).
#[derive(Debug, Clone)]
pub struct DeploymentSpec<F> {
    flow: F,
    record: work::Deployment,
    timezone: Option<String>,
}

impl<F: Flow> DeploymentSpec<F>
where
    F::Args: DeserializeOwned,
{
    /// Queue its runs in this work pool (default: `default`).
    pub fn pool(mut self, pool: &str) -> Self {
        self.record.pool = pool.to_owned();
        self
    }

    /// Run on this cron schedule (5 fields, or 6 with seconds first), in UTC unless
    /// [`timezone`](Self::timezone) says otherwise.
    pub fn cron(mut self, expr: &str) -> Self {
        self.record.schedule = Some(Schedule::Cron {
            expr: expr.to_owned(),
            timezone: self.timezone.clone(),
        });
        self
    }

    /// The IANA time zone of the cron schedule (`Europe/Paris`).
    pub fn timezone(mut self, tz: &str) -> Self {
        self.timezone = Some(tz.to_owned());
        if let Some(Schedule::Cron { timezone, .. }) = &mut self.record.schedule {
            *timezone = Some(tz.to_owned());
        }
        self
    }

    /// Run every `period` (whole seconds, counted from the Unix epoch).
    pub fn interval(mut self, period: Duration) -> Self {
        self.record.schedule = Some(Schedule::Interval {
            seconds: period.as_secs(),
        });
        self
    }

    /// Create the runs of slots missed while no scheduler ran (default: skip them).
    pub fn catchup(mut self, catchup: bool) -> Self {
        self.record.catchup = catchup;
        self
    }

    /// Default parameters (a JSON object), under those a run is given.
    pub fn parameters(mut self, parameters: serde_json::Value) -> Self {
        self.record.parameters = parameters;
        self
    }

    /// Tags for its runs.
    pub fn tags<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tags: I) -> Self {
        self.record.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// At most `n` of its runs at once, across all workers.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.record.concurrency = Some(n);
        self
    }

    /// Attempts per run beyond the first (the flow's own `retries` by default); an attempt
    /// lost with a crashed worker counts.
    pub fn retries(mut self, retries: u32) -> Self {
        self.record.max_attempts = retries.saturating_add(1);
        self
    }

    /// The deployment as the store records it, checked (schedule, time zone, parameters).
    pub fn record(&self) -> Result<work::Deployment, Error> {
        let mut record = self.record.clone();
        record.updated = now_micros();
        record.check().map_err(Error::Setup)?;
        if let Some(schedule) = &record.schedule {
            next_slots(schedule, now_micros(), now_micros() + 1, 1)
                .map_err(|e| Error::Setup(format!("deployment '{}': {e}", record.name)))?;
        }
        check_parameters(&record, &record.parameters, true)
            .map_err(|e| Error::Setup(format!("deployment '{}': {e}", record.name)))?;
        Ok(record)
    }

    /// How the worker runs a claim of this deployment's flow.
    pub(crate) fn runner(&self) -> Runner {
        let flow = self.flow.clone();
        Arc::new(move |engine, claim, cancel| {
            let flow = flow.clone();
            Box::pin(async move { crate::flow::run_claimed(flow, engine, claim, cancel).await })
        })
    }
}

/// Runs one claimed run to its end (its outcome is in the store).
pub(crate) type Runner =
    Arc<dyn Fn(crate::Engine, Claim, crate::__private::CancelReceiver) -> BoxFuture<'static, ()> + Send + Sync>;

/// Checks parameters against the deployment's schema: names and required ones (see
/// [`Deployment::check_parameters`](kiln_store::work::Deployment::check_parameters)), then
/// each value against its type's JSON Schema (the defaults alone too). The error names the
/// parameter.
pub fn check_parameters(
    deployment: &work::Deployment,
    parameters: &serde_json::Value,
    partial: bool,
) -> Result<(), String> {
    deployment.check_parameters(parameters, partial)?;
    let validator = jsonschema::validator_for(&deployment.parameter_schema)
        .map_err(|e| format!("the parameter schema of flow '{}' cannot be used: {e}", deployment.flow))?;
    // The defaults alone may leave required parameters out: only their values are checked.
    let errors = validator
        .iter_errors(parameters)
        .filter(|e| !partial || !e.instance_path().to_string().is_empty());
    if let Some(error) = errors.into_iter().next() {
        let path = error.instance_path().to_string();
        let name = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        return Err(if name.is_empty() {
            format!("the parameters of flow '{}' do not fit: {error}", deployment.flow)
        } else {
            format!("parameter '{name}' of flow '{}' does not fit: {error}", deployment.flow)
        });
    }
    Ok(())
}

/// Parameters given to a run over the deployment's defaults.
fn merged(defaults: &serde_json::Value, given: &serde_json::Value) -> serde_json::Value {
    let mut out = defaults.as_object().cloned().unwrap_or_default();
    if let Some(given) = given.as_object() {
        out.extend(given.clone());
    }
    serde_json::Value::Object(out)
}

/// A run to create for a deployment.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Parameters over the deployment's defaults (a JSON object).
    pub parameters: serde_json::Value,
    /// Tags besides the deployment's.
    pub tags: Vec<String>,
    /// Not before this time (default: now).
    pub scheduled: Option<Micros>,
    /// The run this one retries: the worker loads the task results it persisted instead of
    /// computing them again.
    pub retry_of: Option<Uuid>,
}

/// Creates a run of deployment `name` (state Scheduled, queued in its pool) once its
/// parameters pass the flow's schema; returns its id. Durable when this returns.
pub async fn run_deployment(store: &dyn Store, name: &str, request: RunRequest) -> Result<Uuid, Error> {
    let deployments = store.deployments().await?;
    let Some(deployment) = deployments.iter().find(|d| d.name == name) else {
        let names: Vec<&str> = deployments.iter().map(|d| d.name.as_str()).collect();
        return Err(Error::NotFound(format!(
            "no deployment named '{name}'; deployments: {} (a serving process registers them: kiln::serve())",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )));
    };
    let given = if request.parameters.is_null() {
        serde_json::json!({})
    } else {
        request.parameters.clone()
    };
    let parameters = merged(&deployment.parameters, &given);
    check_parameters(deployment, &parameters, false)
        .map_err(|e| Error::InvalidParameters(format!("deployment '{name}': {e}")))?;
    let created = now_micros();
    let id = Uuid::now_v7();
    create(store, deployment, id, parameters, request, created).await?;
    Ok(id)
}

/// Records a run of `deployment` and queues it, in one batch; fails when either write was
/// not applied. `request` gives its extra tags, its time (default: `created`) and the run
/// it retries; its parameters are `parameters`.
async fn create(
    store: &dyn Store,
    deployment: &work::Deployment,
    id: Uuid,
    parameters: serde_json::Value,
    request: RunRequest,
    created: Micros,
) -> Result<(), Error> {
    let scheduled = request.scheduled.unwrap_or(created);
    let mut tags = deployment.tags.clone();
    tags.extend(request.tags);
    tags.push(deployment_tag(&deployment.name));
    let run = Write::FlowRun(NewFlowRun {
        id,
        name: deployment.flow.clone(),
        parent_id: None,
        parameters,
        tags,
        created,
        initial_state: StateType::Scheduled,
        command: None,
        retry_of: request.retry_of,
        process_id: None,
    });
    let entry = Write::Enqueue(QueueEntry {
        run_id: id,
        kind: kiln_store::model::RunKind::Flow,
        pool: deployment.pool.clone(),
        deployment: Some(deployment.name.clone()),
        target: deployment.flow.clone(),
        scheduled,
        max_attempts: deployment.max_attempts,
        host: None,
        payload: serde_json::Value::Null,
    });
    let (a, b) = futures::join!(store.write(run), store.write(entry));
    for outcome in [a?, b?] {
        match outcome {
            Outcome::Applied { .. } => {}
            Outcome::Rejected { current } => {
                return Err(Error::Setup(format!(
                    "the run {id} of deployment '{}' was refused ({current:?})",
                    deployment.name
                )));
            }
            Outcome::Failed(e) => return Err(Error::Store(e)),
        }
    }
    Ok(())
}

/// The slots of `schedule` after `after` and at or before `until` (microseconds), at most
/// `max`; an error names a bad expression or time zone.
pub fn next_slots(schedule: &Schedule, after: Micros, until: Micros, max: usize) -> Result<Vec<Micros>, String> {
    let mut slots = Vec::new();
    match schedule {
        Schedule::Interval { seconds } => {
            let period = (*seconds as i64).max(1) * 1_000_000;
            let mut slot = (after.div_euclid(period) + 1) * period;
            while slot <= until && slots.len() < max {
                slots.push(slot);
                slot += period;
            }
        }
        Schedule::Cron { expr, timezone } => {
            let cron: croner::Cron = expr
                .parse()
                .map_err(|e| format!("cron expression '{expr}' cannot be read: {e}"))?;
            let tz: chrono_tz::Tz = match timezone.as_deref() {
                None => chrono_tz::UTC,
                Some(name) => name
                    .parse()
                    .map_err(|_| format!("unknown time zone '{name}'; use an IANA name such as Europe/Paris"))?,
            };
            let start = chrono::DateTime::from_timestamp_micros(after)
                .ok_or("a time out of range")?
                .with_timezone(&tz);
            for at in cron.iter_after(start) {
                let micros = at.timestamp_micros();
                if micros > until || slots.len() >= max {
                    break;
                }
                slots.push(micros);
            }
        }
    }
    Ok(slots)
}

/// Creates the due and upcoming runs (up to [`HORIZON`] ahead) of every scheduled
/// deployment; returns how many slots it wrote (a slot created before counts again: the
/// store keeps one run per slot).
pub async fn schedule_due(store: &dyn Store) -> Result<usize, Error> {
    let now = now_micros();
    let mut written = 0;
    for deployment in store.deployments().await? {
        let Some(schedule) = &deployment.schedule else { continue };
        // Where this deployment's schedule got to: its newest slot run.
        let mut filter = RunFilter::newest(1);
        filter.tag = Some(deployment_tag(&deployment.name));
        let newest = store.list_flow_runs(&filter).await?.runs.into_iter().next();
        let last = newest.map(|r| r.created);
        let from = match (last, deployment.catchup) {
            (Some(last), true) => last,
            (Some(last), false) => last.max(now - GRACE.as_micros() as i64),
            // Never scheduled: from the deployment's registration, within the grace.
            (None, _) => deployment.updated.max(now - GRACE.as_micros() as i64) - 1,
        };
        let slots = match next_slots(schedule, from, now + HORIZON.as_micros() as i64, MAX_AHEAD) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("deployment '{}': {e}; its schedule is skipped", deployment.name);
                continue;
            }
        };
        for slot in slots {
            let id = work::slot_run_id(&deployment.name, slot);
            let at = RunRequest {
                scheduled: Some(slot),
                ..RunRequest::default()
            };
            create(store, &deployment, id, deployment.parameters.clone(), at, slot).await?;
            written += 1;
        }
    }
    Ok(written)
}

/// Removes deployment `name`: the scheduler creates no more of its runs, and those still
/// waiting in the queue for their first claim are Cancelled (their ids are returned). Runs
/// already claimed go on. A worker that serves it registers it again when it starts.
pub async fn remove_deployment(store: &dyn Store, name: &str) -> Result<Vec<Uuid>, Error> {
    use kiln_store::model::{RunKind, StateChange, write_id};
    match store.write(Write::DeleteDeployment { name: name.to_owned() }).await? {
        kiln_store::Outcome::Applied { .. } => {}
        kiln_store::Outcome::Failed(e) if !e.is_retryable() => return Err(Error::NotFound(e.reason())),
        kiln_store::Outcome::Failed(e) => return Err(Error::Store(e)),
        kiln_store::Outcome::Rejected { .. } => {
            return Err(Error::Setup(format!("the removal of deployment '{name}' was refused")));
        }
    }
    let mut cancelled = Vec::new();
    // The server pages at most 10,000 (the queue holds unfinished runs only).
    for queued in store.queued_runs(None, 10_000).await? {
        if queued.entry.deployment.as_deref() != Some(name) || queued.claimed_by.is_some() {
            continue;
        }
        let id = queued.entry.run_id;
        let Some(run) = store.flow_run(id).await? else { continue };
        if run.state != StateType::Scheduled {
            continue;
        }
        let change = StateChange {
            id: write_id(),
            kind: RunKind::Flow,
            run_id: id,
            from: StateType::Scheduled,
            to: StateType::Cancelled,
            message: Some(format!("its deployment '{name}' was removed before it started")),
            attempt: run.attempt,
            timestamp: now_micros(),
            result: None,
            fence: None,
        };
        // Refused: a worker claimed it meanwhile, and it runs.
        if let kiln_store::Transition::Accepted { .. } = store.set_state(change).await? {
            cancelled.push(id);
        }
    }
    Ok(cancelled)
}

/// Asks a run to stop: one not started yet is Cancelled at once; a running one goes to
/// Cancelling and its process (its worker, or the program that started a top-level flow
/// run) stops it. Returns the state it is in after.
pub async fn cancel(store: &dyn Store, run_id: Uuid) -> Result<StateType, Error> {
    use kiln_store::model::{RunKind, StateChange, write_id};
    for _ in 0..5 {
        let (kind, state, attempt) = match store.flow_run(run_id).await? {
            Some(r) if r.parent_id.is_some() && !r.state.is_terminal() => {
                let parent = r.parent_id.unwrap_or_default();
                return Err(Error::Setup(format!(
                    "flow run {run_id} is a subflow of flow run {parent}: cancel that one (`kiln runs cancel \
                     {parent}`), which stops its subflows"
                )));
            }
            Some(r) => (RunKind::Flow, r.state, r.attempt),
            None => match store.task_run(run_id).await? {
                Some(t) => (RunKind::Task, t.state, t.attempt),
                None => return Err(Error::NotFound(format!("no run with id {run_id}"))),
            },
        };
        let to = match state {
            s if s.is_terminal() || s == StateType::Cancelling => return Ok(s),
            StateType::Running => {
                // A running flow run's process (a worker, or the program that started it)
                // watches for Cancelling; a task run's only when a worker runs it.
                if kind == RunKind::Task
                    && !store
                        // The server pages at most 10,000 (the queue holds unfinished runs).
                        .queued_runs(None, 10_000)
                        .await?
                        .iter()
                        .any(|q| q.entry.run_id == run_id)
                {
                    let flow = store.task_run(run_id).await?.and_then(|t| t.flow_run_id);
                    return Err(Error::Setup(match flow {
                        Some(flow) => format!(
                            "task run {run_id} runs inside flow run {flow} in its program's process: cancel the \
                             flow run (`kiln runs cancel {flow}`)"
                        ),
                        None => format!(
                            "task run {run_id} runs outside any flow in its program's process: stop that \
                             process (Ctrl-C)"
                        ),
                    }));
                }
                StateType::Cancelling
            }
            _ => StateType::Cancelled,
        };
        let change = StateChange {
            id: write_id(),
            kind,
            run_id,
            from: state,
            to,
            message: Some("cancelled by a user".into()),
            attempt,
            timestamp: now_micros(),
            result: None,
            fence: None,
        };
        match store.set_state(change).await? {
            kiln_store::Transition::Accepted { .. } => return Ok(to),
            // It moved meanwhile: look again.
            kiln_store::Transition::Rejected { .. } => continue,
        }
    }
    Err(Error::Setup(format!("run {run_id} keeps changing state; try again")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_slots_are_aligned_and_bounded() {
        let s = Schedule::Interval { seconds: 10 };
        let slots = next_slots(&s, 15_000_000, 45_000_000, 10).unwrap();
        assert_eq!(slots, [20_000_000, 30_000_000, 40_000_000]);
        assert_eq!(next_slots(&s, 15_000_000, 1_000_000_000, 2).unwrap().len(), 2);
    }

    #[test]
    fn cron_slots_follow_the_time_zone() {
        // 2026-01-01T00:00:00Z; 03:00 in Paris (UTC+1 in winter) is 02:00 UTC.
        let start = 1_767_225_600_000_000;
        let s = Schedule::Cron {
            expr: "0 3 * * *".into(),
            timezone: Some("Europe/Paris".into()),
        };
        let slots = next_slots(&s, start, start + 86_400_000_000, 5).unwrap();
        assert_eq!(slots, [start + 2 * 3_600_000_000]);
        let every_two = Schedule::Cron {
            expr: "*/2 * * * * *".into(),
            timezone: None,
        };
        assert_eq!(next_slots(&every_two, start, start + 6_000_000, 10).unwrap().len(), 3);
        let bad = Schedule::Cron {
            expr: "61 * * * *".into(),
            timezone: None,
        };
        assert!(
            next_slots(&bad, start, start + 1, 1)
                .unwrap_err()
                .contains("'61 * * * *'")
        );
        let zone = Schedule::Cron {
            expr: "0 3 * * *".into(),
            timezone: Some("Mars/Olympus".into()),
        };
        assert!(
            next_slots(&zone, start, start + 1, 1)
                .unwrap_err()
                .contains("Mars/Olympus")
        );
    }
}
