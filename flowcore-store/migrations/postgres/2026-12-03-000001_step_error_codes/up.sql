-- A failed step's stable error code (`timeout`, `node_failed`, ...), beside its message.
ALTER TABLE steps ADD COLUMN error_code TEXT;
