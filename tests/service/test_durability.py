"""Durability and leases: SIGKILL crashes, restarts, many concurrent annotators."""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from balpm import Client
from balpm.errors import BalpmError, FailedPreconditionError
from balpm.v1 import balpm_pb2 as pb
from tests.conftest import ServerThread, make_settings, synthetic_items
from tests.procserver import ProcServer
from tests.waiting import wait_until

# Storage paths: every test runs on SQLite and on PostgreSQL + S3 (tests/conftest.py).
pytestmark = pytest.mark.storage_matrix

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 20}
CRASHES = 20  # the slow tier; the fast tiers crash 3 times
WRITERS = 4


@pytest.mark.parametrize("crashes", [3, pytest.param(CRASHES, marks=pytest.mark.slow)])
def test_acknowledged_labels_survive_sigkill_exactly_once(tmp_path: Path, crashes: int) -> None:
    srv = ProcServer(tmp_path / "data")
    srv.start()
    items, _ = synthetic_items(200, 8, seed=0)
    with Client(srv.target) as c:
        c.create_pool("crash", feature_source="CLIENT", feature_dim=8, **SMALL)
        assert c.upload_items("crash", items).accepted_count == 200
    acked: set[str] = set()
    in_flight: dict[str, dict[str, str]] = {}
    lock = threading.Lock()
    rng = random.Random(0)
    crash_rng = random.Random(1)  # where each crash lands: after 2 to 20 more acknowledged batches
    counter = iter(range(10**9))
    totals = Counter()

    def writer(worker: int, stop: threading.Event) -> None:
        with Client(srv.target, timeout_s=5) as c:
            while not stop.is_set():
                with lock:
                    batch = [
                        {"label_id": f"w{worker}-{next(counter)}", "item_id": f"it-{rng.randrange(100)}",
                         "preference": rng.choice("AB"), "annotator_id": f"ann-{worker}"}
                        for _ in range(5)
                    ]
                    for lb in batch:
                        in_flight[lb["label_id"]] = lb
                try:
                    c.ingest_labels("crash", batch)
                except BalpmError:
                    return  # the server died mid-call: these labels stay "in flight"
                with lock:
                    for lb in batch:
                        acked.add(lb["label_id"])
                        in_flight.pop(lb["label_id"], None)

    try:
        for crash in range(crashes):
            stop = threading.Event()
            threads = [threading.Thread(target=writer, args=(w, stop)) for w in range(WRITERS)]
            with lock:
                target = len(acked) + 5 * crash_rng.randint(2, 20)
            for t in threads:
                t.start()

            def acknowledged(target: int = target) -> bool:
                with lock:
                    return len(acked) >= target

            # The other writers are mid-call when the target is reached: the kill lands among them.
            wait_until(acknowledged, 60, f"{target} acknowledged labels before crash {crash}")
            srv.kill()
            stop.set()
            for t in threads:
                t.join(30)
            srv.start()
            with Client(srv.target) as c:
                # Retry what was in flight at the crash: stored or not, it must end up stored once.
                retry = list(in_flight.values())
                if retry:
                    r = c.ingest_labels("crash", retry)
                    totals["retried"] += len(retry)
                    totals["retried_already_stored"] += r.duplicate_count
                    acked.update(in_flight)
                    in_flight.clear()
                exported = [lb.label.label_id for lb in c.export_labels("crash", page_size=997)]
                counts = Counter(exported)
                assert not [k for k, n in counts.items() if n > 1], f"duplicated labels after crash {crash}"
                missing = acked - set(exported)
                assert not missing, f"{len(missing)} acknowledged labels lost after crash {crash}"
                assert c.get_pool("crash").label_count == len(exported)
                batch = c.acquire("crash", batch_size=3, strategy="RANDOM", seed=crash, annotator_id="probe")
                assert len(batch.items) == 3
                c.release_items("crash", [a.item.item_id for a in batch.items], "probe")
        totals["acknowledged"] = len(acked)
        print(f"\ncrash test: {crashes} SIGKILLs, {dict(totals)}")
        assert len(acked) > crashes * 5
    finally:
        srv.kill()


def test_restart_preserves_acquisition(tmp_path: Path) -> None:
    srv = ProcServer(tmp_path / "data")
    srv.start()
    items, truth = synthetic_items(150, 8, seed=1)
    try:
        with Client(srv.target) as c:
            c.create_pool("same", feature_source="CLIENT", feature_dim=8, **SMALL)
            c.upload_items("same", items)
            first = c.acquire("same", batch_size=30, strategy="RANDOM", seed=1, annotator_id="a")
            c.ingest_labels("same", [{"label_id": f"l-{x.item.item_id}", "item_id": x.item.item_id,
                                      "preference": truth[x.item.item_id], "annotator_id": "a"} for x in first.items])
            c.update_posterior("same", seed=3)
            leased = c.acquire("same", batch_size=5, strategy="RANDOM", seed=9, annotator_id="c")
            before = c.acquire("same", batch_size=20, strategy="BALPM", seed=5, annotator_id="b")
            c.release_items("same", [x.item.item_id for x in before.items], "b")
        srv.kill()
        srv.start()
        with Client(srv.target) as c:
            pool = c.get_pool("same")
            assert pool.posterior_version == 1 and pool.label_count == 30 and pool.leased_item_count == 5
            after = c.acquire("same", batch_size=20, strategy="BALPM", seed=5, annotator_id="b")
            assert after.posterior_version == before.posterior_version == 1
            assert [x.item.item_id for x in after.items] == [x.item.item_id for x in before.items]
            for x, y in zip(after.items, before.items, strict=True):
                assert x.scores.total == pytest.approx(y.scores.total, abs=1e-9)
            # The lease taken before the crash still excludes its items.
            assert {x.item.item_id for x in leased.items}.isdisjoint({x.item.item_id for x in after.items})
    finally:
        srv.kill()


def test_training_interrupted_by_a_crash_is_failed_and_can_rerun(tmp_path: Path) -> None:
    srv = ProcServer(tmp_path / "data")
    srv.start()
    items, truth = synthetic_items(200, 8, seed=2)
    try:
        with Client(srv.target) as c:
            c.create_pool("op", feature_source="CLIENT", feature_dim=8, ensemble_size=5,
                          hidden_sizes=[2048, 256], epochs=10_000)
            c.upload_items("op", items)
            c.ingest_labels("op", [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                   for i in range(200)])
            op = c.update_posterior("op", seed=0, wait=False)
            # Kill it mid-training: running, with at least one epoch done (10,000 epochs take minutes).
            def training() -> bool:
                o = c.get_operation(op.operation_id)
                assert not o.done, f"the training ended before the crash: {o}"
                return o.state == pb.Operation.STATE_RUNNING and o.progress.epoch >= 1

            wait_until(training, 60, "the training to be running")
        srv.kill()
        srv.start()
        with Client(srv.target) as c:
            stale = c.get_operation(op.operation_id)
            assert stale.done and stale.error.message.startswith("the server restarted")
            done = c.update_posterior("op", seed=0, epochs=3)
            assert done.result.posterior_version == 1
    finally:
        srv.kill()


def test_32_concurrent_annotators_never_share_an_item_and_expired_leases_return(tmp_path: Path) -> None:
    server = ServerThread(make_settings(tmp_path / "data"))
    try:
        items, _ = synthetic_items(640, 4, seed=3)
        with Client(server.target) as c:
            c.create_pool("many", feature_source="CLIENT", feature_dim=4, knn_k=5, **SMALL)
            c.upload_items("many", items)

        def annotator(worker: int) -> list[str]:
            got: list[str] = []
            with Client(server.target) as c:
                for round_ in range(100):
                    try:
                        batch = c.acquire("many", batch_size=7, strategy="BALPM" if worker % 2 else "RANDOM",
                                          seed=round_, annotator_id=f"ann-{worker}", lease_ttl_s=600)
                    except FailedPreconditionError:
                        # Fewer than 7 left (or none): take the remainder one by one.
                        try:
                            batch = c.acquire("many", batch_size=1, strategy="RANDOM", seed=round_,
                                              annotator_id=f"ann-{worker}", lease_ttl_s=600)
                        except FailedPreconditionError as e:
                            assert e.reason == "POOL_EXHAUSTED"
                            return got
                    got.extend(x.item.item_id for x in batch.items)
            return got

        with ThreadPoolExecutor(32) as pool:
            per_worker = list(pool.map(annotator, range(32)))
        handed = [iid for got in per_worker for iid in got]
        assert len(handed) == 640 and len(set(handed)) == 640, "an item was handed out twice"
        assert sum(1 for got in per_worker if got) > 16

        with Client(server.target) as c:
            c.create_pool("ttl", feature_source="CLIENT", feature_dim=4, **SMALL)
            c.upload_items("ttl", items[:20])
            short = c.acquire("ttl", batch_size=20, strategy="RANDOM", annotator_id="slow", lease_ttl_s=2.0)
            with pytest.raises(FailedPreconditionError):
                c.acquire("ttl", batch_size=1, annotator_id="other")

            def after_expiry() -> pb.AcquireBatchResponse | None:
                try:
                    return c.acquire("ttl", batch_size=20, strategy="RANDOM", annotator_id="other")
                except FailedPreconditionError:
                    return None  # the 2 s leases have not expired yet

            again = wait_until(after_expiry, 30, "the expired leases to return to the pool")
            assert {x.item.item_id for x in again.items} == {x.item.item_id for x in short.items}
    finally:
        server.stop()


def test_consensus_items_stay_acquirable_until_k_distinct_annotators(tmp_path: Path) -> None:
    server = ServerThread(make_settings(tmp_path / "data"))
    try:
        items, _ = synthetic_items(3, 4, seed=4)
        with Client(server.target) as c:
            c.create_pool("k2", feature_source="CLIENT", feature_dim=4, labels_per_item=2, **SMALL)
            c.upload_items("k2", items)
            a = c.acquire("k2", batch_size=3, strategy="RANDOM", annotator_id="alice")
            b = c.acquire("k2", batch_size=3, strategy="RANDOM", annotator_id="bob")
            assert {x.item.item_id for x in a.items} == {x.item.item_id for x in b.items}
            with pytest.raises(FailedPreconditionError):
                c.acquire("k2", batch_size=1, annotator_id="carol")  # 2 leases each: full
            c.ingest_labels("k2", [{"label_id": "a0", "item_id": "it-0", "preference": "A", "annotator_id": "alice"}])
            with pytest.raises(FailedPreconditionError):
                c.acquire("k2", batch_size=1, annotator_id="alice")  # alice holds or labelled all
            c.ingest_labels("k2", [{"label_id": "b0", "item_id": "it-0", "preference": "B", "annotator_id": "bob"}])
            c.release_items("k2", ["it-1", "it-2"], "bob")
            carol = c.acquire("k2", batch_size=2, strategy="RANDOM", annotator_id="carol")
            assert {x.item.item_id for x in carol.items} == {"it-1", "it-2"}  # it-0 has its 2 labels
    finally:
        server.stop()
