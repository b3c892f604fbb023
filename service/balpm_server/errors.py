"""Typed domain errors: the only exceptions the domain raises on purpose.

Each carries a stable ``reason`` (for ``google.rpc.ErrorInfo``), an optional
``field`` (for ``google.rpc.BadRequest.FieldViolation``) and the gRPC status
code the transport maps it to. The mapping to gRPC lives in one place:
`balpm_server.transport.status`.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc


class BalpmError(Exception):
    """Base of all domain errors.

    Attributes:
        code: gRPC status code the transport sends.
        reason: Stable UPPER_SNAKE reason for ErrorInfo.
        field: Request field at fault ("" when none).
        metadata: Extra string facts for ErrorInfo metadata.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str = "",
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(BalpmError):
    """A request field is malformed (wrong dimension, NaN, out of range)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(BalpmError):
    """A pool, item or operation does not exist (or is not visible to the caller)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(BalpmError):
    """A resource with this id exists with different content."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BalpmError):
    """The pool is not in a state that allows the call (e.g. still featurising)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(BalpmError):
    """A configured limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "LIMIT_EXCEEDED"


class Unavailable(BalpmError):
    """A dependency (Triton, the disk) is temporarily unavailable; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Aborted(BalpmError):
    """A concurrent operation conflicts (e.g. a training job is already running)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Cancelled(BalpmError):
    """The operation was cancelled by a caller."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unauthenticated(BalpmError):
    """Missing or wrong credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(BalpmError):
    """The caller's key role does not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"
