-- What a claim costs with a deep backlog.
--
-- A claim reads a pool's unclaimed runs in the order it hands them out (scheduled time,
-- then id), so it stops after the rows it needs instead of sorting the whole backlog.
DROP INDEX queue_claimable;
CREATE INDEX queue_claimable ON queue (pool, scheduled, run_id) WHERE claimed_by IS NULL;

-- Notifications once per statement and pool instead of a function call per row: queuing
-- thousands of runs, or finishing them, no longer calls PL/pgSQL for each. Claims (which
-- set `claimed_by`) call nothing at all; a run handed back (claimed_by cleared) still
-- notifies its pool.
DROP TRIGGER queue_claimable_notify ON queue;

CREATE FUNCTION kiln_queue_notify_queued() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_queue', pool) FROM (SELECT DISTINCT pool FROM queued) AS p;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER queue_queued_notify AFTER INSERT ON queue REFERENCING NEW TABLE AS queued
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_queue_notify_queued();

CREATE FUNCTION kiln_queue_notify_left() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_queue', pool)
        FROM (SELECT DISTINCT pool FROM left_queue WHERE claimed_by IS NOT NULL) AS p;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER queue_left_notify AFTER DELETE ON queue REFERENCING OLD TABLE AS left_queue
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_queue_notify_left();

CREATE TRIGGER queue_handed_back_notify AFTER UPDATE OF claimed_by ON queue
    FOR EACH ROW WHEN (NEW.claimed_by IS NULL) EXECUTE FUNCTION kiln_queue_notify();
