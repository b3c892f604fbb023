#!/usr/bin/env bash
# Installs everything and runs the whole test suite, every tier (the README's test command; CI runs it too).
# Extra arguments go to pytest: the fast tiers are scripts/test.sh -m unit  or  scripts/test.sh -m "not slow"
# (tiers: tests/conftest.py), e.g. scripts/test.sh -m 'not triton' -k core_loop
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
