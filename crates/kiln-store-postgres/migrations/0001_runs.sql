-- Flow runs, task runs, their state histories, dependency edges and captured logs: the same
-- model as the SQLite schema, with PostgreSQL's types (UUID ids, JSONB documents). Times
-- are microseconds since the Unix epoch (UTC), as in every Kiln store.

CREATE TABLE flow_runs (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL,
    parent_id     UUID,
    parameters    JSONB NOT NULL,
    tags          JSONB NOT NULL,
    state         TEXT NOT NULL,
    state_seq     INTEGER NOT NULL DEFAULT 0,
    state_message TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    created       BIGINT NOT NULL,
    start_time    BIGINT,
    end_time      BIGINT,
    result        JSONB,
    command       JSONB,
    retry_of      UUID
);
CREATE INDEX flow_runs_parent ON flow_runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX flow_runs_retry ON flow_runs (retry_of) WHERE retry_of IS NOT NULL;

CREATE TABLE task_runs (
    id            UUID PRIMARY KEY,
    flow_run_id   UUID,
    name          TEXT NOT NULL,
    task_key      TEXT NOT NULL,
    inputs        JSONB NOT NULL,
    tags          JSONB NOT NULL,
    state         TEXT NOT NULL,
    state_seq     INTEGER NOT NULL DEFAULT 0,
    state_message TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    created       BIGINT NOT NULL,
    start_time    BIGINT,
    end_time      BIGINT,
    result        JSONB,
    call_key      TEXT
);
CREATE INDEX task_runs_flow ON task_runs (flow_run_id);

-- One row per transition; `seq` is the position in the run's history (0: creation).
CREATE TABLE states (
    run_id    UUID NOT NULL,
    seq       INTEGER NOT NULL,
    state     TEXT NOT NULL,
    message   TEXT,
    attempt   INTEGER NOT NULL,
    timestamp BIGINT NOT NULL,
    result    JSONB,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE edges (
    upstream    UUID NOT NULL,
    downstream  UUID NOT NULL,
    flow_run_id UUID,
    PRIMARY KEY (upstream, downstream)
);
CREATE INDEX edges_flow ON edges (flow_run_id);

CREATE TABLE logs (
    seq         BIGSERIAL PRIMARY KEY,
    run_id      UUID NOT NULL,
    flow_run_id UUID,
    timestamp   BIGINT NOT NULL,
    level       TEXT NOT NULL,
    target      TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX logs_run ON logs (run_id);
CREATE INDEX logs_flow ON logs (flow_run_id);
