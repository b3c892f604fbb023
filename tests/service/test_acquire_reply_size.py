"""AcquireBatch replies too large to send lease nothing (issue 15, item 4).

gRPC refuses to send (or the client to receive) a reply over its message limit; the
items it would have carried must not stay leased to an annotator who never saw them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from balpm import Client
from balpm.errors import ResourceExhaustedError
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from balpm_server.settings import Settings
from balpm_server.transport.servicer import BalpmServicer
from tests.conftest import ServerThread, make_settings, synthetic_items

SMALL = {"ensemble_size": 2, "hidden_sizes": [8], "epochs": 5}
DEFAULT_CLIENT_MAX_RECEIVE = 4 * 1024 * 1024  # gRPC's default max_receive_message_length


def _pool(client: Client, pool_id: str, n: int, text_chars: int, **settings: Any) -> list[str]:
    """A client-feature pool of `n` items whose three texts have `text_chars` characters each."""
    items, _ = synthetic_items(n, 4, seed=3)
    for it in items:
        for key in ("prompt", "completion_a", "completion_b"):
            it[key] = (it[key] + " ").ljust(text_chars, key[0])
    client.create_pool(pool_id, feature_source="CLIENT", feature_dim=4, **SMALL, **settings)
    up = client.upload_items(pool_id, items, chunk_size=4)
    assert up.accepted_count == n, up
    return [it["item_id"] for it in items]


def _too_large(fn: Any) -> ResourceExhaustedError:
    with pytest.raises(ResourceExhaustedError) as info:
        fn()
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "REPLY_TOO_LARGE", err
    assert err.field == "batch_size", err
    return err


def test_acquire_reply_too_large_leases_nothing(server: ServerThread, client: Client) -> None:
    # 20 items of 3 x 100,000 characters: ~6 MB, over the default 4 MiB reply cap.
    ids = _pool(client, "big", 20, 100_000)
    err = _too_large(lambda: client.acquire("big", batch_size=20, strategy="RANDOM", annotator_id="alice"))
    md = err.metadata
    assert int(md["limit_bytes"]) == DEFAULT_CLIENT_MAX_RECEIVE and int(md["reply_bytes"]) > int(md["limit_bytes"])
    assert md["batch_size"] == "20"
    suggested = int(md["suggested_batch_size"])
    assert 1 <= suggested < 20
    assert f"lower batch_size to {suggested}" in err.message and "max_acquire_reply_bytes" in err.message
    assert client.get_pool("big").leased_item_count == 0  # nothing durable stayed leased

    # The suggested size fits, and reaches a client with gRPC's default 4 MiB receive limit.
    with grpc.insecure_channel(server.target) as ch:
        first = pb_grpc.BalpmServiceStub(ch).AcquireBatch(
            pb.AcquireBatchRequest(
                pool_id="big", batch_size=suggested, strategy=pb.STRATEGY_RANDOM, annotator_id="bob"
            ),
            timeout=60,
        )
    assert len(first.items) == suggested and first.ByteSize() <= DEFAULT_CLIENT_MAX_RECEIVE
    # ... and everything alice was refused is free for someone else right away.
    rest = client.acquire("big", batch_size=20 - suggested, strategy="RANDOM", annotator_id="bob")
    got = [a.item.item_id for a in (*first.items, *rest.items)]
    assert sorted(got) == sorted(ids)
    assert client.get_pool("big").leased_item_count == 20


def test_acquire_reply_too_large_releases_only_its_own_leases(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", extractor="", max_acquire_reply_bytes=100_000))
    try:
        with Client(srv.target, timeout_s=60) as c:
            # labels_per_item=2: bob's leases do not keep the items from a second annotator.
            ids = _pool(c, "pair", 12, 5_000, labels_per_item=2)  # ~15 KB per item
            bob = [
                a.item.item_id
                for n in (6, 6)
                for a in c.acquire("pair", batch_size=n, strategy="RANDOM", annotator_id="bob").items
            ]
            assert sorted(bob) == sorted(ids)
            # The anonymous caller ("" = "anonymous") is refused; bob keeps every lease.
            err = _too_large(lambda: c.acquire("pair", batch_size=12, strategy="RANDOM"))
            assert err.metadata["limit_bytes"] == "100000" and "max_acquire_reply_bytes" in err.message
            suggested = int(err.metadata["suggested_batch_size"])
            assert 1 <= suggested < 12
            assert c.get_pool("pair").leased_item_count == 12
            assert c.release_items("pair", ids, annotator_id="anonymous") == 0  # none were left behind
            assert c.release_items("pair", ids, annotator_id="bob") == 12
            assert len(c.acquire("pair", batch_size=suggested, strategy="RANDOM").items) == suggested

            # One item bigger than the whole cap: the error says so instead of suggesting 0.
            _pool(c, "huge", 1, 50_000)
            err = _too_large(lambda: c.acquire("huge", batch_size=1, strategy="RANDOM", annotator_id="carol"))
            assert err.metadata["suggested_batch_size"] == "0"
            assert "BALPM_MAX_ACQUIRE_REPLY_BYTES" in err.message
            assert c.get_pool("huge").leased_item_count == 0
    finally:
        srv.stop()


def test_acquire_reply_cap_never_exceeds_max_message_bytes() -> None:
    def cap(**overrides: Any) -> tuple[int | None, str]:
        settings = Settings(**overrides)
        s = BalpmServicer(cast(Any, SimpleNamespace(settings=settings)))
        return s.max_acquire_reply_bytes, s.acquire_reply_cap_setting

    assert cap() == (DEFAULT_CLIENT_MAX_RECEIVE, "max_acquire_reply_bytes")
    assert cap(max_message_bytes=1 << 20) == (1 << 20, "max_message_bytes")
    assert cap(max_acquire_reply_bytes=0) == (64 << 20, "max_message_bytes")
    assert cap(max_acquire_reply_bytes=0, max_message_bytes=-1) == (None, "")


def test_acquire_cancelled_during_lease_write_leases_nothing(server: ServerThread, client: Client) -> None:
    """A client deadline that expires while the leases are being written takes them back, in SQLite too."""
    ids = _pool(client, "slow", 6, 10)
    commit = server.running.service._leases  # the group commit of lease writes
    flush, written = commit._flush, threading.Event()

    def slow_flush(requests: Any) -> Any:
        time.sleep(1.0)
        try:
            return flush(requests)
        finally:
            written.set()

    commit._flush_now, commit._flush = None, slow_flush
    try:
        with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as info:
            pb_grpc.BalpmServiceStub(ch).AcquireBatch(
                pb.AcquireBatchRequest(pool_id="slow", batch_size=6, strategy=pb.STRATEGY_RANDOM, annotator_id="al"),
                timeout=0.3,
            )
        assert cast(grpc.Call, info.value).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert written.wait(10)
    finally:
        commit._flush_now, commit._flush = server.running.service.store.lease_and_read_nowait, flush
    server.call(asyncio.sleep(0.2))  # let the server finish handling the cancelled call
    assert client.get_pool("slow").leased_item_count == 0
    got = client.acquire("slow", batch_size=6, strategy="RANDOM", annotator_id="bo")
    assert sorted(a.item.item_id for a in got.items) == sorted(ids)
