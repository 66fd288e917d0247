-- The processes that run flows and tasks, with their heartbeats, and which process runs each
-- run: a process that dies has its unfinished runs marked Crashed.
CREATE TABLE processes (
    id        UUID PRIMARY KEY,
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    started   BIGINT NOT NULL,
    heartbeat BIGINT NOT NULL
);
ALTER TABLE flow_runs ADD COLUMN process_id UUID;
ALTER TABLE task_runs ADD COLUMN process_id UUID;
CREATE INDEX flow_runs_open ON flow_runs (process_id) WHERE state IN ('Pending', 'Running', 'AwaitingRetry');
CREATE INDEX task_runs_open ON task_runs (process_id) WHERE state IN ('Pending', 'Running', 'AwaitingRetry');
