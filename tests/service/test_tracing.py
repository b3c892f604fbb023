"""OpenTelemetry tracing against a real OTLP/gRPC collector on loopback (no OpenTelemetry mocks).

The collector is a gRPC server in the test process implementing the OTLP TraceService
(`opentelemetry.proto.collector.trace.v1`); the balpm server exports to it over OTLP/gRPC.
The test client is a plain (synchronous, uninstrumented) grpc channel that writes the W3C
`traceparent` header itself, so the expected trace and parent span ids are known.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from balpm_server import tracing
from balpm_server.auth import hash_key
from tests.conftest import ServerThread, make_settings
from tests.procserver import ProcServer
from tests.waiting import wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
SERVICE = "balpm.v1.BalpmService"
KEY = "key-trace-admin"
AUTH = ("authorization", f"Bearer {KEY}")
WAIT_S = 10.0  # bound on the wait for spans to reach the collector

Span = trace_pb2.Span


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Received:
    """One span as the collector received it."""

    span: Span
    resource: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return _attributes(self.span.attributes)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Received] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"
        self.server.start()

    def Export(  # noqa: N802 - the gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for rs in request.resource_spans:
                resource = _attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    self._spans.extend(Received(s, resource) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Received]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[Received], bool], what: str, count: int = 1) -> list[Received]:
        """The received spans matching `predicate`, once there are `count` of them (at most WAIT_S)."""

        def found() -> list[Received] | None:
            matching = [r for r in self.spans() if predicate(r)]
            return matching if len(matching) >= count else None

        result = wait_until(found, WAIT_S, what)
        assert result is not None  # wait_until returns a truthy value or raises
        return result

    def close(self) -> None:
        self.server.stop(None)


def _server_span(method: str) -> Callable[[Received], bool]:
    return lambda r: r.span.kind == Span.SPAN_KIND_SERVER and r.span.name == f"/{SERVICE}/{method}"


def _caller_traced(r: Received) -> bool:
    return r.span.trace_id.hex() == TRACE_ID and r.span.parent_span_id.hex() == PARENT_SPAN_ID


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def traced_server(tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    """An in-process server with API keys that exports its spans to `collector`."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export every 50 ms (BatchSpanProcessor)
    keys = tmp_path / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "k1", "sha256": hash_key(KEY), "tenant": "t", "role": "admin"}]}))
    srv = ServerThread(
        make_settings(
            tmp_path / "data", extractor="", api_keys_file=str(keys),
            otlp_endpoint=collector.endpoint, replica_id="replica-trace-1",
        )
    )
    try:
        assert len(tracing.active()) == 1
        yield srv
    finally:
        srv.stop()
        # The server's stop flushes and uninstruments (Tracing.stop_with), in a worker thread.
        wait_until(lambda: not tracing.active(), WAIT_S, "tracing to shut down with the server")


def test_server_spans_continue_the_callers_trace(traced_server: ServerThread, collector: Collector) -> None:
    md = [("traceparent", TRACEPARENT), AUTH]
    with grpc.insecure_channel(traced_server.target) as ch:
        stub = pb_grpc.BalpmServiceStub(ch)
        stub.ListPools(pb.ListPoolsRequest(), metadata=md, timeout=10)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetPool(pb.GetPoolRequest(pool_id="no-such-pool"), metadata=md, timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as streamed:  # a server-streaming method
            list(stub.ExportLabels(pb.ExportLabelsRequest(pool_id="no-such-pool"), metadata=md, timeout=10))
        assert streamed.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as unauthenticated:  # no API key: refused by the project's interceptor
            stub.GetPool(pb.GetPoolRequest(pool_id="no-such-pool"), metadata=[("traceparent", TRACEPARENT)])
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), metadata=md)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    (listed,) = collector.wait_for(_server_span("ListPools"), "the ListPools server span")
    get_pool = collector.wait_for(_server_span("GetPool"), "both GetPool server spans", count=2)
    (exported,) = collector.wait_for(_server_span("ExportLabels"), "the ExportLabels server span")

    for r in (listed, *get_pool, exported):
        assert _caller_traced(r), (r.span.name, r.span.trace_id.hex(), r.span.parent_span_id.hex())
        assert r.attributes["rpc.system"] == "grpc"
        assert r.attributes["rpc.service"] == SERVICE
        assert r.resource["service.name"] == "balpm-server"
        assert r.resource["service.instance.id"] == "replica-trace-1"
    assert listed.attributes["rpc.method"] == "ListPools"
    assert listed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert listed.span.status.code != trace_pb2.Status.STATUS_CODE_ERROR

    codes = sorted(r.attributes["rpc.grpc.status_code"] for r in get_pool)
    assert codes == [grpc.StatusCode.NOT_FOUND.value[0], grpc.StatusCode.UNAUTHENTICATED.value[0]]
    for r in (*get_pool, exported):
        assert r.attributes["rpc.method"] in ("GetPool", "ExportLabels")
        assert r.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR, r.span.status
    assert exported.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "NOT_FOUND" in exported.span.status.message
    # Health probes are not traced.
    assert not [r for r in collector.spans() if "grpc.health" in r.span.name]


def test_outgoing_aio_calls_carry_the_trace(traced_server: ServerThread, collector: Collector) -> None:
    """A grpc.aio channel created in the server process after setup makes client spans and injects the context.

    This is what the forwarding hop (transport.forwarding.Forwarder) and tritonclient's channel do: here the
    call goes from inside a server-kind span back to the same server.
    """
    target = traced_server.target

    async def call_out() -> str:
        from opentelemetry import propagate, trace

        (handle,) = tracing.active()
        tracer = handle.provider.get_tracer("balpm-test")
        parent = propagate.extract({"traceparent": TRACEPARENT})
        with tracer.start_as_current_span("incoming", context=parent, kind=trace.SpanKind.SERVER) as outer:
            async with grpc.aio.insecure_channel(target) as ch:
                await pb_grpc.BalpmServiceStub(ch).ListPools(pb.ListPoolsRequest(), metadata=[AUTH], timeout=10)
            return f"{outer.get_span_context().span_id:016x}"

    outer_id = traced_server.call(call_out(), timeout_s=30)
    (client,) = collector.wait_for(
        lambda r: r.span.kind == Span.SPAN_KIND_CLIENT and r.span.name == f"/{SERVICE}/ListPools", "the client span"
    )
    assert client.span.trace_id.hex() == TRACE_ID
    assert client.span.parent_span_id.hex() == outer_id
    assert client.attributes["rpc.method"] == "ListPools"
    # The call's own server span is the client span's child: the channel wrote the context into the metadata.
    (served,) = collector.wait_for(
        lambda r: _server_span("ListPools")(r) and r.span.parent_span_id == client.span.span_id,
        "the server span of the outgoing call",
    )
    assert served.span.trace_id.hex() == TRACE_ID


def test_spans_are_flushed_when_the_server_process_stops(tmp_path: Path, collector: Collector) -> None:
    """BALPM_OTLP_ENDPOINT on a `balpm-server` process: the spans queued at SIGTERM still reach the collector."""
    srv = ProcServer(
        tmp_path / "data",
        extra_env={
            "BALPM_OTLP_ENDPOINT": f"http://{collector.endpoint}",
            "BALPM_REPLICA_ID": "replica-proc",
            "BALPM_EXTRACTOR": "",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",  # no timed export: only the flush at stop sends them
        },
    )
    srv.start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            pb_grpc.BalpmServiceStub(ch).ListPools(
                pb.ListPoolsRequest(), metadata=[("traceparent", TRACEPARENT)], timeout=10
            )
        assert not collector.spans()
    finally:
        code = srv.terminate()
    assert code == 0, srv.log_path.read_text()
    (listed,) = collector.wait_for(_server_span("ListPools"), "the ListPools span flushed at stop")
    assert _caller_traced(listed)
    assert listed.resource["service.instance.id"] == "replica-proc"


DISABLED_PROBE = """
import asyncio, sys, tempfile
from balpm_server.server import create_server
from balpm_server.settings import Settings

async def main():
    settings = Settings.from_env(
        environ={}, host="127.0.0.1", port=0, data_dir=tempfile.mkdtemp(), metrics_port=-1, log_json=False
    )
    assert settings.otlp_endpoint == ""
    running = await create_server(settings)
    await running.stop(0)

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""


def test_disabled_tracing_imports_no_opentelemetry(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALPM_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-c", DISABLED_PROBE], env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_setup_tracing_is_off_without_an_endpoint(tmp_path: Path) -> None:
    assert tracing.setup_tracing(make_settings(tmp_path, otlp_endpoint=""), "r") is None
    assert tracing.setup_tracing(make_settings(tmp_path, otlp_endpoint="  "), "r") is None

