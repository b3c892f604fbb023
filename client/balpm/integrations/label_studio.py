"""A bridge between balpm and Label Studio: balpm picks the pairs, humans label them in Label Studio.

Three operations, also exposed as ``balpm label-studio {setup,sync,webhook}``:

* :func:`setup_project` creates a Label Studio project whose labelling interface shows the prompt
  and both completions with the choices A / B / Tie.
* :func:`sync` (1) ingests completed annotations of the tasks the bridge created back into balpm as
  labels, (2) releases the balpm leases of bridge tasks that were deleted in Label Studio and
  (3) acquires a new batch and creates one task per item. Every step is idempotent, so a sync can
  be rerun (e.g. from cron) at any time.
* :mod:`balpm.integrations.webhook` ingests annotations as soon as Label Studio reports them.

Where the state lives:

* Task data holds the balpm item (``item_id``, ``prompt``, ``completion_a``, ``completion_b``) and
  the pool (``balpm_pool``); task meta holds the acquisition scores. So "which items already have a
  task" is read back from Label Studio on every sync.
* A label's id is derived from the Label Studio annotation id (``ls:<project>:<annotation>``), so
  ingesting the same annotation twice is a no-op in balpm (IngestLabels is idempotent by label id).
  An annotation *changed* to another choice after it was ingested (edited in the UI) is stored as a
  revision (``Label.replaces_label_id``): the edit wins, training uses the latest answer and the first
  one stays in ``balpm export`` marked ``superseded_by`` (``labels_revised`` counts them). A label that
  differs in its item or annotator (e.g. another ``--annotator-map``) is a conflict: reported under
  ``conflicts`` with ``conflict_details`` naming the fields that differ, stored and sent.
* Only releasing the leases of *deleted* tasks needs memory Label Studio cannot give (the task is
  gone): a small local lease ledger (JSON, ``--state-file``) lists the items the bridge leased. If it
  is lost, nothing breaks; leases of deleted tasks then simply run until their TTL.

Label Studio API used (checked against label-studio 1.23): ``Authorization: Token <key>`` for a legacy
token (the organization must allow legacy tokens, e.g. ``label-studio start --enable-legacy-api-token``)
or, for a personal access token (a JWT refresh token), ``POST /api/token/refresh/`` to get a short-lived
access token sent as ``Authorization: Bearer <access>``; ``POST /api/projects``,
``POST /api/projects/{id}/import?return_task_ids=true``, ``GET /api/tasks?project={id}&fields=all``
(paginated, ``{"tasks": [...], "total": n}``), ``GET /api/tasks/{id}/annotations/`` and
``GET /api/users/{id}/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from balpm.errors import BalpmError, FailedPreconditionError, InvalidInputError
from balpm.integrations.annotations import (
    CHOICE_TO_PREFERENCE,
    CHOICES_NAME,
    POOL_KEY,
    AnnotatorMapper,
    IngestReport,
    annotation_preference,
    annotation_to_label,
    ingest_answers,
    ingest_labels,
    label_id_for,
    revision_label,
    task_item_id,
)
from balpm.integrations.webhook import serve_webhook

if TYPE_CHECKING:
    from balpm.client import Client

#: Labelling interface: the prompt, both completions and a required single choice A / B / Tie.
LABEL_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;">
      <Header value="Completion A"/>
      <Text name="completion_a" value="$completion_a"/>
    </View>
    <View style="flex: 1;">
      <Header value="Completion B"/>
      <Text name="completion_b" value="$completion_b"/>
    </View>
  </View>
  <Header value="Which completion is better?"/>
  <Choices name="preference" toName="prompt" choice="single" showInline="true" required="true">
    <Choice value="A" hotkey="1"/>
    <Choice value="B" hotkey="2"/>
    <Choice value="Tie" hotkey="3"/>
  </Choices>
</View>
"""
DEFAULT_LEASE_ANNOTATOR = "label-studio"
DEFAULT_LEASE_TTL_S = 14 * 24 * 3600.0
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
_IMPORT_CHUNK = 500
_TASK_PAGE_SIZE = 500


#: The gRPC status code of a LabelStudioError by HTTP status (others: 4xx INVALID_ARGUMENT, else UNAVAILABLE).
_HTTP_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class LabelStudioError(BalpmError):
    """A Label Studio HTTP call failed (a `BalpmError`; reason LABEL_STUDIO_HTTP_<status>).

    Its `code` follows the HTTP status: 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
    404 NOT_FOUND, 409 ALREADY_EXISTS, 429 RESOURCE_EXHAUSTED, other 4xx INVALID_ARGUMENT, 5xx and no
    response (status 0) UNAVAILABLE.

    Attributes:
        status: HTTP status (0 when no response arrived).
        body: The start of the response body.
    """

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        code = _HTTP_CODES.get(
            status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.UNAVAILABLE
        )
        if status == 0:  # no HTTP response at all: say so plainly
            message, reason = f"Label Studio is unreachable ({method} {url}: {body[:300]}); is it running?", (
                "LABEL_STUDIO_UNREACHABLE"
            )
        else:
            message, reason = f"Label Studio {method} {url} failed: HTTP {status}: {body[:500]}", (
                f"LABEL_STUDIO_HTTP_{status}"
            )
        super().__init__(code, message, reason=reason, metadata={"http_status": str(status), "url": url})
        self.status = status
        self.body = body


def is_personal_access_token(token: str) -> bool:
    """Whether a token is a personal access token (a JWT refresh token) rather than a legacy token."""
    parts = token.split(".")
    return len(parts) == 3 and token.startswith("eyJ") and all(parts)


class LabelStudioAPI:
    """A minimal Label Studio REST client (stdlib ``urllib`` only).

    Args:
        url: Base URL, e.g. ``http://127.0.0.1:8080``.
        token: A legacy API token or a personal access token (detected by form).
        timeout_s: Per-request timeout.
    """

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0) -> None:
        if not token:
            raise InvalidInputError.local(
                f"a Label Studio token is required (--ls-token or {TOKEN_ENV})", field="token", reason="NO_TOKEN"
            )
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidInputError.local(
                f"the Label Studio URL must be http(s)://host[:port], got {url!r}", field="ls_url", reason="BAD_URL"
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._token = token
        self._pat = is_personal_access_token(token)
        self._access: str | None = None

    def _auth_header(self, *, refresh: bool = False) -> str:
        if not self._pat:
            return f"Token {self._token}"
        if self._access is None or refresh:
            resp = self._send("POST", "/api/token/refresh/", body={"refresh": self._token}, auth=None)
            self._access = str(resp["access"])
        return f"Bearer {self._access}"

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        auth: str | None,
    ) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = auth
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise LabelStudioError(method, url, e.code, e.read().decode(errors="replace")) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise LabelStudioError(method, url, 0, str(e)) from e
        return json.loads(raw) if raw.strip() else None

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        """Send an authenticated request and return the decoded JSON (None for an empty body).

        A personal access token's access token is refreshed once when the server answers 401.

        Raises:
            LabelStudioError: Transport failure or a non-2xx status.
        """
        try:
            return self._send(method, path, params=params, body=body, auth=self._auth_header())
        except LabelStudioError as e:
            if not (self._pat and e.status == 401):
                raise
        return self._send(method, path, params=params, body=body, auth=self._auth_header(refresh=True))

    def whoami(self) -> dict[str, Any]:
        """The token's user."""
        return dict(self.request("GET", "/api/current-user/whoami"))

    def create_project(self, title: str, label_config: str, description: str = "") -> dict[str, Any]:
        """Create a project and return it."""
        body = {"title": title, "label_config": label_config, "description": description}
        return dict(self.request("POST", "/api/projects", body=body))

    def get_project(self, project_id: int) -> dict[str, Any]:
        """Return a project."""
        return dict(self.request("GET", f"/api/projects/{project_id}"))

    def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        """Create tasks (each ``{"data": ..., "meta": ...}``) and return their ids in order."""
        ids: list[int] = []
        for start in range(0, len(tasks), _IMPORT_CHUNK):
            chunk = list(tasks[start : start + _IMPORT_CHUNK])
            resp = self.request(
                "POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, body=chunk
            )
            ids.extend(int(i) for i in resp.get("task_ids", []))
        return ids

    def iter_tasks(self, project_id: int, *, page_size: int = _TASK_PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """Yield every task of a project with its annotations (``fields=all``)."""
        page, seen = 1, 0
        while True:
            resp = self.request(
                "GET",
                "/api/tasks",
                params={"project": project_id, "fields": "all", "page": page, "page_size": page_size},
            )
            tasks = resp["tasks"] if isinstance(resp, dict) else resp
            yield from tasks
            seen += len(tasks)
            total = int(resp.get("total", seen)) if isinstance(resp, dict) else seen
            if not tasks or seen >= total:
                return
            page += 1

    def task_annotations(self, task_id: int) -> list[dict[str, Any]]:
        """Return the annotations of a task."""
        return list(self.request("GET", f"/api/tasks/{task_id}/annotations/"))

    def get_user(self, user_id: int) -> dict[str, Any]:
        """Return a user (id, email, ...)."""
        return dict(self.request("GET", f"/api/users/{user_id}/"))


def default_state_file(ls_url: str, project_id: int, pool_id: str) -> Path:
    """Default lease ledger path: ``$XDG_STATE_HOME/balpm/label-studio/<host>_p<project>_<pool>.json``."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", urllib.parse.urlsplit(ls_url).netloc or ls_url)
    return base / "balpm" / "label-studio" / f"{host}_p{project_id}_{pool_id}.json"


class LeaseLedger:
    """Items the bridge leased in balpm for a project (only used to release leases of deleted tasks).

    Args:
        path: JSON file; written atomically. A missing file is an empty ledger.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, float] = {}
        if path.exists():
            try:
                self.items = {str(k): float(v) for k, v in json.loads(path.read_text()).get("items", {}).items()}
            except (OSError, ValueError, AttributeError, TypeError) as e:
                raise InvalidInputError.local(
                    f"lease ledger {path} is unreadable ({e}); remove it (leases of deleted tasks then run to "
                    "their TTL) or pass another --state-file",
                    field="state_file",
                ) from e

    def add(self, item_ids: Iterable[str]) -> None:
        """Record newly leased items."""
        now = time.time()
        for iid in item_ids:
            self.items.setdefault(iid, now)

    def discard(self, item_ids: Iterable[str]) -> None:
        """Forget items (released or labelled)."""
        for iid in item_ids:
            self.items.pop(iid, None)

    def save(self) -> None:
        """Write the ledger atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "items": self.items}, indent=0, sort_keys=True))
        os.replace(tmp, self.path)


def setup_project(api: LabelStudioAPI, title: str, description: str = "") -> dict[str, Any]:
    """Create a Label Studio project with the balpm pairwise-preference interface."""
    return api.create_project(title, LABEL_CONFIG, description)


@dataclass
class SyncReport:
    """Outcome of one :func:`sync`."""

    project_id: int
    pool_id: str
    tasks_seen: int = 0
    bridge_tasks: int = 0
    annotations_seen: int = 0
    labels_stored: int = 0
    labels_duplicate: int = 0
    conflicts: list[str] = field(default_factory=list)
    conflict_details: list[dict[str, Any]] = field(default_factory=list)  # which fields differ, per conflict
    labels_revised: int = 0  # annotations edited since they were ingested: stored as revisions
    leases_released: int = 0
    released_item_ids: list[str] = field(default_factory=list)
    acquired: int = 0
    tasks_created: int = 0
    created_item_ids: list[str] = field(default_factory=list)
    skipped_existing: int = 0
    pool_exhausted: bool = False
    outstanding: int = 0  # open bridge tasks (no annotation yet) before this round's batch

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _task_of_item(item: Any, pool_id: str, resp: Any) -> dict[str, Any]:
    it = item.item
    return {
        "data": {
            "item_id": it.item_id,
            "prompt": it.prompt,
            "completion_a": it.completion_a,
            "completion_b": it.completion_b,
            POOL_KEY: pool_id,
        },
        "meta": {
            "balpm": {
                "rank": int(item.rank),
                "score_total": float(item.scores.total),
                "epistemic": float(item.scores.epistemic),
                "entropy": None if item.scores.entropy != item.scores.entropy else float(item.scores.entropy),
                "posterior_version": int(resp.posterior_version),
                "strategy": int(resp.strategy),
            }
        },
    }


def _acquire(client: Client, pool_id: str, batch_size: int, **kwargs: Any) -> Any | None:
    """Acquire up to batch_size items (fewer if fewer are acquirable); None when the pool is exhausted."""
    try:
        return client.acquire(pool_id, batch_size=batch_size, **kwargs)
    except FailedPreconditionError as e:
        if e.reason == "POOL_EXHAUSTED":
            return None
        acquirable = int(e.metadata.get("acquirable", "0") or 0)
        if e.reason == "BATCH_LARGER_THAN_POOL" and 0 < acquirable < batch_size:
            return client.acquire(pool_id, batch_size=acquirable, **kwargs)
        raise


def sync(
    api: LabelStudioAPI,
    client: Client,
    *,
    project_id: int,
    pool_id: str,
    batch_size: int,
    annotator_of: Callable[[Any], str] | None = None,
    lease_annotator: str = DEFAULT_LEASE_ANNOTATOR,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    strategy: str | None = None,
    seed: int | None = None,
    state_file: Path | None = None,
    max_outstanding: int = 0,
) -> SyncReport:
    """Ingest finished annotations, release leases of deleted tasks, then queue a new batch as tasks.

    Args:
        api: Label Studio client.
        client: balpm client.
        project_id: Label Studio project (created by :func:`setup_project`).
        pool_id: balpm pool.
        batch_size: Items to acquire this round (0 only ingests and releases).
        annotator_of: Maps an annotation's ``completed_by`` to a balpm annotator id.
        lease_annotator: balpm annotator id holding the leases of queued tasks.
        lease_ttl_s: Lease length; long, since tasks may wait days for a human.
        strategy: Acquisition strategy (pool default when None).
        seed: Acquisition seed (time-based when None, so stochastic strategies vary per round).
        state_file: Lease ledger path (default :func:`default_state_file`).
        max_outstanding: Top up instead of adding: queue at most this many open tasks in all
            (bridge tasks of the pool nobody has annotated or skipped yet), so a sync run from
            cron while nobody labels leases nothing more. 0 queues `batch_size` every run.

    Returns:
        What the sync did.
    """
    client.get_pool(pool_id)  # a missing pool fails here, before Label Studio or the ledger is touched
    annotator_of = annotator_of or AnnotatorMapper(api=api)
    report = SyncReport(project_id=project_id, pool_id=pool_id)
    ledger = LeaseLedger(state_file or default_state_file(api.url, project_id, pool_id))

    # (1) Annotations of bridge tasks -> balpm labels (idempotent by the derived label id).
    live: dict[str, int] = {}
    answered: set[str] = set()  # items whose task has any annotation (a label or a skip)
    labelled: set[str] = set()
    answers: list[tuple[dict[str, str], dict[str, str]]] = []
    for task in api.iter_tasks(project_id):
        report.tasks_seen += 1
        item_id = task_item_id(task, pool_id)
        if item_id is None:
            continue
        report.bridge_tasks += 1
        live[item_id] = int(task["id"])
        annotations = task.get("annotations")
        if annotations is None and int(task.get("total_annotations") or 0) > 0:
            annotations = api.task_annotations(int(task["id"]))
        if annotations:
            answered.add(item_id)
        for ann in annotations or ():
            report.annotations_seen += 1
            label = annotation_to_label(ann, task, project_id=project_id, pool_id=pool_id, annotator_of=annotator_of)
            if label is not None:
                answers.append((label, revision_label(label, ann)))
                labelled.add(item_id)
    ingested = ingest_answers(client, pool_id, answers)
    report.labels_stored, report.labels_duplicate, report.conflicts = (
        ingested.stored,
        ingested.duplicates,
        ingested.conflicts,
    )
    report.conflict_details = ingested.conflict_details
    report.labels_revised = ingested.revised
    ledger.discard(labelled)

    # (2) Leased items whose task is gone (deleted in Label Studio, or a failed import) -> excluded from
    # acquisition (which ends their leases), so they are not offered again; `balpm exclude --include` undoes it.
    gone = sorted(iid for iid in ledger.items if iid not in live)
    if gone:
        for start in range(0, len(gone), 10000):
            report.leases_released += int(client.exclude_items(pool_id, gone[start : start + 10000]).changed_count)
        report.released_item_ids = gone
        ledger.discard(gone)
    ledger.save()

    # (3) A new batch -> one task per item not already queued (topped up to max_outstanding).
    report.outstanding = sum(1 for iid in live if iid not in answered)
    if max_outstanding > 0:
        batch_size = min(batch_size, max(0, max_outstanding - report.outstanding))
    if batch_size > 0:
        resp = _acquire(
            client,
            pool_id,
            batch_size,
            strategy=strategy,
            seed=int(time.time()) if seed is None else seed,
            lease_ttl_s=lease_ttl_s,
            annotator_id=lease_annotator,
        )
        if resp is None:
            report.pool_exhausted = True
        else:
            report.acquired = len(resp.items)
            fresh = [a for a in resp.items if a.item.item_id not in live]
            report.skipped_existing = report.acquired - len(fresh)
            # Ledger first: if the import fails, the next sync releases these leases.
            ledger.add(a.item.item_id for a in fresh)
            ledger.save()
            task_ids = api.import_tasks(project_id, [_task_of_item(a, pool_id, resp) for a in fresh])
            report.tasks_created = len(task_ids)
            report.created_item_ids = [a.item.item_id for a in fresh]
    return report


# ---- CLI -----------------------------------------------------------------------------------


def _api(args: argparse.Namespace) -> LabelStudioAPI:
    return LabelStudioAPI(args.ls_url, args.ls_token or os.environ.get(TOKEN_ENV, ""), timeout_s=args.ls_timeout_s)


def _annotator_mapper(args: argparse.Namespace, api: LabelStudioAPI | None) -> AnnotatorMapper:
    raw = args.annotator_map or ""
    expected = '--annotator-map must be a JSON object {"<ls user id or email>": "<annotator id>"} or @file.json'
    try:
        if raw.startswith("@"):
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        mapping = json.loads(raw) if raw else {}
    except (OSError, ValueError) as e:
        raise InvalidInputError.local(f"{expected}: {e}", field="annotator_map") from e
    if not isinstance(mapping, dict):
        raise InvalidInputError.local(expected, field="annotator_map")
    return AnnotatorMapper(mapping, api=api)


def _balpm_client(args: argparse.Namespace) -> Client:
    from balpm.client import Client

    # --server, --api-key and --timeout-s are the `balpm` CLI's global options (env defaults there).
    timeout_s = getattr(args, "timeout_s", None)
    kwargs = {"timeout_s": timeout_s} if timeout_s else {}
    return Client(args.server, api_key=args.api_key or os.environ.get("BALPM_API_KEY") or None, **kwargs)


def cmd_setup(args: argparse.Namespace) -> None:
    """``balpm label-studio setup``: create the project and print its id."""
    project = setup_project(_api(args), args.title, args.description)
    print(json.dumps({"project_id": project["id"], "title": project.get("title", args.title)}))


def cmd_sync(args: argparse.Namespace) -> None:
    """``balpm label-studio sync``: one sync round, printing its report as JSON."""
    api = _api(args)
    with _balpm_client(args) as client:
        report = sync(
            api,
            client,
            project_id=args.project,
            pool_id=args.pool,
            batch_size=args.batch_size,
            annotator_of=_annotator_mapper(args, api),
            lease_annotator=args.lease_annotator,
            lease_ttl_s=args.lease_ttl_s,
            strategy=args.strategy,
            seed=args.seed,
            state_file=Path(args.state_file) if args.state_file else None,
            max_outstanding=args.batch_size if args.max_outstanding is None else args.max_outstanding,
        )
    print(json.dumps(report.to_dict(), indent=2))


def cmd_webhook(args: argparse.Namespace) -> None:
    """``balpm label-studio webhook``: serve the annotation webhook until interrupted (one log line per event)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    api = _api(args) if args.ls_url and (args.ls_token or os.environ.get(TOKEN_ENV)) else None
    with _balpm_client(args) as client:
        serve_webhook(
            client,
            pool_id=args.pool,
            project_id=args.project,
            annotator_of=_annotator_mapper(args, api),
            host=args.host,
            port=args.port,
            secret=args.secret or os.environ.get("BALPM_WEBHOOK_SECRET", ""),
            ready=lambda addr: print(f"listening on http://{addr[0]}:{addr[1]}/", file=sys.stderr, flush=True),
        )


def register_cli(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the ``label-studio`` command group to the ``balpm`` CLI's subparsers.

    Args:
        sub: The subparsers of ``balpm``.
        parents: Parsers whose options every subcommand accepts too (the CLI's global options, so that
            ``balpm label-studio sync --server X`` works like ``balpm --server X label-studio sync``).
        Errors (``LabelStudioError`` and the SDK's) are ``BalpmError``: ``balpm`` prints them on one line.
    """
    parents = list(parents)
    ls = sub.add_parser("label-studio", help="bridge to Label Studio: setup, sync, webhook", parents=parents)
    ls_sub = ls.add_subparsers(dest="ls_command", required=True, metavar="{setup,sync,webhook}")

    def common(p: argparse.ArgumentParser, *, ls_required: bool = True) -> None:
        p.add_argument("--ls-url", required=ls_required, default="", help="Label Studio base URL")
        p.add_argument("--ls-token", default="", help=f"legacy token or personal access token (or {TOKEN_ENV})")
        p.add_argument("--ls-timeout-s", type=float, default=30.0, help="timeout of each Label Studio request")

    def balpm_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pool", required=True, help="balpm pool id")
        p.add_argument(
            "--annotator-map",
            default="",
            help='JSON {"<ls user id or email>": "<balpm annotator id>"} or @file.json; default ls-user-<id>',
        )

    setup = ls_sub.add_parser("setup", help="create a Label Studio project for preference pairs", parents=parents)
    common(setup)
    setup.add_argument("--title", required=True, help="project title")
    setup.add_argument(
        "--description", default="Pairs chosen by balpm: which completion is better?", help="project description"
    )
    setup.set_defaults(func=cmd_setup)

    sy = ls_sub.add_parser(
        "sync", help="ingest annotations, release deleted tasks' leases, queue a new batch", parents=parents
    )
    common(sy)
    balpm_target(sy)
    sy.add_argument("--project", type=int, required=True, help="Label Studio project id")
    sy.add_argument("--batch-size", type=int, default=32, help="items to queue (0: only ingest)")
    sy.add_argument(
        "--max-outstanding",
        type=int,
        default=None,
        help="top up to this many open (unannotated) tasks instead of adding --batch-size every run "
        "(default: --batch-size, so repeated runs from cron lease nothing while nobody labels; 0: no cap)",
    )
    sy.add_argument("--strategy", default=None, help="acquisition strategy (default: the pool's)")
    sy.add_argument("--seed", type=int, default=None, help="acquisition seed (default: time-based)")
    sy.add_argument(
        "--lease-annotator", default=DEFAULT_LEASE_ANNOTATOR, help="balpm annotator id holding the queued leases"
    )
    sy.add_argument(
        "--lease-ttl-s", type=float, default=DEFAULT_LEASE_TTL_S, help="lease length of queued tasks (default 14 days)"
    )
    sy.add_argument("--state-file", default="", help="lease ledger JSON (default under $XDG_STATE_HOME/balpm)")
    sy.set_defaults(func=cmd_sync)

    wh = ls_sub.add_parser(
        "webhook", help="receive ANNOTATION_CREATED/UPDATED webhooks and ingest labels", parents=parents
    )
    common(wh, ls_required=False)
    balpm_target(wh)
    wh.add_argument("--project", type=int, default=0, help="only accept events of this project (0: any)")
    wh.add_argument("--host", default="127.0.0.1", help="address to listen on")
    wh.add_argument("--port", type=int, default=8765, help="port to listen on")
    wh.add_argument("--secret", default="", help="required X-Balpm-Webhook-Secret header (or BALPM_WEBHOOK_SECRET)")
    wh.set_defaults(func=cmd_webhook)


__all__ = [
    "CHOICES_NAME",
    "CHOICE_TO_PREFERENCE",
    "LABEL_CONFIG",
    "POOL_KEY",
    "AnnotatorMapper",
    "IngestReport",
    "LabelStudioAPI",
    "LabelStudioError",
    "LeaseLedger",
    "SyncReport",
    "annotation_preference",
    "annotation_to_label",
    "ingest_answers",
    "ingest_labels",
    "label_id_for",
    "register_cli",
    "revision_label",
    "setup_project",
    "sync",
    "task_item_id",
]
