//! Reads, and the mapping of rows to the model.

use deadpool_postgres::Pool;
use kiln_store::model::*;
use kiln_store::state::StateType;
use kiln_store::{StoreError, id_hex};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};
use uuid::Uuid;

use crate::backend;

type PgRow = Row;

fn state(row: &PgRow, column: &str) -> Result<StateType, StoreError> {
    let text: String = get(row, column)?;
    text.parse()
}

fn u32_col(row: &PgRow, column: &str) -> Result<u32, StoreError> {
    let v: i32 = get(row, column)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{column} is negative ({v})")))
}

fn get<'r, T: FromSql<'r>>(row: &'r PgRow, column: &str) -> Result<T, StoreError> {
    row.try_get(column).map_err(backend)
}

fn tags(row: &PgRow) -> Result<Vec<String>, StoreError> {
    let v: serde_json::Value = get(row, "tags")?;
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(format!("tags: {e}")))
}

const FLOW_COLUMNS: &str = "r.id, r.name, r.parent_id, r.parameters, r.tags, r.state, r.state_message, r.attempt,
     r.created, r.start_time, r.end_time,
     (SELECT COUNT(*) FROM task_runs t WHERE t.flow_run_id = r.id) AS task_count, r.result, r.command, r.retry_of";

fn flow_row(row: &PgRow) -> Result<FlowRun, StoreError> {
    Ok(FlowRun {
        id: get(row, "id")?,
        name: get(row, "name")?,
        parent_id: get(row, "parent_id")?,
        parameters: get(row, "parameters")?,
        tags: tags(row)?,
        state: state(row, "state")?,
        state_message: get(row, "state_message")?,
        attempt: u32_col(row, "attempt")?,
        created: get(row, "created")?,
        start_time: get(row, "start_time")?,
        end_time: get(row, "end_time")?,
        task_count: get::<i64>(row, "task_count")? as u64,
        result: get(row, "result")?,
        command: get(row, "command")?,
        retry_of: get(row, "retry_of")?,
    })
}

const TASK_COLUMNS: &str = "r.id, r.flow_run_id, r.name, r.task_key, r.inputs, r.tags, r.state, r.state_message,
     r.attempt, r.created, r.start_time, r.end_time, r.result, r.call_key";

fn task_row(row: &PgRow) -> Result<TaskRun, StoreError> {
    Ok(TaskRun {
        id: get(row, "id")?,
        flow_run_id: get(row, "flow_run_id")?,
        name: get(row, "name")?,
        task_key: get(row, "task_key")?,
        inputs: get(row, "inputs")?,
        tags: tags(row)?,
        state: state(row, "state")?,
        state_message: get(row, "state_message")?,
        attempt: u32_col(row, "attempt")?,
        created: get(row, "created")?,
        start_time: get(row, "start_time")?,
        end_time: get(row, "end_time")?,
        result: get(row, "result")?,
        call_key: get(row, "call_key")?,
    })
}

async fn all<T>(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    map: fn(&PgRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let client = pool.get().await.map_err(backend)?;
    // Prepared once per connection: planning is most of a small query's cost.
    let statement = client.prepare_cached(sql).await.map_err(backend)?;
    let rows = client.query(&statement, params).await.map_err(backend)?;
    rows.iter().map(map).collect()
}

/// The rows of `select` (alias `r`, whose parent is `parent_column`) that `f` selects, one
/// more than the page: the caller learns whether there is a next page.
async fn list_runs<T>(
    pool: &Pool,
    f: &RunFilter,
    select: &str,
    parent_column: &str,
    row: fn(&PgRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut sql = format!("{select} WHERE TRUE");
    let states: Vec<&str> = f.states.iter().map(|s| s.as_str()).collect();
    let limit = f.limit as i64 + 1;
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let [state] = states.as_slice() {
        // One state: `=`, so the (state, id) index gives the rows in order, no sort.
        params.push(state);
        sql.push_str(&format!(" AND r.state = ${}", params.len()));
    } else if !states.is_empty() {
        params.push(&states);
        sql.push_str(&format!(" AND r.state = ANY(${})", params.len()));
    }
    if let Some(name) = &f.name {
        params.push(name);
        sql.push_str(&format!(" AND r.name = ${}", params.len()));
    }
    if let Some(tag) = &f.tag {
        params.push(tag);
        sql.push_str(&format!(" AND r.tags @> jsonb_build_array(${}::text)", params.len()));
    }
    if f.top_level {
        sql.push_str(&format!(" AND r.{parent_column} IS NULL"));
    }
    if let Some(parent) = &f.parent {
        params.push(parent);
        sql.push_str(&format!(" AND r.{parent_column} = ${}", params.len()));
    }
    if let Some(since) = &f.since {
        params.push(since);
        sql.push_str(&format!(" AND r.created >= ${}", params.len()));
    }
    if let Some(until) = &f.until {
        params.push(until);
        sql.push_str(&format!(" AND r.created < ${}", params.len()));
    }
    let (cursor, order) = if f.oldest_first { (">", "ASC") } else { ("<", "DESC") };
    if let Some(after) = &f.after {
        params.push(after);
        sql.push_str(&format!(" AND r.id {cursor} ${}", params.len()));
    }
    params.push(&limit);
    sql.push_str(&format!(" ORDER BY r.id {order} LIMIT ${}", params.len()));
    all(pool, &sql, &params, row).await
}

pub(crate) async fn list_flow_runs(pool: &Pool, f: &RunFilter) -> Result<FlowRunPage, StoreError> {
    let select = format!("SELECT {FLOW_COLUMNS} FROM flow_runs r");
    let mut runs = list_runs(pool, f, &select, "parent_id", flow_row).await?;
    let next = f.page(&mut runs, |r| r.id);
    Ok(FlowRunPage { runs, next })
}

pub(crate) async fn list_task_runs(pool: &Pool, f: &RunFilter) -> Result<TaskRunPage, StoreError> {
    let select = format!("SELECT {TASK_COLUMNS} FROM task_runs r");
    let mut runs = list_runs(pool, f, &select, "flow_run_id", task_row).await?;
    let next = f.page(&mut runs, |r| r.id);
    Ok(TaskRunPage { runs, next })
}

pub(crate) async fn run_counts(pool: &Pool) -> Result<Vec<RunCount>, StoreError> {
    let sql = "SELECT 'flow' AS kind, state, COUNT(*) AS count FROM flow_runs GROUP BY state
               UNION ALL SELECT 'task', state, COUNT(*) FROM task_runs GROUP BY state";
    all(pool, sql, &[], |r| {
        Ok(RunCount {
            kind: if get::<String>(r, "kind")? == "flow" {
                RunKind::Flow
            } else {
                RunKind::Task
            },
            state: state(r, "state")?,
            count: get::<i64>(r, "count")? as u64,
        })
    })
    .await
}

pub(crate) async fn flow_run(pool: &Pool, id: Uuid) -> Result<Option<FlowRun>, StoreError> {
    let sql = format!("SELECT {FLOW_COLUMNS} FROM flow_runs r WHERE r.id = $1");
    Ok(all(pool, &sql, &[&id], flow_row).await?.pop())
}

pub(crate) async fn subflow_runs(pool: &Pool, parent: Uuid) -> Result<Vec<FlowRun>, StoreError> {
    let sql = format!("SELECT {FLOW_COLUMNS} FROM flow_runs r WHERE r.parent_id = $1 ORDER BY r.id");
    all(pool, &sql, &[&parent], flow_row).await
}

pub(crate) async fn task_runs(pool: &Pool, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM task_runs r WHERE r.flow_run_id = $1 ORDER BY r.id");
    all(pool, &sql, &[&flow_run_id], task_row).await
}

pub(crate) async fn task_run(pool: &Pool, id: Uuid) -> Result<Option<TaskRun>, StoreError> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM task_runs r WHERE r.id = $1");
    Ok(all(pool, &sql, &[&id], task_row).await?.pop())
}

pub(crate) async fn task_runs_in(pool: &Pool, ids: &[Uuid], states: &[StateType]) -> Result<Vec<TaskRun>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM task_runs r WHERE r.id = ANY($1) AND (cardinality($2::text[]) = 0 OR r.state = ANY($2))"
    );
    all(pool, &sql, &[&ids, &states], task_row).await
}

/// A run's history: the entries kept in its row, after the rows of `states` written before
/// migration 0011 (both in one snapshot).
pub(crate) async fn states(pool: &Pool, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError> {
    let sql = "SELECT run_id, seq, state, message, attempt, timestamp, result::text AS result, NULL::bytea AS history
               FROM states WHERE run_id = $1
               UNION ALL SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, history FROM flow_runs WHERE id = $1
               UNION ALL SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, history FROM task_runs WHERE id = $1";
    let parts = all(pool, sql, &[&run_id], |r| {
        if let Some(kept) = get::<Option<Vec<u8>>>(r, "history")? {
            let run_id = get(r, "run_id")?;
            let entries = kiln_store::history::decode(run_id, &kept).map_err(StoreError::Corrupt)?;
            return Ok(entries.into_iter().map(|(record, _)| record).collect());
        }
        if get::<Option<i32>>(r, "seq")?.is_none() {
            return Ok(Vec::new());
        }
        Ok(vec![StateRecord {
            run_id: get(r, "run_id")?,
            seq: u32_col(r, "seq")?,
            state: state(r, "state")?,
            message: get(r, "message")?,
            attempt: u32_col(r, "attempt")?,
            timestamp: get(r, "timestamp")?,
            result: get(r, "result")?,
        }])
    })
    .await?;
    let mut records: Vec<StateRecord> = parts.into_iter().flatten().collect();
    records.sort_by_key(|r| r.seq);
    Ok(records)
}

pub(crate) async fn edges(pool: &Pool, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError> {
    let sql = "SELECT upstream, downstream FROM edges WHERE flow_run_id = $1 ORDER BY downstream, upstream";
    all(pool, sql, &[&flow_run_id], |r| {
        Ok(Edge {
            upstream: get(r, "upstream")?,
            downstream: get(r, "downstream")?,
        })
    })
    .await
}

const LOG_COLUMNS: &str = "run_id, flow_run_id, timestamp, level, target, message, id, seq";

fn log_row(r: &PgRow) -> Result<(LogRecord, i64), StoreError> {
    let id: Option<Uuid> = get(r, "id")?;
    Ok((
        LogRecord {
            id: id.unwrap_or_default(),
            run_id: get(r, "run_id")?,
            flow_run_id: get(r, "flow_run_id")?,
            timestamp: get(r, "timestamp")?,
            level: get(r, "level")?,
            target: get(r, "target")?,
            message: get(r, "message")?,
        },
        get(r, "seq")?,
    ))
}

pub(crate) async fn logs(pool: &Pool, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError> {
    let sql = format!("SELECT {LOG_COLUMNS} FROM logs WHERE run_id = $1 OR flow_run_id = $1 ORDER BY timestamp, seq");
    let rows = all(pool, &sql, &[&run_id], log_row).await?;
    Ok(rows.into_iter().map(|(l, _)| l).collect())
}

pub(crate) async fn list_logs(pool: &Pool, run_id: Uuid, f: &LogFilter) -> Result<LogPage, StoreError> {
    let levels = f.levels().map_err(|e| StoreError::backend(e, false))?;
    let sql = format!(
        "SELECT {LOG_COLUMNS} FROM logs WHERE (run_id = $1 OR flow_run_id = $1) AND seq > $2
         AND level = ANY($3) ORDER BY seq LIMIT $4"
    );
    let (after, limit) = (f.after.unwrap_or(i64::MIN), f.limit as i64 + 1);
    let mut rows = all(pool, &sql, &[&run_id, &after, &levels, &limit], log_row).await?;
    let next = if rows.len() > f.limit {
        rows.truncate(f.limit);
        rows.last().map(|(_, seq)| *seq)
    } else {
        None
    };
    Ok(LogPage {
        logs: rows.into_iter().map(|(l, _)| l).collect(),
        next,
    })
}

pub(crate) async fn resolve(pool: &Pool, id_or_prefix: &str) -> Result<RunRef, StoreError> {
    let Some(hex) = id_hex(id_or_prefix) else {
        return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
    };
    let tables = [
        ("flow_runs", RunRef::Flow as fn(Uuid) -> RunRef),
        ("task_runs", RunRef::Task),
    ];
    let ids = |r: &PgRow| get::<Uuid>(r, "id");
    // An exact id, else a prefix, else the id's tail (what the CLI prints in short form).
    if let Ok(id) = Uuid::parse_str(&hex) {
        for (table, make) in tables {
            let sql = format!("SELECT id FROM {table} WHERE id = $1");
            if let Some(id) = all(pool, &sql, &[&id], ids).await?.pop() {
                return Ok(make(id));
            }
        }
    }
    for pattern in [format!("{hex}%"), format!("%{hex}")] {
        let mut found = Vec::new();
        for (table, make) in tables {
            let sql = format!("SELECT id FROM {table} WHERE upper(replace(id::text, '-', '')) LIKE $1 LIMIT 100");
            found.extend(all(pool, &sql, &[&pattern], ids).await?.into_iter().map(make));
        }
        match found.len() {
            0 => continue,
            1 => return Ok(found[0]),
            count => {
                return Err(StoreError::AmbiguousRun {
                    prefix: id_or_prefix.to_owned(),
                    count,
                });
            }
        }
    }
    Err(StoreError::UnknownRun(id_or_prefix.to_owned()))
}

pub(crate) async fn processes(pool: &Pool, since: Micros) -> Result<Vec<Process>, StoreError> {
    let sql = "SELECT id, host, pid, started, heartbeat, lease FROM processes p WHERE heartbeat >= $1
                  OR EXISTS (SELECT 1 FROM task_runs WHERE process_id = p.id AND state IN ('Pending', 'Running', 'AwaitingRetry', 'Cancelling'))
                  OR EXISTS (SELECT 1 FROM flow_runs WHERE process_id = p.id AND state IN ('Pending', 'Running', 'AwaitingRetry', 'Cancelling'))
                  OR EXISTS (SELECT 1 FROM queue WHERE claimed_by = p.id)
               ORDER BY heartbeat DESC";
    all(pool, sql, &[&since], |r| {
        Ok(Process {
            id: get(r, "id")?,
            host: get(r, "host")?,
            pid: get::<i32>(r, "pid")? as u32,
            started: get::<i64>(r, "started")? as u64,
            heartbeat: get(r, "heartbeat")?,
            lease: get(r, "lease")?,
        })
    })
    .await
}

pub(crate) async fn api_tokens(pool: &Pool) -> Result<Vec<ApiToken>, StoreError> {
    let sql = "SELECT name, hash, read_only, created, revoked FROM api_tokens ORDER BY name";
    all(pool, sql, &[], |r| {
        Ok(ApiToken {
            name: get(r, "name")?,
            hash: get(r, "hash")?,
            read_only: get(r, "read_only")?,
            created: get(r, "created")?,
            revoked: get(r, "revoked")?,
        })
    })
    .await
}
