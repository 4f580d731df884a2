-- What each API key may do, and the key that made it (revoking a key revokes the keys it made).
-- Keys made before scopes existed keep every scope. Credentials may name the hosts they are sent
-- to (a JSON array; NULL: only hosts written literally in the flow).
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'read,run,write,admin';
ALTER TABLE api_keys ADD COLUMN parent_id TEXT;
CREATE INDEX api_keys_parent ON api_keys (parent_id);
ALTER TABLE credentials ADD COLUMN allowed_hosts TEXT;
-- What started a run, as its templates see it (`trigger`: a webhook's chosen headers).
ALTER TABLE runs ADD COLUMN trigger TEXT;
