"""Cluster mode: forward a pool-scoped call to the replica that owns the pool.

Calls that need the owner's memory (acquisition, training, prediction, the pool's
featurisation state, its operations) run on the pool's owner; any replica accepts them
and, when it is not the owner, relays them over gRPC: the same request message, the
caller's metadata (its API key, so the owner authenticates the caller itself), its
`x-request-id` and what is left of its deadline. The owner's answer comes back as is:
the response, or the status with its code, message and rich details (trailing
metadata). A forwarded call never travels a second hop: a replica that receives one
for a pool it does not own answers UNAVAILABLE (NOT_POOL_OWNER), which the caller
retries. Label ingest, exports, pool creation and listing run wherever they land.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory

from balpm.errors import from_rpc_error
from balpm.v1 import balpm_pb2
from balpm_server import errors, metrics
from balpm_server.domain.cluster import Cluster
from balpm_server.settings import Settings
from balpm_server.storage.sql_store import NOT_POOL_OWNER
from balpm_server.transport import status

FORWARDED_FROM = "balpm-forwarded-from"
# Methods whose request names the pool in `pool_id`, or (UploadItems) in its first message's header.
POOL_METHODS = frozenset({
    "GetPool", "DeletePool", "UpdatePosterior", "AcquireBatch", "ReleaseItems", "ExcludeItems",
    "UpdateItemScores", "Predict", "Evaluate", "UploadItems", "GetLearningCurve",
})
OPERATION_METHODS = frozenset({"GetOperation", "WatchOperation", "CancelOperation"})
# Metadata a relayed call sets itself (or gRPC does), never copied from the caller's.
_OWN_KEYS = frozenset({
    "x-request-id", FORWARDED_FROM, "grpc-timeout", "user-agent", "content-type", "te", "authority",
    "grpc-accept-encoding", "grpc-encoding", "accept-encoding",
})
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """How one replica dials another: TLS when the server uses TLS (its client certificate under mutual TLS)."""
    if not settings.tls_cert_file:
        return None
    ca = Path(settings.cluster_tls_ca_file or settings.tls_cert_file).read_bytes()
    if settings.tls_client_ca_file:  # the peers require a client certificate: present our own
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=Path(settings.tls_key_file).read_bytes(),
            certificate_chain=Path(settings.tls_cert_file).read_bytes(),
        )
    return grpc.ssl_channel_credentials(root_certificates=ca)


class Forwarder:
    """Routes pool-scoped calls to their owner replica.

    Args:
        cluster: This replica's pool ownership.
        settings: Server settings (TLS, message size, whether tracing injects its own headers).
        service_name: Full name of the forwarded service.
    """

    def __init__(self, cluster: Cluster, settings: Settings, service_name: str) -> None:
        self.cluster = cluster
        self.service_name = service_name
        self._credentials = channel_credentials(settings)
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
        if self._credentials is not None and settings.cluster_tls_server_name:
            self._options.append(("grpc.ssl_target_name_override", settings.cluster_tls_server_name))
        # With tracing on, the instrumented channel writes the trace context of the relayed call.
        self._drop = _OWN_KEYS | _TRACE_KEYS if settings.otlp_endpoint else _OWN_KEYS
        self._channels: dict[str, grpc.aio.Channel] = {}
        service = balpm_pb2.DESCRIPTOR.services_by_name[service_name.rpartition(".")[2]]
        self._response_type: dict[str, Any] = {
            m.name: message_factory.GetMessageClass(m.output_type) for m in service.methods
        }

    async def close(self) -> None:
        """Close the channels to the other replicas."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    @staticmethod
    def is_forwarded(context: grpc.aio.ServicerContext) -> bool:
        """Whether the call was relayed here by another replica."""
        return any(k == FORWARDED_FROM for k, _ in context.invocation_metadata() or ())

    async def target(self, method: str, tenant: str, request: Any, context: grpc.aio.ServicerContext) -> str | None:
        """The owner's address when the call must be relayed there, None when it runs here.

        `request` is the request message (UploadItems: the stream's first message).
        """
        if method in OPERATION_METHODS:
            if not request.operation_id:
                return None
            return await self.cluster.route_operation(request.operation_id, forwarded=self.is_forwarded(context))
        if method not in POOL_METHODS:
            return None
        name = request.header.pool_id if method == "UploadItems" else request.pool_id
        key = await self.cluster.pool_key(tenant, name) if name else None
        if key is None:  # no such pool: answered here (NOT_FOUND, or the validation error)
            return None
        return await self.cluster.route(key, forwarded=self.is_forwarded(context))

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def _call_args(self, context: grpc.aio.ServicerContext, request_id: str) -> dict[str, Any]:
        metadata = [(k, v) for k, v in context.invocation_metadata() or () if k not in self._drop]
        metadata += [("x-request-id", request_id), (FORWARDED_FROM, self.cluster.replica_id)]
        return {"metadata": metadata, "timeout": context.time_remaining()}

    def _path(self, method: str) -> str:
        return f"/{self.service_name}/{method}"

    async def unary(
        self, address: str, method: str, request: Any, context: grpc.aio.ServicerContext, request_id: str,
        *, raise_moved: bool = False,
    ) -> Any:
        """Relay a unary call (or, with `request` an async iterator, a client-streaming one).

        Raises:
            Moved: With `raise_moved`, the owner refused the call as NOT_POOL_OWNER (the pool moved
                between the lookup and the call: a hand-over, a drain). Refused before any write,
                the call is safe to route again.
        """
        channel = self._channel(address)
        deserialize = self._response_type[method].FromString
        started = time.perf_counter()
        code = "OK"
        try:
            if hasattr(request, "__aiter__"):
                stream_call = channel.stream_unary(
                    self._path(method), request_serializer=_serialize, response_deserializer=deserialize
                )
                return await stream_call(request, **self._call_args(context, request_id))
            call = channel.unary_unary(
                self._path(method), request_serializer=_serialize, response_deserializer=deserialize
            )
            return await call(request, **self._call_args(context, request_id))
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            if raise_moved and _reason(e) == NOT_POOL_OWNER:
                raise Moved() from e
            await _abort_as(context, e, address)
            raise  # unreachable
        finally:
            _observe(method, code, time.perf_counter() - started)

    async def unary_stream(
        self, address: str, method: str, request: Any, context: grpc.aio.ServicerContext, request_id: str
    ) -> AsyncIterator[Any]:
        """Relay a server-streaming call, message by message."""
        call = self._channel(address).unary_stream(
            self._path(method), request_serializer=_serialize,
            response_deserializer=self._response_type[method].FromString,
        )
        started = time.perf_counter()
        code = "OK"
        try:
            async for response in call(request, **self._call_args(context, request_id)):
                yield response
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            await _abort_as(context, e, address)
        finally:
            _observe(method, code, time.perf_counter() - started)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def _observe(method: str, code: str, elapsed_s: float) -> None:
    metrics.FORWARDED_CALLS_TOTAL.labels(method, code).inc()
    metrics.FORWARD_DURATION_SECONDS.labels(method).observe(elapsed_s)


OWNER_UNAVAILABLE = "OWNER_UNAVAILABLE"


class Moved(Exception):
    """The owner answered NOT_POOL_OWNER: the pool moved."""


def _reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a status received from another replica ("" without one): the SDK's parser."""
    return from_rpc_error(err).reason


async def _abort_as(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError, address: str) -> None:
    """End the call with the owner's status: its code, message and rich details (never returns).

    A failure of the hop itself (the owner is down or unreachable: UNAVAILABLE without the
    owner's details) becomes UNAVAILABLE (OWNER_UNAVAILABLE): retryable, as the pool is
    taken over once the owner's ownership expires.

    Raises:
        errors.Unavailable: The owner could not be reached.
    """
    trailing = tuple((k, v) for k, v in err.trailing_metadata() or () if k != "x-request-id")
    if err.code() is grpc.StatusCode.UNAVAILABLE and not any(k == "grpc-status-details-bin" for k, _ in trailing):
        raise errors.Unavailable(
            f"the replica owning this pool ({address}) cannot be reached: {err.details()}; retry "
            "(another replica takes the pool over within the ownership TTL)",
            reason=OWNER_UNAVAILABLE,
        )
    await context.abort_with_status(status.relayed_status(err.code(), err.details() or "", trailing))


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream `first`, then `rest`."""
    yield first
    async for message in rest:
        yield message
