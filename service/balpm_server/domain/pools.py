"""Pools: create, look up (tenant-scoped), list and delete; the checks every pool call starts with.

A pool is named by its tenant and its id; another tenant's pool of the same name is
invisible (NOT_FOUND). `require` and `ensure_ready` are what every other domain module
calls first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import uuid
from pathlib import Path

from balpm_server import errors
from balpm_server.domain import validation as v
from balpm_server.domain.common import page_token, parse_page_token
from balpm_server.domain.models import FeatureSource, PoolInfo, PoolInsert, PoolSettings, PoolState, server_apl
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.features import FeatureExtractor
from balpm_server.settings import Settings
from balpm_server.storage import SqlStore

MAX_LIST_PAGE_SIZE = 1000
DEFAULT_LIST_PAGE_SIZE = 100


MAX_AUTO_UPDATE_INTERVAL_S = 30 * 86400.0

class Pools:
    """Pool records and their lifecycle.

    Args:
        settings: Server settings (limits).
        store: The metadata store.
        cache: The pools' runtimes and folders.
        extractor: Feature extractor for FEATURE_SOURCE_SERVER pools (None disables them).
    """

    def __init__(
        self, settings: Settings, store: SqlStore, cache: RuntimeCache, extractor: FeatureExtractor | None
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.extractor = extractor

    async def require(self, tenant: str, pool_id: str, *, counts: bool = False) -> PoolInfo:
        """The tenant's pool `pool_id` (another tenant's pool of that name is invisible)."""
        v.pool_id(pool_id)
        info = await self.store.call(self.store.pool_named, tenant, pool_id, counts=counts)
        if info is None or info.tenant != tenant:
            raise errors.NotFound(f"pool {pool_id!r} does not exist", field="pool_id", reason="POOL_NOT_FOUND")
        return info

    async def ensure_ready(self, info: PoolInfo) -> None:
        """FAILED_PRECONDITION while no item of the pool has its features yet.

        A pool extracting the features of new items keeps serving the items that have
        theirs (the rows before the first one still waiting); the others join as they get them.
        """
        if info.state != PoolState.FEATURIZING:
            return
        rt = self.cache.runtimes.get(info.key)
        if rt is not None and rt.item_ids:  # loaded with joined rows
            return
        if await self.store.call(self.store.joined_count, info.key, need_apl=server_apl(info)) == 0:
            now = await self.store.call(self.store.pool_info, info.key)
            info = now or info
            total = info.item_count + info.heldout_count
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} is still extracting the features of its first items "
                f"({info.featurized_count}/{total} items); retry in a few seconds (GetPool shows the progress)",
                field="pool_id",
                reason="POOL_FEATURIZING",
                metadata={"featurized": str(info.featurized_count), "total": str(total)},
            )

    @staticmethod
    def _check_settings(s: PoolSettings) -> None:
        v.int_range(s.ensemble_size, "settings.ensemble_size", 1, 64)
        v.int_range(s.knn_k, "settings.knn_k", 1, 1024)
        v.finite(s.beta, "settings.beta", low=0.0)
        v.finite(s.d_ent, "settings.d_ent", low=0.0, low_open=True)
        v.finite(s.temperature, "settings.temperature", low=0.0, low_open=True)
        v.finite(s.apl_beta_dpo, "settings.apl_beta_dpo", low=0.0, low_open=True)
        v.int_range(s.labels_per_item, "settings.labels_per_item", 1, 1000)
        v.int_range(s.auto_update_min_labels, "settings.auto_update_min_labels", 0, 1_000_000)
        v.int_range(s.patience, "settings.patience", 1, 1000)
        v.int_range(s.train_batch_size, "settings.train_batch_size", 1, 4096)
        for name, low, high, low_open in (
            ("val_fraction", 0.0, 0.5, False), ("learning_rate", 0.0, 1.0, True), ("weight_decay", 0.0, 1.0, False),
            ("control_fraction", 0.0, 0.5, False), ("stop_slope_per_1k", 0.0, 1.0, False),
        ):
            value = float(getattr(s, name))
            v.finite(value, f"settings.{name}", low=low, low_open=low_open)
            if value > high:
                raise errors.InvalidArgument(
                    f"settings.{name} must be at most {high:g}, got {value}", field=f"settings.{name}",
                    reason="OUT_OF_RANGE",
                )
        v.finite(s.auto_update_interval_s, "settings.auto_update_interval_s", low=0.0)
        if s.auto_update_interval_s > MAX_AUTO_UPDATE_INTERVAL_S:
            raise errors.InvalidArgument(
                f"settings.auto_update_interval_s must be at most {MAX_AUTO_UPDATE_INTERVAL_S:.0f} (30 days)",
                field="settings.auto_update_interval_s",
                reason="OUT_OF_RANGE",
            )
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

    async def create(self, tenant: str, pool_id: str, settings: PoolSettings) -> PoolInfo:
        """Create a pool; fills the feature dim from the extractor for server features."""
        v.pool_id(pool_id)
        self._check_settings(settings)
        s = settings
        too_many = errors.ResourceExhausted(
            f"tenant already holds max_pools_per_tenant={self.settings.max_pools_per_tenant} pools",
            field="pool_id",
            reason="MAX_POOLS_PER_TENANT",
        )
        exists = errors.AlreadyExists(f"pool {pool_id!r} already exists", field="pool_id", reason="POOL_EXISTS")
        # Early answers; the insert below re-checks both atomically (calls race across the await).
        if await self.store.call(self.store.pool_count, tenant) >= self.settings.max_pools_per_tenant:
            raise too_many
        if await self.store.call(self.store.pool_key, tenant, pool_id) is not None:
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
        outcome = await self.store.call(
            self.store.insert_pool, key, tenant, pool_id, s, extractor_name,
            max_pools=self.settings.max_pools_per_tenant,
        )
        if outcome is PoolInsert.NAME_TAKEN:
            raise exists
        if outcome is PoolInsert.AT_LIMIT:
            raise too_many
        info = await self.store.call(self.store.pool_info, key)
        assert info is not None
        return info

    async def list_page(self, tenant: str, page_size: int, page_token_in: str) -> tuple[list[PoolInfo], str]:
        """A page of the tenant's pools in id order and the next page token."""
        if page_size < 0 or page_size > MAX_LIST_PAGE_SIZE:
            raise errors.InvalidArgument(f"page_size must be in [0, {MAX_LIST_PAGE_SIZE}]", field="page_size")
        size = page_size or DEFAULT_LIST_PAGE_SIZE
        offset = parse_page_token(page_token_in)
        pools = await self.store.call(self.store.pools_of, tenant)
        page = pools[offset : offset + size]
        infos = [info for ref in page if (info := await self.store.call(self.store.pool_info, ref.key)) is not None]
        nxt = page_token(offset + size) if offset + size < len(pools) else ""
        return infos, nxt

    async def delete(self, info: PoolInfo) -> None:
        """Delete a pool's records, runtime and files (its background work is stopped by the caller)."""
        await self.store.call(self.store.delete_pool, info.key)
        await asyncio.to_thread(self.cache.artifacts.delete_pool, info.key)
        self.cache.forget(info.key)
        shutil.rmtree(self.cache.pool_dir(info.key), ignore_errors=True)
