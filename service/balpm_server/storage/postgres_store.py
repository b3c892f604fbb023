"""PostgreSQL backend of the metadata store: the system of record for production.

psycopg 3 with its thread-safe connection pool (`psycopg_pool.ConnectionPool`); every
call blocks on the network, so the domain calls the store from worker threads
(``SqlStore.blocking``) and the event loop never waits on the database. Connections are
checked when taken from the pool, so after a database restart the first call gets a
fresh connection instead of a dead one; while the database is down a call fails after
``connect_timeout_s`` with UNAVAILABLE (`faults.storage_error`), and nothing is
acknowledged that did not commit.

Durability: a transaction commits with the server's ``synchronous_commit`` (on by
default: flushed to the WAL, and to synchronous standbys where configured); lease writes
commit with ``SET LOCAL synchronous_commit = off`` (they survive a crash of this process
but not of the database host, the same policy as SQLite's ``synchronous=NORMAL``).

Concurrency (several replicas on one database):
- leases: the leased items' rows are locked with ``SELECT ... FOR UPDATE SKIP LOCKED``;
  an item another transaction is leasing makes the call fail with ABORTED
  (``LEASE_CONFLICT``) instead of waiting or double-booking it;
- labels: an advisory transaction lock per pool makes ``labels.seq`` follow commit
  order, so `labels_page` never skips a label that committed late;
- schema migrations: applied under an advisory lock, so replicas starting together
  migrate once.

Schema versions live in table ``balpm_schema`` and are applied in order at open
(`MIGRATIONS`), each step in one transaction with its version bump (DDL is
transactional in PostgreSQL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from balpm_server import errors
from balpm_server.domain.models import StoreCounts
from balpm_server.storage.sql_store import SqlStore, Tx, log

# Advisory lock keys (first int4 of the two-key form): balpm's namespace.
_LOCK_NS = 0x6261  # "ba"
_MIGRATION_LOCK = 0
_LABEL_ORDER_LOCK = 1

SCHEMA_V1 = """
CREATE TABLE pools (
  pool_id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  tenant TEXT NOT NULL,
  settings_json TEXT NOT NULL,
  state TEXT NOT NULL,
  extractor TEXT NOT NULL,
  create_time DOUBLE PRECISION NOT NULL,
  next_row BIGINT NOT NULL DEFAULT 0,
  posterior_version BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX pools_tenant_name ON pools (tenant, name);
CREATE TABLE items (
  pool_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  row BIGINT NOT NULL,
  split SMALLINT NOT NULL,
  prompt TEXT NOT NULL,
  completion_a TEXT NOT NULL,
  completion_b TEXT NOT NULL,
  heldout_pref SMALLINT,
  featurized SMALLINT NOT NULL,
  digest TEXT NOT NULL,
  logp_policy_a DOUBLE PRECISION, logp_policy_b DOUBLE PRECISION,
  logp_ref_a DOUBLE PRECISION, logp_ref_b DOUBLE PRECISION,
  predictive_entropy DOUBLE PRECISION,
  excluded SMALLINT NOT NULL DEFAULT 0,
  PRIMARY KEY (pool_id, item_id)
);
CREATE UNIQUE INDEX items_row ON items (pool_id, row);
CREATE TABLE labels (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  pool_id TEXT NOT NULL,
  label_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  preference SMALLINT NOT NULL,
  annotator_id TEXT NOT NULL,
  create_time DOUBLE PRECISION NOT NULL,
  UNIQUE (pool_id, label_id)
);
CREATE INDEX labels_item ON labels (pool_id, item_id);
CREATE TABLE leases (
  pool_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  annotator_id TEXT NOT NULL,
  expire_time DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (pool_id, item_id, annotator_id)
);
CREATE INDEX leases_expiry ON leases (pool_id, expire_time);
CREATE TABLE operations (
  operation_id TEXT PRIMARY KEY,
  pool_id TEXT NOT NULL,
  tenant TEXT NOT NULL,
  state TEXT NOT NULL,
  body_json TEXT NOT NULL,
  create_time DOUBLE PRECISION NOT NULL,
  update_time DOUBLE PRECISION NOT NULL
);
CREATE INDEX operations_state ON operations (state);
CREATE TABLE requests (
  pool_id TEXT NOT NULL,
  request_id TEXT NOT NULL,
  digest TEXT NOT NULL,
  response_json TEXT NOT NULL,
  PRIMARY KEY (pool_id, request_id)
)
"""

# v2: artifacts published in the artifact store (feature chunks, kNN graphs, posterior
# versions), one row per object, written after the object is durable.
SCHEMA_V2 = """
CREATE TABLE artifacts (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  pool_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  object_key TEXT NOT NULL,
  create_time DOUBLE PRECISION NOT NULL
);
CREATE INDEX artifacts_pool ON artifacts (pool_id, kind, seq)
"""

# v3: cluster mode: replicas (address + heartbeat) and pool ownership with a fencing epoch.
SCHEMA_V3 = """
CREATE TABLE replicas (
  replica_id TEXT PRIMARY KEY,
  address TEXT NOT NULL,
  heartbeat_time DOUBLE PRECISION NOT NULL
);
CREATE TABLE pool_owners (
  pool_id TEXT PRIMARY KEY,
  replica_id TEXT NOT NULL,
  epoch BIGINT NOT NULL,
  expire_time DOUBLE PRECISION NOT NULL
)
"""

# v4: the random control arm: leases and labels drawn by it are flagged.
SCHEMA_V4 = """
ALTER TABLE leases ADD COLUMN control SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE labels ADD COLUMN control SMALLINT NOT NULL DEFAULT 0
"""

# v5: label revisions: a label may replace an earlier one of its annotator (an edited answer).
SCHEMA_V5 = """
ALTER TABLE labels ADD COLUMN replaces TEXT NOT NULL DEFAULT '';
ALTER TABLE labels ADD COLUMN superseded_by TEXT NOT NULL DEFAULT ''
"""

MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5)
SCHEMA_VERSION = len(MIGRATIONS)


def _pg(sql: str) -> str:
    """The shared ``?``-placeholder SQL in psycopg's ``%s`` style (no statement contains a literal ``%``)."""
    return sql.replace("?", "%s")


def redact(url: str) -> str:
    """A PostgreSQL URL without its password (for logs, errors and metrics)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:  # a malformed URL: say nothing of it
        return "postgresql://<unparsable url>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class _PgTx:
    """`sql_store.Tx` over a psycopg connection inside a transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(_pg(sql), params).fetchall())

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return max(0, self._conn.execute(_pg(sql), params).rowcount)

    def run_many(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> int:
        if not params_seq:
            return 0
        with self._conn.cursor() as cur:
            cur.executemany(_pg(sql), params_seq)
            return max(0, cur.rowcount)


def migrate(conn: Any) -> int:
    """Apply the migrations newer than the database's version (under an advisory lock); returns the version.

    Raises:
        errors.FailedPrecondition: The database was written by a newer release.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _MIGRATION_LOCK))
        conn.execute("CREATE TABLE IF NOT EXISTS balpm_schema (version INTEGER NOT NULL)")
        found = conn.execute("SELECT version FROM balpm_schema").fetchall()
        if not found:
            conn.execute("INSERT INTO balpm_schema (version) VALUES (0)")
        version = int(found[0][0]) if found else 0
        if version > SCHEMA_VERSION:
            raise errors.FailedPrecondition(
                f"the database has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
                "upgrade the server",
                reason="SCHEMA_TOO_NEW",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with conn.transaction():  # a savepoint per step: all of it, with its version bump, or nothing
                for statement in MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("UPDATE balpm_schema SET version = %s", (target,))
            log.info("database schema migrated to version %d", target)
    return SCHEMA_VERSION


class PostgresStore(SqlStore):
    """The metadata store in a PostgreSQL database.

    Args:
        url: ``postgresql://user:password@host:port/dbname`` (libpq URL or conninfo).
        min_connections: Connections the pool keeps open.
        max_connections: Most connections the pool opens.
        connect_timeout_s: How long a call waits for a connection before failing UNAVAILABLE.
    """

    blocking = True

    def __init__(
        self, url: str, *, min_connections: int = 2, max_connections: int = 8, connect_timeout_s: float = 5.0
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.unique_violation = (psycopg.errors.UniqueViolation,)
        self.url = url
        self._closed = threading.Event()
        self._pool = ConnectionPool(
            url,
            min_size=min_connections,
            max_size=max_connections,
            timeout=connect_timeout_s,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout_s))},
            check=ConnectionPool.check_connection,
            open=False,
            name="balpm",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        try:
            with self._pool.connection() as conn:
                migrate(conn)
        except BaseException:
            self._pool.close()
            raise

    def describe(self) -> str:
        """The database URL without its password."""
        return redact(self.url)

    def close(self) -> None:
        """Close the pool's connections."""
        self._closed.set()
        self._pool.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        """A write transaction, committed on exit (``synchronous_commit`` off unless `durable`), else rolled back."""
        with self._pool.connection() as conn, conn.transaction():
            if not durable:
                conn.execute("SET LOCAL synchronous_commit = off")
            yield _PgTx(conn)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._pool.connection() as conn:
            return list(conn.execute(_pg(sql), params).fetchall())

    def _lock_items(self, tx: Tx, pool_id: str, item_ids: Sequence[str]) -> None:
        if not item_ids:
            return
        locked = tx.rows(
            "SELECT item_id FROM items WHERE pool_id = ? AND item_id = ANY(?) FOR UPDATE SKIP LOCKED",
            (pool_id, list(item_ids)),
        )
        if len(locked) < len(set(item_ids)):
            raise errors.Aborted(
                f"{len(set(item_ids)) - len(locked)} of these items are being leased by another request; retry",
                reason="LEASE_CONFLICT",
            )

    # A fenced write holds the owner row in SHARE mode until it commits: a takeover's UPDATE
    # waits for it, so no write of a former owner can commit after the takeover did.
    _FENCE_LOCK = " FOR SHARE"

    def _order_labels(self, tx: Tx, pool_keys: Sequence[str]) -> None:
        for key in pool_keys:  # sorted by the caller: no two writers wait on each other in a cycle
            tx.rows("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_LOCK_NS + _LABEL_ORDER_LOCK, key))

    def counts(self) -> StoreCounts | None:
        """Totals over every pool, or None when the database cannot be reached (bounded wait)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._closed.is_set():
            return None
        try:
            with self._pool.connection(timeout=2.0) as conn:
                return self._counts_with(lambda sql, params: list(conn.execute(_pg(sql), params).fetchall()))
        except (psycopg.Error, PoolTimeout) as e:
            log.debug("counts of %s unavailable: %s", self.describe(), e)
            return None
