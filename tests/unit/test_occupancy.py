"""The in-memory label/lease mirror against a brute-force model of the same rules."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balpm_server.domain.occupancy import Occupancy

ANNOTATORS = ["a", "b", "c"]

ops = st.lists(
    st.tuples(
        st.sampled_from(["label", "lease", "release", "release_all", "tick"]),
        st.integers(0, 11),
        st.sampled_from(ANNOTATORS),
        st.floats(0.5, 5.0),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), ops)
def test_masks_and_open_rows_follow_the_rules(k, operations):
    n = 12
    occ = Occupancy(n, k)
    labels: dict[int, set[str]] = {r: set() for r in range(n)}
    leases: dict[int, dict[str, float]] = {r: {} for r in range(n)}
    now = 0.0
    in_pool_N = np.ones(n, dtype=bool)
    in_pool_N[n - 1] = False  # a held-out row is never a candidate
    for op, row, ann, dt in operations:
        if op == "label":
            occ.add_label(row, ann)
            labels[row].add(ann)
            leases[row].pop(ann, None)
            if len(labels[row]) >= k:
                leases[row].clear()
        elif op == "lease":
            occ.add_lease(row, ann, now + dt)
            leases[row][ann] = now + dt
        elif op == "release":
            assert occ.release(row, ann) == int(ann in leases[row])
            leases[row].pop(ann, None)
        elif op == "release_all":
            assert occ.release(row, "") == len(leases[row])
            leases[row].clear()
        else:
            now += dt
        for r in range(n):  # the model's expiry
            leases[r] = {a: e for a, e in leases[r].items() if e > now}
        for ann_q in ANNOTATORS:
            cand_N, acq_N = occ.masks(in_pool_N, ann_q, now)
            live = {r: leases[r] for r in range(n)}
            want_cand = np.array(
                [
                    in_pool_N[r]
                    and len(labels[r]) + len(live[r]) < k
                    and ann_q not in labels[r]
                    and ann_q not in live[r]
                    for r in range(n)
                ]
            )
            want_acq = np.array([in_pool_N[r] and (bool(labels[r]) or bool(live[r])) for r in range(n)])
            np.testing.assert_array_equal(cand_N, want_cand)
            np.testing.assert_array_equal(acq_N, want_acq)
            rows = np.arange(n - 1)[::-1]  # any subset, any order
            np.testing.assert_array_equal(occ.open_among(rows, ann_q), want_cand[rows])
        np.testing.assert_array_equal(
            occ.full_N, [len(labels[r]) + len(leases[r]) >= k for r in range(n)]
        )
