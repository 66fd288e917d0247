-- Flow runs, task runs, their state histories, dependency edges and captured logs.
-- Ids are UUIDv7 as 16-byte blobs (time-ordered: `ORDER BY id` is creation order, and new
-- rows land at the end of each index); timestamps are microseconds since the Unix epoch (UTC).

CREATE TABLE flow_runs (
    id            BLOB PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    parent_id     BLOB,
    parameters    TEXT NOT NULL,
    tags          TEXT NOT NULL,
    state         TEXT NOT NULL,
    state_message TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    created       INTEGER NOT NULL,
    start_time    INTEGER,
    end_time      INTEGER
) WITHOUT ROWID;
CREATE INDEX flow_runs_parent ON flow_runs (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE task_runs (
    id            BLOB PRIMARY KEY NOT NULL,
    flow_run_id   BLOB,
    name          TEXT NOT NULL,
    task_key      TEXT NOT NULL,
    inputs        TEXT NOT NULL,
    tags          TEXT NOT NULL,
    state         TEXT NOT NULL,
    state_message TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    created       INTEGER NOT NULL,
    start_time    INTEGER,
    end_time      INTEGER
) WITHOUT ROWID;
CREATE INDEX task_runs_flow ON task_runs (flow_run_id);

-- One row per transition; `seq` is the position in the run's history (0: creation).
CREATE TABLE states (
    run_id    BLOB NOT NULL,
    seq       INTEGER NOT NULL,
    state     TEXT NOT NULL,
    message   TEXT,
    attempt   INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE edges (
    upstream    BLOB NOT NULL,
    downstream  BLOB NOT NULL,
    flow_run_id BLOB,
    PRIMARY KEY (upstream, downstream)
) WITHOUT ROWID;
CREATE INDEX edges_flow ON edges (flow_run_id);

CREATE TABLE logs (
    seq         INTEGER PRIMARY KEY,
    run_id      BLOB NOT NULL,
    flow_run_id BLOB,
    timestamp   INTEGER NOT NULL,
    level       TEXT NOT NULL,
    target      TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX logs_run ON logs (run_id);
CREATE INDEX logs_flow ON logs (flow_run_id);
