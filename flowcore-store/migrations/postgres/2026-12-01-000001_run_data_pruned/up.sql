-- When retention dropped a run's data (input, output, trigger, steps) and kept its summary
-- (status, timings, error); NULL while the run has its data. The partial indexes hold only the
-- finished runs that still have it, by when they finished (for the server-wide rule) and by
-- flow (for a flow's own rule), so that finding the next ones to drop reads neither those
-- already dropped nor other flows' runs.
ALTER TABLE runs ADD COLUMN data_pruned_at BIGINT;
CREATE INDEX runs_with_data ON runs (finished_at)
  WHERE data_pruned_at IS NULL AND finished_at IS NOT NULL;
CREATE INDEX runs_flow_with_data ON runs (flow_id, finished_at)
  WHERE data_pruned_at IS NULL AND finished_at IS NOT NULL;
