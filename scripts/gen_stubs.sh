#!/usr/bin/env bash
# Regenerates the Python stubs of proto/balpm/v1 into client/balpm/v1.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto -I third_party/googleapis \
  --python_out=client --grpc_python_out=client --pyi_out=client \
  proto/balpm/v1/*.proto
touch client/balpm/v1/__init__.py
