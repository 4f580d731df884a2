-- Times are microseconds since the Unix epoch (BIGINT), JSON is text: the same on both backends.
CREATE TABLE flows (
    id TEXT PRIMARY KEY NOT NULL,
    latest_version INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX flows_updated ON flows (updated_at, id);

CREATE TABLE flow_versions (
    flow_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    definition TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (flow_id, version)
);

CREATE TABLE runs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    flow_id TEXT NOT NULL,
    flow_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    idempotency_key TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    epoch BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX runs_idempotency ON runs (flow_id, idempotency_key);
CREATE INDEX runs_flow ON runs (flow_id, seq);
CREATE INDEX runs_status ON runs (status, seq);
CREATE INDEX runs_lease ON runs (status, lease_expires_at);
CREATE INDEX runs_created ON runs (created_at);

CREATE TABLE steps (
    run_id TEXT NOT NULL,
    node TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    output TEXT,
    error TEXT,
    port TEXT,
    PRIMARY KEY (run_id, node)
);

CREATE TABLE credentials (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    key_id TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);

CREATE TABLE usage_daily (
    flow_id TEXT NOT NULL,
    day TEXT NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    node_executions BIGINT NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (flow_id, day)
);

CREATE TABLE files (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    blob_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE schedule_fires (
    schedule_id TEXT NOT NULL,
    fire_at BIGINT NOT NULL,
    run_id TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (schedule_id, fire_at)
);
