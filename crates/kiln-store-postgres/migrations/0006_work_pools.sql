-- Work pools: deployments, runs queued for workers, and the claims workers hold on them
-- (the same model as the SQLite schema).
CREATE TABLE deployments (
    name             TEXT PRIMARY KEY,
    flow             TEXT NOT NULL,
    pool             TEXT NOT NULL,
    parameters       JSONB NOT NULL,
    parameter_schema JSONB NOT NULL,
    tags             JSONB NOT NULL,
    schedule         JSONB,
    catchup          BOOLEAN NOT NULL,
    concurrency      INTEGER,
    max_attempts     INTEGER NOT NULL,
    updated          BIGINT NOT NULL
);

CREATE TABLE work_pools (
    name        TEXT PRIMARY KEY,
    concurrency INTEGER
);

-- One row per queued run until it finishes. `fence` grows with every claim; `claimed_by`
-- is the process holding it (NULL: claimable from `scheduled` on).
CREATE TABLE queue (
    run_id       UUID PRIMARY KEY,
    kind         TEXT NOT NULL,
    pool         TEXT NOT NULL,
    deployment   TEXT,
    target       TEXT NOT NULL,
    scheduled    BIGINT NOT NULL,
    max_attempts INTEGER NOT NULL,
    host         TEXT,
    payload      JSONB,
    fence        BIGINT NOT NULL DEFAULT 0,
    claimed_by   UUID
);
CREATE INDEX queue_claimable ON queue (pool, scheduled) WHERE claimed_by IS NULL;
CREATE INDEX queue_claimed ON queue (claimed_by) WHERE claimed_by IS NOT NULL;

-- Workers wait for work with LISTEN kiln_queue: a run becomes claimable when it is queued
-- or handed back (its worker died), and a slot of a limited pool frees when a claimed run
-- leaves the queue. The payload names the pool.
CREATE FUNCTION kiln_queue_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.claimed_by IS NOT NULL THEN
            PERFORM pg_notify('kiln_queue', OLD.pool);
        END IF;
    ELSIF NEW.claimed_by IS NULL THEN
        PERFORM pg_notify('kiln_queue', NEW.pool);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER queue_claimable_notify AFTER INSERT OR UPDATE OF claimed_by OR DELETE ON queue
    FOR EACH ROW EXECUTE FUNCTION kiln_queue_notify();
