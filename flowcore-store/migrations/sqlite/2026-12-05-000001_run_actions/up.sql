-- What people did to runs (cancel, signal): the action as JSON, with who and when. Kept with
-- the run's summary, deleted with the run.
CREATE TABLE run_actions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT NOT NULL,
  action TEXT NOT NULL
);
CREATE INDEX run_actions_run ON run_actions (run_id, id);
