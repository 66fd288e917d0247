//! Work pools on PostgreSQL: claims with `FOR UPDATE SKIP LOCKED` (claimers never wait on
//! each other's rows), woken by `LISTEN kiln_queue` instead of polling; claims taken back
//! from dead processes; the reads of deployments and queues.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use deadpool_postgres::Transaction;
use futures::StreamExt;
use kiln_store::model::{Micros, RunKind, RunState, StateChange, now_micros};
use kiln_store::state::{FINAL_SQL, StateType};
use kiln_store::work::{
    self, Claim, ClaimRequest, Deployment, Ended, Holder, QueueEntry, QueuedRun, TakeBack, WorkPool,
};
use tokio_postgres::{AsyncMessage, NoTls, Row};
use uuid::Uuid;

use crate::DbError;

/// The longest a claim waits for work (its request may ask less).
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The most rows of the queue one claim reads, and the largest page it reads them in (see
/// `claim_once`): a claim behind thousands of runs held back by their limits stops there.
const MAX_SCAN: i64 = 20_000;
const MAX_PAGE: i64 = 2_000;

/// A waiting claim looks again this often even without a notification (one lost while
/// the listening connection reconnected, say).
const RECHECK: Duration = Duration::from_secs(5);

fn parse_kind(s: &str) -> Result<RunKind, DbError> {
    match s {
        "flow" => Ok(RunKind::Flow),
        "task" => Ok(RunKind::Task),
        other => Err(DbError::Data(format!("unknown run kind '{other}' in the queue"))),
    }
}

pub(crate) fn kind_str(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Flow => "flow",
        RunKind::Task => "task",
    }
}

/// A queued run and its run's current state, as a claim reads it.
struct Candidate {
    entry: QueueEntry,
    fence: i64,
    state: Option<StateType>,
    seq: i32,
    attempt: i32,
    parameters: Option<serde_json::Value>,
    tags: Option<serde_json::Value>,
}

/// The columns of a queued run and of its run's current state, from whichever table holds
/// the run (`FROM` [`CANDIDATE_FROM`]).
const CANDIDATE_COLUMNS: &str =
    "q.run_id, q.kind, q.pool, q.deployment, q.target, q.scheduled, q.max_attempts, q.fence,
        COALESCE(f.state, t.state) AS state, COALESCE(f.state_seq, t.state_seq) AS seq,
        COALESCE(f.attempt, t.attempt) AS attempt, f.parameters, COALESCE(f.tags, t.tags) AS tags, q.host, q.payload";
const CANDIDATE_FROM: &str = "queue q
 LEFT JOIN flow_runs f ON q.kind = 'flow' AND f.id = q.run_id
 LEFT JOIN task_runs t ON q.kind = 'task' AND t.id = q.run_id";

/// A queue row's entry, by column name.
fn queue_entry(r: &Row) -> Result<QueueEntry, DbError> {
    Ok(QueueEntry {
        run_id: r.try_get("run_id")?,
        kind: parse_kind(r.try_get("kind")?)?,
        pool: r.try_get("pool")?,
        deployment: r.try_get("deployment")?,
        target: r.try_get("target")?,
        scheduled: r.try_get("scheduled")?,
        max_attempts: r.try_get::<_, i32>("max_attempts")? as u32,
        host: r.try_get("host")?,
        payload: r
            .try_get::<_, Option<serde_json::Value>>("payload")?
            .unwrap_or(serde_json::Value::Null),
    })
}

fn candidate(r: &Row) -> Result<Candidate, DbError> {
    Ok(Candidate {
        entry: queue_entry(r)?,
        fence: r.try_get("fence")?,
        state: r
            .try_get::<_, Option<String>>("state")?
            .and_then(|s| s.parse::<StateType>().ok()),
        seq: r.try_get::<_, Option<i32>>("seq")?.unwrap_or(0),
        attempt: r.try_get::<_, Option<i32>>("attempt")?.unwrap_or(0),
        parameters: r.try_get("parameters")?,
        tags: r.try_get("tags")?,
    })
}

impl Candidate {
    /// A flow run's parameters, or a task run's inputs (the queue's payload).
    fn parameters_json(&mut self) -> serde_json::Value {
        match self.entry.kind {
            RunKind::Flow => self.parameters.take().unwrap_or(serde_json::Value::Null),
            RunKind::Task => self.entry.payload.clone(),
        }
    }
}

/// Applies `change` (checked against `c`'s state) to its run row and history.
async fn apply(tx: &Transaction<'_>, c: &Candidate, change: &StateChange) -> Result<bool, DbError> {
    let table = match change.kind {
        RunKind::Flow => "flow_runs",
        RunKind::Task => "task_runs",
    };
    let seq = c.seq + 1;
    let end = change.to.is_terminal().then_some(change.timestamp);
    let entry = kiln_store::history::entry(&RunState::record(change, seq as u32), change.id);
    let updated = tx
        .execute(
            &tx.prepare_cached(&format!(
                "UPDATE {table} SET state = $2, state_seq = $3, state_message = $4,
                     end_time = COALESCE(end_time, $5), history = COALESCE(history, ''::bytea) || $8
                 WHERE id = $1 AND state = $6 AND state_seq = $7"
            ))
            .await?,
            &[
                &change.run_id,
                &change.to.as_str(),
                &seq,
                &change.message,
                &end,
                &change.from.as_str(),
                &c.seq,
                &entry,
            ],
        )
        .await?;
    Ok(updated > 0)
}

/// One claim attempt (see `Store::claim`), in one transaction.
async fn claim_once(pool: &Pool, request: &ClaimRequest) -> Result<Vec<Claim>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if tx
        .query_opt(
            &tx.prepare_cached("SELECT 1 FROM processes WHERE id = $1").await?,
            &[&request.process_id],
        )
        .await?
        .is_none()
    {
        return Err(DbError::UnknownProcess(request.process_id));
    }
    let limit = request.limit.max(1) as i64;
    let now = now_micros();
    // Pages of each pool's rows in the order they are handed out, read from the index in
    // that order and locked (rows locked by another claimer are skipped rather than waited
    // for); only those are joined to their runs. A page starts where the pool's last one
    // ended: rows passed over (over a limit, or finished) do not stop the claim from
    // reaching the rows behind them. Pages grow; the claim stops once it has `limit` runs,
    // every pool is read to its end, or it read MAX_SCAN rows.
    let mut admitted = Vec::new();
    let mut limits = Limits::default();
    let mut pools: Vec<(String, i64, Uuid)> = Vec::new();
    for pool in &request.pools {
        if !pools.iter().any(|(p, _, _)| p == pool) {
            pools.push((pool.clone(), i64::MIN, Uuid::nil()));
        }
    }
    let mut page = limit + 2;
    let mut scanned = 0;
    while !pools.is_empty() {
        let names: Vec<&str> = pools.iter().map(|(p, _, _)| p.as_str()).collect();
        let after: Vec<i64> = pools.iter().map(|(_, s, _)| *s).collect();
        let after_id: Vec<Uuid> = pools.iter().map(|(_, _, id)| *id).collect();
        // Runs of deployments found full are left unread (and unlocked) by later pages.
        let full = limits.full(true);
        let rows = tx
            .query(
                &tx.prepare_cached(&format!(
                    "WITH c AS MATERIALIZED (
                       SELECT l.run_id FROM unnest($1::text[], $6::bigint[], $7::uuid[]) AS p(pool, s, r)
                       CROSS JOIN LATERAL (
                         SELECT run_id FROM queue WHERE claimed_by IS NULL AND pool = p.pool AND scheduled <= $2
                           AND (scheduled, run_id) > (p.s, p.r)
                           AND (deployment IS NULL OR deployment <> ALL($8))
                           AND (cardinality($4::text[]) = 0 OR target = ANY($4))
                           AND (host IS NULL OR host = $5)
                         ORDER BY scheduled, run_id LIMIT $3 FOR UPDATE SKIP LOCKED) l)
                     SELECT {CANDIDATE_COLUMNS} FROM c JOIN ({CANDIDATE_FROM}) ON q.run_id = c.run_id
                     ORDER BY q.scheduled, q.run_id"
                ))
                .await?,
                &[
                    &names,
                    &now,
                    &page,
                    &request.targets,
                    &request.host,
                    &after,
                    &after_id,
                    &full,
                ],
            )
            .await?;
        scanned += rows.len() as i64;
        let mut read: std::collections::HashMap<String, (i64, i64, Uuid)> = std::collections::HashMap::new();
        for row in &rows {
            let c = candidate(row)?;
            let last = read.entry(c.entry.pool.clone()).or_insert((0, i64::MIN, Uuid::nil()));
            *last = (last.0 + 1, c.entry.scheduled, c.entry.run_id);
            if admitted.len() as i64 >= limit {
                continue;
            }
            let Some(state) = c.state.filter(|s| work::is_claimable(*s)) else {
                if c.state.is_none_or(StateType::is_terminal) {
                    tx.execute(
                        &tx.prepare_cached("DELETE FROM queue WHERE run_id = $1").await?,
                        &[&c.entry.run_id],
                    )
                    .await?;
                }
                continue;
            };
            if !limits.admit(&tx, &c.entry).await? {
                continue;
            }
            admitted.push((c, state));
        }
        if admitted.len() as i64 >= limit || scanned >= MAX_SCAN {
            break;
        }
        // A pool that gave less than a page is read to its end (as far as this claimer may
        // see: rows locked by others are theirs); one found full has nothing more to give.
        let full_pools = limits.full(false);
        pools.retain_mut(|(pool, s, id)| match read.get(pool.as_str()) {
            _ if full_pools.contains(pool) => false,
            Some(&(n, last_s, last_id)) if n >= page => {
                (*s, *id) = (last_s, last_id);
                true
            }
            _ => false,
        });
        page = (page * 4).min(MAX_PAGE);
    }
    // Runs this process holds and has not started: an answer it may never have received.
    let mut held = Vec::new();
    let resent = if request.resend {
        tx.query(
            &tx.prepare_cached(&format!(
                "SELECT {CANDIDATE_COLUMNS} FROM {CANDIDATE_FROM} WHERE q.claimed_by = $1 AND q.pool = ANY($2)
                   AND COALESCE(f.state, t.state) IN ('Pending', 'AwaitingRetry')"
            ))
            .await?,
            &[&request.process_id, &request.pools],
        )
        .await?
    } else {
        Vec::new()
    };
    for row in resent {
        let mut c = candidate(&row)?;
        let tags = c
            .tags
            .take()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        let (fence, state) = (c.fence as u64, c.state.unwrap_or(StateType::Pending));
        let parameters = c.parameters_json();
        held.push(c.entry.claimed(fence, state, c.attempt as u32, parameters, tags));
    }
    // One statement claims them all, each with its next fencing token.
    let ids: Vec<Uuid> = admitted.iter().map(|(c, _)| c.entry.run_id).collect();
    if !ids.is_empty() {
        tx.execute(
            &tx.prepare_cached("UPDATE queue SET claimed_by = $2, fence = fence + 1 WHERE run_id = ANY($1)")
                .await?,
            &[&ids, &request.process_id],
        )
        .await?;
    }
    let mut claims = Vec::with_capacity(admitted.len());
    for (mut c, state) in admitted {
        let fence = c.fence + 1;
        let mut state_now = state;
        if state == StateType::Scheduled {
            let change = work::claimed(c.entry.kind, c.entry.run_id, c.attempt as u32, request.process_id);
            if apply(&tx, &c, &change).await? {
                state_now = StateType::Pending;
            }
        }
        let tags = c
            .tags
            .take()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        let parameters = c.parameters_json();
        claims.push(
            c.entry
                .claimed(fence as u64, state_now, c.attempt as u32, parameters, tags),
        );
    }
    tx.commit().await?;
    claims.extend(held);
    Ok(claims)
}

/// The pools' and deployments' concurrency limits, as counted inside one claim. A limited
/// pool or deployment is counted under an advisory lock held to the end of the
/// transaction, so two claimers cannot both take its last slot.
#[derive(Default)]
struct Limits {
    counted: std::collections::HashMap<(bool, String), (Option<i32>, i64)>,
}

impl Limits {
    async fn count(
        &mut self,
        tx: &Transaction<'_>,
        deployment: bool,
        name: &str,
    ) -> Result<(Option<i32>, i64), DbError> {
        if let Some(c) = self.counted.get(&(deployment, name.to_owned())) {
            return Ok(*c);
        }
        let (table, column) = if deployment {
            ("deployments", "deployment")
        } else {
            ("work_pools", "pool")
        };
        let limit: Option<i32> = tx
            .query_opt(
                &tx.prepare_cached(&format!("SELECT concurrency FROM {table} WHERE name = $1"))
                    .await?,
                &[&name],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .flatten();
        let mut held = 0;
        if limit.is_some() {
            tx.execute(
                &tx.prepare_cached("SELECT pg_advisory_xact_lock(hashtext($1))").await?,
                &[&format!("kiln {column} {name}")],
            )
            .await?;
            held = tx
                .query_one(
                    &tx.prepare_cached(&format!(
                        "SELECT count(*) FROM queue WHERE {column} = $1 AND claimed_by IS NOT NULL"
                    ))
                    .await?,
                    &[&name],
                )
                .await?
                .try_get(0)?;
        }
        self.counted.insert((deployment, name.to_owned()), (limit, held));
        Ok((limit, held))
    }

    /// The deployments (`true`) or pools found full so far.
    fn full(&self, deployment: bool) -> Vec<String> {
        self.counted
            .iter()
            .filter(|((d, _), (limit, held))| *d == deployment && limit.is_some_and(|l| *held >= i64::from(l)))
            .map(|((_, name), _)| name.clone())
            .collect()
    }

    async fn admit(&mut self, tx: &Transaction<'_>, entry: &QueueEntry) -> Result<bool, DbError> {
        let fits = |(limit, held): (Option<i32>, i64)| limit.is_none_or(|l| held < i64::from(l));
        let pool = self.count(tx, false, &entry.pool).await?;
        let deployment = match &entry.deployment {
            Some(d) => Some(self.count(tx, true, d).await?),
            None => None,
        };
        if !fits(pool) || !deployment.is_none_or(fits) {
            return Ok(false);
        }
        self.counted.insert((false, entry.pool.clone()), (pool.0, pool.1 + 1));
        if let (Some(d), Some(x)) = (&entry.deployment, deployment) {
            self.counted.insert((true, d.clone()), (x.0, x.1 + 1));
        }
        Ok(true)
    }
}

/// Wakes waiting claims when PostgreSQL notifies `kiln_queue`, and announces the runs that
/// left the queue (`kiln_ended`) to those who subscribed: one connection per store, opened
/// by the first claim that waits or the first subscriber, and opened again after it is lost.
pub(crate) struct Listener {
    config: tokio_postgres::Config,
    wake: Arc<tokio::sync::Notify>,
    /// The listening client while its connection lives, and whether it listens to
    /// `kiln_ended` too.
    client: tokio::sync::Mutex<Option<(tokio_postgres::Client, bool)>>,
    /// Where `kiln_ended` notifications go.
    ended: tokio::sync::broadcast::Sender<Ended>,
    /// Someone subscribed to `ended`: the connection listens to `kiln_ended` as well and is
    /// kept open.
    announcing: std::sync::atomic::AtomicBool,
    /// Told when the connection is lost.
    lost: Arc<tokio::sync::Notify>,
}

/// How many announcements a subscriber may fall behind before it is told it lagged.
const ENDED_BACKLOG: usize = 4096;

impl Listener {
    pub(crate) fn new(mut config: tokio_postgres::Config) -> Listener {
        // A connection that dies without a word (a host or network gone) is noticed in
        // about half a minute, not hours: until then, nothing would be announced.
        config
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30));
        Listener {
            config,
            wake: Arc::new(tokio::sync::Notify::new()),
            client: tokio::sync::Mutex::new(None),
            ended: tokio::sync::broadcast::channel(ENDED_BACKLOG).0,
            announcing: std::sync::atomic::AtomicBool::new(false),
            lost: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// A receiver of the runs that leave the queue. The first one starts a task on `rt`
    /// that keeps a connection listening from then on; each (re)connection first sends
    /// [`Ended::Missed`], once it listens.
    pub(crate) fn subscribe(self: &Arc<Self>, rt: &tokio::runtime::Handle) -> tokio::sync::broadcast::Receiver<Ended> {
        let receiver = self.ended.subscribe();
        if !self.announcing.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let listener = Arc::downgrade(self);
            rt.spawn(async move {
                loop {
                    let Some(me) = listener.upgrade() else { return };
                    let lost = me.lost.clone();
                    let listening = me.ensure().await;
                    drop(me);
                    if listening {
                        lost.notified().await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
        }
        receiver
    }

    /// Makes sure a connection listens; false when it cannot (the caller then rechecks on a
    /// timer).
    async fn ensure(&self) -> bool {
        let announcing = self.announcing.load(std::sync::atomic::Ordering::SeqCst);
        let mut client = self.client.lock().await;
        if let Some((c, ended)) = client.as_mut()
            && !c.is_closed()
        {
            if announcing && !*ended {
                if c.batch_execute("LISTEN kiln_ended").await.is_err() {
                    return false;
                }
                *ended = true;
                let _ = self.ended.send(Ended::Missed);
            }
            return true;
        }
        let Ok((new, mut connection)) = self.config.connect(NoTls).await else {
            return false;
        };
        let (wake, ended, lost) = (self.wake.clone(), self.ended.clone(), self.lost.clone());
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) if n.channel() == "kiln_ended" => {
                        let ids: Vec<Uuid> = n.payload().split(' ').filter_map(|id| id.parse().ok()).collect();
                        let _ = ended.send(Ended::Runs(ids.into()));
                    }
                    Ok(AsyncMessage::Notification(_)) => wake.notify_waiters(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Lost: waiting claims look again, and the next one reconnects; subscribers
            // look up what they wait for, and are listened for again. The connection goes
            // first, so that its client says it is closed.
            drop(messages);
            wake.notify_waiters();
            let _ = ended.send(Ended::Missed);
            lost.notify_one();
        });
        let channels = if announcing {
            "LISTEN kiln_queue; LISTEN kiln_ended"
        } else {
            "LISTEN kiln_queue"
        };
        if new.batch_execute(channels).await.is_err() {
            return false;
        }
        *client = Some((new, announcing));
        if announcing {
            // Runs that ended before LISTEN took effect were announced to no one.
            let _ = self.ended.send(Ended::Missed);
        }
        true
    }
}

/// Claims runs, waiting up to `request.wait_ms` for one to become claimable: woken by
/// notifications, and at the time the earliest scheduled run comes due.
pub(crate) async fn claim(pool: &Pool, listener: &Listener, request: &ClaimRequest) -> Result<Vec<Claim>, DbError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms).min(MAX_WAIT);
    let mut listening = false;
    loop {
        // Registered before the claim: a notification that arrives meanwhile still wakes it.
        let woken = listener.wake.notified();
        let claims = claim_once(pool, request).await?;
        let now = tokio::time::Instant::now();
        if !claims.is_empty() || now >= deadline {
            return Ok(claims);
        }
        if !listening {
            listening = listener.ensure().await;
            if listening {
                // A run queued before LISTEN took effect sent its notification to no one.
                continue;
            }
        }
        let mut until = deadline.min(now + RECHECK);
        let next: Option<Micros> = pool
            .get()
            .await?
            .query_one(
                "SELECT min(scheduled) FROM queue WHERE claimed_by IS NULL AND pool = ANY($1) AND scheduled > $2",
                &[&request.pools, &now_micros()],
            )
            .await?
            .try_get(0)?;
        if let Some(at) = next {
            let due = Duration::from_micros((at - now_micros()).max(0) as u64);
            until = until.min(now + due);
        }
        let _ = tokio::time::timeout_at(until, woken).await;
    }
}

/// Takes back the claims of processes in `dead` or silent since `stale_before`, inside
/// the reap's transaction; the runs whose state changed.
pub(crate) async fn take_back_claims(
    tx: &Transaction<'_>,
    dead: &[Uuid],
    stale_before: Micros,
    now: Micros,
) -> Result<Vec<(RunKind, Uuid)>, DbError> {
    let rows = tx
        .query(
            &tx.prepare_cached(&format!(
                "SELECT {CANDIDATE_COLUMNS}, p.pid, p.host AS process_host, p.heartbeat AS beat, p.id = ANY($2) AS exited
                 FROM {CANDIDATE_FROM} JOIN processes p ON p.id = q.claimed_by
                 WHERE (p.heartbeat < $1 AND p.heartbeat + p.lease < $3) OR p.id = ANY($2)
                 ORDER BY q.run_id FOR UPDATE OF q SKIP LOCKED"
            )).await?,
            &[&stale_before, &dead, &now],
        )
        .await?;
    let mut changed = Vec::new();
    for row in &rows {
        let c = candidate(row)?;
        let id = c.entry.run_id;
        // The run's row too, without waiting (see `writer::reap`); a locked one is left for
        // a later call. Its state is read again under the lock.
        let table = match c.entry.kind {
            RunKind::Flow => "flow_runs",
            RunKind::Task => "task_runs",
        };
        let locked = tx
            .query_opt(
                &tx.prepare_cached(&format!(
                    "SELECT state, state_seq, attempt FROM {table} WHERE id = $1 FOR UPDATE SKIP LOCKED"
                ))
                .await?,
                &[&id],
            )
            .await?;
        let c = match locked {
            Some(run) => Candidate {
                state: run.try_get::<_, String>("state")?.parse().ok(),
                seq: run.try_get("state_seq")?,
                attempt: run.try_get("attempt")?,
                ..c
            },
            None if c.state.is_none() => c,
            None => continue,
        };
        let why = kiln_store::model::orphan_message(
            row.try_get::<_, i32>("pid")?.into(),
            &row.try_get::<_, String>("process_host")?,
            row.try_get("beat")?,
            row.try_get("exited")?,
        );
        let state = c.state.unwrap_or(StateType::Crashed);
        match work::take_back(c.entry.kind, id, state, c.attempt as u32, c.entry.max_attempts, &why) {
            TakeBack::Requeue(change) => {
                if let Some(change) = change
                    && apply(tx, &c, &change).await?
                {
                    changed.push((c.entry.kind, id));
                }
                tx.execute(
                    &tx.prepare_cached("UPDATE queue SET claimed_by = NULL WHERE run_id = $1")
                        .await?,
                    &[&id],
                )
                .await?;
            }
            TakeBack::End(change) => {
                if apply(tx, &c, &change).await? {
                    changed.push((c.entry.kind, id));
                }
                tx.execute(&tx.prepare_cached("DELETE FROM queue WHERE run_id = $1").await?, &[&id])
                    .await?;
            }
            TakeBack::Drop => {
                tx.execute(&tx.prepare_cached("DELETE FROM queue WHERE run_id = $1").await?, &[&id])
                    .await?;
            }
        }
    }
    Ok(changed)
}

pub(crate) async fn deployments(pool: &Pool) -> Result<Vec<Deployment>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT name, flow, pool, parameters, parameter_schema, tags, schedule, catchup, concurrency,
                    max_attempts, updated FROM deployments ORDER BY name",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Deployment {
                name: r.try_get("name")?,
                flow: r.try_get("flow")?,
                pool: r.try_get("pool")?,
                parameters: r.try_get("parameters")?,
                parameter_schema: r.try_get("parameter_schema")?,
                tags: serde_json::from_value(r.try_get("tags")?).unwrap_or_default(),
                schedule: r
                    .try_get::<_, Option<serde_json::Value>>("schedule")?
                    .and_then(|s| serde_json::from_value(s).ok()),
                catchup: r.try_get("catchup")?,
                concurrency: r.try_get::<_, Option<i32>>("concurrency")?.map(|c| c as u32),
                max_attempts: r.try_get::<_, i32>("max_attempts")? as u32,
                updated: r.try_get("updated")?,
            })
        })
        .collect()
}

pub(crate) async fn work_pools(pool: &Pool) -> Result<Vec<WorkPool>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query("SELECT name, concurrency FROM work_pools ORDER BY name", &[])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(WorkPool {
                name: r.try_get("name")?,
                concurrency: r.try_get::<_, Option<i32>>("concurrency")?.map(|c| c as u32),
            })
        })
        .collect()
}

pub(crate) async fn holders(pool: &Pool, ids: &[Uuid]) -> Result<Vec<Holder>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &client
                .prepare_cached("SELECT run_id, fence, claimed_by FROM queue WHERE run_id = ANY($1)")
                .await?,
            &[&ids],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Holder {
                run_id: r.try_get("run_id")?,
                fence: r.try_get::<_, i64>("fence")? as u64,
                claimed_by: r.try_get("claimed_by")?,
            })
        })
        .collect()
}

pub(crate) async fn queued_runs(pool: &Pool, name: Option<String>, limit: usize) -> Result<Vec<QueuedRun>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            // A run ended without its worker (cancelled before a claim) keeps its row until
            // a claim passes over it: not listed.
            format!(
                "SELECT q.run_id, q.kind, q.pool, q.deployment, q.target, q.scheduled, q.max_attempts, q.fence,
                        q.claimed_by, q.host, q.payload
                 FROM {CANDIDATE_FROM}
                 WHERE ($1::text IS NULL OR q.pool = $1) AND COALESCE(f.state, t.state) NOT IN {FINAL_SQL}
                 ORDER BY q.scheduled, q.run_id LIMIT $2"
            )
            .as_str(),
            &[&name, &(limit as i64)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(QueuedRun {
                entry: queue_entry(r)?,
                fence: r.try_get::<_, i64>("fence")? as u64,
                claimed_by: r.try_get("claimed_by")?,
            })
        })
        .collect()
}
