"""The domain facade: every RPC is one call here, whatever the transport.

Owns pools, uploads, labels, leases, training operations and acquisition. It talks
to storage (`SqliteStore`, `FeatureStore`, `PosteriorStore`), to a
`FeatureExtractor`, and to the pure math packages (`acquisition`, `posterior`).
Methods raise only `balpm_server.errors` types on purpose.

Shapes: N pool items (feature rows), D feature dim, E ensemble members, L labels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from balpm_server import errors, metrics
from balpm_server.acquisition import (
    AcquisitionParams,
    AplInputs,
    CandidateBatch,
    KnnConvention,
    KnnGraph,
    Strategy,
    bald_from_probs,
    build_knn_graph,
    descending_order,
    first_open,
    select_batch,
)
from balpm_server.acquisition.params import STOCHASTIC_BALD
from balpm_server.domain import validation as v
from balpm_server.domain.group_commit import GroupCommit
from balpm_server.domain.models import (
    AcquiredItem,
    AcquireResult,
    AplScores,
    EvaluationOut,
    FeatureSource,
    IngestResult,
    ItemIn,
    ItemText,
    LabelIn,
    LabelWrite,
    Operation,
    OperationState,
    PoolInfo,
    PoolSettings,
    PoolState,
    PredictionOut,
    Preference,
    Rejection,
    Split,
    StoredLabel,
    UploadResult,
)
from balpm_server.domain.occupancy import Occupancy
from balpm_server.domain.pool_runtime import PoolRuntime
from balpm_server.features import FeatureExtractor
from balpm_server.posterior import (
    EnsembleConfig,
    PosteriorStore,
    TrainProgress,
    TrainResult,
    evaluate,
    predict_probs,
    train_ensemble,
)
from balpm_server.settings import Settings
from balpm_server.storage import FeatureStore, SqliteStore
from balpm_server.storage.faults import storage_error

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TENANT = "default"
MAX_LABELS_PER_REQUEST = 10_000
MAX_RELEASE_IDS = 10_000
MAX_EXPORT_ITEMS_PAGE = 5_000
MIN_LABELS_TO_TRAIN = 2
RESTART_REASON = "the server restarted while this operation was running; run UpdatePosterior again"
SHUTDOWN_REASON = "the server shut down while this operation was running; run UpdatePosterior again"
SHUTDOWN_GRACE_S = 10.0


# Strategies that rank by the BALD scores of every pool row; the others score only their picks.
SCORED_STRATEGIES = frozenset({Strategy.BALD, Strategy.BALPM, *STOCHASTIC_BALD})


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def _page_token(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode()


def _parse_page_token(token: str, field: str = "page_token") -> int:
    if not token:
        return 0
    try:
        value = int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InvalidArgument("page_token is not a token this server issued", field=field) from e
    if not 0 <= value < 2**62:
        raise errors.InvalidArgument("page_token is not a token this server issued", field=field)
    return value


async def _settled(write: Awaitable[T]) -> T:
    """Await `write`; if the caller is cancelled meanwhile, still wait for it to settle.

    Used under a pool lock, so the next caller's checks never run before a write they
    must see has committed or failed.
    """
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def _item_record(item: ItemIn, row: int, digest: str, client_features: bool) -> tuple[object, ...]:
    """The stored row of an uploaded item (the column order of `SqliteStore.insert_items`)."""
    apl = (
        (
            item.apl.logp_policy_a,
            item.apl.logp_policy_b,
            item.apl.logp_ref_a,
            item.apl.logp_ref_b,
            item.apl.predictive_entropy,
        )
        if item.apl
        else (None,) * 5
    )
    return (
        item.item_id,
        row,
        int(item.split),
        item.prompt,
        item.completion_a,
        item.completion_b,
        int(item.heldout_preference) if item.heldout_preference else None,
        1 if client_features else 0,
        digest,
        *apl,
    )


class PoolService:
    """Acquisition service domain.

    Args:
        settings: Server settings.
        extractor: Feature extractor for FEATURE_SOURCE_SERVER pools (None disables them).
    """

    def __init__(self, settings: Settings, extractor: FeatureExtractor | None) -> None:
        self.settings = settings
        self.extractor = extractor
        self.root = settings.data_path
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = SqliteStore(self.root / "balpm.sqlite3")
        self._runtimes: dict[str, PoolRuntime] = {}
        self._operations: dict[str, Operation] = {}
        self._op_events: dict[str, asyncio.Event] = {}
        self._cancel_flags: dict[str, threading.Event] = {}
        self._running_training: dict[str, str] = {}
        self._featurize_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._training_tasks: dict[str, asyncio.Task[None]] = {}
        self._extracting: dict[str, int] = {}  # tenant -> ad-hoc extractions running
        self._closed = False
        self._graph_locks: dict[str, threading.Lock] = {}
        # Leases of concurrent AcquireBatch calls are written (and their texts read) together.
        self._leases: GroupCommit[tuple[str, Sequence[str], str, float], dict[str, ItemText]] = GroupCommit(
            self.store.lease_and_read, flush_now=self.store.lease_and_read_nowait
        )
        # Labels of concurrent IngestLabels calls commit (fsynced) together, off the loop.
        self._label_writes: GroupCommit[LabelWrite, None] = GroupCommit(self.store.commit_labels)
        self.ready = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Restore state: fail interrupted operations, resume featurisation."""
        failed = self.store.fail_unfinished_operations(RESTART_REASON)
        if failed:
            log.warning("marked %d interrupted operations as failed", failed)
        for key in self.store.pool_keys():
            info = self.store.pool_info(key, counts=False)
            if info is not None and info.state == PoolState.FEATURIZING:
                self._schedule_featurize(key)
        self.ready = True

    async def close(self) -> None:
        """Stop background work and close storage."""
        self.ready = False
        for flag in self._cancel_flags.values():
            flag.set()
        training = list(self._training_tasks.values())
        if training:  # they stop at the next epoch boundary and record CANCELLED
            await asyncio.wait(training, timeout=SHUTDOWN_GRACE_S)
        tasks = [*training, *self._featurize_tasks.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._closed = True
        if self.extractor is not None:
            await self.extractor.close()
        self.store.close()

    # ---- helpers -----------------------------------------------------------------------

    def _pool_dir(self, key: str) -> Path:
        # Keys are a validated pool id (POOL_ID_RE), or one plus "+<hex>": no path tricks.
        return self.root / "pools" / key

    def _require_pool(self, tenant: str, pool_id: str, *, counts: bool = False) -> PoolInfo:
        """The tenant's pool `pool_id` (another tenant's pool of that name is invisible)."""
        v.pool_id(pool_id)
        key = self.store.pool_key(tenant, pool_id)
        info = self.store.pool_info(key, counts=counts) if key is not None else None
        if info is None or info.tenant != tenant:
            raise errors.NotFound(f"pool {pool_id!r} does not exist", field="pool_id", reason="POOL_NOT_FOUND")
        return info

    def _runtime(self, key: str) -> PoolRuntime:
        rt = self._runtimes.get(key)
        if rt is None:
            rt = self._runtimes[key] = PoolRuntime(key)
        return rt

    def _features(self, info: PoolInfo) -> FeatureStore:
        return FeatureStore(self._pool_dir(info.key) / "features", info.settings.feature_dim)

    def _posterior_store(self, key: str) -> PosteriorStore:
        return PosteriorStore(self._pool_dir(key) / "posterior")

    def _load_items(self, info: PoolInfo, rt: PoolRuntime) -> None:
        if rt.item_ids is not None:
            return
        ids, rows_N, split_N, target_N = self.store.item_index(info.key)
        if len(rows_N) and not np.array_equal(rows_N, np.arange(len(rows_N))):
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} has non-contiguous feature rows", reason="CORRUPT_POOL"
            )
        fs = self._features(info)
        n = len(ids)
        rt.item_ids = ids
        rt.row_of = {iid: i for i, iid in enumerate(ids)}
        rt.split_N = split_N
        rt.heldout_target_N = target_N
        rt.occupancy = Occupancy.from_records(
            n, info.settings.labels_per_item, self.store.label_annotators(info.key),
            self.store.active_leases(info.key, time.time()),
        )
        rt.prompt_N_D = fs.read("prompt", n)
        rt.a_N_D = fs.read("a", n)
        rt.b_N_D = fs.read("b", n)

    def _load_posterior(self, info: PoolInfo, rt: PoolRuntime) -> None:
        version = info.posterior_version
        if version == 0 or (rt.posterior_version == version and rt.posterior_state is not None):
            return
        state, _manifest = self._posterior_store(rt.pool_id).load(version)
        rt.lora = None
        if state.config.posterior == "lora_ensemble":
            from balpm_server.posterior.lora import lora_ensemble_from_state

            rt.lora = lora_ensemble_from_state(state, info.settings.lora_model_path)
        rt.posterior_state = state
        rt.posterior_version = version
        rt.epistemic_version = -1

    def _texts(self, info: PoolInfo, rt: PoolRuntime) -> tuple[list[str], list[str]]:
        """Pair texts by row, loaded only for LoRA pools (their posterior reads tokens)."""
        if info.settings.posterior_kind != "lora_ensemble":
            return [], []
        if rt.texts_a is None or rt.texts_b is None:
            rt.texts_a, rt.texts_b = self.store.texts_by_row(info.key)
        return rt.texts_a, rt.texts_b

    @staticmethod
    def _member_probs(
        rt: PoolRuntime, fa_N_D: np.ndarray, fb_N_D: np.ndarray, texts_a: Sequence[str], texts_b: Sequence[str]
    ) -> np.ndarray:
        """probs_N_E of the loaded posterior: features for MLP heads, texts for LoRA adapters."""
        if rt.lora is not None:
            from balpm_server.posterior.lora import predict_probs_lora

            return predict_probs_lora(rt.lora, list(texts_a), list(texts_b))
        return predict_probs(rt.posterior_state, fa_N_D, fb_N_D)

    def _graph(self, info: PoolInfo, prompt_N_D: np.ndarray, pool_N: np.ndarray) -> KnnGraph:
        """The pool's kNN graph over its SPLIT_POOL rows `pool_N` (held-out rows are never neighbours).

        Loaded from disk when it matches the items, else built and saved.
        """
        s = info.settings
        path = self._pool_dir(info.key) / f"knn-k{s.knn_k}-std{int(s.standardize_features)}.npz"
        with self._graph_locks.setdefault(info.key, threading.Lock()):
            return self._load_or_build_graph(info, prompt_N_D, pool_N, path)

    def _load_or_build_graph(self, info: PoolInfo, prompt_N_D: np.ndarray, pool_N: np.ndarray, path: Path) -> KnnGraph:
        s = info.settings
        if path.exists():
            try:
                graph = KnnGraph.load(path)
                if (
                    graph.n_items == len(prompt_N_D)
                    and graph.k == s.knn_k
                    and np.array_equal(graph.members(), pool_N)
                ):
                    return graph
            except errors.BalpmError:
                log.warning("ignoring unreadable kNN graph of pool %s (rebuilding it)", info.pool_id)
        graph = build_knn_graph(
            prompt_N_D, s.knn_k, standardize=s.standardize_features,
            exact_threshold=self.settings.knn_exact_threshold, member_mask_N=pool_N,
        )
        tmp = path.with_suffix(".tmp.npz")
        try:
            graph.save(tmp)
            tmp.replace(path)
        except OSError as e:  # a full or read-only disk: the graph is a cache, use it unsaved
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("kNN graph of pool %s not saved (rebuilt after a restart): %s", info.pool_id, e)
        return graph

    async def _prebuild_graph(self, key: str) -> None:
        """Build the kNN graph in the background after an upload, so the first BAL-PM call is fast."""
        info = self.store.pool_info(key, counts=False)
        if info is None or info.state != PoolState.READY:
            return
        rt = self._runtime(key)
        async with rt.lock:
            self._load_items(info, rt)
            prompt_N_D, split_N = rt.prompt_N_D, rt.split_N
        if prompt_N_D is None or split_N is None or rt.graph is not None:
            return
        pool_N = split_N == int(Split.POOL)
        if int(pool_N.sum()) <= info.settings.knn_k or info.settings.knn_convention is KnnConvention.AUTHORS:
            return
        try:
            graph = await asyncio.to_thread(self._graph, info, prompt_N_D, pool_N)
        except errors.BalpmError as e:
            log.warning("kNN graph of pool %s not prebuilt: %s", info.pool_id, e.message)
            return
        async with rt.lock:
            if rt.item_ids is not None and len(rt.item_ids) == graph.n_items:
                rt.graph = graph

    def _schedule_graph(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self._prebuild_graph(key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ensure_ready(self, info: PoolInfo) -> None:
        if info.state == PoolState.FEATURIZING:
            info = self.store.pool_info(info.key) or info
            total = info.item_count + info.heldout_count
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} is still extracting features ({info.featurized_count}/{total} items); "
                "retry when GetPool reports STATE_READY",
                field="pool_id",
                reason="POOL_FEATURIZING",
                metadata={"featurized": str(info.featurized_count), "total": str(total)},
            )

    # ---- pools -------------------------------------------------------------------------

    async def create_pool(self, tenant: str, pool_id: str, settings: PoolSettings) -> PoolInfo:
        """Create a pool; fills the feature dim from the extractor for server features."""
        v.pool_id(pool_id)
        s = settings
        v.int_range(s.ensemble_size, "settings.ensemble_size", 1, 64)
        v.int_range(s.knn_k, "settings.knn_k", 1, 1024)
        v.finite(s.beta, "settings.beta", low=0.0)
        v.finite(s.d_ent, "settings.d_ent", low=0.0, low_open=True)
        v.finite(s.temperature, "settings.temperature", low=0.0, low_open=True)
        v.finite(s.apl_beta_dpo, "settings.apl_beta_dpo", low=0.0, low_open=True)
        v.int_range(s.labels_per_item, "settings.labels_per_item", 1, 1000)
        v.int_range(s.epochs, "settings.epochs", 1, 10_000)
        if not s.hidden_sizes or len(s.hidden_sizes) > 8:
            raise errors.InvalidArgument("settings.hidden_sizes needs 1-8 layers", field="settings.hidden_sizes")
        for i, width in enumerate(s.hidden_sizes):
            v.int_range(width, f"settings.hidden_sizes[{i}]", 1, 16_384)
        if s.posterior_kind not in ("mlp_ensemble", "lora_ensemble"):
            raise errors.InvalidArgument("unknown settings.posterior_kind", field="settings.posterior_kind")
        if s.posterior_kind == "lora_ensemble" and not (Path(s.lora_model_path) / "config.json").is_file():
            raise errors.InvalidArgument(
                "settings.lora_model_path must be a local model folder with a config.json on the server",
                field="settings.lora_model_path",
            )
        for name in ("apl_policy_model_path", "apl_reference_model_path"):
            path = getattr(s, name)
            if path and not (Path(path) / "config.json").is_file():
                raise errors.InvalidArgument(
                    f"settings.{name} must be a local model folder with a config.json on the server",
                    field=f"settings.{name}",
                )
        too_many = errors.ResourceExhausted(
            f"tenant already holds max_pools_per_tenant={self.settings.max_pools_per_tenant} pools",
            field="pool_id",
            reason="MAX_POOLS_PER_TENANT",
        )
        exists = errors.AlreadyExists(f"pool {pool_id!r} already exists", field="pool_id", reason="POOL_EXISTS")
        # Early answers; the insert below re-checks both atomically (calls race across the await).
        if self.store.pool_count(tenant) >= self.settings.max_pools_per_tenant:
            raise too_many
        if self.store.pool_key(tenant, pool_id) is not None:
            raise exists
        extractor_name = ""
        if s.feature_source == FeatureSource.CLIENT:
            v.int_range(s.feature_dim, "settings.feature_dim", 1, v.MAX_FEATURE_DIM)
        else:
            if self.extractor is None:
                raise errors.FailedPrecondition(
                    "this server has no feature extractor; use FEATURE_SOURCE_CLIENT",
                    field="settings.feature_source",
                    reason="NO_EXTRACTOR",
                )
            dim = await self.extractor.dim()
            s = dataclasses.replace(s, feature_dim=dim)
            extractor_name = self.extractor.name
        key = f"{pool_id}+{uuid.uuid4().hex[:12]}"
        try:
            inserted = self.store.insert_pool(
                key, tenant, pool_id, s, extractor_name, max_pools=self.settings.max_pools_per_tenant
            )
        except sqlite3.IntegrityError as e:
            raise exists from e
        if not inserted:
            raise too_many
        info = self.store.pool_info(key)
        assert info is not None
        return info

    async def get_pool(self, tenant: str, pool_id: str) -> PoolInfo:
        """Return one pool."""
        return self._require_pool(tenant, pool_id, counts=True)

    async def list_pools(self, tenant: str, page_size: int, page_token: str) -> tuple[list[PoolInfo], str]:
        """Return a page of pools in id order and the next page token."""
        if page_size < 0 or page_size > 1000:
            raise errors.InvalidArgument("page_size must be in [0, 1000]", field="page_size")
        size = page_size or 100
        offset = _parse_page_token(page_token)
        pools = self.store.pools_of(tenant)
        page = pools[offset : offset + size]
        infos = [info for _, key in page if (info := self.store.pool_info(key)) is not None]
        nxt = _page_token(offset + size) if offset + size < len(pools) else ""
        return infos, nxt

    async def delete_pool(self, tenant: str, pool_id: str) -> None:
        """Delete a pool and all its data."""
        info = self._require_pool(tenant, pool_id)
        task = self._featurize_tasks.pop(info.key, None)
        if task is not None:
            task.cancel()
        op_id = self._running_training.get(info.key)
        if op_id is not None:
            self._cancel_flags[op_id].set()
        self.store.delete_pool(info.key)
        self._runtimes.pop(info.key, None)
        self._graph_locks.pop(info.key, None)
        shutil.rmtree(self._pool_dir(info.key), ignore_errors=True)

    # ---- uploads -----------------------------------------------------------------------

    def _check_item(self, item: ItemIn, index: int, dim: int, client_features: bool) -> dict[str, np.ndarray]:
        prefix = f"items[{index}]"
        v.item_id(item.item_id, f"{prefix}.item_id")
        v.text(item.prompt, f"{prefix}.prompt")
        v.text(item.completion_a, f"{prefix}.completion_a")
        v.text(item.completion_b, f"{prefix}.completion_b")
        if item.split == Split.HELDOUT and item.heldout_preference is None:
            raise errors.InvalidArgument(
                f"{prefix}.heldout_preference is required for SPLIT_HELDOUT items",
                field=f"{prefix}.heldout_preference",
            )
        if item.apl is not None:
            v.apl_scores(item.apl, f"{prefix}.apl_scores")
        if not client_features:
            if not item.prompt:
                raise errors.InvalidArgument(f"{prefix}.prompt is empty", field=f"{prefix}.prompt")
            return {}
        return {
            "prompt": v.features(item.prompt_features, dim, f"{prefix}.prompt_features"),
            "a": v.features(item.completion_a_features, dim, f"{prefix}.completion_a_features"),
            "b": v.features(item.completion_b_features, dim, f"{prefix}.completion_b_features"),
        }

    async def upload_items(
        self, tenant: str, pool_id: str, chunks: AsyncIterator[Sequence[ItemIn]]
    ) -> tuple[UploadResult, PoolInfo]:
        """Store streamed items; per-item problems are reported, not fatal.

        Each chunk is committed (features fsynced, then SQLite) before the next is read,
        so everything acknowledged survives a crash.
        """
        info = self._require_pool(tenant, pool_id)
        key = info.key  # the stream is bound to this pool instance (see SqliteStore.reserve_rows)
        client_features = info.settings.feature_source == FeatureSource.CLIENT
        dim = info.settings.feature_dim
        fs = self._features(info)
        rt = self._runtime(key)
        accepted = duplicates = index = 0
        rejections: list[Rejection] = []
        gone = errors.NotFound(
            f"pool {pool_id!r} was deleted while this upload was running; later chunks were not stored",
            field="pool_id",
            reason="POOL_NOT_FOUND",
        )
        async for chunk in chunks:
            if len(chunk) > self.settings.max_items_per_chunk:
                raise errors.InvalidArgument(
                    f"chunk has {len(chunk)} items, more than max_items_per_chunk={self.settings.max_items_per_chunk}",
                    field="chunk.items",
                    reason="MAX_ITEMS_PER_CHUNK",
                )
            if not self.store.pool_exists(key):
                raise gone
            good: list[tuple[int, ItemIn, dict[str, np.ndarray], str]] = []
            seen: set[str] = set()
            for item in chunk:
                try:
                    feats = self._check_item(item, index, dim, client_features)
                except errors.InvalidArgument as e:
                    rejections.append(Rejection(item.item_id, index, e.field, e.reason, e.message))
                    index += 1
                    continue
                digest = _digest(
                    item.prompt,
                    item.completion_a,
                    item.completion_b,
                    int(item.split),
                    item.heldout_preference,
                    *(f.tobytes() for f in feats.values()),
                )
                if item.item_id in seen:
                    rejections.append(
                        Rejection(
                            item.item_id,
                            index,
                            f"items[{index}].item_id",
                            "DUPLICATE_IN_STREAM",
                            "item_id appears twice in this chunk",
                        )
                    )
                else:
                    seen.add(item.item_id)
                    good.append((index, item, feats, digest))
                index += 1
            if not good:
                continue
            async with rt.lock:
                stored = self.store.item_digests(key, [g[1].item_id for g in good])
                new: list[tuple[ItemIn, dict[str, np.ndarray], str]] = []
                for at, item, feats, digest in good:
                    old = stored.get(item.item_id)
                    if old is None:
                        new.append((item, feats, digest))
                    elif old == digest:
                        duplicates += 1
                    else:
                        rejections.append(
                            Rejection(
                                item.item_id,
                                at,
                                f"items[{at}].item_id",
                                "CONFLICT",
                                "an item with this item_id exists with different content",
                            )
                        )
                if not new:
                    continue
                try:
                    with self.store.transaction() as conn:
                        first = self.store.reserve_rows(conn, key, len(new))
                        rows_R = np.arange(first, first + len(new), dtype=np.int64)
                        if client_features:
                            fs.write_rows(
                                rows_R, {k: np.stack([f[k] for _, f, _ in new]) for k in ("prompt", "a", "b")}
                            )
                        self.store.insert_items(conn, key, [_item_record(item, int(r), digest, client_features)
                                                            for (item, _, digest), r in zip(new, rows_R, strict=True)])
                        if not client_features or self._server_apl(info):
                            self.store.set_pool_state_in(conn, key, PoolState.FEATURIZING)
                except errors.NotFound:
                    raise gone from None
                accepted += len(new)
                rt.invalidate_items()
        if accepted and (not client_features or self._server_apl(info)):
            self._schedule_featurize(key)
        elif accepted:
            self._schedule_graph(key)
        final = self.store.pool_info(key, counts=True)
        if final is None:
            raise gone
        return UploadResult(accepted, duplicates, tuple(rejections)), final

    @staticmethod
    def _server_apl(info: PoolInfo) -> bool:
        return bool(info.settings.apl_policy_model_path and info.settings.apl_reference_model_path)

    async def _score_apl(self, info: PoolInfo) -> None:
        """Compute missing APL log-probabilities with the pool's policy and reference models."""
        from balpm_server.features.logprobs import apl_logprobs

        todo = self.store.items_missing_apl(info.key)
        if not todo:
            return
        s = info.settings
        logp_N_4 = await asyncio.to_thread(
            apl_logprobs, s.apl_policy_model_path, s.apl_reference_model_path,
            [t[1] for t in todo], [t[2] for t in todo], [t[3] for t in todo], device=self.settings.device,
        )
        self.store.update_apl_scores(
            info.key,
            [(t[0], AplScores(*(float(x) for x in logp_N_4[i]))) for i, t in enumerate(todo)],
        )

    def _schedule_featurize(self, key: str) -> None:
        task = self._featurize_tasks.get(key)
        if task is not None and not task.done():
            return
        self._featurize_tasks[key] = asyncio.get_running_loop().create_task(self._featurize(key))

    async def _featurize(self, key: str) -> None:
        """Extract features (and server-side APL scores) for new rows; resumable after a crash."""
        # Large groups let the extractor sort texts by length across many items.
        batch = max(1, self.settings.extract_batch_size) * 8
        try:
            while True:
                todo = self.store.unfeaturized(key)
                if not todo:
                    break
                info = self.store.pool_info(key)
                if info is None:
                    return
                assert self.extractor is not None
                fs = self._features(info)
                for start in range(0, len(todo), batch):
                    part = todo[start : start + batch]
                    rows_R = np.array([r for r, *_ in part], dtype=np.int64)
                    prompts = [p for _, p, _, _ in part]
                    texts_a = [p + a for _, p, a, _ in part]
                    texts_b = [p + b for _, p, _, b in part]
                    feats = await self.extractor.embed(prompts + texts_a + texts_b)
                    n = len(part)
                    fs.write_rows(rows_R, {"prompt": feats[:n], "a": feats[n : 2 * n], "b": feats[2 * n :]})
                    self.store.mark_featurized(key, rows_R.tolist())
            info = self.store.pool_info(key, counts=False)
            if info is not None and self._server_apl(info):
                await self._score_apl(info)
            self.store.set_pool_state(key, PoolState.READY)
            self._runtime(key).invalidate_items()
            self._schedule_graph(key)
        except asyncio.CancelledError:
            raise
        except errors.BalpmError as e:
            log.error("featurisation of pool %s paused: %s; retrying in 5 s", key, e.message)
            await asyncio.sleep(5.0)
            self._featurize_tasks.pop(key, None)
            if self.store.pool_exists(key):
                self._schedule_featurize(key)
        except Exception:
            log.exception("featurisation of pool %s failed; retrying in 5 s", key)
            await asyncio.sleep(5.0)
            self._featurize_tasks.pop(key, None)
            if self.store.pool_exists(key):
                self._schedule_featurize(key)

    # ---- labels ------------------------------------------------------------------------

    async def ingest_labels(
        self, tenant: str, pool_id: str, labels: Sequence[LabelIn], request_id: str = ""
    ) -> IngestResult:
        """Store labels atomically and idempotently; acknowledged only after commit."""
        info = self._require_pool(tenant, pool_id)
        if not labels:
            raise errors.InvalidArgument("labels is empty", field="labels", reason="EMPTY_BATCH")
        if len(labels) > MAX_LABELS_PER_REQUEST:
            raise errors.InvalidArgument(
                f"at most {MAX_LABELS_PER_REQUEST} labels per request", field="labels", reason="TOO_MANY_LABELS"
            )
        clean: list[LabelIn] = []
        for i, lb in enumerate(labels):
            v.item_id(lb.label_id, f"labels[{i}].label_id")
            v.item_id(lb.item_id, f"labels[{i}].item_id")
            ann = v.annotator_id(lb.annotator_id, f"labels[{i}].annotator_id")
            clean.append(dataclasses.replace(lb, annotator_id=ann))
        req_digest = _digest(*(dataclasses.astuple(c) for c in clean))
        if request_id:
            v.item_id(request_id, "request_id")
        key = info.key
        rt = self._runtime(key)
        # Everything from the replay check to the commit runs under the pool lock: a retry
        # that waits behind its original finds the original's record and replays it.
        async with rt.lock:
            if request_id:
                prior = self.store.get_request(key, request_id)
                if prior is not None:
                    if prior[0] != req_digest:
                        raise errors.AlreadyExists(
                            "request_id was used before with different labels",
                            field="request_id",
                            reason="REQUEST_ID_CONFLICT",
                        )
                    body = json.loads(prior[1])
                    return IngestResult(0, body["stored_count"] + body["duplicate_count"], self.store.label_count(key))
            split_of = self.store.item_splits(key, [c.item_id for c in clean])
            existing = self.store.existing_labels(key, [c.label_id for c in clean])
            fresh: list[LabelIn] = []
            dup = 0
            seen: dict[str, LabelIn] = {}
            for i, c in enumerate(clean):
                if c.item_id not in split_of:
                    raise errors.NotFound(
                        f"labels[{i}].item_id {c.item_id!r} is not an item of pool {pool_id!r}; upload it first",
                        field=f"labels[{i}].item_id",
                        reason="ITEM_NOT_FOUND",
                    )
                if split_of.get(c.item_id) == int(Split.HELDOUT):
                    raise errors.InvalidArgument(
                        f"labels[{i}].item_id {c.item_id!r} is a held-out item; it is labelled at upload",
                        field=f"labels[{i}].item_id",
                        reason="HELDOUT_ITEM",
                    )
                old = existing.get(c.label_id) or (
                    (seen[c.label_id].item_id, int(seen[c.label_id].preference), seen[c.label_id].annotator_id)
                    if c.label_id in seen
                    else None
                )
                if old is not None:
                    if old == (c.item_id, int(c.preference), c.annotator_id):
                        dup += 1
                        continue
                    raise errors.AlreadyExists(
                        f"labels[{i}].label_id {c.label_id!r} exists with different content",
                        field=f"labels[{i}].label_id",
                        reason="LABEL_CONFLICT",
                        metadata={
                            "stored_item_id": old[0],
                            "stored_preference": Preference(old[1]).name,
                            "stored_annotator_id": old[2],
                        },
                    )
                seen[c.label_id] = c
                fresh.append(c)
            if fresh or request_id:
                # Durable (fsynced) before the reply, in a worker thread: the loop keeps serving.
                await _settled(self._label_writes.submit(
                    LabelWrite(
                        pool_key=key,
                        labels=tuple(fresh),
                        labels_per_item=info.settings.labels_per_item,
                        request_id=request_id,
                        request_digest=req_digest,
                        response_json=json.dumps({"stored_count": len(fresh), "duplicate_count": dup}),
                    )
                ))
            if rt.occupancy is not None:
                for c in fresh:
                    row = rt.row_of.get(c.item_id)
                    if row is None:  # uploaded after the runtime was loaded: reload on next use
                        rt.invalidate_items()
                        break
                    rt.occupancy.add_label(row, c.annotator_id)
        return IngestResult(len(fresh), dup, self.store.label_count(key))

    async def export_labels(
        self, tenant: str, pool_id: str, page_size: int, page_token: str
    ) -> AsyncIterator[tuple[list[tuple[StoredLabel, dict[str, str]]], str]]:
        """Yield pages of (label, item texts) with the token that resumes after each page."""
        key = self._require_pool(tenant, pool_id).key
        if page_size < 0 or page_size > 10_000:
            raise errors.InvalidArgument("page_size must be in [0, 10000]", field="page_size")
        size = page_size or 1000
        after = _parse_page_token(page_token)
        while True:
            page = self.store.labels_page(key, after, size + 1)  # one more: is there a next page?
            if not page:
                return
            more, page = len(page) > size, page[:size]
            texts = self.store.item_texts(key, [lb.item_id for lb in page])
            after = page[-1].seq
            yield (
                [(lb, dataclasses.asdict(texts[lb.item_id])) for lb in page],
                _page_token(after) if more else "",
            )
            if not more:
                return

    async def export_items(
        self,
        tenant: str,
        pool_id: str,
        *,
        page_size: int,
        page_token: str,
        include_features: bool,
        split: Split | None,
    ) -> AsyncIterator[tuple[list[ItemIn], str]]:
        """Yield pages of stored items in upload order with the token that resumes after each page.

        With `include_features`, featurised items carry their three feature vectors.
        """
        info = self._require_pool(tenant, pool_id)
        if page_size < 0 or page_size > MAX_EXPORT_ITEMS_PAGE:
            raise errors.InvalidArgument(
                f"page_size must be in [0, {MAX_EXPORT_ITEMS_PAGE}]", field="page_size", reason="OUT_OF_RANGE"
            )
        size = page_size or (100 if include_features else 500)
        after = _parse_page_token(page_token) - 1  # tokens hold the next row (0 = from the start)
        fs = self._features(info)
        split_no = int(split) if split is not None else None
        while True:
            page = self.store.items_page(info.key, after, size + 1, split_no)  # one more: a next page?
            if not page:
                return
            more, page = len(page) > size, page[:size]
            items = [e.item for e in page]
            if include_features:
                rows_R = np.array([e.row for e in page], dtype=np.int64)
                kinds = {k: fs.read_rows(k, rows_R) for k in ("prompt", "a", "b")}
                items = [
                    dataclasses.replace(
                        e.item,
                        prompt_features=tuple(kinds["prompt"][i].tolist()),
                        completion_a_features=tuple(kinds["a"][i].tolist()),
                        completion_b_features=tuple(kinds["b"][i].tolist()),
                    )
                    if e.featurized
                    else e.item
                    for i, e in enumerate(page)
                ]
            after = page[-1].row
            yield items, (_page_token(after + 1) if more else "")
            if not more:
                return

    # ---- training ----------------------------------------------------------------------

    async def update_posterior(
        self, tenant: str, pool_id: str, *, seed: int, warm_start: bool, epochs: int
    ) -> Operation:
        """Start retraining the posterior; ABORTED if one is already running for the pool."""
        info = self._require_pool(tenant, pool_id)
        self._ensure_ready(info)
        running = self._running_training.get(info.key)
        if running is not None:
            raise errors.Aborted(
                f"a training operation is already running for pool {pool_id!r}: {running}; watch it or cancel it",
                field="pool_id",
                reason="TRAINING_IN_PROGRESS",
                metadata={"operation_id": running},
            )
        running_for_tenant = sum(
            1 for op_id in self._running_training.values() if self._operations[op_id].tenant == tenant
        )
        if running_for_tenant >= self.settings.max_training_jobs_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant already runs max_training_jobs_per_tenant={self.settings.max_training_jobs_per_tenant}",
                reason="MAX_TRAINING_JOBS",
            )
        label_count = self.store.label_count(info.key)
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
        self.store.save_operation(op)
        self._operations[op.operation_id] = op
        self._op_events[op.operation_id] = asyncio.Event()
        self._cancel_flags[op.operation_id] = threading.Event()
        self._running_training[info.key] = op.operation_id
        task = asyncio.get_running_loop().create_task(self._train(info, op, seed=seed, warm_start=warm_start))
        self._training_tasks[op.operation_id] = task
        task.add_done_callback(functools.partial(self._forget_training_task, op.operation_id))
        return op

    def _forget_training_task(self, operation_id: str, _task: asyncio.Task[None]) -> None:
        self._training_tasks.pop(operation_id, None)

    def _notify(self, op: Operation) -> None:
        event = self._op_events.get(op.operation_id)
        if event is not None:
            event.set()
            self._op_events[op.operation_id] = asyncio.Event()

    async def _train(self, info: PoolInfo, op: Operation, *, seed: int, warm_start: bool) -> None:
        loop = asyncio.get_running_loop()
        cancel = self._cancel_flags[op.operation_id]
        rt = self._runtime(info.key)
        started = time.perf_counter()
        try:
            async with rt.lock:
                self._load_items(info, rt)
                rows_L, targets_L = self.store.label_targets(info.key)
                assert rt.a_N_D is not None and rt.b_N_D is not None
                feats_a, feats_b = rt.a_N_D[rows_L], rt.b_N_D[rows_L]
                all_a, all_b = self._texts(info, rt)
                pair_a = [all_a[r] for r in rows_L] if all_a else []
                pair_b = [all_b[r] for r in rows_L] if all_b else []
            s = info.settings
            config = EnsembleConfig(
                ensemble_size=s.ensemble_size,
                hidden_sizes=tuple(s.hidden_sizes),
                epochs=op.epochs,
                # Small minibatches: early rounds have a few hundred labels, and 128-pair
                # batches would give only a couple of optimiser steps per epoch.
                batch_size=32,
                warm_start=warm_start,
                device=self.settings.device,
                posterior=s.posterior_kind,
            )
            init = None
            latest = self._posterior_store(info.key).latest_version()
            if warm_start and latest:
                init, _ = self._posterior_store(info.key).load(latest)

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
            manifest = {
                "pool_id": info.pool_id,
                "seed": seed,
                "label_count": len(rows_L),
                "warm_start": warm_start,
                "settings": dataclasses.asdict(config),
                "metrics": {
                    "train_loss": result.train_loss,
                    "val_log_likelihood": result.val_log_likelihood,
                    "epochs_run": result.epochs_run,
                    "train_s": train_s,
                },
                "created_s": time.time(),
            }
            version = await asyncio.to_thread(self._posterior_store(info.key).save, result.state, manifest)
            self.store.set_posterior_version(info.key, version)
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
        except errors.Cancelled as e:
            op.state, op.error_code, op.error_message = OperationState.CANCELLED, "CANCELLED", e.message
        except errors.BalpmError as e:
            op.state, op.error_code, op.error_message = OperationState.FAILED, e.code.name, e.message
        except Exception as e:  # the operation reports it; the server keeps running
            log.exception("training of pool %s failed", info.pool_id)
            fault = storage_error(e)  # a full or read-only disk: its code, and a message naming no path
            if fault is not None:
                op.state, op.error_code = OperationState.FAILED, fault.code.name
                op.error_message = f"training failed: {fault.message}"
            else:
                op.state, op.error_code = OperationState.FAILED, "INTERNAL"
                op.error_message = f"training failed ({type(e).__name__}); see the server log"
        finally:
            if not op.state.done:  # cancelled by shutdown
                op.state, op.error_code, op.error_message = OperationState.FAILED, "ABORTED", SHUTDOWN_REASON
            op.update_time_s = time.time()
            self._running_training.pop(info.key, None)
            saved = False
            try:
                if not self._closed and self.store.pool_exists(info.key):
                    self.store.save_operation(op)
                saved = True
            except Exception:  # e.g. a full disk: keep the outcome in memory rather than lose it
                log.exception("could not record the outcome of operation %s; kept in memory", op.operation_id)
            finally:
                self._notify(op)
                self._op_events.pop(op.operation_id, None)
                self._cancel_flags.pop(op.operation_id, None)
                if saved:  # finished: evict from memory; GetOperation reads it from storage from now on
                    self._operations.pop(op.operation_id, None)

    def _require_operation(self, tenant: str, operation_id: str) -> Operation:
        if not operation_id:
            raise errors.InvalidArgument("operation_id is required", field="operation_id")
        op = self._operations.get(operation_id) or self.store.load_operation(operation_id)
        if op is None or op.tenant != tenant:
            raise errors.NotFound(f"operation {operation_id!r} does not exist", field="operation_id")
        return op

    async def get_operation(self, tenant: str, operation_id: str) -> Operation:
        """Return an operation's current state."""
        return self._require_operation(tenant, operation_id)

    async def watch_operation(self, tenant: str, operation_id: str) -> AsyncIterator[Operation]:
        """Yield the operation now and after each change, until it is done."""
        op = self._require_operation(tenant, operation_id)
        while True:
            yield op
            if op.state.done:
                return
            event = self._op_events.get(operation_id)
            if event is None:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=5.0)

    async def cancel_operation(self, tenant: str, operation_id: str) -> Operation:
        """Request cancellation (takes effect at the next epoch boundary)."""
        op = self._require_operation(tenant, operation_id)
        flag = self._cancel_flags.get(operation_id)
        if flag is not None and not op.state.done:
            flag.set()
        return op

    # ---- acquisition -------------------------------------------------------------------

    @staticmethod
    def _fresh_scores(info: PoolInfo, rt: PoolRuntime) -> np.ndarray | None:
        """The cached BALD scores when they belong to the latest posterior, else None (no I/O)."""
        if info.posterior_version and rt.epistemic_version == info.posterior_version:
            return rt.epistemic_N
        return None

    def _scores(self, info: PoolInfo, rt: PoolRuntime) -> np.ndarray | None:
        """BALD epistemic scores by row for the latest posterior (cached per version).

        Only SPLIT_POOL rows are scored: held-out rows are never candidates nor counted as
        acquired, so their entries stay 0. The BALD ranking of the pool rows is cached
        with them.
        """
        self._load_posterior(info, rt)
        if info.posterior_version == 0 or rt.posterior_state is None:
            return None
        if rt.epistemic_version != info.posterior_version or rt.epistemic_N is None:
            assert rt.split_N is not None
            rows = np.flatnonzero(rt.split_N == int(Split.POOL))
            epistemic_N = np.zeros(len(rt.split_N), dtype=np.float64)
            epistemic_N[rows] = self._epistemic_of_rows(info, rt, rows)
            rt.bald_order_R = descending_order(epistemic_N, rows)
            rt.epistemic_N = epistemic_N
            rt.epistemic_version = info.posterior_version
        return rt.epistemic_N

    def _epistemic_of_rows(self, info: PoolInfo, rt: PoolRuntime, rows_R: np.ndarray) -> np.ndarray:
        """BALD scores of the given rows under the latest posterior (zeros before the first)."""
        self._load_posterior(info, rt)
        if info.posterior_version == 0 or rt.posterior_state is None:
            return np.zeros(len(rows_R))
        assert rt.a_N_D is not None and rt.b_N_D is not None
        all_a, all_b = self._texts(info, rt)
        texts_a = [all_a[r] for r in rows_R] if all_a else []
        texts_b = [all_b[r] for r in rows_R] if all_b else []
        return bald_from_probs(self._member_probs(rt, rt.a_N_D[rows_R], rt.b_N_D[rows_R], texts_a, texts_b))

    async def acquire(
        self,
        tenant: str,
        pool_id: str,
        *,
        batch_size: int,
        strategy: Strategy | None,
        seed: int,
        lease_ttl_s: float,
        annotator_id: str,
        options: dict[str, float],
    ) -> AcquireResult:
        """Choose and lease the next batch."""
        info = self._require_pool(tenant, pool_id)
        self._ensure_ready(info)
        if batch_size < 1:
            raise errors.InvalidArgument("batch_size must be at least 1", field="batch_size")
        if batch_size > self.settings.max_batch_size:
            raise errors.InvalidArgument(
                f"batch_size {batch_size} exceeds max_batch_size={self.settings.max_batch_size}",
                field="batch_size",
                reason="MAX_BATCH_SIZE",
            )
        v.finite(lease_ttl_s, "lease_ttl_s", low=0.0)
        if lease_ttl_s > self.settings.max_lease_ttl_s:
            raise errors.InvalidArgument(
                f"lease_ttl_s {lease_ttl_s} exceeds max_lease_ttl_s={self.settings.max_lease_ttl_s:.0f}",
                field="lease_ttl_s",
                reason="MAX_LEASE_TTL",
            )
        ttl_s = lease_ttl_s or self.settings.default_lease_ttl_s
        annotator = v.annotator_id(annotator_id, "annotator_id")
        s = info.settings
        strat = strategy or s.default_strategy
        params = AcquisitionParams(
            k=s.knn_k,
            beta=options.get("beta", s.beta),
            d_ent=options.get("d_ent", s.d_ent),
            temperature=options.get("temperature", s.temperature),
            apl_beta_dpo=options.get("apl_beta_dpo", s.apl_beta_dpo),
            apl_entropy_top_s=int(options.get("apl_entropy_top_s", 0)),
            knn_convention=s.knn_convention,
        )
        v.finite(params.beta, "options.beta", low=0.0)
        v.finite(params.d_ent, "options.d_ent", low=0.0, low_open=True)
        v.finite(params.temperature, "options.temperature", low=0.0, low_open=True)
        v.finite(params.apl_beta_dpo, "options.apl_beta_dpo", low=0.0, low_open=True)
        rt = self._runtime(info.key)
        async with rt.lock:
            started = time.perf_counter()
            self._load_items(info, rt)
            assert rt.item_ids is not None and rt.occupancy is not None
            now = time.time()
            rt.occupancy.purge_expired(now)
            epistemic_N = self._fresh_scores(info, rt)
            if epistemic_N is None and strat in SCORED_STRATEGIES:
                epistemic_N = await asyncio.to_thread(self._scores, info, rt)
            batch = None
            if strat is Strategy.BALD and epistemic_N is not None and rt.bald_order_R is not None:
                batch = self._bald_fast(rt, epistemic_N, batch_size, annotator)
            if batch is None:
                batch = await self._select(info, rt, strat, batch_size, annotator, now, seed, params, epistemic_N)
            if info.posterior_version and strat not in SCORED_STRATEGIES:  # report the picks' BALD
                epi_B = (
                    epistemic_N[batch.indices_B]
                    if epistemic_N is not None
                    else await asyncio.to_thread(self._epistemic_of_rows, info, rt, batch.indices_B)
                )
                batch = dataclasses.replace(batch, epistemic_B=np.asarray(epi_B, dtype=np.float64))
            rows_B = batch.indices_B.tolist()
            chosen = [rt.item_ids[r] for r in rows_B]
            expire_s = now + ttl_s
            # Leased in memory under the lock (so the next caller skips these rows), then
            # made durable before the reply; a failed write takes the leases back.
            for r in rows_B:
                rt.occupancy.add_lease(r, annotator, expire_s)
        write = asyncio.ensure_future(self._leases.submit((info.key, chosen, annotator, expire_s)))
        try:
            texts = await asyncio.shield(write)
        except BaseException:
            # Failed, or cancelled (client deadline) while the write goes ahead regardless:
            # take the leases back, in SQLite too once that write has landed.
            await asyncio.shield(self._take_back_leases(rt, write, info.key, chosen, rows_B, annotator))
            raise
        acquire_s = time.perf_counter() - started
        metrics.observe_acquisition(strat.name, acquire_s, batch.epistemic_B, batch.entropy_B)
        items = tuple(
            AcquiredItem(
                item=texts[iid],
                total=float(batch.total_B[i]),
                epistemic=float(batch.epistemic_B[i]),
                entropy=float(batch.entropy_B[i]),
                rank=i,
            )
            for i, iid in enumerate(chosen)
        )
        return AcquireResult(items, info.posterior_version, strat, expire_s, acquire_s)

    async def _take_back_leases(
        self,
        rt: PoolRuntime,
        write: asyncio.Future[dict[str, ItemText]],
        key: str,
        item_ids: Sequence[str],
        rows_B: Sequence[int],
        annotator: str,
    ) -> None:
        """End the leases of an acquisition whose reply will not be sent.

        Waits for its lease write first (it goes ahead even when the caller is cancelled),
        so the SQLite rows are deleted after they exist; the in-memory leases stay until
        then, so nobody is handed those rows meanwhile.
        """
        with contextlib.suppress(BaseException):
            await write
        written = write.done() and not write.cancelled() and write.exception() is None  # else nothing stored
        async with rt.lock:
            if written:
                self.store.release_leases(key, item_ids, annotator)
            if rt.occupancy is not None:
                for r in rows_B:
                    rt.occupancy.release(r, annotator)

    @staticmethod
    def _bald_fast(rt: PoolRuntime, epistemic_N: np.ndarray, batch_size: int, annotator: str) -> CandidateBatch | None:
        """BALD top-B by walking the cached ranking; None when it cannot fill the batch.

        Same rows as `select_batch(BALD)` over the full candidate mask (tested), in
        O(rows looked at) instead of O(N).
        """
        assert rt.occupancy is not None and rt.bald_order_R is not None
        occ = rt.occupancy
        rows_B = first_open(rt.bald_order_R, batch_size, lambda rows_R: occ.open_among(rows_R, annotator))
        if rows_B.size < batch_size:
            return None  # the general path raises the precise error
        epi_B = epistemic_N[rows_B]
        return CandidateBatch(rows_B, epi_B, epi_B, np.full(batch_size, np.nan))

    async def _select(
        self,
        info: PoolInfo,
        rt: PoolRuntime,
        strat: Strategy,
        batch_size: int,
        annotator: str,
        now: float,
        seed: int,
        params: AcquisitionParams,
        epistemic_N: np.ndarray | None,
    ) -> CandidateBatch:
        """The general path: full candidate masks, then `select_batch` (off the loop unless cheap)."""
        assert rt.split_N is not None and rt.prompt_N_D is not None and rt.occupancy is not None
        s = info.settings
        pool_N = rt.split_N == int(Split.POOL)
        candidate_N, acquired_N = rt.occupancy.masks(pool_N, annotator, now)
        n_candidates = int(candidate_N.sum())
        if n_candidates == 0:
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} has no acquirable items left (all labelled or leased)",
                field="batch_size",
                reason="POOL_EXHAUSTED",
            )
        if batch_size > n_candidates:
            raise errors.FailedPrecondition(
                f"batch_size {batch_size} exceeds the {n_candidates} acquirable items of pool {info.pool_id!r}",
                field="batch_size",
                reason="BATCH_LARGER_THAN_POOL",
                metadata={"acquirable": str(n_candidates)},
            )
        uses_knn = strat in (Strategy.BALPM, Strategy.ENTROPY_ONLY)
        authors = s.knn_convention is KnnConvention.AUTHORS  # radii over this call's candidates, no graph
        needs_graph = uses_knn and not authors
        if uses_knn:
            # STANDARD needs k other pool rows per row; AUTHORS k candidates (the point itself included).
            population, need = (n_candidates, s.knn_k) if authors else (int(pool_N.sum()), s.knn_k + 1)
            if population < need:
                raise errors.FailedPrecondition(
                    f"BAL-PM with knn_k={s.knn_k} needs at least {need} "
                    f"{'acquirable' if authors else 'pool'} items; the pool has {population}",
                    field="strategy",
                    reason="POOL_TOO_SMALL",
                )
        if needs_graph and rt.graph is None:
            rt.graph = await asyncio.to_thread(self._graph, info, rt.prompt_N_D, pool_N)
        apl = None
        if strat in (Strategy.APL_CERTAINTY, Strategy.APL_ENTROPY, Strategy.APL_HYBRID):
            m = self.store.apl_scores(info.key)
            apl = AplInputs(m[:, 0], m[:, 1], m[:, 2], m[:, 3], m[:, 4] if np.isfinite(m[:, 4]).any() else None)
        select = functools.partial(
            select_batch,
            strat,
            batch_size=batch_size,
            candidate_mask_N=candidate_N,
            acquired_mask_N=acquired_N,
            rng=np.random.default_rng(seed),
            params=params,
            epistemic_N=epistemic_N,
            graph=rt.graph if needs_graph else None,
            apl=apl,
            prompt_N_D=rt.prompt_N_D if uses_knn and authors else None,
            standardize_prompt=s.standardize_features,
        )
        if strat in (Strategy.RANDOM, Strategy.BALD):  # O(N) array work: cheaper than a thread hop
            return select()
        return await asyncio.to_thread(select)

    async def release_items(self, tenant: str, pool_id: str, item_ids: Sequence[str], annotator_id: str) -> int:
        """End leases on items; returns how many leases ended."""
        key = self._require_pool(tenant, pool_id).key
        if not item_ids:
            raise errors.InvalidArgument("item_ids is empty", field="item_ids")
        if len(item_ids) > MAX_RELEASE_IDS:
            raise errors.InvalidArgument(
                f"item_ids has {len(item_ids)} ids; at most {MAX_RELEASE_IDS} per call",
                field="item_ids",
                reason="TOO_MANY_IDS",
            )
        for i, iid in enumerate(item_ids):
            v.item_id(iid, f"item_ids[{i}]")
        ann = v.annotator_id(annotator_id, "annotator_id") if annotator_id else ""
        rt = self._runtime(key)
        async with rt.lock:
            released = self.store.release_leases(key, item_ids, ann)
            if rt.occupancy is not None:
                for iid in item_ids:
                    if iid in rt.row_of:
                        rt.occupancy.release(rt.row_of[iid], ann)
            return released

    async def update_item_scores(self, tenant: str, pool_id: str, scores: Sequence[tuple[str, AplScores]]) -> int:
        """Set APL log-probabilities of items."""
        key = self._require_pool(tenant, pool_id).key
        if not scores:
            raise errors.InvalidArgument("scores is empty", field="scores")
        for i, (iid, s) in enumerate(scores):
            v.item_id(iid, f"scores[{i}].item_id")
            v.apl_scores(s, f"scores[{i}].apl_scores")
        known = self.store.item_texts(key, [iid for iid, _ in scores])
        for i, (iid, _) in enumerate(scores):
            if iid not in known:
                raise errors.NotFound(f"scores[{i}].item_id {iid!r} is not in the pool", field=f"scores[{i}].item_id")
        return self.store.update_apl_scores(key, scores)

    # ---- prediction and evaluation -----------------------------------------------------

    @contextlib.contextmanager
    def _extraction_slot(self, tenant: str) -> Iterator[None]:
        """Count one ad-hoc extraction against the tenant's `max_extractions_per_tenant`."""
        held = self._extracting.get(tenant, 0)
        limit = self.settings.max_extractions_per_tenant
        if held >= limit:
            raise errors.ResourceExhausted(
                f"tenant already runs max_extractions_per_tenant={limit} Predict/Evaluate calls with ad-hoc "
                "texts; retry when one finishes, or pass item_ids of stored items",
                field="items",
                reason="EXTRACTION_BUSY",
            )
        self._extracting[tenant] = held + 1
        try:
            yield
        finally:
            self._extracting[tenant] -= 1
            if not self._extracting[tenant]:
                del self._extracting[tenant]

    async def _features_for(
        self,
        tenant: str,
        info: PoolInfo,
        rt: PoolRuntime,
        item_ids: Sequence[str],
        items: Sequence[ItemIn],
        field: str,
    ) -> tuple[list[str], np.ndarray, np.ndarray, list[str], list[str]]:
        """Features (and, for LoRA pools, pair texts) of stored items (by id) or ad-hoc items."""
        self._load_items(info, rt)
        assert rt.a_N_D is not None and rt.b_N_D is not None
        all_a, all_b = self._texts(info, rt)
        lora = info.settings.posterior_kind == "lora_ensemble"
        pair_a: list[str] = []
        pair_b: list[str] = []
        if item_ids:
            rows = []
            for i, iid in enumerate(item_ids):
                row = rt.row_of.get(iid)
                if row is None:
                    raise errors.NotFound(
                        f"{field}[{i}] {iid!r} is not in pool {info.pool_id!r}", field=f"{field}[{i}]"
                    )
                rows.append(row)
            if lora:
                pair_a, pair_b = [all_a[r] for r in rows], [all_b[r] for r in rows]
            return list(item_ids), rt.a_N_D[rows], rt.b_N_D[rows], pair_a, pair_b
        dim = info.settings.feature_dim
        ids, fa, fb, texts_a, texts_b = [], [], [], [], []
        for i, item in enumerate(items):
            ids.append(item.item_id)
            if item.item_id and not (item.completion_a_features or item.prompt or item.completion_a):
                row = rt.row_of.get(item.item_id)
                if row is None:
                    raise errors.NotFound(
                        f"{field}[{i}].item_id {item.item_id!r} is not in pool {info.pool_id!r}",
                        field=f"{field}[{i}].item_id",
                    )
                fa.append(rt.a_N_D[row])
                fb.append(rt.b_N_D[row])
                if lora:
                    pair_a.append(all_a[row])
                    pair_b.append(all_b[row])
                continue
            if lora:
                pair_a.append(item.prompt + item.completion_a)
                pair_b.append(item.prompt + item.completion_b)
            if info.settings.feature_source == FeatureSource.CLIENT:
                fa.append(v.features(item.completion_a_features, dim, f"{field}[{i}].completion_a_features"))
                fb.append(v.features(item.completion_b_features, dim, f"{field}[{i}].completion_b_features"))
            else:
                v.text(item.prompt, f"{field}[{i}].prompt")
                texts_a.append(item.prompt + item.completion_a)
                texts_b.append(item.prompt + item.completion_b)
        if texts_a:
            if len(texts_a) > self.settings.max_predict_texts:
                raise errors.InvalidArgument(
                    f"{field} has {len(texts_a)} ad-hoc items to featurise; at most "
                    f"max_predict_texts={self.settings.max_predict_texts} per call (upload them and pass item_ids)",
                    field=field,
                    reason="TOO_MANY_TEXTS",
                )
            if self.extractor is None:
                raise errors.FailedPrecondition(
                    "this server has no feature extractor for ad-hoc texts", field=field, reason="NO_EXTRACTOR"
                )
            with self._extraction_slot(tenant):
                feats = await self.extractor.embed(texts_a + texts_b)
            return ids, feats[: len(texts_a)], feats[len(texts_a) :], pair_a, pair_b
        return ids, np.stack(fa).astype(np.float32), np.stack(fb).astype(np.float32), pair_a, pair_b

    def _require_posterior(self, info: PoolInfo, rt: PoolRuntime) -> None:
        if info.posterior_version == 0:
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} has no posterior yet; run UpdatePosterior first",
                field="pool_id",
                reason="NO_POSTERIOR",
            )
        self._load_posterior(info, rt)

    async def predict(
        self, tenant: str, pool_id: str, item_ids: Sequence[str], items: Sequence[ItemIn]
    ) -> tuple[list[PredictionOut], int]:
        """Predict P(A preferred) with epistemic and aleatoric uncertainty."""
        info = self._require_pool(tenant, pool_id)
        self._ensure_ready(info)
        if not item_ids and not items:
            raise errors.InvalidArgument("give item_ids or items", field="item_ids", reason="EMPTY_BATCH")
        if item_ids and items:
            raise errors.InvalidArgument(
                "give item_ids or items, not both", field="items", reason="ITEM_IDS_AND_ITEMS"
            )
        rt = self._runtime(info.key)
        self._require_posterior(info, rt)
        ids, fa, fb, ta, tb = await self._features_for(
            tenant, info, rt, item_ids, items, "item_ids" if item_ids else "items"
        )
        probs_N_E = await asyncio.to_thread(self._member_probs, rt, fa, fb, ta, tb)
        epistemic_N = bald_from_probs(probs_N_E)
        mean_N = probs_N_E.mean(axis=1)
        eps = 1e-12
        member_h_N_E = -(probs_N_E * np.log(probs_N_E + eps) + (1 - probs_N_E) * np.log(1 - probs_N_E + eps))
        aleatoric_N = member_h_N_E.mean(axis=1)
        out = [
            PredictionOut(
                iid,
                float(mean_N[i]),
                float(epistemic_N[i]),
                float(aleatoric_N[i]),
                tuple(float(p) for p in probs_N_E[i]),
            )
            for i, iid in enumerate(ids)
        ]
        return out, info.posterior_version

    async def evaluate(self, tenant: str, pool_id: str, items: Sequence[tuple[ItemIn, Preference]]) -> EvaluationOut:
        """Evaluate on given labelled items, or on the held-out split when none are given."""
        info = self._require_pool(tenant, pool_id)
        self._ensure_ready(info)
        rt = self._runtime(info.key)
        self._require_posterior(info, rt)
        if items:
            _ids, fa, fb, ta, tb = await self._features_for(tenant, info, rt, [], [it for it, _ in items], "items")
            targets_N = np.array([p.target for _, p in items], dtype=np.float64)
        else:
            self._load_items(info, rt)
            assert rt.split_N is not None and rt.a_N_D is not None and rt.b_N_D is not None
            rows = np.flatnonzero(rt.split_N == int(Split.HELDOUT))
            if len(rows) == 0:
                raise errors.FailedPrecondition(
                    f"pool {pool_id!r} has no held-out items; pass items or upload SPLIT_HELDOUT items",
                    field="items",
                    reason="NO_HELDOUT",
                )
            assert rt.heldout_target_N is not None
            fa, fb, targets_N = rt.a_N_D[rows], rt.b_N_D[rows], rt.heldout_target_N[rows]
            all_a, all_b = self._texts(info, rt)
            ta, tb = ([all_a[r] for r in rows], [all_b[r] for r in rows]) if all_a else ([], [])
        probs_N_E = await asyncio.to_thread(self._member_probs, rt, fa, fb, ta, tb)
        m = evaluate(probs_N_E, targets_N)
        return EvaluationOut(
            m.log_likelihood, m.accuracy, m.brier, m.ece, m.mean_epistemic, m.count, info.posterior_version
        )

