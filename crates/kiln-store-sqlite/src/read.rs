//! Reads: row mappings, and the reader thread that runs queries off the caller's thread.

use std::sync::mpsc::{Sender, channel};

use kiln_store::model::*;
use kiln_store::state::StateType;
use kiln_store::{StoreError, id_hex};
use rusqlite::{Connection, OptionalExtension, Row};
use uuid::Uuid;

use crate::{backend, connect_read_only};

type Job = Box<dyn FnOnce(Result<&Connection, &StoreError>) + Send>;

/// A thread with its own read-only connection: async reads never block an executor thread,
/// whatever runtime (or none) the caller uses.
pub(crate) struct Reader {
    jobs: Sender<Job>,
}

impl Reader {
    pub(crate) fn start(path: std::path::PathBuf) -> Result<Reader, StoreError> {
        let (jobs, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("kiln-store-reader".into())
            .spawn(move || {
                let mut conn: Option<Connection> = None;
                while let Ok(job) = rx.recv() {
                    if conn.is_none() {
                        match connect_read_only(&path) {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                job(Err(&e));
                                continue;
                            }
                        }
                    }
                    job(Ok(conn.as_ref().expect("connected above")));
                }
            })
            .map_err(|e| StoreError::WriterGone(format!("cannot start the reader thread: {e}")))?;
        Ok(Reader { jobs })
    }

    pub(crate) async fn run<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(c) => query(c),
                Err(e) => Err(StoreError::Corrupt(format!("cannot read the state database: {e}"))),
            };
            let _ = tx.send(result);
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::WriterGone("the reader thread has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::WriterGone("the reader thread dropped a query".into()))?
    }
}

pub(crate) fn tags_json(tags: &[String]) -> std::borrow::Cow<'static, str> {
    if tags.is_empty() {
        return "[]".into();
    }
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into()).into()
}

fn json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

fn state_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<StateType> {
    let s: String = row.get(idx)?;
    s.parse().map_err(|e: StoreError| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

const FLOW_COLUMNS: &str = "r.id, r.name, r.parent_id, r.parameters, r.tags, r.state, r.state_message, r.attempt,
     r.created, r.start_time, r.end_time,
     (SELECT COUNT(*) FROM task_runs t WHERE t.flow_run_id = r.id), r.result, r.command, r.retry_of";

fn flow_row(row: &Row<'_>) -> rusqlite::Result<FlowRun> {
    Ok(FlowRun {
        id: row.get(0)?,
        name: row.get(1)?,
        parent_id: row.get(2)?,
        parameters: json_col(row, 3)?,
        tags: json_col(row, 4)?,
        state: state_col(row, 5)?,
        state_message: row.get(6)?,
        attempt: row.get(7)?,
        created: row.get(8)?,
        start_time: row.get(9)?,
        end_time: row.get(10)?,
        task_count: row.get::<_, i64>(11)? as u64,
        result: opt_json_col(row, 12)?,
        command: opt_json_col(row, 13)?,
        retry_of: row.get(14)?,
    })
}

const TASK_COLUMNS: &str =
    "r.id, r.flow_run_id, r.name, r.task_key, r.inputs, r.tags, r.state, r.state_message, r.attempt,
     r.created, r.start_time, r.end_time, r.result, r.call_key";

fn task_row(row: &Row<'_>) -> rusqlite::Result<TaskRun> {
    Ok(TaskRun {
        id: row.get(0)?,
        flow_run_id: row.get(1)?,
        name: row.get(2)?,
        task_key: row.get(3)?,
        inputs: json_col(row, 4)?,
        tags: json_col(row, 5)?,
        state: state_col(row, 6)?,
        state_message: row.get(7)?,
        attempt: row.get(8)?,
        created: row.get(9)?,
        start_time: row.get(10)?,
        end_time: row.get(11)?,
        result: opt_json_col(row, 12)?,
        call_key: row.get(13)?,
    })
}

fn opt_json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| {
        serde_json::from_str(&s)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
    })
    .transpose()
}

fn collect<T>(rows: impl Iterator<Item = rusqlite::Result<T>>) -> Result<Vec<T>, StoreError> {
    rows.collect::<rusqlite::Result<Vec<T>>>().map_err(backend)
}

/// The rows of `table` (alias `r`, whose parent is `parent_column`) that `f` selects, one
/// more than the page: the caller learns whether there is a next page.
fn list_runs<T>(
    c: &Connection,
    f: &RunFilter,
    select: &str,
    parent_column: &str,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut sql = format!("{select} WHERE 1 = 1");
    let mut params: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if !f.states.is_empty() {
        sql.push_str(&format!(" AND r.state IN ({})", vec!["?"; f.states.len()].join(", ")));
        params.extend(
            f.states
                .iter()
                .map(|s| Box::new(s.as_str()) as Box<dyn rusqlite::ToSql>),
        );
    }
    if let Some(name) = &f.name {
        sql.push_str(" AND r.name = ?");
        params.push(Box::new(name.clone()));
    }
    if let Some(tag) = &f.tag {
        sql.push_str(" AND EXISTS (SELECT 1 FROM json_each(r.tags) WHERE value = ?)");
        params.push(Box::new(tag.clone()));
    }
    if let Some(parent) = f.parent {
        sql.push_str(&format!(" AND r.{parent_column} = ?"));
        params.push(Box::new(parent));
    }
    if f.top_level {
        sql.push_str(&format!(" AND r.{parent_column} IS NULL"));
    }
    if let Some(since) = f.since {
        sql.push_str(" AND r.created >= ?");
        params.push(Box::new(since));
    }
    if let Some(until) = f.until {
        sql.push_str(" AND r.created < ?");
        params.push(Box::new(until));
    }
    let (cursor, order) = if f.oldest_first { (">", "ASC") } else { ("<", "DESC") };
    if let Some(after) = f.after {
        sql.push_str(&format!(" AND r.id {cursor} ?"));
        params.push(Box::new(after));
    }
    sql.push_str(&format!(" ORDER BY r.id {order} LIMIT ?"));
    params.push(Box::new(f.limit as i64 + 1));
    let mut st = c.prepare_cached(&sql).map_err(backend)?;
    collect(
        st.query_map(rusqlite::params_from_iter(params.iter()), row)
            .map_err(backend)?,
    )
}

pub(crate) fn list_flow_runs(c: &Connection, f: &RunFilter) -> Result<FlowRunPage, StoreError> {
    let select = format!("SELECT {FLOW_COLUMNS} FROM flow_runs r");
    let mut runs = list_runs(c, f, &select, "parent_id", flow_row)?;
    let next = f.page(&mut runs, |r| r.id);
    Ok(FlowRunPage { runs, next })
}

pub(crate) fn list_task_runs(c: &Connection, f: &RunFilter) -> Result<TaskRunPage, StoreError> {
    let select = format!("SELECT {TASK_COLUMNS} FROM task_runs r");
    let mut runs = list_runs(c, f, &select, "flow_run_id", task_row)?;
    let next = f.page(&mut runs, |r| r.id);
    Ok(TaskRunPage { runs, next })
}

pub(crate) fn run_counts(c: &Connection) -> Result<Vec<RunCount>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT 'flow', state, COUNT(*) FROM flow_runs GROUP BY state
             UNION ALL SELECT 'task', state, COUNT(*) FROM task_runs GROUP BY state",
        )
        .map_err(backend)?;
    collect(
        st.query_map([], |r| {
            Ok(RunCount {
                kind: if r.get::<_, String>(0)? == "flow" {
                    RunKind::Flow
                } else {
                    RunKind::Task
                },
                state: state_col(r, 1)?,
                count: r.get::<_, i64>(2)? as u64,
            })
        })
        .map_err(backend)?,
    )
}

pub(crate) fn flow_run(c: &Connection, id: Uuid) -> Result<Option<FlowRun>, StoreError> {
    let mut st = c
        .prepare_cached(&format!("SELECT {FLOW_COLUMNS} FROM flow_runs r WHERE r.id = ?1"))
        .map_err(backend)?;
    st.query_row([id], flow_row).optional().map_err(backend)
}

pub(crate) fn subflow_runs(c: &Connection, parent: Uuid) -> Result<Vec<FlowRun>, StoreError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {FLOW_COLUMNS} FROM flow_runs r WHERE r.parent_id = ?1 ORDER BY r.id"
        ))
        .map_err(backend)?;
    collect(st.query_map([parent], flow_row).map_err(backend)?)
}

pub(crate) fn task_runs(c: &Connection, flow_run_id: Uuid) -> Result<Vec<TaskRun>, StoreError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM task_runs r WHERE r.flow_run_id = ?1 ORDER BY r.id"
        ))
        .map_err(backend)?;
    collect(st.query_map([flow_run_id], task_row).map_err(backend)?)
}

pub(crate) fn task_run(c: &Connection, id: Uuid) -> Result<Option<TaskRun>, StoreError> {
    let mut st = c
        .prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM task_runs r WHERE r.id = ?1"))
        .map_err(backend)?;
    st.query_row([id], task_row).optional().map_err(backend)
}

pub(crate) fn task_runs_in(c: &Connection, ids: &[Uuid], states: &[StateType]) -> Result<Vec<TaskRun>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    let states = serde_json::to_string(&states).unwrap_or_else(|_| "[]".into());
    // The ids as parameters of their own: an `IN` on the primary key looks each one up.
    let marks = vec!["?"; ids.len()].join(", ");
    let mut st = c
        .prepare(&format!(
            "SELECT {TASK_COLUMNS} FROM task_runs r WHERE r.id IN ({marks})
               AND (?{n} = '[]' OR r.state IN (SELECT value FROM json_each(?{n})))",
            n = ids.len() + 1
        ))
        .map_err(backend)?;
    let params = ids
        .iter()
        .map(|id| id as &dyn rusqlite::ToSql)
        .chain(std::iter::once(&states as &dyn rusqlite::ToSql));
    let rows = st
        .query_map(rusqlite::params_from_iter(params), task_row)
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}

/// A run's history: the entries its row keeps, with the rows of `states` it has from before
/// migration 0011, read in one transaction.
pub(crate) fn states(c: &Connection, run_id: Uuid) -> Result<Vec<StateRecord>, StoreError> {
    let tx = c.unchecked_transaction().map_err(backend)?;
    let sql = "SELECT history FROM task_runs WHERE id = ?1 UNION ALL SELECT history FROM flow_runs WHERE id = ?1";
    let kept: Option<Vec<u8>> = match tx.prepare_cached(sql) {
        Ok(mut q) => q
            .query_row([run_id], |r| r.get(0))
            .optional()
            .map_err(backend)?
            .flatten(),
        // A database from before migration 0011, opened read-only: its history is all in
        // `states`.
        Err(e) if e.to_string().contains("no such column: history") => None,
        Err(e) => return Err(backend(e)),
    };
    let mut history: Vec<StateRecord> = match kept {
        Some(kept) => kiln_store::history::decode(run_id, &kept)
            .map_err(StoreError::Corrupt)?
            .into_iter()
            .map(|(s, _)| s)
            .collect(),
        None => Vec::new(),
    };
    let mut st = tx
        .prepare_cached(
            "SELECT run_id, seq, state, message, attempt, timestamp, result FROM states WHERE run_id = ?1 ORDER BY seq",
        )
        .map_err(backend)?;
    let rows: Vec<StateRecord> = collect(
        st.query_map([run_id], |r| {
            Ok(StateRecord {
                run_id: r.get(0)?,
                seq: r.get(1)?,
                state: state_col(r, 2)?,
                message: r.get(3)?,
                attempt: r.get(4)?,
                timestamp: r.get(5)?,
                result: r.get(6)?,
            })
        })
        .map_err(backend)?,
    )?;
    history.extend(rows);
    history.sort_by_key(|s| s.seq);
    Ok(history)
}

pub(crate) fn edges(c: &Connection, flow_run_id: Uuid) -> Result<Vec<Edge>, StoreError> {
    let mut st = c
        .prepare_cached("SELECT upstream, downstream FROM edges WHERE flow_run_id = ?1 ORDER BY downstream, upstream")
        .map_err(backend)?;
    collect(
        st.query_map([flow_run_id], |r| {
            Ok(Edge {
                upstream: r.get(0)?,
                downstream: r.get(1)?,
            })
        })
        .map_err(backend)?,
    )
}

const LOG_COLUMNS: &str = "run_id, flow_run_id, timestamp, level, target, message, id, seq";

fn log_row(r: &Row<'_>) -> rusqlite::Result<(LogRecord, i64)> {
    Ok((
        LogRecord {
            id: r.get::<_, Option<Uuid>>(6)?.unwrap_or_default(),
            run_id: r.get(0)?,
            flow_run_id: r.get(1)?,
            timestamp: r.get(2)?,
            level: r.get(3)?,
            target: r.get(4)?,
            message: r.get(5)?,
        },
        r.get(7)?,
    ))
}

pub(crate) fn logs(c: &Connection, run_id: Uuid) -> Result<Vec<LogRecord>, StoreError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {LOG_COLUMNS} FROM logs WHERE run_id = ?1 OR flow_run_id = ?1 ORDER BY timestamp, seq"
        ))
        .map_err(backend)?;
    let rows = collect(st.query_map([run_id], log_row).map_err(backend)?)?;
    Ok(rows.into_iter().map(|(l, _)| l).collect())
}

pub(crate) fn list_logs(c: &Connection, run_id: Uuid, f: &LogFilter) -> Result<LogPage, StoreError> {
    let levels = f.levels().map_err(|e| StoreError::backend(e, false))?;
    let sql = format!(
        "SELECT {LOG_COLUMNS} FROM logs WHERE (run_id = ?1 OR flow_run_id = ?1) AND seq > ?2
         AND level IN ({}) ORDER BY seq LIMIT ?3",
        levels.iter().map(|l| format!("'{l}'")).collect::<Vec<_>>().join(", ")
    );
    let mut st = c.prepare_cached(&sql).map_err(backend)?;
    let mut rows = collect(
        st.query_map(
            rusqlite::params![run_id, f.after.unwrap_or(i64::MIN), f.limit as i64 + 1],
            log_row,
        )
        .map_err(backend)?,
    )?;
    let next = (rows.len() > f.limit).then(|| {
        rows.truncate(f.limit);
        rows.last().map(|(_, seq)| *seq)
    });
    Ok(LogPage {
        logs: rows.into_iter().map(|(l, _)| l).collect(),
        next: next.flatten(),
    })
}

pub(crate) fn resolve(c: &Connection, id_or_prefix: &str) -> Result<RunRef, StoreError> {
    let Some(hex) = id_hex(id_or_prefix) else {
        return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
    };
    let tables = [
        ("flow_runs", RunRef::Flow as fn(Uuid) -> RunRef),
        ("task_runs", RunRef::Task),
    ];
    // An exact id, else a prefix, else the id's tail (what the CLI prints in short form).
    if let Ok(id) = Uuid::parse_str(&hex) {
        for (table, make) in tables {
            let mut st = c
                .prepare_cached(&format!("SELECT id FROM {table} WHERE id = ?1"))
                .map_err(backend)?;
            if let Some(id) = st
                .query_row([id], |r| r.get::<_, Uuid>(0))
                .optional()
                .map_err(backend)?
            {
                return Ok(make(id));
            }
        }
    }
    for pattern in [format!("{hex}%"), format!("%{hex}")] {
        let mut found = Vec::new();
        for (table, make) in tables {
            let mut st = c
                .prepare_cached(&format!("SELECT id FROM {table} WHERE hex(id) LIKE ?1 LIMIT 100"))
                .map_err(backend)?;
            for id in st.query_map([&pattern], |r| r.get::<_, Uuid>(0)).map_err(backend)? {
                found.push(make(id.map_err(backend)?));
            }
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

pub(crate) fn processes(c: &Connection, since: Micros) -> Result<Vec<Process>, StoreError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT id, host, pid, started, heartbeat, lease FROM processes p WHERE heartbeat >= ?1
                OR EXISTS (SELECT 1 FROM task_runs WHERE process_id = p.id AND {OPEN})
                OR EXISTS (SELECT 1 FROM flow_runs WHERE process_id = p.id AND {OPEN})
                OR EXISTS (SELECT 1 FROM queue WHERE claimed_by = p.id)
             ORDER BY heartbeat DESC",
            OPEN = crate::OPEN
        ))
        .map_err(backend)?;
    collect(
        st.query_map([since], |r| {
            Ok(Process {
                id: r.get(0)?,
                host: r.get(1)?,
                pid: r.get(2)?,
                started: r.get::<_, i64>(3)? as u64,
                heartbeat: r.get(4)?,
                lease: r.get(5)?,
            })
        })
        .map_err(backend)?,
    )
}

pub(crate) fn api_tokens(c: &Connection) -> Result<Vec<ApiToken>, StoreError> {
    let mut st = c
        .prepare_cached("SELECT name, hash, read_only, created, revoked FROM api_tokens ORDER BY name")
        .map_err(backend)?;
    collect(
        st.query_map([], |r| {
            Ok(ApiToken {
                name: r.get(0)?,
                hash: r.get(1)?,
                read_only: r.get(2)?,
                created: r.get(3)?,
                revoked: r.get(4)?,
            })
        })
        .map_err(backend)?,
    )
}
