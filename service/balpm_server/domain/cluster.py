"""Cluster mode: which replica owns each pool, and the hand-overs and takeovers between them.

Several replicas share one database and one artifact store. Each pool has one owner
replica at a time: a row of `pool_owners` with an expiry and a fencing epoch that grows
at every change of owner. The owner keeps the pool's in-memory state (features, kNN
graph, posterior, occupancy) and runs its acquisition, training and featurisation; the
other replicas forward its pool-scoped calls to it (`transport.forwarding`). Writes that
depend on the owner's memory (leases, posterior versions) check the epoch inside their
transaction (`storage.sql_store.Fencing`), so a paused or partitioned former owner can
never commit one after a takeover.

Every replica runs `Cluster.tick` each third of the ownership TTL: a heartbeat, the
renewal of its pools (a pool missing from the answer was taken over: its state is
dropped), then the pools' placement: the live replicas (heartbeat within the TTL) and
the pool keys give every replica the same assignment (rendezvous hashing with balanced
loads: every replica gets floor(pools / replicas) or one more); a replica claims the free pools
assigned to it and hands the idle pools it holds but is not assigned to their assignee
(once the assignee has stayed live for two TTLs).
A call for a pool with no live owner assigns it on the spot. A replica that stops
drains: it hands every pool to its assignee among the others first.

Taking a pool over (a new epoch) drops any stale runtime, fails the operations the
former owner left running and resumes the pool's featurisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

from balpm_server import metrics
from balpm_server.domain.models import OwnerRecord, PoolState, ReplicaRecord
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.domain.training import Training
from balpm_server.domain.uploads import Featurizer
from balpm_server.settings import Settings
from balpm_server.storage import SqlStore
from balpm_server.storage.sql_store import Fencing, not_owner

log = logging.getLogger(__name__)

TAKEOVER_REASON = "the replica that ran this operation stopped or lost the pool; run UpdatePosterior again"
NAME_CACHE_S = 2.0  # how long a (tenant, pool name) -> storage key lookup is reused


def default_replica_id() -> str:
    """A replica name unique on this network: host name and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _score(replica_id: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica_id}\0{key}".encode(), digest_size=8).digest(), "big")


def assign(keys: Sequence[str], replica_ids: Sequence[str]) -> dict[str, str]:
    """The owner each pool should have: rendezvous hashing with balanced loads.

    Each pool goes to its highest-scoring replica that still has room: every replica gets
    floor(P / R) or floor(P / R) + 1 of the P pools (at most P mod R of them the larger
    share), so no replica is idle while another holds two more than it. Deterministic:
    replicas with the same view compute the same answer.

    Args:
        keys: Pool storage keys.
        replica_ids: The live replicas.

    Returns:
        Pool key -> replica id (empty without replicas).
    """
    if not replica_ids:
        return {}
    base, extra = divmod(len(keys), len(replica_ids))
    load = dict.fromkeys(replica_ids, 0)
    plan: dict[str, str] = {}
    for key in sorted(keys):
        larger = sum(1 for n in load.values() if n > base)  # replicas already at the larger share
        for rid in sorted(replica_ids, key=lambda r: (_score(r, key), r), reverse=True):
            if load[rid] < base or (load[rid] == base and larger < extra):
                plan[key] = rid
                load[rid] += 1
                break
    return plan


class Cluster:
    """Pool ownership of this replica.

    Args:
        settings: Server settings (replica id, advertised address, ownership TTL).
        store: The shared metadata store (its `fencing` is set here).
        cache: The pools' runtimes (dropped when a pool leaves or arrives).
        training: Operations (failed on takeover, cancelled on loss).
        featurizer: Featurisation (resumed on takeover, stopped on loss).
        auto_update: Called for each owned pool at every tick (the automatic update policy
            for labels that arrived through other replicas).
    """

    def __init__(
        self,
        settings: Settings,
        store: SqlStore,
        cache: RuntimeCache,
        training: Training,
        featurizer: Featurizer,
        auto_update: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.training = training
        self.featurizer = featurizer
        self.auto_update = auto_update
        self.replica_id = settings.replica_id or default_replica_id()
        self.address = settings.advertise_address
        self.ttl_s = settings.ownership_ttl_s
        self.fencing = Fencing(self.replica_id)
        store.fencing = self.fencing
        self._expire_s: dict[str, float] = {}  # when this replica's ownership of each pool ends
        self._adopting: dict[str, asyncio.Lock] = {}
        self._replicas: dict[str, ReplicaRecord] = {}
        self._live_since: dict[str, float] = {}  # live replica -> when this replica first saw it live
        self._names: dict[tuple[str, str], tuple[str | None, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self.draining = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, address: str) -> None:
        """Join the cluster at `address` (unless one was configured): end a former incarnation's ownerships, beat."""
        self.address = self.address or address
        # Rows under this id are a previous process's: its memory is gone, so they are taken
        # again at a new epoch (its unfinished operations are failed then).
        await self.store.call(self.store.release_pools, self.replica_id)
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info(
            "cluster replica %s at %s: ownership TTL %.1f s, %d pools owned",
            self.replica_id, self.address, self.ttl_s, len(self.fencing.epochs),
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3.0)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # e.g. the database is down: ownerships lapse, calls fail UNAVAILABLE
                log.warning("cluster tick of replica %s failed: %s", self.replica_id, e)

    async def drain(self) -> None:
        """Hand every owned pool to its assignee among the other live replicas, then leave the cluster."""
        self.draining = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        try:
            others = [r for r in await self._live() if r != self.replica_id]
            keys = await self.store.call(self.store.pool_keys)
            plan = assign(keys, others)
            now = time.time()
            for key, epoch in list(self.fencing.epochs.items()):
                target = plan.get(key)
                if target is None or not await self._hand_over(key, target, now):
                    await self.store.call(self.store.release_pools, self.replica_id, {key: epoch})
                    self._lose(key)
            await self.store.call(self.store.remove_replica, self.replica_id)
        except Exception as e:  # the database is down: the ownerships expire after the TTL instead
            log.warning("replica %s could not hand its pools over: %s", self.replica_id, e)
        metrics.POOLS_OWNED.set(0)

    # ---- the periodic step -------------------------------------------------------------

    async def _live(self) -> list[str]:
        """Ids of the replicas whose heartbeat is within the TTL (refreshes the address book)."""
        now = time.time()
        self._replicas = {r.replica_id: r for r in await self.store.call(self.store.replicas)}
        live = [r.replica_id for r in self._replicas.values() if r.heartbeat_s > now - self.ttl_s]
        self._live_since = {r: self._live_since.get(r, now) for r in live}
        metrics.CLUSTER_REPLICAS.set(len(live))
        return live

    def _settled(self, replica_id: str) -> bool:
        """Whether a replica has been live long enough (two TTLs, as seen here) to be handed pools.

        A replica that just (re)started gets pools only once it has stayed up: one that
        restarts in a loop never makes the others hand their pools back and forth.
        """
        return time.time() - self._live_since.get(replica_id, time.time()) >= 2 * self.ttl_s

    async def tick(self) -> None:
        """Heartbeat, renew owned pools (dropping those taken over), then claim and hand over by the assignment."""
        if self.draining:
            return
        now = time.time()
        await self.store.call(self.store.heartbeat, self.replica_id, self.address, now)
        records = await self.store.call(self.store.renew_pools, self.replica_id, now, self.ttl_s)
        renewed = {r.pool_key: r for r in records}
        for key, epoch in list(self.fencing.epochs.items()):
            if key not in renewed or renewed[key].epoch != epoch:
                log.warning("replica %s lost pool %s (taken over)", self.replica_id, key)
                self._lose(key)
        for rec in renewed.values():
            await self._adopt(rec)
        live = await self._live()
        keys = await self.store.call(self.store.pool_keys)
        owners = {o.pool_key: o for o in await self.store.call(self.store.owners)}
        plan = assign(keys, live)
        now = time.time()
        for key in keys:
            want = plan.get(key)
            held = owners.get(key)
            free = held is None or held.expire_s <= now
            if free and want == self.replica_id:
                claimed = await self.store.call(self.store.assign_pool, key, self.replica_id, now, self.ttl_s)
                if claimed is not None:
                    await self._adopt(claimed)
            elif (
                key in self.fencing.epochs and want is not None and want != self.replica_id
                and self._settled(want) and not self._busy(key)
            ):
                await self._hand_over(key, want, now)
        if self.auto_update is not None:
            for key in list(self.fencing.epochs):
                await self.auto_update(key)

    async def _hand_over(self, key: str, target: str, now: float) -> bool:
        """Give an owned pool to `target` at the next epoch and drop it here; False when the database refused."""
        moved = await self.store.call(
            self.store.assign_pool, key, target, now, self.ttl_s, from_replica=self.replica_id
        )
        if moved is None:
            return False
        log.info("replica %s handed pool %s to %s", self.replica_id, key, target)
        metrics.OWNERSHIP_HANDOVERS_TOTAL.inc()
        self._lose(key)
        return True

    def _busy(self, key: str) -> bool:
        """Whether the pool has work that a hand-over would interrupt (training or featurisation)."""
        return self.training.running_in(key) or self.featurizer.running_in(key)

    # ---- owning and losing -------------------------------------------------------------

    def owns(self, key: str) -> bool:
        """Whether this replica owns the pool now (by its own renewals; the database has the last word)."""
        return key in self.fencing.epochs and time.time() < self._expire_s.get(key, 0.0)

    async def _adopt(self, rec: OwnerRecord) -> None:
        """Take up an ownership the database gives this replica (a new epoch: a takeover)."""
        key = rec.pool_key
        if self.fencing.epochs.get(key) == rec.epoch:
            self._expire_s[key] = rec.expire_s
            return
        async with self._adopting.setdefault(key, asyncio.Lock()):
            if self.fencing.epochs.get(key) == rec.epoch:
                self._expire_s[key] = rec.expire_s
                return
            self.cache.forget(key)  # whatever was cached under an older epoch may be stale
            # The takeover's work first: if the database fails here, the pool is not taken up
            # and the next call or tick tries again (nothing is left half done).
            if not self.training.running_in(key):
                failed = await self.store.call(self.store.fail_unfinished_operations, TAKEOVER_REASON, key)
                if failed:
                    log.warning("pool %s: failed %d operations its former owner left running", key, failed)
            info = await self.store.call(self.store.pool_info, key, counts=False)
            self.fencing.epochs[key] = rec.epoch
            self._expire_s[key] = rec.expire_s
            metrics.OWNERSHIP_TAKEOVERS_TOTAL.inc()
            metrics.POOLS_OWNED.set(len(self.fencing.epochs))
            log.info("replica %s owns pool %s at epoch %d", self.replica_id, key, rec.epoch)
            if info is not None and info.state == PoolState.FEATURIZING:
                self.featurizer.schedule(key)

    def _lose(self, key: str) -> None:
        """Drop a pool this replica no longer owns: its memory, its training and featurisation."""
        self.fencing.epochs.pop(key, None)
        self._expire_s.pop(key, None)
        self.training.cancel_pool(key)
        self.featurizer.cancel(key)
        self.cache.forget(key)
        metrics.POOLS_OWNED.set(len(self.fencing.epochs))

    # ---- routing -----------------------------------------------------------------------

    async def pool_key(self, tenant: str, name: str) -> str | None:
        """The storage key of the tenant's pool `name` (cached briefly), or None."""
        now = time.monotonic()
        hit = self._names.get((tenant, name))
        if hit is not None and hit[1] > now:
            return hit[0]
        key = await self.store.call(self.store.pool_key, tenant, name)
        if len(self._names) > 10_000:
            self._names.clear()
        self._names[(tenant, name)] = (key, now + NAME_CACHE_S)
        return key

    async def route(self, key: str, *, forwarded: bool) -> str | None:
        """Where a call for the pool must run: None here, else the owner's address.

        A pool with no live owner is assigned first (to this replica when the call was
        forwarded here, else to its assignee). A forwarded call never travels on: when
        this replica is not the owner it fails UNAVAILABLE (NOT_POOL_OWNER) and the
        caller retries.

        Raises:
            errors.Unavailable: No live owner can be reached or assigned (NOT_POOL_OWNER).
        """
        if self.owns(key):
            return None
        for _attempt in range(2):
            now = time.time()
            rec = await self.store.call(self.store.pool_owner, key)
            if rec is None or rec.expire_s <= now:
                target = self.replica_id if forwarded and not self.draining else await self._assignee(key)
                rec = await self.store.call(self.store.assign_pool, key, target, now, self.ttl_s)
                if rec is None:
                    continue  # another replica assigned it meanwhile: look again
            if rec.replica_id == self.replica_id:
                await self._adopt(rec)
                return None
            if key in self.fencing.epochs:  # the database says another replica took it
                self._lose(key)
            address = await self._address_of(rec.replica_id)
            if forwarded or address is None:
                break
            return address
        raise not_owner(key, self.replica_id)

    async def _assignee(self, key: str) -> str:
        """The live replica the pool should go to (never this one while it drains, unless it is the last)."""
        live = await self._live()
        if self.draining:
            live = [r for r in live if r != self.replica_id] or live
        keys = await self.store.call(self.store.pool_keys)
        return assign(keys, live).get(key, self.replica_id)

    async def _address_of(self, replica_id: str) -> str | None:
        rec = self._replicas.get(replica_id)
        if rec is None:
            await self._live()
            rec = self._replicas.get(replica_id)
        return rec.address if rec is not None else None

    async def route_operation(self, operation_id: str, *, forwarded: bool) -> str | None:
        """`route` for the pool of an operation (here when there is no such operation: NOT_FOUND follows)."""
        key = await self.store.call(self.store.operation_pool, operation_id)
        return None if key is None else await self.route(key, forwarded=forwarded)

    def forget_pool(self, tenant: str, name: str, key: str) -> None:
        """Drop a deleted pool: its name lookup and its ownership."""
        self._names.pop((tenant, name), None)
        self._lose(key)


def check_cluster_settings(settings: Settings) -> None:
    """Cluster mode's requirements on the other settings.

    Raises:
        ValueError: Cluster mode without a PostgreSQL database or without a shared artifact store.
    """
    if not settings.cluster:
        return
    if not settings.database_url.strip().startswith(("postgresql://", "postgres://")):
        raise ValueError("cluster mode needs a shared PostgreSQL database: set BALPM_DATABASE_URL=postgresql://...")
    if not settings.artifact_url.strip():
        raise ValueError(
            "cluster mode needs an artifact store the replicas share: set BALPM_ARTIFACT_URL=s3://bucket/prefix"
        )
    if settings.ownership_ttl_s < 1.0:
        raise ValueError(f"ownership_ttl_s must be at least 1 s, not {settings.ownership_ttl_s:g}")
