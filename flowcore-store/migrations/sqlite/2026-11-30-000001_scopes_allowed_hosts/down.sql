ALTER TABLE runs DROP COLUMN trigger;
ALTER TABLE credentials DROP COLUMN allowed_hosts;
DROP INDEX api_keys_parent;
ALTER TABLE api_keys DROP COLUMN parent_id;
ALTER TABLE api_keys DROP COLUMN scopes;
