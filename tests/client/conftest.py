"""Fixtures of the client tests: one real `balpm-server` subprocess for the module, and a fake server.

The real server runs in its own process so that the asyncio client's event loop is the only one in
the test process (grpc.aio and a server loop in a thread of the same process do not mix well).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from tests.procserver import ProcServer


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcServer]:
    """A real balpm-server (embedded extractor, loaded on first use) shared by the client tests."""
    srv = ProcServer(tmp_path_factory.mktemp("client-server") / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.terminate()


@pytest.fixture
def pool_id() -> str:
    """A pool id no other test uses (the real server is shared)."""
    return f"t-{uuid.uuid4().hex[:12]}"


class FakeServicer(pb_grpc.BalpmServiceServicer):
    """A scripted BalpmService: GetPool answers from `get_pool` (a callable), AcquireBatch from `acquire`,
    ExportItems from `export_pages`.

    `calls` counts the calls (attempts) per method, as the server sees them.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.tokens_seen: list[str] = []  # ExportItems requests' page_token, in order
        #: ExportItems pages by page_token: token -> (item ids, next_page_token).
        self.export_pages: dict[str, tuple[list[str], str]] = {}
        #: Tokens whose page is followed (once) by an UNAVAILABLE break of the stream.
        self.break_after: set[str] = set()
        self.lock = threading.Lock()
        self.get_pool: Callable[[int], pb.Pool | grpc.StatusCode] = lambda n: pb.Pool(pool_id="p")
        self.acquire: Callable[[int], pb.AcquireBatchResponse | grpc.StatusCode] = (
            lambda n: pb.AcquireBatchResponse()
        )

    def ExportItems(  # noqa: N802
        self, request: pb.ExportItemsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportItemsResponse]:
        self._count("ExportItems")
        self.tokens_seen.append(request.page_token)
        token = request.page_token
        while True:
            ids, next_token = self.export_pages[token]
            yield pb.ExportItemsResponse(items=[pb.Item(item_id=i) for i in ids], next_page_token=next_token)
            if token in self.break_after:
                self.break_after.discard(token)
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted break")
            if not next_token:
                return
            token = next_token

    def _count(self, method: str) -> int:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            return self.calls[method]

    def _answer(self, value: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(value, grpc.StatusCode):
            context.abort(value, f"scripted {value.name}")
        return value

    def GetPool(self, request: pb.GetPoolRequest, context: grpc.ServicerContext) -> pb.GetPoolResponse:  # noqa: N802
        pool = self._answer(self.get_pool(self._count("GetPool")), context)
        return pb.GetPoolResponse(pool=pool)

    def AcquireBatch(  # noqa: N802
        self, request: pb.AcquireBatchRequest, context: grpc.ServicerContext
    ) -> pb.AcquireBatchResponse:
        return self._answer(self.acquire(self._count("AcquireBatch")), context)  # type: ignore[no-any-return]


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeServicer]]:
    """(target, servicer) of a scripted in-process server."""
    servicer = FakeServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_BalpmServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def featurizing_pool(pool_id: str = "p") -> pb.Pool:
    """A pool that stays FEATURIZING (3 of 10 items done)."""
    return pb.Pool(pool_id=pool_id, state=pb.Pool.STATE_FEATURIZING, item_count=10, featurized_count=3)


