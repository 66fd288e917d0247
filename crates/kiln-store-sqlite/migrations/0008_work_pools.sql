-- Work pools: deployments, runs queued for workers, and the claims workers hold on them.
CREATE TABLE deployments (
    name             TEXT PRIMARY KEY NOT NULL,
    flow             TEXT NOT NULL,
    pool             TEXT NOT NULL,
    parameters       TEXT NOT NULL,
    parameter_schema TEXT NOT NULL,
    tags             TEXT NOT NULL,
    schedule         TEXT,
    catchup          INTEGER NOT NULL,
    concurrency      INTEGER,
    max_attempts     INTEGER NOT NULL,
    updated          INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE work_pools (
    name        TEXT PRIMARY KEY NOT NULL,
    concurrency INTEGER
) WITHOUT ROWID;

-- One row per queued run until it finishes. `fence` grows with every claim; `claimed_by`
-- is the process holding it (NULL: claimable from `scheduled` on).
CREATE TABLE queue (
    run_id       BLOB PRIMARY KEY NOT NULL,
    kind         TEXT NOT NULL,
    pool         TEXT NOT NULL,
    deployment   TEXT,
    target       TEXT NOT NULL,
    scheduled    INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    host         TEXT,
    payload      TEXT,
    fence        INTEGER NOT NULL DEFAULT 0,
    claimed_by   BLOB
) WITHOUT ROWID;
CREATE INDEX queue_claimable ON queue (pool, scheduled) WHERE claimed_by IS NULL;
CREATE INDEX queue_claimed ON queue (claimed_by) WHERE claimed_by IS NOT NULL;
