ALTER TABLE steps DROP COLUMN error_code;
