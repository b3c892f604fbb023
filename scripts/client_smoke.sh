#!/usr/bin/env bash
# CI: build both wheels, install `balpm` alone into a fresh virtualenv, and drive a running
# balpm-server (from .venv) with that venv's CLI and AsyncClient. Prints the client venv's
# size and `import balpm` time (targets: under 60 MB, under 0.3 s).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

python -m build --wheel --no-isolation --outdir "$WORK/dist" client > "$WORK/build-client.log"
python -m build --wheel --no-isolation --outdir "$WORK/dist" . > "$WORK/build-server.log"
ls "$WORK/dist"

CV="$WORK/client-venv"
python -m venv --without-pip "$CV"
python -m pip --python "$CV/bin/python" install --quiet "$WORK"/dist/balpm-0*.whl
echo "client venv: $(du -sm "$CV" | cut -f1) MB (balpm alone, no pip)"
"$CV/bin/python" -c 'import time; t = time.perf_counter(); import balpm; print(f"import balpm: {time.perf_counter() - t:.3f} s")'

PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
T="127.0.0.1:$PORT"
balpm-server --host 127.0.0.1 --port "$PORT" --data-dir "$WORK/data" --metrics-port -1 > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
python - "$WORK/items.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(30):
        f.write(json.dumps({"id": f"s{i}", "prompt": f"question {i} about topic {i % 7}",
                            "chosen": f"a helpful answer {i}", "rejected": f"no {i}"}) + "\n")
PY
B="$CV/bin/balpm"
for _ in $(seq 60); do "$B" --server "$T" pools list > /dev/null 2>&1 && break; sleep 1; done
"$B" --server "$T" pools create smoke                # global option before the subcommand
"$B" upload smoke "$WORK/items.jsonl" --wait --server "$T"   # ... and after it
"$B" pools get smoke --server "$T" -o json | "$CV/bin/python" -c 'import json, sys; p = json.load(sys.stdin); assert int(p["item_count"]) == 30, p'
"$B" --server "$T" pools list
"$B" --server "$T" acquire smoke --batch-size 4 --strategy ENTROPY_ONLY --annotator cli > /dev/null
"$CV/bin/python" scripts/client_smoke.py "$T"
echo "client smoke: ok"
