#!/usr/bin/env bash
# The main job on a fresh machine: set up, write the demo checkpoint, serve it on a 2-stage
# pipeline, generate from a prompt, stop the mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL="${MODEL:-.demo-model}"
PORT="${PORT:-50051}"
[ -f "$MODEL/config.json" ] || stagemesh demo-model "$MODEL"
LOG="$(mktemp)"
stagemesh up --model "$MODEL" --stages "${STAGES:-2}" --port "$PORT" > "$LOG" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q ready "$LOG" && break
  kill -0 $UP 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
grep ready "$LOG"
stagemesh generate --target "127.0.0.1:$PORT" --prompt "${PROMPT:-The gateway cuts the batch into}" --max-tokens 24
stagemesh generate --target "127.0.0.1:$PORT" --prompt "${PROMPT:-The gateway cuts the batch into}" --max-tokens 24 --json
