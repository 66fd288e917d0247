-- The open-run indexes again, with their condition written as equalities joined by OR:
-- SQLite evaluates a constant IN list by building a temporary B-tree, and a partial index's
-- condition is evaluated on every insert and update of the table (a quarter of the writer's
-- time on trivial task runs). Queries that use these indexes spell the condition the same
-- way (`OPEN` in src/lib.rs), which is how SQLite knows the index applies.
DROP INDEX flow_runs_open;
DROP INDEX task_runs_open;
CREATE INDEX flow_runs_open ON flow_runs (process_id)
    WHERE state = 'Pending' OR state = 'Running' OR state = 'AwaitingRetry' OR state = 'Cancelling';
CREATE INDEX task_runs_open ON task_runs (process_id)
    WHERE state = 'Pending' OR state = 'Running' OR state = 'AwaitingRetry' OR state = 'Cancelling';
