//! The writer thread: applies queued writes in batches, one transaction each, whole or not
//! at all, and hands every write its outcome.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use kiln_store::model::*;
use kiln_store::queue::Batches;
use kiln_store::state::{StateType, is_legal};
use kiln_store::{Outcome, StoreError};
use rusqlite::{
    CachedStatement, Connection, ErrorCode, OptionalExtension, Statement, ToSql, TransactionBehavior, params,
};
use uuid::Uuid;

/// Most writes applied in one transaction; bounds the latency of a flush behind a flood.
pub(crate) const MAX_BATCH: usize = 8192;

/// How long a batch is retried while another connection holds the database's write lock,
/// on top of SQLite's own busy timeout per attempt. After it, the batch's writes fail.
const BUSY_DEADLINE: Duration = Duration::from_secs(300);

/// Runs whose current state this writer knows (it wrote it), so that most state changes
/// need no lookup. Only a hint: every update is a compare-and-set on (state, seq).
const KNOWN_MAX: usize = 65_536;

/// What the writer thread does besides writes, each in its own transaction, in order with
/// the writes.
pub(crate) enum Job {
    /// Mark the runs of dead processes Crashed and take back their claims.
    Reap(Reap),
    /// Claim queued runs.
    Claim(crate::work::ClaimJob),
    /// Grant a run the slots of its limited tags.
    Acquire(crate::limit::AcquireJob),
}

/// Mark the unfinished runs of dead or silent processes Crashed.
pub(crate) struct Reap {
    pub(crate) dead: Vec<Uuid>,
    pub(crate) stale_before: Micros,
    pub(crate) reply: futures::channel::oneshot::Sender<Result<Vec<(RunKind, Uuid)>, StoreError>>,
}

/// A map keyed by run id, with foldhash's seeded hasher: the writer looks ids up several
/// times per write; with the standard library's SipHash its maps took 5.8% of its samples,
/// 3.5% with foldhash (`cargo bench -p kiln-store-sqlite --bench writer` under perf).
pub(crate) type ById<V> = HashMap<Uuid, V, foldhash::fast::RandomState>;

/// What the writer knows of a run: its state and the position of that state.
#[derive(Clone, Copy)]
pub(crate) struct Current {
    pub(crate) state: StateType,
    pub(crate) seq: u32,
}

impl Current {
    fn of(run: &RunState) -> Current {
        Current {
            state: run.state,
            seq: run.seq,
        }
    }
}

/// The writer thread's state: its connection, and the runs whose state it knows.
pub(crate) struct Writer {
    conn: Connection,
    known: ById<Current>,
    /// Woken when a run becomes claimable (queued, or handed back by a dead worker).
    work: Arc<tokio::sync::Notify>,
}

impl Writer {
    pub(crate) fn new(conn: Connection, work: Arc<tokio::sync::Notify>) -> Writer {
        Writer {
            conn,
            known: ById::default(),
            work,
        }
    }
}

impl Batches for Writer {
    type Message = Job;

    fn apply(&mut self, writes: &[Write]) -> Vec<Outcome> {
        let outcomes = commit(&mut self.conn, writes, &mut self.known);
        let queued = writes
            .iter()
            .zip(&outcomes)
            .any(|(w, o)| matches!((w, o), (Write::Enqueue(_), Outcome::Applied { .. })));
        if queued {
            self.work.notify_waiters();
        }
        outcomes
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Reap(reap) => {
                let _ = reap.reply.send(self::reap(
                    &mut self.conn,
                    &reap.dead,
                    reap.stale_before,
                    &mut self.known,
                ));
                // Claims taken back are claimable again.
                self.work.notify_waiters();
            }
            Job::Claim(job) => {
                let claimed = crate::work::claim(&mut self.conn, &job.request, &mut |id| {
                    self.known.remove(&id);
                });
                let _ = job.reply.send(claimed);
            }
            Job::Acquire(job) => {
                let _ = job.reply.send(crate::limit::acquire(&mut self.conn, &job.request));
            }
        }
    }
}

/// An unfinished run of a dead or silent process, and that process.
struct Orphan {
    id: Uuid,
    state: String,
    seq: u32,
    attempt: u32,
    pid: i64,
    host: String,
    heartbeat: Micros,
    exited: bool,
}

fn reap(
    conn: &mut Connection,
    dead: &[Uuid],
    stale_before: Micros,
    known: &mut ById<Current>,
) -> Result<Vec<(RunKind, Uuid)>, StoreError> {
    let now = kiln_store::model::now_micros();
    let dead_hex: Vec<String> = dead.iter().map(|d| d.simple().to_string().to_uppercase()).collect();
    let dead_json = serde_json::to_string(&dead_hex).unwrap_or_else(|_| "[]".into());
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(crate::backend)?;
    let mut crashed = Vec::new();
    {
        let mut st = Statements::prepare(&tx).map_err(crate::backend)?;
        for (kind, table) in [(RunKind::Flow, "flow_runs"), (RunKind::Task, "task_runs")] {
            let sql = format!(
                "SELECT r.id, r.state, r.state_seq, r.attempt, p.pid, p.host, p.heartbeat,
                        hex(p.id) IN (SELECT value FROM json_each(?2))
                 FROM {table} r JOIN processes p ON p.id = r.process_id
                 WHERE {open}
                   AND ((p.heartbeat < ?1 AND p.heartbeat + p.lease < ?3)
                        OR hex(p.id) IN (SELECT value FROM json_each(?2)))",
                open = crate::OPEN
            );
            let orphans: Vec<Orphan> = {
                let mut q = tx.prepare(&sql).map_err(crate::backend)?;
                let rows = q
                    .query_map(params![stale_before, dead_json, now], |r| {
                        Ok(Orphan {
                            id: r.get(0)?,
                            state: r.get(1)?,
                            seq: r.get(2)?,
                            attempt: r.get(3)?,
                            pid: r.get(4)?,
                            host: r.get(5)?,
                            heartbeat: r.get(6)?,
                            exited: r.get(7)?,
                        })
                    })
                    .map_err(crate::backend)?;
                rows.collect::<rusqlite::Result<_>>().map_err(crate::backend)?
            };
            for Orphan {
                id,
                state,
                seq,
                attempt,
                pid,
                host,
                heartbeat,
                exited,
            } in orphans
            {
                let from = state.parse::<StateType>()?;
                let change = StateChange {
                    id: Uuid::nil(),
                    kind,
                    run_id: id,
                    from,
                    to: StateType::Crashed,
                    message: Some(kiln_store::model::orphan_message(pid, &host, heartbeat, exited)),
                    attempt,
                    timestamp: now_micros(),
                    result: None,
                    fence: None,
                };
                let current = Current { state: from, seq };
                if st
                    .update_state(&change, current, seq + 1, Uuid::nil())
                    .map_err(crate::backend)?
                {
                    known.remove(&id);
                    crashed.push((kind, id));
                }
            }
        }
        for (kind, id) in crate::work::take_back_claims(&tx, &mut st, stale_before, now, &dead_json)? {
            known.remove(&id);
            crashed.push((kind, id));
        }
    }
    tx.commit().map_err(crate::backend)?;
    Ok(crashed)
}

/// Why an attempt at a batch stopped.
enum Stop {
    /// The database is locked by another connection: the whole batch is tried again.
    Busy(rusqlite::Error),
    /// One write cannot be applied (a constraint, bad data): it fails, the rest are tried again.
    Write(usize, rusqlite::Error),
    /// The database cannot take writes (disk full, I/O error, read-only file): the batch fails.
    Fatal(rusqlite::Error),
    /// What the batch assumed without looking did not hold (a run it created exists, a run
    /// it moved was moved by another process): tried again, looking each up.
    Recheck,
}

fn classify(e: rusqlite::Error, index: usize) -> Stop {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Stop::Busy(e),
        Some(
            ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::NotADatabase
            | ErrorCode::OutOfMemory,
        ) => Stop::Fatal(e),
        _ if index == usize::MAX => Stop::Fatal(e),
        _ => Stop::Write(index, e),
    }
}

/// A write error, naming the database file (a full disk is a full disk somewhere).
fn backend(path: &str, e: rusqlite::Error) -> Arc<StoreError> {
    let retryable = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    Arc::new(StoreError::backend(
        AtFile {
            path: path.to_owned(),
            source: e,
        },
        retryable,
    ))
}

/// An SQLite error in the database file `path`.
#[derive(Debug)]
struct AtFile {
    path: String,
    source: rusqlite::Error,
}

impl std::fmt::Display for AtFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.source)
    }
}

impl std::error::Error for AtFile {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Applies a batch, retrying it whole while the database is busy and leaving out only the
/// writes that fail on their own. One outcome per write.
fn commit(conn: &mut Connection, batch: &[Write], known: &mut ById<Current>) -> Vec<Outcome> {
    let mut failed: Vec<Option<Arc<StoreError>>> = vec![None; batch.len()];
    let path = conn.path().unwrap_or("the state database").to_owned();
    let started = Instant::now();
    let mut delay = Duration::from_millis(10);
    let mut warned = false;
    // A batch is first tried assuming that the runs it creates are new (a lookup per run
    // saved) and with the state changes of each existing run written as one row update at
    // its end; if a run exists, or another process moved one, it is tried again carefully.
    let mut careful = false;
    loop {
        match attempt(conn, batch, &failed, known, careful) {
            Ok(outcomes) => {
                return outcomes
                    .into_iter()
                    .zip(failed)
                    .map(|(applied, failed)| match failed {
                        Some(e) => Outcome::Failed(e),
                        None => applied.unwrap_or(Outcome::Applied { seq: None }),
                    })
                    .collect();
            }
            Err(Stop::Write(index, e)) => {
                failed[index] = Some(backend(&path, e));
            }
            Err(Stop::Recheck) => careful = true,
            Err(Stop::Busy(e)) if started.elapsed() < BUSY_DEADLINE => {
                if !warned && started.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(
                        "the state database is locked by another connection ({e}); retrying a batch of {} writes \
                         for up to {BUSY_DEADLINE:?}",
                        batch.len()
                    );
                    warned = true;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(Stop::Busy(e) | Stop::Fatal(e)) => {
                let e = backend(&path, e);
                tracing::error!(
                    "the state database cannot record a batch of {} writes: {e}",
                    batch.len()
                );
                return vec![Outcome::Failed(e); batch.len()];
            }
        }
    }
}

/// A run this batch creates or moves: its row is written once, when the batch ends (or
/// before a deletion reads the rows), with the state it reached and the history that led
/// there (see migration 0011).
struct Pending {
    /// The first write of the batch about it (the one blamed when its row is refused).
    index: usize,
    run: RunState,
    history: Vec<(StateRecord, Uuid)>,
    row: Row,
}

/// How a [`Pending`] run's row is written.
enum Row {
    /// Created by this batch: inserted.
    New { created: Micros },
    /// Existing, found at `from`: updated from there (compare-and-set).
    Existing { kind: RunKind, run_id: Uuid, from: Current },
}

/// Writes the rows of the `pending` runs (and forgets them). An optimistic batch that meets
/// a run which exists already, or one that another process moved since this writer saw it,
/// is tried again carefully; so is one whose row update is refused, so that the careful
/// retry, applying changes one by one, reports the change that fails.
fn write_pending(
    st: &mut Statements<'_>,
    batch: &[Write],
    pending: &mut Vec<Pending>,
    pending_index: &mut ById<usize>,
    learned: &mut ById<Current>,
    known: &mut ById<Current>,
    careful: bool,
) -> Result<(), Stop> {
    if !careful && new_task_run_takes_a_flow_id(st, batch, pending, pending_index)? {
        return Err(Stop::Recheck);
    }
    let mut history = Vec::new();
    // New task runs are inserted many to a statement; a careful batch inserts each alone, so
    // that a refused row blames its own write.
    let mut together: Vec<Pending> = Vec::with_capacity(ROWS_PER_INSERT);
    for p in pending.drain(..) {
        if !careful && matches!(p.row, Row::New { .. }) && matches!(batch[p.index], Write::TaskRun(_)) {
            together.push(p);
            if together.len() == ROWS_PER_INSERT {
                // Which row was refused is for the careful retry to find out.
                st.insert_task_runs(batch, &together, &mut history)
                    .map_err(|e| match classify(e, 0) {
                        Stop::Write(..) => Stop::Recheck,
                        other => other,
                    })?;
                for p in together.drain(..) {
                    learned.insert(batch[p.index].run_id(), Current::of(&p.run));
                }
            }
            continue;
        }
        write_one(st, batch, p, &mut history, learned, known, careful)?;
    }
    for p in together {
        write_one(st, batch, p, &mut history, learned, known, careful)?;
    }
    pending_index.clear();
    Ok(())
}

/// Whether a task run the batch creates has the id of a flow run (one id space: see
/// `attempt`, which looks each one up in a careful batch). An optimistic batch asks for the
/// flow runs whose ids lie between its new task runs' smallest and largest: one query, and
/// ids made in time order leave few there, if any. When many lie there (ids not made in time
/// order, an old creation sent again), it looks each new task run's id up instead, as a
/// careful batch would: the cost stays bounded by the batch, not the table.
fn new_task_run_takes_a_flow_id(
    st: &mut Statements<'_>,
    batch: &[Write],
    pending: &[Pending],
    pending_index: &ById<usize>,
) -> Result<bool, Stop> {
    let is_new_task_run = |p: &Pending| matches!(p.row, Row::New { .. }) && matches!(batch[p.index], Write::TaskRun(_));
    let mut ids = pending
        .iter()
        .filter(|p| is_new_task_run(p))
        .map(|p| batch[p.index].run_id());
    let Some(first) = ids.next() else {
        return Ok(false);
    };
    let (low, high) = ids.fold((first, first), |(low, high), id| (low.min(id), high.max(id)));
    match st.flow_ids_between(low, high).map_err(|e| classify(e, usize::MAX))? {
        Some(flow_ids) => Ok(flow_ids
            .iter()
            .any(|id| pending_index.get(id).is_some_and(|&p| is_new_task_run(&pending[p])))),
        None => {
            for p in pending.iter().filter(|p| is_new_task_run(p)) {
                let id = batch[p.index].run_id();
                if st
                    .created_at(RunKind::Flow, id)
                    .map_err(|e| classify(e, p.index))?
                    .is_some()
                {
                    return Ok(true);
                }
            }
            Ok(false)
        }
    }
}

/// Writes the row of one pending run (see [`write_pending`]).
fn write_one(
    st: &mut Statements<'_>,
    batch: &[Write],
    p: Pending,
    history: &mut Vec<u8>,
    learned: &mut ById<Current>,
    known: &mut ById<Current>,
    careful: bool,
) -> Result<(), Stop> {
    history.clear();
    kiln_store::history::encode(history, &p.history);
    match p.row {
        Row::New { .. } => {
            let w = &batch[p.index];
            st.insert_run(w, &p.run, history).map_err(|e| {
                if !careful
                    && e.sqlite_error()
                        .is_some_and(|e| e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
                {
                    Stop::Recheck
                } else {
                    classify(e, p.index)
                }
            })?;
            learned.insert(w.run_id(), Current::of(&p.run));
        }
        Row::Existing { kind, run_id, from } => {
            let updated =
                st.update_row(kind, run_id, &p.run, from, history)
                    .map_err(|e| match classify(e, p.index) {
                        Stop::Write(..) => Stop::Recheck,
                        other => other,
                    })?;
            if !updated {
                known.remove(&run_id);
                return Err(Stop::Recheck);
            }
        }
    }
    Ok(())
}

/// The position `change` took among `history` (changes applied earlier in this batch).
fn applied_in(history: &[(StateRecord, Uuid)], change: &StateChange) -> Option<u32> {
    if change.id.is_nil() {
        return None;
    }
    history.iter().find(|(_, id)| *id == change.id).map(|(s, _)| s.seq)
}

/// The outcome of creating run `id` at `created` when it exists, created at `existing`:
/// the same creation delivered again is acknowledged; anything else is an id already taken.
fn created_again(id: Uuid, existing: Micros, created: Micros) -> Outcome {
    if existing == created {
        Outcome::Applied { seq: Some(0) }
    } else {
        Outcome::Failed(Arc::new(StoreError::backend(
            format!("run id {id} is taken by another run; a new run needs a new id"),
            false,
        )))
    }
}

/// One try at a batch inside one transaction. On success, `known` learns the new states.
fn attempt(
    conn: &mut Connection,
    batch: &[Write],
    failed: &[Option<Arc<StoreError>>],
    known: &mut ById<Current>,
    careful: bool,
) -> Result<Vec<Option<Outcome>>, Stop> {
    // IMMEDIATE: take the write lock now, so a busy database shows here, not half-way.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| classify(e, usize::MAX))?;
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
    let mut learned: ById<Current> = ById::default();
    {
        let mut st = Statements::prepare(&tx).map_err(|e| classify(e, usize::MAX))?;
        let mut pending: Vec<Pending> = Vec::new();
        let mut pending_index: ById<usize> = ById::default();
        for (i, w) in batch.iter().enumerate() {
            if failed[i].is_some() {
                outcomes.push(None);
                continue;
            }
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
                    let existing = match pending_index.get(id).map(|&p| &pending[p].row) {
                        Some(Row::New { created }) => Some(*created),
                        _ if careful => st.created_at(kind, *id).map_err(|e| classify(e, i))?,
                        _ => None,
                    };
                    // Flow runs and task runs share one id space (a history, a `kiln runs`
                    // argument, names one run): an id of the other kind is taken. Flow runs
                    // are few, so a task run's look there is cheap; a flow run's is rare.
                    let (other, other_name) = match kind {
                        RunKind::Flow => (RunKind::Task, "task"),
                        RunKind::Task => (RunKind::Flow, "flow"),
                    };
                    // An optimistic batch looks for a task run's id among flow runs when it
                    // writes the rows, several ids at once (`write_pending`).
                    let look = careful || kind == RunKind::Flow;
                    if existing.is_none() && look && st.created_at(other, *id).map_err(|e| classify(e, i))?.is_some() {
                        outcomes.push(Some(Outcome::Failed(Arc::new(StoreError::backend(
                            format!("run id {id} is taken by a {other_name} run; a new run needs a new id"),
                            false,
                        )))));
                        continue;
                    }
                    if let Some(existing) = existing {
                        // This run exists: the same creation delivered again, or an id taken.
                        outcomes.push(Some(created_again(*id, existing, *created)));
                        continue;
                    }
                    pending_index.insert(*id, pending.len());
                    pending.push(Pending {
                        index: i,
                        run: RunState::created(*initial_state),
                        // Room for the states a run started at once takes in the same batch.
                        history: {
                            let mut h = Vec::with_capacity(4);
                            h.push((StateRecord::created(*id, *initial_state, *created), Uuid::nil()));
                            h
                        },
                        row: Row::New { created: *created },
                    });
                    Outcome::Applied { seq: Some(0) }
                }
                Write::State(change) if change.fence.is_some() && !st.holds(change).map_err(|e| classify(e, i))? => {
                    // Its claim has ended: refused, unless this very change was applied before
                    // (earlier in this batch, or in an earlier one).
                    let here = pending_index.get(&change.run_id).map(|&p| &pending[p]);
                    let earlier = match here.and_then(|p| applied_in(&p.history, change)) {
                        Some(seq) => Some(seq),
                        None => st.applied_seq(change).map_err(|e| classify(e, i))?,
                    };
                    match (earlier, here) {
                        (Some(seq), _) => Outcome::Applied { seq: Some(seq) },
                        (None, Some(p)) => Outcome::Rejected {
                            current: Some(p.run.state),
                        },
                        (None, None) => Outcome::Rejected {
                            current: st
                                .current(change.kind, change.run_id)
                                .map_err(|e| classify(e, i))?
                                .map(|c| c.state),
                        },
                    }
                }
                Write::State(change) => {
                    let here = pending_index.get(&change.run_id).copied();
                    // A run this batch creates or moves, else what this writer last wrote (a
                    // hint), else the row.
                    let (mut current, mut looked_up) = match here {
                        Some(p) => (Some(Current::of(&pending[p].run)), true),
                        None => match learned.get(&change.run_id).or_else(|| known.get(&change.run_id)) {
                            Some(c) => (Some(*c), false),
                            None => (
                                st.current(change.kind, change.run_id).map_err(|e| classify(e, i))?,
                                true,
                            ),
                        },
                    };
                    loop {
                        let Some(c) = current.filter(|c| c.state == change.from && is_legal(Some(c.state), change.to))
                        else {
                            if !looked_up {
                                // What this writer knew may be stale: decide on the database.
                                known.remove(&change.run_id);
                                current = st.current(change.kind, change.run_id).map_err(|e| classify(e, i))?;
                                looked_up = true;
                                continue;
                            }
                            // Refused, unless this very change was applied before (a resend),
                            // earlier in this batch or in an earlier one.
                            let earlier = here.and_then(|p| applied_in(&pending[p].history, change));
                            let earlier = match earlier {
                                Some(seq) => Some(seq),
                                None => st.applied_seq(change).map_err(|e| classify(e, i))?,
                            };
                            break match earlier {
                                Some(seq) => Outcome::Applied { seq: Some(seq) },
                                None => Outcome::Rejected {
                                    current: current.map(|c| c.state),
                                },
                            };
                        };
                        let seq = c.seq + 1;
                        let deferred = here.is_some() || !careful;
                        if deferred {
                            // Checked here as `json()` checks it in the statement: a bad
                            // result fails this change alone, not the run's row.
                            if let Some(result) = &change.result {
                                serde_json::from_str::<serde::de::IgnoredAny>(result).map_err(|e| {
                                    // Failed for good only once the state it was checked
                                    // against comes from the database.
                                    if careful {
                                        Stop::Write(i, rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
                                    } else {
                                        Stop::Recheck
                                    }
                                })?;
                            }
                        }
                        let applied = match here {
                            Some(p) => {
                                pending[p].run.apply(change, seq);
                                pending[p].history.push((RunState::record(change, seq), change.id));
                                true
                            }
                            // Written once at the end of the batch, with the run's other
                            // changes in it (see `Pending`).
                            None if deferred => {
                                pending_index.insert(change.run_id, pending.len());
                                let mut run = RunState::created(c.state);
                                run.seq = c.seq;
                                run.apply(change, seq);
                                pending.push(Pending {
                                    index: i,
                                    run,
                                    history: vec![(RunState::record(change, seq), change.id)],
                                    row: Row::Existing {
                                        kind: change.kind,
                                        run_id: change.run_id,
                                        from: c,
                                    },
                                });
                                true
                            }
                            None => st.update_state(change, c, seq, change.id).map_err(|e| classify(e, i))?,
                        };
                        if !applied {
                            // What this writer knew is stale (another process changed the
                            // run): decide again on what the database holds.
                            known.remove(&change.run_id);
                            current = st.current(change.kind, change.run_id).map_err(|e| classify(e, i))?;
                            looked_up = true;
                            continue;
                        }
                        if change.fence.is_some() && change.to.is_terminal() {
                            // Finished by its worker: out of the queue.
                            st.dequeue.execute([change.run_id]).map_err(|e| classify(e, i))?;
                        }
                        learned.insert(change.run_id, Current { state: change.to, seq });
                        break Outcome::Applied { seq: Some(seq) };
                    }
                }
                Write::Edge { flow_run_id, edge } => {
                    st.edge
                        .execute(params![edge.upstream, edge.downstream, flow_run_id])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::PutToken(t) => {
                    st.put_token
                        .execute(params![t.name, t.hash, t.read_only, t.created, t.revoked])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::RevokeToken { name, at } => {
                    let changed = st.revoke_token.execute(params![name, at]).map_err(|e| classify(e, i))?;
                    if changed == 0 {
                        Outcome::Failed(Arc::new(StoreError::backend(
                            format!("there is no API token named '{name}' (see `kiln server token ls`)"),
                            false,
                        )))
                    } else {
                        Outcome::Applied { seq: None }
                    }
                }
                Write::Enqueue(e) => {
                    st.enqueue
                        .execute(params![
                            e.run_id,
                            kind_str(e.kind),
                            e.pool,
                            e.deployment,
                            e.target,
                            e.scheduled,
                            e.max_attempts,
                            e.host,
                            (!e.payload.is_null()).then(|| e.payload.to_string())
                        ])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::PutDeployment(d) => {
                    let json = |v: &serde_json::Value| v.to_string();
                    st.deployment
                        .execute(params![
                            d.name,
                            d.flow,
                            d.pool,
                            json(&d.parameters),
                            json(&d.parameter_schema),
                            crate::read::tags_json(&d.tags),
                            d.schedule
                                .as_ref()
                                .map(|s| serde_json::to_string(s).unwrap_or_default()),
                            d.catchup,
                            d.concurrency,
                            d.max_attempts,
                            d.updated
                        ])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::DeleteDeployment { name } => {
                    let removed = tx
                        .execute("DELETE FROM deployments WHERE name = ?1", [name])
                        .map_err(|e| classify(e, i))?;
                    if removed == 0 {
                        Outcome::Failed(Arc::new(StoreError::backend(
                            format!("there is no deployment named '{name}' (see `kiln deployment ls`)"),
                            false,
                        )))
                    } else {
                        Outcome::Applied { seq: None }
                    }
                }
                Write::PutPool(p) => {
                    st.pool
                        .execute(params![p.name, p.concurrency])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::PutLimit(l) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO concurrency_limits (tag, slots, updated) VALUES (?1, ?2, ?3)",
                        params![l.tag, l.slots, l.updated],
                    )
                    .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::DeleteLimit { tag } => {
                    let removed = tx
                        .execute("DELETE FROM concurrency_limits WHERE tag = ?1", [tag])
                        .map_err(|e| classify(e, i))?;
                    tx.execute("DELETE FROM concurrency_slots WHERE tag = ?1", [tag])
                        .map_err(|e| classify(e, i))?;
                    if removed == 0 {
                        Outcome::Failed(Arc::new(StoreError::backend(
                            format!("tag '{tag}' has no concurrency limit (see `kiln limit ls`)"),
                            false,
                        )))
                    } else {
                        Outcome::Applied { seq: None }
                    }
                }
                Write::DeleteRun { id } => {
                    // The rows it reads first hold what this batch did: the runs it
                    // created (a flow run's task runs among them) and moved.
                    write_pending(
                        &mut st,
                        batch,
                        &mut pending,
                        &mut pending_index,
                        &mut learned,
                        known,
                        careful,
                    )?;
                    match delete_run(&tx, *id).map_err(|e| classify(e, i))? {
                        Ok(gone) => {
                            for id in gone {
                                known.remove(&id);
                            }
                            Outcome::Applied { seq: None }
                        }
                        Err(why) => Outcome::Failed(Arc::new(StoreError::backend(why, false))),
                    }
                }
                Write::Heartbeat(p) => {
                    st.heartbeat
                        .execute(params![p.id, p.host, p.pid, p.started as i64, p.heartbeat, p.lease])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                Write::Log(l) => {
                    st.log
                        .execute(params![
                            (!l.id.is_nil()).then_some(l.id),
                            l.run_id,
                            l.flow_run_id,
                            l.timestamp,
                            l.level,
                            l.target,
                            l.message
                        ])
                        .map_err(|e| classify(e, i))?;
                    Outcome::Applied { seq: None }
                }
                _ => Outcome::Failed(Arc::new(StoreError::Corrupt(format!(
                    "this backend does not know the write {w}"
                )))),
            };
            outcomes.push(Some(outcome));
        }
        write_pending(
            &mut st,
            batch,
            &mut pending,
            &mut pending_index,
            &mut learned,
            known,
            careful,
        )?;
    }
    tx.commit().map_err(|e| classify(e, usize::MAX))?;
    if known.len() + learned.len() > KNOWN_MAX {
        known.clear();
    }
    for (id, c) in learned {
        if c.state.is_terminal() {
            known.remove(&id);
        } else {
            known.insert(id, c);
        }
    }
    Ok(outcomes)
}

/// How a run kind is stored in the queue.
pub(crate) fn kind_str(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Flow => "flow",
        RunKind::Task => "task",
    }
}

/// The statements of a batch, prepared once per transaction rather than looked up per write.
/// Deletes run `id` (see [`Write::DeleteRun`]): the ids deleted, or why nothing was.
fn delete_run(tx: &rusqlite::Transaction<'_>, id: Uuid) -> rusqlite::Result<Result<Vec<Uuid>, String>> {
    let runs = |sql: &str, id: Uuid| -> rusqlite::Result<Vec<(Uuid, String)>> {
        let mut q = tx.prepare_cached(sql)?;
        let rows = q.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    };
    let flows = runs(
        "WITH RECURSIVE tree(id) AS (
           SELECT id FROM flow_runs WHERE id = ?1
           UNION ALL SELECT f.id FROM flow_runs f JOIN tree t ON f.parent_id = t.id)
         SELECT f.id, f.state FROM flow_runs f JOIN tree USING (id)",
        id,
    )?;
    let mut tasks = Vec::new();
    if flows.is_empty() {
        tasks = runs("SELECT id, state FROM task_runs WHERE id = ?1", id)?;
        if tasks.is_empty() {
            return Ok(Err(format!("there is no run with id {id} (see `kiln runs ls`)")));
        }
    }
    for (flow, _) in &flows {
        tasks.extend(runs("SELECT id, state FROM task_runs WHERE flow_run_id = ?1", *flow)?);
    }
    let all: Vec<&(Uuid, String)> = flows.iter().chain(&tasks).collect();
    if let Some((open, state)) = all
        .iter()
        .find(|(_, s)| !s.parse::<StateType>().is_ok_and(StateType::is_terminal))
    {
        let which = if *open == id {
            "it".to_owned()
        } else {
            format!("its run {open}")
        };
        return Ok(Err(format!(
            "run {id} cannot be deleted: {which} has not ended ({state}); cancel it first (`kiln runs cancel {open}`)"
        )));
    }
    for (flow, _) in &flows {
        tx.prepare_cached("DELETE FROM edges WHERE flow_run_id = ?1")?
            .execute([*flow])?;
    }
    if flows.is_empty() {
        // A task run outside any flow: the edges to it from other such runs.
        tx.prepare_cached("DELETE FROM edges WHERE downstream = ?1")?
            .execute([id])?;
    }
    for (run, _) in &all {
        for sql in [
            "DELETE FROM states WHERE run_id = ?1",
            "DELETE FROM logs WHERE run_id = ?1",
            "DELETE FROM edges WHERE upstream = ?1",
            "DELETE FROM queue WHERE run_id = ?1",
            "DELETE FROM concurrency_slots WHERE run_id = ?1",
            "DELETE FROM task_runs WHERE id = ?1",
            "DELETE FROM flow_runs WHERE id = ?1",
        ] {
            tx.prepare_cached(sql)?.execute([*run])?;
        }
    }
    Ok(Ok(all.iter().map(|(run, _)| *run).collect()))
}

pub(crate) struct Statements<'t> {
    /// The batch's transaction.
    conn: &'t Connection,
    enqueue: CachedStatement<'t>,
    pub(crate) dequeue: CachedStatement<'t>,
    holds: CachedStatement<'t>,
    deployment: CachedStatement<'t>,
    pool: CachedStatement<'t>,
    flow_history: CachedStatement<'t>,
    task_history: CachedStatement<'t>,
    applied: CachedStatement<'t>,
    flow_created: CachedStatement<'t>,
    task_created: CachedStatement<'t>,
    flow_run: CachedStatement<'t>,
    task_run: CachedStatement<'t>,
    /// [`ROWS_PER_INSERT`] new task runs at once, prepared when a batch has that many.
    task_runs: Option<CachedStatement<'t>>,
    flow_ids: CachedStatement<'t>,
    flow_state: CachedStatement<'t>,
    task_state: CachedStatement<'t>,
    flow_current: CachedStatement<'t>,
    task_current: CachedStatement<'t>,
    edge: CachedStatement<'t>,
    log: CachedStatement<'t>,
    heartbeat: CachedStatement<'t>,
    put_token: CachedStatement<'t>,
    revoke_token: CachedStatement<'t>,
}

impl<'t> Statements<'t> {
    pub(crate) fn prepare(tx: &'t rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        // The row update is the compare-and-set: it matches only the state and position
        // the change was checked against.
        let update = |table: &str| {
            format!(
                "UPDATE {table} SET state = ?2, state_seq = ?3, state_message = ?4, attempt = ?5,
                 start_time = COALESCE(start_time, ?6), end_time = COALESCE(?7, end_time),
                 result = COALESCE(json(?8), result), history = CAST(COALESCE(history, x'') || ?11 AS BLOB)
                 WHERE id = ?1 AND state = ?9 AND state_seq = ?10"
            )
        };
        Ok(Statements {
            conn: tx,
            // Queued twice: the first entry stays.
            enqueue: tx.prepare_cached(
                "INSERT INTO queue (run_id, kind, pool, deployment, target, scheduled, max_attempts, host, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, json(?9)) ON CONFLICT DO NOTHING",
            )?,
            dequeue: tx.prepare_cached("DELETE FROM queue WHERE run_id = ?1")?,
            holds: tx
                .prepare_cached("SELECT 1 FROM queue WHERE run_id = ?1 AND fence = ?2 AND claimed_by IS NOT NULL")?,
            deployment: tx.prepare_cached(
                "INSERT OR REPLACE INTO deployments (name, flow, pool, parameters, parameter_schema, tags, schedule,
                                                     catchup, concurrency, max_attempts, updated)
                 VALUES (?1, ?2, ?3, json(?4), json(?5), ?6, json(?7), ?8, ?9, ?10, ?11)",
            )?,
            pool: tx.prepare_cached("INSERT OR REPLACE INTO work_pools (name, concurrency) VALUES (?1, ?2)")?,
            applied: tx.prepare_cached("SELECT seq FROM states WHERE run_id = ?1 AND change_id = ?2")?,
            flow_history: tx.prepare_cached("SELECT history FROM flow_runs WHERE id = ?1")?,
            task_history: tx.prepare_cached("SELECT history FROM task_runs WHERE id = ?1")?,
            flow_created: tx.prepare_cached("SELECT created FROM flow_runs WHERE id = ?1")?,
            task_created: tx.prepare_cached("SELECT created FROM task_runs WHERE id = ?1")?,
            flow_run: tx.prepare_cached(
                "INSERT INTO flow_runs (id, name, parent_id, parameters, tags, state, state_message, attempt,
                                        created, start_time, end_time, result, command, retry_of, state_seq,
                                        process_id, history)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, json(?12), json(?13), ?14, ?15, ?16, ?17)",
            )?,
            task_run: tx.prepare_cached(&insert_task_runs(1))?,
            task_runs: None,
            flow_ids: tx.prepare_cached(&format!(
                "SELECT id FROM flow_runs WHERE id BETWEEN ?1 AND ?2 LIMIT {}",
                FLOW_IDS_IN_RANGE + 1
            ))?,
            flow_state: tx.prepare_cached(&update("flow_runs"))?,
            task_state: tx.prepare_cached(&update("task_runs"))?,
            flow_current: tx.prepare_cached("SELECT state, state_seq FROM flow_runs WHERE id = ?1")?,
            task_current: tx.prepare_cached("SELECT state, state_seq FROM task_runs WHERE id = ?1")?,
            edge: tx.prepare_cached(
                "INSERT OR IGNORE INTO edges (upstream, downstream, flow_run_id) VALUES (?1, ?2, ?3)",
            )?,
            // A line delivered again (same id) is kept once.
            log: tx.prepare_cached(
                "INSERT INTO logs (id, run_id, flow_run_id, timestamp, level, target, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
            )?,
            heartbeat: tx.prepare_cached(
                "INSERT INTO processes (id, host, pid, started, heartbeat, lease) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat, lease = excluded.lease",
            )?,
            put_token: tx.prepare_cached(
                "INSERT INTO api_tokens (name, hash, read_only, created, revoked) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?,
            revoke_token: tx.prepare_cached("UPDATE api_tokens SET revoked = COALESCE(revoked, ?2) WHERE name = ?1")?,
        })
    }

    /// Whether the claim `change.fence` names still holds the run.
    fn holds(&mut self, change: &StateChange) -> rusqlite::Result<bool> {
        let fence = change.fence.unwrap_or(0) as i64;
        Ok(self
            .holds
            .query_row(params![change.run_id, fence], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub(crate) fn current(&mut self, kind: RunKind, id: Uuid) -> rusqlite::Result<Option<Current>> {
        let stmt = match kind {
            RunKind::Flow => &mut self.flow_current,
            RunKind::Task => &mut self.task_current,
        };
        let row = stmt
            .query_row([bytes(&id)], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))
            .optional()?;
        row.map(|(state, seq)| {
            let state = state
                .parse::<StateType>()
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
            Ok(Current { state, seq })
        })
        .transpose()
    }

    /// When run `id` was created, if it exists.
    fn created_at(&mut self, kind: RunKind, id: Uuid) -> rusqlite::Result<Option<Micros>> {
        let stmt = match kind {
            RunKind::Flow => &mut self.flow_created,
            RunKind::Task => &mut self.task_created,
        };
        stmt.query_row([bytes(&id)], |r| r.get(0)).optional()
    }

    /// The position `change` was given when it was applied before (it has an id and is in
    /// the run's history: kept in its row, or in `states` from before migration 0011).
    fn applied_seq(&mut self, change: &StateChange) -> rusqlite::Result<Option<u32>> {
        if change.id.is_nil() {
            return Ok(None);
        }
        if let Some(seq) = self
            .applied
            .query_row(params![change.run_id, change.id], |r| r.get(0))
            .optional()?
        {
            return Ok(Some(seq));
        }
        let stmt = match change.kind {
            RunKind::Flow => &mut self.flow_history,
            RunKind::Task => &mut self.task_history,
        };
        let Some(Some(kept)) = stmt
            .query_row([change.run_id], |r| r.get::<_, Option<Vec<u8>>>(0))
            .optional()?
        else {
            return Ok(None);
        };
        let entries = kiln_store::history::decode(change.run_id, &kept)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))?;
        Ok(entries.iter().find(|(_, id)| *id == change.id).map(|(s, _)| s.seq))
    }

    /// Whether the row was still at `from` (and is now updated, its history one entry
    /// longer: `c` as entry `seq`, made by change `change_id`).
    pub(crate) fn update_state(
        &mut self,
        c: &StateChange,
        from: Current,
        seq: u32,
        change_id: Uuid,
    ) -> rusqlite::Result<bool> {
        let mut run = RunState::created(from.state);
        run.seq = from.seq;
        run.apply(c, seq);
        let entry = kiln_store::history::entry(&RunState::record(c, seq), change_id);
        self.update_row(c.kind, c.run_id, &run, from, &entry)
    }

    /// Whether the row of run `id` was still at `from` (and now holds `run`, with `entries`
    /// appended to its history). The row update is the compare-and-set.
    fn update_row(
        &mut self,
        kind: RunKind,
        id: Uuid,
        run: &RunState,
        from: Current,
        entries: &[u8],
    ) -> rusqlite::Result<bool> {
        let stmt = match kind {
            RunKind::Flow => &mut self.flow_state,
            RunKind::Task => &mut self.task_state,
        };
        let changed = stmt.execute(params![
            bytes(&id),
            run.state.as_str(),
            run.seq,
            run.message,
            run.attempt,
            run.start_time,
            run.end_time,
            run.result,
            from.state.as_str(),
            from.seq,
            entries
        ])?;
        Ok(changed == 1)
    }

    /// Inserts the rows of [`ROWS_PER_INSERT`] new task runs with one statement (SQLite's
    /// cost per statement, a step with its cursors opened and closed, paid once for them).
    fn insert_task_runs(&mut self, batch: &[Write], rows: &[Pending], histories: &mut Vec<u8>) -> rusqlite::Result<()> {
        histories.clear();
        let mut ends = [0; ROWS_PER_INSERT];
        for (end, p) in ends.iter_mut().zip(rows) {
            kiln_store::history::encode(histories, &p.history);
            *end = histories.len();
        }
        if self.task_runs.is_none() {
            static SQL: LazyLock<String> = LazyLock::new(|| insert_task_runs(ROWS_PER_INSERT));
            self.task_runs = Some(self.conn.prepare_cached(&SQL)?);
        }
        let stmt = self.task_runs.as_mut().expect("prepared above");
        let mut start = 0;
        for (i, (p, &end)) in rows.iter().zip(&ends).enumerate() {
            let Write::TaskRun(r) = &batch[p.index] else {
                unreachable!("only new task runs are inserted together")
            };
            bind_task_run(stmt, i * TASK_RUN_COLUMNS.len(), r, &p.run, &histories[start..end])?;
            start = end;
        }
        stmt.raw_execute()?;
        Ok(())
    }

    /// The ids of the flow runs from `low` to `high`, if there are at most
    /// [`FLOW_IDS_IN_RANGE`] (a value that is not an id cannot be a task run's).
    fn flow_ids_between(&mut self, low: Uuid, high: Uuid) -> rusqlite::Result<Option<Vec<Uuid>>> {
        let mut ids = Vec::new();
        let mut rows = self.flow_ids.query([bytes(&low), bytes(&high)])?;
        while let Some(row) = rows.next()? {
            if ids.len() == FLOW_IDS_IN_RANGE {
                return Ok(None);
            }
            if let Ok(id) = Uuid::from_slice(row.get_ref(0)?.as_bytes().unwrap_or_default()) {
                ids.push(id);
            }
        }
        Ok(Some(ids))
    }

    fn insert_run(&mut self, w: &Write, run: &RunState, history: &[u8]) -> rusqlite::Result<()> {
        match w {
            Write::FlowRun(r) => self.flow_run.execute(params![
                r.id,
                r.name,
                r.parent_id,
                r.parameters.to_string(),
                crate::read::tags_json(&r.tags),
                run.state.as_str(),
                run.message,
                run.attempt,
                r.created,
                run.start_time,
                run.end_time,
                run.result,
                r.command,
                r.retry_of,
                run.seq,
                r.process_id,
                history
            ])?,
            Write::TaskRun(r) => {
                bind_task_run(&mut self.task_run, 0, r, run, history)?;
                self.task_run.raw_execute()?
            }
            _ => unreachable!("only run creations are kept as new rows"),
        };
        Ok(())
    }
}

/// New task runs inserted by one statement when a batch creates many (the rest one by one).
/// The writer's CPU per task run (a flood of 10,000 runs into a new database, the better
/// quarter of 15 floods, `examples`-style timing of its thread): 32 rows to a statement
/// 2.75-2.85 µs, 8 rows 2.6 (the text and blob values of 8 rows fit in SQLite's lookaside
/// memory of the connection; those of 32 go to malloc, under SQLite's memory mutex). One
/// row to a statement was 3.1-3.2 µs before.
const ROWS_PER_INSERT: usize = 8;

/// Flow runs read at most for the id-space look of an optimistic batch (see
/// `new_task_run_takes_a_flow_id`); past it, the batch looks its ids up one by one.
const FLOW_IDS_IN_RANGE: usize = 64;

/// The columns of a new task run's row, in the order [`bind_task_run`] binds them.
const TASK_RUN_COLUMNS: [&str; 17] = [
    "id",
    "flow_run_id",
    "name",
    "task_key",
    "inputs",
    "tags",
    "state",
    "state_message",
    "attempt",
    "created",
    "start_time",
    "end_time",
    "result",
    "call_key",
    "state_seq",
    "process_id",
    "history",
];

/// `INSERT INTO task_runs` of `rows` rows, numbered parameters one row after the other.
fn insert_task_runs(rows: usize) -> String {
    let mut sql = format!("INSERT INTO task_runs ({}) VALUES ", TASK_RUN_COLUMNS.join(", "));
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for (i, column) in TASK_RUN_COLUMNS.iter().enumerate() {
            let n = row * TASK_RUN_COLUMNS.len() + i + 1;
            let sep = if i == 0 { "" } else { ", " };
            // A result reference is JSON text, checked as such.
            match *column {
                "result" => write!(sql, "{sep}json(?{n})"),
                _ => write!(sql, "{sep}?{n}"),
            }
            .expect("writing to a String");
        }
        sql.push(')');
    }
    sql
}

/// Binds the row of new task run `r` (at state `run`) to parameters `at + 1 ..`, in the
/// order of [`TASK_RUN_COLUMNS`].
fn bind_task_run(
    stmt: &mut Statement<'_>,
    at: usize,
    r: &NewTaskRun,
    run: &RunState,
    history: &[u8],
) -> rusqlite::Result<()> {
    let values: [&dyn ToSql; TASK_RUN_COLUMNS.len()] = [
        &bytes(&r.id),
        &r.flow_run_id.as_ref().map(bytes),
        &&*r.name,
        &&*r.task_key,
        &r.inputs.as_str(),
        &crate::read::tags_json(&r.tags),
        &run.state.as_str(),
        &run.message,
        &run.attempt,
        &r.created,
        &run.start_time,
        &run.end_time,
        &run.result,
        &r.call_key,
        &run.seq,
        &r.process_id.as_ref().map(bytes),
        &history,
    ];
    for (i, value) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(at + i + 1, value)?;
    }
    Ok(())
}

/// A run id bound as its 16 bytes, borrowed (binding a [`Uuid`] itself copies them into a
/// new allocation, several per row on the writer's busiest path).
fn bytes(id: &Uuid) -> &[u8] {
    id.as_bytes()
}
