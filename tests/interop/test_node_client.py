"""A Node.js client (@grpc/grpc-js + proto-loader, no generated code) speaks the balpm API to a real server."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerThread

NODE_DIR = Path(__file__).resolve().parent / "node"
STAMP = NODE_DIR / "node_modules" / ".balpm-lock-sha256"
NPM_CI_TIMEOUT_S = 300.0
CLIENT_TIMEOUT_S = 180.0


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialise `npm ci` across concurrent test processes (xdist workers, parallel jobs)."""
    with open(Path(tempfile.gettempdir()) / "balpm-interop-npm.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_node_modules() -> None:
    """Run `npm ci` unless node_modules already matches package-lock.json (stamp of its sha256)."""
    want = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    with _install_lock():
        if STAMP.exists() and STAMP.read_text() == want:
            return
        proc = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"npm ci failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        STAMP.write_text(want)


@pytest.fixture(scope="module")
def node_client_ready() -> None:
    """Skip without node/npm; otherwise install the locked npm dependencies once per module."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Node.js interop test needs {' and '.join(missing)} on PATH")
    _ensure_node_modules()


def _run_node_client(target: str, pool_id: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["node", str(NODE_DIR / "client.js"), "--target", target, "--pool", pool_id, "--deadline-ms", "60000"],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"node client printed nothing (rc {proc.returncode}); stderr:\n{proc.stderr[-4000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], f"node client failed: {json.dumps(summary, indent=2)}\n{proc.stderr}"
    return summary


def test_node_client_runs_create_upload_label_acquire_and_decodes_rich_errors(
    node_client_ready: None, server: ServerThread
) -> None:
    summary = _run_node_client(server.target, "node-interop")

    assert summary["create_pool"] == {
        "pool_id": "node-interop",
        "state": "STATE_READY",
        "feature_source": "FEATURE_SOURCE_CLIENT",
        "feature_dim": 4,
        "ensemble_size": 2,
    }
    # Client-streamed upload: 12 valid items in two chunks, one wrong-dimension item rejected per item.
    assert summary["upload"]["accepted_count"] == 12
    assert summary["upload"]["item_count"] == 12
    assert summary["upload"]["rejections"] == [
        {"id": "node-bad", "field": "items[12].prompt_features", "reason": "WRONG_DIMENSION"}
    ]
    assert summary["ingest"] == {"stored_count": 3, "duplicate_count": 0, "label_count": 3}
    assert summary["ingest_replay"] == {"stored_count": 0, "duplicate_count": 3, "label_count": 3}

    acquired = summary["acquire"]["item_ids"]
    assert len(acquired) == 4 and len(set(acquired)) == 4
    assert not {"node-0", "node-1", "node-2"} & set(acquired), "labelled items must not be acquired"
    assert summary["acquire"]["ranks"] == [0, 1, 2, 3]
    assert summary["acquire"]["strategy"] == "STRATEGY_BALPM"
    assert summary["acquire"]["has_lease_expire_time"]

    # Server streaming with page_size 2 over 3 labels.
    assert summary["export"] == {"pages": 2, "label_ids": ["node-l0", "node-l1", "node-l2"]}

    err = summary["missing_pool_error"]
    assert err["grpc_code_name"] == "NOT_FOUND" and err["status_code"] == 5
    assert err["reason"] == "POOL_NOT_FOUND"
    assert err["domain"] == "balpm.dev"
    assert [v["field"] for v in err["field_violations"]] == ["pool_id"]
    assert summary["deleted"] is True


def test_node_client_reports_failure_as_nonzero_exit_with_json(node_client_ready: None) -> None:
    """Nothing listens on the target: the client must fail fast, say where, and exit non-zero."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client connects
    proc = subprocess.run(
        ["node", str(NODE_DIR / "client.js"), "--target", f"127.0.0.1:{port}", "--deadline-ms", "3000"],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1
    assert summary["ok"] is False and summary["step"] == "CreatePool"
    assert summary["grpc_code"] == 14  # UNAVAILABLE
