//! Work pools on SQLite: claims (on the writer thread, one `BEGIN IMMEDIATE` each, so two
//! processes on the same file cannot claim the same run), claims taken back from dead
//! processes, and the reads of deployments and queues.

use std::collections::HashMap;

use kiln_store::StoreError;
use kiln_store::model::{Micros, RunKind, now_micros};
use kiln_store::state::{FINAL_SQL, StateType};
use kiln_store::work::{self, Claim, ClaimRequest, Deployment, Holder, QueueEntry, QueuedRun, TakeBack, WorkPool};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use crate::backend;
use crate::writer::{Current, Statements};

/// A claim for the writer thread, and where its answer goes.
pub(crate) struct ClaimJob {
    pub(crate) request: ClaimRequest,
    pub(crate) reply: futures::channel::oneshot::Sender<Result<Vec<Claim>, StoreError>>,
}

fn parse_kind(s: &str) -> Result<RunKind, StoreError> {
    match s {
        "flow" => Ok(RunKind::Flow),
        "task" => Ok(RunKind::Task),
        other => Err(StoreError::Corrupt(format!("unknown run kind '{other}' in the queue"))),
    }
}

/// A queued run and its run's current state, as a claim reads it.
struct Candidate {
    entry: QueueEntry,
    fence: i64,
    state: Option<StateType>,
    seq: u32,
    attempt: u32,
    parameters: Option<String>,
    tags: Option<String>,
}

impl Candidate {
    /// A flow run's parameters, or a task run's inputs (the queue's payload).
    fn parameters_json(&mut self) -> serde_json::Value {
        match self.entry.kind {
            RunKind::Flow => json_or_null(self.parameters.take()),
            RunKind::Task => self.entry.payload.clone(),
        }
    }
}

/// The runs' columns a claim needs, from whichever table holds the run.
/// The most rows of the queue one claim reads, and the largest page it reads them in (see
/// `claim`): a claim behind thousands of runs held back by their limits stops there.
const MAX_SCAN: usize = 20_000;
const MAX_PAGE: usize = 2_000;

const CANDIDATE: &str = "SELECT q.run_id, q.kind, q.pool, q.deployment, q.target, q.scheduled, q.max_attempts, q.fence,
        COALESCE(f.state, t.state), COALESCE(f.state_seq, t.state_seq), COALESCE(f.attempt, t.attempt),
        f.parameters, COALESCE(f.tags, t.tags), q.host, q.payload
 FROM queue q
 LEFT JOIN flow_runs f ON q.kind = 'flow' AND f.id = q.run_id
 LEFT JOIN task_runs t ON q.kind = 'task' AND t.id = q.run_id";

/// A queue row's entry: columns 0-6 as in [`CANDIDATE`], `host` and `payload` at `host_at`
/// and the column after.
fn queue_entry(r: &rusqlite::Row<'_>, host_at: usize) -> rusqlite::Result<QueueEntry> {
    let kind: String = r.get(1)?;
    Ok(QueueEntry {
        run_id: r.get(0)?,
        kind: parse_kind(&kind)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e)))?,
        pool: r.get(2)?,
        deployment: r.get(3)?,
        target: r.get(4)?,
        scheduled: r.get(5)?,
        max_attempts: r.get(6)?,
        host: r.get(host_at)?,
        payload: json_or_null(r.get(host_at + 1)?),
    })
}

fn candidate(r: &rusqlite::Row<'_>) -> rusqlite::Result<Candidate> {
    Ok(Candidate {
        entry: queue_entry(r, 13)?,
        fence: r.get(7)?,
        state: r.get::<_, Option<String>>(8)?.and_then(|s| s.parse::<StateType>().ok()),
        seq: r.get::<_, Option<u32>>(9)?.unwrap_or(0),
        attempt: r.get::<_, Option<u32>>(10)?.unwrap_or(0),
        parameters: r.get(11)?,
        tags: r.get(12)?,
    })
}

/// Claims queued runs for `request.process_id` (see `Store::claim`). `forget` is told of
/// every run whose state the claim changed.
pub(crate) fn claim(
    conn: &mut Connection,
    request: &ClaimRequest,
    forget: &mut dyn FnMut(Uuid),
) -> Result<Vec<Claim>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let known: Option<i64> = tx
        .query_row("SELECT 1 FROM processes WHERE id = ?1", [request.process_id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(backend)?;
    if known.is_none() {
        return Err(StoreError::UnknownProcess(request.process_id));
    }
    let pools = serde_json::to_string(&request.pools).unwrap_or_else(|_| "[]".into());
    let targets = serde_json::to_string(&request.targets).unwrap_or_else(|_| "[]".into());
    let now = now_micros();
    let limit = request.limit.max(1) as usize;
    // Runs this process holds and has not started: an answer it may never have received.
    let mut held = Vec::new();
    if request.resend {
        let sql = format!(
            "{CANDIDATE} WHERE q.claimed_by = ?1 AND q.pool IN (SELECT value FROM json_each(?2))
               AND COALESCE(f.state, t.state) IN ('Pending', 'AwaitingRetry')"
        );
        let mut q = tx.prepare(&sql).map_err(backend)?;
        for row in q
            .query_map(params![request.process_id, pools], candidate)
            .map_err(backend)?
        {
            let mut c = row.map_err(backend)?;
            let (fence, state, attempt) = (c.fence as u64, c.state.unwrap_or(StateType::Pending), c.attempt);
            let parameters = c.parameters_json();
            held.push(c.entry.claimed(fence, state, attempt, parameters, json_list(c.tags)));
        }
    }
    let mut claims = Vec::new();
    {
        let mut st = Statements::prepare(&tx).map_err(backend)?;
        let mut limits = Limits::default();
        // Pages of each pool's rows in the order they are handed out, each from its index
        // (which holds the key, `run_id`, after `scheduled`, so a deep backlog is not
        // sorted); only the rows picked are joined to their runs. A page starts where the
        // pool's last one ended: rows passed over (over a limit, or finished) do not stop
        // the claim from reaching the rows behind them. Pages grow; the claim stops once
        // it has `limit` runs, every pool is read to its end, or it read MAX_SCAN rows.
        let mut pools: Vec<(&String, Micros, Uuid)> = Vec::new();
        for pool in &request.pools {
            if !pools.iter().any(|(p, _, _)| *p == pool) {
                pools.push((pool, Micros::MIN, Uuid::nil()));
            }
        }
        let mut page = limit + 2;
        let mut scanned = 0;
        while !pools.is_empty() && claims.len() < limit && scanned < MAX_SCAN {
            let mut first: Vec<(Micros, Uuid)> = Vec::new();
            // Runs of deployments found full are left unread by later pages; a pool found
            // full has nothing more to give.
            let full = serde_json::to_string(&limits.full(true)).unwrap_or_else(|_| "[]".into());
            let full_pools = limits.full(false);
            pools.retain(|(pool, _, _)| !full_pools.contains(pool));
            let mut q = tx
                .prepare_cached(
                    "SELECT scheduled, run_id FROM queue WHERE claimed_by IS NULL AND pool = ?1 AND scheduled <= ?2
                       AND (scheduled, run_id) > (?6, ?7)
                       AND (deployment IS NULL OR deployment NOT IN (SELECT value FROM json_each(?8)))
                       AND (?4 = '[]' OR target IN (SELECT value FROM json_each(?4)))
                       AND (host IS NULL OR host = ?5)
                     ORDER BY scheduled, run_id LIMIT ?3",
                )
                .map_err(backend)?;
            let mut read_to_end = Vec::new();
            for (i, (pool, after, after_id)) in pools.iter_mut().enumerate() {
                let rows = q
                    .query_map(
                        params![*pool, now, page as i64, targets, request.host, *after, *after_id, full],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(backend)?
                    .collect::<rusqlite::Result<Vec<(Micros, Uuid)>>>()
                    .map_err(backend)?;
                // A pool that gave less than a page is read to its end.
                if rows.len() < page {
                    read_to_end.push(i);
                }
                if let Some(&(s, id)) = rows.last() {
                    (*after, *after_id) = (s, id);
                }
                first.extend(rows);
            }
            for i in read_to_end.into_iter().rev() {
                pools.remove(i);
            }
            scanned += first.len();
            first.sort_unstable();
            let mut q = tx
                .prepare_cached(&format!("{CANDIDATE} WHERE q.run_id = ?1"))
                .map_err(backend)?;
            let mut candidates = Vec::with_capacity(first.len());
            for (_, id) in first {
                candidates.extend(q.query_row(params![id], candidate).optional().map_err(backend)?);
            }
            page = (page * 4).min(MAX_PAGE);
            for mut c in candidates {
                if claims.len() >= limit {
                    break;
                }
                let Some(state) = c.state.filter(|s| work::is_claimable(*s)) else {
                    if c.state.is_none_or(StateType::is_terminal) {
                        // Finished (cancelled before anyone claimed it), or its run is gone.
                        st.dequeue.execute([c.entry.run_id]).map_err(backend)?;
                    }
                    continue;
                };
                if !limits.admit(&tx, &c.entry)? {
                    continue;
                }
                let fence = c.fence + 1;
                tx.execute(
                    "UPDATE queue SET claimed_by = ?2, fence = ?3 WHERE run_id = ?1",
                    params![c.entry.run_id, request.process_id, fence],
                )
                .map_err(backend)?;
                let mut state_now = state;
                if state == StateType::Scheduled {
                    let change = work::claimed(c.entry.kind, c.entry.run_id, c.attempt, request.process_id);
                    let from = Current { state, seq: c.seq };
                    if st
                        .update_state(&change, from, c.seq + 1, Uuid::nil())
                        .map_err(backend)?
                    {
                        forget(c.entry.run_id);
                        state_now = StateType::Pending;
                    }
                }
                let parameters = c.parameters_json();
                let tags = json_list(c.tags);
                claims.push(c.entry.claimed(fence as u64, state_now, c.attempt, parameters, tags));
            }
        }
    }
    tx.commit().map_err(backend)?;
    claims.extend(held);
    Ok(claims)
}

fn json_or_null(text: Option<String>) -> serde_json::Value {
    text.and_then(|p| serde_json::from_str(&p).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn json_list(text: Option<String>) -> Vec<String> {
    text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// The pools' and deployments' concurrency limits, as counted inside one claim.
#[derive(Default)]
struct Limits {
    /// Per pool, then per deployment: (limit, claimed now).
    pools: HashMap<String, (Option<u32>, u32)>,
    deployments: HashMap<String, (Option<u32>, u32)>,
}

impl Limits {
    /// Whether `entry` fits under its pool's and deployment's limits; counts it if so.
    /// The deployments (`true`) or pools found full so far.
    fn full(&self, deployment: bool) -> Vec<String> {
        let counted = if deployment { &self.deployments } else { &self.pools };
        counted
            .iter()
            .filter(|(_, (limit, held))| limit.is_some_and(|l| *held >= l))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn admit(&mut self, tx: &rusqlite::Transaction<'_>, entry: &QueueEntry) -> Result<bool, StoreError> {
        let count = |column: &str, name: &str, table: &str| -> Result<(Option<u32>, u32), StoreError> {
            let limit: Option<u32> = tx
                .query_row(
                    &format!("SELECT concurrency FROM {table} WHERE name = ?1"),
                    [name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?
                .flatten();
            let held: u32 = tx
                .query_row(
                    &format!("SELECT count(*) FROM queue WHERE {column} = ?1 AND claimed_by IS NOT NULL"),
                    [name],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            Ok((limit, held))
        };
        let pool = match self.pools.get(&entry.pool) {
            Some(p) => *p,
            None => count("pool", &entry.pool, "work_pools")?,
        };
        let deployment = match &entry.deployment {
            Some(d) => Some(match self.deployments.get(d) {
                Some(x) => *x,
                None => count("deployment", d, "deployments")?,
            }),
            None => None,
        };
        let fits = |(limit, held): (Option<u32>, u32)| limit.is_none_or(|l| held < l);
        if !fits(pool) || !deployment.is_none_or(fits) {
            self.pools.insert(entry.pool.clone(), pool);
            if let (Some(d), Some(x)) = (&entry.deployment, deployment) {
                self.deployments.insert(d.clone(), x);
            }
            return Ok(false);
        }
        self.pools.insert(entry.pool.clone(), (pool.0, pool.1 + 1));
        if let (Some(d), Some(x)) = (&entry.deployment, deployment) {
            self.deployments.insert(d.clone(), (x.0, x.1 + 1));
        }
        Ok(true)
    }
}

/// Takes back the claims of processes in `dead_json` (hex ids) or silent since
/// `stale_before`, inside the reap's transaction; the runs whose state changed.
pub(crate) fn take_back_claims(
    tx: &rusqlite::Transaction<'_>,
    st: &mut Statements<'_>,
    stale_before: Micros,
    now: Micros,
    dead_json: &str,
) -> Result<Vec<(RunKind, Uuid)>, StoreError> {
    let sql = format!(
        "{CANDIDATE}, processes p WHERE p.id = q.claimed_by
           AND ((p.heartbeat < ?1 AND p.heartbeat + p.lease < ?3) OR hex(p.id) IN (SELECT value FROM json_each(?2)))"
    );
    let held: Vec<Candidate> = {
        let mut q = tx.prepare(&sql).map_err(backend)?;
        let rows = q
            .query_map(params![stale_before, dead_json, now], candidate)
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)?
    };
    let why_of = |id: Uuid| -> Result<String, StoreError> {
        tx.query_row(
            "SELECT p.pid, p.host, p.heartbeat, hex(p.id) IN (SELECT value FROM json_each(?2))
             FROM queue q JOIN processes p ON p.id = q.claimed_by WHERE q.run_id = ?1",
            params![id, dead_json],
            |r| {
                Ok(kiln_store::model::orphan_message(
                    r.get(0)?,
                    &r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                ))
            },
        )
        .map_err(backend)
    };
    let mut changed = Vec::new();
    for c in held {
        let id = c.entry.run_id;
        let state = c.state.unwrap_or(StateType::Crashed);
        let why = why_of(id)?;
        let rule = work::take_back(c.entry.kind, id, state, c.attempt, c.entry.max_attempts, &why);
        let mut apply = |change: &kiln_store::model::StateChange| -> Result<(), StoreError> {
            let from = Current { state, seq: c.seq };
            if st.update_state(change, from, c.seq + 1, Uuid::nil()).map_err(backend)? {
                changed.push((c.entry.kind, id));
            }
            Ok(())
        };
        match rule {
            TakeBack::Requeue(change) => {
                if let Some(change) = &change {
                    apply(change)?;
                }
                tx.execute("UPDATE queue SET claimed_by = NULL WHERE run_id = ?1", [id])
                    .map_err(backend)?;
            }
            TakeBack::End(change) => {
                apply(&change)?;
                st.dequeue.execute([id]).map_err(backend)?;
            }
            TakeBack::Drop => {
                st.dequeue.execute([id]).map_err(backend)?;
            }
        }
    }
    Ok(changed)
}

pub(crate) fn deployments(c: &Connection) -> Result<Vec<Deployment>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT name, flow, pool, parameters, parameter_schema, tags, schedule, catchup, concurrency,
                    max_attempts, updated FROM deployments ORDER BY name",
        )
        .map_err(backend)?;
    let json = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap_or(serde_json::Value::Null);
    let rows = st
        .query_map([], |r| {
            Ok(Deployment {
                name: r.get(0)?,
                flow: r.get(1)?,
                pool: r.get(2)?,
                parameters: json(r.get(3)?),
                parameter_schema: json(r.get(4)?),
                tags: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                schedule: r
                    .get::<_, Option<String>>(6)?
                    .and_then(|s| serde_json::from_str(&s).ok()),
                catchup: r.get(7)?,
                concurrency: r.get(8)?,
                max_attempts: r.get(9)?,
                updated: r.get(10)?,
            })
        })
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}

pub(crate) fn work_pools(c: &Connection) -> Result<Vec<WorkPool>, StoreError> {
    let mut st = c
        .prepare_cached("SELECT name, concurrency FROM work_pools ORDER BY name")
        .map_err(backend)?;
    let rows = st
        .query_map([], |r| {
            Ok(WorkPool {
                name: r.get(0)?,
                concurrency: r.get(1)?,
            })
        })
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}

pub(crate) fn holders(c: &Connection, ids: &[Uuid]) -> Result<Vec<Holder>, StoreError> {
    // The ids as parameters of their own: an `IN` on the primary key looks each one up.
    let marks = vec!["?"; ids.len()].join(", ");
    let mut st = c
        .prepare(&format!(
            "SELECT run_id, fence, claimed_by FROM queue WHERE run_id IN ({marks})"
        ))
        .map_err(backend)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(ids), |r| {
            Ok(Holder {
                run_id: r.get(0)?,
                fence: r.get::<_, i64>(1)? as u64,
                claimed_by: r.get(2)?,
            })
        })
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}

pub(crate) fn queued_runs(c: &Connection, pool: Option<&str>, limit: usize) -> Result<Vec<QueuedRun>, StoreError> {
    let mut st = c
        .prepare_cached(&format!(
            // A run ended without its worker (cancelled before a claim) keeps its row until
            // a claim passes over it: not listed.
            "SELECT q.run_id, q.kind, q.pool, q.deployment, q.target, q.scheduled, q.max_attempts, q.host, q.payload,
                    q.fence, q.claimed_by
             FROM queue q
             LEFT JOIN flow_runs f ON q.kind = 'flow' AND f.id = q.run_id
             LEFT JOIN task_runs t ON q.kind = 'task' AND t.id = q.run_id
             WHERE (?1 IS NULL OR q.pool = ?1)
               AND COALESCE(f.state, t.state) NOT IN {FINAL_SQL}
             ORDER BY q.scheduled, q.run_id LIMIT ?2"
        ))
        .map_err(backend)?;
    let rows = st
        .query_map(params![pool, limit as i64], |r| {
            Ok(QueuedRun {
                entry: queue_entry(r, 7)?,
                fence: r.get::<_, i64>(9)? as u64,
                claimed_by: r.get(10)?,
            })
        })
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}
