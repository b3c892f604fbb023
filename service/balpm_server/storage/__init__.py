"""Persistence behind small interfaces: SQLite metadata and on-disk feature arrays."""

from balpm_server.storage.feature_store import FeatureStore
from balpm_server.storage.sqlite_store import SqliteStore

__all__ = ["FeatureStore", "SqliteStore"]
