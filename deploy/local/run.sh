#!/usr/bin/env bash
# One flowcore process of the production topology, on this machine: the shared settings of
# deploy/flowcore.env, overridden by the caller's environment (addresses, secrets, role).
#
#   FLOWCORE_ROLE=worker DATABASE_URL=postgres://... REDIS_URL=redis://... \
#     S3_ENDPOINT_URL=http://127.0.0.1:9000 deploy/local/run.sh [flowcore binary]
#
# It ends by exec'ing the binary, so its pid is the server's (the fault tests kill -9 it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-${FLOWCORE_BIN:-flowcore}}
while IFS='=' read -r name value; do
  case "$name" in '' | \#*) continue ;; esac
  # The caller's value wins; empty counts as set.
  if [ -z "${!name+x}" ]; then export "$name=$value"; fi
done < "$here/flowcore.env"
exec "$bin" serve
