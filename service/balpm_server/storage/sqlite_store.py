"""SQLite metadata store: pools, items, labels, leases, operations, request ids.

Durability: WAL journal with ``synchronous=FULL``, so a committed transaction is on
disk before the call returns; the service acknowledges only after commit. Every
statement is parameterised: nothing from a request is formatted into SQL.

One write connection guarded by a lock (transactions are short: milliseconds) and
one read connection, so reads never wait behind a writer's fsync (WAL).

Pool keys: a pool is named by its tenant and its id (`PoolInfo.pool_id`, unique per
tenant); every row of every table belongs to a pool through its *storage key*
(`PoolInfo.key`, the `pool_id` column), which is unique per pool instance: a pool
deleted and created again under the same name gets a new key, so a request still
bound to the old instance can never write into the new one. Every `pool_key`
argument below is such a key.

Schema versions live in ``PRAGMA user_version`` and are applied in order at open
(`MIGRATIONS`); a data dir written by an older release is upgraded in place.

Methods take and return the named records of `balpm_server.domain.models`, never
tuples in column order; SQL stays in this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from balpm_server import errors
from balpm_server.acquisition import Strategy
from balpm_server.domain.models import (
    AplScores,
    FeatureSource,
    ItemAplScores,
    ItemIndex,
    ItemRecord,
    ItemText,
    LabelContent,
    LabelIn,
    LabelledBy,
    LabelTargets,
    LabelWrite,
    LeaseRecord,
    LeaseRequest,
    Operation,
    OperationState,
    PendingFeatures,
    PoolInfo,
    PoolInsert,
    PoolRef,
    PoolSettings,
    PoolState,
    Preference,
    RequestRecord,
    Split,
    StoreCounts,
    StoredLabel,
)

log = logging.getLogger(__name__)

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

MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3)
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


def settings_to_json(settings: PoolSettings) -> str:
    """Serialise pool settings."""
    body = asdict(settings)
    body["feature_source"] = settings.feature_source.value
    body["default_strategy"] = settings.default_strategy.value
    body["hidden_sizes"] = list(settings.hidden_sizes)
    return json.dumps(body, sort_keys=True)


def settings_from_json(raw: str) -> PoolSettings:
    """Parse pool settings written by `settings_to_json`."""
    body = json.loads(raw)
    body["feature_source"] = FeatureSource(body["feature_source"])
    body["default_strategy"] = Strategy(body["default_strategy"])
    body["hidden_sizes"] = tuple(body["hidden_sizes"])
    return PoolSettings(**body)


class SqliteStore:
    """The service's metadata store.

    Args:
        path: SQLite file (created with its folder if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        migrate(self._conn)
        self._lock = threading.RLock()
        # Reads use their own connection: in WAL mode they never wait for a writer, so a
        # commit's fsync in a worker thread (labels, leases) does not stall the event loop's
        # reads. A read sees every transaction committed before it started.
        self._read_conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._read_conn.execute("PRAGMA query_only=ON")
        self._read_lock = threading.Lock()

    def close(self) -> None:
        """Close the connections."""
        with self._lock, self._read_lock:
            self._read_conn.close()
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (and fsynced) on exit or rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # A failed write or COMMIT (full disk, I/O error) may have rolled back already:
                # roll back only what is still open, so the caller sees the original error.
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._read_conn.execute(sql, params).fetchall()

    def _query_ids(self, select: str, pool_id: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Run `select ... WHERE pool_id = ? AND <id column> IN (...)` over `ids` in chunks.

        `select` ends with the id column name; only placeholders are formatted into SQL.
        """
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows += self._query(f"{select} IN ({marks})", (pool_id, *chunk))
        return rows

    # ---- pools -------------------------------------------------------------------------

    def insert_pool(
        self, pool_key: str, tenant: str, name: str, settings: PoolSettings, extractor: str, *, max_pools: int
    ) -> PoolInsert:
        """Insert a pool unless the tenant holds `max_pools` or a pool `name` (checked in the same transaction).

        Returns:
            INSERTED, or why nothing was written: AT_LIMIT or NAME_TAKEN.
        """
        try:
            with self.transaction() as c:
                ((held,),) = c.execute("SELECT COUNT(*) FROM pools WHERE tenant = ?", (tenant,)).fetchall()
                if held >= max_pools:
                    return PoolInsert.AT_LIMIT
                c.execute(
                    "INSERT INTO pools (pool_id, name, tenant, settings_json, state, extractor, create_time)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (pool_key, name, tenant, settings_to_json(settings), PoolState.READY.value, extractor, time.time()),
                )
        except sqlite3.IntegrityError:  # UNIQUE (tenant, name): a concurrent create won the race
            return PoolInsert.NAME_TAKEN
        return PoolInsert.INSERTED

    def delete_pool(self, pool_key: str) -> None:
        """Delete a pool and everything that belongs to it."""
        with self.transaction() as c:
            for table in ("items", "labels", "leases", "operations", "requests", "pools"):
                c.execute(f"DELETE FROM {table} WHERE pool_id = ?", (pool_key,))

    def pool_key(self, tenant: str, name: str) -> str | None:
        """The storage key of the tenant's pool `name`, or None."""
        rows = self._query("SELECT pool_id FROM pools WHERE tenant = ? AND name = ?", (tenant, name))
        return str(rows[0][0]) if rows else None

    def pools_of(self, tenant: str) -> list[PoolRef]:
        """One tenant's pools, sorted by id."""
        rows = self._query("SELECT name, pool_id FROM pools WHERE tenant = ? ORDER BY name", (tenant,))
        return [PoolRef(name, key) for name, key in rows]

    def pool_count(self, tenant: str) -> int:
        """How many pools a tenant holds."""
        ((n,),) = self._query("SELECT COUNT(*) FROM pools WHERE tenant = ?", (tenant,))
        return int(n)

    def pool_keys(self) -> list[str]:
        """The storage keys of every pool of every tenant."""
        return [r[0] for r in self._query("SELECT pool_id FROM pools ORDER BY pool_id")]

    def pool_exists(self, pool_key: str) -> bool:
        """Whether the pool instance with this key still exists."""
        return bool(self._query("SELECT 1 FROM pools WHERE pool_id = ?", (pool_key,)))

    def set_pool_state(self, pool_key: str, state: PoolState) -> None:
        """Set a pool's lifecycle state."""
        with self.transaction() as c:
            c.execute("UPDATE pools SET state = ? WHERE pool_id = ?", (state.value, pool_key))

    def set_pool_state_in(self, conn: sqlite3.Connection, pool_key: str, state: PoolState) -> None:
        """Set a pool's lifecycle state inside the caller's transaction."""
        conn.execute("UPDATE pools SET state = ? WHERE pool_id = ?", (state.value, pool_key))

    def set_posterior_version(self, pool_key: str, version: int) -> None:
        """Record the pool's latest posterior version."""
        with self.transaction() as c:
            c.execute("UPDATE pools SET posterior_version = ? WHERE pool_id = ?", (version, pool_key))

    def pool_info(self, pool_key: str, *, counts: bool = True) -> PoolInfo | None:
        """A pool (with its counters unless `counts` is false, which is cheaper), or None."""
        rows = self._query(
            "SELECT name, tenant, settings_json, state, extractor, create_time, posterior_version"
            " FROM pools WHERE pool_id = ?",
            (pool_key,),
        )
        if not rows:
            return None
        name, tenant, raw, state_raw, extractor, created, version = rows[0]
        base = PoolInfo(
            pool_id=name,
            tenant=tenant,
            settings=settings_from_json(raw),
            state=PoolState(state_raw),
            extractor=extractor,
            create_time_s=created,
            posterior_version=int(version),
            key=pool_key,
        )
        if not counts:
            return base
        ((items, heldout, featurized, excluded),) = self._query(
            "SELECT COALESCE(SUM(split = 1), 0), COALESCE(SUM(split = 2), 0), COALESCE(SUM(featurized), 0),"
            " COALESCE(SUM(excluded), 0) FROM items WHERE pool_id = ?",
            (pool_key,),
        )
        ((labels, labelled),) = self._query(
            "SELECT COUNT(*), COUNT(DISTINCT item_id) FROM labels WHERE pool_id = ?", (pool_key,)
        )
        ((leased,),) = self._query(
            "SELECT COUNT(DISTINCT item_id) FROM leases WHERE pool_id = ? AND expire_time > ?",
            (pool_key, time.time()),
        )
        return dataclasses.replace(
            base,
            item_count=int(items),
            heldout_count=int(heldout),
            label_count=int(labels),
            labelled_item_count=int(labelled),
            leased_item_count=int(leased),
            featurized_count=int(featurized),
            excluded_count=int(excluded),
        )

    # ---- items -------------------------------------------------------------------------

    def item_digests(self, pool_id: str, item_ids: Sequence[str]) -> dict[str, str]:
        """Stored content digests of the given item ids that exist."""
        return dict(
            self._query_ids("SELECT item_id, digest FROM items WHERE pool_id = ? AND item_id", pool_id, item_ids)
        )

    def reserve_rows(self, conn: sqlite3.Connection, pool_id: str, count: int) -> int:
        """Reserve `count` consecutive feature rows inside a transaction; returns the first.

        This is the check that binds an upload to the pool instance it started on: the
        key of a deleted pool has no row, and nothing of the chunk is written.

        Raises:
            errors.NotFound: The pool instance no longer exists (deleted meanwhile).
        """
        found = conn.execute("SELECT next_row FROM pools WHERE pool_id = ?", (pool_id,)).fetchall()
        if not found:
            raise errors.NotFound(
                "the pool was deleted while this upload was running; nothing more was stored",
                field="pool_id",
                reason="POOL_NOT_FOUND",
            )
        ((first,),) = found
        conn.execute("UPDATE pools SET next_row = next_row + ? WHERE pool_id = ?", (count, pool_id))
        return int(first)

    def insert_items(self, conn: sqlite3.Connection, pool_id: str, items: Sequence[ItemRecord]) -> None:
        """Insert items (inside a transaction)."""
        conn.executemany(
            "INSERT INTO items (pool_id, item_id, row, split, prompt, completion_a, completion_b,"
            " heldout_pref, featurized, digest, logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b,"
            " predictive_entropy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    pool_id,
                    it.item_id,
                    it.row,
                    int(it.split),
                    it.prompt,
                    it.completion_a,
                    it.completion_b,
                    int(it.heldout_preference) if it.heldout_preference else None,
                    1 if it.featurized else 0,
                    it.digest,
                    *_apl_columns(it.apl),
                )
                for it in items
            ],
        )

    def mark_featurized(self, pool_id: str, rows: Sequence[int]) -> None:
        """Mark feature rows as written (after the feature files are fsynced)."""
        with self.transaction() as c:
            c.executemany(
                "UPDATE items SET featurized = 1 WHERE pool_id = ? AND row = ?",
                [(pool_id, int(r)) for r in rows],
            )

    def unfeaturized(self, pool_id: str) -> list[PendingFeatures]:
        """Items still waiting for features, in row order."""
        return [
            PendingFeatures(int(r), p, a, b)
            for r, p, a, b in self._query(
                "SELECT row, prompt, completion_a, completion_b FROM items"
                " WHERE pool_id = ? AND featurized = 0 ORDER BY row",
                (pool_id,),
            )
        ]

    def texts_by_row(self, pool_id: str) -> tuple[list[str], list[str]]:
        """(prompt + completion A, prompt + completion B) of every item, in row order."""
        rows = self._query(
            "SELECT prompt, completion_a, completion_b FROM items WHERE pool_id = ? ORDER BY row", (pool_id,)
        )
        return [p + a for p, a, _ in rows], [p + b for p, _, b in rows]

    def items_missing_apl(self, pool_id: str) -> list[ItemText]:
        """Items without APL log-probabilities, in row order."""
        return [
            ItemText(iid, p, a, b)
            for iid, p, a, b in self._query(
                "SELECT item_id, prompt, completion_a, completion_b FROM items"
                " WHERE pool_id = ? AND logp_policy_a IS NULL ORDER BY row",
                (pool_id,),
            )
        ]

    def item_index(self, pool_id: str) -> ItemIndex:
        """All items of a pool ordered by row."""
        rows = self._query(
            "SELECT item_id, row, split, heldout_pref FROM items WHERE pool_id = ? ORDER BY row",
            (pool_id,),
        )
        ids = [r[0] for r in rows]
        rows_N = np.array([r[1] for r in rows], dtype=np.int64)
        split_N = np.array([r[2] for r in rows], dtype=np.int8)
        target_N = np.array([Preference(r[3]).target if r[3] else np.nan for r in rows], dtype=np.float64)
        return ItemIndex(ids, rows_N, split_N, target_N)

    def apl_scores(self, pool_id: str) -> np.ndarray:
        """APL scores by item order (row order): float64 `[N, 5]`, NaN where unknown."""
        rows = self._query(
            "SELECT logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b, predictive_entropy"
            " FROM items WHERE pool_id = ? ORDER BY row",
            (pool_id,),
        )
        return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64).reshape(-1, 5)

    def update_apl_scores(self, pool_id: str, scores: Sequence[ItemAplScores]) -> int:
        """Set APL scores of items; returns the number of items updated."""
        with self.transaction() as c:
            n = 0
            for s in scores:
                cur = c.execute(
                    "UPDATE items SET logp_policy_a = ?, logp_policy_b = ?, logp_ref_a = ?,"
                    " logp_ref_b = ?, predictive_entropy = ? WHERE pool_id = ? AND item_id = ?",
                    (*_apl_columns(s.scores), pool_id, s.item_id),
                )
                n += cur.rowcount
            return n

    def items_page(self, pool_id: str, from_row: int, limit: int, split: Split | None = None) -> list[ItemRecord]:
        """Up to `limit` items with row >= `from_row` (of one split, when given), in row order."""
        where, params = "pool_id = ? AND row >= ?", [pool_id, from_row]
        if split is not None:
            where += " AND split = ?"
            params.append(int(split))
        rows = self._query(
            "SELECT item_id, row, split, prompt, completion_a, completion_b, heldout_pref, featurized, digest,"
            f" logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b, predictive_entropy FROM items WHERE {where}"
            " ORDER BY row LIMIT ?",
            (*params, limit),
        )
        return [
            ItemRecord(
                item_id=iid,
                row=int(row),
                split=Split(split_value),
                prompt=p,
                completion_a=a,
                completion_b=b,
                heldout_preference=Preference(pref) if pref else None,
                featurized=bool(featurized),
                digest=digest,
                apl=None if lpa is None else AplScores(lpa, lpb, lra, lrb, ent),
            )
            for iid, row, split_value, p, a, b, pref, featurized, digest, lpa, lpb, lra, lrb, ent in rows
        ]

    def item_splits(self, pool_id: str, item_ids: Sequence[str]) -> dict[str, int]:
        """item_id -> split of the given items that exist."""
        rows = self._query_ids("SELECT item_id, split FROM items WHERE pool_id = ? AND item_id", pool_id, item_ids)
        return {iid: int(split) for iid, split in rows}

    def item_texts(self, pool_id: str, item_ids: Sequence[str]) -> dict[str, ItemText]:
        """Text fields of the given items that exist."""
        rows = self._query_ids(
            "SELECT item_id, prompt, completion_a, completion_b FROM items WHERE pool_id = ? AND item_id",
            pool_id,
            item_ids,
        )
        return {iid: ItemText(iid, p, a, b) for iid, p, a, b in rows}

    # ---- labels ------------------------------------------------------------------------

    def existing_labels(self, pool_id: str, label_ids: Sequence[str]) -> dict[str, LabelContent]:
        """label_id -> content of the given labels that are already stored."""
        rows = self._query_ids(
            "SELECT label_id, item_id, preference, annotator_id FROM labels WHERE pool_id = ? AND label_id",
            pool_id,
            label_ids,
        )
        return {lid: LabelContent(iid, Preference(pref), ann) for lid, iid, pref, ann in rows}

    def insert_labels(
        self, conn: sqlite3.Connection, pool_id: str, labels: Sequence[LabelIn], labels_per_item: int = 1
    ) -> None:
        """Insert labels and end leases (inside a transaction).

        A label ends the labeller's own lease; once an item has `labels_per_item`
        distinct annotators every lease on it ends (with the default of 1, a late
        label from anyone ends the current holder's lease).
        """
        now = time.time()
        conn.executemany(
            "INSERT INTO labels (pool_id, label_id, item_id, preference, annotator_id, create_time)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(pool_id, lb.label_id, lb.item_id, int(lb.preference), lb.annotator_id, now) for lb in labels],
        )
        conn.executemany(
            "DELETE FROM leases WHERE pool_id = ? AND item_id = ? AND annotator_id = ?",
            [(pool_id, lb.item_id, lb.annotator_id) for lb in labels],
        )
        conn.executemany(
            "DELETE FROM leases WHERE pool_id = ? AND item_id = ? AND"
            " (SELECT COUNT(DISTINCT annotator_id) FROM labels WHERE pool_id = ? AND item_id = ?) >= ?",
            [(pool_id, lb.item_id, pool_id, lb.item_id, labels_per_item) for lb in labels],
        )

    def commit_labels(self, writes: Sequence[LabelWrite]) -> list[None]:
        """Commit the labels (and request-id records) of several IngestLabels calls in one transaction.

        Runs with ``synchronous=FULL``: when this returns, every write is on disk. Called
        from a worker thread by the domain's group commit.
        """
        with self.transaction() as c:
            for w in writes:
                if w.labels:
                    self.insert_labels(c, w.pool_key, w.labels, w.labels_per_item)
                if w.request_id:
                    self.put_request(c, w.pool_key, w.request_id, w.request_digest, w.response_json)
        return [None] * len(writes)

    def label_count(self, pool_id: str) -> int:
        """Number of labels stored in a pool."""
        ((n,),) = self._query("SELECT COUNT(*) FROM labels WHERE pool_id = ?", (pool_id,))
        return int(n)

    def labels_page(self, pool_id: str, after_seq: int, limit: int) -> list[StoredLabel]:
        """Labels with seq > after_seq in storage order."""
        return [
            StoredLabel(int(s), lid, iid, Preference(p), ann, t)
            for s, lid, iid, p, ann, t in self._query(
                "SELECT seq, label_id, item_id, preference, annotator_id, create_time FROM labels"
                " WHERE pool_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (pool_id, after_seq, limit),
            )
        ]

    def label_targets(self, pool_id: str) -> LabelTargets:
        """Every label as its item's feature row and its target P(A preferred), in storage order."""
        rows = self._query(
            "SELECT i.row, l.preference FROM labels l JOIN items i"
            " ON i.pool_id = l.pool_id AND i.item_id = l.item_id WHERE l.pool_id = ? ORDER BY l.seq",
            (pool_id,),
        )
        rows_L = np.array([r[0] for r in rows], dtype=np.int64)
        targets_L = np.array([Preference(r[1]).target for r in rows], dtype=np.float32)
        return LabelTargets(rows_L, targets_L)

    # ---- leases ------------------------------------------------------------------------

    def active_leases(self, pool_id: str, now_s: float) -> list[LeaseRecord]:
        """The unexpired leases of a pool."""
        return [
            LeaseRecord(int(r), ann, float(exp))
            for r, ann, exp in self._query(
                "SELECT i.row, l.annotator_id, l.expire_time FROM leases l JOIN items i"
                " ON i.pool_id = l.pool_id AND i.item_id = l.item_id"
                " WHERE l.pool_id = ? AND l.expire_time > ?",
                (pool_id, now_s),
            )
        ]

    def label_annotators(self, pool_id: str) -> list[LabelledBy]:
        """Who labelled which feature row (each pair once)."""
        return [
            LabelledBy(int(r), ann)
            for r, ann in self._query(
                "SELECT DISTINCT i.row, l.annotator_id FROM labels l JOIN items i"
                " ON i.pool_id = l.pool_id AND i.item_id = l.item_id WHERE l.pool_id = ?",
                (pool_id,),
            )
        ]

    def lease_and_read(self, requests: Sequence[LeaseRequest]) -> list[dict[str, ItemText]]:
        """Write the leases of several acquisitions in one transaction, then read their items.

        The answer gives, per request, the text fields of its items. One commit for many concurrent
        AcquireBatch calls (group commit) is what keeps their latency flat under load.

        Leases commit with ``synchronous=NORMAL``: in WAL mode the commit survives a crash
        of this process (SIGKILL included) and skips the fsync that labels pay for; only a
        power loss or OS crash could drop the newest leases, and then the worst outcome is
        an item handed out twice. Labels and items keep ``synchronous=FULL``.
        """
        with self._lease_durability():
            with self.transaction() as c:
                now_s = time.time()
                for pool_id in sorted({r.pool_key for r in requests}):
                    c.execute("DELETE FROM leases WHERE pool_id = ? AND expire_time <= ?", (pool_id, now_s))
                c.executemany(
                    "INSERT OR REPLACE INTO leases (pool_id, item_id, annotator_id, expire_time) VALUES (?, ?, ?, ?)",
                    [(r.pool_key, iid, r.annotator_id, r.expire_s) for r in requests for iid in r.item_ids],
                )
            return [self.item_texts(r.pool_key, r.item_ids) for r in requests]

    def lease_and_read_nowait(self, requests: Sequence[LeaseRequest]) -> list[dict[str, ItemText]] | None:
        """`lease_and_read` if the store is free this instant, else None (never waits)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.lease_and_read(requests)
        finally:
            self._lock.release()

    def set_excluded(self, pool_id: str, item_ids: Sequence[str], excluded: bool) -> int:
        """Exclude items from acquisition (ending their leases) or include them again; returns items changed."""
        flag = 1 if excluded else 0
        with self.transaction() as c:
            cur = c.executemany(
                "UPDATE items SET excluded = ? WHERE pool_id = ? AND item_id = ? AND excluded != ?",
                [(flag, pool_id, iid, flag) for iid in item_ids],
            )
            changed = max(0, cur.rowcount)
            if excluded:
                c.executemany(
                    "DELETE FROM leases WHERE pool_id = ? AND item_id = ?", [(pool_id, iid) for iid in item_ids]
                )
            return changed

    def excluded_count(self, pool_id: str) -> int:
        """How many of the pool's items are excluded."""
        ((n,),) = self._query("SELECT COUNT(*) FROM items WHERE pool_id = ? AND excluded = 1", (pool_id,))
        return int(n)

    def excluded_rows(self, pool_id: str) -> list[int]:
        """Feature rows of the pool's excluded items."""
        return [int(r) for (r,) in self._query("SELECT row FROM items WHERE pool_id = ? AND excluded = 1", (pool_id,))]

    def release_leases(self, pool_id: str, item_ids: Sequence[str], annotator_id: str) -> int:
        """End leases; annotator_id "" ends them whoever holds them. Returns leases ended.

        Like lease writes, a release commits without fsync (see `lease_and_read`): losing
        one to a power cut only keeps an item leased until its TTL.
        """
        with self._lease_durability(), self.transaction() as c:
            if annotator_id:
                cur = c.executemany(
                    "DELETE FROM leases WHERE pool_id = ? AND item_id = ? AND annotator_id = ?",
                    [(pool_id, iid, annotator_id) for iid in item_ids],
                )
            else:
                cur = c.executemany(
                    "DELETE FROM leases WHERE pool_id = ? AND item_id = ?", [(pool_id, iid) for iid in item_ids]
                )
            return max(0, cur.rowcount)

    @contextmanager
    def _lease_durability(self) -> Iterator[None]:
        """Hold the store lock with ``synchronous=NORMAL`` (WAL: crash-safe, no fsync per commit)."""
        with self._lock:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                yield
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")

    # ---- idempotent requests -----------------------------------------------------------

    def get_request(self, pool_id: str, request_id: str) -> RequestRecord | None:
        """The record of a request id, or None."""
        rows = self._query(
            "SELECT digest, response_json FROM requests WHERE pool_id = ? AND request_id = ?",
            (pool_id, request_id),
        )
        return RequestRecord(rows[0][0], rows[0][1]) if rows else None

    def put_request(self, conn: sqlite3.Connection, pool_id: str, request_id: str, digest: str, response: str) -> None:
        """Record a request id with its response (inside a transaction)."""
        conn.execute(
            "INSERT INTO requests (pool_id, request_id, digest, response_json) VALUES (?, ?, ?, ?)",
            (pool_id, request_id, digest, response),
        )

    # ---- operations --------------------------------------------------------------------

    def save_operation(self, op: Operation) -> None:
        """Insert or update an operation."""
        body = {
            "epoch": op.epoch,
            "epochs": op.epochs,
            "train_loss": op.train_loss,
            "val_log_likelihood": op.val_log_likelihood,
            "result": op.result,
            "error_code": op.error_code,
            "error_message": op.error_message,
        }
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO operations (operation_id, pool_id, tenant, state, body_json,"
                " create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    op.operation_id,
                    op.pool_key or op.pool_id,
                    op.tenant,
                    op.state.value,
                    json.dumps(body),
                    op.create_time_s,
                    op.update_time_s,
                ),
            )

    def load_operation(self, operation_id: str) -> Operation | None:
        """An operation by id, or None."""
        rows = self._query(
            "SELECT o.operation_id, o.pool_id, COALESCE(p.name, o.pool_id), o.tenant, o.state, o.body_json,"
            " o.create_time, o.update_time FROM operations o LEFT JOIN pools p ON p.pool_id = o.pool_id"
            " WHERE o.operation_id = ?",
            (operation_id,),
        )
        if not rows:
            return None
        oid, pool_key, name, tenant, state, raw, created, updated = rows[0]
        body = json.loads(raw)
        return Operation(
            operation_id=oid,
            pool_id=name,
            pool_key=pool_key,
            tenant=tenant,
            state=OperationState(state),
            create_time_s=created,
            update_time_s=updated,
            epoch=body["epoch"],
            epochs=body["epochs"],
            train_loss=body["train_loss"],
            val_log_likelihood=body["val_log_likelihood"],
            result=body["result"],
            error_code=body["error_code"],
            error_message=body["error_message"],
        )

    def fail_unfinished_operations(self, reason: str) -> int:
        """Mark operations left PENDING/RUNNING by a previous process as FAILED."""
        rows = self._query(
            "SELECT operation_id FROM operations WHERE state IN (?, ?)",
            (OperationState.PENDING.value, OperationState.RUNNING.value),
        )
        for (oid,) in rows:
            op = self.load_operation(oid)
            if op is None:
                continue
            op.state = OperationState.FAILED
            op.error_code = "ABORTED"
            op.error_message = reason
            op.update_time_s = time.time()
            self.save_operation(op)
        return len(rows)

    # ---- metrics -----------------------------------------------------------------------

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
            by_state: dict[str, int] = {}
            for state, count in conn.execute("SELECT state, COUNT(*) FROM pools GROUP BY state"):
                by_state[str(state).lower()] = by_state.get(str(state).lower(), 0) + int(count)
            ((pool_n, heldout_n, feat_n),) = conn.execute(
                "SELECT COALESCE(SUM(split = 1), 0), COALESCE(SUM(split = 2), 0), COALESCE(SUM(featurized), 0)"
                " FROM items"
            ).fetchall()
            ((labels_n,),) = conn.execute("SELECT COUNT(*) FROM labels").fetchall()
            now_s = time.time()
            ((active, expired),) = conn.execute(
                "SELECT COALESCE(SUM(expire_time > ?), 0), COALESCE(SUM(expire_time <= ?), 0) FROM leases",
                (now_s, now_s),
            ).fetchall()
        except sqlite3.Error as e:  # schema not there yet, or the file went away
            log.debug("counts of %s unavailable: %s", self.path, e)
            return None
        finally:
            conn.close()
        return StoreCounts(by_state, int(pool_n), int(heldout_n), int(feat_n), int(labels_n), int(active), int(expired))


def _apl_columns(apl: AplScores | None) -> tuple[float | None, ...]:
    """The five APL columns of an item (NULL when unknown)."""
    if apl is None:
        return (None,) * 5
    return (apl.logp_policy_a, apl.logp_policy_b, apl.logp_ref_a, apl.logp_ref_b, apl.predictive_entropy)
