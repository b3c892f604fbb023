"""balpm client SDK: `balpm.Client` and the `balpm` CLI."""

from balpm.client import Client, UploadSummary
from balpm.errors import (
    AbortedError,
    AlreadyExistsError,
    BalpmError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "BalpmError",
    "Client",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UploadSummary",
]
