#!/usr/bin/env bash
# Set up (venv, test extras, redis-server) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real Redis for the prefix-index tests; docker-compose validates compose/ (no engine needed).
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing="$missing docker-compose"
if [ -n "$missing" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null
fi
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest tests "$@"
