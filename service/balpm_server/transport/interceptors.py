"""The server interceptor: request ids, authentication, tenant scoping, metrics, access log.

It wraps each method handler (rather than acting before it) so that everything it
sets runs inside the handler's own task: with `grpc.aio`, context variables set in
`intercept_service` itself do not reach the handler. Per RPC it

1. takes `x-request-id` from the metadata (or makes one), puts it in `REQUEST_ID` and
   echoes it in the trailing metadata (on success and on errors);
2. for `balpm.v1.BalpmService` with an API key store: authenticates the bearer token,
   checks the key's role and sets `CURRENT_TENANT` to the key's tenant (health and
   reflection stay open);
3. turns requests that cannot be decoded into INVALID_ARGUMENT (gRPC itself would
   answer INTERNAL);
4. maps every exception of the call — its own (authentication, undecodable requests)
   and the handler's, for every method of every service — to a status through the one
   mapping, `transport.status.abort`: servicer methods raise domain errors and never
   opt in, so a new RPC cannot forget it;
5. records `balpm_rpc_requests_total` / `balpm_rpc_duration_seconds` by method and
   code, and writes one access-log line (method, code, duration_ms, tenant, request_id).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from balpm_server import errors, metrics
from balpm_server.auth import KeyStore, authenticate
from balpm_server.logs import ACCESS_LOG, REQUEST_ID, request_id_from
from balpm_server.transport import status
from balpm_server.transport.forwarding import FORWARDED_FROM, Forwarder, Moved, prepend
from balpm_server.transport.servicer import CURRENT_TENANT

QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})


class _Malformed:
    """Stands for a request message that could not be decoded."""

    def __repr__(self) -> str:
        return "<malformed request>"


MALFORMED = _Malformed()


class _NulIn:
    """Stands for a request with a NUL character in a string field (no database stores those)."""

    def __init__(self, field: str) -> None:
        self.field = field


def _repeated(fd: Any) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else fd.label == fd.LABEL_REPEATED


def nul_field(msg: Any, prefix: str = "") -> str | None:
    """The path of the first string field (at any depth, map keys included) holding a NUL character, or None."""
    for fd, value in msg.ListFields():
        name = prefix + fd.name
        if fd.type == fd.TYPE_STRING:
            values = enumerate(value) if _repeated(fd) else [(None, value)]
            for i, text in values:
                if "\x00" in text:
                    return name if i is None else f"{name}[{i}]"
        elif fd.type == fd.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        return f"{name}[{key!r}]"
                    found = nul_field(item, f"{name}[{key!r}].") if hasattr(item, "ListFields") else None
                    if found is None and isinstance(item, str) and "\x00" in item:
                        found = f"{name}[{key!r}]"
                    if found:
                        return found
            elif _repeated(fd):
                for i, item in enumerate(value):
                    if (found := nul_field(item, f"{name}[{i}].")) is not None:
                        return found
            elif (found := nul_field(value, name + ".")) is not None:
                return found
    return None


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            msg = deserializer(raw)
        except Exception:
            return MALFORMED
        found = nul_field(msg)
        return _NulIn(found) if found is not None else msg

    return deserialize


def _refused(msg: Any) -> errors.InvalidArgument | None:
    """The error for a request message that cannot be served as decoded, else None."""
    if msg is MALFORMED:
        return _malformed_error()
    if isinstance(msg, _NulIn):
        return errors.InvalidArgument(
            f"{msg.field} contains a NUL character (U+0000), which no text field may hold",
            field=msg.field, reason="NUL_CHARACTER",
        )
    return None


def _malformed_error() -> errors.InvalidArgument:
    return errors.InvalidArgument(
        "the request message could not be decoded as this method's request type", reason="MALFORMED_REQUEST"
    )


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for msg in requests:
        if (refused := _refused(msg)) is not None:
            raise refused
        yield msg


def _code_name(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code()
    except Exception:  # older grpc without ServicerContext.code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return "UNKNOWN"
    return "OK"


class _Call:
    """Book-keeping of one RPC."""

    __slots__ = ("code", "deadline_s", "forwarded_from", "method", "peer", "request_id", "service", "started", "tenant")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self.started = time.perf_counter()
        self.request_id = ""
        self.tenant = ""
        self.code = "OK"
        self.peer = ""
        self.forwarded_from = ""  # the replica that relayed the call here (cluster mode)
        self.deadline_s: float | None = None  # the time the caller's deadline left at arrival


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, auth, tenant, metrics and access log for every RPC.

    Args:
        keys: API keys; None disables authentication (every call gets the default tenant).
        protected_service: Full name of the service that needs authentication.
        forwarder: Cluster mode: relays pool-scoped calls to the pool's owner replica (after
            authentication, so a call with a bad key never leaves this replica).
    """

    def __init__(self, keys: KeyStore | None, protected_service: str, forwarder: Forwarder | None = None) -> None:
        self.keys = keys
        self.protected_service = protected_service
        self.forwarder = forwarder

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full: str = handler_call_details.method  # type: ignore[attr-defined]
        service, _, method = full.lstrip("/").rpartition("/")
        ours = service == self.protected_service
        deserializer = _safe_deserializer(handler.request_deserializer) if ours else handler.request_deserializer
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, method, ours, stream_in=False),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, service, method, ours, stream_in=True),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, service, method, ours, stream_in=False),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, service, method, ours, stream_in=True),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )

    # ---- per-call steps -----------------------------------------------------------------

    async def _enter(self, call: _Call, context: grpc.aio.ServicerContext, request: Any, ours: bool) -> Any:
        """Set the request id, authenticate, set the tenant; returns the request to pass on."""
        # Read the peer now: after a streaming call ends (e.g. the client stops reading),
        # the context's C call is released and context.peer() would dereference NULL.
        call.peer = context.peer()
        metadata = context.invocation_metadata() or ()
        incoming = next((v for k, v in metadata if k == "x-request-id"), None)
        call.forwarded_from = str(next((v for k, v in metadata if k == FORWARDED_FROM), ""))
        call.deadline_s = context.time_remaining()
        call.request_id = request_id_from(incoming)
        REQUEST_ID.set(call.request_id)
        metrics.RPC_IN_FLIGHT.labels(call.service, call.method).inc()
        # Trailing, not initial, metadata: an eager initial-metadata write costs a round of
        # I/O per call; error statuses add the id to their own trailing metadata (status.py).
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        if not ours:
            return request
        if self.keys is not None:
            principal = authenticate(self.keys, metadata, call.method)
            CURRENT_TENANT.set(principal.tenant)
        call.tenant = CURRENT_TENANT.get()
        if (refused := _refused(request)) is not None:
            raise refused
        return request

    async def _admit(
        self, call: _Call, context: grpc.aio.ServicerContext, request: Any, ours: bool, stream_in: bool
    ) -> Any:
        """`_enter` plus stream checking; returns the request to hand to the method."""
        request = await self._enter(call, context, request, ours)
        if ours and stream_in:
            request = _checked_stream(request)
        return request

    def _exit(self, call: _Call, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        call.code = _code_name(context, exc)
        elapsed_s = time.perf_counter() - call.started
        metrics.RPC_IN_FLIGHT.labels(call.service, call.method).dec()
        metrics.observe_rpc(call.service, call.method, call.code, elapsed_s)
        level = logging.DEBUG if call.service in QUIET_SERVICES else logging.INFO
        if ACCESS_LOG.isEnabledFor(level):
            ACCESS_LOG.log(
                level,
                "%s %s %.1f ms tenant=%s request_id=%s",
                call.method,
                call.code,
                elapsed_s * 1000.0,
                call.tenant or "-",
                call.request_id,
                extra={
                    "rpc_service": call.service,
                    "method": call.method,
                    "code": call.code,
                    "duration_ms": round(elapsed_s * 1000.0, 3),
                    "tenant": call.tenant,
                    "request_id": call.request_id,
                    "peer": call.peer,
                    "forwarded_from": call.forwarded_from,
                    "deadline_s": None if call.deadline_s is None else round(call.deadline_s, 3),
                },
            )

    def _unary(
        self, inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], service: str, method: str,
        ours: bool, *, stream_in: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(service, method)
            exc: BaseException | None = None
            try:
                async with status.failures_as_status(context, method):
                    request = await self._admit(call, context, request, ours, stream_in)
                    if ours and self.forwarder is not None:
                        probe = request
                        if stream_in:  # the pool is named in the stream's first message
                            stream = request.__aiter__()
                            probe = await anext(stream, None)
                            request = stream if probe is None else prepend(probe, stream)
                        address = None
                        if probe is not None:
                            address = await self.forwarder.target(method, call.tenant, probe, context)
                        if address is not None and stream_in:
                            return await self.forwarder.unary(address, method, request, context, call.request_id)
                        if address is not None:
                            try:
                                return await self.forwarder.unary(
                                    address, method, request, context, call.request_id, raise_moved=True
                                )
                            except Moved:  # the pool moved meanwhile: route once more (maybe here)
                                address = await self.forwarder.target(method, call.tenant, request, context)
                                if address is not None:
                                    return await self.forwarder.unary(
                                        address, method, request, context, call.request_id
                                    )
                    return await inner(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._exit(call, context, exc)

        return behavior

    def _streaming(
        self, inner: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], service: str, method: str,
        ours: bool, *, stream_in: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(service, method)
            exc: BaseException | None = None
            try:
                async with status.failures_as_status(context, method):
                    request = await self._admit(call, context, request, ours, stream_in)
                    responses = inner(request, context)
                    forwarder = self.forwarder if ours and not stream_in else None
                    if forwarder is not None:
                        address = await forwarder.target(method, call.tenant, request, context)
                        if address is not None:
                            responses = forwarder.unary_stream(address, method, request, context, call.request_id)
                    async for response in responses:
                        yield response
            except BaseException as e:
                exc = e
                raise
            finally:
                self._exit(call, context, exc)

        async def writer_behavior(request: Any, context: grpc.aio.ServicerContext) -> None:
            # Handlers that stream with `await context.write(...)` (e.g. Health.Watch) instead of yield.
            call = _Call(service, method)
            exc: BaseException | None = None
            try:
                async with status.failures_as_status(context, method):
                    request = await self._admit(call, context, request, ours, stream_in)
                    await cast(Awaitable[None], inner(request, context))
            except BaseException as e:
                exc = e
                raise
            finally:
                self._exit(call, context, exc)

        if inspect.isasyncgenfunction(inner):
            return behavior
        return cast(Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], writer_behavior)
