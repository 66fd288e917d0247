-- A run's history is kept in its row: one MessagePack array per state (see src/history.rs),
-- appended as the run moves on, instead of one row of `states` per state. Creating a run is
-- one B-tree insert whatever states it goes through in the same batch, and a later state
-- change is one row update instead of an update and an insert. `states` keeps the states
-- that runs recorded before this migration; readers put both together.
ALTER TABLE flow_runs ADD COLUMN history BLOB;
ALTER TABLE task_runs ADD COLUMN history BLOB;
