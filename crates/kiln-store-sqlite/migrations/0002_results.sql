-- A Completed state can carry a reference to a persisted result (JSON: storage, key,
-- serializer, size, hash); the run rows keep the latest one for quick reads.
ALTER TABLE states ADD COLUMN result TEXT;
ALTER TABLE task_runs ADD COLUMN result TEXT;
ALTER TABLE flow_runs ADD COLUMN result TEXT;
-- Identifies a task call inside its flow run across retries (task key and call number).
ALTER TABLE task_runs ADD COLUMN call_key TEXT;
-- How a top-level flow run was started (JSON: argv, cwd), so `kiln runs retry` can start it
-- again, and which earlier flow run a run retries.
ALTER TABLE flow_runs ADD COLUMN command TEXT;
ALTER TABLE flow_runs ADD COLUMN retry_of BLOB;
CREATE INDEX flow_runs_retry ON flow_runs (retry_of) WHERE retry_of IS NOT NULL;
