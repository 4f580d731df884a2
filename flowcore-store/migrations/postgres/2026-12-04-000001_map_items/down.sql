DROP TABLE map_items;
ALTER TABLE steps DROP COLUMN items_total, DROP COLUMN items_done;
