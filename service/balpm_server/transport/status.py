"""The one place where exceptions become gRPC statuses.

`GRPC_CODE` is the table from a domain error's kind (`balpm_server.errors.ErrorKind`)
to its status code; the status carries a `google.rpc.Status` with `ErrorInfo` (stable
reason, domain "balpm.dev") and, when a field is named, `BadRequest.FieldViolation`.
A storage fault (full disk, read-only or failing volume, see
`balpm_server.storage.faults`) becomes RESOURCE_EXHAUSTED or UNAVAILABLE with a stable
reason and a message naming no path (the original, with its path, goes to the server
log). Anything else is logged with its traceback and becomes INTERNAL with a generic
message. Every error status also carries the call's `x-request-id` in its trailing
metadata.

`abort` applies the mapping; `failures_as_status` applies it to whatever a block
raises. The server interceptor (`balpm_server.transport.interceptors`) runs every RPC,
its own steps (authentication, undecodable requests) and the handler, inside
`failures_as_status`, so no method opts in and none can forget to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from balpm_server import errors
from balpm_server.errors import ErrorKind
from balpm_server.logs import REQUEST_ID
from balpm_server.storage.faults import storage_error

log = logging.getLogger(__name__)
ERROR_DOMAIN = "balpm.dev"

# Every kind, once; a kind missing here fails `test_every_error_kind_has_a_status_code`.
GRPC_CODE: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


MAX_MESSAGE_CHARS = 1024
MAX_METADATA_CHARS = 256


def _clip(text: str, limit: int) -> str:
    """Bound text echoed from requests: status details travel in HTTP/2 trailers (8-16 KiB limits)."""
    return text if len(text) <= limit else text[: limit - 15] + f"...[{len(text)} chars]"


def grpc_code(err: errors.BalpmError) -> grpc.StatusCode:
    """The status code a domain error is sent with."""
    return GRPC_CODE[err.kind]


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
    return status_pb2.Status(code=grpc_code(err).value[0], message=message, details=packed)


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


def relayed_status(code: grpc.StatusCode, details: str, trailing_metadata: Any) -> grpc.Status:
    """A status another replica answered a forwarded call with, passed on as is (with this call's request id)."""
    return _with_request_id(_Status(code, details, tuple(trailing_metadata)))


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


@contextlib.asynccontextmanager
async def failures_as_status(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    """End the call with the mapped status of any exception the block raises.

    A status already chosen (`grpc.aio.AbortError`) and cancellation (a BaseException)
    pass through unchanged.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await abort(context, exc, method)
        raise  # unreachable: abort raises
