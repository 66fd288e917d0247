//! Concurrency limits by tag on PostgreSQL: a grant locks the limit rows it counts
//! (`FOR UPDATE`, in tag order), so two processes never both take a tag's last slot.

use std::collections::BTreeMap;

use deadpool_postgres::Pool;
use kiln_store::limit::{ConcurrencyLimit, HOLDS_SLOT_SQL, LimitUsage, SlotRequest, Slots};
use kiln_store::model::now_micros;
use uuid::Uuid;

use crate::DbError;

/// Grants the request's run a slot of each of its limited tags, or none (see
/// `Store::acquire_slots`).
pub(crate) async fn acquire(pool: &Pool, request: &SlotRequest) -> Result<Slots, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let Some(run) = tx
        .query_opt(
            &tx.prepare_cached("SELECT state_seq FROM task_runs WHERE id = $1")
                .await?,
            &[&request.run_id],
        )
        .await?
    else {
        return Err(DbError::UnknownRun(request.run_id));
    };
    let seq: i32 = run.try_get(0)?;
    let limited = tx
        .query(
            &tx.prepare_cached("SELECT tag, slots FROM concurrency_limits WHERE tag = ANY($1) ORDER BY tag FOR UPDATE")
                .await?,
            &[&request.tags],
        )
        .await?;
    for row in &limited {
        let (tag, slots): (String, i32) = (row.try_get(0)?, row.try_get(1)?);
        // Slots of runs that moved on are free: their rows go.
        tx.execute(
            &tx.prepare_cached(&format!(
                "DELETE FROM concurrency_slots WHERE tag = $1 AND run_id NOT IN
                   (SELECT s.run_id FROM concurrency_slots s JOIN task_runs t ON t.id = s.run_id
                    WHERE s.tag = $1 AND {HOLDS_SLOT_SQL})"
            ))
            .await?,
            &[&tag],
        )
        .await?;
        let others: i64 = tx
            .query_one(
                &tx.prepare_cached("SELECT COUNT(*) FROM concurrency_slots WHERE tag = $1 AND run_id <> $2")
                    .await?,
                &[&tag, &request.run_id],
            )
            .await?
            .try_get(0)?;
        if others >= i64::from(slots) {
            // Dropped without a commit: nothing of this request stays.
            return Ok(Slots::Busy {
                tag,
                slots: slots as u32,
            });
        }
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO concurrency_slots (tag, run_id, granted_seq, granted_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tag, run_id) DO UPDATE SET granted_seq = excluded.granted_seq",
            )
            .await?,
            &[&tag, &request.run_id, &seq, &now_micros()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Slots::Granted)
}

/// Every limit with the runs holding its slots.
pub(crate) async fn limits(pool: &Pool) -> Result<Vec<LimitUsage>, DbError> {
    let client = pool.get().await?;
    let mut usage: BTreeMap<String, LimitUsage> = BTreeMap::new();
    for r in client
        .query("SELECT tag, slots, updated FROM concurrency_limits", &[])
        .await?
    {
        let limit = ConcurrencyLimit {
            tag: r.try_get(0)?,
            slots: r.try_get::<_, i32>(1)? as u32,
            updated: r.try_get(2)?,
        };
        usage.insert(
            limit.tag.clone(),
            LimitUsage {
                limit,
                holders: Vec::new(),
            },
        );
    }
    let sql = format!(
        "SELECT s.tag, s.run_id FROM concurrency_slots s JOIN task_runs t ON t.id = s.run_id
         WHERE {HOLDS_SLOT_SQL} ORDER BY s.granted_at, s.run_id"
    );
    for r in client.query(&sql, &[]).await? {
        let (tag, run): (String, Uuid) = (r.try_get(0)?, r.try_get(1)?);
        if let Some(u) = usage.get_mut(&tag) {
            u.holders.push(run);
        }
    }
    Ok(usage.into_values().collect())
}
