"""AsyncClient drives a real server through a pool's whole loop; it has the same methods as Client."""

from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any

import numpy as np
import pytest

from balpm import AsyncClient, Client
from balpm.errors import InvalidInputError, NotFoundError, UnimplementedError, WaitTimeoutError
from balpm.v1 import balpm_pb2 as pb
from tests.client.conftest import FakeServicer, featurizing_pool
from tests.conftest import synthetic_items
from tests.procserver import ProcServer

SMALL = {"ensemble_size": 3, "hidden_sizes": [32], "epochs": 40}
DIM = 8


def _labels(batch: pb.AcquireBatchResponse, truth: dict[str, str], tag: str) -> list[dict[str, Any]]:
    return [
        {"label_id": f"{tag}-{a.item.item_id}", "item_id": a.item.item_id, "preference": truth[a.item.item_id],
         "annotator_id": "ann"}
        for a in batch.items
    ]


async def _loop(target: str, pool_id: str) -> dict[str, Any]:
    everything, truth = synthetic_items(160, DIM, seed=3)
    items, heldout = everything[:120], everything[120:]
    for it in heldout:
        it["split"] = "HELDOUT"
        it["heldout_preference"] = truth[it["item_id"]]
    seen: dict[str, Any] = {"sent": [], "epochs": [], "polls": 0}
    async with AsyncClient(target, timeout_s=60) as c:
        await c.wait_ready(30)
        created = await c.create_pool(pool_id, feature_source="CLIENT", feature_dim=DIM, **SMALL)
        assert created.pool_id == pool_id and created.settings.ensemble_size == 3
        up = await c.upload_items(pool_id, items + heldout, chunk_size=50, progress=seen["sent"].append)
        assert (up.accepted_count, up.duplicate_count, up.rejections) == (160, 0, [])
        with pytest.raises(InvalidInputError) as bad_item:  # the call is cancelled; its own error is raised
            await c.upload_items(pool_id, [*items[:4], {"prompt": "no id"}], chunk_size=2)
        assert bad_item.value.field == "items[4].item_id"

        def poll(pool: pb.Pool) -> None:
            seen["polls"] += 1

        ready = await c.wait_pool_ready(pool_id, timeout_s=60, progress=poll)
        assert ready.item_count == 120 and ready.heldout_count == 40
        assert pool_id in [p.pool_id async for p in c.list_pools(page_size=1)]

        first = await c.acquire(pool_id, batch_size=30, strategy="random", seed=1, annotator_id="ann")
        stored = await c.ingest_labels(pool_id, _labels(first, truth, "r0"), request_id="req-0")
        assert stored.stored_count == 30
        op = await c.update_posterior(pool_id, seed=0, progress=lambda o: seen["epochs"].append(o.progress.epoch))
        assert op.state == pb.Operation.STATE_SUCCEEDED and op.result.posterior_version == 1
        again = await c.get_operation(op.operation_id)
        assert again.done

        second = await c.acquire(pool_id, batch_size=20, strategy="BALPM", seed=2, annotator_id="ann")
        assert second.posterior_version == 1
        assert {a.item.item_id for a in second.items}.isdisjoint({a.item.item_id for a in first.items})
        await c.ingest_labels(pool_id, _labels(second, truth, "r1"))
        await c.update_posterior(pool_id, seed=1)

        pred = await c.predict(pool_id, item_ids=["it-0", "it-1"])
        assert [p.item_id for p in pred.predictions] == ["it-0", "it-1"]
        assert all(0.0 < p.prob_a < 1.0 for p in pred.predictions)
        ev = await c.evaluate(pool_id)
        assert ev.count == 40 and ev.posterior_version == 2 and math.isfinite(ev.log_likelihood)

        exported = [lb async for lb in c.export_labels(pool_id, page_size=7)]
        assert len(exported) == 50 and {lb.label.annotator_id for lb in exported} == {"ann"}

        leased = await c.acquire(pool_id, batch_size=5, strategy="RANDOM", annotator_id="bob")
        assert await c.release_items(pool_id, [a.item.item_id for a in leased.items], annotator_id="bob") == 5

        try:
            seen["items"] = [it async for it in c.export_items(pool_id, include_features=True, page_size=16)]
            seen["heldout"] = [it async for it in c.export_items(pool_id, split="HELDOUT")]
        except UnimplementedError:
            seen["items"] = None

        with pytest.raises(NotFoundError) as nf:
            await c.get_pool(pool_id + "-nope")
        assert nf.value.field == "pool_id"
        with pytest.raises(InvalidInputError) as bad:
            await c.acquire(pool_id, batch_size=1, strategy="NOT_A_STRATEGY")
        assert bad.value.field == "strategy"
        await c.delete_pool(pool_id)
        with pytest.raises(NotFoundError):
            await c.get_pool(pool_id)
    seen["items_sent"] = everything
    return seen


def test_async_client_drives_a_pools_whole_loop(real_server: ProcServer, pool_id: str) -> None:
    seen = asyncio.run(_loop(real_server.target, pool_id))
    assert seen["sent"] == [50, 100, 150, 160]
    assert seen["polls"] >= 1 and seen["epochs"] and max(seen["epochs"]) >= 1
    if seen["items"] is None:
        pytest.skip("the server answers ExportItems with UNIMPLEMENTED (not implemented there yet)")
    items = seen["items"]
    sent = seen["items_sent"]
    assert [it.item_id for it in items] == [it["item_id"] for it in sent]  # upload order
    for got, want in zip(items, sent, strict=True):
        for key in ("prompt_features", "completion_a_features", "completion_b_features"):
            np.testing.assert_allclose(list(getattr(got, key)), np.float32(want[key]), rtol=1e-6)
    assert [it.item_id for it in seen["heldout"]] == [it["item_id"] for it in sent[120:]]
    assert all(it.split == pb.SPLIT_HELDOUT and not it.prompt_features for it in seen["heldout"])


def test_async_wait_pool_ready_times_out_with_the_sdk_error(fake_server: tuple[str, FakeServicer]) -> None:
    target, servicer = fake_server
    servicer.get_pool = lambda n: featurizing_pool("slow")

    async def wait() -> None:
        async with AsyncClient(target) as c:
            await c.wait_pool_ready("slow", timeout_s=0.3, poll_s=0.05)

    with pytest.raises(WaitTimeoutError) as e:
        asyncio.run(wait())
    assert not isinstance(e.value, TimeoutError)  # the SDK's error, not the builtin one
    assert e.value.reason == "WAIT_TIMEOUT" and e.value.metadata["featurized_count"] == "3"


def _public(cls: type) -> dict[str, Any]:
    return {n: m for n, m in vars(cls).items() if not n.startswith("_") and callable(m)}


def test_async_client_has_the_same_methods_arguments_and_docs_as_client() -> None:
    sync, aio = _public(Client), _public(AsyncClient)
    assert set(sync) == set(aio)
    iterating = {"list_pools", "export_labels", "export_items"}
    for name, method in sync.items():
        twin = aio[name]
        s, a = inspect.signature(method), inspect.signature(twin)
        assert list(s.parameters.values()) == list(a.parameters.values()), name
        if name in iterating:
            assert str(s.return_annotation).startswith("Iterator[")
            assert a.return_annotation == "Async" + s.return_annotation, name
        elif name != "close":
            assert a.return_annotation == s.return_annotation, name
            assert inspect.iscoroutinefunction(twin), name
        assert twin.__doc__ == method.__doc__ and method.__doc__, name
    assert inspect.iscoroutinefunction(AsyncClient.close)
