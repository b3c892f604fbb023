"""How the CLI shows a pool whose featurisation is paused."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from balpm import _output as out
from balpm.v1 import balpm_pb2 as pb


def _paused_pool() -> pb.Pool:
    pool = pb.Pool(pool_id="hh", state=pb.Pool.STATE_FEATURIZING, item_count=10, featurized_count=4)
    pool.featurization_pause.CopyFrom(pb.FeaturizationPause(
        reason="TRITON_UNAVAILABLE", message="Triton at 127.0.0.1:8001 is unreachable", attempts=3,
        paused_since=Timestamp(seconds=1_800_000_000), next_retry_time=Timestamp(seconds=1_800_000_020),
    ))
    return pool


def test_pools_get_shows_why_featurisation_is_paused() -> None:
    text = out.pool_details(_paused_pool())
    line = next(row for row in text.splitlines() if row.startswith("featurisation paused"))
    assert "TRITON_UNAVAILABLE: Triton at 127.0.0.1:8001 is unreachable" in line
    assert "3 failed attempts" in line and "2027-01-15 08:00:00Z" in line and "2027-01-15 08:00:20Z" in line


def test_a_pool_that_is_not_paused_has_no_pause_line() -> None:
    pool = pb.Pool(pool_id="hh", state=pb.Pool.STATE_READY, item_count=10, featurized_count=10)
    assert out.pause_text(pool) == ""
    assert "featurisation paused" not in out.pool_details(pool)
