#!/usr/bin/env bash
# Creates .venv with stagemesh installed (idempotent). torch==2.13.0 goes first, so that the CPU
# build from the local wheel satisfies every later `torch` requirement and no CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q torch==2.13.0
# deepspeed's setup.py imports torch, so it must build against the torch installed above.
python -m pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
