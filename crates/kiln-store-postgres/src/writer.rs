//! The writer: batches of queued writes, each applied in one transaction with multi-row
//! statements, retried whole while the database is unreachable or busy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, Transaction};
use kiln_store::history;
use kiln_store::model::*;
use kiln_store::queue::Batches;
use kiln_store::state::StateType;
use kiln_store::{Outcome, StoreError};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::DbError;

/// How long a batch is retried while the database is unreachable or busy.
const RETRY_DEADLINE: Duration = Duration::from_secs(300);

/// Errors that may pass: a lost connection, a serialization failure, a deadlock, too many
/// connections, a server restarting, a pool that waited too long.
pub(crate) fn is_transient(e: &DbError) -> bool {
    match e {
        DbError::Pg(e) => match e.code() {
            Some(code) => [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::CONNECTION_EXCEPTION,
                SqlState::CONNECTION_DOES_NOT_EXIST,
                SqlState::CONNECTION_FAILURE,
                SqlState::LOCK_NOT_AVAILABLE,
            ]
            .contains(code),
            // No server error: the connection itself failed.
            None => true,
        },
        DbError::Pool(deadpool_postgres::PoolError::Closed) => false,
        DbError::Pool(_) => true,
        DbError::Data(_) | DbError::UnknownProcess(_) | DbError::UnknownRun(_) => false,
    }
}

/// The database cannot take writes at all (full disk, out of memory, read-only).
fn is_fatal(e: &DbError) -> bool {
    matches!(e, DbError::Pg(e) if e.code().is_some_and(|c| [
        SqlState::DISK_FULL,
        SqlState::OUT_OF_MEMORY,
        SqlState::READ_ONLY_SQL_TRANSACTION,
    ]
    .contains(c)))
}

/// The writer thread's side: the pool, and the store's runtime to run batches on.
pub(crate) struct Writer {
    pub(crate) pool: Pool,
    pub(crate) rt: tokio::runtime::Handle,
}

impl Batches for Writer {
    type Message = ();

    fn apply(&mut self, writes: &[Write]) -> Vec<Outcome> {
        self.rt.block_on(commit(&self.pool, writes))
    }
}

fn failed(e: DbError) -> Arc<StoreError> {
    let retryable = is_transient(&e);
    Arc::new(StoreError::backend(e, retryable))
}

/// Applies a batch whole; when a write of it cannot be applied, applies its writes one by
/// one so that only that write fails. One outcome per write.
async fn commit(pool: &Pool, batch: &[Write]) -> Vec<Outcome> {
    let all: Vec<usize> = (0..batch.len()).collect();
    let applied = |o: Option<Outcome>| o.unwrap_or(Outcome::Applied { seq: None });
    match with_retries(pool, batch, &all).await {
        Ok(outcomes) => outcomes.into_iter().map(applied).collect(),
        Err(e) if !is_fatal(&e) && !is_transient(&e) && batch.len() > 1 => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for i in 0..batch.len() {
                match with_retries(pool, batch, &[i]).await {
                    Ok(mut one) => outcomes.push(applied(one.swap_remove(i))),
                    Err(e) => outcomes.push(Outcome::Failed(failed(e))),
                }
            }
            outcomes
        }
        Err(e) => {
            let e = failed(e);
            tracing::error!(
                "the state database cannot record a batch of {} writes: {e}",
                batch.len()
            );
            vec![Outcome::Failed(e); batch.len()]
        }
    }
}

/// `attempt` of the writes at `include`, retried with backoff while the error is transient.
/// Runs it creates are taken to be new (no read first); when one exists already (a batch
/// delivered again), the batch is tried once more, looking its creations up.
async fn with_retries(pool: &Pool, batch: &[Write], include: &[usize]) -> Result<Vec<Option<Outcome>>, DbError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    let mut warned = false;
    let mut look_up_creations = false;
    loop {
        match attempt(pool, batch, include, look_up_creations).await {
            Ok(outcomes) => return Ok(outcomes),
            Err(DbError::Pg(e)) if !look_up_creations && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                look_up_creations = true;
            }
            Err(e) if is_transient(&e) && started.elapsed() < RETRY_DEADLINE => {
                if !warned && started.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(
                        "the state database is unreachable or busy ({e}); retrying a batch of {} writes for up to \
                         {RETRY_DEADLINE:?}",
                        include.len()
                    );
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A run's row as the batch leaves it.
struct RowState {
    kind: RunKind,
    run: RunState,
    /// Created in this batch (inserted) rather than updated.
    created_at: Option<usize>,
    changed: bool,
    /// The entries this batch adds to the run's history (`kiln_store::history`).
    history: Vec<u8>,
}

/// Columns of the log lines of a batch.
#[derive(Default)]
struct Logs {
    id: Vec<Option<Uuid>>,
    run_id: Vec<Uuid>,
    flow_run_id: Vec<Option<Uuid>>,
    timestamp: Vec<i64>,
    level: Vec<String>,
    target: Vec<String>,
    message: Vec<String>,
}

impl Logs {
    fn push(&mut self, l: &LogRecord) {
        self.id.push((!l.id.is_nil()).then_some(l.id));
        self.run_id.push(l.run_id);
        self.flow_run_id.push(l.flow_run_id);
        self.timestamp.push(l.timestamp);
        self.level.push(l.level.clone());
        self.target.push(l.target.clone());
        self.message.push(l.message.clone());
    }
}

/// One transaction for the writes at `include`.
async fn attempt(
    pool: &Pool,
    batch: &[Write],
    include: &[usize],
    look_up_creations: bool,
) -> Result<Vec<Option<Outcome>>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let writes = || include.iter().map(|&i| (i, &batch[i]));
    // The rows whose state changes: locked, so no other process moves them meanwhile.
    let mut created: std::collections::HashSet<Uuid> = writes()
        .filter_map(|(_, w)| match w {
            Write::FlowRun(r) => Some(r.id),
            Write::TaskRun(r) => Some(r.id),
            _ => None,
        })
        .collect();
    // Runs this batch creates that exist already: a creation delivered again (or an id
    // taken). Their rows are read like any other.
    let mut existing: HashMap<Uuid, Micros> = HashMap::new();
    if look_up_creations && !created.is_empty() {
        let ids: Vec<Uuid> = created.iter().copied().collect();
        for row in tx
            .query(
                &tx.prepare_cached(
                    "SELECT id, created FROM flow_runs WHERE id = ANY($1)
                 UNION ALL SELECT id, created FROM task_runs WHERE id = ANY($1)",
                )
                .await?,
                &[&ids],
            )
            .await?
        {
            let id: Uuid = row.try_get("id")?;
            created.remove(&id);
            existing.insert(id, row.try_get("created")?);
        }
    }
    let mut wanted: [Vec<Uuid>; 2] = [Vec::new(), Vec::new()];
    for (_, w) in writes() {
        if let Write::State(c) = w
            && !created.contains(&c.run_id)
        {
            wanted[matches!(c.kind, RunKind::Task) as usize].push(c.run_id);
        }
    }
    // The claims that fenced changes name: locked, so no claim or take-back moves them meanwhile.
    let fenced: Vec<Uuid> = writes()
        .filter_map(|(_, w)| match w {
            Write::State(c) if c.fence.is_some() => Some(c.run_id),
            _ => None,
        })
        .collect();
    let mut fences: HashMap<Uuid, i64> = HashMap::new();
    if !fenced.is_empty() {
        for row in tx
            .query(
                &tx.prepare_cached(
                    "SELECT run_id, fence FROM queue WHERE run_id = ANY($1) AND claimed_by IS NOT NULL
                 ORDER BY run_id FOR UPDATE",
                )
                .await?,
                &[&fenced],
            )
            .await?
        {
            fences.insert(row.try_get("run_id")?, row.try_get("fence")?);
        }
    }
    let mut rows: HashMap<(RunKind, Uuid), RowState> = HashMap::new();
    for (kind, table) in [(RunKind::Flow, "flow_runs"), (RunKind::Task, "task_runs")] {
        let ids = &wanted[matches!(kind, RunKind::Task) as usize];
        if ids.is_empty() {
            continue;
        }
        let sql = format!(
            "SELECT id, state, state_seq, state_message, attempt, start_time, end_time, result::text AS result
             FROM {table} WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        );
        for row in tx.query(&tx.prepare_cached(&sql).await?, &[ids]).await? {
            let state: String = row.try_get("state")?;
            let state = state.parse::<StateType>().map_err(|e| DbError::Data(e.to_string()))?;
            rows.insert(
                (kind, row.try_get("id")?),
                RowState {
                    kind,
                    run: RunState {
                        state,
                        seq: row.try_get::<_, i32>("state_seq")? as u32,
                        message: row.try_get("state_message")?,
                        attempt: row.try_get::<_, i32>("attempt")? as u32,
                        start_time: row.try_get("start_time")?,
                        end_time: row.try_get("end_time")?,
                        result: row.try_get("result")?,
                    },
                    created_at: None,
                    changed: false,
                    history: Vec::new(),
                },
            );
        }
    }

    let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
    let mut edges: (Vec<Uuid>, Vec<Uuid>, Vec<Option<Uuid>>) = Default::default();
    let mut logs = Logs::default();
    let mut beats: Vec<&Process> = Vec::new();
    // Token, deployment and limit writes: few, applied one statement each.
    let mut tokens: Vec<&Write> = Vec::new();
    // Queued runs: one per task run sent to a pool, inserted together.
    let mut queued = Queued::default();
    let mut dequeued: Vec<Uuid> = Vec::new();
    for (i, w) in writes() {
        let outcome = match w {
            Write::FlowRun(NewFlowRun {
                id,
                initial_state,
                created,
                ..
            })
            | Write::TaskRun(NewTaskRun {
                id,
                initial_state,
                created,
                ..
            }) => {
                let kind = if matches!(w, Write::FlowRun(_)) {
                    RunKind::Flow
                } else {
                    RunKind::Task
                };
                if let Some(at) = existing.get(id) {
                    outcomes[i] = Some(if at == created {
                        Outcome::Applied { seq: Some(0) }
                    } else {
                        Outcome::Failed(Arc::new(StoreError::backend(
                            format!("run id {id} is taken by another run; a new run needs a new id"),
                            false,
                        )))
                    });
                    continue;
                }
                rows.insert(
                    (kind, *id),
                    RowState {
                        kind,
                        run: RunState::created(*initial_state),
                        created_at: Some(i),
                        changed: false,
                        history: history::entry(&StateRecord::created(*id, *initial_state, *created), Uuid::nil()),
                    },
                );
                Outcome::Applied { seq: Some(0) }
            }
            Write::State(c) => match rows.get_mut(&(c.kind, c.run_id)) {
                Some(row)
                    if row.run.accepts(c) && c.fence.is_none_or(|f| fences.get(&c.run_id) == Some(&(f as i64))) =>
                {
                    let seq = row.run.seq + 1;
                    row.run.apply(c, seq);
                    row.changed = true;
                    row.history.extend(history::entry(&RunState::record(c, seq), c.id));
                    if c.fence.is_some() && c.to.is_terminal() {
                        // Finished by its worker: out of the queue.
                        fences.remove(&c.run_id);
                        dequeued.push(c.run_id);
                    }
                    Outcome::Applied { seq: Some(seq) }
                }
                other => {
                    let current = other.map(|r| r.run.state);
                    // Refused, unless this very change was applied before (a resend).
                    match applied_seq(&tx, c).await? {
                        Some(seq) => Outcome::Applied { seq: Some(seq) },
                        None => Outcome::Rejected { current },
                    }
                }
            },
            Write::Edge { flow_run_id, edge } => {
                edges.0.push(edge.upstream);
                edges.1.push(edge.downstream);
                edges.2.push(*flow_run_id);
                Outcome::Applied { seq: None }
            }
            Write::Log(l) => {
                logs.push(l);
                Outcome::Applied { seq: None }
            }
            Write::Heartbeat(p) => {
                beats.push(p);
                Outcome::Applied { seq: None }
            }
            Write::Enqueue(e) => {
                queued.push(e);
                Outcome::Applied { seq: None }
            }
            Write::PutToken(_)
            | Write::RevokeToken { .. }
            | Write::PutDeployment(_)
            | Write::DeleteDeployment { .. }
            | Write::PutPool(_)
            | Write::PutLimit(_)
            | Write::DeleteLimit { .. }
            | Write::DeleteRun { .. } => {
                tokens.push(w);
                Outcome::Applied { seq: None }
            }
            _ => Outcome::Failed(Arc::new(StoreError::Corrupt(format!(
                "this backend does not know the write {w}"
            )))),
        };
        outcomes[i] = Some(outcome);
    }

    insert_runs(&tx, batch, &rows).await?;
    update_runs(&tx, &rows).await?;
    if !edges.0.is_empty() {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO edges (upstream, downstream, flow_run_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[]) ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&edges.0, &edges.1, &edges.2],
        )
        .await?;
    }
    queued.insert(&tx).await?;
    for p in beats {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO processes (id, host, pid, started, heartbeat, lease) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET heartbeat = GREATEST(processes.heartbeat, excluded.heartbeat),
                 lease = excluded.lease",
            )
            .await?,
            &[
                &p.id,
                &p.host,
                &(p.pid as i32),
                &(p.started as i64),
                &p.heartbeat,
                &p.lease,
            ],
        )
        .await?;
    }
    for w in tokens {
        match w {
            Write::PutToken(t) => {
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO api_tokens (name, hash, read_only, created, revoked) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .await?,
                    &[&t.name, &t.hash, &t.read_only, &t.created, &t.revoked],
                )
                .await?;
            }
            Write::RevokeToken { name, at } => {
                let changed = tx
                    .execute(
                        &tx.prepare_cached("UPDATE api_tokens SET revoked = COALESCE(revoked, $2) WHERE name = $1")
                            .await?,
                        &[name, at],
                    )
                    .await?;
                if changed == 0 {
                    return Err(DbError::Data(format!(
                        "there is no API token named '{name}' (see `kiln server token ls`)"
                    )));
                }
            }
            Write::PutDeployment(d) => {
                let schedule = d.schedule.as_ref().and_then(|s| serde_json::to_value(s).ok());
                tx.execute(
                    &tx.prepare_cached("INSERT INTO deployments (name, flow, pool, parameters, parameter_schema, tags, schedule, catchup,
                                              concurrency, max_attempts, updated)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (name) DO UPDATE SET flow = excluded.flow, pool = excluded.pool,
                         parameters = excluded.parameters, parameter_schema = excluded.parameter_schema,
                         tags = excluded.tags, schedule = excluded.schedule, catchup = excluded.catchup,
                         concurrency = excluded.concurrency, max_attempts = excluded.max_attempts,
                         updated = excluded.updated").await?,
                    &[
                        &d.name,
                        &d.flow,
                        &d.pool,
                        &d.parameters,
                        &d.parameter_schema,
                        &serde_json::json!(d.tags),
                        &schedule,
                        &d.catchup,
                        &d.concurrency.map(|c| c as i32),
                        &(d.max_attempts as i32),
                        &d.updated,
                    ],
                )
                .await?;
            }
            Write::PutPool(p) => {
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO work_pools (name, concurrency) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency",
                    )
                    .await?,
                    &[&p.name, &p.concurrency.map(|c| c as i32)],
                )
                .await?;
            }
            Write::PutLimit(l) => {
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO concurrency_limits (tag, slots, updated) VALUES ($1, $2, $3)
                     ON CONFLICT (tag) DO UPDATE SET slots = excluded.slots, updated = excluded.updated",
                    )
                    .await?,
                    &[&l.tag, &(l.slots as i32), &l.updated],
                )
                .await?;
            }
            Write::DeleteRun { id } => delete_run(&tx, *id).await?,
            Write::DeleteDeployment { name } => {
                let removed = tx
                    .execute(
                        &tx.prepare_cached("DELETE FROM deployments WHERE name = $1").await?,
                        &[name],
                    )
                    .await?;
                if removed == 0 {
                    return Err(DbError::Data(format!(
                        "there is no deployment named '{name}' (see `kiln deployment ls`)"
                    )));
                }
            }
            Write::DeleteLimit { tag } => {
                let removed = tx
                    .execute(
                        &tx.prepare_cached("DELETE FROM concurrency_limits WHERE tag = $1")
                            .await?,
                        &[tag],
                    )
                    .await?;
                if removed == 0 {
                    return Err(DbError::Data(format!(
                        "tag '{tag}' has no concurrency limit (see `kiln limit ls`)"
                    )));
                }
                tx.execute(
                    &tx.prepare_cached("DELETE FROM concurrency_slots WHERE tag = $1")
                        .await?,
                    &[tag],
                )
                .await?;
            }
            _ => unreachable!("only token, queue, deployment and limit writes are collected here"),
        }
    }
    if !dequeued.is_empty() {
        tx.execute(
            &tx.prepare_cached("DELETE FROM queue WHERE run_id = ANY($1)").await?,
            &[&dequeued],
        )
        .await?;
    }
    if !logs.run_id.is_empty() {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO logs (id, run_id, flow_run_id, timestamp, level, target, message)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[], $6::text[],
                                  $7::text[])
             ON CONFLICT DO NOTHING",
            )
            .await?,
            &[
                &logs.id,
                &logs.run_id,
                &logs.flow_run_id,
                &logs.timestamp,
                &logs.level,
                &logs.target,
                &logs.message,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// The position `change` was given when it was applied before, if it was (it has an id and
/// is in the run's history: in its row, or among the rows of `states` written before
/// migration 0011).
async fn applied_seq(tx: &Transaction<'_>, change: &StateChange) -> Result<Option<u32>, DbError> {
    if change.id.is_nil() {
        return Ok(None);
    }
    let table = match change.kind {
        RunKind::Flow => "flow_runs",
        RunKind::Task => "task_runs",
    };
    let kept: Option<Vec<u8>> = tx
        .query_opt(
            &tx.prepare_cached(&format!("SELECT history FROM {table} WHERE id = $1"))
                .await?,
            &[&change.run_id],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?
        .flatten();
    if let Some(kept) = kept {
        let entries = history::decode(change.run_id, &kept).map_err(DbError::Data)?;
        if let Some((record, _)) = entries.iter().find(|(_, id)| *id == change.id) {
            return Ok(Some(record.seq));
        }
    }
    let row = tx
        .query_opt(
            &tx.prepare_cached("SELECT seq FROM states WHERE run_id = $1 AND change_id = $2")
                .await?,
            &[&change.run_id, &change.id],
        )
        .await?;
    Ok(match row {
        Some(row) => Some(row.try_get::<_, i32>("seq")? as u32),
        None => None,
    })
}

/// The runs created in the batch, with the state the batch leaves them in.
async fn insert_runs(
    tx: &Transaction<'_>,
    batch: &[Write],
    rows: &HashMap<(RunKind, Uuid), RowState>,
) -> Result<(), DbError> {
    let mut new: Vec<(&RowState, &Write)> = rows.values().filter_map(|r| Some((r, &batch[r.created_at?]))).collect();
    new.sort_by_key(|(r, _)| r.created_at);
    let (mut flows, mut tasks) = (Vec::new(), Vec::new());
    for (row, w) in new {
        match w {
            Write::FlowRun(f) => flows.push((row, f)),
            Write::TaskRun(t) => tasks.push((row, t)),
            _ => {}
        }
    }
    if !flows.is_empty() {
        let col = |f: fn(&(&RowState, &NewFlowRun)) -> Option<String>| flows.iter().map(f).collect::<Vec<_>>();
        let p1 = flows.iter().map(|(_, f)| f.id).collect::<Vec<_>>();
        let p2 = flows.iter().map(|(_, f)| f.name.clone()).collect::<Vec<_>>();
        let p3 = flows.iter().map(|(_, f)| f.parent_id).collect::<Vec<_>>();
        let p4 = flows.iter().map(|(_, f)| f.parameters.to_string()).collect::<Vec<_>>();
        let p5 = flows.iter().map(|(_, f)| tags_json(&f.tags)).collect::<Vec<_>>();
        let p6 = flows.iter().map(|(r, _)| r.run.state.as_str()).collect::<Vec<_>>();
        let p7 = flows.iter().map(|(r, _)| r.run.seq as i32).collect::<Vec<_>>();
        let p8 = col(|(r, _)| r.run.message.clone());
        let p9 = flows.iter().map(|(r, _)| r.run.attempt as i32).collect::<Vec<_>>();
        let p10 = flows.iter().map(|(_, f)| f.created).collect::<Vec<_>>();
        let p11 = flows.iter().map(|(r, _)| r.run.start_time).collect::<Vec<_>>();
        let p12 = flows.iter().map(|(r, _)| r.run.end_time).collect::<Vec<_>>();
        let p13 = col(|(r, _)| r.run.result.clone());
        let p14 = col(|(_, f)| f.command.clone());
        let p15 = flows.iter().map(|(_, f)| f.retry_of).collect::<Vec<_>>();
        let p16 = flows.iter().map(|(_, f)| f.process_id).collect::<Vec<_>>();
        let p17 = flows.iter().map(|(r, _)| r.history.as_slice()).collect::<Vec<_>>();
        tx.execute(
            &tx.prepare_cached("INSERT INTO flow_runs (id, name, parent_id, parameters, tags, state, state_seq, state_message, attempt,
                                    created, start_time, end_time, result, command, retry_of, process_id, history)
             SELECT u.id, u.name, u.parent_id, u.parameters::jsonb, u.tags::jsonb, u.state, u.seq, u.message,
                    u.attempt, u.created, u.start_time, u.end_time, u.result::jsonb, u.command::jsonb, u.retry_of,
                    u.process_id, u.history
             FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::int[],
                         $8::text[], $9::int[], $10::bigint[], $11::bigint[], $12::bigint[], $13::text[],
                         $14::text[], $15::uuid[], $16::uuid[], $17::bytea[])
                  AS u(id, name, parent_id, parameters, tags, state, seq, message, attempt, created, start_time,
                       end_time, result, command, retry_of, process_id, history)").await?,
            &[
                &p1, &p2, &p3, &p4, &p5, &p6, &p7, &p8, &p9, &p10, &p11, &p12, &p13, &p14, &p15, &p16, &p17,
            ],
        )
        .await?;
    }
    if !tasks.is_empty() {
        let col = |f: fn(&(&RowState, &NewTaskRun)) -> Option<String>| tasks.iter().map(f).collect::<Vec<_>>();
        let p1 = tasks.iter().map(|(_, t)| t.id).collect::<Vec<_>>();
        let p2 = tasks.iter().map(|(_, t)| t.flow_run_id).collect::<Vec<_>>();
        let p3 = tasks.iter().map(|(_, t)| t.name.to_string()).collect::<Vec<_>>();
        let p4 = tasks.iter().map(|(_, t)| t.task_key.to_string()).collect::<Vec<_>>();
        let p5 = tasks.iter().map(|(_, t)| t.inputs.as_str()).collect::<Vec<_>>();
        let p6 = tasks.iter().map(|(_, t)| tags_json(&t.tags)).collect::<Vec<_>>();
        let p7 = tasks.iter().map(|(r, _)| r.run.state.as_str()).collect::<Vec<_>>();
        let p8 = tasks.iter().map(|(r, _)| r.run.seq as i32).collect::<Vec<_>>();
        let p9 = col(|(r, _)| r.run.message.clone());
        let p10 = tasks.iter().map(|(r, _)| r.run.attempt as i32).collect::<Vec<_>>();
        let p11 = tasks.iter().map(|(_, t)| t.created).collect::<Vec<_>>();
        let p12 = tasks.iter().map(|(r, _)| r.run.start_time).collect::<Vec<_>>();
        let p13 = tasks.iter().map(|(r, _)| r.run.end_time).collect::<Vec<_>>();
        let p14 = col(|(r, _)| r.run.result.clone());
        let p15 = col(|(_, t)| t.call_key.clone());
        let p16 = tasks.iter().map(|(_, t)| t.process_id).collect::<Vec<_>>();
        let p17 = tasks.iter().map(|(r, _)| r.history.as_slice()).collect::<Vec<_>>();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO task_runs (id, flow_run_id, name, task_key, inputs, tags, state, state_seq, state_message,
                                    attempt, created, start_time, end_time, result, call_key, process_id, history)
             SELECT u.id, u.flow_run_id, u.name, u.task_key, u.inputs::jsonb, u.tags::jsonb, u.state, u.seq,
                    u.message, u.attempt, u.created, u.start_time, u.end_time, u.result::jsonb, u.call_key,
                    u.process_id, u.history
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::int[], $9::text[], $10::int[], $11::bigint[], $12::bigint[], $13::bigint[],
                         $14::text[], $15::text[], $16::uuid[], $17::bytea[])
                  AS u(id, flow_run_id, name, task_key, inputs, tags, state, seq, message, attempt, created,
                       start_time, end_time, result, call_key, process_id, history)",
            )
            .await?,
            &[
                &p1, &p2, &p3, &p4, &p5, &p6, &p7, &p8, &p9, &p10, &p11, &p12, &p13, &p14, &p15, &p16, &p17,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The existing runs whose state the batch changed (rows locked above).
async fn update_runs(tx: &Transaction<'_>, rows: &HashMap<(RunKind, Uuid), RowState>) -> Result<(), DbError> {
    for (kind, table) in [(RunKind::Flow, "flow_runs"), (RunKind::Task, "task_runs")] {
        let changed: Vec<(&Uuid, &RowState)> = rows
            .iter()
            .filter(|((k, _), r)| *k == kind && r.kind == kind && r.changed && r.created_at.is_none())
            .map(|((_, id), r)| (id, r))
            .collect();
        if changed.is_empty() {
            continue;
        }
        let sql = format!(
            "UPDATE {table} AS t SET state = u.state, state_seq = u.seq, state_message = u.message,
                 attempt = u.attempt, start_time = u.start_time, end_time = u.end_time, result = u.result::jsonb,
                 history = COALESCE(t.history, ''::bytea) || u.history
             FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::text[], $5::int[], $6::bigint[], $7::bigint[],
                         $8::text[], $9::bytea[])
                  AS u(id, state, seq, message, attempt, start_time, end_time, result, history)
             WHERE t.id = u.id"
        );
        let p1 = changed.iter().map(|(id, _)| **id).collect::<Vec<_>>();
        let p2 = changed.iter().map(|(_, r)| r.run.state.as_str()).collect::<Vec<_>>();
        let p3 = changed.iter().map(|(_, r)| r.run.seq as i32).collect::<Vec<_>>();
        let p4 = changed.iter().map(|(_, r)| r.run.message.clone()).collect::<Vec<_>>();
        let p5 = changed.iter().map(|(_, r)| r.run.attempt as i32).collect::<Vec<_>>();
        let p6 = changed.iter().map(|(_, r)| r.run.start_time).collect::<Vec<_>>();
        let p7 = changed.iter().map(|(_, r)| r.run.end_time).collect::<Vec<_>>();
        let p8 = changed.iter().map(|(_, r)| r.run.result.clone()).collect::<Vec<_>>();
        let p9 = changed.iter().map(|(_, r)| r.history.as_slice()).collect::<Vec<_>>();
        tx.execute(
            &tx.prepare_cached(&sql).await?,
            &[&p1, &p2, &p3, &p4, &p5, &p6, &p7, &p8, &p9],
        )
        .await?;
    }
    Ok(())
}

fn tags_json(tags: &[String]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

/// Deletes run `id` (see [`Write::DeleteRun`]), or says why it cannot.
async fn delete_run(tx: &Transaction<'_>, id: Uuid) -> Result<(), DbError> {
    let rows = |r: Vec<tokio_postgres::Row>| -> Result<Vec<(Uuid, String)>, DbError> {
        r.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    };
    let flows = rows(
        tx.query(
            &tx.prepare_cached(
                "WITH RECURSIVE tree(id) AS (
                   SELECT id FROM flow_runs WHERE id = $1
                   UNION ALL SELECT f.id FROM flow_runs f JOIN tree t ON f.parent_id = t.id)
                 SELECT f.id, f.state FROM flow_runs f JOIN tree USING (id) FOR UPDATE OF f",
            )
            .await?,
            &[&id],
        )
        .await?,
    )?;
    let flow_ids: Vec<Uuid> = flows.iter().map(|(f, _)| *f).collect();
    let tasks = rows(if flows.is_empty() {
        tx.query(
            &tx.prepare_cached("SELECT id, state FROM task_runs WHERE id = $1 FOR UPDATE")
                .await?,
            &[&id],
        )
        .await?
    } else {
        tx.query(
            &tx.prepare_cached("SELECT id, state FROM task_runs WHERE flow_run_id = ANY($1) FOR UPDATE")
                .await?,
            &[&flow_ids],
        )
        .await?
    })?;
    if flows.is_empty() && tasks.is_empty() {
        return Err(DbError::Data(format!(
            "there is no run with id {id} (see `kiln runs ls`)"
        )));
    }
    if let Some((open, state)) = flows
        .iter()
        .chain(&tasks)
        .find(|(_, s)| !s.parse::<StateType>().is_ok_and(StateType::is_terminal))
    {
        let which = if *open == id {
            "it".to_owned()
        } else {
            format!("its run {open}")
        };
        return Err(DbError::Data(format!(
            "run {id} cannot be deleted: {which} has not ended ({state}); cancel it first (`kiln runs cancel {open}`)"
        )));
    }
    let all: Vec<Uuid> = flows.iter().chain(&tasks).map(|(r, _)| *r).collect();
    if flows.is_empty() {
        // A task run outside any flow: its edges from and to other such runs.
        tx.execute(
            &tx.prepare_cached("DELETE FROM edges WHERE upstream = $1 OR downstream = $1")
                .await?,
            &[&id],
        )
        .await?;
    } else {
        tx.execute(
            &tx.prepare_cached("DELETE FROM edges WHERE flow_run_id = ANY($1)")
                .await?,
            &[&flow_ids],
        )
        .await?;
    }
    for sql in [
        "DELETE FROM states WHERE run_id = ANY($1)",
        "DELETE FROM logs WHERE run_id = ANY($1)",
        "DELETE FROM queue WHERE run_id = ANY($1)",
        "DELETE FROM concurrency_slots WHERE run_id = ANY($1)",
        "DELETE FROM task_runs WHERE id = ANY($1)",
        "DELETE FROM flow_runs WHERE id = ANY($1)",
    ] {
        tx.execute(&tx.prepare_cached(sql).await?, &[&all]).await?;
    }
    Ok(())
}

/// Marks Crashed the unfinished runs of processes in `dead` or silent since `stale_before`.
///
/// It never waits on a row lock: a run locked by another transaction is being changed right
/// now, or is held by a process stopped inside a transaction, and waiting on that would stop
/// the caller's heartbeats as well (it runs on their thread). Such runs are skipped and
/// reaped on a later call, once PostgreSQL has ended the stalled session
/// ([`IDLE_IN_TRANSACTION`](crate::IDLE_IN_TRANSACTION)).
pub(crate) async fn reap(pool: &Pool, dead: &[Uuid], stale_before: Micros) -> Result<Vec<(RunKind, Uuid)>, DbError> {
    let now = now_micros();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut crashed = Vec::new();
    for (kind, table) in [(RunKind::Flow, "flow_runs"), (RunKind::Task, "task_runs")] {
        let sql = format!(
            "SELECT r.id, r.state, r.state_seq, r.attempt, p.pid, p.host, p.heartbeat, p.id = ANY($2) AS exited
             FROM {table} r JOIN processes p ON p.id = r.process_id
             WHERE r.state IN ('Pending', 'Running', 'AwaitingRetry', 'Cancelling')
               AND ((p.heartbeat < $1 AND p.heartbeat + p.lease < $3) OR p.id = ANY($2))
             ORDER BY r.id FOR UPDATE OF r SKIP LOCKED"
        );
        let rows = tx
            .query(&tx.prepare_cached(&sql).await?, &[&stale_before, &dead, &now])
            .await?;
        for row in rows {
            let id: Uuid = row.try_get("id")?;
            let state: String = row.try_get("state")?;
            let from = state.parse::<StateType>().map_err(|e| DbError::Data(e.to_string()))?;
            let seq = row.try_get::<_, i32>("state_seq")? as u32 + 1;
            let pid: i32 = row.try_get("pid")?;
            let host: String = row.try_get("host")?;
            let change = StateChange {
                id: Uuid::nil(),
                kind,
                run_id: id,
                from,
                to: StateType::Crashed,
                message: Some(kiln_store::model::orphan_message(
                    pid.into(),
                    &host,
                    row.try_get("heartbeat")?,
                    row.try_get("exited")?,
                )),
                attempt: row.try_get::<_, i32>("attempt")? as u32,
                timestamp: now_micros(),
                result: None,
                fence: None,
            };
            let update = format!(
                "UPDATE {table} SET state = 'Crashed', state_seq = $2, state_message = $3,
                     end_time = COALESCE(end_time, $4), history = COALESCE(history, ''::bytea) || $5
                 WHERE id = $1"
            );
            let entry = history::entry(&RunState::record(&change, seq), Uuid::nil());
            tx.execute(
                &tx.prepare_cached(&update).await?,
                &[&id, &(seq as i32), &change.message, &change.timestamp, &entry],
            )
            .await?;
            crashed.push((kind, id));
        }
    }
    crashed.extend(crate::work::take_back_claims(&tx, dead, stale_before, now).await?);
    tx.commit().await?;
    Ok(crashed)
}

/// Queued runs, as the column arrays of one insert.
#[derive(Default)]
struct Queued<'a> {
    run_id: Vec<Uuid>,
    kind: Vec<&'static str>,
    pool: Vec<&'a str>,
    deployment: Vec<Option<&'a str>>,
    target: Vec<&'a str>,
    scheduled: Vec<i64>,
    max_attempts: Vec<i32>,
    host: Vec<Option<&'a str>>,
    payload: Vec<Option<String>>,
}

impl<'a> Queued<'a> {
    fn push(&mut self, e: &'a kiln_store::work::QueueEntry) {
        self.run_id.push(e.run_id);
        self.kind.push(crate::work::kind_str(e.kind));
        self.pool.push(&e.pool);
        self.deployment.push(e.deployment.as_deref());
        self.target.push(&e.target);
        self.scheduled.push(e.scheduled);
        self.max_attempts.push(e.max_attempts as i32);
        self.host.push(e.host.as_deref());
        self.payload.push((!e.payload.is_null()).then(|| e.payload.to_string()));
    }

    /// Inserts them; a run queued twice keeps its first entry.
    async fn insert(&self, tx: &Transaction<'_>) -> Result<(), DbError> {
        if self.run_id.is_empty() {
            return Ok(());
        }
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO queue (run_id, kind, pool, deployment, target, scheduled, max_attempts, host, payload)
                 SELECT u.run_id, u.kind, u.pool, u.deployment, u.target, u.scheduled, u.max_attempts, u.host,
                        u.payload::jsonb
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::int[],
                             $8::text[], $9::text[])
                      AS u(run_id, kind, pool, deployment, target, scheduled, max_attempts, host, payload)
                 ON CONFLICT DO NOTHING",
            )
            .await?,
            &[
                &self.run_id,
                &self.kind,
                &self.pool,
                &self.deployment,
                &self.target,
                &self.scheduled,
                &self.max_attempts,
                &self.host,
                &self.payload,
            ],
        )
        .await?;
        Ok(())
    }
}
