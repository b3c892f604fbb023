"""OpenTelemetry tracing: OTLP/gRPC export and gRPC instrumentation, on only when configured.

With `settings.otlp_endpoint` set (BALPM_OTLP_ENDPOINT), `setup_tracing` builds a tracer
provider (resource: service.name "balpm-server", service.instance.id the replica id) that
exports through a BatchSpanProcessor to the OTLP/gRPC collector, and instruments gRPC:

* server: `Tracing.server_interceptors()` go first in the server's interceptor list, so the
  span of every incoming RPC (W3C `traceparent` from the metadata as its parent) covers the
  project's own interceptor too: authentication failures, forwarding, the status mapping;
* client: every `grpc.aio` channel created afterwards (the forwarding hop to another replica,
  tritonclient's channel to Triton) writes the trace context into its calls' metadata and
  records a client span.

The span of a call that ends with a non-OK status carries `rpc.grpc.status_code` and the
ERROR status (every non-OK code, NOT_FOUND and UNAUTHENTICATED included, so failed calls
are easy to find). The health and reflection services are not traced (probes would flood the
traces). The BatchSpanProcessor and the sampler read the standard OTEL_BSP_* and
OTEL_TRACES_SAMPLER* variables.

With `otlp_endpoint` empty, `setup_tracing` returns None and imports nothing from
OpenTelemetry: tracing off costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from balpm_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = "balpm-server"
# Services without spans: health probes every few seconds, and reflection.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
STATUS_CODE_ATTRIBUTE = "rpc.grpc.status_code"

_lock = threading.Lock()
_active: list[Tracing] = []  # set-up handles not shut down yet; the first one's provider traces client calls


def _traced(handler_call_details: Any) -> bool:
    """Whether calls to this method get a span (every service but health and reflection)."""
    method = getattr(handler_call_details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode()
    return not method.lstrip("/").startswith(UNTRACED_SERVICES)


class Tracing:
    """Tracing of one server: its tracer provider, server interceptors and client instrumentation.

    Made by `setup_tracing`; `shutdown` flushes the spans still queued and, when this is the
    last handle of the process, takes the client instrumentation out again.

    Args:
        provider: The tracer provider that exports to the collector.
        endpoint: The collector's address, for logs.
    """

    def __init__(self, provider: TracerProvider, endpoint: str) -> None:
        self.provider = provider
        self.endpoint = endpoint
        self._closed = False
        self._stopper: asyncio.Task[None] | None = None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The interceptors to put first in `grpc.aio.server(interceptors=...)`.

        Returns:
            OpenTelemetry's aio server interceptor (the span; the parent from `traceparent`),
            then one that sets the span's status from the call's gRPC status code.
        """
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        otel: grpc.aio.ServerInterceptor = aio_server_interceptor(tracer_provider=self.provider, filter_=_traced)
        return [otel, _StatusRecorder()]

    def stop_with(self, server: grpc.aio.Server) -> None:
        """Shut tracing down (flush, uninstrument) once `server` has stopped.

        Args:
            server: The server whose `wait_for_termination` ends this tracing.
        """

        async def stop() -> None:
            await server.wait_for_termination()
            await asyncio.to_thread(self.shutdown)  # the flush blocks: keep it off the event loop

        self._stopper = asyncio.get_running_loop().create_task(stop())

    def shutdown(self) -> None:
        """Export the spans still queued (bounded by the exporter's timeout) and stop exporting.

        Idempotent. The client instrumentation moves to another live handle's provider, or is
        removed when this was the last one.
        """
        with _lock:
            if self._closed:
                return
            self._closed = True
            if self in _active:
                _active.remove(self)
            _instrument_clients()
        try:
            self.provider.shutdown()  # BatchSpanProcessor.shutdown: exports what is queued
        except Exception:  # a collector that is down must not break the server's shutdown
            log.warning("tracing: flushing spans to %s failed", self.endpoint, exc_info=True)


def _instrument_clients() -> None:
    """Point the grpc.aio client instrumentation at the first live handle's provider (none: remove it).

    Called with `_lock` held. `instrument` skips the package dependency check: the interceptors
    work with every grpcio this server supports, whatever range the instrumentation declares.
    """
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

    instrumentor = GrpcAioInstrumentorClient()  # a singleton
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    if _active:
        instrumentor.instrument(tracer_provider=_active[0].provider, skip_dep_check=True)


def setup_tracing(settings: Settings, replica_id: str) -> Tracing | None:
    """Start exporting traces and instrument gRPC, when `settings.otlp_endpoint` is set.

    Args:
        settings: Server settings; `otlp_endpoint` is the OTLP/gRPC collector, "host:port" or
            "http://host:port" (plaintext) or "https://host:port" (TLS, system roots or
            OTEL_EXPORTER_OTLP_CERTIFICATE); "" disables tracing.
        replica_id: This replica's name (the resource's service.instance.id).

    Returns:
        The tracing handle, or None when tracing is disabled (nothing imported or installed).
    """
    endpoint = settings.otlp_endpoint.strip()
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, str] = {"service.name": SERVICE_NAME, "service.instance.id": replica_id}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        attributes["service.version"] = version("balpm-server")
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracing = Tracing(provider, endpoint)
    with _lock:
        _active.append(tracing)
        if len(_active) == 1:
            _instrument_clients()
    log.info("tracing: exporting spans to %s as replica %s", endpoint, replica_id)
    return tracing


def active() -> list[Tracing]:
    """The handles set up in this process and not shut down yet (oldest first)."""
    with _lock:
        return list(_active)


# ---- the span's status from the call's gRPC status -------------------------------------------


def _status_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: the context's code, else CANCELLED / UNKNOWN for an exception."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    try:
        code: Any = context.code()
    except Exception:
        code = None
    if isinstance(code, int) and not isinstance(code, grpc.StatusCode):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


def _record(context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
    """Set the current (server) span's gRPC status code, and ERROR for a non-OK one."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    span = trace.get_current_span()
    if not span.is_recording():
        return
    code = _status_code(context, exc)
    span.set_attribute(STATUS_CODE_ATTRIBUTE, code.value[0])
    if code is not grpc.StatusCode.OK:
        try:
            details = context.details()
        except Exception:
            details = None
        if isinstance(details, bytes):
            details = details.decode(errors="replace")
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))


class _StatusRecorder(grpc.aio.ServerInterceptor):
    """Sets the server span's status from the gRPC status the call ends with.

    OpenTelemetry's context wrapper sees `abort` and `set_code` but not `abort_with_status`
    (which the project's status mapping uses), and marks only server-side codes as errors;
    this interceptor, inside the span, reads the final code from the context instead.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not _traced(handler_call_details):
            return handler
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary), request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary), request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream), request_deserializer=deserializer, response_serializer=serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream), request_deserializer=deserializer, response_serializer=serializer
        )


def _unary(inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        exc: BaseException | None = None
        try:
            return await inner(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            _record(context, exc)

    return behavior


def _streaming(inner: Callable[[Any, grpc.aio.ServicerContext], Any]) -> Callable[..., Any]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        exc: BaseException | None = None
        try:
            async for response in inner(request, context):
                yield response
        except BaseException as e:
            exc = e
            raise
        finally:
            _record(context, exc)

    async def writer_behavior(request: Any, context: grpc.aio.ServicerContext) -> None:
        # Handlers that stream with `await context.write(...)` instead of yield.
        exc: BaseException | None = None
        try:
            await inner(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            _record(context, exc)

    return behavior if inspect.isasyncgenfunction(inner) else writer_behavior
