-- The processes that run flows and tasks, with their heartbeats, and which process runs each
-- run: a process that dies has its unfinished runs marked Crashed.
CREATE TABLE processes (
    id        BLOB PRIMARY KEY NOT NULL,
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    started   INTEGER NOT NULL,
    heartbeat INTEGER NOT NULL
) WITHOUT ROWID;
ALTER TABLE flow_runs ADD COLUMN process_id BLOB;
ALTER TABLE task_runs ADD COLUMN process_id BLOB;
-- Only unfinished runs are indexed: runs that end within one batch are inserted finished
-- and never enter it.
CREATE INDEX flow_runs_open ON flow_runs (process_id) WHERE state IN ('Pending', 'Running', 'AwaitingRetry');
CREATE INDEX task_runs_open ON task_runs (process_id) WHERE state IN ('Pending', 'Running', 'AwaitingRetry');
