#!/usr/bin/env bash
# Set up (venv, test extras, redis-server) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest tests "$@"
