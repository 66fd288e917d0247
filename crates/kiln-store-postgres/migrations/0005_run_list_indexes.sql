-- Lists of flow runs by state and by flow, newest first, without scanning: flow runs are
-- few next to task runs, so keeping these indexes costs little on the write path.
CREATE INDEX flow_runs_state ON flow_runs (state, id);
CREATE INDEX flow_runs_name ON flow_runs (name, id);
