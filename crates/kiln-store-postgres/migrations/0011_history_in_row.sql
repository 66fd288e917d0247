-- A run's history is kept in its row (kiln_store::history: one MessagePack array per
-- state), appended as the run moves on, instead of one row of `states` per state: a state
-- change is one row update instead of an update, an insert and an index entry. `states`
-- keeps the states that runs recorded before this migration; readers put both together.
ALTER TABLE flow_runs ADD COLUMN history BYTEA;
ALTER TABLE task_runs ADD COLUMN history BYTEA;
