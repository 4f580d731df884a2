ALTER TABLE runs DROP COLUMN priority;
ALTER TABLE runs DROP COLUMN concurrency_limit;
ALTER TABLE runs DROP COLUMN concurrency_key;
