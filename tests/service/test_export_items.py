"""ExportItems over real gRPC: pages in upload order, resume tokens, features, split filter, tenants."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from tests.conftest import ServerThread, make_settings, synthetic_items
from tests.service.test_security import write_keys


def _export(c: Client, pool: str, **kw: object) -> list[pb.ExportItemsResponse]:
    req = pb.ExportItemsRequest(pool_id=pool, **kw)  # type: ignore[arg-type]
    return list(c.stub.ExportItems(req, timeout=30, metadata=c._metadata))


def test_export_items_pages_features_split_and_resume(server: ServerThread, client: Client) -> None:
    items, _ = synthetic_items(23, 4, seed=0)
    held = [{**it, "item_id": f"h{i}", "split": "HELDOUT", "heldout_preference": "B"} for i, it in
            enumerate(synthetic_items(3, 4, seed=1)[0])]
    client.create_pool("ex", feature_source="CLIENT", feature_dim=4)
    client.upload_items("ex", items[:10])
    client.upload_items("ex", held)
    client.upload_items("ex", items[10:])
    pages = _export(client, "ex", page_size=7)
    assert [len(p.items) for p in pages] == [7, 7, 7, 5]
    assert [p.next_page_token != "" for p in pages] == [True, True, True, False]
    got = [it for p in pages for it in p.items]
    order = [it["item_id"] for it in items[:10]] + [h["item_id"] for h in held] + [it["item_id"] for it in items[10:]]
    assert [it.item_id for it in got] == order
    assert all(len(it.prompt_features) == 0 for it in got)  # features only when asked
    resumed = _export(client, "ex", page_size=7, page_token=pages[1].next_page_token)
    assert [it.item_id for p in resumed for it in p.items] == order[14:]
    with_f = [it for p in _export(client, "ex", include_features=True) for it in p.items]
    by_id = {it["item_id"]: it for it in [*items, *held]}
    for it in with_f:
        for field in ("prompt_features", "completion_a_features", "completion_b_features"):
            np.testing.assert_allclose(list(getattr(it, field)), by_id[it.item_id][field], rtol=1e-6)
    heldout = [it for p in _export(client, "ex", split=pb.SPLIT_HELDOUT) for it in p.items]
    assert [it.item_id for it in heldout] == ["h0", "h1", "h2"]
    assert all(it.split == pb.SPLIT_HELDOUT and it.heldout_preference == pb.PREFERENCE_B for it in heldout)
    pool_only = [it for p in _export(client, "ex", split=pb.SPLIT_POOL) for it in p.items]
    assert len(pool_only) == 23
    for bad in ({"page_size": 5001}, {"page_size": -1}, {"page_token": "garbage!"}):
        with pytest.raises(grpc.RpcError) as err:
            _export(client, "ex", **bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _export(client, "missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_export_items_is_tenant_scoped(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, [("k-a", "key-a", "a", "admin"), ("k-b", "key-b", "b", "reader")])
    srv = ServerThread(make_settings(tmp_path / "data", extractor="", api_keys_file=str(keys)))
    try:
        with Client(srv.target, api_key="key-a") as a, Client(srv.target, api_key="key-b") as b:
            a.create_pool("mine", feature_source="CLIENT", feature_dim=4)
            a.upload_items("mine", synthetic_items(5, 4, seed=2)[0])
            assert sum(len(p.items) for p in _export(a, "mine")) == 5
            with pytest.raises(grpc.RpcError) as err:  # a reader of another tenant: NOT_FOUND, not the items
                _export(b, "mine")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()

