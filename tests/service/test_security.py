"""Security and limits over real gRPC: API keys, tenants, roles, key reload, TLS, mutual TLS, limits."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from balpm import Client
from balpm.errors import BalpmError
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from balpm_server.auth import hash_key
from balpm_server.server import create_server
from tests.conftest import BACKENDS, ServerThread, backend_overrides, make_settings, synthetic_items

ADMIN, READER, OTHER, LATE = "key-acme-admin", "key-acme-reader", "key-globex-writer", "key-late"
SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 5}


def write_keys(path: Path, entries: list[tuple[str, str, str, str]]) -> None:
    """Write a keys file of (id, key, tenant, role), bumping the mtime so a reload is always seen."""
    body = {"keys": [{"id": i, "sha256": hash_key(k), "tenant": t, "role": r} for i, k, t, r in entries]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)  # atomic, like a Kubernetes Secret update
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


BASE_KEYS = [
    ("k-admin", ADMIN, "acme", "admin"),
    ("k-reader", READER, "acme", "reader"),
    ("k-other", OTHER, "globex", "writer"),
]


def expect(code: grpc.StatusCode, fn: Callable[[], Any]) -> BalpmError:
    """Call `fn`, assert it fails with `code`, return the error."""
    with pytest.raises(BalpmError) as info:
        fn()
    assert info.value.code == code, info.value
    return info.value


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    write_keys(path, BASE_KEYS)
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def auth_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys_file: Path
) -> Iterator[ServerThread]:
    """A server with API keys, once per storage backend (tenancy holds on every backend)."""
    srv = ServerThread(
        make_settings(
            tmp_path_factory.mktemp("auth") / "data", extractor="", api_keys_file=str(keys_file),
            **backend_overrides(request, request.param),
        )
    )
    try:
        admin = Client(srv.target, api_key=ADMIN)
        items, truth = synthetic_items(60, 8, seed=0)
        admin.create_pool("acme-pool", feature_source="CLIENT", feature_dim=8, **SMALL)
        admin.upload_items("acme-pool", items)
        admin.ingest_labels(
            "acme-pool",
            [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in range(10)],
        )
        admin.close()
        yield srv
    finally:
        srv.stop()


def test_no_token_is_unauthenticated(auth_server: ServerThread) -> None:
    with Client(auth_server.target) as c:
        err = expect(grpc.StatusCode.UNAUTHENTICATED, lambda: c.get_pool("acme-pool"))
        assert err.reason == "MISSING_CREDENTIALS"
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: list(c.list_pools()))
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: c.upload_items("acme-pool", []))
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: list(c.export_labels("acme-pool")))
    # A token in the wrong scheme is no token.
    with grpc.insecure_channel(auth_server.target) as ch:
        stub = pb_grpc.BalpmServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListPools(pb.ListPoolsRequest(), metadata=[("authorization", f"Basic {ADMIN}")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_token_is_unauthenticated(auth_server: ServerThread) -> None:
    for bad in ("nope", ADMIN + "x", ADMIN.upper(), "", hash_key(ADMIN)):
        with Client(auth_server.target, api_key=bad or " ") as c:
            err = expect(grpc.StatusCode.UNAUTHENTICATED, lambda c=c: c.get_pool("acme-pool"))
            assert err.reason in ("INVALID_API_KEY", "MISSING_CREDENTIALS")


def test_health_and_reflection_stay_open(auth_server: ServerThread) -> None:
    with grpc.insecure_channel(auth_server.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="balpm.v1.BalpmService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in out[0].list_services_response.service}
        assert "balpm.v1.BalpmService" in names


def test_other_tenant_sees_not_found(auth_server: ServerThread) -> None:
    with Client(auth_server.target, api_key=OTHER) as c:
        for fn in (
            lambda: c.get_pool("acme-pool"),
            lambda: c.acquire("acme-pool", batch_size=2, annotator_id="eve"),
            lambda: c.delete_pool("acme-pool"),
            lambda: c.upload_items("acme-pool", synthetic_items(1, 8, seed=5)[0]),
            lambda: c.ingest_labels("acme-pool", [{"label_id": "x", "item_id": "it-1", "preference": "A"}]),
            lambda: list(c.export_labels("acme-pool")),
            lambda: c.update_posterior("acme-pool", wait=False),
        ):
            err = expect(grpc.StatusCode.NOT_FOUND, fn)
            assert err.field == "pool_id"
        assert [p.pool_id for p in c.list_pools()] == []
        # Pool ids are scoped per tenant: globex may own an "acme-pool" of its own.
        c.create_pool("acme-pool", feature_source="CLIENT", feature_dim=8)
        assert c.get_pool("acme-pool").item_count == 0
        c.delete_pool("acme-pool")
    with Client(auth_server.target, api_key=ADMIN) as c:
        assert c.get_pool("acme-pool").item_count == 60


def test_reader_role_reads_but_cannot_write(auth_server: ServerThread) -> None:
    with Client(auth_server.target, api_key=READER) as c:
        assert c.get_pool("acme-pool").pool_id == "acme-pool"
        assert [p.pool_id for p in c.list_pools()] == ["acme-pool"]
        batch = c.acquire("acme-pool", batch_size=2, strategy="RANDOM", annotator_id="reader-1")
        assert len(batch.items) == 2
        assert c.release_items("acme-pool", [a.item.item_id for a in batch.items], annotator_id="reader-1") == 2
        assert len(list(c.export_labels("acme-pool"))) == 10
        writes: list[Callable[[], Any]] = [
            lambda: c.create_pool("reader-pool", feature_source="CLIENT", feature_dim=8),
            lambda: c.delete_pool("acme-pool"),
            lambda: c.upload_items("acme-pool", synthetic_items(1, 8, seed=5)[0]),
            lambda: c.ingest_labels("acme-pool", [{"label_id": "r1", "item_id": "it-20", "preference": "A"}]),
            lambda: c.update_posterior("acme-pool", wait=False),
            lambda: c.update_item_scores("acme-pool", {"it-1": {"logp_policy_a": -1.0}}),
            lambda: c.cancel_operation("train-0"),
        ]
        for fn in writes:
            err = expect(grpc.StatusCode.PERMISSION_DENIED, fn)
            assert err.reason == "ROLE_NOT_ALLOWED" and err.metadata["role"] == "reader"
    # The admin can train; the reader can then follow the operation and predict/evaluate.
    with Client(auth_server.target, api_key=ADMIN) as admin:
        op = admin.update_posterior("acme-pool", seed=1)
        assert op.state == pb.Operation.STATE_SUCCEEDED
    with Client(auth_server.target, api_key=READER) as c:
        assert c.get_operation(op.operation_id).state == pb.Operation.STATE_SUCCEEDED
        assert c.wait_operation(op.operation_id).done
        assert len(c.predict("acme-pool", item_ids=["it-1", "it-2"]).predictions) == 2
        items, truth = synthetic_items(4, 8, seed=9)
        assert c.evaluate("acme-pool", [(it, truth[it["item_id"]]) for it in items]).count == 4
        # The other tenant cannot see the operation either.
    with Client(auth_server.target, api_key=OTHER) as other:
        expect(grpc.StatusCode.NOT_FOUND, lambda: other.get_operation(op.operation_id))


def test_key_file_reload(auth_server: ServerThread, keys_file: Path) -> None:
    running = auth_server.running
    assert running.keys is not None
    with Client(auth_server.target, api_key=LATE) as late:
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: late.get_pool("acme-pool"))
        try:
            # 1. the file changes: picked up by the mtime check (at most once per second).
            write_keys(keys_file, [*BASE_KEYS, ("k-late", LATE, "acme", "reader")])
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    assert late.get_pool("acme-pool").pool_id == "acme-pool"
                    break
                except BalpmError as e:
                    assert e.code == grpc.StatusCode.UNAUTHENTICATED
                    assert time.monotonic() < deadline, "new key not picked up"
                    time.sleep(0.2)
            # 2. a broken file keeps the previous keys.
            keys_file.write_text("{not json")
            running.keys.reload()
            assert late.get_pool("acme-pool").pool_id == "acme-pool"
            # 3. revocation, applied at once by an explicit reload (what SIGHUP does).
            write_keys(keys_file, BASE_KEYS)
            running.keys.reload()
            expect(grpc.StatusCode.UNAUTHENTICATED, lambda: late.get_pool("acme-pool"))
        finally:
            write_keys(keys_file, BASE_KEYS)
            running.keys.reload()
    with Client(auth_server.target, api_key=ADMIN) as admin:
        assert admin.get_pool("acme-pool").pool_id == "acme-pool"


def test_request_id_is_echoed(auth_server: ServerThread) -> None:
    with grpc.insecure_channel(auth_server.target) as ch:
        stub = pb_grpc.BalpmServiceStub(ch)
        md = [("authorization", f"Bearer {ADMIN}"), ("x-request-id", "req-123")]
        _, call = stub.GetPool.with_call(pb.GetPoolRequest(pool_id="acme-pool"), metadata=md)
        assert ("x-request-id", "req-123") in [tuple(m) for m in call.trailing_metadata()]
        with pytest.raises(grpc.RpcError) as info:
            stub.GetPool(pb.GetPoolRequest(pool_id="missing"), metadata=md)
        assert ("x-request-id", "req-123") in [tuple(m) for m in info.value.trailing_metadata()]
        # Without one (or with a malformed one) the server makes one up.
        _, call = stub.GetPool.with_call(
            pb.GetPoolRequest(pool_id="acme-pool"), metadata=[md[0], ("x-request-id", "bad id with spaces")]
        )
        rid = dict(call.trailing_metadata())["x-request-id"]
        assert len(rid) == 32 and rid.isalnum()


# ---- TLS ------------------------------------------------------------------------------------


def _pki(tmp: Path) -> dict[str, Path]:
    """A test CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("balpm test CA"))
        .issuer_name(name("balpm test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    tmp.mkdir(parents=True, exist_ok=True)
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cn, server in (("server", True), ("client", False)):
        cert, key = leaf(f"balpm-{cn}", server)
        out[f"{cn}_cert"], out[f"{cn}_key"] = tmp / f"{cn}.pem", tmp / f"{cn}.key"
        out[f"{cn}_cert"].write_bytes(cert)
        out[f"{cn}_key"].write_bytes(key)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _pki(tmp_path_factory.mktemp("pki"))


def _list(client: Client) -> list[str]:
    return [p.pool_id for p in client.list_pools()]


def test_tls_handshake_and_plaintext_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    srv = ServerThread(
        make_settings(
            tmp_path / "data", extractor="", tls_cert_file=str(pki["server_cert"]), tls_key_file=str(pki["server_key"])
        )
    )
    try:
        with Client(srv.target, root_certificates=pki["ca"].read_bytes(), timeout_s=10) as c:
            c.create_pool("tls-pool", feature_source="CLIENT", feature_dim=4)
            assert _list(c) == ["tls-pool"]
        # A plaintext client cannot talk to the TLS port.
        with Client(srv.target, timeout_s=3, retry=False) as plain:  # a retry would run into the deadline
            err = expect(grpc.StatusCode.UNAVAILABLE, lambda: _list(plain))
            assert err.code == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the CA fails the handshake.
        other = _pki(tmp_path / "other")
        with Client(srv.target, root_certificates=other["ca"].read_bytes(), timeout_s=3, retry=False) as untrusted:
            expect(grpc.StatusCode.UNAVAILABLE, lambda: _list(untrusted))
    finally:
        srv.stop()


def test_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    other = _pki(tmp_path / "other")
    srv = ServerThread(
        make_settings(
            tmp_path / "data",
            extractor="",
            tls_cert_file=str(pki["server_cert"]),
            tls_key_file=str(pki["server_key"]),
            tls_client_ca_file=str(pki["ca"]),
        )
    )
    ca = pki["ca"].read_bytes()
    try:
        with Client(
            srv.target,
            root_certificates=ca,
            private_key=pki["client_key"].read_bytes(),
            certificate_chain=pki["client_cert"].read_bytes(),
            timeout_s=10,
        ) as c:
            assert _list(c) == []
        with Client(srv.target, root_certificates=ca, timeout_s=3, retry=False) as no_cert:
            expect(grpc.StatusCode.UNAVAILABLE, lambda: _list(no_cert))
        with Client(
            srv.target,
            root_certificates=ca,
            private_key=other["client_key"].read_bytes(),
            certificate_chain=other["client_cert"].read_bytes(),
            timeout_s=3,
            retry=False,
        ) as wrong_ca:
            expect(grpc.StatusCode.UNAVAILABLE, lambda: _list(wrong_ca))
    finally:
        srv.stop()


def test_plaintext_on_public_host_needs_insecure(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", extractor="", host="0.0.0.0")
    with pytest.raises(ValueError, match="--insecure"):
        asyncio.run(create_server(settings))
    srv = ServerThread(make_settings(tmp_path / "data2", extractor="", host="0.0.0.0", insecure=True))
    try:
        with Client(f"127.0.0.1:{srv.running.port}") as c:
            assert _list(c) == []
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="tls_cert_file"):
        asyncio.run(create_server(make_settings(tmp_path / "d3", extractor="", tls_client_ca_file="/x.pem")))


# ---- limits ---------------------------------------------------------------------------------


def test_limits_are_named(tmp_path: Path) -> None:
    srv = ServerThread(
        make_settings(
            tmp_path / "data",
            extractor="",
            max_message_bytes=256 * 1024,
            max_batch_size=8,
            max_items_per_chunk=5,
            max_pools_per_tenant=2,
            max_training_jobs_per_tenant=1,
        )
    )
    try:
        with Client(srv.target, timeout_s=30) as c:
            items, truth = synthetic_items(40, 4, seed=2)
            for pid in ("p1", "p2"):
                c.create_pool(pid, feature_source="CLIENT", feature_dim=4, ensemble_size=2, hidden_sizes=[8], epochs=5)
                c.upload_items(pid, items, chunk_size=5)
                c.ingest_labels(
                    pid, [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in range(8)]
                )
            # max_pools_per_tenant
            err = expect(
                grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: c.create_pool("p3", feature_source="CLIENT", feature_dim=4)
            )
            assert err.reason == "MAX_POOLS_PER_TENANT" and "max_pools_per_tenant=2" in err.message
            # max_batch_size
            err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.acquire("p1", batch_size=9))
            assert err.reason == "MAX_BATCH_SIZE" and err.field == "batch_size" and "max_batch_size=8" in err.message
            # max_items_per_chunk
            err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.upload_items("p1", items, chunk_size=6))
            assert err.reason == "MAX_ITEMS_PER_CHUNK" and "max_items_per_chunk=5" in err.message
            # labels per request
            many = [{"label_id": f"m{i}", "item_id": "it-0", "preference": "A"} for i in range(10_001)]
            err = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.ingest_labels("p1", many))
            assert err.reason == "TOO_MANY_LABELS"
            # max_message_bytes: a request over the limit is RESOURCE_EXHAUSTED (from gRPC itself).
            big = [{**items[0], "item_id": "big", "prompt": "x" * 300_000}]
            err = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: c.upload_items("p1", big))
            assert "larger than max" in err.message or "max" in err.message.lower()
            # max_training_jobs_per_tenant
            first = c.update_posterior("p1", epochs=5000, wait=False)
            err = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: c.update_posterior("p2", wait=False))
            assert err.reason == "MAX_TRAINING_JOBS" and "max_training_jobs_per_tenant=1" in err.message
            # ... and a second job on the same pool is ABORTED.
            expect(grpc.StatusCode.ABORTED, lambda: c.update_posterior("p1", wait=False))
            c.cancel_operation(first.operation_id)
            with pytest.raises(BalpmError):
                c.wait_operation(first.operation_id, timeout_s=60)
            # Text length limit of the domain.
            long_item = [{**items[1], "item_id": "long", "prompt": "y" * 100_001}]
            up = c.upload_items("p2", long_item)
            assert up.rejections[0].reason == "TOO_LONG"
    finally:
        srv.stop()
