"""The one place where exceptions become gRPC statuses.

Domain errors (`balpm_server.errors.BalpmError`) map to their code with a
`google.rpc.Status` carrying `ErrorInfo` (stable reason, domain "balpm.dev") and,
when a field is named, `BadRequest.FieldViolation`. A storage fault (full disk,
read-only or failing volume, see `balpm_server.storage.faults`) becomes
RESOURCE_EXHAUSTED or UNAVAILABLE with a stable reason and a message naming no path
(the original, with its path, goes to the server log). Anything else is logged with
its traceback and becomes INTERNAL with a generic message. Every error status also
carries the call's `x-request-id` in its trailing metadata.

Used by the servicer (`@unary`, `@streaming`) and by the interceptor (`abort`, for
authentication failures and undecodable requests), so there is one mapping.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from balpm_server import errors
from balpm_server.logs import REQUEST_ID
from balpm_server.storage.faults import storage_error

log = logging.getLogger(__name__)
ERROR_DOMAIN = "balpm.dev"

Req = TypeVar("Req")
Resp = TypeVar("Resp")


MAX_MESSAGE_CHARS = 1024
MAX_METADATA_CHARS = 256


def _clip(text: str, limit: int) -> str:
    """Bound text echoed from requests: status details travel in HTTP/2 trailers (8-16 KiB limits)."""
    return text if len(text) <= limit else text[: limit - 15] + f"...[{len(text)} chars]"


def to_status_proto(err: errors.BalpmError) -> status_pb2.Status:
    """Build the rich status of a domain error (message and metadata clipped to bounded sizes)."""
    message = _clip(err.message, MAX_MESSAGE_CHARS)
    metadata = {_clip(k, 64): _clip(v, MAX_METADATA_CHARS) for k, v in err.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=metadata)
    details: list[Any] = [info]
    if err.field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=_clip(err.field, 256), description=message)
                ]
            )
        )
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=err.code.value[0], message=message, details=packed)


def internal_status() -> status_pb2.Status:
    """The generic status of an unexpected failure (details stay in the server log)."""
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")


class _StatusFields(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: Any


class _Status(_StatusFields, grpc.Status):
    """A `grpc.Status` value."""


def _with_request_id(status: grpc.Status) -> grpc.Status:
    rid = REQUEST_ID.get()
    trailing = tuple(status.trailing_metadata or ())  # type: ignore[attr-defined]
    if rid:
        trailing = (*trailing, ("x-request-id", rid))
    return _Status(status.code, status.details, trailing)  # type: ignore[attr-defined]


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with the status of `exc` (never returns: raises `grpc.aio.AbortError`).

    Args:
        context: The call's context.
        exc: A `BalpmError` (mapped to its code and details), a storage fault (its
            `storage_error`, logged) or anything else (INTERNAL, logged).
        method: Method name for the log.
    """
    if isinstance(exc, errors.BalpmError):
        await context.abort_with_status(_with_request_id(rpc_status.to_status(to_status_proto(exc))))
    fault = storage_error(exc)
    if fault is not None:
        log.error("storage failure in %s (%s): %s", method, fault.reason, exc, exc_info=exc)
        await context.abort_with_status(_with_request_id(rpc_status.to_status(to_status_proto(fault))))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort_with_status(_with_request_id(rpc_status.to_status(internal_status())))


_abort = abort


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Wrap a unary-response servicer method with the error mapping."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)
            raise  # unreachable: abort raises

    return wrapper


def streaming(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Wrap a server-streaming servicer method with the error mapping."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)

    return wrapper
