"""The default retry policy: in the channel's service config for exactly the idempotent methods."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from balpm import AsyncClient, Client
from balpm.client import RETRY_METHODS, channel_options, service_config
from balpm.errors import UnavailableError, UnimplementedError
from balpm.v1 import balpm_pb2 as pb
from tests.client.conftest import FakeServicer

IDEMPOTENT = {
    "GetPool", "ListPools", "GetOperation", "WatchOperation", "CancelOperation", "ExportLabels", "ExportItems",
    "Predict", "Evaluate", "IngestLabels", "UpdateItemScores", "ExcludeItems", "GetLearningCurve",
}
NOT_RETRIED = {"CreatePool", "DeletePool", "UploadItems", "UpdatePosterior", "AcquireBatch", "ReleaseItems"}


def _config(options: list[tuple[str, object]]) -> dict[str, object]:
    raw = dict(options)["grpc.service_config"]
    assert isinstance(raw, str)
    return json.loads(raw)  # type: ignore[no-any-return]


def test_the_service_config_retries_exactly_the_idempotent_methods() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["BalpmService"].methods}
    assert methods == IDEMPOTENT | NOT_RETRIED  # every RPC is classified
    assert set(RETRY_METHODS) == IDEMPOTENT
    for client in (Client("127.0.0.1:1"), AsyncClient("127.0.0.1:1")):  # the async channel opens on first use
        cfg = _config(client.channel_options)
        (method_config,) = cfg["methodConfig"]  # type: ignore[misc]
        names = {(n["service"], n["method"]) for n in method_config["name"]}
        assert names == {("balpm.v1.BalpmService", m) for m in IDEMPOTENT}
        policy = method_config["retryPolicy"]
        assert 4 <= policy["maxAttempts"] <= 5 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
        assert float(policy["backoffMultiplier"]) > 1 and policy["initialBackoff"].endswith("s")
        assert dict(client.channel_options)["grpc.enable_retries"] == 1
    assert service_config(retry=False) == {}
    assert "grpc.service_config" not in dict(channel_options(retry=False))
    assert dict(channel_options([("grpc.service_config", "{}")]))["grpc.service_config"] == "{}"  # caller's wins


def test_grpc_retries_an_idempotent_call_and_not_acquire(fake_server: tuple[str, FakeServicer]) -> None:
    target, servicer = fake_server
    servicer.get_pool = lambda n: grpc.StatusCode.UNAVAILABLE if n < 3 else pb.Pool(pool_id="p")
    servicer.acquire = lambda n: grpc.StatusCode.UNAVAILABLE
    with Client(target, timeout_s=20) as c:
        assert c.get_pool("p").pool_id == "p"
        assert servicer.calls["GetPool"] == 3  # two UNAVAILABLE answers retried by gRPC
        with pytest.raises(UnavailableError):
            c.acquire("p", batch_size=1)
        assert servicer.calls["AcquireBatch"] == 1  # leases: never replayed


def test_the_async_client_retries_too_and_retry_false_does_not(fake_server: tuple[str, FakeServicer]) -> None:
    target, servicer = fake_server
    servicer.get_pool = lambda n: grpc.StatusCode.UNAVAILABLE if n % 2 else pb.Pool(pool_id="p")

    async def calls() -> None:
        async with AsyncClient(target, timeout_s=20) as c:
            assert (await c.get_pool("p")).pool_id == "p"  # attempt 1 fails, attempt 2 answers
        async with AsyncClient(target, timeout_s=20, retry=False) as c:
            with pytest.raises(UnavailableError):
                await c.get_pool("p")  # attempt 3 fails and is not retried

    asyncio.run(calls())
    assert servicer.calls["GetPool"] == 3


def test_every_call_has_a_deadline(fake_server: tuple[str, FakeServicer]) -> None:
    target, _ = fake_server
    seen: list[float | None] = []
    with Client(target, timeout_s=7) as c:
        original = c._method

        def spy(name: str):  # type: ignore[no-untyped-def]
            method = original(name)

            def call(request, *, timeout=None, metadata=()):  # type: ignore[no-untyped-def]
                seen.append(timeout)
                return method(request, timeout=timeout, metadata=metadata)

            return call

        c._method = spy  # type: ignore[method-assign]
        c.get_pool("p")
        with pytest.raises(UnimplementedError):  # the fake has no Evaluate; only the deadline matters here
            c.evaluate("p")
    assert seen == [7.0, 600.0]


def test_an_export_broken_mid_stream_resumes_after_the_last_page(fake_server: tuple[str, FakeServicer]) -> None:
    target, servicer = fake_server
    servicer.export_pages = {"": (["a", "b"], "t1"), "t1": (["c"], "t2"), "t2": (["d", "e"], "")}
    servicer.break_after = {"t1"}  # the stream breaks once, after the page of token t1
    with Client(target) as c:
        assert [it.item_id for it in c.export_items("p")] == ["a", "b", "c", "d", "e"]  # nothing lost or repeated
    assert servicer.tokens_seen == ["", "t2"]

    async def early_stop() -> list[str]:
        async with AsyncClient(target) as c:
            got = []
            async for it in c.export_items("p", page_size=2):
                got.append(it.item_id)
                if len(got) == 3:
                    break
            return got

    assert asyncio.run(early_stop()) == ["a", "b", "c"]
