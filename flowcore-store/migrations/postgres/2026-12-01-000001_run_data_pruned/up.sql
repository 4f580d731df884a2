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
-- Runs and steps churn: every run is inserted, updated a few times and, under retention,
-- deleted. With the default autovacuum (a pass once a fifth of the table is dead, throttled by
-- its cost delay) dead row versions piled up faster than they were reclaimed and the database
-- grew 100 MB a minute at 1,100 runs/s (BENCHMARKS.md, "Retention on PostgreSQL"). These
-- tables are vacuumed once 2% of them is dead, unthrottled.
ALTER TABLE runs SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02,
  autovacuum_vacuum_cost_delay = 0);
ALTER TABLE steps SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02,
  autovacuum_vacuum_cost_delay = 0);
