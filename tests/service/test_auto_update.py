"""Automatic posterior updates (PoolSettings.auto_update_*): by label count, by interval, one at a time."""

from __future__ import annotations

import grpc
import pytest

from balpm import Client
from balpm.errors import BalpmError
from tests.conftest import ServerThread, synthetic_items
from tests.waiting import wait_until

SMALL = {"feature_source": "CLIENT", "feature_dim": 6, "ensemble_size": 2, "hidden_sizes": [8], "epochs": 3}


def _labels(truth: dict[str, str], ids: range) -> list[dict[str, str]]:
    return [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in ids]


def test_label_count_trigger_starts_one_update_and_counts_from_the_latest_posterior(client: Client) -> None:
    items, truth = synthetic_items(80, 6, seed=0)
    client.create_pool("auto", auto_update_min_labels=8, **SMALL)
    client.upload_items("auto", items)
    assert client.ingest_labels("auto", _labels(truth, range(0, 5))).auto_update_operation_id == ""
    started = client.ingest_labels("auto", _labels(truth, range(5, 10))).auto_update_operation_id
    assert started.startswith("train-")  # 10 new labels >= 8
    op = client.wait_operation(started, timeout_s=120)
    assert op.done and op.result.posterior_version == 1 and op.result.label_count == 10
    assert client.get_pool("auto").posterior_version == 1
    # Counted from the 10 labels version 1 saw: 5 more are not enough, 8 more are.
    assert client.ingest_labels("auto", _labels(truth, range(10, 15))).auto_update_operation_id == ""
    again = client.ingest_labels("auto", _labels(truth, range(15, 18))).auto_update_operation_id
    assert again and again != started
    assert client.wait_operation(again, timeout_s=120).result.posterior_version == 2
    # A replayed request adds no labels and starts nothing.
    assert client.ingest_labels("auto", _labels(truth, range(15, 18))).auto_update_operation_id == ""


def test_interval_trigger_retrains_after_the_interval_without_another_call(client: Client) -> None:
    items, truth = synthetic_items(40, 6, seed=1)
    client.create_pool("timed", auto_update_interval_s=1.5, **SMALL)
    client.upload_items("timed", items)
    first = client.ingest_labels("timed", _labels(truth, range(0, 6)))
    # Either the pool is already 1.5 s old (started now) or a check fires when it is.
    if not first.auto_update_operation_id:
        wait_until(lambda: client.get_pool("timed").posterior_version == 1, 60, "the timed update to finish")
    else:
        client.wait_operation(first.auto_update_operation_id, timeout_s=120)
    assert client.get_pool("timed").posterior_version == 1
    # No new labels: nothing more happens.
    with pytest.raises(AssertionError):
        wait_until(lambda: client.get_pool("timed").posterior_version > 1, 3.0, "an update without new labels")


def test_off_by_default_and_bad_settings_are_rejected(client: Client) -> None:
    items, truth = synthetic_items(30, 6, seed=2)
    client.create_pool("manual", **SMALL)
    client.upload_items("manual", items)
    assert client.ingest_labels("manual", _labels(truth, range(0, 20))).auto_update_operation_id == ""
    assert client.get_pool("manual").posterior_version == 0
    bad_settings = (
        {"auto_update_interval_s": -1.0}, {"auto_update_interval_s": 1e9}, {"auto_update_min_labels": 2_000_000},
    )
    for bad in bad_settings:
        with pytest.raises(BalpmError) as e:
            client.create_pool("bad", **SMALL, **bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.field == f"settings.{next(iter(bad))}"


def test_a_running_update_is_not_doubled(server: ServerThread, client: Client) -> None:
    items, truth = synthetic_items(60, 6, seed=3)
    client.create_pool("busy", auto_update_min_labels=2, **{**SMALL, "epochs": 200})
    client.upload_items("busy", items)
    first = client.ingest_labels("busy", _labels(truth, range(0, 4))).auto_update_operation_id
    assert first
    during = client.ingest_labels("busy", _labels(truth, range(4, 8))).auto_update_operation_id
    op = client.get_operation(first)
    assert during == "" or op.done  # while the first runs, no second one starts
    client.wait_operation(first, timeout_s=120)
