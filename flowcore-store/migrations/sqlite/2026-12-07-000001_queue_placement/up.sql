-- Where a run goes in the queue: its concurrency key (rendered when it was created) and limit,
-- and its priority. Every enqueue of the run (a restart, a wake-up, a recovery) reads them.
ALTER TABLE runs ADD COLUMN concurrency_key TEXT;
ALTER TABLE runs ADD COLUMN concurrency_limit INTEGER;
ALTER TABLE runs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 5;
