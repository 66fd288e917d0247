-- The history of a run created and moved on within one batch of writes (most task runs:
-- Pending, Running, Completed) is kept in its row (MessagePack, see src/history.rs), not
-- as rows of `states`: one B-tree insert per run instead of one per state. Later states of
-- the run go to `states` as before; a run's history is its row's entries, then its rows of
-- `states`.
ALTER TABLE flow_runs ADD COLUMN history BLOB;
ALTER TABLE task_runs ADD COLUMN history BLOB;
