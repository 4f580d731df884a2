#!/usr/bin/env bash
# The cost of a query over `runs` when the table is full of dead row versions, as between two
# vacuums under load: 200,000 runs created queued, claimed (running, with a lease) and ended,
# autovacuum off, then EXPLAIN (ANALYZE, BUFFERS) of the query, twice (the second pass sees the
# index entries the first one marked dead). Used for the reaper's look for lapsed leases.
#
#   cargo build --release -p flowcore-server
#   benches/load/dead_versions.sh target/release/flowcore "SELECT ... FROM runs WHERE ..."
#
# Lease expiries run from 1,001 to 201,000 (microseconds); 200 runs stay running. Needs psql and
# the machine's PostgreSQL (FLOWCORE_LOCAL_POSTGRES_URL, postgres://postgres@127.0.0.1:5432).
set -euo pipefail
bin=$(realpath "$1")
query=$2
pg=${FLOWCORE_LOCAL_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
name=flowcore_dead_versions_$$
trap 'psql "$pg/postgres" -XAtqc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null' EXIT
psql "$pg/postgres" -XAtqc "CREATE DATABASE $name"
DATABASE_URL=$pg/$name "$bin" migrate >/dev/null
psql "$pg/$name" -XAtq \
  -c "ALTER TABLE runs SET (autovacuum_enabled = false)" \
  -c "INSERT INTO runs (id, flow_id, flow_version, status, input, created_at, epoch)
      SELECT 'r' || g, 'greet', 1, 'queued', '{}', g, 0 FROM generate_series(1, 200000) g" \
  -c "UPDATE runs SET status = 'running', lease_expires_at = created_at + 1000, epoch = 1" \
  -c "UPDATE runs SET status = 'succeeded', lease_expires_at = NULL WHERE seq % 1000 <> 0"
psql "$pg/$name" -XAt -c "EXPLAIN (ANALYZE, BUFFERS) $query" -c "EXPLAIN (ANALYZE, BUFFERS) $query" |
  grep -E "Scan|Buffers|Execution"
