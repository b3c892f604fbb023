"""Label revisions (Label.replaces_label_id): an annotator's edited answer supersedes the first one.

Issue 19 item 6: an annotation edited in Label Studio (B -> A) was a conflict on every sync.
A revision is a new label naming the one it replaces; the replaced label stays in the export
history (superseded_by) and stops counting for training, evaluation and label counts.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from balpm import Client
from balpm.errors import BalpmError
from balpm_server.domain.models import LabelIn, LabelWrite, Preference
from balpm_server.errors import Aborted
from tests.conftest import ServerThread, synthetic_items

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 30, "control_fraction": 0.0}


def _pool(client: Client, name: str, n: int = 40, **settings: Any) -> None:
    items, _truth = synthetic_items(n, 8, seed=5)
    client.create_pool(name, feature_source="CLIENT", feature_dim=8, **{**SMALL, **settings})
    client.upload_items(name, items)


def _label(label_id: str, item: str, pref: str, who: str = "x", replaces: str = "") -> dict[str, str]:
    return {"label_id": label_id, "item_id": item, "preference": pref, "annotator_id": who,
            "replaces_label_id": replaces}


def _error(call: Any) -> BalpmError:
    with pytest.raises(BalpmError) as e:
        call()
    return e.value


def test_a_revision_supersedes_the_first_answer_and_both_stay_in_the_export(client: Client) -> None:
    _pool(client, "rev")
    client.ingest_labels("rev", [_label("l1", "it-0", "A"), _label("l2", "it-1", "A")])
    resp = client.ingest_labels("rev", [_label("l1.r2", "it-0", "B", replaces="l1")])
    assert (resp.stored_count, resp.label_count) == (1, 2)  # two current labels
    again = client.ingest_labels("rev", [_label("l1.r2", "it-0", "B", replaces="l1")])
    assert (again.stored_count, again.duplicate_count) == (0, 1)  # a replay is a duplicate
    pool = client.get_pool("rev")
    assert (pool.label_count, pool.labelled_item_count) == (2, 2)
    exported = {e.label.label_id: e for e in client.export_labels("rev")}
    assert set(exported) == {"l1", "l2", "l1.r2"}
    assert exported["l1"].superseded_by == "l1.r2" and exported["l1"].label.preference == 1  # A
    assert exported["l1.r2"].label.replaces_label_id == "l1" and exported["l1.r2"].superseded_by == ""
    assert exported["l2"].superseded_by == "" and exported["l2"].label.replaces_label_id == ""

    # The same id with another replaces_label_id is a conflict that names both fields.
    e = _error(lambda: client.ingest_labels("rev", [_label("l1.r2", "it-0", "B", replaces="l2")]))
    assert e.reason == "LABEL_CONFLICT" and e.metadata["stored_replaces_label_id"] == "l1"
    # The first answer's id sent again with its old content is a duplicate; with new content a
    # conflict that says where the latest revision is.
    assert client.ingest_labels("rev", [_label("l1", "it-0", "A")]).duplicate_count == 1
    e = _error(lambda: client.ingest_labels("rev", [_label("l1", "it-0", "B")]))
    assert e.reason == "LABEL_CONFLICT" and e.metadata["stored_superseded_by"] == "l1.r2"


@pytest.mark.parametrize(
    ("label", "code", "reason"),
    [
        (_label("n2", "it-1", "B", replaces="l1.r2"), grpc.StatusCode.INVALID_ARGUMENT, "REVISION_MISMATCH"),
        (_label("n3", "it-0", "B", who="y", replaces="l1.r2"), grpc.StatusCode.INVALID_ARGUMENT, "REVISION_MISMATCH"),
        (_label("n4", "it-0", "B", replaces="nope"), grpc.StatusCode.NOT_FOUND, "LABEL_NOT_FOUND"),
        (_label("n5", "it-0", "B", replaces="n5"), grpc.StatusCode.INVALID_ARGUMENT, "SELF_REVISION"),
        (_label("n6", "it-0", "B", replaces="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, ""),
    ],
)
def test_bad_revisions_are_refused_with_the_field_named(
    client: Client, label: dict[str, str], code: grpc.StatusCode, reason: str
) -> None:
    _pool(client, "bad")
    client.ingest_labels("bad", [_label("l1", "it-0", "A")])
    client.ingest_labels("bad", [_label("l1.r2", "it-0", "B", replaces="l1")])
    e = _error(lambda: client.ingest_labels("bad", [label]))
    assert e.code == code and (not reason or e.reason == reason), e
    assert any(v.field == "labels[0].replaces_label_id" for v in e.field_violations) or reason == "LABEL_NOT_FOUND", e
    assert client.get_pool("bad").label_count == 1  # nothing stored


def test_two_revisions_of_one_answer_in_a_request_are_refused(client: Client) -> None:
    _pool(client, "twice")
    client.ingest_labels("twice", [_label("l1", "it-0", "A")])
    client.ingest_labels("twice", [_label("l1.r2", "it-0", "B", replaces="l1")])
    e = _error(lambda: client.ingest_labels(
        "twice", [_label("r3", "it-0", "B", replaces="l1"), _label("r4", "it-0", "TIE", replaces="l1.r2")]))
    assert e.reason == "DUPLICATE_REVISION" and e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.field_violations[0].field == "labels[1].replaces_label_id"
    assert len(list(client.export_labels("twice"))) == 2


def test_naming_the_first_answer_revises_its_latest_revision(client: Client) -> None:
    """A -> B -> A -> B, each revision naming only the first answer (what the Label Studio bridge sends)."""
    _pool(client, "chain")
    client.ingest_labels("chain", [_label("l1", "it-0", "A")])
    for n, pref in ((2, "B"), (3, "A"), (4, "B")):
        client.ingest_labels("chain", [_label(f"l1.v{n}", "it-0", pref, replaces="l1")])
    client.ingest_labels("chain", [_label("l1.v3", "it-0", "A", replaces="l1")])  # a late replay: a duplicate
    same = client.ingest_labels("chain", [_label("l1.v5", "it-0", "B", replaces="l1")])  # B stands: not stored
    assert (same.stored_count, same.duplicate_count) == (0, 1)
    exported = {e.label.label_id: e for e in client.export_labels("chain")}
    assert {k: e.superseded_by for k, e in exported.items()} == {"l1": "l1.v2", "l1.v2": "l1.v3", "l1.v3": "l1.v4",
                                                                 "l1.v4": ""}
    assert client.get_pool("chain").label_count == 1


def test_training_uses_the_latest_revision(client: Client) -> None:
    items, truth = synthetic_items(40, 8, seed=5)
    client.create_pool("train", feature_source="CLIENT", feature_dim=8, **{**SMALL, "epochs": 300, "val_fraction": 0.0})
    client.upload_items("train", items)
    ids = [f"it-{i}" for i in range(24)]
    flip = {"A": "B", "B": "A"}

    def agreement() -> float:  # mean P(the first answer) over the labelled items
        preds = client.predict("train", item_ids=ids).predictions
        return float(np.mean([p.prob_a if truth[p.item_id] == "A" else 1 - p.prob_a for p in preds]))

    client.ingest_labels("train", [_label(f"l{i}", iid, truth[iid]) for i, iid in enumerate(ids)])
    first = client.update_posterior("train", seed=0).result
    before = agreement()
    client.ingest_labels("train", [_label(f"l{i}.r2", iid, flip[truth[iid]], replaces=f"l{i}")
                                   for i, iid in enumerate(ids)])
    second = client.update_posterior("train", seed=0).result
    after = agreement()
    assert first.label_count == second.label_count == 24
    assert before > 0.6 and after < 0.4, (before, after)


def test_a_revision_keeps_the_control_flag(client: Client) -> None:
    _pool(client, "ctl", control_fraction=0.5)
    batch = client.acquire("ctl", batch_size=8, strategy="RANDOM", seed=3, annotator_id="x")
    control = [a.item.item_id for a in batch.items if a.control]
    assert len(control) == 4
    client.ingest_labels("ctl", [_label(f"c-{iid}", iid, "A") for iid in control])
    client.ingest_labels("ctl", [_label(f"c-{control[0]}.r2", control[0], "B", replaces=f"c-{control[0]}")])
    exported = {e.label.label_id: e for e in client.export_labels("ctl")}
    assert exported[f"c-{control[0]}.r2"].control and exported[f"c-{control[0]}"].control


def test_concurrent_revisions_of_one_label_commit_once(server: ServerThread, client: Client) -> None:
    """Two replicas may revise one label at once (IngestLabels commits where it lands): the database decides."""
    _pool(client, "race")
    client.ingest_labels("race", [_label("l1", "it-0", "A")])
    store = server.running.service.store
    key = store.pool_key("default", "race")
    assert key is not None

    def write(label_id: str) -> LabelWrite:  # both resolved "l1" as the latest revision
        return LabelWrite(key, (LabelIn(label_id, "it-0", Preference.B, "x", "l1", "l1"),), 1, "", "", "")

    store.commit_labels([write("r1")])
    with pytest.raises(Aborted) as e:
        store.commit_labels([write("r2")])
    assert e.value.reason == "LABEL_SUPERSEDED"
    assert [e.label.label_id for e in client.export_labels("race")] == ["l1", "r1"]
    # Through the API the retry finds the new latest revision.
    client.ingest_labels("race", [_label("r2", "it-0", "TIE", replaces="l1")])
    assert {e.label.label_id: e.superseded_by for e in client.export_labels("race")}["r1"] == "r2"
