-- When retention dropped a run's data (input, output, trigger, steps) and kept its summary
-- (status, timings, error); NULL while the run has its data. The partial index holds only the
-- runs that still have it, so that finding the next ones to drop does not read those already
-- dropped.
ALTER TABLE runs ADD COLUMN data_pruned_at BIGINT;
CREATE INDEX runs_with_data ON runs (created_at) WHERE data_pruned_at IS NULL;
