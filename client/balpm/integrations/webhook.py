"""A Label Studio webhook receiver that ingests annotations into balpm as they are submitted.

Label Studio POSTs ``{"action": "ANNOTATION_CREATED", "annotation": {...}, "task": {...}, "project": {...}}``
(``ANNOTATIONS_CREATED`` carries lists). Only tasks created by the bridge for the configured pool are
used; labels get the same deterministic ids as :func:`balpm.integrations.label_studio.sync`, so the
webhook and periodic syncs can run side by side without double counting. A missed event (receiver
down, balpm unavailable) is picked up by the next sync.

Register it in Label Studio (project settings -> Webhooks, or ``POST /api/webhooks``) with
``send_payload`` on and, if ``--secret`` is set, a header ``X-Balpm-Webhook-Secret: <secret>``.
Label Studio may refuse loopback/private webhook URLs unless its SSRF protection allows them.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from balpm.errors import BalpmError
from balpm.integrations.annotations import AnnotatorMapper, annotation_to_label, ingest_answers, revision_label

if TYPE_CHECKING:
    from balpm.client import Client

SECRET_HEADER = "X-Balpm-Webhook-Secret"
INGEST_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
MAX_BODY_BYTES = 32 << 20


log = logging.getLogger(__name__)

def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def handle_event(
    payload: Mapping[str, Any],
    client: Client,
    *,
    pool_id: str,
    project_id: int = 0,
    annotator_of: Callable[[Any], str] | None = None,
) -> dict[str, Any]:
    """Ingest the annotations of one webhook event.

    Args:
        payload: The decoded webhook body.
        client: balpm client.
        pool_id: Only tasks the bridge created for this pool are ingested.
        project_id: Only events of this Label Studio project (0: any).
        annotator_of: Maps ``completed_by`` to a balpm annotator id.

    Returns:
        A summary: ``action``, ``ignored`` (with why) or ``stored``/``duplicates``/``conflicts``.
    """
    action = str(payload.get("action", ""))
    if action not in INGEST_ACTIONS:
        return {"action": action, "ignored": "action"}
    project = payload.get("project") or {}
    annotations = _as_list(payload.get("annotation"))
    event_project = int(project.get("id") or 0) if isinstance(project, Mapping) else int(project or 0)
    if not event_project and annotations:
        event_project = int(annotations[0].get("project") or 0)
    if project_id and event_project != project_id:
        return {"action": action, "ignored": "project"}
    tasks = {int(t["id"]): t for t in _as_list(payload.get("task")) if isinstance(t, Mapping) and "id" in t}
    annotator_of = annotator_of or AnnotatorMapper()
    answers = []
    for ann in annotations:
        task_ref = ann.get("task")
        task = task_ref if isinstance(task_ref, Mapping) else tasks.get(int(task_ref or 0))
        if task is None and len(tasks) == 1:
            task = next(iter(tasks.values()))
        if task is None:
            continue
        label = annotation_to_label(
            ann,
            task,
            project_id=event_project or int(ann.get("project") or 0),
            pool_id=pool_id,
            annotator_of=annotator_of,
        )
        if label is not None:
            answers.append((label, revision_label(label, ann)))
    if not answers:
        return {"action": action, "ignored": "no bridge annotation with a choice"}
    report = ingest_answers(client, pool_id, answers)
    return {
        "action": action,
        "label_ids": [lb["label_id"] for lb, _ in answers],
        "stored": report.stored,
        "duplicates": report.duplicates,
        "revised": report.revised,
        "conflicts": report.conflicts,
        "conflict_details": report.conflict_details,
    }


def make_webhook_server(
    client: Client,
    *,
    pool_id: str,
    project_id: int = 0,
    annotator_of: Callable[[Any], str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    secret: str = "",
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that ingests Label Studio annotation webhooks on ``POST /``.

    Answers 200 with the :func:`handle_event` summary, 400 for a body that is not JSON, 401 for a
    wrong secret and 503 when balpm refused the labels (the next sync retries them).
    """
    lock = threading.Lock()  # one ingest at a time keeps the gRPC client and ordering simple

    class Handler(BaseHTTPRequestHandler):
        server_version = "balpm-label-studio-webhook/1"

        def _reply(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(200, {"status": "ok", "pool_id": pool_id})

        def do_POST(self) -> None:
            if secret and not hmac.compare_digest(self.headers.get(SECRET_HEADER, ""), secret):
                log.warning("webhook: rejected a request from %s: bad or missing %s", self.client_address[0],
                            SECRET_HEADER)
                self._reply(401, {"error": "bad or missing " + SECRET_HEADER})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY_BYTES:
                self._reply(400, {"error": "missing or oversized body"})
                return
            try:
                payload = json.loads(self.rfile.read(length))
                if not isinstance(payload, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as e:
                self._reply(400, {"error": f"invalid JSON: {e}"})
                return
            try:
                with lock:
                    summary = handle_event(
                        payload, client, pool_id=pool_id, project_id=project_id, annotator_of=annotator_of
                    )
            except BalpmError as e:
                log.error("webhook: %s event not ingested (Label Studio will retry): %s",
                          payload.get("action", "?"), e)
                self._reply(503, {"error": str(e), "reason": e.reason})
                return
            log.info("webhook: %s event: %s", payload.get("action", "?"), json.dumps(summary, sort_keys=True))
            self._reply(200, summary)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve_webhook(
    client: Client,
    *,
    pool_id: str,
    project_id: int = 0,
    annotator_of: Callable[[Any], str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    secret: str = "",
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Serve the webhook until interrupted (Ctrl-C)."""
    server = make_webhook_server(
        client, pool_id=pool_id, project_id=project_id, annotator_of=annotator_of, host=host, port=port, secret=secret
    )
    try:
        if ready is not None:
            addr = server.server_address
            ready((str(addr[0]), int(addr[1])))
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
