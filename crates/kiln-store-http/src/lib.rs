//! Kiln's state store through a Kiln server (`KILN_API_URL`): the same contract as the
//! databases, over HTTP.
//!
//! Writes are queued and sent in batches (`POST /api/v1/writes`, up to 4,096 writes a
//! request); each write's outcome comes back in the answer and goes to its reporter, and a
//! flush waits for the server's acknowledgement of everything before it. A batch the server
//! cannot take now (unreachable, restarting, 503) is retried whole with backoff; the queue
//! is bounded, so a process that outruns the server waits instead of growing without bound.
//! The store runs its own small runtime, so any caller works.
#![warn(missing_docs)]

use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_store::limit::{LimitUsage, SlotRequest, Slots};
use kiln_store::model::*;
use kiln_store::queue::{Batches, WriteQueue};
use kiln_store::state::StateType;
use kiln_store::work::{Claim, ClaimRequest, Deployment, Holder, HolderLookup, QueuedRun, WorkPool};
use kiln_store::{FlushDone, Outcome, Reporter, Store, StoreError};
use serde::de::DeserializeOwned;
use uuid::Uuid;

const MAX_BATCH: usize = 4096;
const QUEUE: usize = 4 * MAX_BATCH;
/// How long a batch is retried while the server is unreachable or busy.
const RETRY_DEADLINE: Duration = Duration::from_secs(300);

/// The state store behind a Kiln server.
pub struct HttpStore {
    base: String,
    client: reqwest::Client,
    queue: WriteQueue,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for HttpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStore").field("server", &self.base).finish()
    }
}

fn http_error(e: impl Into<kiln_store::BoxError>, retryable: bool) -> StoreError {
    StoreError::backend(e, retryable)
}

/// Whether the server answers at `base` and accepts the client's token; else why, and what
/// to check.
async fn check(client: &reqwest::Client, base: &str) -> Result<(), (kiln_store::BoxError, &'static str)> {
    const ADDRESS: &str = "check that `kiln server start` runs there and KILN_API_URL is its address";
    const TOKEN: &str = "set KILN_API_KEY to a token the server knows (`kiln server token create NAME` on the server)";
    client
        .get(format!("{base}/api/health"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| (e.into(), ADDRESS))?;
    let answer = client
        .get(format!("{base}/api/v1/flow_runs?limit=1"))
        .send()
        .await
        .map_err(|e| (e.into(), ADDRESS))?;
    if !answer.status().is_success() {
        return Err((problem(answer).await.into(), TOKEN));
    }
    Ok(())
}

/// The server's answer as a store error: its problem detail, or the status.
async fn problem(response: reqwest::Response) -> StoreError {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or(text);
    match status.as_u16() {
        // "no flow run with id ...", "no task run with id ...", "no flow run or task run ...".
        404 if detail.starts_with("no flow run") || detail.starts_with("no task run") => StoreError::UnknownRun(detail),
        409 if detail.contains("matches") => StoreError::AmbiguousRun {
            prefix: detail,
            count: 2,
        },
        _ => http_error(
            format!("the server answered {status}: {detail}"),
            status.is_server_error() || status.as_u16() == 429,
        ),
    }
}

impl HttpStore {
    /// A store through the server at `base` (`http://host:4200`) with no token.
    pub fn open(base: &str) -> Result<HttpStore, StoreError> {
        Self::open_with_key(base, None)
    }

    /// A store through the server at `base`, sending `key` as its bearer token
    /// (`KILN_API_KEY`). Checks the address and the token first, so either being wrong fails
    /// here, within seconds, naming it.
    pub fn open_with_key(base: &str, key: Option<&str>) -> Result<HttpStore, StoreError> {
        let base = base.trim_end_matches('/').to_owned();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-store-http")
            .enable_all()
            .build()
            .map_err(|e| StoreError::WriterGone(format!("cannot start the store's runtime: {e}")))?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = key {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                .map_err(|_| http_error("KILN_API_KEY holds characters a header cannot carry", false))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| http_error(e, false))?;
        // The address first, then the token: each failure says what to check.
        let checked = {
            let (client, base) = (client.clone(), base.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            rt.spawn(async move {
                let _ = tx.send(check(&client, &base).await);
            });
            rx.recv().expect("the runtime ran the check")
        };
        if let Err((source, advice)) = checked {
            rt.shutdown_background();
            return Err(StoreError::Open {
                target: base,
                source,
                advice,
            });
        }
        let writer = Writer {
            client: client.clone(),
            url: format!("{base}/api/v1/writes"),
            rt: rt.handle().clone(),
        };
        let queue = WriteQueue::start(base.clone(), "kiln-store-http-writer", QUEUE, MAX_BATCH, writer)?;
        Ok(HttpStore {
            base,
            client,
            queue,
            rt: Some(rt),
        })
    }

    /// Sends what is queued and stops the writer; later writes fail.
    pub fn close(&self) -> Result<(), StoreError> {
        self.queue.close()
    }

    /// A request on the store's runtime, answered as `T`.
    async fn call<T: DeserializeOwned + Send + 'static>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, StoreError> {
        let rt = self.rt.as_ref().expect("the runtime lives as long as the store");
        rt.spawn(async move {
            let response = request.send().await.map_err(|e| http_error(e, true))?;
            if !response.status().is_success() {
                return Err(problem(response).await);
            }
            response.json::<T>().await.map_err(|e| http_error(e, false))
        })
        .await
        .map_err(|e| StoreError::WriterGone(format!("a request was cancelled: {e}")))?
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}/api/v1/{path}", self.base))
    }
}

impl Drop for HttpStore {
    fn drop(&mut self) {
        let _ = self.close();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The writer thread's side: batches go to the server, outcomes come back.
struct Writer {
    client: reqwest::Client,
    url: String,
    rt: tokio::runtime::Handle,
}

impl Batches for Writer {
    type Message = ();

    fn apply(&mut self, writes: &[Write]) -> Vec<Outcome> {
        match self.rt.block_on(send_batch(&self.client, &self.url, writes.to_vec())) {
            Ok(outcomes) => outcomes.into_iter().map(Outcome::from).collect(),
            Err(e) => {
                tracing::error!("the server cannot record a batch of {} writes: {e}", writes.len());
                vec![Outcome::Failed(std::sync::Arc::new(e)); writes.len()]
            }
        }
    }
}

/// A list's query string: `name` and `parent` under the names the endpoint gives them.
fn list_query(filter: &RunFilter, name: &'static str, parent: &'static str) -> Vec<(&'static str, String)> {
    let mut query: Vec<(&str, String)> = vec![("limit", filter.limit.to_string())];
    if !filter.states.is_empty() {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        query.push(("state", states.join(",")));
    }
    query.extend(filter.name.clone().map(|f| (name, f)));
    query.extend(filter.parent.map(|p| (parent, p.to_string())));
    query.extend(filter.tag.clone().map(|t| ("tag", t)));
    if filter.top_level {
        query.push(("top_level", "true".into()));
    }
    query.extend(filter.since.map(|t| ("since", t.to_string())));
    query.extend(filter.until.map(|t| ("until", t.to_string())));
    query.extend(filter.after.map(|a| ("after", a.to_string())));
    if filter.oldest_first {
        query.push(("sort", "oldest".into()));
    }
    query
}

/// One batch, retried whole while the server is unreachable or answers 5xx.
async fn send_batch(client: &reqwest::Client, url: &str, writes: Vec<Write>) -> Result<Vec<WireOutcome>, StoreError> {
    let body = WriteBatch { writes };
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    let mut warned = false;
    loop {
        let attempt = async {
            let response = client
                .post(url)
                .json(&body)
                .send()
                .await
                .map_err(|e| http_error(e, true))?;
            if !response.status().is_success() {
                return Err(problem(response).await);
            }
            let answer: OutcomeBatch = response.json().await.map_err(|e| http_error(e, true))?;
            if answer.outcomes.len() != body.writes.len() {
                return Err(http_error(
                    format!(
                        "the server answered {} outcomes for {} writes",
                        answer.outcomes.len(),
                        body.writes.len()
                    ),
                    false,
                ));
            }
            Ok(answer.outcomes)
        };
        match attempt.await {
            Ok(outcomes) => return Ok(outcomes),
            Err(e) if e.is_retryable() && started.elapsed() < RETRY_DEADLINE => {
                if !warned && started.elapsed() > Duration::from_secs(5) {
                    tracing::warn!("the Kiln server at {url} cannot take writes now ({e}); retrying");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

#[async_trait]
impl Store for HttpStore {
    fn send(&self, write: Write, reporter: Reporter) -> Result<(), StoreError> {
        self.queue.send(write, reporter)
    }

    fn flush_then(&self, done: FlushDone) {
        self.queue.flush_then(done);
    }

    fn pending_writes(&self) -> usize {
        self.queue.pending()
    }

    async fn list_flow_runs(&self, filter: &RunFilter) -> Result<FlowRunPage, StoreError> {
        let query = list_query(filter, "flow", "parent");
        self.call(self.get("flow_runs").query(&query)).await
    }

    async fn list_task_runs(&self, filter: &RunFilter) -> Result<TaskRunPage, StoreError> {
        let query = list_query(filter, "task", "flow_run");
        self.call(self.get("task_runs").query(&query)).await
    }

    async fn run_counts(&self) -> Result<Vec<RunCount>, StoreError> {
        self.call(self.get("runs/counts")).await
    }

    async fn list_logs(&self, run_id: Uuid, filter: &LogFilter) -> Result<LogPage, StoreError> {
        let mut query: Vec<(&str, String)> = vec![("limit", filter.limit.to_string())];
        query.extend(filter.level.clone().map(|l| ("level", l)));
        query.extend(filter.after.map(|a| ("after", a.to_string())));
        self.call(self.get(&format!("runs/{run_id}/logs")).query(&query)).await
    }

    async fn flow_run(&self, id: Uuid) -> Result<Option<FlowRun>, StoreError> {
        match self.call(self.get(&format!("flow_runs/{id}"))).await {
            Ok(run) => Ok(Some(run)),
            Err(StoreError::UnknownRun(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn subflow_runs(&self, parent: Uuid) -> Result<Vec<FlowRun>, StoreError> {
        self.call(self.get(&format!("flow_runs/{parent}/subflows"))).await
    }

    async fn task_runs(&self, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError> {
        self.call(self.get(&format!("flow_runs/{flow_run_id}/task_runs"))).await
    }

    async fn task_runs_in(&self, ids: &[Uuid], states: &[StateType]) -> Result<Vec<TaskRun>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lookup = TaskRunLookup {
            ids: ids.to_vec(),
            states: states.to_vec(),
        };
        let request = self
            .client
            .post(format!("{}/api/v1/task_runs/lookup", self.base))
            .json(&lookup);
        self.call(request).await
    }

    async fn task_run(&self, id: Uuid) -> Result<Option<TaskRun>, StoreError> {
        match self.call(self.get(&format!("task_runs/{id}"))).await {
            Ok(run) => Ok(Some(run)),
            Err(StoreError::UnknownRun(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn states(&self, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError> {
        self.call(self.get(&format!("runs/{run_id}/states"))).await
    }

    async fn edges(&self, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError> {
        self.call(self.get(&format!("flow_runs/{flow_run_id}/edges"))).await
    }

    async fn logs(&self, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError> {
        let mut filter = LogFilter {
            level: None,
            after: None,
            limit: 10_000,
        };
        let mut all = Vec::new();
        loop {
            let page = self.list_logs(run_id, &filter).await?;
            all.extend(page.logs);
            match page.next {
                Some(next) => filter.after = Some(next),
                None => return Ok(all),
            }
        }
    }

    async fn resolve(&self, id_or_prefix: &str) -> Result<RunRef, StoreError> {
        // Anything that is not an id's hex digits is unknown, before it reaches a URL.
        if kiln_store::id_hex(id_or_prefix).is_none() {
            return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
        }
        match self
            .call(self.get(&format!("runs/resolve/{}", id_or_prefix.trim())))
            .await
        {
            Err(StoreError::UnknownRun(_)) => Err(StoreError::UnknownRun(id_or_prefix.to_owned())),
            Err(StoreError::AmbiguousRun { prefix, .. }) => Err(StoreError::AmbiguousRun {
                count: prefix
                    .split(" matches ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(2),
                prefix: id_or_prefix.to_owned(),
            }),
            other => other,
        }
    }

    async fn processes(&self, since: Micros) -> Result<Vec<Process>, StoreError> {
        self.call(self.get(&format!("processes?since={since}"))).await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Claim>, StoreError> {
        let request = self
            .client
            .post(format!("{}/api/v1/work/claim", self.base))
            .json(request);
        self.call(request).await
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        self.call(self.get("deployments")).await
    }

    async fn work_pools(&self) -> Result<Vec<WorkPool>, StoreError> {
        self.call(self.get("work_pools")).await
    }

    async fn acquire_slots(&self, request: &SlotRequest) -> Result<Slots, StoreError> {
        let request = self
            .client
            .post(format!("{}/api/v1/limits/slots", self.base))
            .json(request);
        self.call(request).await
    }

    async fn limits(&self) -> Result<Vec<LimitUsage>, StoreError> {
        self.call(self.get("limits")).await
    }

    async fn queued_runs(&self, pool: Option<&str>, limit: usize) -> Result<Vec<QueuedRun>, StoreError> {
        let mut query = vec![("limit", limit.to_string())];
        query.extend(pool.map(|p| ("pool", p.to_owned())));
        self.call(self.get("work/queue").query(&query)).await
    }

    async fn holders(&self, ids: &[Uuid]) -> Result<Vec<Holder>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lookup = HolderLookup { ids: ids.to_vec() };
        let request = self
            .client
            .post(format!("{}/api/v1/work/holders", self.base))
            .json(&lookup);
        self.call(request).await
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        Err(StoreError::backend(
            "API tokens are managed on the server's own database: run `kiln server token ls` there",
            false,
        ))
    }

    async fn crash_orphans(&self, dead: &[Uuid], stale_before: Micros) -> Result<Vec<(RunKind, Uuid)>, StoreError> {
        let body = CrashOrphans {
            dead: dead.to_vec(),
            stale_before,
        };
        let request = self
            .client
            .post(format!("{}/api/v1/processes/crash_orphans", self.base))
            .json(&body);
        self.call(request).await
    }
}
