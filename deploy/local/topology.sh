#!/usr/bin/env bash
# The production topology as local processes, without Docker: FLOWCORE_APIS api processes
# (2) and FLOWCORE_WORKERS workers (2), each through deploy/local/run.sh (the settings of
# deploy/flowcore.env), on a fresh database of the machine's PostgreSQL, a fresh key prefix of
# its Redis, and S3 through moto_server when it is installed (else local files, one folder that
# every process shares, as they would share a bucket). Loopback only.
# Ctrl-C (or SIGTERM) stops everything and drops the database and the keys.
#
#   cargo build --release -p flowcore-server
#   deploy/local/topology.sh [path/to/flowcore]
#
# FLOWCORE_LOCAL_POSTGRES_URL (postgres://postgres@127.0.0.1:5432) and FLOWCORE_LOCAL_REDIS_URL
# (redis://127.0.0.1:6379) choose the servers; FLOWCORE_ADMIN_KEY (dev-key) the API key.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-$here/target}/release/flowcore}")
apis=${FLOWCORE_APIS:-2}
workers=${FLOWCORE_WORKERS:-2}
pg=${FLOWCORE_LOCAL_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
redis=${FLOWCORE_LOCAL_REDIS_URL:-redis://127.0.0.1:6379}
name=flowcore_local_$(date +%s)_$$
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  psql "$pg/postgres" -XAtqc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null || true
  redis-cli -u "$redis" --scan --pattern "$name:*" | xargs -r redis-cli -u "$redis" del >/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
wait_http() { for _ in $(seq 1 300); do curl -fs "$1" >/dev/null && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }

psql "$pg/postgres" -XAtqc "CREATE DATABASE $name"
export DATABASE_URL=$pg/$name REDIS_URL=$redis FLOWCORE_REDIS_PREFIX=$name
export FLOWCORE_ADMIN_KEY=${FLOWCORE_ADMIN_KEY:-dev-key}
export FLOWCORE_ENCRYPTION_KEY=${FLOWCORE_ENCRYPTION_KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
# One machine, no proxy in front.
export NUMBER_OF_PROXIES=0
if command -v "${FLOWCORE_MOTO_SERVER:-moto_server}" >/dev/null 2>&1; then
  s3_port=$(free_port)
  "${FLOWCORE_MOTO_SERVER:-moto_server}" -H 127.0.0.1 -p "$s3_port" >"$dir/s3.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do curl -s "127.0.0.1:$s3_port" >/dev/null && break; sleep 0.1; done
  curl -fs -X PUT "127.0.0.1:$s3_port/flowcore" >/dev/null
  export S3_ENDPOINT_URL=http://127.0.0.1:$s3_port S3_STORAGE_ACCESS_KEY_ID=local S3_STORAGE_SECRET_ACCESS_KEY=local
else
  export STORAGE_TYPE=fs
fi

start() { # role index
  local port
  port=$(free_port)
  FLOWCORE_ROLE=$1 FLOWCORE_BIND=127.0.0.1:$port FLOWCORE_DATA_DIR=$dir/data \
    "$here/deploy/local/run.sh" "$bin" 2>"$dir/$1$2.log" &
  pids+=($!)
  wait_http "127.0.0.1:$port/readyz"
  echo "$1$2 http://127.0.0.1:$port (log $dir/$1$2.log)"
  if [ "$1" = api ]; then FLOWCORE_API_URLS="${FLOWCORE_API_URLS:-}${FLOWCORE_API_URLS:+ }http://127.0.0.1:$port"; fi
}
FLOWCORE_API_URLS=
for i in $(seq 1 "$apis"); do start api "$i"; done
for i in $(seq 1 "$workers"); do start worker "$i"; done
echo "database $name, Redis prefix $name; API key \$FLOWCORE_ADMIN_KEY; Ctrl-C stops everything"
if [ -n "${FLOWCORE_TOPOLOGY_READY:-}" ]; then
  # For scripts: everything is up; run the given command (FLOWCORE_API_URLS holds the api
  # processes' addresses), then stop.
  FLOWCORE_API_URLS=$FLOWCORE_API_URLS bash -c "$FLOWCORE_TOPOLOGY_READY"
else
  wait
fi
