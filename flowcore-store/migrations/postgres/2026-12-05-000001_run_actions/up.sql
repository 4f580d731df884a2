-- What people did to runs (cancel, signal): the action as JSON, with who and when. Kept with
-- the run's summary, deleted with the run (by the cascade: an action written as the run is
-- deleted cannot stay behind).
CREATE TABLE run_actions (
  id BIGSERIAL PRIMARY KEY,
  run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
  action TEXT NOT NULL
);
CREATE INDEX run_actions_run ON run_actions (run_id, id);
