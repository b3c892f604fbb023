"""A real `balpm-server` in a subprocess, for crash, restart and shutdown tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcServer:
    """Starts `python -m balpm_server.server` on a fixed port and data dir; restartable.

    Args:
        data_dir: The server's data dir (kept across restarts).
        extra_env: Extra BALPM_* variables.
    """

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        from tests.backends import BACKEND_OVERRIDES  # the current test's storage backend

        backend = {"BALPM_" + k.upper(): v for k, v in BACKEND_OVERRIDES.items()}
        self.env = {**os.environ, "BALPM_LOG_JSON": "true", "HF_HUB_OFFLINE": "1", **backend, **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout_s: float = 90.0) -> None:
        """Start and wait until health reports SERVING."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balpm_server.server", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--metrics-port", "-1"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service="balpm.v1.BalpmService"), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server not serving after {timeout_s} s; log: {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the server (no cleanup runs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)
