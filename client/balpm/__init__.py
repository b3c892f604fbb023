"""balpm client SDK: `balpm.Client` (blocking), `balpm.AsyncClient` (asyncio) and the `balpm` CLI.

The package needs grpcio, grpcio-status and protobuf only; `balpm.simulate`, `balpm.oracles` and
`balpm.plots` need the `balpm[sim]` extra (numpy, matplotlib). Every failure is a `BalpmError`.
"""

from balpm.aio import AsyncClient
from balpm.client import Client, UploadSummary
from balpm.errors import (
    ERROR_CLASSES,
    AbortedError,
    AlreadyExistsError,
    BalpmError,
    CallCancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    InvalidInputError,
    MissingDependencyError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    WaitTimeoutError,
)

__all__ = [
    "ERROR_CLASSES",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "BalpmError",
    "CallCancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
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
    "UploadSummary",
    "WaitTimeoutError",
]
