-- A map step's progress while it runs, and once it ended.
ALTER TABLE steps ADD COLUMN items_total INTEGER;
ALTER TABLE steps ADD COLUMN items_done INTEGER;
-- Finished items of running map steps, a batch a row (keyed by its lowest index): what a
-- resumed run does not execute again. Deleted once the step ends. Clustered by its key.
CREATE TABLE map_items (run_id TEXT NOT NULL, node TEXT NOT NULL, first_index INTEGER NOT NULL,
    items TEXT NOT NULL, PRIMARY KEY (run_id, node, first_index)) WITHOUT ROWID;
