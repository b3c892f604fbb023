#!/usr/bin/env bash
# Creates .venv (if missing) and installs balpm (the SDK) and balpm-server with the dev tools.
# torch is installed first as the pinned CPU build so the resolver never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c 'import torch' 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
# Two packages: the thin SDK `balpm` (client/) first, then `balpm-server` (depends on it).
python -m pip install --quiet -e "./client[sim,label-studio]"
python -m pip install --quiet -e ".[dev]"
echo "installed into $(pwd)/.venv"
