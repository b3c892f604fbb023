"""The random control arm (PoolSettings.control_fraction): its share, its flag on items, leases and labels."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from balpm import Client
from balpm.errors import BalpmError
from balpm_server.storage.sql_store import settings_from_json, settings_to_json
from tests.conftest import synthetic_items

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 10}


def _pool(client: Client, name: str, n: int = 200, **settings: object) -> dict[str, str]:
    items, truth = synthetic_items(n, 8, seed=21)
    client.create_pool(name, feature_source="CLIENT", feature_dim=8, **{**SMALL, **settings})
    client.upload_items(name, items)
    return truth


def test_the_control_share_follows_the_setting_and_its_rounding(client: Client) -> None:
    _pool(client, "quarter", control_fraction=0.25)
    for seed in range(5):  # 0.25 of 8: exactly two per batch
        batch = client.acquire("quarter", batch_size=8, strategy="RANDOM", seed=seed, annotator_id=f"a{seed}")
        assert sum(a.control for a in batch.items) == 2
    _pool(client, "tenth")  # the default, 0.1
    assert client.get_pool("tenth").settings.control_fraction == pytest.approx(0.1)
    counts = [
        sum(a.control for a in client.acquire("tenth", batch_size=5, seed=s, annotator_id=f"b{s}").items)
        for s in range(40)
    ]
    assert set(counts) <= {0, 1} and 8 <= sum(counts) <= 32  # one with probability 0.5 (binomial 40, 0.5)
    _pool(client, "none", control_fraction=0.0)
    assert not any(a.control for a in client.acquire("none", batch_size=50, annotator_id="c").items)


def test_the_strategy_fills_the_rest_and_the_draws_are_seeded(client: Client) -> None:
    truth = _pool(client, "ctl", control_fraction=0.5)
    _pool(client, "ref", control_fraction=0.0)
    for name in ("ctl", "ref"):  # the same posterior on both
        client.ingest_labels(name, [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                    for i in range(30)])
        client.update_posterior(name, seed=0)
    ranked = [a.item.item_id for a in client.acquire("ref", batch_size=170, strategy="BALD", annotator_id="x").items]
    batch = client.acquire("ctl", batch_size=10, strategy="BALD", seed=7, annotator_id="y")
    picked = [a.item.item_id for a in batch.items if not a.control]
    drawn = [a.item.item_id for a in batch.items if a.control]
    assert len(picked) == len(drawn) == 5
    # BALD's picks are the top of the ranking once the control draws are taken out
    assert picked == [i for i in ranked if i not in drawn][:5]
    client.release_items("ctl", [a.item.item_id for a in batch.items], annotator_id="y")
    again = client.acquire("ctl", batch_size=10, strategy="BALD", seed=7, annotator_id="y")
    assert [a.item.item_id for a in again.items if a.control] == drawn  # same state, same seed: same draws
    other = client.acquire("ctl", batch_size=10, strategy="BALD", seed=8, annotator_id="z")
    assert {a.item.item_id for a in other.items if a.control} != set(drawn)


def test_control_labels_are_flagged_in_the_export(client: Client) -> None:
    _pool(client, "flags", control_fraction=0.5)
    batch = client.acquire("flags", batch_size=6, strategy="RANDOM", seed=1, annotator_id="ann")
    control = {a.item.item_id for a in batch.items if a.control}
    assert len(control) == 3
    labels = [{"label_id": f"l-{a.item.item_id}", "item_id": a.item.item_id, "preference": "A",
               "annotator_id": "ann"} for a in batch.items]
    labels.append({"label_id": "late", "item_id": next(iter(control)), "preference": "B", "annotator_id": "other"})
    client.ingest_labels("flags", labels)
    exported = {lb.label.label_id: lb.control for lb in client.export_labels("flags")}
    assert exported == {
        **{f"l-{a.item.item_id}": a.item.item_id in control for a in batch.items},
        "late": False,  # another annotator's label of a control item: not leased to them by the arm
    }


def test_control_fraction_is_validated_and_older_pools_have_none(client: Client) -> None:
    for bad in (0.6, -0.1, float("nan")):
        with pytest.raises(BalpmError) as err:
            client.create_pool(f"bad{np.random.default_rng().integers(1 << 30)}", feature_source="CLIENT",
                               feature_dim=4, control_fraction=bad)
        assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "settings.control_fraction")
    from balpm_server.domain.models import PoolSettings

    stored = json.loads(settings_to_json(PoolSettings()))
    del stored["control_fraction"]  # written before the control arm existed
    assert settings_from_json(json.dumps(stored)).control_fraction == 0.0
