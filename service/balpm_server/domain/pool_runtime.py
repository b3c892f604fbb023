"""In-memory view of one pool: item index, features, kNN graph, posterior and score cache.

Built lazily from storage and invalidated when items or the posterior change. All
arrays are indexed by feature row r (0..N-1), which is the order items were stored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from balpm_server.acquisition import GreedyState, KnnGraph
from balpm_server.domain.models import Split
from balpm_server.domain.occupancy import Occupancy


@dataclass
class PoolRuntime:
    """Cached state of one pool; guarded by `lock` for acquisition and uploads."""

    pool_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    item_ids: list[str] | None = None
    row_of: dict[str, int] = field(default_factory=dict)
    split_N: np.ndarray | None = None
    heldout_target_N: np.ndarray | None = None
    prompt_N_D: np.ndarray | None = None
    a_N_D: np.ndarray | None = None
    b_N_D: np.ndarray | None = None
    graph: KnnGraph | None = None
    greedy: GreedyState | None = None  # BAL-PM's n(x) and keys over `graph`, kept current by `occupancy`
    posterior_version: int = 0
    posterior_state: Any = None
    occupancy: Occupancy | None = None
    lora: Any = None  # a posterior.lora.LoraEnsemble for POSTERIOR_KIND_LORA_ENSEMBLE pools
    texts_a: list[str] | None = None  # prompt + completion A by row (LoRA pools only)
    texts_b: list[str] | None = None
    epistemic_version: int = -1
    epistemic_N: np.ndarray | None = None
    bald_order_R: np.ndarray | None = None  # pool rows by descending epistemic_N (ties: lowest row)
    label_seq: int = 0  # the occupancy holds every label up to this storage sequence number
    pending_rows: int = 0  # rows after `item_ids` still featurising: they join at a later load
    loaded_s: float = float("-inf")  # time.monotonic() of the last load of the items
    _pool_rows: tuple[np.ndarray, np.ndarray] | None = None  # (split_N it was computed from, its pool rows)

    def pool_rows(self) -> np.ndarray:
        """pool_R: the SPLIT_POOL rows of the loaded index, ascending (cached per index)."""
        assert self.split_N is not None
        if self._pool_rows is None or self._pool_rows[0] is not self.split_N:
            self._pool_rows = (self.split_N, np.flatnonzero(self.split_N == int(Split.POOL)))
        return self._pool_rows[1]

    def current_greedy(self) -> GreedyState | None:
        """`greedy` when it belongs to the loaded graph and the loaded occupancy keeps it current, else None."""
        state = self.greedy
        if state is None or state.graph is not self.graph or self.occupancy is None:
            return None
        return state if self.occupancy.on_change == state.observe else None

    def apply_label(self, row: int | None, annotator_id: str) -> bool:
        """Count a stored label in the loaded occupancy; False when the runtime had to be dropped.

        A label of a row the load does not hold is read again at a later load: when rows
        are still featurising it belongs to one of them (they join later, labels and all);
        otherwise its item was uploaded after the load, and the runtime is invalidated.

        Args:
            row: The label's item row (None when the item is not in `row_of`).
            annotator_id: Who labelled it.
        """
        assert self.occupancy is not None and self.item_ids is not None
        if row is not None and row < len(self.item_ids):
            self.occupancy.add_label(row, annotator_id)
            return True
        if self.pending_rows:
            return True
        self.invalidate_items()
        return False

    def invalidate_items(self) -> None:
        """Forget everything derived from the item set (after an upload)."""
        self.item_ids = None
        self.row_of = {}
        self.split_N = self.heldout_target_N = None
        self.prompt_N_D = self.a_N_D = self.b_N_D = None
        self.graph = None
        self.greedy = None
        self._pool_rows = None
        self.occupancy = None
        self.label_seq = 0
        self.pending_rows = 0
        self.texts_a = self.texts_b = None
        self.epistemic_version = -1
        self.epistemic_N = None
        self.bald_order_R = None
