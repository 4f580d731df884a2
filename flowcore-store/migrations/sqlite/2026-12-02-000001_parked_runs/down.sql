DROP TABLE wait_keys;
DROP TABLE signals;
DROP INDEX runs_woken;
DROP INDEX runs_wake;
ALTER TABLE runs DROP COLUMN wake_at;
ALTER TABLE runs DROP COLUMN parked;
