"""ExportItems against a real server: pages in upload order, a resumable token, stored fields and
features, the split filter, tenant isolation and request validation.

The calls go through the generated stub (not the SDK), so these tests pin the wire API.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_settings
from tests.service.test_security import write_keys

DIM = 6
N_POOL, N_HELDOUT = 17, 6
Metadata = tuple[tuple[str, str], ...]


def _item(i: int, rng: np.random.Generator, *, heldout: bool = False, apl: bool = False) -> pb.Item:
    it = pb.Item(
        item_id=f"{'ho' if heldout else 'it'}-{i}",
        prompt=f"prompt {i}",
        completion_a=f"a {i}",
        completion_b=f"b {i}",
        prompt_features=rng.normal(size=DIM).tolist(),
        completion_a_features=rng.normal(size=DIM).tolist(),
        completion_b_features=rng.normal(size=DIM).tolist(),
        split=pb.SPLIT_HELDOUT if heldout else pb.SPLIT_POOL,
    )
    if heldout:
        it.heldout_preference = pb.PREFERENCE_A if i % 2 else pb.PREFERENCE_B
    if apl:
        it.apl_scores.CopyFrom(pb.AplScores(logp_policy_a=-1.5, logp_policy_b=-2.25, logp_ref_a=-1.0,
                                            logp_ref_b=-3.0, predictive_entropy=0.75))
    return it


def _upload(stub: pb_grpc.BalpmServiceStub, pool: str, items: list[pb.Item], md: Metadata = ()) -> None:
    def requests() -> Iterator[pb.UploadItemsRequest]:
        yield pb.UploadItemsRequest(header=pb.UploadHeader(pool_id=pool))
        for start in range(0, len(items), 7):
            yield pb.UploadItemsRequest(chunk=pb.ItemChunk(items=items[start : start + 7]))

    out = stub.UploadItems(requests(), metadata=md, timeout=60)
    assert (out.accepted_count, len(out.rejections)) == (len(items), 0), out.rejections


def _pool(stub: pb_grpc.BalpmServiceStub, pool: str, md: Metadata = (), seed: int = 0) -> list[pb.Item]:
    """A client-feature pool of pool and held-out items, interleaved; returns them in upload order."""
    stub.CreatePool(
        pb.CreatePoolRequest(
            pool_id=pool,
            settings=pb.PoolSettings(feature_source=pb.FEATURE_SOURCE_CLIENT, feature_dim=DIM),
        ),
        metadata=md,
        timeout=30,
    )
    rng = np.random.default_rng(seed)
    items: list[pb.Item] = []
    for i in range(N_POOL):
        items.append(_item(i, rng, apl=i == 3))
        if i < N_HELDOUT:
            items.append(_item(i, rng, heldout=True))
    _upload(stub, pool, items, md)
    return items


def _export(stub: pb_grpc.BalpmServiceStub, md: Metadata = (), **request: Any) -> list[pb.ExportItemsResponse]:
    return list(stub.ExportItems(pb.ExportItemsRequest(**request), metadata=md, timeout=60))


def _failure(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, first field violation) of a failed call."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    st = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert st is not None
    reason = field = ""
    for d in st.details:
        ei, br = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(ei):
            reason = ei.reason
        elif d.Unpack(br) and br.field_violations:
            field = br.field_violations[0].field
    return err.code(), reason, field  # type: ignore[attr-defined]


def _texts(it: pb.Item) -> tuple[str, str, str, str]:
    return it.item_id, it.prompt, it.completion_a, it.completion_b


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.BalpmServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.BalpmServiceStub(ch)


def test_export_items_pages_in_upload_order_and_resumes_from_a_token(stub: pb_grpc.BalpmServiceStub) -> None:
    items = _pool(stub, "ex")
    pages = _export(stub, pool_id="ex", page_size=5)
    assert [len(p.items) for p in pages] == [5, 5, 5, 5, 3]
    assert all(p.next_page_token for p in pages[:-1]) and pages[-1].next_page_token == ""
    got = [it for p in pages for it in p.items]
    assert [_texts(it) for it in got] == [_texts(it) for it in items]
    # Resuming after page 2 yields exactly the rest, page by page.
    rest = _export(stub, pool_id="ex", page_size=5, page_token=pages[1].next_page_token)
    assert [it.item_id for p in rest for it in p.items] == [it.item_id for it in items[10:]]
    # The default page size (500 without features) holds the whole pool in one message.
    (whole,) = _export(stub, pool_id="ex")
    assert [it.item_id for it in whole.items] == [it.item_id for it in items] and whole.next_page_token == ""
    # An exact multiple of the page size ends without an empty page.
    assert [len(p.items) for p in _export(stub, pool_id="ex", page_size=23)] == [23]


def test_export_items_sends_stored_fields_and_client_features(stub: pb_grpc.BalpmServiceStub) -> None:
    items = _pool(stub, "feat", seed=4)
    plain = [it for p in _export(stub, pool_id="feat", page_size=4) for it in p.items]
    assert all(not it.prompt_features and not it.completion_a_features for it in plain)
    full = [it for p in _export(stub, pool_id="feat", page_size=4, include_features=True) for it in p.items]
    assert len(full) == len(items)
    for sent, back in zip(items, full, strict=True):
        assert back.item_id == sent.item_id
        # Features travel as float32 both ways; what comes back is what was stored.
        for name in ("prompt_features", "completion_a_features", "completion_b_features"):
            np.testing.assert_array_equal(
                np.asarray(getattr(back, name), dtype=np.float32), np.asarray(getattr(sent, name), dtype=np.float32)
            )
        assert back.split == sent.split
        assert back.heldout_preference == sent.heldout_preference
        assert back.HasField("apl_scores") == sent.HasField("apl_scores")
        if sent.HasField("apl_scores"):
            assert back.apl_scores == sent.apl_scores
            assert back.apl_scores.HasField("predictive_entropy")


def test_export_items_filters_by_split(stub: pb_grpc.BalpmServiceStub) -> None:
    items = _pool(stub, "split")
    heldout = [it for p in _export(stub, pool_id="split", page_size=4, split=pb.SPLIT_HELDOUT) for it in p.items]
    assert [it.item_id for it in heldout] == [it.item_id for it in items if it.split == pb.SPLIT_HELDOUT]
    assert all(it.heldout_preference in (pb.PREFERENCE_A, pb.PREFERENCE_B) for it in heldout)
    pages = _export(stub, pool_id="split", page_size=4, split=pb.SPLIT_POOL)
    pooled = [it for p in pages for it in p.items]
    assert [it.item_id for it in pooled] == [it.item_id for it in items if it.split == pb.SPLIT_POOL]
    assert [len(p.items) for p in pages] == [4, 4, 4, 4, 1]
    assert all(it.heldout_preference == pb.PREFERENCE_UNSPECIFIED for it in pooled)
    # A token of a filtered export resumes the filtered export.
    rest = _export(stub, pool_id="split", page_size=4, split=pb.SPLIT_POOL, page_token=pages[0].next_page_token)
    assert [it.item_id for p in rest for it in p.items] == [it.item_id for it in pooled[4:]]


def test_export_items_of_an_empty_pool_sends_no_items(stub: pb_grpc.BalpmServiceStub) -> None:
    stub.CreatePool(pb.CreatePoolRequest(
        pool_id="empty", settings=pb.PoolSettings(feature_source=pb.FEATURE_SOURCE_CLIENT, feature_dim=DIM)))
    assert [it for p in _export(stub, pool_id="empty") for it in p.items] == []


def test_export_items_rejects_bad_page_size_token_and_split(stub: pb_grpc.BalpmServiceStub) -> None:
    _pool(stub, "bad")
    for size in (-1, 5001):
        code, _, field = _failure(lambda size=size: _export(stub, pool_id="bad", page_size=size))
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    assert len(_export(stub, pool_id="bad", page_size=5000)) == 1
    code, _, field = _failure(lambda: _export(stub, pool_id="bad", page_token="not a token!"))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    code, reason, field = _failure(lambda: _export(stub, pool_id="bad", split=7))
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_ENUM", "split")
    code, reason, field = _failure(lambda: _export(stub, pool_id="missing"))
    assert (code, reason, field) == (grpc.StatusCode.NOT_FOUND, "POOL_NOT_FOUND", "pool_id")


def test_export_items_is_tenant_scoped_and_open_to_readers(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, [("a-w", "key-a-writer", "acme", "writer"), ("a-r", "key-a-reader", "acme", "reader"),
                      ("b-w", "key-b-writer", "globex", "writer")])
    srv = ServerThread(make_settings(tmp_path / "data", extractor="", api_keys_file=str(keys)))
    a_writer: Metadata = (("authorization", "Bearer key-a-writer"),)
    a_reader: Metadata = (("authorization", "Bearer key-a-reader"),)
    b_writer: Metadata = (("authorization", "Bearer key-b-writer"),)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.BalpmServiceStub(ch)
            items = _pool(stub, "shared-name", a_writer)
            # Another tenant does not see acme's pool, not even through a token acme was given.
            token = _export(stub, a_writer, pool_id="shared-name", page_size=3)[0].next_page_token
            for request in ({"pool_id": "shared-name"}, {"pool_id": "shared-name", "page_token": token}):
                code, reason, _ = _failure(lambda request=request: _export(stub, b_writer, **request))
                assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "POOL_NOT_FOUND")
            # globex's own pool of the same name exports only globex's items.
            stub.CreatePool(pb.CreatePoolRequest(pool_id="shared-name", settings=pb.PoolSettings(
                feature_source=pb.FEATURE_SOURCE_CLIENT, feature_dim=DIM)), metadata=b_writer)
            _upload(stub, "shared-name", [_item(99, np.random.default_rng(9))], b_writer)
            assert [it.item_id for p in _export(stub, b_writer, pool_id="shared-name") for it in p.items] == ["it-99"]
            # The reader role may export (a read), and sees acme's items.
            got = [it.item_id for p in _export(stub, a_reader, pool_id="shared-name") for it in p.items]
            assert got == [it.item_id for it in items]
            code, _, _ = _failure(lambda: _export(stub, (), pool_id="shared-name"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


def test_export_items_sends_server_features_only_once_extracted(server: ServerThread,
                                                               stub: pb_grpc.BalpmServiceStub) -> None:
    extractor = server.running.service.extractor
    assert extractor is not None
    real_embed = extractor.embed
    started, release = threading.Event(), threading.Event()

    async def held_embed(texts: list[str]) -> np.ndarray:
        started.set()
        await asyncio.to_thread(release.wait, 60)
        return await real_embed(texts)

    extractor.embed = held_embed  # type: ignore[method-assign]
    try:
        stub.CreatePool(pb.CreatePoolRequest(pool_id="srv", settings=pb.PoolSettings(ensemble_size=2)), timeout=120)
        texts = [pb.Item(item_id=f"t{i}", prompt=f"prompt {i}", completion_a="yes", completion_b="no")
                 for i in range(4)]
        _upload(stub, "srv", texts)
        assert started.wait(60)
        pending = [it for p in _export(stub, pool_id="srv", include_features=True) for it in p.items]
        assert [it.item_id for it in pending] == ["t0", "t1", "t2", "t3"]
        assert all(not it.prompt_features for it in pending)  # still being featurised
    finally:
        release.set()
        extractor.embed = real_embed  # type: ignore[method-assign]
    deadline = time.monotonic() + 120
    while (pool := stub.GetPool(pb.GetPoolRequest(pool_id="srv")).pool).state != pb.Pool.STATE_READY:
        assert time.monotonic() < deadline, "timed out waiting for the pool to be featurised"
        time.sleep(0.05)
    done = [it for p in _export(stub, pool_id="srv", include_features=True) for it in p.items]
    dim = pool.settings.feature_dim
    assert dim > 0 and all(len(it.prompt_features) == len(it.completion_b_features) == dim for it in done)
    assert not np.allclose(done[0].completion_a_features, 0.0)
