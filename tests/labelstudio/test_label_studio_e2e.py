"""End to end: balpm chooses pairs, humans answer in a real Label Studio, the answers come back once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balpm import Client
from balpm.cli import main as balpm_main
from balpm.errors import FailedPreconditionError
from balpm.integrations.label_studio import AnnotatorMapper, LabelStudioAPI
from balpm.integrations.webhook import SECRET_HEADER, make_webhook_server
from tests.conftest import ServerThread, synthetic_items
from tests.labelstudio.conftest import LabelStudio, _free_port

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow, pytest.mark.timeout(900)]

POOL = "ls-e2e"
WEBHOOK_WAIT_S = 30.0


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Run `balpm ...` in-process and return its JSON stdout."""
    capsys.readouterr()
    balpm_main(list(argv))
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _sync(
    capsys: pytest.CaptureFixture[str],
    ls: LabelStudio,
    server: ServerThread,
    project_id: int,
    state_file: Path,
    *,
    batch_size: int,
    seed: int,
    token: str | None = None,
    max_outstanding: int = 0,
) -> dict[str, Any]:
    return _cli(
        capsys,
        "label-studio",
        "sync",
        "--ls-url",
        ls.url,
        "--ls-token",
        token or ls.token,
        "--project",
        str(project_id),
        "--server",
        server.target,
        "--pool",
        POOL,
        "--batch-size",
        str(batch_size),
        "--max-outstanding",
        str(max_outstanding),
        "--seed",
        str(seed),
        "--annotator-map",
        json.dumps({ls.username: "alice"}),
        "--state-file",
        str(state_file),
    )


def _annotate(api: LabelStudioAPI, task_id: int, choice: str | None) -> dict[str, Any]:
    """Submit an annotation the way the labelling UI does (choice None: the human skips the task)."""
    result = (
        []
        if choice is None
        else [{"from_name": "preference", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}]
    )
    body = {"result": result, "was_cancelled": choice is None}
    return dict(api.request("POST", f"/api/tasks/{task_id}/annotations/", body=body))


def _labels(client: Client) -> dict[str, Any]:
    return {lb.label.label_id: lb.label for lb in client.export_labels(POOL)}


def _acquirable(client: Client) -> list[str]:
    """Every item another annotator could acquire now."""
    try:
        resp = client.acquire(POOL, batch_size=1000, strategy="RANDOM", annotator_id="probe", lease_ttl_s=1)
    except FailedPreconditionError as e:
        if e.reason == "POOL_EXHAUSTED":
            return []
        resp = client.acquire(
            POOL, batch_size=int(e.metadata["acquirable"]), strategy="RANDOM", annotator_id="probe", lease_ttl_s=1
        )
    ids = [a.item.item_id for a in resp.items]
    client.release_items(POOL, ids, annotator_id="probe")
    return ids


def test_label_studio_round_trip_ingests_each_annotation_once_and_excludes_labelled_items(
    label_studio: LabelStudio,
    server: ServerThread,
    client: Client,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    ls = label_studio
    api = LabelStudioAPI(ls.url, ls.token)
    state_file = tmp_path / "ledger.json"
    items, _ = synthetic_items(30, 4, seed=3)
    client.create_pool(
        POOL, feature_source="CLIENT", feature_dim=4, ensemble_size=2, hidden_sizes=[8], knn_k=3, epochs=5
    )
    assert client.upload_items(POOL, items).accepted_count == 30
    text_of = {it["item_id"]: it for it in items}

    # Setup creates the project with the A / B / Tie interface.
    project_id = int(
        _cli(capsys, "label-studio", "setup", "--ls-url", ls.url, "--ls-token", ls.token, "--title", "balpm e2e")[
            "project_id"
        ]
    )
    assert 'name="preference"' in api.get_project(project_id)["label_config"]

    # Sync 1: one task per acquired item, carrying the item's text and id.
    first = _sync(capsys, ls, server, project_id, state_file, batch_size=6, seed=1)
    assert (first["acquired"], first["tasks_created"], first["labels_stored"]) == (6, 6, 0)
    tasks = list(api.iter_tasks(project_id))
    assert sorted(t["data"]["item_id"] for t in tasks) == sorted(first["created_item_ids"])
    for t in tasks:
        src = text_of[t["data"]["item_id"]]
        assert (t["data"]["prompt"], t["data"]["completion_a"], t["data"]["completion_b"]) == (
            src["prompt"],
            src["completion_a"],
            src["completion_b"],
        )
    assert client.get_pool(POOL).leased_item_count == 6

    # Humans: A, B, Tie, one skip; one task is deleted in Label Studio; one left open.
    by_choice = {}
    for task, choice in zip(tasks[:4], ["A", "B", "Tie", None], strict=True):
        ann = _annotate(api, int(task["id"]), choice)
        by_choice[choice] = (task["data"]["item_id"], int(ann["id"]))
    deleted_item = tasks[4]["data"]["item_id"]
    api.request("DELETE", f"/api/tasks/{tasks[4]['id']}/")
    labelled = {by_choice[c][0]: p for c, p in (("A", "A"), ("B", "B"), ("Tie", "TIE"))}

    # Sync 2: three labels in, the deleted task's lease released, a fresh batch queued.
    second = _sync(capsys, ls, server, project_id, state_file, batch_size=6, seed=2)
    assert (second["labels_stored"], second["labels_duplicate"], second["conflicts"]) == (3, 0, [])
    assert second["released_item_ids"] == [deleted_item] and second["leases_released"] == 1
    assert client.get_pool(POOL).excluded_count == 1  # the deleted task's item is not offered again
    assert second["tasks_created"] == 6 and second["skipped_existing"] == 0
    still_queued = {t["data"]["item_id"] for t in tasks} - {deleted_item}
    assert not set(second["created_item_ids"]) & (set(labelled) | still_queued)

    exported = _labels(client)
    assert set(exported) == {f"ls:{project_id}:{by_choice[c][1]}" for c in ("A", "B", "Tie")}
    pref_name = {1: "A", 2: "B", 3: "TIE"}
    assert {lb.item_id: pref_name[lb.preference] for lb in exported.values()} == labelled
    assert {lb.annotator_id for lb in exported.values()} == {"alice"}
    assert client.get_pool(POOL).label_count == 3

    # The next batch (any annotator) never contains a labelled item.
    assert not set(_acquirable(client)) & set(labelled)

    # Sync 3 with a personal access token (JWT) after a human changed an answer (A -> B): the edit
    # wins, stored as a revision of the first answer (kept in the export, superseded); no conflict,
    # nothing double counted, and a rerun changes nothing.
    pat = str(api.request("POST", "/api/token/")["token"])
    a_ann = by_choice["A"][1]
    api.request("PATCH", f"/api/annotations/{a_ann}/", body={"result": _annotate_result("B")})
    third = _sync(capsys, ls, server, project_id, state_file, batch_size=0, seed=3, token=pat)
    assert (third["labels_stored"], third["labels_duplicate"], third["labels_revised"]) == (0, 2, 1), third
    assert third["conflicts"] == [] and third["conflict_details"] == []
    assert (third["acquired"], third["tasks_created"], third["leases_released"]) == (0, 0, 0)
    assert client.get_pool(POOL).label_count == 3
    history = _labels(client)
    first_answer = history[f"ls:{project_id}:{a_ann}"]
    assert len(history) == 4 and first_answer.preference == 1  # A, superseded
    revision = next(lb for lb in history.values() if lb.replaces_label_id == first_answer.label_id)
    assert revision.preference == 2 and revision.item_id == first_answer.item_id  # B
    rerun = _sync(capsys, ls, server, project_id, state_file, batch_size=0, seed=3)
    assert (rerun["labels_stored"], rerun["labels_revised"], rerun["conflicts"]) == (0, 0, []), rerun
    assert len(_labels(client)) == 4

    # Webhook: Label Studio calls the receiver on submit; a later sync sees it as a duplicate.
    port = _free_port()
    # Same annotator map as the syncs (e-mail keys are looked up through the Label Studio API),
    # otherwise the webhook's label would differ from the sync's and be reported as a conflict.
    mapper = AnnotatorMapper({ls.username: "alice"}, api=api)
    webhook = make_webhook_server(
        client, pool_id=POOL, project_id=project_id, annotator_of=mapper, port=port, secret="s3cret"
    )
    thread = threading.Thread(target=webhook.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        api.request(
            "POST",
            "/api/webhooks/",
            body={
                "project": project_id,
                "url": f"http://127.0.0.1:{port}/",
                "send_payload": True,
                "send_for_all_actions": False,
                "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"],
                "headers": {SECRET_HEADER: "s3cret"},
            },
        )
        open_task = next(t for t in api.iter_tasks(project_id) if t["data"]["item_id"] in second["created_item_ids"])
        ann = _annotate(api, int(open_task["id"]), "B")
        want = f"ls:{project_id}:{ann['id']}"
        deadline = time.monotonic() + WEBHOOK_WAIT_S
        while want not in _labels(client):
            assert time.monotonic() < deadline, f"webhook did not deliver {want} in {WEBHOOK_WAIT_S} s"
            time.sleep(0.5)
    finally:
        webhook.shutdown()
        webhook.server_close()
        thread.join(10)
    fourth = _sync(capsys, ls, server, project_id, state_file, batch_size=0, seed=4)
    assert (fourth["labels_stored"], fourth["labels_duplicate"]) == (0, 3), json.dumps(fourth)
    assert fourth["conflicts"] == [] and fourth["labels_revised"] == 0
    assert client.get_pool(POOL).label_count == 4
    assert len(_labels(client)) == 5  # 4 answers and the first answer that was revised

    # Top-up mode (what cron runs): queue up to 10 open tasks in all; a second run while nobody
    # labels leases nothing more.
    fifth = _sync(capsys, ls, server, project_id, state_file, batch_size=50, seed=5, max_outstanding=10)
    open_before = fifth["outstanding"]
    assert 0 < open_before < 10 and fifth["tasks_created"] == 10 - open_before, json.dumps(fifth)
    leased = client.get_pool(POOL).leased_item_count
    sixth = _sync(capsys, ls, server, project_id, state_file, batch_size=50, seed=6, max_outstanding=10)
    assert (sixth["outstanding"], sixth["acquired"], sixth["tasks_created"]) == (10, 0, 0), json.dumps(sixth)
    assert client.get_pool(POOL).leased_item_count == leased


def _annotate_result(choice: str) -> list[dict[str, Any]]:
    return [{"from_name": "preference", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}]
