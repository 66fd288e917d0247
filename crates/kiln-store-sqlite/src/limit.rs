//! Concurrency limits by tag on SQLite: slots are granted on the writer thread, one
//! `BEGIN IMMEDIATE` each, so two processes on the same file count the same holders.

use std::collections::BTreeMap;

use kiln_store::StoreError;
use kiln_store::limit::{ConcurrencyLimit, HOLDS_SLOT_SQL, LimitUsage, SlotRequest, Slots};
use kiln_store::model::now_micros;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use crate::backend;

/// A slot request for the writer thread, and where its answer goes.
pub(crate) struct AcquireJob {
    pub(crate) request: SlotRequest,
    pub(crate) reply: futures::channel::oneshot::Sender<Result<Slots, StoreError>>,
}

/// Grants the request's run a slot of each of its limited tags, or none (see
/// `Store::acquire_slots`).
pub(crate) fn acquire(conn: &mut Connection, request: &SlotRequest) -> Result<Slots, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let seq: Option<u32> = tx
        .query_row("SELECT state_seq FROM task_runs WHERE id = ?1", [request.run_id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(backend)?;
    let Some(seq) = seq else {
        return Err(StoreError::UnknownRun(request.run_id.to_string()));
    };
    let tags = serde_json::to_string(&request.tags).unwrap_or_else(|_| "[]".into());
    let limited: Vec<(String, u32)> = {
        let mut q = tx
            .prepare_cached(
                "SELECT tag, slots FROM concurrency_limits WHERE tag IN (SELECT value FROM json_each(?1)) ORDER BY tag",
            )
            .map_err(backend)?;
        let rows = q.query_map([&tags], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)?
    };
    for (tag, slots) in &limited {
        // Slots of runs that moved on are free: their rows go.
        tx.execute(
            &format!(
                "DELETE FROM concurrency_slots WHERE tag = ?1 AND run_id NOT IN
                   (SELECT s.run_id FROM concurrency_slots s JOIN task_runs t ON t.id = s.run_id
                    WHERE s.tag = ?1 AND {HOLDS_SLOT_SQL})"
            ),
            [tag],
        )
        .map_err(backend)?;
        let others: u32 = tx
            .query_row(
                "SELECT COUNT(*) FROM concurrency_slots WHERE tag = ?1 AND run_id <> ?2",
                params![tag, request.run_id],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if others >= *slots {
            // Dropped without a commit: nothing of this request stays.
            return Ok(Slots::Busy {
                tag: tag.clone(),
                slots: *slots,
            });
        }
        tx.execute(
            "INSERT INTO concurrency_slots (tag, run_id, granted_seq, granted_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tag, run_id) DO UPDATE SET granted_seq = excluded.granted_seq",
            params![tag, request.run_id, seq, now_micros()],
        )
        .map_err(backend)?;
    }
    tx.commit().map_err(backend)?;
    Ok(Slots::Granted)
}

/// Every limit with the runs holding its slots.
pub(crate) fn limits(c: &Connection) -> Result<Vec<LimitUsage>, StoreError> {
    let mut usage: BTreeMap<String, LimitUsage> = BTreeMap::new();
    let mut q = c
        .prepare_cached("SELECT tag, slots, updated FROM concurrency_limits")
        .map_err(backend)?;
    let rows = q
        .query_map([], |r| {
            Ok(ConcurrencyLimit {
                tag: r.get(0)?,
                slots: r.get(1)?,
                updated: r.get(2)?,
            })
        })
        .map_err(backend)?;
    for limit in rows {
        let limit = limit.map_err(backend)?;
        usage.insert(
            limit.tag.clone(),
            LimitUsage {
                limit,
                holders: Vec::new(),
            },
        );
    }
    let mut q = c
        .prepare_cached(&format!(
            "SELECT s.tag, s.run_id FROM concurrency_slots s JOIN task_runs t ON t.id = s.run_id
             WHERE {HOLDS_SLOT_SQL} ORDER BY s.granted_at, s.run_id"
        ))
        .map_err(backend)?;
    let rows = q
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Uuid>(1)?)))
        .map_err(backend)?;
    for row in rows {
        let (tag, run) = row.map_err(backend)?;
        if let Some(u) = usage.get_mut(&tag) {
            u.holders.push(run);
        }
    }
    Ok(usage.into_values().collect())
}
