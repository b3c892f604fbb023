"""A real Label Studio (own venv, SQLite, loopback, free port) for the bridge's end-to-end test.

The venv comes from `.ci/labelstudio_venv.sh` (`<repo>/.cache/labelstudio-venv`, or
`BALPM_LABELSTUDIO_VENV`); without it the tests skip. The script also leaves a migrated data dir
template, which each test copies so Label Studio starts in seconds instead of migrating SQLite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("BALPM_LABELSTUDIO_VENV") or REPO_ROOT / ".cache" / "labelstudio-venv")
TEMPLATE = LS_VENV / "balpm-template-data"
START_TIMEOUT_S = 600.0  # a fresh (un-templated) data dir migrates SQLite first: minutes on 2 cores
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LabelStudio:
    """A running Label Studio instance."""

    url: str
    token: str
    username: str
    log_path: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _authorized(url: str, token: str) -> bool:
    req = urllib.request.Request(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def label_studio(tmp_path: Path) -> Iterator[LabelStudio]:
    """Start Label Studio on 127.0.0.1 with a temp data dir and a non-interactive admin user; stop it after."""
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        pytest.skip(f"Label Studio venv absent ({LS_VENV}); create it with .ci/labelstudio_venv.sh")
    data_dir = tmp_path / "ls-data"
    creds = {"username": "balpm-e2e@example.com", "password": "balpm-e2e-password", "token": "balpm0e2e0token0fresh"}
    if (TEMPLATE / "balpm-credentials.json").exists():
        shutil.copytree(TEMPLATE, data_dir)
        creds = json.loads((TEMPLATE / "balpm-credentials.json").read_text())
    else:
        data_dir.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": creds["username"],
        "LABEL_STUDIO_PASSWORD": creds["password"],
        "LABEL_STUDIO_USER_TOKEN": creds["token"],
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        # Lets Label Studio call a webhook on 127.0.0.1 (blocked by default as SSRF).
        "SSRF_PROTECTION_ENABLED": "false",
    }
    log_path = tmp_path / "label-studio.log"
    cmd = [str(exe), "start", "--internal-host", "127.0.0.1", "--port", str(port), "--no-browser"]
    cmd.append("--enable-legacy-api-token")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _authorized(url, creds["token"]):
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield LabelStudio(url=url, token=creds["token"], username=creds["username"], log_path=log_path)
    finally:
        # Our own process group (start_new_session): the CLI may fork a server child.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
