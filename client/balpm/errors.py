"""The SDK's one error family, built from a gRPC error's rich status in one place."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """A request field the server rejected."""

    field: str
    description: str


class BalpmError(Exception):
    """Any failed balpm call.

    Attributes:
        code: The gRPC status code.
        message: The server's message.
        reason: Stable ErrorInfo reason ("" if none).
        metadata: ErrorInfo metadata.
        field_violations: BadRequest field violations.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations or []

    @property
    def field(self) -> str:
        """The first violated field ("" if none)."""
        return self.field_violations[0].field if self.field_violations else ""


class InvalidArgumentError(BalpmError):
    """INVALID_ARGUMENT: a request field is malformed."""


class NotFoundError(BalpmError):
    """NOT_FOUND: the pool, item or operation does not exist."""


class AlreadyExistsError(BalpmError):
    """ALREADY_EXISTS: the id is taken (with different content)."""


class FailedPreconditionError(BalpmError):
    """FAILED_PRECONDITION: the pool is not in a state that allows the call."""


class ResourceExhaustedError(BalpmError):
    """RESOURCE_EXHAUSTED: a server limit was reached."""


class UnavailableError(BalpmError):
    """UNAVAILABLE: the server or one of its dependencies is down; retry."""


class AbortedError(BalpmError):
    """ABORTED: a conflicting operation is running."""


class UnauthenticatedError(BalpmError):
    """UNAUTHENTICATED: missing or wrong API key."""


class PermissionDeniedError(BalpmError):
    """PERMISSION_DENIED: the key's role does not allow this call."""


class DeadlineExceededError(BalpmError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""


_BY_CODE: dict[grpc.StatusCode, type[BalpmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(err: grpc.RpcError) -> BalpmError:
    """Convert a gRPC error (with or without rich details) to the SDK's error type."""
    call = err  # grpc.RpcError raised by a call is also a grpc.Call
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message = call.details() if hasattr(call, "details") else str(err)
    reason, metadata, violations = "", {}, []
    try:
        status = rpc_status.from_call(call)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    cls = _BY_CODE.get(code, BalpmError)
    return cls(code, message or "", reason=reason, metadata=metadata, field_violations=violations)


__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "BalpmError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]
