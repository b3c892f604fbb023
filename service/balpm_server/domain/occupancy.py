"""Who has labelled and who currently leases each pool row, kept in memory.

SQLite is the durable record of labels and leases; this mirror lets AcquireBatch
compute its candidate and acquired masks with array operations instead of joins and
Python loops over the whole pool. It is rebuilt from SQLite whenever the pool's
runtime is (re)loaded and updated in place, under the pool lock, after each commit.

Shapes: N pool rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from balpm_server.domain.models import LabelledBy, LeaseRecord


class Occupancy:
    """Labels and leases per row.

    Args:
        n_rows: Pool rows N.
        labels_per_item: Distinct annotators an item needs (consensus labelling).
    """

    def __init__(self, n_rows: int, labels_per_item: int) -> None:
        self.k = labels_per_item
        self.labels_N = np.zeros(n_rows, dtype=np.int64)
        self.lease_cnt_N = np.zeros(n_rows, dtype=np.int64)
        self.lease_min_exp_N = np.full(n_rows, np.inf)
        self.full_N = np.zeros(n_rows, dtype=bool)  # labels + leases >= k: nobody may be given it
        self.acquired_N = np.zeros(n_rows, dtype=bool)  # labelled or leased by anyone
        self.excluded_N = np.zeros(n_rows, dtype=bool)  # ExcludeItems: never a candidate
        # Called with (row, acquired, full) whenever a row's acquired_N or full_N flips
        # (GreedyState.observe keeps BAL-PM's n(x) and keys current).
        self.on_change: Callable[[int, bool, bool], None] | None = None
        self._next_expiry_s = np.inf  # no lease expires before this (a lower bound)
        self._labellers: dict[int, set[str]] = {}
        self._leases: dict[int, dict[str, float]] = {}
        self._labelled_by: dict[str, set[int]] = {}
        self._leased_by: dict[str, set[int]] = {}

    @classmethod
    def from_records(
        cls,
        n_rows: int,
        labels_per_item: int,
        labels: Iterable[LabelledBy],
        leases: Iterable[LeaseRecord],
        excluded_rows: Iterable[int] = (),
    ) -> Occupancy:
        """Build from who labelled which row, the unexpired leases and the excluded rows."""
        occ = cls(n_rows, labels_per_item)
        for row in excluded_rows:
            occ.excluded_N[row] = True
            occ._update_full(row)
        for label in labels:
            occ._note_label(label.row, label.annotator_id)
        for lease in leases:
            occ.add_lease(lease.row, lease.annotator_id, lease.expire_s)
        return occ

    def _note_label(self, row: int, annotator: str) -> None:
        anns = self._labellers.setdefault(row, set())
        if annotator not in anns:
            anns.add(annotator)
            self.labels_N[row] = len(anns)
            self._labelled_by.setdefault(annotator, set()).add(row)
            self._update_full(row)

    def _update_full(self, row: int) -> None:
        full = bool(self.excluded_N[row] or self.labels_N[row] + self.lease_cnt_N[row] >= self.k)
        acquired = bool(self.labels_N[row] > 0 or self.lease_cnt_N[row] > 0)
        if full != self.full_N[row] or acquired != self.acquired_N[row]:
            self.full_N[row] = full
            self.acquired_N[row] = acquired
            if self.on_change is not None:
                self.on_change(row, acquired, full)

    def _refresh(self, row: int) -> None:
        holders = self._leases.get(row, {})
        self.lease_cnt_N[row] = len(holders)
        self.lease_min_exp_N[row] = min(holders.values(), default=np.inf)
        self._update_full(row)
        if not holders:
            self._leases.pop(row, None)

    def add_label(self, row: int, annotator: str) -> None:
        """Record a label: it ends the labeller's lease, and every lease once the item is complete."""
        self._note_label(row, annotator)
        self.release(row, annotator)
        if self.labels_N[row] >= self.k:
            self.release(row, "")

    def set_excluded(self, row: int, excluded: bool) -> None:
        """Exclude a row from acquisition (its leases end) or include it again."""
        self.excluded_N[row] = excluded
        if excluded:
            self.release(row, "")
        self._update_full(row)

    def add_lease(self, row: int, annotator: str, expire_s: float) -> None:
        """Lease a row to an annotator until `expire_s` (epoch seconds)."""
        self._leases.setdefault(row, {})[annotator] = expire_s
        self._leased_by.setdefault(annotator, set()).add(row)
        self._next_expiry_s = min(self._next_expiry_s, expire_s)
        self._refresh(row)

    def release(self, row: int, annotator: str) -> int:
        """End a lease ("" ends every lease on the row); returns how many ended."""
        holders = self._leases.get(row, {})
        names = list(holders) if not annotator else [annotator] if annotator in holders else []
        for name in names:
            del holders[name]
            self._leased_by.get(name, set()).discard(row)
        self._refresh(row)
        return len(names)

    def purge_expired(self, now_s: float) -> None:
        """Drop leases that expired at or before `now_s` (only rows with one are visited).

        O(1) until the earliest lease expires; then one vectorised pass over the rows.
        """
        if now_s < self._next_expiry_s:
            return
        for row in np.flatnonzero((self.lease_cnt_N > 0) & (self.lease_min_exp_N <= now_s)).tolist():
            holders = self._leases.get(row, {})
            for name in [a for a, exp in holders.items() if exp <= now_s]:
                del holders[name]
                self._leased_by.get(name, set()).discard(row)
            self._refresh(row)
        live_N = self.lease_min_exp_N[self.lease_cnt_N > 0]
        self._next_expiry_s = float(live_N.min()) if live_N.size else np.inf

    def _mine(self, annotator: str) -> list[set[int]]:
        return [rows for rows in (self._labelled_by.get(annotator), self._leased_by.get(annotator)) if rows]

    def own_rows(self, annotator: str) -> np.ndarray:
        """Rows `annotator` labelled or leases: never given to it again (int64, unordered)."""
        mine: set[int] = set().union(*self._mine(annotator))
        return np.fromiter(mine, dtype=np.int64, count=len(mine))

    def open_rows(self, in_pool_N: np.ndarray) -> np.ndarray:
        """Rows of `in_pool_N` someone may still be given (not complete, not fully leased, not excluded)."""
        return np.asarray(in_pool_N & ~self.full_N)

    def open_among(self, rows_R: np.ndarray, annotator: str) -> np.ndarray:
        """Which of `rows_R` the caller may be given now (call `purge_expired` first).

        The same rule as `masks`' candidates, evaluated only on the given rows, so a
        caller walking a precomputed ranking pays for the rows it looks at, not for N.
        """
        open_R = ~self.full_N[rows_R]
        if self.k == 1:  # a row this caller labelled or leases is already full
            return open_R
        mine = self._mine(annotator)
        if mine:
            open_R &= np.fromiter(
                (not any(r in rows for rows in mine) for r in rows_R.tolist()), dtype=bool, count=len(rows_R)
            )
        return open_R

    def masks(self, in_pool_N: np.ndarray, annotator: str, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Candidate and acquired masks for one caller.

        Returns:
            (candidate_N, acquired_N): rows the caller may be given (not complete, not
            fully leased, not already labelled or leased by this caller), and rows that
            count as acquired in the entropy term (labelled or leased by anyone).
        """
        self.purge_expired(now_s)
        mine_N = np.zeros(len(in_pool_N), dtype=bool)
        mine_N[self.own_rows(annotator)] = True
        candidate_N = self.open_rows(in_pool_N) & ~mine_N
        acquired_N = in_pool_N & self.acquired_N
        return candidate_N, acquired_N
