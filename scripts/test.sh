#!/usr/bin/env bash
# Set up (venv, test extras, redis-server) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real Redis for the prefix-index tests; docker-compose validates compose/ (no engine needed);
# promtool (Debian's prometheus package) checks compose/prometheus.yml with Prometheus' own parser.
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing="$missing docker-compose"
if [ -n "$missing" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing) >/dev/null
fi
bash scripts/setup.sh test
. .venv/bin/activate
export STAGEMESH_REQUIRE_PROMTOOL=1  # installed above: its test must run, not skip
python -m pytest tests "$@"
