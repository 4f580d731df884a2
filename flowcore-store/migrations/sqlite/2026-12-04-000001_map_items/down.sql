DROP TABLE map_items;
ALTER TABLE steps DROP COLUMN items_done;
ALTER TABLE steps DROP COLUMN items_total;
