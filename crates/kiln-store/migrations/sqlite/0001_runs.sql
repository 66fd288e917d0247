-- Flow runs, task runs, their state history, dependency edges and captured logs.
-- Ids are UUIDv7 text (time-ordered, so `ORDER BY id` is creation order);
-- timestamps are microseconds since the Unix epoch (UTC).

CREATE TABLE flow_runs (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    parent_id     TEXT,
    parameters    TEXT NOT NULL,
    tags          TEXT NOT NULL,
    state         TEXT NOT NULL,
    state_message TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    created       INTEGER NOT NULL,
    start_time    INTEGER,
    end_time      INTEGER
);
CREATE INDEX flow_runs_parent ON flow_runs (parent_id);

CREATE TABLE task_runs (
    id            TEXT PRIMARY KEY NOT NULL,
    flow_run_id   TEXT,
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
);
CREATE INDEX task_runs_flow ON task_runs (flow_run_id);

CREATE TABLE states (
    seq       INTEGER PRIMARY KEY,
    run_id    TEXT NOT NULL,
    state     TEXT NOT NULL,
    message   TEXT,
    attempt   INTEGER NOT NULL,
    timestamp INTEGER NOT NULL
);
CREATE INDEX states_run ON states (run_id);

CREATE TABLE edges (
    upstream    TEXT NOT NULL,
    downstream  TEXT NOT NULL,
    flow_run_id TEXT,
    PRIMARY KEY (upstream, downstream)
) WITHOUT ROWID;
CREATE INDEX edges_flow ON edges (flow_run_id);

CREATE TABLE logs (
    seq         INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL,
    flow_run_id TEXT,
    timestamp   INTEGER NOT NULL,
    level       TEXT NOT NULL,
    target      TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX logs_run ON logs (run_id);
CREATE INDEX logs_flow ON logs (flow_run_id);
