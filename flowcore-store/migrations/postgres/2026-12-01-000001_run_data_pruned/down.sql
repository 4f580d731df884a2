ALTER TABLE steps RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor,
  autovacuum_vacuum_cost_delay);
ALTER TABLE runs RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor,
  autovacuum_vacuum_cost_delay);
DROP INDEX runs_flow_with_data;
DROP INDEX runs_with_data;
ALTER TABLE runs DROP COLUMN data_pruned_at;
