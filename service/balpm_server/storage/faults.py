"""Storage faults (full, read-only or failing volume) as domain errors that name no path.

SQLite, `os`, numpy and safetensors report a full or read-only disk in their own
ways: `sqlite3.OperationalError("database or disk is full")`, `OSError(ENOSPC)`
with the file name, a safetensors error quoting the Rust I/O error ("... (os error
28) at path ..."). `storage_error` recognises them (also when they are the cause or
context of another exception, e.g. a failed ROLLBACK after a failed write) and
returns the error callers see:

- full disk or quota (`ENOSPC`, `EDQUOT`, `SQLITE_FULL`): `RESOURCE_EXHAUSTED`, reason `DISK_FULL`;
- read-only or not writable (`EROFS`, `EACCES`, `SQLITE_READONLY`): `UNAVAILABLE`, reason `STORAGE_READ_ONLY`;
- an I/O error or a file that cannot be opened (`EIO`, `SQLITE_IOERR`, `SQLITE_CANTOPEN`):
  `UNAVAILABLE`, reason `STORAGE_UNAVAILABLE`;
- PostgreSQL down, restarting or unreachable (a lost connection, no connection from the
  pool in time, ``57P0x``): `UNAVAILABLE`, reason `DATABASE_UNAVAILABLE`; its disk full
  (``53100``): `DISK_FULL`; a read-only standby (``25006``): `STORAGE_READ_ONLY`;
- the artifact store (bucket) unreachable or refusing: `UNAVAILABLE`, reason
  `ARTIFACT_STORE_UNAVAILABLE`.

Messages are fixed sentences: the server's paths stay in its log. Nothing is
acknowledged before its commit, so after the operator frees space (or remounts the
volume writable) the same calls succeed.
"""

from __future__ import annotations

import errno
import re
import sqlite3
import sys
from collections.abc import Iterator

from balpm_server import errors
from balpm_server.storage.artifacts import ArtifactStoreError

DISK_FULL = "DISK_FULL"
STORAGE_READ_ONLY = "STORAGE_READ_ONLY"
STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
ARTIFACT_STORE_UNAVAILABLE = "ARTIFACT_STORE_UNAVAILABLE"

MESSAGES = {
    DISK_FULL: "the server's storage is full; free space or grow the volume, then retry",
    STORAGE_READ_ONLY: "the server's storage is read-only or not writable; make the data volume writable, then retry",
    STORAGE_UNAVAILABLE: "the server's storage failed to read, write or open a file; check the data volume, then retry",
    DATABASE_UNAVAILABLE: "the server's database is unreachable or restarting; retry shortly",
    ARTIFACT_STORE_UNAVAILABLE: "the server's artifact store (bucket) failed or is unreachable; retry shortly",
}

_ERRNO_REASON: dict[int, str] = {
    errno.ENOSPC: DISK_FULL,
    errno.EROFS: STORAGE_READ_ONLY,
    errno.EACCES: STORAGE_READ_ONLY,
    errno.EIO: STORAGE_UNAVAILABLE,
}
if hasattr(errno, "EDQUOT"):  # not on every platform
    _ERRNO_REASON[errno.EDQUOT] = DISK_FULL

# sqlite3 error messages (sqlite3_errstr of the primary result code) and error names.
_SQLITE_MESSAGE_REASON = {
    "database or disk is full": DISK_FULL,
    "attempt to write a readonly database": STORAGE_READ_ONLY,
    "disk i/o error": STORAGE_UNAVAILABLE,
    "unable to open database file": STORAGE_UNAVAILABLE,
}
_SQLITE_NAME_REASON = {
    "SQLITE_FULL": DISK_FULL,
    "SQLITE_READONLY": STORAGE_READ_ONLY,
    "SQLITE_IOERR": STORAGE_UNAVAILABLE,
    "SQLITE_CANTOPEN": STORAGE_UNAVAILABLE,
}

# PostgreSQL SQLSTATEs that are storage faults (the rest of class 08 / 57P0x: DATABASE_UNAVAILABLE).
_PG_SQLSTATE_REASON = {"53100": DISK_FULL, "25006": STORAGE_READ_ONLY}

# How Rust's std::io::Error prints an OS error (safetensors, tokenizers): "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")

_MAX_CHAIN = 16


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts (depth-first, each once, bounded)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < _MAX_CHAIN:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        context = None if e.__suppress_context__ else e.__context__  # `raise ... from None` hides it
        for nxt in (context, e.__cause__):  # the cause is looked at first
            if nxt is not None:
                todo.append(nxt)


def _reason_of(exc: BaseException) -> tuple[str, str] | None:
    """(reason, what was recognised) of one exception, without looking at its chain."""
    if isinstance(exc, errors.BalpmError):
        return None
    if isinstance(exc, OSError):
        reason = _ERRNO_REASON.get(exc.errno or 0)
        return (reason, errno.errorcode.get(exc.errno or 0, "")) if reason else None
    if isinstance(exc, sqlite3.DatabaseError):
        name = str(getattr(exc, "sqlite_errorname", "") or "")
        for prefix, reason in _SQLITE_NAME_REASON.items():  # extended codes: SQLITE_IOERR_WRITE, ...
            if name == prefix or name.startswith(prefix + "_"):
                return reason, name
        text = str(exc).strip().lower()
        for message, reason in _SQLITE_MESSAGE_REASON.items():
            if text.startswith(message):
                return reason, name or message
        return None
    pg = _postgres_reason(exc)
    if pg is not None:
        return pg
    if isinstance(exc, ArtifactStoreError):  # the bucket: unreachable, denied, missing (details in the log)
        return ARTIFACT_STORE_UNAVAILABLE, type(exc).__name__
    m = _RUST_OS_ERROR.search(str(exc))
    if m:
        code = int(m.group(1))
        reason = _ERRNO_REASON.get(code)
        return (reason, errno.errorcode.get(code, "")) if reason else None
    return None


def _postgres_reason(exc: BaseException) -> tuple[str, str] | None:
    """(reason, cause) of a psycopg error that is a storage fault (psycopg is imported only if in use)."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return None
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    if sqlstate in _PG_SQLSTATE_REASON:
        return _PG_SQLSTATE_REASON[sqlstate], sqlstate
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and (
        not sqlstate or sqlstate.startswith(("08", "57P"))
    ):
        return DATABASE_UNAVAILABLE, sqlstate or type(exc).__name__
    return None


def storage_error(exc: BaseException) -> errors.BalpmError | None:
    """The domain error for a storage fault in `exc` (or its cause/context), else None.

    Args:
        exc: Any exception (a `BalpmError` itself is never reclassified).

    Returns:
        `ResourceExhausted` (reason `DISK_FULL`) or `Unavailable` (`STORAGE_READ_ONLY`,
        `STORAGE_UNAVAILABLE`) with a message naming no path, and the low-level cause
        (e.g. `ENOSPC`, `SQLITE_FULL`) in metadata `cause`; None when `exc` is not a
        storage fault.
    """
    if isinstance(exc, errors.BalpmError):
        return None
    for e in _chain(exc):
        found = _reason_of(e)
        if found is None:
            continue
        reason, cause = found
        cls = errors.ResourceExhausted if reason == DISK_FULL else errors.Unavailable
        return cls(MESSAGES[reason], reason=reason, metadata={"cause": cause} if cause else None)
    return None


def is_database_error(exc: BaseException) -> bool:
    """Whether `exc` is an error of the metadata database itself (e.g. a corrupt file), fault or not."""
    psycopg = sys.modules.get("psycopg")
    return isinstance(exc, sqlite3.Error) or (psycopg is not None and isinstance(exc, psycopg.Error))
