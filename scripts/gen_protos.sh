#!/usr/bin/env bash
# Regenerates the Python stubs of protos/ into stagemesh/v1/ (committed; tests check they are fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/stagemesh/v1/*.proto
touch stagemesh/v1/__init__.py
