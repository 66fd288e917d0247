-- The position of a run's current state in its history, kept on the run row so that a state
-- change can be checked and numbered (compare-and-set) without scanning the history.
ALTER TABLE flow_runs ADD COLUMN state_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_runs ADD COLUMN state_seq INTEGER NOT NULL DEFAULT 0;
UPDATE flow_runs SET state_seq = COALESCE((SELECT MAX(seq) FROM states WHERE run_id = flow_runs.id), 0);
UPDATE task_runs SET state_seq = COALESCE((SELECT MAX(seq) FROM states WHERE run_id = task_runs.id), 0);
