"""What the Label Studio bridge and its webhook share: annotations -> balpm labels, and storing them.

:mod:`balpm.integrations.label_studio` (sync, CLI) and :mod:`balpm.integrations.webhook` both import
this module and not each other. Standard library + the balpm SDK only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from balpm.errors import AlreadyExistsError

if TYPE_CHECKING:
    from balpm.client import Client

#: The Choices control of the bridge's labelling interface and how its values map to balpm preferences.
CHOICES_NAME = "preference"
CHOICE_TO_PREFERENCE = {"A": "A", "B": "B", "Tie": "TIE", "TIE": "TIE", "tie": "TIE"}
#: Task data key naming the balpm pool; together with ``item_id`` it marks tasks the bridge created.
POOL_KEY = "balpm_pool"
_INGEST_CHUNK = 1000


class UserLookup(Protocol):
    """What :class:`AnnotatorMapper` needs of a Label Studio client (``LabelStudioAPI`` has it)."""

    def get_user(self, user_id: int) -> dict[str, Any]:
        """Return a user (id, email, ...)."""
        ...


class AnnotatorMapper:
    """Maps a Label Studio user to a balpm annotator id.

    Args:
        mapping: Label Studio user id (as a string) or e-mail -> balpm annotator id. Users not in the
            mapping become ``ls-user-<id>``.
        api: Used to look up e-mails, only when the mapping has e-mail keys.
    """

    def __init__(self, mapping: Mapping[str, str] | None = None, api: UserLookup | None = None) -> None:
        self.mapping = {str(k): str(v) for k, v in (mapping or {}).items()}
        self._api = api
        self._needs_email = any("@" in k for k in self.mapping)
        self._emails: dict[int, str] = {}

    def __call__(self, completed_by: Any) -> str:
        """The annotator id of an annotation's ``completed_by`` (a user id or a user object)."""
        email = ""
        if isinstance(completed_by, Mapping):
            user_id = int(completed_by.get("id", 0))
            email = str(completed_by.get("email") or "")
        else:
            user_id = int(completed_by or 0)
        if str(user_id) in self.mapping:
            return self.mapping[str(user_id)]
        if self._needs_email and not email and self._api is not None and user_id:
            if user_id not in self._emails:
                self._emails[user_id] = str(self._api.get_user(user_id).get("email") or "")
            email = self._emails[user_id]
        if email and email in self.mapping:
            return self.mapping[email]
        return f"ls-user-{user_id}" if user_id else "anonymous"


def label_id_for(project_id: int, annotation_id: int) -> str:
    """The balpm label id of a Label Studio annotation (stable across reruns)."""
    return f"ls:{int(project_id)}:{int(annotation_id)}"


def task_item_id(task: Mapping[str, Any], pool_id: str) -> str | None:
    """The balpm item id of a task the bridge created for ``pool_id`` (None for any other task)."""
    data = task.get("data") or {}
    if data.get(POOL_KEY) != pool_id or not data.get("item_id"):
        return None
    return str(data["item_id"])


def annotation_preference(annotation: Mapping[str, Any]) -> str | None:
    """The preference ("A", "B" or "TIE") an annotation chose; None if skipped or without a choice."""
    if annotation.get("was_cancelled"):
        return None
    for region in annotation.get("result") or ():
        if region.get("from_name") != CHOICES_NAME or region.get("type") != "choices":
            continue
        choices = (region.get("value") or {}).get("choices") or []
        if len(choices) == 1 and choices[0] in CHOICE_TO_PREFERENCE:
            return CHOICE_TO_PREFERENCE[choices[0]]
    return None


def annotation_to_label(
    annotation: Mapping[str, Any],
    task: Mapping[str, Any],
    *,
    project_id: int,
    pool_id: str,
    annotator_of: Callable[[Any], str],
) -> dict[str, str] | None:
    """A balpm label dict for one annotation of a bridge task, or None when there is nothing to ingest."""
    item_id = task_item_id(task, pool_id)
    preference = annotation_preference(annotation)
    if item_id is None or preference is None or annotation.get("id") is None:
        return None
    return {
        "label_id": label_id_for(project_id, int(annotation["id"])),
        "item_id": item_id,
        "preference": preference,
        "annotator_id": annotator_of(annotation.get("completed_by")),
    }


def revision_label(label: Mapping[str, str], annotation: Mapping[str, Any]) -> dict[str, str]:
    """The label that records an annotation's current answer as a revision of its first one.

    Its id is derived from the annotation's ``updated_at`` and answer, so rerunning a sync or
    replaying a webhook sends the same revision again (a duplicate); balpm stores it only when
    the answer differs from the latest stored one, so an unedited annotation stores nothing.
    """
    stamp = f"{annotation.get('updated_at') or ''}|{label['preference']}"
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return {**label, "label_id": f"{label['label_id']}.r{digest}", "replaces_label_id": label["label_id"]}


@dataclass
class IngestReport:
    """What happened to a set of labels."""

    stored: int = 0
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    # Per conflict: label_id and, for each field that differs, {"stored": ..., "sent": ...}.
    conflict_details: list[dict[str, Any]] = field(default_factory=list)
    revised: int = 0  # edited answers stored as revisions of the first answer


def conflict_detail(label: Mapping[str, str], error: AlreadyExistsError) -> dict[str, Any]:
    """Which fields of `label` differ from the stored label with its id (from the LABEL_CONFLICT details)."""
    detail: dict[str, Any] = {"label_id": label["label_id"]}
    for name in ("item_id", "preference", "annotator_id"):
        stored = error.metadata.get(f"stored_{name}")
        sent = str(label.get(name, ""))
        if name == "preference":
            sent = sent.upper()
        if stored is not None and stored != sent:
            detail[name] = {"stored": stored, "sent": sent}
    return detail


def ingest_labels(client: Client, pool_id: str, labels: Sequence[Mapping[str, str]]) -> IngestReport:
    """Store labels idempotently; labels whose id exists with other content are reported, not fatal.

    IngestLabels is atomic, so a chunk with a conflicting label is retried label by label to store the rest.
    """
    report = IngestReport()
    for start in range(0, len(labels), _INGEST_CHUNK):
        chunk = list(labels[start : start + _INGEST_CHUNK])
        try:
            resp = client.ingest_labels(pool_id, chunk)
            report.stored += int(resp.stored_count)
            report.duplicates += int(resp.duplicate_count)
        except AlreadyExistsError:
            for label in chunk:
                try:
                    resp = client.ingest_labels(pool_id, [label])
                except AlreadyExistsError as e:
                    report.conflicts.append(label["label_id"])
                    report.conflict_details.append(conflict_detail(label, e))
                    continue
                report.stored += int(resp.stored_count)
                report.duplicates += int(resp.duplicate_count)
    return report


def ingest_answers(
    client: Client, pool_id: str, answers: Sequence[tuple[Mapping[str, str], Mapping[str, str]]]
) -> IngestReport:
    """Store annotations' answers: each first answer, then its current answer as a revision.

    Policy for an annotation edited after it was ingested (e.g. B -> A in the UI): the edit
    wins. The first answer stays in balpm's export history (superseded_by its revision), and
    training and counts use the latest answer. An answer that differs from the stored one
    only in its choice is therefore not a conflict; a different item or annotator (e.g. a
    changed ``--annotator-map``) still is, reported with the differing fields.

    Args:
        client: balpm client.
        pool_id: The pool.
        answers: (first-answer label, :func:`revision_label` of it) per annotation.
    """
    report = ingest_labels(client, pool_id, [first for first, _ in answers])
    edits = {d["label_id"] for d in report.conflict_details if set(d) == {"label_id", "preference"}}
    report.conflicts = [lid for lid in report.conflicts if lid not in edits]
    report.conflict_details = [d for d in report.conflict_details if d["label_id"] not in edits]
    conflicted = set(report.conflicts)
    revisions = list({first["label_id"]: rev for first, rev in answers if first["label_id"] not in conflicted}.values())
    revised = ingest_labels(client, pool_id, revisions)
    report.revised = revised.stored
    report.conflicts += revised.conflicts
    report.conflict_details += revised.conflict_details
    return report


__all__ = [
    "CHOICES_NAME",
    "CHOICE_TO_PREFERENCE",
    "POOL_KEY",
    "AnnotatorMapper",
    "IngestReport",
    "UserLookup",
    "annotation_preference",
    "annotation_to_label",
    "ingest_answers",
    "ingest_labels",
    "label_id_for",
    "revision_label",
    "task_item_id",
]
