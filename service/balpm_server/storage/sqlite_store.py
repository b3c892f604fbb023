"""SQLite backend of the metadata store: the embedded default (one file, no server).

Durability: WAL journal with ``synchronous=FULL``, so a committed transaction is on
disk before the call returns; lease writes commit with ``synchronous=NORMAL`` (WAL:
they survive a crash of this process, SIGKILL included, without an fsync each).

One write connection guarded by a lock (transactions are short: milliseconds) and
one read connection, so reads never wait behind a writer's fsync (WAL). A single
writer also makes every transaction exclusive: no row locks are needed.

Schema versions live in ``PRAGMA user_version`` and are applied in order at open
(`MIGRATIONS`); a data dir written by an older release is upgraded in place. The
queries themselves are `sql_store.SqlStore`'s, shared with PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from balpm_server import errors
from balpm_server.domain.models import ItemText, LeaseRequest, StoreCounts
from balpm_server.storage.sql_store import SqlStore, Tx, log, settings_from_json, settings_to_json

__all__ = ["MIGRATIONS", "SCHEMA_V1", "SCHEMA_VERSION", "SqliteStore", "migrate", "settings_from_json",
           "settings_to_json"]

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS pools (
  pool_id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  settings_json TEXT NOT NULL,
  state TEXT NOT NULL,
  extractor TEXT NOT NULL,
  create_time REAL NOT NULL,
  next_row INTEGER NOT NULL DEFAULT 0,
  posterior_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
  pool_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  row INTEGER NOT NULL,
  split INTEGER NOT NULL,
  prompt TEXT NOT NULL,
  completion_a TEXT NOT NULL,
  completion_b TEXT NOT NULL,
  heldout_pref INTEGER,
  featurized INTEGER NOT NULL,
  digest TEXT NOT NULL,
  logp_policy_a REAL, logp_policy_b REAL, logp_ref_a REAL, logp_ref_b REAL,
  predictive_entropy REAL,
  PRIMARY KEY (pool_id, item_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS items_row ON items (pool_id, row);
CREATE TABLE IF NOT EXISTS labels (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  pool_id TEXT NOT NULL,
  label_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  preference INTEGER NOT NULL,
  annotator_id TEXT NOT NULL,
  create_time REAL NOT NULL,
  UNIQUE (pool_id, label_id)
);
CREATE INDEX IF NOT EXISTS labels_item ON labels (pool_id, item_id);
CREATE TABLE IF NOT EXISTS leases (
  pool_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  annotator_id TEXT NOT NULL,
  expire_time REAL NOT NULL,
  PRIMARY KEY (pool_id, item_id, annotator_id)
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (pool_id, expire_time);
CREATE TABLE IF NOT EXISTS operations (
  operation_id TEXT PRIMARY KEY,
  pool_id TEXT NOT NULL,
  tenant TEXT NOT NULL,
  state TEXT NOT NULL,
  body_json TEXT NOT NULL,
  create_time REAL NOT NULL,
  update_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
  pool_id TEXT NOT NULL,
  request_id TEXT NOT NULL,
  digest TEXT NOT NULL,
  response_json TEXT NOT NULL,
  PRIMARY KEY (pool_id, request_id)
);
"""

# v2: pool ids are scoped per tenant. `pools.pool_id` becomes the storage key (legacy
# pools keep their id as key, which stays their folder name); `name` is the id the
# tenant sees, unique per tenant. Keys of new pools contain a "+", which no pool id
# may, so they never collide with a legacy key.
SCHEMA_V2 = """
ALTER TABLE pools ADD COLUMN name TEXT NOT NULL DEFAULT '';
UPDATE pools SET name = pool_id;
CREATE UNIQUE INDEX pools_tenant_name ON pools (tenant, name);
"""

SCHEMA_V3 = """
ALTER TABLE items ADD COLUMN excluded INTEGER NOT NULL DEFAULT 0;
"""

# v4: artifacts published in the artifact store (feature chunks, kNN graphs, posterior
# versions), one row per object, written after the object is durable.
SCHEMA_V4 = """
CREATE TABLE artifacts (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  pool_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  object_key TEXT NOT NULL,
  create_time REAL NOT NULL
);
CREATE INDEX artifacts_pool ON artifacts (pool_id, kind, seq);
"""

# v5: cluster mode: replicas (address + heartbeat) and pool ownership with a fencing epoch.
SCHEMA_V5 = """
CREATE TABLE replicas (
  replica_id TEXT PRIMARY KEY,
  address TEXT NOT NULL,
  heartbeat_time REAL NOT NULL
);
CREATE TABLE pool_owners (
  pool_id TEXT PRIMARY KEY,
  replica_id TEXT NOT NULL,
  epoch INTEGER NOT NULL,
  expire_time REAL NOT NULL
);
"""

# v6: the random control arm: leases and labels drawn by it are flagged.
SCHEMA_V6 = """
ALTER TABLE leases ADD COLUMN control INTEGER NOT NULL DEFAULT 0;
ALTER TABLE labels ADD COLUMN control INTEGER NOT NULL DEFAULT 0;
"""

# v7: label revisions: a label may replace an earlier one of its annotator (an edited answer).
SCHEMA_V7 = """
ALTER TABLE labels ADD COLUMN replaces TEXT NOT NULL DEFAULT '';
ALTER TABLE labels ADD COLUMN superseded_by TEXT NOT NULL DEFAULT ''
"""

MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations newer than the database's ``user_version``; returns the version reached.

    Each step runs in its own transaction together with its version bump, so a crash
    mid-upgrade leaves the previous version intact.

    Raises:
        errors.FailedPrecondition: The database was written by a newer release.
    """
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version == 0 and conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'pools'").fetchone():
        # A data dir from before versioning holds the v1 schema.
        cols = {r[1] for r in conn.execute("PRAGMA table_info(pools)")}
        version = 2 if "name" in cols else 1
        conn.execute(f"PRAGMA user_version = {version}")
    if version > SCHEMA_VERSION:
        raise errors.FailedPrecondition(
            f"the database has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
            "upgrade the server",
            reason="SCHEMA_TOO_NEW",
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return SCHEMA_VERSION


class _SqliteTx:
    """`sql_store.Tx` over a sqlite3 connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return max(0, self._conn.execute(sql, params).rowcount)

    def run_many(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> int:
        return max(0, self._conn.executemany(sql, params_seq).rowcount)


class SqliteStore(SqlStore):
    """The metadata store in one SQLite file.

    Args:
        path: SQLite file (created with its folder if missing).
    """

    unique_violation = (sqlite3.IntegrityError,)
    blocking = False

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        migrate(self._conn)
        self._lock = threading.RLock()
        self._tx = _SqliteTx(self._conn)
        # Reads use their own connection: in WAL mode they never wait for a writer, so a
        # commit's fsync in a worker thread (labels, leases) does not stall the event loop's
        # reads. A read sees every transaction committed before it started.
        self._read_conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._read_conn.execute("PRAGMA query_only=ON")
        self._read_lock = threading.Lock()

    def describe(self) -> str:
        """The SQLite file's path."""
        return str(self.path)

    def close(self) -> None:
        """Close the connections."""
        with self._lock, self._read_lock:
            self._read_conn.close()
            self._conn.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        """A write transaction, committed (fsynced unless `durable` is false) on exit, or rolled back on error."""
        with self._lock:
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._tx
                    self._conn.execute("COMMIT")
                except BaseException:
                    # A failed write or COMMIT (full disk, I/O error) may have rolled back already:
                    # roll back only what is still open, so the caller sees the original error.
                    if self._conn.in_transaction:
                        with suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._read_conn.execute(sql, params).fetchall()

    def lease_and_read_nowait(self, requests: Sequence[LeaseRequest]) -> list[dict[str, ItemText]] | None:
        """`lease_and_read` if the store is free this instant, else None (never waits)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.lease_and_read(requests)
        finally:
            self._lock.release()

    def counts(self) -> StoreCounts | None:
        """Totals over every pool, or None when the file cannot be read (missing, no schema yet).

        Safe from any thread, also while the server writes or after `close`: it opens its
        own short-lived read-only connection (WAL readers never block the writer), so a
        Prometheus scrape costs the event loop nothing.
        """
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error:
            return None
        try:
            return self._counts_with(lambda sql, params: conn.execute(sql, params).fetchall())
        except sqlite3.Error as e:  # schema not there yet, or the file went away
            log.debug("counts of %s unavailable: %s", self.path, e)
            return None
        finally:
            conn.close()
