"""Small helpers every domain module shares: content digests, page tokens, settled writes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import Awaitable
from typing import TypeVar

from balpm_server import errors

T = TypeVar("T")

DEFAULT_TENANT = "default"


def digest(*parts: object) -> str:
    """A stable SHA-256 hex digest of `parts` (their reprs, separated)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def page_token(value: int) -> str:
    """The opaque page token that resumes at `value` (a position the issuing call defines)."""
    return base64.urlsafe_b64encode(str(value).encode()).decode()


def parse_page_token(token: str, field: str = "page_token") -> int:
    """The position in a token from `page_token` ("" = 0).

    Raises:
        errors.InvalidArgument: Not a token this server issued.
    """
    if not token:
        return 0
    try:
        value = int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InvalidArgument("page_token is not a token this server issued", field=field) from e
    if not 0 <= value < 2**62:
        raise errors.InvalidArgument("page_token is not a token this server issued", field=field)
    return value


async def settled(write: Awaitable[T]) -> T:
    """Await `write`; if the caller is cancelled meanwhile, still wait for it to settle.

    Used under a pool lock, so the next caller's checks never run before a write they
    must see has committed or failed.
    """
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise
