DROP INDEX runs_flow_with_data;
DROP INDEX runs_with_data;
ALTER TABLE runs DROP COLUMN data_pruned_at;
