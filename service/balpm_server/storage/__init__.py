"""Persistence behind small interfaces: the metadata store (SQLite or PostgreSQL) and feature arrays."""

from __future__ import annotations

from pathlib import Path

from balpm_server.storage.feature_store import FeatureStore
from balpm_server.storage.sql_store import SqlStore
from balpm_server.storage.sqlite_store import SqliteStore

__all__ = ["FeatureStore", "SqlStore", "SqliteStore", "open_store"]


def open_store(database_url: str, data_path: Path, *, connect_timeout_s: float = 5.0) -> SqlStore:
    """Open (and migrate) the metadata store a `BALPM_DATABASE_URL` names.

    Args:
        database_url: "" (embedded SQLite in the data dir), ``sqlite:///path`` (relative
            after the third slash, absolute with a fourth) or ``postgresql://...`` (also
            ``postgres://``).
        data_path: The data dir, home of the embedded SQLite file.
        connect_timeout_s: PostgreSQL: how long a call waits for a connection.

    Raises:
        ValueError: The URL names no supported backend.
    """
    url = database_url.strip()
    if not url:
        return SqliteStore(data_path / "balpm.sqlite3")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError("BALPM_DATABASE_URL sqlite:/// needs a file path, e.g. sqlite:///data/balpm.sqlite3")
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        from balpm_server.storage.postgres_store import PostgresStore

        return PostgresStore(url, connect_timeout_s=connect_timeout_s)
    raise ValueError(
        "BALPM_DATABASE_URL must be empty (embedded SQLite), sqlite:///path or postgresql://user@host/db; "
        f"got a URL with scheme {url.split(':', 1)[0]!r}"
    )
