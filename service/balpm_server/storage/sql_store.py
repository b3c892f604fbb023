"""The metadata store's records in SQL: one implementation for every backend.

`SqlStore` holds every query of the service (pools, items, labels, leases, operations,
request ids), written once in the SQL that SQLite and PostgreSQL share (``?``
placeholders, ``ON CONFLICT ... DO UPDATE``, ``RETURNING``, ``CASE`` sums); a backend
(`sqlite_store.SqliteStore`, `postgres_store.PostgresStore`) supplies connections,
transactions, migrations and the few statements that differ (row locks, flush policy).

Durability: a write transaction is flushed by the database before `transaction` returns,
and the service acknowledges only after that; lease writes may skip the flush
(``durable=False``). Every statement is parameterised: nothing from a request is
formatted into SQL.

Pool keys: a pool is named by its tenant and its id (`PoolInfo.pool_id`, unique per
tenant); every row of every table belongs to a pool through its *storage key*
(`PoolInfo.key`, the `pool_id` column), which is unique per pool instance: a pool
deleted and created again under the same name gets a new key, so a request still
bound to the old instance can never write into the new one. Every `pool_key`
argument below is such a key.

Methods take and return the named records of `balpm_server.domain.models`, never
tuples in column order; SQL stays in this package.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np

from balpm_server import errors
from balpm_server.acquisition import Strategy
from balpm_server.domain.models import (
    AplScores,
    ExistingLabel,
    FeatureSource,
    ItemAplScores,
    ItemIndex,
    ItemRecord,
    ItemText,
    LabelContent,
    LabelEvent,
    LabelIn,
    LabelledBy,
    LabelTargets,
    LabelWrite,
    LeaseRecord,
    LeaseRequest,
    Operation,
    OperationState,
    OwnerRecord,
    PendingFeatures,
    PoolInfo,
    PoolInsert,
    PoolRef,
    PoolSettings,
    PoolState,
    Preference,
    ReplicaRecord,
    RequestRecord,
    Split,
    StoreCounts,
    StoredLabel,
)

log = logging.getLogger(__name__)

# Kinds of published artifacts (`artifacts.kind`).
ARTIFACT_FEATURES = "features"
ARTIFACT_KNN = "knn"
ARTIFACT_POSTERIOR = "posterior"

P = ParamSpec("P")
T = TypeVar("T")


def _waiting(need_apl: bool) -> str:
    """SQL condition of an item row still waiting to join its pool: no features yet (or no APL scores
    when the server computes them); `item_index` and `joined_count` share it."""
    return "featurized = 0 OR logp_policy_a IS NULL" if need_apl else "featurized = 0"


def settings_to_json(settings: PoolSettings) -> str:
    """Serialise pool settings."""
    body = asdict(settings)
    body["feature_source"] = settings.feature_source.value
    body["default_strategy"] = settings.default_strategy.value
    body["hidden_sizes"] = list(settings.hidden_sizes)
    body["feature_storage"] = settings.feature_storage.value
    return json.dumps(body, sort_keys=True)


def settings_from_json(raw: str) -> PoolSettings:
    """Parse pool settings written by `settings_to_json`."""
    body = json.loads(raw)
    body["feature_source"] = FeatureSource(body["feature_source"])
    body["default_strategy"] = Strategy(body["default_strategy"])
    body["hidden_sizes"] = tuple(body["hidden_sizes"])
    body.setdefault("control_fraction", 0.0)  # pools created before the control arm existed keep none
    body.setdefault("feature_storage", "FLOAT32")  # pools created before the option existed: float32 files
    body.setdefault("bootstrap", True)  # pools created before the setting existed trained with bootstrap
    return PoolSettings(**body)


class Tx(Protocol):
    """One open write transaction (``?`` placeholders, whatever the backend)."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a statement that returns rows; returns them all."""
        ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the number of rows it changed."""
        ...

    def run_many(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> int:
        """Run a statement once per parameter tuple; returns the rows changed in all."""
        ...


NOT_POOL_OWNER = "NOT_POOL_OWNER"


@dataclasses.dataclass
class Fencing:
    """The pools this replica owns in cluster mode and the epoch it owns each at.

    Writes that depend on the owner's in-memory view (leases, posterior versions) check,
    inside their transaction, that the database still names this replica at this epoch;
    a replica that lost a pool (paused, partitioned) has its write refused.

    Attributes:
        replica_id: This replica.
        epochs: Pool storage key -> the epoch this replica owns it at.
    """

    replica_id: str
    epochs: dict[str, int] = dataclasses.field(default_factory=dict)


def not_owner(pool_key: str, replica_id: str) -> errors.Unavailable:
    """The error of a pool-scoped write or call on a replica that does not own the pool (retryable)."""
    return errors.Unavailable(
        f"replica {replica_id!r} does not own pool {pool_key.split('+')[0]!r} (any more); retry",
        reason=NOT_POOL_OWNER,
    )


class SqlStore:
    """The service's metadata store, over a backend's connections.

    Subclasses implement `transaction`, `_query`, `close`, `counts` and `describe`, and set
    `unique_violation` (the driver's exception for a UNIQUE constraint) and `blocking`
    (whether a call waits on the network: then the domain calls it from worker threads).
    """

    unique_violation: tuple[type[BaseException], ...] = ()
    blocking: bool = False
    # Cluster mode: the pools this replica owns (None: one replica, no fencing).
    fencing: Fencing | None = None
    # What a fenced write appends to its owner-row SELECT (PostgreSQL: a row lock).
    _FENCE_LOCK = ""
    # Statements that keep the schema's counters (items by split, featurised, ...).
    _COUNTS_SQL = (
        "SELECT COALESCE(SUM(CASE WHEN split = 1 THEN 1 ELSE 0 END), 0),"
        " COALESCE(SUM(CASE WHEN split = 2 THEN 1 ELSE 0 END), 0), COALESCE(SUM(featurized), 0) FROM items"
    )

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store call (or a function made of them) from the event loop without blocking it.

        A `blocking` backend (a database over the network) runs it in a worker thread; the
        embedded one runs it in place, as its reads are local and short.
        """
        if not self.blocking:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def pool_named(self, tenant: str, name: str, *, counts: bool = False) -> PoolInfo | None:
        """The tenant's pool `name` (with its counters when `counts`), or None."""
        key = self.pool_key(tenant, name)
        return self.pool_info(key, counts=counts) if key is not None else None

    def transaction(self, *, durable: bool = True) -> AbstractContextManager[Tx]:
        """A write transaction, committed on exit (flushed unless `durable` is false) or rolled back on error."""
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only statement outside any write transaction."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connections."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the records are (a path or a URL without its password), for logs and metrics."""
        raise NotImplementedError

    def counts(self) -> StoreCounts | None:
        """Totals over every pool, or None when they cannot be read; safe from any thread."""
        raise NotImplementedError

    def _counts_with(self, query: Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]) -> StoreCounts:
        """`counts` over a backend's query function (one implementation of the totals)."""
        by_state: dict[str, int] = {}
        for state, count in query("SELECT state, COUNT(*) FROM pools GROUP BY state", ()):
            by_state[str(state).lower()] = by_state.get(str(state).lower(), 0) + int(count)
        ((pool_n, heldout_n, feat_n),) = query(self._COUNTS_SQL, ())
        ((labels_n,),) = query("SELECT COUNT(*) FROM labels WHERE superseded_by = ''", ())
        now_s = time.time()
        ((active, expired),) = query(
            "SELECT COALESCE(SUM(CASE WHEN expire_time > ? THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN expire_time <= ? THEN 1 ELSE 0 END), 0) FROM leases",
            (now_s, now_s),
        )
        return StoreCounts(by_state, int(pool_n), int(heldout_n), int(feat_n), int(labels_n), int(active), int(expired))

    def add_items(
        self,
        pool_key: str,
        count: int,
        prepare: Callable[[int], tuple[Sequence[ItemRecord], str | None]],
        *,
        featurizing: bool,
    ) -> int:
        """Reserve `count` feature rows and insert the items `prepare(first_row)` returns, in one transaction.

        `prepare` runs inside the transaction, before the commit: it writes the items'
        feature rows (and their artifact-store object, whose key it returns and which is
        published here), so nothing is committed before its bytes are durable.

        Args:
            pool_key: The pool instance.
            count: How many rows to reserve.
            prepare: Given the first reserved row, makes the feature rows durable; returns the records
                and the key of the feature chunk's object (None without an artifact store).
            featurizing: Also set the pool FEATURIZING (its new rows still need features).

        Returns:
            The first reserved row.

        Raises:
            errors.NotFound: The pool instance no longer exists (deleted meanwhile).
        """
        with self.transaction() as tx:
            first = self.reserve_rows(tx, pool_key, count)
            records, chunk_key = prepare(first)
            self.insert_items(tx, pool_key, records)
            if chunk_key is not None:
                self.publish_artifact_in(tx, pool_key, ARTIFACT_FEATURES, chunk_key)
            if featurizing:
                self.set_pool_state_in(tx, pool_key, PoolState.FEATURIZING)
        return first

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
                ((held,),) = c.rows("SELECT COUNT(*) FROM pools WHERE tenant = ?", (tenant,))
                if held >= max_pools:
                    return PoolInsert.AT_LIMIT
                c.run(
                    "INSERT INTO pools (pool_id, name, tenant, settings_json, state, extractor, create_time)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (pool_key, name, tenant, settings_to_json(settings), PoolState.READY.value, extractor, time.time()),
                )
        except self.unique_violation:  # UNIQUE (tenant, name): a concurrent create won the race
            return PoolInsert.NAME_TAKEN
        return PoolInsert.INSERTED

    def delete_pool(self, pool_key: str) -> None:
        """Delete a pool and everything that belongs to it."""
        with self.transaction() as c:
            for table in ("items", "labels", "leases", "operations", "requests", "artifacts", "pool_owners", "pools"):
                c.run(f"DELETE FROM {table} WHERE pool_id = ?", (pool_key,))

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
            c.run("UPDATE pools SET state = ? WHERE pool_id = ?", (state.value, pool_key))

    def set_pool_state_in(self, tx: Tx, pool_key: str, state: PoolState) -> None:
        """Set a pool's lifecycle state inside the caller's transaction."""
        tx.run("UPDATE pools SET state = ? WHERE pool_id = ?", (state.value, pool_key))

    def set_posterior_version(self, pool_key: str, version: int, object_prefix: str | None = None) -> None:
        """Record the pool's latest posterior version (and publish its objects' prefix in the artifact store)."""
        with self.transaction() as c:
            self._fence(c, pool_key)
            if object_prefix is not None:
                self.publish_artifact_in(c, pool_key, ARTIFACT_POSTERIOR, object_prefix)
            c.run("UPDATE pools SET posterior_version = ? WHERE pool_id = ?", (version, pool_key))

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
            "SELECT COALESCE(SUM(CASE WHEN split = 1 THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN split = 2 THEN 1 ELSE 0 END), 0), COALESCE(SUM(featurized), 0),"
            " COALESCE(SUM(excluded), 0) FROM items WHERE pool_id = ?",
            (pool_key,),
        )
        ((labels, labelled),) = self._query(
            "SELECT COUNT(*), COUNT(DISTINCT item_id) FROM labels WHERE pool_id = ? AND superseded_by = ''",
            (pool_key,),
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

    # ---- artifacts ---------------------------------------------------------------------

    def publish_artifact_in(self, tx: Tx, pool_key: str, kind: str, object_key: str) -> None:
        """Publish an artifact-store object (already durable) of a pool, inside the caller's transaction."""
        tx.run(
            "INSERT INTO artifacts (pool_id, kind, object_key, create_time) VALUES (?, ?, ?, ?)",
            (pool_key, kind, object_key, time.time()),
        )

    def publish_artifact(self, pool_key: str, kind: str, object_key: str) -> None:
        """Publish an artifact-store object (already durable) of a pool."""
        with self.transaction() as c:
            self.publish_artifact_in(c, pool_key, kind, object_key)

    def artifacts_of(self, pool_key: str, kind: str) -> list[str]:
        """Object keys of a pool's published artifacts of one kind, oldest first."""
        return [
            str(k)
            for (k,) in self._query(
                "SELECT object_key FROM artifacts WHERE pool_id = ? AND kind = ? ORDER BY seq", (pool_key, kind)
            )
        ]

    # ---- items -------------------------------------------------------------------------

    def item_digests(self, pool_id: str, item_ids: Sequence[str]) -> dict[str, str]:
        """Stored content digests of the given item ids that exist."""
        return dict(
            self._query_ids("SELECT item_id, digest FROM items WHERE pool_id = ? AND item_id", pool_id, item_ids)
        )

    def reserve_rows(self, tx: Tx, pool_id: str, count: int) -> int:
        """Reserve `count` consecutive feature rows inside a transaction; returns the first.

        This is the check that binds an upload to the pool instance it started on: the
        key of a deleted pool has no row, and nothing of the chunk is written.

        Raises:
            errors.NotFound: The pool instance no longer exists (deleted meanwhile).
        """
        found = tx.rows(
            "UPDATE pools SET next_row = next_row + ? WHERE pool_id = ? RETURNING next_row", (count, pool_id)
        )
        if not found:
            raise errors.NotFound(
                "the pool was deleted while this upload was running; nothing more was stored",
                field="pool_id",
                reason="POOL_NOT_FOUND",
            )
        ((after,),) = found
        return int(after) - count

    def insert_items(self, tx: Tx, pool_id: str, items: Sequence[ItemRecord]) -> None:
        """Insert items (inside a transaction)."""
        tx.run_many(
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

    def mark_featurized(self, pool_id: str, rows: Sequence[int], chunk_key: str | None = None) -> None:
        """Mark feature rows as written (after the feature files are fsynced), publishing their chunk's object."""
        with self.transaction() as c:
            if chunk_key is not None:
                self.publish_artifact_in(c, pool_id, ARTIFACT_FEATURES, chunk_key)
            c.run_many(
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

    def prompt_groups(self, pool_id: str) -> np.ndarray:
        """int64 group of every row (row order): rows with the same prompt text share a group."""
        rows = self._query(  # ranked by the database: only integers come back, not every prompt's text
            "SELECT DENSE_RANK() OVER (ORDER BY prompt) FROM items WHERE pool_id = ? ORDER BY row", (pool_id,)
        )
        return np.array([r for (r,) in rows], dtype=np.int64)

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

    def item_index(self, pool_id: str, *, need_apl: bool = False) -> ItemIndex:
        """The pool's joined items in row order: the rows before the first one still featurising.

        Args:
            pool_id: The pool instance.
            need_apl: The server scores the pool's APL log-probabilities, so a row joins only
                once it has them as well as its features.

        Returns:
            The index of rows 0..N-1, N the first row still waiting (every row when none is);
            `pending_count` counts the rows from N on.
        """
        rows = self._query(
            f"SELECT item_id, row, split, heldout_pref, CASE WHEN {_waiting(need_apl)} THEN 1 ELSE 0 END FROM items"
            " WHERE pool_id = ? ORDER BY row",
            (pool_id,),
        )
        joined = next((i for i, r in enumerate(rows) if r[4]), len(rows))
        pending = len(rows) - joined
        rows = rows[:joined]
        ids = [r[0] for r in rows]
        rows_N = np.array([r[1] for r in rows], dtype=np.int64)
        split_N = np.array([r[2] for r in rows], dtype=np.int8)
        target_N = np.array([Preference(r[3]).target if r[3] else np.nan for r in rows], dtype=np.float64)
        return ItemIndex(ids, rows_N, split_N, target_N, pending)

    def joined_count(self, pool_id: str, *, need_apl: bool = False) -> int:
        """How many rows `item_index` would return: those before the first row still featurising."""
        ((first,),) = self._query(
            f"SELECT MIN(row) FROM items WHERE pool_id = ? AND ({_waiting(need_apl)})", (pool_id,)
        )
        if first is not None:
            return int(first)
        ((count,),) = self._query("SELECT COUNT(*) FROM items WHERE pool_id = ?", (pool_id,))
        return int(count)

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
                n += c.run(
                    "UPDATE items SET logp_policy_a = ?, logp_policy_b = ?, logp_ref_a = ?,"
                    " logp_ref_b = ?, predictive_entropy = ? WHERE pool_id = ? AND item_id = ?",
                    (*_apl_columns(s.scores), pool_id, s.item_id),
                )
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

    def existing_labels(self, pool_id: str, label_ids: Sequence[str]) -> dict[str, ExistingLabel]:
        """label_id -> content (and the revision that replaced it) of the given labels that are already stored."""
        rows = self._query_ids(
            "SELECT label_id, item_id, preference, annotator_id, replaces, superseded_by FROM labels"
            " WHERE pool_id = ? AND label_id",
            pool_id,
            label_ids,
        )
        return {
            lid: ExistingLabel(LabelContent(iid, Preference(pref), ann, rep), sup)
            for lid, iid, pref, ann, rep, sup in rows
        }

    def insert_labels(
        self, tx: Tx, pool_id: str, labels: Sequence[LabelIn], labels_per_item: int = 1
    ) -> None:
        """Insert labels and end leases (inside a transaction).

        A label ends the labeller's own lease; once an item has `labels_per_item`
        distinct annotators every lease on it ends (with the default of 1, a late
        label from anyone ends the current holder's lease).
        """
        now = time.time()
        # A label is a control label when the labeller's lease of the item came from the control arm;
        # a revision keeps the flag of the label it replaces.
        tx.run_many(
            "INSERT INTO labels (pool_id, label_id, item_id, preference, annotator_id, create_time, control, replaces)"
            " VALUES (?, ?, ?, ?, ?, ?, CASE WHEN (SELECT COALESCE(MAX(control), 0) FROM leases"
            " WHERE pool_id = ? AND item_id = ? AND annotator_id = ?)"
            " + (SELECT COALESCE(MAX(control), 0) FROM labels WHERE pool_id = ? AND label_id = ?) > 0"
            " THEN 1 ELSE 0 END, ?)",
            [
                (pool_id, lb.label_id, lb.item_id, int(lb.preference), lb.annotator_id, now,
                 pool_id, lb.item_id, lb.annotator_id, pool_id, lb.replaces, lb.replaces)
                for lb in labels
            ],
        )
        for lb in labels:
            if lb.supersedes and not tx.run(
                "UPDATE labels SET superseded_by = ? WHERE pool_id = ? AND label_id = ? AND superseded_by = ''",
                (lb.label_id, pool_id, lb.supersedes),
            ):  # revised meanwhile through another replica: a retry finds the new latest revision
                raise errors.Aborted(
                    f"label {lb.supersedes!r} was revised by another label meanwhile; retry",
                    field="labels.replaces_label_id",
                    reason="LABEL_SUPERSEDED",
                )
        tx.run_many(
            "DELETE FROM leases WHERE pool_id = ? AND item_id = ? AND annotator_id = ?",
            [(pool_id, lb.item_id, lb.annotator_id) for lb in labels],
        )
        tx.run_many(
            "DELETE FROM leases WHERE pool_id = ? AND item_id = ? AND"
            " (SELECT COUNT(DISTINCT annotator_id) FROM labels WHERE pool_id = ? AND item_id = ?) >= ?",
            [(pool_id, lb.item_id, pool_id, lb.item_id, labels_per_item) for lb in labels],
        )

    def commit_labels(self, writes: Sequence[LabelWrite]) -> list[None]:
        """Commit the labels (and request-id records) of several IngestLabels calls in one transaction.

        When this returns, every write is durable (flushed by the database). Called from a
        worker thread by the domain's group commit.
        """
        with self.transaction() as c:
            self._order_labels(c, sorted({w.pool_key for w in writes if w.labels}))
            for w in writes:
                if w.labels:
                    self.insert_labels(c, w.pool_key, w.labels, w.labels_per_item)
                if w.request_id:
                    self.put_request(c, w.pool_key, w.request_id, w.request_digest, w.response_json)
        return [None] * len(writes)

    def _order_labels(self, tx: Tx, pool_keys: Sequence[str]) -> None:
        """Make label sequence numbers of these pools follow commit order (no-op with a single writer).

        `labels_page` pages by `seq > after`; with concurrent writers a label that took a lower
        seq but committed later would be skipped by a reader that already paged past it.
        """

    def label_count(self, pool_id: str) -> int:
        """Number of labels of a pool that are their annotator's latest revision."""
        ((n,),) = self._query("SELECT COUNT(*) FROM labels WHERE pool_id = ? AND superseded_by = ''", (pool_id,))
        return int(n)

    def labels_page(self, pool_id: str, after_seq: int, limit: int) -> list[StoredLabel]:
        """Labels with seq > after_seq in storage order."""
        return [
            StoredLabel(int(s), lid, iid, Preference(p), ann, t, bool(ctl), rep, sup)
            for s, lid, iid, p, ann, t, ctl, rep, sup in self._query(
                "SELECT seq, label_id, item_id, preference, annotator_id, create_time, control, replaces,"
                " superseded_by FROM labels"
                " WHERE pool_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (pool_id, after_seq, limit),
            )
        ]

    def label_targets(self, pool_id: str) -> LabelTargets:
        """Every label (revised ones included, see `current_L`) as its item's feature row, target P(A preferred),
        control flag and sequence number, in storage order."""
        rows = self._query(
            "SELECT i.row, l.preference, l.control, l.seq, l.superseded_by FROM labels l JOIN items i"
            " ON i.pool_id = l.pool_id AND i.item_id = l.item_id WHERE l.pool_id = ? ORDER BY l.seq",
            (pool_id,),
        )
        rows_L = np.array([r[0] for r in rows], dtype=np.int64)
        targets_L = np.array([Preference(r[1]).target for r in rows], dtype=np.float32)
        control_L = np.array([bool(r[2]) for r in rows], dtype=bool)
        seq_L = np.array([r[3] for r in rows], dtype=np.int64)
        current_L = np.array([not r[4] for r in rows], dtype=bool)
        return LabelTargets(rows_L, targets_L, control_L, seq_L, current_L)

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

        Leases commit without waiting for a flush (``transaction(durable=False)``): the commit
        survives a crash of this process (SIGKILL included) but not a power loss of the
        database host, and then the worst outcome is an item handed out twice. Labels and
        items always wait for the flush. The backend locks the leased items' rows first
        (`_lock_items`), so two transactions never lease the same item at once.

        Raises:
            errors.Aborted: Another transaction holds some of these items (reason `LEASE_CONFLICT`).
        """
        with self.transaction(durable=False) as c:
            now_s = time.time()
            for pool_id in sorted({r.pool_key for r in requests}):
                self._fence(c, pool_id)
                c.run("DELETE FROM leases WHERE pool_id = ? AND expire_time <= ?", (pool_id, now_s))
            for r in requests:
                self._lock_items(c, r.pool_key, r.item_ids)
            c.run_many(
                "INSERT INTO leases (pool_id, item_id, annotator_id, expire_time, control) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (pool_id, item_id, annotator_id) DO UPDATE SET expire_time = excluded.expire_time,"
                " control = excluded.control",
                [
                    (r.pool_key, iid, r.annotator_id, r.expire_s, int(iid in r.control_ids))
                    for r in requests for iid in r.item_ids
                ],
            )
        return [self.item_texts(r.pool_key, r.item_ids) for r in requests]

    def lease_and_read_nowait(self, requests: Sequence[LeaseRequest]) -> list[dict[str, ItemText]] | None:
        """`lease_and_read` if it can run on the caller's thread without waiting, else None.

        The base answers None (the write goes to a worker thread); an embedded backend whose
        commit is a local, uncontended write may run it in place.
        """
        return None

    def _lock_items(self, tx: Tx, pool_id: str, item_ids: Sequence[str]) -> None:
        """Lock the rows of items about to be leased (no-op where the transaction already excludes writers)."""

    def set_excluded(self, pool_id: str, item_ids: Sequence[str], excluded: bool) -> int:
        """Exclude items from acquisition (ending their leases) or include them again; returns items changed."""
        flag = 1 if excluded else 0
        with self.transaction() as c:
            changed = c.run_many(
                "UPDATE items SET excluded = ? WHERE pool_id = ? AND item_id = ? AND excluded != ?",
                [(flag, pool_id, iid, flag) for iid in item_ids],
            )
            if excluded:
                c.run_many(
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
        with self.transaction(durable=False) as c:
            if annotator_id:
                return c.run_many(
                    "DELETE FROM leases WHERE pool_id = ? AND item_id = ? AND annotator_id = ?",
                    [(pool_id, iid, annotator_id) for iid in item_ids],
                )
            else:
                return c.run_many(
                    "DELETE FROM leases WHERE pool_id = ? AND item_id = ?", [(pool_id, iid) for iid in item_ids]
                )

    # ---- idempotent requests -----------------------------------------------------------

    def get_request(self, pool_id: str, request_id: str) -> RequestRecord | None:
        """The record of a request id, or None."""
        rows = self._query(
            "SELECT digest, response_json FROM requests WHERE pool_id = ? AND request_id = ?",
            (pool_id, request_id),
        )
        return RequestRecord(rows[0][0], rows[0][1]) if rows else None

    def put_request(self, tx: Tx, pool_id: str, request_id: str, digest: str, response: str) -> None:
        """Record a request id with its response (inside a transaction)."""
        tx.run(
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
            c.run(
                "INSERT INTO operations (operation_id, pool_id, tenant, state, body_json, create_time, update_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (operation_id) DO UPDATE SET pool_id = excluded.pool_id,"
                " tenant = excluded.tenant, state = excluded.state, body_json = excluded.body_json,"
                " create_time = excluded.create_time, update_time = excluded.update_time"
                # A finished operation stays finished (a former owner's late progress write is dropped).
                " WHERE operations.state IN (?, ?)",
                (
                    op.operation_id,
                    op.pool_key or op.pool_id,
                    op.tenant,
                    op.state.value,
                    json.dumps(body),
                    op.create_time_s,
                    op.update_time_s,
                    OperationState.PENDING.value,
                    OperationState.RUNNING.value,
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

    def fail_unfinished_operations(self, reason: str, pool_key: str | None = None) -> int:
        """Mark operations left PENDING/RUNNING by a previous process (or owner) as FAILED.

        Args:
            reason: The error message they get.
            pool_key: Only this pool's (a pool taken over in cluster mode); None: every pool's.
        """
        where, params = "state IN (?, ?)", [OperationState.PENDING.value, OperationState.RUNNING.value]
        if pool_key is not None:
            where, params = where + " AND pool_id = ?", [*params, pool_key]
        rows = self._query(f"SELECT operation_id FROM operations WHERE {where}", params)
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

    def operation_pool(self, operation_id: str) -> str | None:
        """The storage key of an operation's pool, or None when there is no such operation."""
        rows = self._query("SELECT pool_id FROM operations WHERE operation_id = ?", (operation_id,))
        return str(rows[0][0]) if rows else None

    # ---- cluster mode: replicas and pool ownership -------------------------------------

    def _fence(self, tx: Tx, pool_key: str) -> None:
        """Refuse the transaction unless this replica still owns the pool at its epoch (cluster mode only)."""
        fencing = self.fencing
        if fencing is None:
            return
        epoch = fencing.epochs.get(pool_key)
        if epoch is None or not tx.rows(
            "SELECT epoch FROM pool_owners WHERE pool_id = ? AND replica_id = ? AND epoch = ?" + self._FENCE_LOCK,
            (pool_key, fencing.replica_id, epoch),
        ):
            raise not_owner(pool_key, fencing.replica_id)

    def heartbeat(self, replica_id: str, address: str, now_s: float) -> None:
        """Record that a replica is alive at `address` (inserted on its first beat)."""
        with self.transaction(durable=False) as c:
            c.run(
                "INSERT INTO replicas (replica_id, address, heartbeat_time) VALUES (?, ?, ?)"
                " ON CONFLICT (replica_id) DO UPDATE SET address = excluded.address,"
                " heartbeat_time = excluded.heartbeat_time",
                (replica_id, address, now_s),
            )

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica (it drained and stops)."""
        with self.transaction() as c:
            c.run("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

    def replicas(self) -> list[ReplicaRecord]:
        """Every replica with its address and last heartbeat, by id."""
        return [
            ReplicaRecord(str(r), str(a), float(h))
            for r, a, h in self._query("SELECT replica_id, address, heartbeat_time FROM replicas ORDER BY replica_id")
        ]

    def pool_owner(self, pool_key: str) -> OwnerRecord | None:
        """The pool's ownership row (expired or not), or None when it never had an owner."""
        rows = self._query("SELECT replica_id, epoch, expire_time FROM pool_owners WHERE pool_id = ?", (pool_key,))
        return OwnerRecord(pool_key, str(rows[0][0]), int(rows[0][1]), float(rows[0][2])) if rows else None

    def owners(self) -> list[OwnerRecord]:
        """Every pool's ownership row."""
        return [
            OwnerRecord(str(k), str(r), int(e), float(x))
            for k, r, e, x in self._query("SELECT pool_id, replica_id, epoch, expire_time FROM pool_owners")
        ]

    def assign_pool(
        self, pool_key: str, replica_id: str, now_s: float, ttl_s: float, *, from_replica: str = ""
    ) -> OwnerRecord | None:
        """Give the pool to `replica_id` at the next epoch, if it is free or held by `from_replica`.

        Free means never owned or expired; with `from_replica` (a hand-over by the current
        owner) its live ownership moves too. Giving a pool to the replica that holds it
        already only renews it. One conditional statement: of concurrent claims, one wins.

        Returns:
            The new ownership, or None when another replica holds the pool.
        """
        with self.transaction() as c:
            if not c.rows("SELECT 1 FROM pools WHERE pool_id = ?", (pool_key,)):
                return None
            c.run(
                "INSERT INTO pool_owners (pool_id, replica_id, epoch, expire_time) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (pool_id) DO UPDATE SET replica_id = excluded.replica_id,"
                " epoch = CASE WHEN pool_owners.replica_id = excluded.replica_id AND pool_owners.expire_time > ?"
                " THEN pool_owners.epoch ELSE pool_owners.epoch + 1 END, expire_time = excluded.expire_time"
                " WHERE pool_owners.expire_time <= ? OR pool_owners.replica_id = ? OR pool_owners.replica_id = ?",
                (pool_key, replica_id, now_s + ttl_s, now_s, now_s, replica_id, from_replica or replica_id),
            )
            rows = c.rows("SELECT replica_id, epoch, expire_time FROM pool_owners WHERE pool_id = ?", (pool_key,))
        if not rows or rows[0][0] != replica_id:
            return None
        return OwnerRecord(pool_key, replica_id, int(rows[0][1]), float(rows[0][2]))

    def renew_pools(self, replica_id: str, now_s: float, ttl_s: float) -> list[OwnerRecord]:
        """Extend every ownership of a replica by `ttl_s`; returns them (those taken over are gone)."""
        with self.transaction(durable=False) as c:
            rows = c.rows(
                "UPDATE pool_owners SET expire_time = ? WHERE replica_id = ? RETURNING pool_id, epoch, expire_time",
                (now_s + ttl_s, replica_id),
            )
        return [OwnerRecord(str(k), replica_id, int(e), float(x)) for k, e, x in rows]

    def release_pools(self, replica_id: str, epochs: dict[str, int] | None = None) -> int:
        """End a replica's ownerships now (all, or those at the given epochs); returns how many ended."""
        with self.transaction() as c:
            if epochs is None:
                return c.run("UPDATE pool_owners SET expire_time = 0 WHERE replica_id = ?", (replica_id,))
            return c.run_many(
                "UPDATE pool_owners SET expire_time = 0 WHERE pool_id = ? AND replica_id = ? AND epoch = ?",
                [(k, replica_id, e) for k, e in epochs.items()],
            )

    def label_events(self, pool_key: str, after_seq: int) -> list[LabelEvent]:
        """The pool's labels stored after `after_seq`, with their rows, in storage order."""
        return [
            LabelEvent(int(s), int(r), str(a))
            for s, r, a in self._query(
                "SELECT l.seq, i.row, l.annotator_id FROM labels l JOIN items i"
                " ON i.pool_id = l.pool_id AND i.item_id = l.item_id WHERE l.pool_id = ? AND l.seq > ? ORDER BY l.seq",
                (pool_key, after_seq),
            )
        ]

    def last_label_seq(self, pool_key: str) -> int:
        """The highest label sequence number of the pool (0 without labels)."""
        ((seq,),) = self._query("SELECT COALESCE(MAX(seq), 0) FROM labels WHERE pool_id = ?", (pool_key,))
        return int(seq)


def _apl_columns(apl: AplScores | None) -> tuple[float | None, ...]:
    """The five APL columns of an item (NULL when unknown)."""
    if apl is None:
        return (None,) * 5
    return (apl.logp_policy_a, apl.logp_policy_b, apl.logp_ref_a, apl.logp_ref_b, apl.predictive_entropy)
