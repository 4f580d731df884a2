-- Parked runs (`waiting`): what the run waits for (JSON, kept until it ends) and when it must
-- be woken at the latest. The timer index holds only waiting runs, by that time: the timer
-- reads the due range of it, never the table.
ALTER TABLE runs ADD COLUMN parked TEXT;
ALTER TABLE runs ADD COLUMN wake_at BIGINT;
CREATE INDEX runs_wake ON runs (wake_at) WHERE status = 'waiting';
-- A woken run keeps when it was woken in `wake_at` until a worker claims it: the reaper finds
-- the woken runs that no worker took (their job lost to a crash or a failed queue) here.
CREATE INDEX runs_woken ON runs (wake_at) WHERE status = 'queued' AND wake_at IS NOT NULL;

-- Signals sent to runs, first in first out per run and name. A pending one (`taken_by` NULL)
-- waits for a wait of its run; a taken one stays, named by the node that took it, so that an
-- execution resumed after a crash gets the same one again.
CREATE TABLE signals (
  id BIGSERIAL PRIMARY KEY,
  run_id TEXT NOT NULL,
  name TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  taken_by TEXT
);
CREATE INDEX signals_run ON signals (run_id, name, id);

-- The keys of keyed waits (`wait`'s `key`), for signals sent by name and key: written when a
-- run parks, read with the run's status, deleted with the run.
CREATE TABLE wait_keys (
  signal TEXT NOT NULL,
  key TEXT NOT NULL,
  run_id TEXT NOT NULL,
  PRIMARY KEY (signal, key, run_id)
);
CREATE INDEX wait_keys_run ON wait_keys (run_id);
