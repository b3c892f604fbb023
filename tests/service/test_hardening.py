"""Regression tests for the defects an outside client found (issue 15), one per defect, over real gRPC.

Each test is named after its defect and failed on main at d37bd69. The disk-full,
oversized-reply and kNN-convention defects have their own files
(`test_disk_faults.py`, `test_acquire_reply_size.py`, `tests/unit/test_acquisition.py`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balpm import Client
from balpm.errors import BalpmError
from balpm_server.domain.service import PoolService
from balpm_server.storage import FeatureStore
from balpm_server.storage.sqlite_store import SCHEMA_V1, SCHEMA_VERSION, settings_to_json
from tests.conftest import ServerThread, make_settings, synthetic_items
from tests.service.test_security import write_keys

A_KEY, B_KEY = "key-tenant-a", "key-tenant-b"
SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 5}


def expect(code: grpc.StatusCode, fn: Callable[[], Any]) -> BalpmError:
    """Call `fn`, assert it fails with `code`, return the error."""
    with pytest.raises(BalpmError) as info:
        fn()
    assert info.value.code == code, info.value
    return info.value


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[ServerThread]:
    """A server with two writer tenants, "a" and "b"."""
    keys = tmp_path / "keys.json"
    write_keys(keys, [("k-a", A_KEY, "a", "admin"), ("k-b", B_KEY, "b", "admin")])
    srv = ServerThread(make_settings(tmp_path / "data", extractor="", api_keys_file=str(keys)))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[ServerThread]:
    """A server without authentication or extractor."""
    srv = ServerThread(make_settings(tmp_path / "data", extractor=""))
    try:
        yield srv
    finally:
        srv.stop()


def _items(n: int, dim: int = 8, seed: int = 0, prefix: str = "it") -> list[dict[str, Any]]:
    items, _ = synthetic_items(n, dim, seed)
    for i, it in enumerate(items):
        it["item_id"] = f"{prefix}-{i}"
    return items


def _paused_upload(client: Client, pool: str, first: list[dict[str, Any]], later: list[dict[str, Any]]) -> tuple[
    threading.Event, threading.Event, ThreadPoolExecutor, Any
]:
    """Start an upload that sends `first` as one chunk, then waits for `go` before sending `later`."""
    sent_first, go = threading.Event(), threading.Event()

    def items() -> Iterator[dict[str, Any]]:
        yield from first
        sent_first.set()
        assert go.wait(30)
        yield from later

    pool_ex = ThreadPoolExecutor(1)
    fut = pool_ex.submit(client.upload_items, pool, items(), chunk_size=len(first))
    return sent_first, go, pool_ex, fut


def _wait(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- item 1: a stream is bound to the pool instance it started on --------------------------


def test_upload_stream_cannot_write_into_another_tenants_recreated_pool(tenants: ServerThread) -> None:
    with Client(tenants.target, api_key=A_KEY) as a, Client(tenants.target, api_key=B_KEY) as b:
        a.create_pool("squat", feature_source="CLIENT", feature_dim=8)
        _sent, go, ex, fut = _paused_upload(a, "squat", _items(5, prefix="a1"), _items(5, prefix="a2"))
        _wait(lambda: a.get_pool("squat").item_count == 5)
        a.delete_pool("squat")
        b.create_pool("squat", feature_source="CLIENT", feature_dim=8)
        b.upload_items("squat", _items(10, prefix="b"))
        go.set()
        with pytest.raises(BalpmError) as err:
            fut.result(30)
        ex.shutdown()
        assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.reason == "POOL_NOT_FOUND"
        assert b.get_pool("squat").item_count == 10
        exported = {lb.label.item_id for lb in b.export_labels("squat")}
        assert exported == set()
        # B labels its own items without INTERNAL.
        b.ingest_labels("squat", [{"label_id": "l0", "item_id": "b-0", "preference": "A"}])
        expect(
            grpc.StatusCode.NOT_FOUND,
            lambda: b.ingest_labels("squat", [{"label_id": "l1", "item_id": "a2-0", "preference": "A"}]),
        )


def test_deleting_own_pool_mid_upload_is_not_found_not_internal(plain: ServerThread) -> None:
    with Client(plain.target) as c:
        c.create_pool("mine", feature_source="CLIENT", feature_dim=8)
        _sent, go, ex, fut = _paused_upload(c, "mine", _items(5, prefix="x"), _items(5, prefix="y"))
        _wait(lambda: c.get_pool("mine").item_count == 5)
        c.delete_pool("mine")
        c.create_pool("mine", feature_source="CLIENT", feature_dim=8)  # same tenant, same name: a new instance
        go.set()
        with pytest.raises(BalpmError) as err:
            fut.result(30)
        ex.shutdown()
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert c.get_pool("mine").item_count == 0


# ---- item 2: pool ids and operations are scoped per tenant ---------------------------------


def test_pool_ids_are_scoped_per_tenant(tenants: ServerThread) -> None:
    with Client(tenants.target, api_key=A_KEY) as a, Client(tenants.target, api_key=B_KEY) as b:
        a.create_pool("hh", feature_source="CLIENT", feature_dim=8)
        b.create_pool("hh", feature_source="CLIENT", feature_dim=8)  # not ALREADY_EXISTS
        a.upload_items("hh", _items(12, prefix="a"))
        b.upload_items("hh", _items(7, prefix="b"))
        assert (a.get_pool("hh").item_count, b.get_pool("hh").item_count) == (12, 7)
        assert [p.pool_id for p in a.list_pools()] == ["hh"] == [p.pool_id for p in b.list_pools()]
        got = a.acquire("hh", batch_size=3, strategy="RANDOM", annotator_id="ann")
        assert all(it.item.item_id.startswith("a-") for it in got.items)
        a.delete_pool("hh")
        assert b.get_pool("hh").item_count == 7
        got = b.acquire("hh", batch_size=7, strategy="RANDOM", annotator_id="ann")  # none leased by A's call
        assert len(got.items) == 7


def test_training_of_a_deleted_pool_never_shows_its_operation_to_another_tenant(tenants: ServerThread) -> None:
    items, truth = synthetic_items(40, 8, seed=1)
    labels = [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in range(20)]
    with Client(tenants.target, api_key=A_KEY) as a, Client(tenants.target, api_key=B_KEY) as b:
        for c in (a, b):
            c.create_pool("hh", feature_source="CLIENT", feature_dim=8, ensemble_size=2, hidden_sizes=[16],
                          epochs=10_000)
        a.upload_items("hh", items)
        a.ingest_labels("hh", labels)
        op_a = a.update_posterior("hh", wait=False)
        a.delete_pool("hh")  # training is still running: its cancel flag is set
        b.upload_items("hh", items)
        b.ingest_labels("hh", labels)
        op_b = b.update_posterior("hh", wait=False, epochs=2)  # not ABORTED with A's operation id
        assert op_b.operation_id != op_a.operation_id
        expect(grpc.StatusCode.NOT_FOUND, lambda: b.get_operation(op_a.operation_id))
        b.wait_operation(op_b.operation_id, timeout_s=60)


def test_data_dir_from_before_tenant_scoping_keeps_working(tmp_path: Path) -> None:
    """A v1 data dir (global pool ids, folders named by pool id) is migrated in place."""
    from balpm_server.domain.models import FeatureSource, PoolSettings

    data = tmp_path / "data"
    (data / "pools" / "old").mkdir(parents=True)
    conn = sqlite3.connect(data / "balpm.sqlite3", isolation_level=None)
    conn.executescript(SCHEMA_V1)
    settings = PoolSettings(feature_source=FeatureSource.CLIENT, feature_dim=4, ensemble_size=2, hidden_sizes=(8,))
    conn.execute(
        "INSERT INTO pools (pool_id, tenant, settings_json, state, extractor, create_time, next_row)"
        " VALUES ('old', 'default', ?, 'READY', '', 0, 6)",
        (settings_to_json(settings),),
    )
    rng = np.random.default_rng(0)
    FeatureStore(data / "pools" / "old" / "features", 4).write_rows(
        np.arange(6), {k: rng.normal(size=(6, 4)).astype(np.float32) for k in ("prompt", "a", "b")}
    )
    for r in range(6):
        conn.execute(
            "INSERT INTO items (pool_id, item_id, row, split, prompt, completion_a, completion_b, featurized,"
            " digest) VALUES ('old', ?, ?, 1, 'p', 'a', 'b', 1, 'd')",
            (f"it-{r}", r),
        )
    conn.execute(
        "INSERT INTO labels (pool_id, label_id, item_id, preference, annotator_id, create_time)"
        " VALUES ('old', 'l0', 'it-0', 1, 'ann', 0)"
    )
    conn.close()
    srv = ServerThread(make_settings(data, extractor=""))
    try:
        with Client(srv.target) as c:
            pool = c.get_pool("old")
            assert (pool.item_count, pool.label_count) == (6, 1)
            assert [lb.label.label_id for lb in c.export_labels("old")] == ["l0"]
            got = c.acquire("old", batch_size=5, strategy="RANDOM", annotator_id="ann2")
            assert len(got.items) == 5
            c.ingest_labels("old", [{"label_id": "l1", "item_id": "it-1", "preference": "B"}])
            c.create_pool("new", feature_source="CLIENT", feature_dim=4)
    finally:
        srv.stop()
    conn = sqlite3.connect(data / "balpm.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT name FROM pools WHERE pool_id = 'old'").fetchone()[0] == "old"
    conn.close()
    srv = ServerThread(make_settings(data, extractor=""))  # a second start is a no-op upgrade
    try:
        with Client(srv.target) as c:
            assert c.get_pool("old").label_count == 2
            assert sorted(p.pool_id for p in c.list_pools()) == ["new", "old"]
    finally:
        srv.stop()


# ---- item 3: huge finite features are rejected at upload ------------------------------------


@pytest.mark.parametrize("bad", [1e19, 1e20, 1e38, -1e20])
def test_huge_finite_features_are_rejected_not_poisoning_the_pool(plain: ServerThread, bad: float) -> None:
    with Client(plain.target) as c:
        c.create_pool("big", feature_source="CLIENT", feature_dim=1, knn_k=1, **SMALL)
        items = [
            {"item_id": f"i{x}", "prompt": "p", "completion_a": "a", "completion_b": "b",
             "prompt_features": [float(x)], "completion_a_features": [0.0], "completion_b_features": [1.0]}
            for x in range(5)
        ]
        items[2]["prompt_features"] = [bad]
        out = c.upload_items("big", items)
        assert out.accepted_count == 4
        (rej,) = out.rejections
        assert (rej.index, rej.field, rej.reason) == (2, "items[2].prompt_features", "FEATURE_OUT_OF_RANGE")
        for strategy in ("BALPM", "ENTROPY_ONLY"):
            got = c.acquire("big", batch_size=2, strategy=strategy, annotator_id=f"ann-{strategy}")
            assert len(got.items) == 2


def test_features_at_the_documented_bound_do_not_overflow(plain: ServerThread) -> None:
    dim = 64
    rng = np.random.default_rng(0)
    with Client(plain.target) as c:
        c.create_pool("edge", feature_source="CLIENT", feature_dim=dim, knn_k=3, **SMALL)
        items = []
        for i in range(20):
            p = rng.choice([-1e6, 1e6, 0.0], size=dim)
            items.append({"item_id": f"e{i}", "prompt": "p", "completion_a": "a", "completion_b": "b",
                          "prompt_features": p.tolist(), "completion_a_features": p.tolist(),
                          "completion_b_features": (-p).tolist()})
        assert c.upload_items("edge", items).accepted_count == 20
        for strategy in ("BALPM", "ENTROPY_ONLY"):
            got = c.acquire("edge", batch_size=4, strategy=strategy, annotator_id=f"ann-{strategy}")
            assert len(got.items) == 4 and all(np.isfinite(it.scores.total) for it in got.items)


# ---- item 5: max_pools_per_tenant is atomic --------------------------------------------------


def test_max_pools_per_tenant_holds_under_concurrent_server_feature_creates(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", max_pools_per_tenant=5))  # embedded extractor
    try:
        with Client(srv.target, timeout_s=120) as c:

            def create(i: int) -> str:
                try:
                    c.create_pool(f"p{i}")
                    return "ok"
                except BalpmError as e:
                    return e.reason

            with ThreadPoolExecutor(20) as ex:
                outcomes = list(ex.map(create, range(20)))
            assert outcomes.count("ok") == 5, outcomes
            assert set(outcomes) == {"ok", "MAX_POOLS_PER_TENANT"}
            assert len(list(c.list_pools())) == 5
    finally:
        srv.stop()


# ---- item 7: Predict is not a CPU sink -------------------------------------------------------


def test_predict_caps_ad_hoc_texts_and_counts_them_per_tenant(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", max_predict_texts=4, max_extractions_per_tenant=1))
    svc: PoolService = srv.running.service
    try:
        with Client(srv.target, timeout_s=120) as c:
            c.create_pool("txt", **SMALL)
            texts = [{"item_id": f"t{i}", "prompt": f"prompt {i}", "completion_a": "yes", "completion_b": "no"}
                     for i in range(12)]
            c.upload_items("txt", texts)
            c.wait_pool_ready("txt", timeout_s=120)
            c.ingest_labels("txt", [{"label_id": f"l{i}", "item_id": f"t{i}", "preference": "AB"[i % 2]}
                                    for i in range(6)])
            c.update_posterior("txt", wait=True)
            adhoc = [{"item_id": f"q{i}", "prompt": f"q {i}", "completion_a": "x", "completion_b": "y"}
                     for i in range(5)]
            err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.predict("txt", items=adhoc))
            assert (err.reason, err.field) == ("TOO_MANY_TEXTS", "items")
            assert len(c.predict("txt", items=adhoc[:4]).predictions) == 4
            # A second concurrent ad-hoc call of the same tenant fails fast while the first extracts.
            started, release = threading.Event(), threading.Event()
            inner = svc.extractor
            assert inner is not None
            real_embed = inner.embed

            async def slow_embed(batch: list[str]) -> np.ndarray:
                started.set()
                await asyncio.to_thread(release.wait, 30)
                return await real_embed(batch)

            inner.embed = slow_embed  # type: ignore[method-assign]
            try:
                with ThreadPoolExecutor(1) as ex:
                    first = ex.submit(c.predict, "txt", items=adhoc[:2])
                    assert started.wait(30)
                    err = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: c.predict("txt", items=adhoc[:1]))
                    assert err.reason == "EXTRACTION_BUSY"
                    assert len(c.predict("txt", item_ids=["t0"]).predictions) == 1  # stored items never wait
                    release.set()
                    assert len(first.result(60).predictions) == 2
            finally:
                inner.embed = real_embed  # type: ignore[method-assign]
            assert len(c.predict("txt", items=adhoc[:1]).predictions) == 1
    finally:
        srv.stop()


# ---- item 8: ids are matched in full -----------------------------------------------------------


def test_ids_ending_in_a_newline_are_invalid(plain: ServerThread) -> None:
    with Client(plain.target) as c:
        err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.create_pool("abc\n", feature_source="CLIENT",
                                                                              feature_dim=8))
        assert err.field == "pool_id"
        c.create_pool("abc", feature_source="CLIENT", feature_dim=8)
        items = _items(3)
        items[1]["item_id"] = "it-1\n"
        out = c.upload_items("abc", items)
        assert [(r.index, r.field) for r in out.rejections] == [(1, "items[1].item_id")]
        err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.ingest_labels(
            "abc", [{"label_id": "l\n", "item_id": "it-0", "preference": "A"}]))
        assert err.field == "labels[0].label_id"
        err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.acquire("abc", batch_size=1,
                                                                          annotator_id="ann\n"))
        assert err.field == "annotator_id"


# ---- item 9: validation gaps ---------------------------------------------------------------------


def test_release_items_accepts_at_most_10000_ids(plain: ServerThread) -> None:
    with Client(plain.target) as c:
        c.create_pool("rel", feature_source="CLIENT", feature_dim=8)
        err = expect(grpc.StatusCode.INVALID_ARGUMENT,
                     lambda: c.release_items("rel", [f"i{k}" for k in range(10_001)]))
        assert (err.field, err.reason) == ("item_ids", "TOO_MANY_IDS")
        assert c.release_items("rel", [f"i{k}" for k in range(10_000)]) == 0


@pytest.mark.parametrize("entropy", [float("nan"), float("-inf"), float("inf"), -0.5])
def test_update_item_scores_rejects_bad_predictive_entropy(plain: ServerThread, entropy: float) -> None:
    with Client(plain.target) as c:
        c.create_pool("apl", feature_source="CLIENT", feature_dim=8)
        c.upload_items("apl", _items(2))
        scores = {"logp_policy_a": -1.0, "logp_policy_b": -2.0, "logp_ref_a": -1.5, "logp_ref_b": -1.5}
        err = expect(grpc.StatusCode.INVALID_ARGUMENT,
                     lambda: c.update_item_scores("apl", {"it-0": {**scores, "predictive_entropy": entropy}}))
        assert err.field == "scores[0].apl_scores.predictive_entropy"
        assert c.update_item_scores("apl", {"it-0": {**scores, "predictive_entropy": 0.3}}) == 1


def test_upload_conflict_rejection_names_the_item_index_and_field(plain: ServerThread) -> None:
    with Client(plain.target) as c:
        c.create_pool("cf", feature_source="CLIENT", feature_dim=8)
        c.upload_items("cf", _items(3))
        again = _items(3)
        again[0]["item_id"], again[1]["item_id"] = "fresh-0", "fresh-1"
        again[2]["prompt"] = "changed"  # it-2 with other content
        out = c.upload_items("cf", [_items(1, seed=9, prefix="new")[0], *again], chunk_size=10)
        (rej,) = out.rejections
        assert (rej.index, rej.field, rej.reason, rej.id) == (3, "items[3].item_id", "CONFLICT", "it-2")


def test_predict_with_item_ids_and_items_is_invalid(plain: ServerThread) -> None:
    items, truth = synthetic_items(20, 8, seed=2)
    with Client(plain.target) as c:
        c.create_pool("both", feature_source="CLIENT", feature_dim=8, **SMALL)
        c.upload_items("both", items)
        c.ingest_labels("both", [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                 for i in range(8)])
        c.update_posterior("both", wait=True)
        err = expect(grpc.StatusCode.INVALID_ARGUMENT,
                     lambda: c.predict("both", item_ids=["it-0"], items=[items[1]]))
        assert (err.field, err.reason) == ("items", "ITEM_IDS_AND_ITEMS")


# ---- item 10: background training is tracked, cancelled, awaited and evicted ----------------


def test_training_tasks_are_awaited_at_shutdown_and_evicted_when_done(tmp_path: Path) -> None:
    items, truth = synthetic_items(60, 8, seed=3)
    labels = [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in range(30)]
    data = tmp_path / "data"
    srv = ServerThread(make_settings(data, extractor=""))
    svc: PoolService = srv.running.service
    stopped = False
    try:
        with Client(srv.target) as c:
            c.create_pool("t", feature_source="CLIENT", feature_dim=8, ensemble_size=2, hidden_sizes=[16])
            c.upload_items("t", items)
            c.ingest_labels("t", labels)
            done = c.update_posterior("t", wait=True, epochs=3)
            # Finished operations leave memory; storage still answers.
            assert not svc._operations and not svc._op_events and not svc._cancel_flags
            assert not svc._training_tasks
            assert c.get_operation(done.operation_id).done
            long_op = c.update_posterior("t", wait=False, epochs=10_000)
            _wait(lambda: bool(svc._training_tasks))
        srv.stop()
        stopped = True
        assert not svc._training_tasks
    finally:
        if not stopped:
            srv.stop()
    conn = sqlite3.connect(data / "balpm.sqlite3")
    ((state, _body),) = conn.execute(
        "SELECT state, body_json FROM operations WHERE operation_id = ?", (long_op.operation_id,)
    ).fetchall()
    conn.close()
    assert state in ("CANCELLED", "FAILED"), state  # recorded before the store closed, not left RUNNING


# ---- item 11: label commits never stall the event loop -----------------------------------------


def test_ingest_labels_fsync_does_not_block_other_rpcs(plain: ServerThread) -> None:
    svc: PoolService = plain.running.service
    with Client(plain.target) as c:
        c.create_pool("fs", feature_source="CLIENT", feature_dim=8)
        c.upload_items("fs", _items(4))
        in_commit, release = threading.Event(), threading.Event()
        real = svc.store.insert_labels

        def blocking_insert(*args: Any, **kwargs: Any) -> None:
            in_commit.set()  # stands in for a slow fsync
            assert release.wait(30)
            real(*args, **kwargs)

        svc.store.insert_labels = blocking_insert  # type: ignore[method-assign]
        try:
            with ThreadPoolExecutor(1) as ex:
                fut = ex.submit(c.ingest_labels, "fs", [{"label_id": "l0", "item_id": "it-0", "preference": "A"}])
                assert in_commit.wait(30)
                with grpc.insecure_channel(plain.target) as ch:
                    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                assert c.get_pool("fs").label_count == 0  # not acknowledged, not visible yet
                assert not fut.done()
                release.set()
                assert fut.result(30).stored_count == 1
        finally:
            svc.store.insert_labels = real  # type: ignore[method-assign]
            release.set()
        assert c.get_pool("fs").label_count == 1


# ---- item 12: a replay is always a replay ------------------------------------------------------


def test_request_id_retry_waiting_behind_its_original_is_a_replay(plain: ServerThread) -> None:
    svc: PoolService = plain.running.service
    with Client(plain.target) as c:
        c.create_pool("rq", feature_source="CLIENT", feature_dim=8)
        c.upload_items("rq", _items(4))
        rt = next(r for k, r in svc._runtimes.items() if k.split("+")[0] == "rq")
        plain.call(rt.lock.acquire())  # an AcquireBatch holding the pool lock, say
        labels = [{"label_id": "l0", "item_id": "it-0", "preference": "A"},
                  {"label_id": "l1", "item_id": "it-1", "preference": "B"}]
        try:
            with ThreadPoolExecutor(2) as ex:
                calls = [ex.submit(c.ingest_labels, "rq", labels, request_id="req-1") for _ in range(2)]
                _wait(lambda: len(getattr(rt.lock, "_waiters", None) or ()) == 2)
                plain.loop.call_soon_threadsafe(rt.lock.release)
                results = sorted((r.stored_count, r.duplicate_count) for r in (f.result(30) for f in calls))
        finally:
            if rt.lock.locked():
                plain.loop.call_soon_threadsafe(rt.lock.release)
        assert results == [(0, 2), (2, 0)]
        assert c.get_pool("rq").label_count == 2


# ---- item 13: held-out items are never kNN neighbours ----------------------------------------


def test_heldout_items_do_not_count_as_knn_neighbours(plain: ServerThread) -> None:
    def item(iid: str, x: float, **extra: Any) -> dict[str, Any]:
        return {"item_id": iid, "prompt": "p", "completion_a": "a", "completion_b": "b", "prompt_features": [x],
                "completion_a_features": [0.0], "completion_b_features": [1.0], **extra}

    def batch(c: Client, annotator: str) -> list[str]:
        got = c.acquire("ho", batch_size=5, strategy="ENTROPY_ONLY", annotator_id=annotator, beta=1.0)
        ids = [it.item.item_id for it in got.items]
        c.release_items("ho", ids, annotator)
        return ids

    with Client(plain.target) as c:
        c.create_pool("ho", feature_source="CLIENT", feature_dim=1, knn_k=1, beta=1.0, **SMALL)
        c.upload_items("ho", [item(str(i), x) for i, x in enumerate([0.0, 1.0, 3.0, 7.0, 15.0])])
        assert batch(c, "first") == ["4", "3", "2", "0", "1"]
        c.upload_items("ho", [item("held", 0.1, split="HELDOUT", heldout_preference="A")])
        assert batch(c, "second") == ["4", "3", "2", "0", "1"]
