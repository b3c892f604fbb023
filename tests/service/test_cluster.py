"""Cluster mode: replicas sharing one PostgreSQL and one bucket, pool owners, forwarding, hand-overs.

Real components only: a PostgreSQL server and `moto_server` on loopback (tests/backends.py),
replicas as in-process servers (`ServerThread`); the crash tests (SIGKILL, SIGSTOP) use
server processes and live in tests/service/test_cluster_failover.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from balpm import Client
from balpm.errors import BalpmError
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from balpm_server.domain.cluster import assign
from tests.conftest import ServerThread, backend_overrides, make_settings, synthetic_items

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 10}
TTL_S = 3.0


@dataclasses.dataclass
class Replicas:
    servers: list[ServerThread]

    def owner_of(self, pool_id: str, tenant: str = "default") -> int:
        """Index of the replica owning the pool (by the database)."""
        store = self.servers[0].running.service.store
        key = store.pool_key(tenant, pool_id)
        assert key is not None
        rec = store.pool_owner(key)
        assert rec is not None and rec.expire_s > time.time()
        ids = [s.running.service.cluster.replica_id for s in self.servers]  # type: ignore[union-attr]
        return ids.index(rec.replica_id)


def _start(tmp_path: Path, shared: dict[str, str], n: int, first: int = 0) -> list[ServerThread]:
    return [
        ServerThread(make_settings(
            tmp_path / f"r{i}", extractor="", cluster=True, replica_id=f"r{i}", ownership_ttl_s=TTL_S, **shared
        ))
        for i in range(first, first + n)
    ]


@pytest.fixture
def replicas(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Replicas]:
    shared = backend_overrides(request, "postgres")
    servers = _start(tmp_path, shared, 3)
    try:
        yield Replicas(servers)
    finally:
        for s in servers:
            s.stop()


def test_assignment_is_balanced_and_the_same_everywhere() -> None:
    keys = [f"pool-{i}" for i in range(10)]
    plan = assign(keys, ["r0", "r1", "r2"])
    assert set(plan) == set(keys)
    loads = [list(plan.values()).count(r) for r in ("r0", "r1", "r2")]
    assert sorted(loads) == [3, 3, 4]  # balanced: floor(10 / 3) or one more
    for n_keys in range(1, 12):  # never an idle replica while another holds two more
        for salt in range(20):
            some = [f"k{salt}-{i}" for i in range(n_keys)]
            counts = [list(assign(some, ["r0", "r1", "r2"]).values()).count(r) for r in ("r0", "r1", "r2")]
            assert max(counts) - min(counts) <= 1 and sum(counts) == n_keys
    assert assign(list(reversed(keys)), ["r2", "r0", "r1"]) == plan  # order of the inputs does not matter
    assert assign(keys[:6], ["r0", "r1", "r2"]).values().__len__() == 6
    assert sorted(list(assign(keys[:6], ["r0", "r1", "r2"]).values()).count(r) for r in ("r0", "r1", "r2")) == [2, 2, 2]


def test_any_replica_serves_any_pool_with_the_owners_answers(replicas: Replicas) -> None:
    items, truth = synthetic_items(80, 8, seed=5)
    clients = [Client(s.target, timeout_s=60) for s in replicas.servers]
    try:
        clients[0].create_pool("p", feature_source="CLIENT", feature_dim=8, **SMALL)
        clients[1].upload_items("p", items)  # forwarded to the owner when r1 is not it
        owner = replicas.owner_of("p")
        other = (owner + 1) % 3
        clients[2].ingest_labels("p", [
            {"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in range(20)
        ])
        op = clients[other].update_posterior("p", seed=0)
        assert op.result.posterior_version == 1
        assert replicas.owner_of("p") == owner  # training ran on the owner, which kept the pool

        # The same batch through a non-owner as through the owner (same state, same seed).
        direct = clients[owner].acquire("p", batch_size=6, strategy="BALPM", seed=3, annotator_id="ann")
        ids = [it.item.item_id for it in direct.items]
        clients[owner].release_items("p", ids, annotator_id="ann")
        relayed = clients[other].acquire("p", batch_size=6, strategy="BALPM", seed=3, annotator_id="ann")
        assert [it.item.item_id for it in relayed.items] == ids
        assert [it.scores for it in relayed.items] == [it.scores for it in direct.items]

        # Labels ingested anywhere reach the owner's occupancy: those items are not offered again.
        clients[other].ingest_labels("p", [
            {"label_id": f"x{i}", "item_id": iid, "preference": "A", "annotator_id": "ann"} for i, iid in enumerate(ids)
        ])
        clients[owner].release_items("p", ids, annotator_id="ann")
        again = clients[owner].acquire("p", batch_size=10, strategy="BALD", seed=3, annotator_id="bob")
        assert not set(ids) & {it.item.item_id for it in again.items}

        # Errors come back with the owner's code, reason and field.
        for c in (clients[owner], clients[other]):
            with pytest.raises(BalpmError) as err:
                c.acquire("p", batch_size=0, annotator_id="ann")
            assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "batch_size")
        with pytest.raises(BalpmError) as missing:
            clients[other].get_pool("nope")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND

        # GetOperation / WatchOperation through any replica
        for c in clients:
            assert c.get_operation(op.operation_id).state == op.state
    finally:
        for c in clients:
            c.close()


def test_request_id_and_deadline_reach_the_owner(replicas: Replicas, caplog: pytest.LogCaptureFixture) -> None:
    items, _truth = synthetic_items(30, 4, seed=1)
    with Client(replicas.servers[0].target, timeout_s=60) as c:
        c.create_pool("q", feature_source="CLIENT", feature_dim=4, **SMALL)
        c.upload_items("q", items)
    owner = replicas.owner_of("q")
    other = (owner + 1) % 3
    caplog.set_level("INFO", logger="balpm.access")
    with grpc.insecure_channel(replicas.servers[other].target) as ch:
        stub = pb_grpc.BalpmServiceStub(ch)
        _resp, call = stub.AcquireBatch.with_call(
            pb.AcquireBatchRequest(pool_id="q", batch_size=2, annotator_id="ann"),
            metadata=[("x-request-id", "rid-cluster-1")], timeout=7.0,
        )
        assert dict(call.trailing_metadata())["x-request-id"] == "rid-cluster-1"
    at_owner = [
        r for r in caplog.records
        if getattr(r, "request_id", "") == "rid-cluster-1" and getattr(r, "forwarded_from", "") == f"r{other}"
    ]
    assert len(at_owner) == 1, [(r.getMessage(), getattr(r, "forwarded_from", None)) for r in caplog.records]
    assert at_owner[0].method == "AcquireBatch" and at_owner[0].code == "OK"  # type: ignore[attr-defined]
    # What is left of the caller's 7 s arrives (gRPC's grpc-timeout header rounds the relayed
    # timeout up to its unit, so a few ms above 7 s can show; measured 7.008 once).
    assert 0 < at_owner[0].deadline_s <= 7.05  # type: ignore[attr-defined]


def test_pools_spread_and_move_to_a_new_replica_and_off_a_draining_one(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    shared = backend_overrides(request, "postgres")
    servers = _start(tmp_path, shared, 2)
    try:
        items, _truth = synthetic_items(20, 4, seed=2)
        with Client(servers[0].target, timeout_s=60) as c:
            for i in range(6):
                c.create_pool(f"p{i}", feature_source="CLIENT", feature_dim=4, **SMALL)
                c.upload_items(f"p{i}", items)
        reps = Replicas(servers)
        _wait(lambda: sorted(reps.owner_of(f"p{i}") for i in range(6)) == [0, 0, 0, 1, 1, 1], 4 * TTL_S)
        servers += _start(tmp_path, shared, 1, first=2)  # r2 joins
        _wait(lambda: sorted(reps.owner_of(f"p{i}") for i in range(6)) == [0, 0, 1, 1, 2, 2], 4 * TTL_S)
        leaving = servers.pop(0)
        leaving.stop()  # drains: its pools move at once, not after the TTL
        store = servers[0].running.service.store
        owners = {o.replica_id for o in store.owners() if o.expire_s > time.time()}
        assert owners == {"r1", "r2"}
        with Client(servers[0].target, timeout_s=60) as c:
            for i in range(6):
                c.acquire(f"p{i}", batch_size=1, annotator_id="a")
    finally:
        for s in servers:
            s.stop()


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s")
        time.sleep(0.2)


def test_the_database_refuses_a_former_owners_leases_and_posterior_versions(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from balpm_server import errors
    from balpm_server.domain.models import LeaseRequest
    from balpm_server.storage import open_store
    from balpm_server.storage.sql_store import NOT_POOL_OWNER, Fencing

    shared = backend_overrides(request, "postgres")
    single = ServerThread(make_settings(tmp_path / "setup", extractor="", **shared))
    try:
        with Client(single.target, timeout_s=60) as c:
            c.create_pool("f", feature_source="CLIENT", feature_dim=4, **SMALL)
            c.upload_items("f", synthetic_items(10, 4, seed=0)[0])
    finally:
        single.stop()
    a = open_store(shared["database_url"], tmp_path / "a")
    b = open_store(shared["database_url"], tmp_path / "b")
    try:
        key = a.pool_key("default", "f")
        assert key is not None
        now = time.time()
        a.fencing, b.fencing = Fencing("A"), Fencing("B")
        held = a.assign_pool(key, "A", now, 5.0)
        assert held is not None and held.epoch == 1
        assert b.assign_pool(key, "B", now, 5.0) is None  # A's ownership is live
        a.fencing.epochs[key] = held.epoch
        a.lease_and_read([LeaseRequest(key, ("it-1",), "x", now + 60)])  # the owner writes
        with pytest.raises(errors.Unavailable) as not_yet:  # B holds no ownership: refused
            b.lease_and_read([LeaseRequest(key, ("it-2",), "y", now + 60)])
        assert not_yet.value.reason == NOT_POOL_OWNER

        taken = b.assign_pool(key, "B", now + 6.0, 5.0)  # after A's expiry (A paused)
        assert taken is not None and taken.epoch == 2
        b.fencing.epochs[key] = taken.epoch
        for late in (
            lambda: a.lease_and_read([LeaseRequest(key, ("it-3",), "x", now + 60)]),
            lambda: a.set_posterior_version(key, 7),
        ):
            with pytest.raises(errors.Unavailable) as refused:
                late()
            assert refused.value.reason == NOT_POOL_OWNER
        b.lease_and_read([LeaseRequest(key, ("it-3",), "y", now + 60)])
        assert {lease.annotator_id for lease in b.active_leases(key, now)} == {"x", "y"}
        info = b.pool_info(key, counts=False)
        assert info is not None and info.posterior_version == 0
        assert [r.pool_key for r in a.renew_pools("A", now, 5.0)] == []  # A learns it lost the pool
        handed = b.assign_pool(key, "A", now + 1.0, 5.0, from_replica="B")  # a hand-over back: next epoch
        assert handed is not None and handed.epoch == 3
    finally:
        a.close()
        b.close()


def test_tenants_stay_apart_through_forwarding(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The owner authenticates the caller's own key: a relayed call has exactly the caller's rights."""
    from tests.service.test_security import write_keys

    keys = tmp_path / "keys.json"
    write_keys(keys, [("a", "key-a", "acme", "writer"), ("r", "key-r", "acme", "reader"),
                      ("g", "key-g", "globex", "writer")])
    shared = backend_overrides(request, "postgres")
    servers = [
        ServerThread(make_settings(
            tmp_path / f"r{i}", extractor="", cluster=True, replica_id=f"r{i}", ownership_ttl_s=TTL_S,
            api_keys_file=str(keys), **shared,
        ))
        for i in range(2)
    ]
    try:
        items, _truth = synthetic_items(20, 4, seed=9)
        with Client(servers[0].target, api_key="key-a", timeout_s=60) as c:
            c.create_pool("secret", feature_source="CLIENT", feature_dim=4, **SMALL)
            c.upload_items("secret", items)
        owner = Replicas(servers).owner_of("secret", tenant="acme")
        other = servers[1 - owner]
        with Client(other.target, api_key="key-g", timeout_s=30) as g:  # another tenant, via the non-owner
            with pytest.raises(BalpmError) as hidden:
                g.acquire("secret", batch_size=2, annotator_id="x")
            assert hidden.value.code == grpc.StatusCode.NOT_FOUND
        with Client(other.target, api_key="key-r", timeout_s=30) as r:  # a reader cannot train, relayed or not
            with pytest.raises(BalpmError) as denied:
                r.update_posterior("secret", seed=0)
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert r.get_pool("secret").item_count == 20
        with Client(other.target, api_key="wrong", timeout_s=30) as w:
            with pytest.raises(BalpmError) as unauth:
                w.get_pool("secret")
            assert unauth.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(other.target, api_key="key-a", timeout_s=30) as a:
            assert len(a.acquire("secret", batch_size=2, annotator_id="x").items) == 2
    finally:
        for s in servers:
            s.stop()


def test_one_trace_spans_the_forwarding_hop(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entry replica's server span -> its client span to the owner -> the owner's server span, one trace."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from balpm_server import tracing
    from tests.service.test_tracing import PARENT_SPAN_ID, TRACE_ID, TRACEPARENT, WAIT_S, Collector, _server_span
    from tests.waiting import wait_until

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    collector = Collector()
    shared = backend_overrides(request, "postgres")
    servers = [
        ServerThread(make_settings(
            tmp_path / f"r{i}", extractor="", cluster=True, replica_id=f"r{i}", ownership_ttl_s=TTL_S,
            otlp_endpoint=collector.endpoint, **shared,
        ))
        for i in range(2)
    ]
    try:
        with Client(servers[0].target, timeout_s=60) as c:
            c.create_pool("t", feature_source="CLIENT", feature_dim=4, **SMALL)
            c.upload_items("t", synthetic_items(20, 4, seed=3)[0])
        owner = Replicas(servers).owner_of("t")
        entry = 1 - owner
        with grpc.insecure_channel(servers[entry].target) as ch:
            pb_grpc.BalpmServiceStub(ch).GetPool(
                pb.GetPoolRequest(pool_id="t"), metadata=[("traceparent", TRACEPARENT)], timeout=10
            )
        server_spans = collector.wait_for(
            lambda r: _server_span("GetPool")(r) and r.span.trace_id.hex() == TRACE_ID, "two GetPool server spans", 2
        )
        first = next(r for r in server_spans if r.resource["service.instance.id"] == f"r{entry}")
        second = next(r for r in server_spans if r.resource["service.instance.id"] == f"r{owner}")
        assert first.span.parent_span_id.hex() == PARENT_SPAN_ID  # continues the caller's trace
        (hop,) = collector.wait_for(
            lambda r: r.span.kind == Span.SPAN_KIND_CLIENT and r.span.name.endswith("/GetPool")
            and r.span.trace_id.hex() == TRACE_ID, "the forwarding client span",
        )
        assert hop.span.parent_span_id == first.span.span_id
        assert second.span.parent_span_id == hop.span.span_id
    finally:
        for s in servers:
            s.stop()
        wait_until(lambda: not tracing.active(), WAIT_S, "tracing to shut down with the servers")
        collector.close()


def test_a_call_relayed_to_a_former_owner_is_routed_again(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner refuses a relayed call as NOT_POOL_OWNER (the pool moved meanwhile): the entry replica routes again."""
    from balpm_server.storage.sql_store import not_owner

    with Client(replicas.servers[0].target, timeout_s=60) as c:
        c.create_pool("m", feature_source="CLIENT", feature_dim=4, **SMALL)
        c.upload_items("m", synthetic_items(20, 4, seed=8)[0])
    owner = replicas.owner_of("m")
    cluster = replicas.servers[owner].running.service.cluster
    assert cluster is not None
    real = cluster.route
    refused: list[str] = []

    async def moved_once(key: str, *, forwarded: bool) -> str | None:
        if forwarded and not refused:
            refused.append(key)
            raise not_owner(key, cluster.replica_id)
        return await real(key, forwarded=forwarded)

    monkeypatch.setattr(cluster, "route", moved_once)
    with Client(replicas.servers[(owner + 1) % 3].target, timeout_s=30, retry=False) as c:
        assert len(c.acquire("m", batch_size=2, annotator_id="a").items) == 2  # no error reached the caller
    assert len(refused) == 1
