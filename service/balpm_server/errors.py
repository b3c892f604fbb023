"""Typed domain errors: the only exceptions the domain raises on purpose.

Each carries a stable ``reason`` (for ``google.rpc.ErrorInfo``), an optional
``field`` (for ``google.rpc.BadRequest.FieldViolation``) and its ``kind``: a
transport-neutral category (`ErrorKind`). Nothing here knows gRPC: which status
code a kind is sent as is decided in one table, `balpm_server.transport.status`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import ClassVar


class ErrorKind(str, enum.Enum):
    """What kind of failure an error is, independent of any transport.

    The values are the canonical error names of `google.rpc.Code` (AIP-193), which
    every transport can map; they are also what a failed operation records as its
    `error_code`, so stored operations read the same after any change of transport.
    """

    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class BalpmError(Exception):
    """Base of all domain errors.

    Attributes:
        kind: The category of the failure (the transport picks the status code from it).
        reason: Stable UPPER_SNAKE reason for ErrorInfo.
        field: Request field at fault ("" when none).
        metadata: Extra string facts for ErrorInfo metadata.
    """

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"

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

    kind = ErrorKind.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(BalpmError):
    """A pool, item or operation does not exist (or is not visible to the caller)."""

    kind = ErrorKind.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(BalpmError):
    """A resource with this id exists with different content."""

    kind = ErrorKind.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BalpmError):
    """The pool is not in a state that allows the call (e.g. still featurising)."""

    kind = ErrorKind.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(BalpmError):
    """A configured limit was exceeded."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    default_reason = "LIMIT_EXCEEDED"


class Unavailable(BalpmError):
    """A dependency (Triton, the disk) is temporarily unavailable; retry later."""

    kind = ErrorKind.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Aborted(BalpmError):
    """A concurrent operation conflicts (e.g. a training job is already running)."""

    kind = ErrorKind.ABORTED
    default_reason = "ABORTED"


class Cancelled(BalpmError):
    """The operation was cancelled by a caller."""

    kind = ErrorKind.CANCELLED
    default_reason = "CANCELLED"


class Unauthenticated(BalpmError):
    """Missing or wrong credentials."""

    kind = ErrorKind.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(BalpmError):
    """The caller's key role does not allow this call."""

    kind = ErrorKind.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"
