"""The Label Studio bridge's pure parts and webhook receiver, without a Label Studio (a real balpm server)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from balpm import Client
from balpm.integrations.label_studio import (
    AnnotatorMapper,
    LeaseLedger,
    annotation_preference,
    annotation_to_label,
    is_personal_access_token,
)
from balpm.integrations.webhook import SECRET_HEADER, handle_event, make_webhook_server
from tests.conftest import synthetic_items

pytestmark = pytest.mark.slow  # the Label Studio tests are one tier (tests/conftest.py)

POOL = "wh"


def _ann(ann_id: int, choice: str | None, *, user: Any = 7, cancelled: bool = False) -> dict[str, Any]:
    result = (
        []
        if choice is None
        else [{"from_name": "preference", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}]
    )
    return {"id": ann_id, "result": result, "completed_by": user, "was_cancelled": cancelled, "project": 3, "task": 11}


def _task(item_id: str, pool: str = POOL) -> dict[str, Any]:
    return {
        "id": 11,
        "data": {"item_id": item_id, "prompt": "p", "completion_a": "a", "completion_b": "b", "balpm_pool": pool},
    }


def test_annotation_preference_maps_choices_and_ignores_skips() -> None:
    assert annotation_preference(_ann(1, "A")) == "A"
    assert annotation_preference(_ann(1, "B")) == "B"
    assert annotation_preference(_ann(1, "Tie")) == "TIE"
    assert annotation_preference(_ann(1, None)) is None
    assert annotation_preference(_ann(1, "A", cancelled=True)) is None


def test_annotation_to_label_uses_stable_ids_and_only_bridge_tasks_of_the_pool() -> None:
    mapper = AnnotatorMapper({"7": "alice"})
    label = annotation_to_label(_ann(42, "B"), _task("it-1"), project_id=3, pool_id=POOL, annotator_of=mapper)
    assert label == {"label_id": "ls:3:42", "item_id": "it-1", "preference": "B", "annotator_id": "alice"}
    assert (
        annotation_to_label(_ann(42, "B"), _task("it-1", "other"), project_id=3, pool_id=POOL, annotator_of=mapper)
        is None
    )
    assert (
        annotation_to_label(
            _ann(42, "B"), {"id": 1, "data": {"text": "x"}}, project_id=3, pool_id=POOL, annotator_of=mapper
        )
        is None
    )


def test_annotator_mapper_maps_ids_and_emails_and_defaults_to_ls_user() -> None:
    mapper = AnnotatorMapper({"7": "alice", "bob@example.com": "bob"})
    assert mapper(7) == "alice"
    assert mapper({"id": 8, "email": "bob@example.com"}) == "bob"
    assert mapper(9) == "ls-user-9"
    assert mapper(None) == "anonymous"


def test_token_kind_detection_tells_personal_access_tokens_from_legacy_tokens() -> None:
    assert is_personal_access_token("eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln")
    assert not is_personal_access_token("0123456789abcdef0123456789abcdef01234567")


def test_lease_ledger_round_trips_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ledger.json"
    ledger = LeaseLedger(path)
    ledger.add(["a", "b"])
    ledger.save()
    again = LeaseLedger(path)
    assert set(again.items) == {"a", "b"}
    again.discard(["a"])
    again.save()
    assert set(LeaseLedger(path).items) == {"b"}


@pytest.fixture
def pool_client(client: Client) -> Client:
    items, _ = synthetic_items(8, 4, seed=0)
    client.create_pool(POOL, feature_source="CLIENT", feature_dim=4, ensemble_size=2, hidden_sizes=[8], knn_k=3)
    client.upload_items(POOL, items)
    return client


def test_webhook_event_ingests_once_and_stores_an_edited_answer_as_a_revision(pool_client: Client) -> None:
    created = {"action": "ANNOTATION_CREATED", "annotation": _ann(5, "A"), "task": _task("it-0"), "project": {"id": 3}}
    first = handle_event(created, pool_client, pool_id=POOL, project_id=3)
    assert (first["stored"], first["duplicates"], first["revised"], first["conflicts"]) == (1, 0, 0, [])
    again = handle_event(created, pool_client, pool_id=POOL, project_id=3)
    assert (again["stored"], again["duplicates"], again["revised"]) == (0, 1, 0)
    # Edited in the UI (A -> B): the edit wins, stored as a revision of the first answer; not a conflict.
    edited = {**_ann(5, "B"), "updated_at": "2026-12-03T10:00:00Z"}
    changed = {**created, "action": "ANNOTATION_UPDATED", "annotation": edited}
    revised = handle_event(changed, pool_client, pool_id=POOL, project_id=3)
    assert (revised["stored"], revised["revised"], revised["conflicts"]) == (0, 1, []), revised
    assert handle_event(changed, pool_client, pool_id=POOL, project_id=3)["revised"] == 0  # a replay
    history = {e.label.label_id: e for e in pool_client.export_labels(POOL)}
    assert len(history) == 2 and history["ls:3:5"].superseded_by
    latest = history[history["ls:3:5"].superseded_by]
    assert latest.label.preference == 2 and latest.label.replaces_label_id == "ls:3:5"  # B
    # And back (B -> A), later: a second revision.
    back = {**created, "action": "ANNOTATION_UPDATED",
            "annotation": {**_ann(5, "A"), "updated_at": "2026-12-03T11:00Z"}}
    assert handle_event(back, pool_client, pool_id=POOL, project_id=3)["revised"] == 1
    assert pool_client.get_pool(POOL).label_count == 1
    # Another annotator under the same annotation id is a conflict that names the field.
    other_user = {**created, "action": "ANNOTATION_UPDATED", "annotation": _ann(5, "A", user=8)}
    moved = handle_event(other_user, pool_client, pool_id=POOL, project_id=3)
    assert moved["conflicts"] == ["ls:3:5"] and moved["revised"] == 0
    assert [sorted(d) for d in moved["conflict_details"]] == [["annotator_id", "label_id"]]
    assert handle_event({**created, "project": {"id": 4}}, pool_client, pool_id=POOL, project_id=3)["ignored"]
    assert handle_event({"action": "TASKS_CREATED"}, pool_client, pool_id=POOL)["ignored"] == "action"
    assert pool_client.get_pool(POOL).label_count == 1
    assert len(list(pool_client.export_labels(POOL))) == 3


@pytest.fixture
def webhook(pool_client: Client) -> Iterator[ThreadingHTTPServer]:
    srv = make_webhook_server(pool_client, pool_id=POOL, host="127.0.0.1", port=0, secret="s3cret")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def _post(srv: ThreadingHTTPServer, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_webhook_http_server_checks_the_secret_and_rejects_bad_json(
    webhook: ThreadingHTTPServer, pool_client: Client
) -> None:
    event = json.dumps({"action": "ANNOTATION_CREATED", "annotation": _ann(6, "Tie"), "task": _task("it-1")}).encode()
    assert _post(webhook, event, {})[0] == 401
    assert _post(webhook, event, {SECRET_HEADER: "wrong"})[0] == 401
    assert _post(webhook, b"{not json", {SECRET_HEADER: "s3cret"})[0] == 400
    status, body = _post(webhook, event, {SECRET_HEADER: "s3cret"})
    assert status == 200 and body["stored"] == 1 and body["label_ids"] == ["ls:3:6"]
    assert pool_client.get_pool(POOL).label_count == 1


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_label_studio_urls_and_an_unreachable_label_studio_are_clear_errors() -> None:
    from balpm.errors import InvalidInputError
    from balpm.integrations.label_studio import LabelStudioAPI, LabelStudioError

    for url in ("127.0.0.1:8080", "ftp://host", "http://"):
        with pytest.raises(InvalidInputError) as bad:
            LabelStudioAPI(url, "token")
        assert (bad.value.field, bad.value.reason) == ("ls_url", "BAD_URL")
    api = LabelStudioAPI(f"http://127.0.0.1:{_closed_port()}", "token", timeout_s=5)
    with pytest.raises(LabelStudioError) as down:
        api.request("GET", "/api/projects/")
    assert down.value.reason == "LABEL_STUDIO_UNREACHABLE" and "is it running?" in str(down.value)
    assert down.value.code.name == "UNAVAILABLE"


def test_sync_against_a_missing_pool_fails_before_touching_label_studio_or_the_ledger(
    client: Client, tmp_path: Path
) -> None:
    from balpm.errors import NotFoundError
    from balpm.integrations.label_studio import LabelStudioAPI, sync

    ledger = tmp_path / "ledger.json"
    api = LabelStudioAPI(f"http://127.0.0.1:{_closed_port()}", "token", timeout_s=5)  # never reached
    with pytest.raises(NotFoundError):
        sync(api, client, project_id=1, pool_id="no-such-pool", batch_size=4, state_file=ledger)
    assert not ledger.exists()


def test_the_webhook_logs_every_event(pool_client: Client, caplog: pytest.LogCaptureFixture) -> None:
    server = make_webhook_server(pool_client, pool_id=POOL, project_id=3, port=0, secret="s")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    event = {"action": "ANNOTATION_CREATED", "annotation": _ann(9, "B"), "task": _task("it-1"), "project": {"id": 3}}
    try:
        with caplog.at_level("INFO", logger="balpm.integrations.webhook"):
            req = urllib.request.Request(url, data=json.dumps(event).encode(), method="POST",
                                         headers={SECRET_HEADER: "s", "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
            bad = urllib.request.Request(url, data=b"{}", method="POST", headers={SECRET_HEADER: "wrong"})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(bad, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ANNOTATION_CREATED event" in m and '"stored": 1' in m for m in messages), messages
    assert any("rejected a request" in m for m in messages), messages
