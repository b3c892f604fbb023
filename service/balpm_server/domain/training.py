"""Training operations: UpdatePosterior as a long-running operation (AIP-151), and its registry.

`Training` starts one tracked background task per operation (at most one per pool,
`max_training_jobs_per_tenant` per tenant), reports progress to watchers, cancels at
the next epoch boundary, and records every outcome: running operations live in memory,
finished ones in storage (where GetOperation reads them after eviction). Operations a
previous process left running are marked failed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from balpm_server import errors, metrics
from balpm_server.domain import validation as v
from balpm_server.domain.models import Operation, OperationState, PoolInfo
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.posterior import EnsembleConfig, TrainProgress, TrainResult, train_ensemble
from balpm_server.settings import Settings
from balpm_server.storage import SqlStore
from balpm_server.storage.faults import storage_error

log = logging.getLogger(__name__)

MIN_LABELS_TO_TRAIN = 2
RESTART_REASON = "the server restarted while this operation was running; run UpdatePosterior again"
SHUTDOWN_REASON = "the server shut down while this operation was running; run UpdatePosterior again"
SHUTDOWN_GRACE_S = 10.0
WATCH_POLL_S = 5.0


class Training:
    """UpdatePosterior, GetOperation, WatchOperation and CancelOperation.

    Args:
        settings: Server settings (limits, device).
        store: The metadata store.
        pools: Pool lookups.
        cache: The pools' runtimes and posterior stores.
    """

    def __init__(self, settings: Settings, store: SqlStore, pools: Pools, cache: RuntimeCache) -> None:
        self.settings = settings
        self.store = store
        self.pools = pools
        self.cache = cache
        self.operations: dict[str, Operation] = {}  # running (or finished but not yet recorded)
        self.op_events: dict[str, asyncio.Event] = {}
        self.cancel_flags: dict[str, threading.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, str] = {}  # pool key -> operation id
        self.closed = False  # the store is closing: outcomes are no longer recorded
        # Automatic updates: per pool key, (labels the latest posterior saw, when it was made),
        # the pending interval checks and the checks running.
        self._trained: dict[str, tuple[int, float]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._auto_checks: set[asyncio.Task[str]] = set()
        self._stopping = False
        # Cluster mode: whether this replica owns a pool (automatic updates run on its owner only).
        self.may_run: Callable[[str], bool] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def fail_interrupted(self) -> None:
        """Mark operations a previous process left running as failed."""
        failed = await self.store.call(self.store.fail_unfinished_operations, RESTART_REASON)
        if failed:
            log.warning("marked %d interrupted operations as failed", failed)

    def running_in(self, key: str) -> bool:
        """Whether a training of the pool runs in this process."""
        return key in self._running

    def cancel_pool(self, key: str) -> None:
        """Cancel the pool's running training (the pool is being deleted)."""
        op_id = self._running.get(key)
        if op_id is not None:
            self.cancel_flags[op_id].set()

    async def stop(self) -> None:
        """Ask every training to stop; give them `SHUTDOWN_GRACE_S`, then cancel them."""
        self._stopping = True  # no automatic update starts or is scheduled from now on
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for check in list(self._auto_checks):
            check.cancel()
        await asyncio.gather(*self._auto_checks, return_exceptions=True)
        for flag in self.cancel_flags.values():
            flag.set()
        tasks = list(self.tasks.values())
        if tasks:  # they stop at the next epoch boundary and record CANCELLED
            await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- UpdatePosterior ---------------------------------------------------------------

    async def start(self, tenant: str, pool_id: str, *, seed: int, warm_start: bool, epochs: int) -> Operation:
        """Start retraining the posterior; ABORTED if one is already running for the pool."""
        info = await self.pools.require(tenant, pool_id)
        await self.pools.ensure_ready(info)
        running = self._running.get(info.key)
        if running is not None:
            raise errors.Aborted(
                f"a training operation is already running for pool {pool_id!r}: {running}; watch it or cancel it",
                field="pool_id",
                reason="TRAINING_IN_PROGRESS",
                metadata={"operation_id": running},
            )
        running_for_tenant = sum(1 for op_id in self._running.values() if self.operations[op_id].tenant == tenant)
        if running_for_tenant >= self.settings.max_training_jobs_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant already runs max_training_jobs_per_tenant={self.settings.max_training_jobs_per_tenant}",
                reason="MAX_TRAINING_JOBS",
            )
        label_count = await self.store.call(self.store.label_count, info.key)
        if label_count < MIN_LABELS_TO_TRAIN:
            raise errors.FailedPrecondition(
                f"pool {pool_id!r} has {label_count} labels; training needs at least {MIN_LABELS_TO_TRAIN}",
                field="pool_id",
                reason="NOT_ENOUGH_LABELS",
            )
        if epochs:
            v.int_range(epochs, "epochs", 1, 10_000)
        now = time.time()
        op = Operation(
            operation_id=f"train-{uuid.uuid4().hex[:16]}",
            pool_id=pool_id,
            pool_key=info.key,
            tenant=tenant,
            state=OperationState.RUNNING,
            create_time_s=now,
            update_time_s=now,
            epochs=epochs or info.settings.epochs,
        )
        await self.store.call(self.store.save_operation, op)
        self.operations[op.operation_id] = op
        self.op_events[op.operation_id] = asyncio.Event()
        self.cancel_flags[op.operation_id] = threading.Event()
        self._running[info.key] = op.operation_id
        task = asyncio.get_running_loop().create_task(self._train(info, op, seed=seed, warm_start=warm_start))
        self.tasks[op.operation_id] = task
        task.add_done_callback(functools.partial(self._forget_task, op.operation_id))
        return op

    # ---- automatic updates (PoolSettings.auto_update_*) --------------------------------------

    def _trained_upto(self, info: PoolInfo) -> tuple[int, float]:
        """(labels stored when the latest posterior was trained, epoch seconds it was made); (0, creation) if none.

        Labels of items still featurising at that time count as seen: they join the training
        of the next update.
        """
        known = self._trained.get(info.key)
        if known is None:
            posteriors = self.cache.posterior_store(info.key)
            latest = posteriors.latest_version()
            if latest is None:
                known = (0, info.create_time_s)
            else:
                manifest = posteriors.manifest(latest)
                seen = int(manifest.get("labels_through", manifest.get("label_count", 0)))
                known = (seen, float(manifest.get("created_s", info.create_time_s)))
            self._trained[info.key] = known
        return known

    async def maybe_auto_update(self, tenant: str, pool_id: str) -> str:
        """Start UpdatePosterior if the pool's automatic update policy asks for it now.

        Triggers: at least `auto_update_min_labels` labels since the latest posterior's, or
        `auto_update_interval_s` elapsed since it (the pool's creation if none) with new
        labels; an interval not elapsed yet is checked again when it is. One update at a
        time per pool (a running one wins); an update that cannot start (still featurising,
        the tenant's job limit) is tried again at the next ingest.

        Returns:
            The started operation's id, "" when none was started.
        """
        info = await self.pools.require(tenant, pool_id)
        s = info.settings
        policy = s.auto_update_min_labels or s.auto_update_interval_s
        if self._stopping or self.closed or not policy or info.key in self._running:
            return ""
        if self.may_run is not None and not self.may_run(info.key):
            return ""
        trained, made_s = self._trained_upto(info)
        new_labels = await self.store.call(self.store.label_count, info.key) - trained
        if new_labels <= 0:
            return ""
        trigger = ""
        if s.auto_update_min_labels and new_labels >= s.auto_update_min_labels:
            trigger = "labels"
        elif s.auto_update_interval_s:
            wait_s = made_s + s.auto_update_interval_s - time.time()
            if wait_s <= 0:
                trigger = "interval"
            else:
                self._check_later(tenant, pool_id, info.key, wait_s)
        if not trigger:
            return ""
        try:
            op = await self.start(tenant, pool_id, seed=0, warm_start=False, epochs=0)
        except errors.BalpmError as e:
            log.info("automatic update of pool %s not started: %s [%s]", info.key, e.message, e.reason)
            return ""
        metrics.AUTO_UPDATES_TOTAL.labels(trigger).inc()
        log.info("automatic update of pool %s started (%s): %s", info.key, trigger, op.operation_id)
        return op.operation_id

    def _check_later(self, tenant: str, pool_id: str, key: str, delay_s: float) -> None:
        """Run `maybe_auto_update` for the pool after `delay_s` (once: a pending check is kept)."""
        if key in self._timers or self._stopping or self.closed:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(key, None)
            check = loop.create_task(self._check_quietly(tenant, pool_id))
            self._auto_checks.add(check)
            check.add_done_callback(self._auto_checks.discard)

        self._timers[key] = loop.call_later(max(0.0, delay_s), fire)

    async def _check_quietly(self, tenant: str, pool_id: str) -> str:
        try:
            return await self.maybe_auto_update(tenant, pool_id)
        except errors.BalpmError:  # the pool was deleted meanwhile
            return ""

    def _forget_task(self, operation_id: str, _task: asyncio.Task[None]) -> None:
        self.tasks.pop(operation_id, None)

    def _notify(self, op: Operation) -> None:
        event = self.op_events.get(op.operation_id)
        if event is not None:
            event.set()
            self.op_events[op.operation_id] = asyncio.Event()

    async def _fit(self, info: PoolInfo, op: Operation, *, seed: int, warm_start: bool) -> None:
        """Train, save the new posterior version and record the result in `op` (SUCCEEDED)."""
        loop = asyncio.get_running_loop()
        cancel = self.cancel_flags[op.operation_id]
        rt = self.cache.runtime(info.key)
        started = time.perf_counter()
        async with rt.lock:
            await self.cache.load_items(info, rt)
            labels = await self.store.call(self.store.label_targets, info.key)
            assert rt.item_ids is not None and rt.a_N_D is not None and rt.b_N_D is not None
            # The latest revision of each answer; labels of items still featurising wait for
            # their features (the next update).
            used_L = labels.current_L & (labels.rows_L < len(rt.item_ids))
            rows_L, targets_L = labels.rows_L[used_L], labels.targets_L[used_L]
            labels_through = int(labels.current_L.sum())
            seq_through = int(labels.seq_L.max()) if labels.seq_L.size else 0
            if len(rows_L) < MIN_LABELS_TO_TRAIN:
                raise errors.FailedPrecondition(
                    f"pool {info.pool_id!r} has {len(rows_L)} labels on items with features; training needs "
                    f"at least {MIN_LABELS_TO_TRAIN} (the other {labels_through - len(rows_L)} wait for theirs)",
                    field="pool_id",
                    reason="NOT_ENOUGH_LABELS",
                )
            feats_a, feats_b = rt.a_N_D[rows_L], rt.b_N_D[rows_L]
            all_a, all_b = await self.store.call(self.cache.texts, info, rt)
            pair_a = [all_a[r] for r in rows_L] if all_a else []
            pair_b = [all_b[r] for r in rows_L] if all_b else []
        s = info.settings
        config = EnsembleConfig(
            ensemble_size=s.ensemble_size,
            hidden_sizes=tuple(s.hidden_sizes),
            epochs=op.epochs,
            batch_size=s.train_batch_size,
            learning_rate=s.learning_rate,
            weight_decay=s.weight_decay,
            val_fraction=s.val_fraction,
            patience=s.patience,
            bootstrap=s.bootstrap,
            warm_start=warm_start,
            device=self.settings.device,
            posterior=s.posterior_kind,
        )
        posteriors = self.cache.posterior_store(info.key)
        init = None
        latest = posteriors.latest_version()
        if warm_start and latest:
            init, _ = posteriors.load(latest)

        def on_progress(p: TrainProgress) -> None:
            def apply() -> None:
                op.epoch, op.epochs = p.epoch, p.epochs
                op.train_loss, op.val_log_likelihood = p.train_loss, p.val_log_likelihood
                op.update_time_s = time.time()
                self._notify(op)

            loop.call_soon_threadsafe(apply)

        lora = None
        if s.posterior_kind == "lora_ensemble":
            from balpm_server.posterior.lora import lora_ensemble_to_state, train_lora_ensemble

            lora = await asyncio.to_thread(
                train_lora_ensemble, s.lora_model_path, pair_a, pair_b, targets_L, config,
                seed=seed, progress=on_progress, should_stop=cancel.is_set,
            )
            result = TrainResult(lora_ensemble_to_state(lora), op.train_loss, op.val_log_likelihood,
                                 op.epoch, len(rows_L))
        else:
            result = await asyncio.to_thread(
                train_ensemble,
                feats_a,
                feats_b,
                targets_L,
                config,
                seed=seed,
                init=init,
                progress=on_progress,
                should_stop=cancel.is_set,
            )
        train_s = time.perf_counter() - started
        metrics.observe_training(train_s, result.val_log_likelihood)
        made_s = time.time()
        manifest = {
            "pool_id": info.pool_id,
            "seed": seed,
            "label_count": len(rows_L),
            "labels_through": labels_through,  # current labels when it was trained (for automatic updates)
            "label_seq_through": seq_through,  # trained on labels with storage seq <= this (cross-fitting)
            "warm_start": warm_start,
            "settings": dataclasses.asdict(config),
            "metrics": {
                "train_loss": result.train_loss,
                "val_log_likelihood": result.val_log_likelihood,
                "epochs_run": result.epochs_run,
                "train_s": train_s,
            },
            "created_s": made_s,
        }
        now = await self.store.call(self.store.pool_info, info.key, counts=False)
        published = now.posterior_version if now is not None else info.posterior_version
        version = await asyncio.to_thread(posteriors.save, result.state, manifest, min_version=published + 1)
        # The version's files reach the artifact store before the version is published.
        prefix = await asyncio.to_thread(
            self.cache.artifacts.put_folder, info.key, "posterior/" + posteriors.folder_name(version),
            posteriors.folder(version),
        )
        await self.store.call(self.store.set_posterior_version, info.key, version, prefix)
        self._trained[info.key] = (labels_through, made_s)
        rt.posterior_state, rt.posterior_version, rt.lora = result.state, version, lora
        rt.epistemic_version = -1
        op.state = OperationState.SUCCEEDED
        op.result = {
            "posterior_version": version,
            "label_count": len(rows_L),
            "val_log_likelihood": result.val_log_likelihood,
            "train_s": train_s,
            "epochs_run": result.epochs_run,
        }

    async def _train(self, info: PoolInfo, op: Operation, *, seed: int, warm_start: bool) -> None:
        """Run `_fit` and record how the operation ended, whatever happens."""
        try:
            await self._fit(info, op, seed=seed, warm_start=warm_start)
        except errors.Cancelled as e:
            op.state, op.error_code, op.error_message = OperationState.CANCELLED, "CANCELLED", e.message
        except errors.BalpmError as e:
            op.state, op.error_code, op.error_message = OperationState.FAILED, e.kind.value, e.message
        except Exception as e:  # the operation reports it; the server keeps running
            log.exception("training of pool %s failed", info.pool_id)
            fault = storage_error(e)  # a full or read-only disk: its kind, and a message naming no path
            if fault is not None:
                op.state, op.error_code = OperationState.FAILED, fault.kind.value
                op.error_message = f"training failed: {fault.message}"
            else:
                op.state, op.error_code = OperationState.FAILED, "INTERNAL"
                op.error_message = f"training failed ({type(e).__name__}); see the server log"
        finally:
            if not op.state.done:  # cancelled by shutdown
                op.state, op.error_code, op.error_message = OperationState.FAILED, "ABORTED", SHUTDOWN_REASON
            op.update_time_s = time.time()
            self._running.pop(info.key, None)
            policy = info.settings.auto_update_min_labels or info.settings.auto_update_interval_s
            if policy and op.state is OperationState.SUCCEEDED and not (self._stopping or self.closed):
                self._check_later(op.tenant, op.pool_id, info.key, 0.0)  # labels that came in meanwhile
            saved = False
            try:
                if not self.closed and await self.store.call(self.store.pool_exists, info.key):
                    await self.store.call(self.store.save_operation, op)
                saved = True
            except Exception:  # e.g. a full disk: keep the outcome in memory rather than lose it
                log.exception("could not record the outcome of operation %s; kept in memory", op.operation_id)
            finally:
                self._notify(op)
                self.op_events.pop(op.operation_id, None)
                self.cancel_flags.pop(op.operation_id, None)
                if saved:  # finished: evict from memory; GetOperation reads it from storage from now on
                    self.operations.pop(op.operation_id, None)

    # ---- GetOperation, WatchOperation, CancelOperation ---------------------------------

    async def _require(self, tenant: str, operation_id: str) -> Operation:
        if not operation_id:
            raise errors.InvalidArgument("operation_id is required", field="operation_id")
        op = self.operations.get(operation_id) or await self.store.call(self.store.load_operation, operation_id)
        if op is None or op.tenant != tenant:
            raise errors.NotFound(f"operation {operation_id!r} does not exist", field="operation_id")
        return op

    async def get(self, tenant: str, operation_id: str) -> Operation:
        """Return an operation's current state."""
        return await self._require(tenant, operation_id)

    async def watch(self, tenant: str, operation_id: str) -> AsyncIterator[Operation]:
        """Yield the operation now and after each change, until it is done."""
        op = await self._require(tenant, operation_id)
        while True:
            yield op
            if op.state.done:
                return
            event = self.op_events.get(operation_id)
            if event is None:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=WATCH_POLL_S)

    async def cancel(self, tenant: str, operation_id: str) -> Operation:
        """Request cancellation (takes effect at the next epoch boundary)."""
        op = await self._require(tenant, operation_id)
        flag = self.cancel_flags.get(operation_id)
        if flag is not None and not op.state.done:
            flag.set()
        return op
