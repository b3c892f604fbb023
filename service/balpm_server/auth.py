"""API-key authentication and role-based authorisation.

Keys live in a JSON file (typically a Kubernetes Secret mounted as a file), stored
as SHA-256 digests, never in clear::

    {"keys": [{"id": "k1", "sha256": "<hex sha256 of the key>", "tenant": "acme", "role": "writer"}]}

Roles: ``admin`` and ``writer`` may call every method; ``reader`` may call only the
read methods in `READER_METHODS` (plus `ReleaseItems`, which ends the reader's own
leases from `AcquireBatch`). The file is re-read when it changes (checked at most
once per `check_interval_s`, by mtime/inode/size, which also catches the symlink
swap Kubernetes does on Secret updates) and on `reload()` (SIGHUP). A file that fails
to parse on reload keeps the previous keys and logs an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from balpm_server import errors, metrics

log = logging.getLogger(__name__)

ROLES = ("admin", "writer", "reader")
READER_METHODS = frozenset(
    {
        "GetPool",
        "ListPools",
        "AcquireBatch",
        "ReleaseItems",
        "Predict",
        "Evaluate",
        "GetLearningCurve",
        "ExportLabels",
        "ExportItems",
        "GetOperation",
        "WatchOperation",
    }
)
BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes:
        key_id: The key's id (safe to log).
        tenant: Tenant the key belongs to; scopes every pool.
        role: "admin", "writer" or "reader".
    """

    key_id: str
    tenant: str
    role: str

    def may_call(self, method: str) -> bool:
        """Whether the role allows a BalpmService method (short name, e.g. "CreatePool")."""
        return self.role in ("admin", "writer") or method in READER_METHODS


@dataclass(frozen=True)
class _Key:
    key_id: str
    digest: bytes
    tenant: str
    role: str


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key, as stored in the keys file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(raw: str, source: str = "api keys file") -> list[_Key]:
    """Parse and validate the keys file.

    Args:
        raw: File content.
        source: Name for error messages.

    Returns:
        The keys.

    Raises:
        ValueError: Malformed JSON or an invalid entry.
    """
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from e
    entries = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{source} must be an object with a "keys" list')
    keys: list[_Key] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: keys[{i}] is not an object")
        key_id, digest, tenant = entry.get("id"), entry.get("sha256"), entry.get("tenant")
        role = entry.get("role", "writer")
        if not isinstance(key_id, str) or not key_id:
            raise ValueError(f"{source}: keys[{i}].id is required")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{source}: keys[{i}].sha256 must be 64 hex characters")
        try:
            digest_bytes = bytes.fromhex(digest)
        except ValueError as e:
            raise ValueError(f"{source}: keys[{i}].sha256 is not hex") from e
        if not isinstance(tenant, str) or not tenant:
            raise ValueError(f"{source}: keys[{i}].tenant is required")
        if role not in ROLES:
            raise ValueError(f"{source}: keys[{i}].role must be one of {', '.join(ROLES)}")
        keys.append(_Key(key_id, digest_bytes, tenant, role))
    return keys


class KeyStore:
    """Hashed API keys from a file, reloaded when the file changes.

    Args:
        path: The JSON keys file.
        check_interval_s: Least time between two checks of the file's mtime.

    Raises:
        ValueError: The file is malformed (at construction only; later reloads keep the old keys).
        OSError: The file cannot be read (at construction only).
    """

    def __init__(self, path: str | Path, check_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._keys: list[_Key] = []
        self._signature: tuple[int, int, int] | None = None
        self._checked_s = 0.0
        self._load(strict=True)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def _load(self, *, strict: bool) -> None:
        signature = self._stat()
        try:
            keys = parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, ValueError) as e:
            if strict:
                raise
            metrics.API_KEY_RELOADS_TOTAL.labels("error").inc()
            log.error("keeping the previous API keys: %s", e)
            self._signature = signature
            return
        with self._lock:
            self._keys = keys
            self._signature = signature
        metrics.API_KEY_RELOADS_TOTAL.labels("ok").inc()
        log.info("loaded API keys", extra={"key_count": len(keys), "path": str(self.path)})

    def reload(self) -> None:
        """Re-read the file now (SIGHUP)."""
        self._load(strict=False)

    def maybe_reload(self) -> None:
        """Re-read the file if it changed since the last load (rate-limited)."""
        now = time.monotonic()
        if now - self._checked_s < self.check_interval_s:
            return
        self._checked_s = now
        if self._stat() != self._signature:
            self._load(strict=False)

    def lookup(self, key: str) -> Principal | None:
        """The principal of a presented key, or None.

        Every stored digest is compared in constant time (no early exit).
        """
        self.maybe_reload()
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: _Key | None = None
        with self._lock:
            keys = self._keys
        for k in keys:
            if hmac.compare_digest(k.digest, digest) and found is None:
                found = k
        return Principal(found.key_id, found.tenant, found.role) if found else None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if text[: len(BEARER)].lower() == BEARER:
            return text[len(BEARER) :].strip()
        return None
    return None


def authenticate(store: KeyStore, metadata: Sequence[tuple[str, str | bytes]] | None, method: str) -> Principal:
    """Authenticate and authorise one call.

    Args:
        store: The API keys.
        metadata: The call's invocation metadata.
        method: BalpmService method short name.

    Returns:
        The caller.

    Raises:
        errors.Unauthenticated: No bearer token, or an unknown one.
        errors.PermissionDenied: The key's role does not allow `method`.
    """
    token = bearer_token(metadata)
    if not token:
        metrics.AUTH_FAILURES_TOTAL.labels("unauthenticated").inc()
        raise errors.Unauthenticated(
            "missing credentials: send metadata 'authorization: Bearer <api key>'", reason="MISSING_CREDENTIALS"
        )
    principal = store.lookup(token)
    if principal is None:
        metrics.AUTH_FAILURES_TOTAL.labels("unauthenticated").inc()
        raise errors.Unauthenticated("invalid API key", reason="INVALID_API_KEY")
    if not principal.may_call(method):
        metrics.AUTH_FAILURES_TOTAL.labels("permission_denied").inc()
        raise errors.PermissionDenied(
            f"API key {principal.key_id!r} has role {principal.role!r}, which may not call {method}",
            reason="ROLE_NOT_ALLOWED",
            metadata={"key_id": principal.key_id, "role": principal.role, "method": method},
        )
    return principal
