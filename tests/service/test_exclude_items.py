"""ExcludeItems: excluded items are never acquired, their leases end, it is reversible, counted and tenant-scoped."""

from __future__ import annotations

import grpc
import pytest

from balpm import Client
from balpm.errors import BalpmError
from tests.conftest import ServerThread, synthetic_items

SMALL = {"feature_source": "CLIENT", "feature_dim": 4, "ensemble_size": 2, "hidden_sizes": [8], "knn_k": 3}


@pytest.mark.parametrize("strategy", ["RANDOM", "BALPM", "ENTROPY_ONLY"])
def test_excluded_items_are_never_acquired_and_can_be_included_again(client: Client, strategy: str) -> None:
    items, _ = synthetic_items(20, 4, seed=0)
    client.create_pool("ex", **SMALL)
    client.upload_items("ex", items)
    leased = [a.item.item_id for a in client.acquire("ex", batch_size=3, strategy="RANDOM", annotator_id="a").items]
    gone = [leased[0], "it-7", "it-8"]
    resp = client.exclude_items("ex", gone)
    assert (resp.changed_count, resp.excluded_count) == (3, 3)
    pool = client.get_pool("ex")
    assert pool.excluded_count == 3 and pool.leased_item_count == 2  # the excluded item's lease ended
    assert client.exclude_items("ex", gone).changed_count == 0  # idempotent
    rest = [a.item.item_id for a in client.acquire("ex", batch_size=15, strategy=strategy, annotator_id="b").items]
    assert not set(rest) & set(gone) and not set(rest) & set(leased)
    with pytest.raises(BalpmError) as e:  # only the 15 others exist: 20 - 3 excluded - 2 leased
        client.acquire("ex", batch_size=1, strategy=strategy, annotator_id="c")
    assert e.value.reason == "POOL_EXHAUSTED"
    back = client.exclude_items("ex", gone[1:], include=True)
    assert (back.changed_count, back.excluded_count) == (2, 1)
    again = {a.item.item_id for a in client.acquire("ex", batch_size=2, strategy=strategy, annotator_id="c").items}
    assert again == set(gone[1:])


def test_exclusion_survives_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data", extractor="")
    items, _ = synthetic_items(10, 4, seed=1)
    srv = ServerThread(settings)
    try:
        with Client(srv.target) as c:
            c.create_pool("keep", **SMALL)
            c.upload_items("keep", items)
            c.exclude_items("keep", [f"it-{i}" for i in range(6)])
    finally:
        srv.stop()
    srv = ServerThread(settings)
    try:
        with Client(srv.target) as c:
            assert c.get_pool("keep").excluded_count == 6
            got = {a.item.item_id for a in c.acquire("keep", batch_size=4, strategy="RANDOM").items}
            assert got == {f"it-{i}" for i in range(6, 10)}
    finally:
        srv.stop()


def test_bad_exclusions_name_the_field(client: Client) -> None:
    items, _ = synthetic_items(6, 4, seed=2)
    heldout = {**items[0], "item_id": "h-0", "split": "HELDOUT", "heldout_preference": "A"}
    client.create_pool("bad", **SMALL)
    client.upload_items("bad", [*items, heldout])
    cases = [
        (["it-0", "nope"], grpc.StatusCode.NOT_FOUND, "item_ids[1]", "ITEM_NOT_FOUND"),
        (["h-0"], grpc.StatusCode.INVALID_ARGUMENT, "item_ids[0]", "HELDOUT_ITEM"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "item_ids", "INVALID_ARGUMENT"),
        (["bad id!"], grpc.StatusCode.INVALID_ARGUMENT, "item_ids[0]", None),
    ]
    for ids, code, field, reason in cases:
        with pytest.raises(BalpmError) as e:
            client.exclude_items("bad", ids)
        assert (e.value.code, e.value.field) == (code, field), e.value
        if reason:
            assert e.value.reason == reason
    assert client.get_pool("bad").excluded_count == 0  # nothing half-applied
    with pytest.raises(BalpmError) as e:
        client.exclude_items("no-such-pool", ["it-0"])
    assert e.value.code == grpc.StatusCode.NOT_FOUND
