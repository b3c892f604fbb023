"""The in-memory side of every pool: loading its `PoolRuntime`, its kNN graph and its BALD scores.

`RuntimeCache` owns the pools' folders (features, posterior versions, kNN graph files)
and the cached `PoolRuntime` of each pool: the item index, feature arrays and lease /
label occupancy read from storage, the loaded posterior, the BALD scores of the latest
posterior and the kNN graph (loaded from its file when it matches the items, else
built, saved and prebuilt in the background after uploads). Callers hold the
runtime's lock while they load or use it.

Shapes: N pool items (feature rows), D feature dim, E ensemble members, R rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np

from balpm_server import errors
from balpm_server.acquisition import (
    KnnConvention,
    KnnGraph,
    bald_from_probs,
    build_knn_graph,
    can_extend,
    descending_order,
    extend_knn_graph,
)
from balpm_server.domain.models import ItemIndex, PoolInfo, PoolState, Split, server_apl
from balpm_server.domain.occupancy import Occupancy
from balpm_server.domain.pool_runtime import PoolRuntime
from balpm_server.posterior import PosteriorStore, predict_probs
from balpm_server.settings import Settings
from balpm_server.storage import FeatureStore, SqlStore
from balpm_server.storage.artifacts import ArtifactStore
from balpm_server.storage.pool_artifacts import PoolArtifacts

log = logging.getLogger(__name__)

JOIN_INTERVAL_S = 2.0  # least time between two reloads that let featurised rows join a serving pool

P = ParamSpec("P")
T = TypeVar("T")


class RuntimeCache:
    """Every pool's cached runtime, folders and kNN graph.

    Args:
        settings: Server settings.
        store: The metadata store.
        artifacts: The artifact store holding the durable copy of the pools' files (None: the data dir).
    """

    def __init__(self, settings: Settings, store: SqlStore, artifacts: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = PoolArtifacts(artifacts, store)
        self.root = settings.data_path
        self.runtimes: dict[str, PoolRuntime] = {}
        self._graph_locks: dict[str, threading.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()

    # ---- runtimes and folders ----------------------------------------------------------

    def runtime(self, key: str) -> PoolRuntime:
        """The runtime of the pool with storage key `key` (created empty on first use)."""
        rt = self.runtimes.get(key)
        if rt is None:
            rt = self.runtimes[key] = PoolRuntime(key)
        return rt

    def forget(self, key: str) -> None:
        """Drop a deleted pool's runtime and graph lock."""
        self.runtimes.pop(key, None)
        self._graph_locks.pop(key, None)

    def pool_dir(self, key: str) -> Path:
        """The folder of a pool's files."""
        # Keys are a validated pool id (POOL_ID_RE), or one plus "+<hex>": no path tricks.
        return self.root / "pools" / key

    def features(self, info: PoolInfo) -> FeatureStore:
        """The pool's feature arrays (float16 files and arrays for FEATURE_STORAGE_FLOAT16 pools)."""
        return FeatureStore(
            self.pool_dir(info.key) / "features", info.settings.feature_dim, info.settings.feature_storage.dtype
        )

    def posterior_store(self, key: str) -> PosteriorStore:
        """The pool's posterior versions."""
        return PosteriorStore(self.pool_dir(key) / "posterior")

    async def io(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run store or artifact I/O from the event loop: in a worker thread when either goes over the network."""
        if self.store.blocking or self.artifacts.enabled:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def stop(self) -> None:
        """Cancel background graph builds."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- loading -----------------------------------------------------------------------

    async def load_items(self, info: PoolInfo, rt: PoolRuntime) -> None:
        """Fill the runtime's item index, occupancy and features (no-op when loaded).

        Read off the event loop when the store is a network database; installed only if no
        other caller installed them meanwhile (their occupancy may already hold new leases).
        """
        if rt.item_ids is not None:
            return
        loaded = await self.io(self._read_items, info)
        if rt.item_ids is not None:
            return
        index, occupancy, label_seq, prompt_N_D, a_N_D, b_N_D = loaded
        rt.label_seq = label_seq
        rt.pending_rows = index.pending_count
        rt.loaded_s = time.monotonic()
        rt.item_ids = index.item_ids
        rt.row_of = {iid: i for i, iid in enumerate(index.item_ids)}
        rt.split_N = index.split_N
        rt.heldout_target_N = index.heldout_target_N
        rt.occupancy = occupancy
        rt.prompt_N_D, rt.a_N_D, rt.b_N_D = prompt_N_D, a_N_D, b_N_D

    def _read_items(self, info: PoolInfo) -> tuple[ItemIndex, Occupancy, int, np.ndarray, np.ndarray, np.ndarray]:
        """What `load_items` installs: item index, occupancy, the labels' sequence number it holds, features.

        Only the joined rows (those before the first row still featurising) are loaded: the
        pool serves them while later rows are extracted, and those join at a later load.
        """
        index = self.store.item_index(info.key, need_apl=server_apl(info))
        rows_N = index.rows_N
        if len(rows_N) and not np.array_equal(rows_N, np.arange(len(rows_N))):
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} has non-contiguous feature rows", reason="CORRUPT_POOL"
            )
        fs = self.features(info)
        n = len(index.item_ids)
        self.artifacts.restore_features(info.key, fs, n)  # a replica whose data dir lacks them
        label_seq = self.store.last_label_seq(info.key)  # read first: later labels are synced again, harmlessly
        occupancy = Occupancy.from_records(  # labels and exclusions of rows still featurising wait for them
            n, info.settings.labels_per_item,
            (label for label in self.store.label_annotators(info.key) if label.row < n),
            (lease for lease in self.store.active_leases(info.key, time.time()) if lease.row < n),
            (row for row in self.store.excluded_rows(info.key) if row < n),
        )
        return index, occupancy, label_seq, fs.read("prompt", n), fs.read("a", n), fs.read("b", n)

    async def sync_labels(self, info: PoolInfo, rt: PoolRuntime) -> None:
        """Apply to the occupancy the labels stored since it was read (cluster mode: ingested by other replicas).

        Call under the runtime's lock with its items loaded; an item newer than the loaded
        index invalidates the runtime (the next load reads everything again).
        """
        if rt.occupancy is None or rt.item_ids is None:
            return
        events = await self.io(self.store.label_events, info.key, rt.label_seq)
        for event in events:
            if not rt.apply_label(event.row, event.annotator_id):
                return
            rt.label_seq = max(rt.label_seq, event.seq)

    async def join_featurized(self, key: str, featurized_rows: int, *, done: bool) -> None:
        """Let rows whose features were just stored join the pool's loaded runtime.

        The runtime is dropped (under its lock) so its next use loads the new rows: at once
        when featurisation is done, else when at least `JOIN_INTERVAL_S` passed since the
        last load and the new rows are at least 1% of the loaded ones, which bounds the
        reloads of a large pool that keeps serving during a long extraction.

        Args:
            key: The pool instance.
            featurized_rows: Rows 0..featurized_rows-1 all have their features now.
            done: Every row of the pool has its features.
        """
        rt = self.runtimes.get(key)
        if rt is None or rt.item_ids is None:
            return
        loaded = len(rt.item_ids)
        if not done:
            new_rows = featurized_rows - loaded
            if new_rows < max(1, loaded // 100) or time.monotonic() - rt.loaded_s < JOIN_INTERVAL_S:
                return
        async with rt.lock:
            if rt.item_ids is not None and (done or len(rt.item_ids) < featurized_rows):
                rt.invalidate_items()

    def load_posterior(self, info: PoolInfo, rt: PoolRuntime) -> None:
        """Load the pool's latest posterior into the runtime (no-op when it is loaded)."""
        version = info.posterior_version
        if version == 0 or (rt.posterior_version == version and rt.posterior_state is not None):
            return
        posteriors = self.posterior_store(rt.pool_id)
        name = posteriors.folder_name(version)
        self.artifacts.restore_folder(f"pools/{rt.pool_id}/posterior/{name}/", posteriors.folder(version))
        state, _manifest = posteriors.load(version)
        rt.lora = None
        if state.config.posterior == "lora_ensemble":
            from balpm_server.posterior.lora import lora_ensemble_from_state

            rt.lora = lora_ensemble_from_state(state, info.settings.lora_model_path)
        rt.posterior_state = state
        rt.posterior_version = version
        rt.epistemic_version = -1

    def require_posterior(self, info: PoolInfo, rt: PoolRuntime) -> None:
        """Load the latest posterior; FAILED_PRECONDITION before the first training."""
        if info.posterior_version == 0:
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} has no posterior yet; run UpdatePosterior first",
                field="pool_id",
                reason="NO_POSTERIOR",
            )
        self.load_posterior(info, rt)

    def texts(self, info: PoolInfo, rt: PoolRuntime) -> tuple[list[str], list[str]]:
        """Pair texts by row, loaded only for LoRA pools (their posterior reads tokens)."""
        if info.settings.posterior_kind != "lora_ensemble":
            return [], []
        if rt.texts_a is None or rt.texts_b is None:
            rt.texts_a, rt.texts_b = self.store.texts_by_row(info.key)
        return rt.texts_a, rt.texts_b

    @staticmethod
    def member_probs(
        rt: PoolRuntime, fa_N_D: np.ndarray, fb_N_D: np.ndarray, texts_a: Sequence[str], texts_b: Sequence[str]
    ) -> np.ndarray:
        """probs_N_E of the loaded posterior: features for MLP heads, texts for LoRA adapters."""
        if rt.lora is not None:
            from balpm_server.posterior.lora import predict_probs_lora

            return predict_probs_lora(rt.lora, list(texts_a), list(texts_b))
        return predict_probs(rt.posterior_state, fa_N_D, fb_N_D)

    # ---- BALD scores -------------------------------------------------------------------

    @staticmethod
    def fresh_scores(info: PoolInfo, rt: PoolRuntime) -> np.ndarray | None:
        """The cached BALD scores when they belong to the latest posterior, else None (no I/O)."""
        if info.posterior_version and rt.epistemic_version == info.posterior_version:
            return rt.epistemic_N
        return None

    def scores(self, info: PoolInfo, rt: PoolRuntime) -> np.ndarray | None:
        """BALD epistemic scores by row for the latest posterior (cached per version).

        Only SPLIT_POOL rows are scored: held-out rows are never candidates nor counted as
        acquired, so their entries stay 0. The BALD ranking of the pool rows is cached
        with them.
        """
        self.load_posterior(info, rt)
        if info.posterior_version == 0 or rt.posterior_state is None:
            return None
        if rt.epistemic_version != info.posterior_version or rt.epistemic_N is None:
            assert rt.split_N is not None
            rows = np.flatnonzero(rt.split_N == int(Split.POOL))
            epistemic_N = np.zeros(len(rt.split_N), dtype=np.float64)
            epistemic_N[rows] = self.epistemic_of_rows(info, rt, rows)
            rt.bald_order_R = descending_order(epistemic_N, rows)
            rt.epistemic_N = epistemic_N
            rt.epistemic_version = info.posterior_version
        return rt.epistemic_N

    def epistemic_of_rows(self, info: PoolInfo, rt: PoolRuntime, rows_R: np.ndarray) -> np.ndarray:
        """BALD scores of the given rows under the latest posterior (zeros before the first)."""
        self.load_posterior(info, rt)
        if info.posterior_version == 0 or rt.posterior_state is None:
            return np.zeros(len(rows_R))
        assert rt.a_N_D is not None and rt.b_N_D is not None
        all_a, all_b = self.texts(info, rt)
        texts_a = [all_a[r] for r in rows_R] if all_a else []
        texts_b = [all_b[r] for r in rows_R] if all_b else []
        return bald_from_probs(self.member_probs(rt, rt.a_N_D[rows_R], rt.b_N_D[rows_R], texts_a, texts_b))

    # ---- kNN graph ---------------------------------------------------------------------

    def graph(self, info: PoolInfo, prompt_N_D: np.ndarray, pool_N: np.ndarray) -> KnnGraph:
        """The pool's kNN graph over its SPLIT_POOL rows `pool_N` (held-out rows are never neighbours).

        Loaded from disk when it matches the items, else built and saved.
        """
        s = info.settings
        path = self.pool_dir(info.key) / f"knn-k{s.knn_k}-std{int(s.standardize_features)}.npz"
        with self._graph_locks.setdefault(info.key, threading.Lock()):
            return self._load_or_build_graph(info, prompt_N_D, pool_N, path)

    def _load_or_build_graph(self, info: PoolInfo, prompt_N_D: np.ndarray, pool_N: np.ndarray, path: Path) -> KnnGraph:
        s = info.settings
        stored: KnnGraph | None = None
        self.artifacts.restore_graph(info.key, path)
        if path.exists():
            try:
                stored = KnnGraph.load(path)
            except errors.BalpmError:
                log.warning("ignoring unreadable kNN graph of pool %s (rebuilding it)", info.pool_id)
        if stored is not None and (stored.k != s.knn_k or stored.standardized != s.standardize_features):
            stored = None
        if stored is not None and stored.n_items == len(prompt_N_D) and np.array_equal(stored.members(), pool_N):
            return stored
        if (
            stored is not None
            and int(pool_N.sum()) <= self.settings.knn_exact_threshold
            and can_extend(stored, len(prompt_N_D), pool_N)
        ):
            # Rows were appended: search only the new rows (O(N M D)), same graph as a rebuild.
            graph = extend_knn_graph(stored, prompt_N_D, pool_N)
        else:
            graph = build_knn_graph(
                prompt_N_D, s.knn_k, standardize=s.standardize_features,
                exact_threshold=self.settings.knn_exact_threshold, member_mask_N=pool_N,
            )
        tmp = path.with_suffix(".tmp.npz")
        try:
            graph.save(tmp)
            tmp.replace(path)
            self.artifacts.put_graph(info.key, path)
        except OSError as e:  # a full or read-only disk: the graph is a cache, use it unsaved
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("kNN graph of pool %s not saved (rebuilt after a restart): %s", info.pool_id, e)
        return graph

    async def _prebuild_graph(self, key: str) -> None:
        """Build the kNN graph in the background after an upload, so the first BAL-PM call is fast."""
        info = await self.store.call(self.store.pool_info, key, counts=False)
        if info is None or info.state != PoolState.READY:
            return
        rt = self.runtime(key)
        async with rt.lock:
            await self.load_items(info, rt)
            prompt_N_D, split_N = rt.prompt_N_D, rt.split_N
        if prompt_N_D is None or split_N is None or rt.graph is not None:
            return
        pool_N = split_N == int(Split.POOL)
        if int(pool_N.sum()) <= info.settings.knn_k or info.settings.knn_convention is KnnConvention.AUTHORS:
            return
        try:
            graph = await asyncio.to_thread(self.graph, info, prompt_N_D, pool_N)
        except errors.BalpmError as e:
            log.warning("kNN graph of pool %s not prebuilt: %s", info.pool_id, e.message)
            return
        async with rt.lock:  # not over a graph an AcquireBatch built meanwhile (its GreedyState is bound to it)
            if rt.graph is None and rt.item_ids is not None and len(rt.item_ids) == graph.n_items:
                rt.graph = graph

    def schedule_graph(self, key: str) -> None:
        """Prebuild the pool's kNN graph in the background."""
        task = asyncio.get_running_loop().create_task(self._prebuild_graph(key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
