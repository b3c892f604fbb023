"""Posterior training settings are pool settings: validated, shown, and used by UpdatePosterior."""

from __future__ import annotations

import grpc
import pytest

from balpm import Client
from balpm.errors import BalpmError
from balpm_server.domain.common import DEFAULT_TENANT
from tests.conftest import ServerThread, synthetic_items

SMALL = {"feature_source": "CLIENT", "feature_dim": 6, "ensemble_size": 2, "hidden_sizes": [8], "epochs": 4}
CUSTOM = {"bootstrap": True, "patience": 2, "val_fraction": 0.0, "train_batch_size": 8, "learning_rate": 0.01,
          "weight_decay": 0.0}


def test_training_settings_are_stored_shown_and_used(server: ServerThread, client: Client) -> None:
    items, truth = synthetic_items(40, 6, seed=0)
    default = client.create_pool("plain", **SMALL).settings
    assert (default.bootstrap, default.patience, default.val_fraction, default.train_batch_size) == (False, 5, 0.1, 32)
    assert (default.learning_rate, default.weight_decay) == (1e-3, 1e-4)
    shown = client.create_pool("tuned", **SMALL, **CUSTOM).settings
    assert {k: getattr(shown, k) for k in CUSTOM} == CUSTOM
    client.upload_items("tuned", items)
    client.ingest_labels("tuned", [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                   for i in range(20)])
    op = client.update_posterior("tuned", seed=0)
    assert op.result.posterior_version == 1
    svc = server.running.service
    key = server.call(svc._pools.require(DEFAULT_TENANT, "tuned")).key
    used = svc._cache.posterior_store(key).manifest(1)["settings"]
    assert (used["bootstrap"], used["patience"], used["val_fraction"], used["batch_size"]) == (True, 2, 0.0, 8)
    assert (used["learning_rate"], used["weight_decay"]) == (0.01, 0.0)
    assert op.result.val_log_likelihood != op.result.val_log_likelihood  # NaN: val_fraction 0, no held-out slice


@pytest.mark.parametrize(
    "bad",
    [{"patience": 5000}, {"val_fraction": 0.9}, {"val_fraction": -0.1}, {"train_batch_size": 100_000},
     {"learning_rate": 0.0}, {"learning_rate": 2.0}, {"weight_decay": -1.0}, {"learning_rate": float("nan")}],
)
def test_out_of_range_training_settings_name_the_field(client: Client, bad: dict[str, float]) -> None:
    with pytest.raises(BalpmError) as e:
        client.create_pool("bad", **SMALL, **bad)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.field == f"settings.{next(iter(bad))}"


def test_pools_stored_before_the_setting_keep_bootstrap() -> None:
    import json

    from balpm_server.domain.models import PoolSettings
    from balpm_server.storage.sql_store import settings_from_json, settings_to_json

    body = json.loads(settings_to_json(PoolSettings()))
    assert body["bootstrap"] is False  # the default for new pools
    del body["bootstrap"]
    assert settings_from_json(json.dumps(body)).bootstrap is True
