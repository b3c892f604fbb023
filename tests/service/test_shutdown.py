"""Graceful shutdown of a real `balpm-server` process: SIGTERM drains in-flight RPCs, then exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from tests.conftest import synthetic_items
from tests.waiting import wait_until

SERVICE = "balpm.v1.BalpmService"


def server_binary() -> str:
    """The `balpm-server` console script of this environment."""
    exe = Path(sys.executable).parent / "balpm-server"
    if not exe.exists():
        pytest.skip("balpm-server is not installed in this environment")
    return str(exe)


class Proc:
    """`balpm-server` on a free port (read from its "listening on" line), metrics on another free port."""

    def __init__(self, data_dir: Path, grace_s: float) -> None:
        env = {**os.environ, "BALPM_EXTRACTOR": "", "BALPM_LOG_JSON": "true", "HF_HUB_OFFLINE": "1"}
        self.log_path = data_dir.parent / "server.log"
        self.proc = subprocess.Popen(
            [
                server_binary(),
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                "--metrics-port",
                "0",
                "--metrics-host",
                "127.0.0.1",
                "--shutdown-grace-s",
                str(grace_s),
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "wb"),  # noqa: SIM115 - handed to the child
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on [^:]+:(\d+), metrics on [^:]+:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"unexpected first line {line!r}; log: {self.log_path.read_text()[-2000:]}")
        self.target = f"127.0.0.1:{match.group(1)}"
        self.metrics_url = f"http://127.0.0.1:{match.group(2)}/metrics"

    def in_flight(self, method: str) -> float:
        """The server's `balpm_rpc_in_flight` gauge for `method` (RPCs its handlers are inside now)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        pattern = rf'^balpm_rpc_in_flight\{{[^}}]*method="{method}"[^}}]*\}} (\S+)$'
        return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))

    def wait_in_flight(self, method: str) -> None:
        """Wait until the server is inside a `method` handler (the RPC is in flight on the server)."""
        wait_until(lambda: self.in_flight(method) >= 1, 30, f"a {method} RPC to be in flight on the server")

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def proc_factory(tmp_path: Path) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.close()


def _slow_upload(target: str, pool_id: str, items: list[dict[str, object]], release: threading.Event) -> Future[object]:
    """Start an UploadItems whose chunk is only sent once `release` is set."""
    from balpm.client import item_message

    def messages() -> Iterator[pb.UploadItemsRequest]:
        yield pb.UploadItemsRequest(header=pb.UploadHeader(pool_id=pool_id))
        release.wait(60)
        yield pb.UploadItemsRequest(chunk=pb.ItemChunk(items=[item_message(it) for it in items]))

    def run() -> object:
        with grpc.insecure_channel(target) as ch:
            return pb_grpc.BalpmServiceStub(ch).UploadItems(messages(), timeout=60)

    return ThreadPoolExecutor(1).submit(run)


def _watch_until_not_serving(target: str, started: threading.Event) -> Future[bool]:
    def run() -> bool:
        with grpc.insecure_channel(target) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
            for resp in stream:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    started.set()
                elif resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    stream.cancel()
                    return True
        return False

    return ThreadPoolExecutor(1).submit(run)


def test_sigterm_drains_in_flight_rpc(tmp_path: Path, proc_factory: list[Proc]) -> None:
    srv = Proc(tmp_path / "data", grace_s=15.0)
    proc_factory.append(srv)
    items, _ = synthetic_items(25, 4, seed=0)
    with Client(srv.target) as c:
        c.create_pool("drain", feature_source="CLIENT", feature_dim=4)
    watching = threading.Event()
    health_flip = _watch_until_not_serving(srv.target, watching)
    assert watching.wait(10)
    release = threading.Event()
    upload = _slow_upload(srv.target, "drain", items, release)
    srv.wait_in_flight("UploadItems")
    assert not upload.done()

    srv.proc.send_signal(signal.SIGTERM)
    assert health_flip.result(10), "health did not turn NOT_SERVING on SIGTERM"
    # New calls are refused while the in-flight one drains.
    with grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.BalpmServiceStub(ch).ListPools(pb.ListPoolsRequest(), timeout=2)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert srv.proc.poll() is None, "the server exited before draining"
    release.set()
    resp = upload.result(20)
    assert resp.accepted_count == 25  # type: ignore[attr-defined]
    assert srv.proc.wait(20) == 0
    log = srv.log()
    assert "draining in-flight RPCs" in log and '"message": "stopped"' in log
    assert '"method": "UploadItems", "code": "OK"' in log


def test_sigterm_cancels_rpcs_still_running_after_grace(tmp_path: Path, proc_factory: list[Proc]) -> None:
    srv = Proc(tmp_path / "data", grace_s=1.0)
    proc_factory.append(srv)
    with Client(srv.target) as c:
        c.create_pool("stuck", feature_source="CLIENT", feature_dim=4)
    release = threading.Event()
    upload = _slow_upload(srv.target, "stuck", synthetic_items(3, 4, seed=0)[0], release)
    srv.wait_in_flight("UploadItems")
    srv.proc.send_signal(signal.SIGTERM)
    try:
        # The upload waits up to 60 s for `release`: exiting at all means the 1 s grace cut it off.
        wait_until(lambda: srv.proc.poll() is not None, 20, "the server to exit though an RPC is still stuck")
        assert srv.proc.returncode == 0
        with pytest.raises(grpc.RpcError) as info:
            upload.result(10)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        release.set()
