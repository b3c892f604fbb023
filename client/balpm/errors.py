"""The SDK's one error family, built from a gRPC error's rich status in one place.

Every failure of the SDK, the CLI, `balpm.simulate`, `balpm.oracles` and the integrations is a
`BalpmError`: server errors by status code (`ERROR_CLASSES`), and the client's own
(`WaitTimeoutError`, `InvalidInputError`, `MissingDependencyError`) under the code they resemble.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

_E = TypeVar("_E", bound="BalpmError")


@dataclass(frozen=True)
class FieldViolation:
    """A request field the server rejected."""

    field: str
    description: str


class BalpmError(Exception):
    """Any failed balpm call; `ERROR_CLASSES` names the subclass of each gRPC status code.

    Attributes:
        code: The gRPC status code.
        message: The server's message.
        reason: Stable ErrorInfo reason ("" if none).
        metadata: ErrorInfo metadata.
        field_violations: BadRequest field violations.
    """

    #: The status code of errors the client raises itself (`local`).
    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

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

    @classmethod
    def local(
        cls: type[_E],
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field: str = "",
    ) -> _E:
        """An error raised by the client itself (no call failed), with the class's status code `CODE`.

        Args:
            message: What went wrong.
            reason: Stable reason, e.g. "WAIT_TIMEOUT".
            metadata: Extra key/values.
            field: The offending argument or input field, if any.
        """
        violations = [FieldViolation(field, message)] if field else None
        return cls(cls.CODE, message, reason=reason, metadata=dict(metadata or {}), field_violations=violations)


class CallCancelledError(BalpmError):
    """CANCELLED: the call was cancelled, usually by the caller (this is not asyncio.CancelledError)."""

    CODE = grpc.StatusCode.CANCELLED


class UnknownError(BalpmError):
    """UNKNOWN: the server failed without saying why."""

    CODE = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(BalpmError):
    """INVALID_ARGUMENT: a request field is malformed."""

    CODE = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(BalpmError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""

    CODE = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(BalpmError):
    """NOT_FOUND: the pool, item or operation does not exist."""

    CODE = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(BalpmError):
    """ALREADY_EXISTS: the id is taken (with different content)."""

    CODE = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(BalpmError):
    """PERMISSION_DENIED: the key's role does not allow this call."""

    CODE = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(BalpmError):
    """RESOURCE_EXHAUSTED: a server limit was reached."""

    CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(BalpmError):
    """FAILED_PRECONDITION: the pool is not in a state that allows the call."""

    CODE = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(BalpmError):
    """ABORTED: a conflicting operation is running."""

    CODE = grpc.StatusCode.ABORTED


class OutOfRangeError(BalpmError):
    """OUT_OF_RANGE: a value is past the valid range."""

    CODE = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(BalpmError):
    """UNIMPLEMENTED: the server does not implement the method (e.g. an older server)."""

    CODE = grpc.StatusCode.UNIMPLEMENTED


class InternalError(BalpmError):
    """INTERNAL: a server bug."""

    CODE = grpc.StatusCode.INTERNAL


class UnavailableError(BalpmError):
    """UNAVAILABLE: the server or one of its dependencies is down; retry."""

    CODE = grpc.StatusCode.UNAVAILABLE


class DataLossError(BalpmError):
    """DATA_LOSS: unrecoverable data loss or corruption."""

    CODE = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(BalpmError):
    """UNAUTHENTICATED: missing or wrong API key."""

    CODE = grpc.StatusCode.UNAUTHENTICATED


# ---- raised by the client itself, before or instead of a call --------------------------------


class WaitTimeoutError(DeadlineExceededError):
    """The client gave up waiting for a pool, an operation or the server (reason WAIT_TIMEOUT)."""


class InvalidInputError(InvalidArgumentError):
    """Bad local input caught before any call: an unknown enum name, a malformed item or label, an
    unreadable or malformed file (reason INVALID_INPUT unless more specific)."""


class MissingDependencyError(FailedPreconditionError):
    """An optional dependency is not installed, e.g. numpy or matplotlib of the `balpm[sim]` extra
    (reason MISSING_DEPENDENCY; metadata `module` and `extra`)."""


#: The error class of every gRPC status code but OK: what `from_rpc_error` raises.
ERROR_CLASSES: Mapping[grpc.StatusCode, type[BalpmError]] = MappingProxyType(
    {
        cls.CODE: cls
        for cls in (
            CallCancelledError,
            UnknownError,
            InvalidArgumentError,
            DeadlineExceededError,
            NotFoundError,
            AlreadyExistsError,
            PermissionDeniedError,
            ResourceExhaustedError,
            FailedPreconditionError,
            AbortedError,
            OutOfRangeError,
            UnimplementedError,
            InternalError,
            UnavailableError,
            DataLossError,
            UnauthenticatedError,
        )
    }
)
_BY_CODE = ERROR_CLASSES  # the former private name
_CODE_OF_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a numeric google.rpc code (UNKNOWN for a number gRPC does not define)."""
    return _CODE_OF_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def missing_dependency(module: str, extra: str, what: str) -> MissingDependencyError:
    """The error for an optional module that is not installed.

    Args:
        module: The module that failed to import, e.g. "matplotlib".
        extra: The `balpm` extra that provides it, e.g. "sim".
        what: What needs it, e.g. "balpm simulate --plot".
    """
    return MissingDependencyError.local(
        f"{what} needs {module}: pip install 'balpm[{extra}]'",
        reason="MISSING_DEPENDENCY",
        metadata={"module": module, "extra": extra},
    )


def _details(status: status_pb2.Status | None) -> tuple[str, dict[str, str], list[FieldViolation]]:
    reason, metadata, violations = "", {}, []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return reason, metadata, violations


def from_status(status: status_pb2.Status, *, reason: str = "") -> BalpmError:
    """The error of a google.rpc.Status, e.g. a failed Operation's `error`, with its details.

    Args:
        status: The status.
        reason: Replaces the ErrorInfo reason, which is then kept as metadata["error_reason"].
    """
    code = status_code(status.code)
    if code == grpc.StatusCode.OK:  # a failure without an error code
        code = grpc.StatusCode.UNKNOWN
    info_reason, metadata, violations = _details(status)
    if reason and info_reason:
        metadata["error_reason"] = info_reason
    cls = ERROR_CLASSES.get(code, BalpmError)
    return cls(code, status.message, reason=reason or info_reason, metadata=metadata, field_violations=violations)


def from_rpc_error(err: grpc.RpcError) -> BalpmError:
    """Convert a gRPC error (blocking or asyncio, with or without rich details) to the SDK's error type."""
    call = err  # grpc.RpcError raised by a call is also a grpc.Call
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message = call.details() if hasattr(call, "details") else str(err)
    try:
        status = rpc_status.from_call(call)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        status = None
    reason, metadata, violations = _details(status)
    cls = ERROR_CLASSES.get(code, BalpmError)
    return cls(code, message or "", reason=reason, metadata=metadata, field_violations=violations)


__all__ = [
    "ERROR_CLASSES",
    "AbortedError",
    "AlreadyExistsError",
    "BalpmError",
    "CallCancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "InvalidInputError",
    "MissingDependencyError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "WaitTimeoutError",
    "from_rpc_error",
    "from_status",
    "missing_dependency",
    "status_code",
]
