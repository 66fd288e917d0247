-- A run being cancelled is still open: its process stops it, and if that process dies
-- first, crash detection must find it (it ends Crashed instead of Cancelling forever).
DROP INDEX flow_runs_open;
DROP INDEX task_runs_open;
CREATE INDEX flow_runs_open ON flow_runs (process_id) WHERE state IN ('Pending', 'Running', 'AwaitingRetry', 'Cancelling');
CREATE INDEX task_runs_open ON task_runs (process_id) WHERE state IN ('Pending', 'Running', 'AwaitingRetry', 'Cancelling');
