"""Labels in and data out: idempotent label ingestion, ExportLabels and ExportItems.

IngestLabels is atomic and idempotent (by label id, and by request id with the
request's digest, AIP-155); labels are acknowledged only once committed, fsynced, by
a group commit off the event loop. The exports stream a pool's labels (storage order)
or items (upload order, optionally with their features) in pages, each with a token
that resumes after it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Sequence

import numpy as np

from balpm_server import errors
from balpm_server.domain import validation as v
from balpm_server.domain.common import digest, page_token, parse_page_token, settled
from balpm_server.domain.group_commit import GroupCommit
from balpm_server.domain.models import (
    ExistingLabel,
    ExportedItem,
    IngestResult,
    ItemRecord,
    LabelContent,
    LabelIn,
    LabelWrite,
    Preference,
    Split,
    StoredLabel,
)
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.storage import FeatureStore, SqlStore

MAX_LABELS_PER_REQUEST = 10_000
MAX_EXPORT_LABELS_PAGE = 10_000
DEFAULT_EXPORT_LABELS_PAGE = 1000
MAX_EXPORT_ITEMS_PAGE = 5000
DEFAULT_EXPORT_ITEMS_PAGE = 500
DEFAULT_EXPORT_ITEMS_PAGE_WITH_FEATURES = 100
FEATURE_KINDS = ("prompt", "a", "b")


MAX_REVISIONS = 1000  # revisions of one answer followed to find its latest


def _check_revision(i: int, label: LabelIn, target: ExistingLabel | None, revised: set[str]) -> None:
    """A label that revises `target` (its `replaces`): same item and annotator, one per request."""
    at = f"labels[{i}].replaces_label_id"
    if label.replaces == label.label_id:
        raise errors.InvalidArgument(f"{at} names the label itself", field=at, reason="SELF_REVISION")
    if target is None:
        raise errors.NotFound(f"{at} {label.replaces!r} is not a label of this pool", field=at,
                              reason="LABEL_NOT_FOUND")
    differs = [name for name, mine, theirs in (("item_id", label.item_id, target.content.item_id),
                                                ("annotator_id", label.annotator_id, target.content.annotator_id))
               if mine != theirs]
    if differs:
        raise errors.InvalidArgument(
            f"{at}: a revision keeps the item and the annotator of the label it replaces; {', '.join(differs)} "
            f"differ from {label.replaces!r}'s",
            field=at,
            reason="REVISION_MISMATCH",
            metadata={f"stored_{name}": getattr(target.content, name) for name in differs},
        )
    if label.replaces in revised:
        raise errors.InvalidArgument(
            f"{at}: another label of this request revises {label.replaces!r} too; send one revision per answer",
            field=at,
            reason="DUPLICATE_REVISION",
        )


class Labels:
    """IngestLabels, ExportLabels and ExportItems.

    Args:
        store: The metadata store.
        pools: Pool lookups.
        cache: The pools' runtimes (their locks and occupancy) and feature stores.
    """

    def __init__(self, store: SqlStore, pools: Pools, cache: RuntimeCache) -> None:
        self.store = store
        self.pools = pools
        self.cache = cache
        # Labels of concurrent IngestLabels calls commit (fsynced) together, off the loop.
        self.writes: GroupCommit[LabelWrite, None] = GroupCommit(store.commit_labels)

    async def ingest(self, tenant: str, pool_id: str, labels: Sequence[LabelIn], request_id: str = "") -> IngestResult:
        """Store labels atomically and idempotently; acknowledged only after commit."""
        info = await self.pools.require(tenant, pool_id)
        if not labels:
            raise errors.InvalidArgument("labels is empty", field="labels", reason="EMPTY_BATCH")
        if len(labels) > MAX_LABELS_PER_REQUEST:
            raise errors.InvalidArgument(
                f"at most {MAX_LABELS_PER_REQUEST} labels per request", field="labels", reason="TOO_MANY_LABELS"
            )
        clean: list[LabelIn] = []
        for i, lb in enumerate(labels):
            v.item_id(lb.label_id, f"labels[{i}].label_id")
            v.item_id(lb.item_id, f"labels[{i}].item_id")
            ann = v.annotator_id(lb.annotator_id, f"labels[{i}].annotator_id")
            if lb.replaces:
                v.item_id(lb.replaces, f"labels[{i}].replaces_label_id")
            clean.append(dataclasses.replace(lb, annotator_id=ann))
        req_digest = digest(*(dataclasses.astuple(c) for c in clean))
        if request_id:
            v.item_id(request_id, "request_id")
        key = info.key
        rt = self.cache.runtime(key)
        # Everything from the replay check to the commit runs under the pool lock: a retry
        # that waits behind its original finds the original's record and replays it.
        async with rt.lock:
            if request_id:
                prior = await self.store.call(self.store.get_request, key, request_id)
                if prior is not None:
                    if prior.digest != req_digest:
                        raise errors.AlreadyExists(
                            "request_id was used before with different labels",
                            field="request_id",
                            reason="REQUEST_ID_CONFLICT",
                        )
                    body = json.loads(prior.response_json)
                    total = await self.store.call(self.store.label_count, key)
                    return IngestResult(0, body["stored_count"] + body["duplicate_count"], total)
            split_of = await self.store.call(self.store.item_splits, key, [c.item_id for c in clean])
            existing = await self.store.call(
                self.store.existing_labels, key, [c.label_id for c in clean] + [c.replaces for c in clean if c.replaces]
            )
            fresh: list[LabelIn] = []
            dup = 0
            seen: dict[str, LabelContent] = {}
            revised: set[str] = set()
            for i, c in enumerate(clean):
                if c.item_id not in split_of:
                    raise errors.NotFound(
                        f"labels[{i}].item_id {c.item_id!r} is not an item of pool {pool_id!r}; upload it first",
                        field=f"labels[{i}].item_id",
                        reason="ITEM_NOT_FOUND",
                    )
                if split_of.get(c.item_id) == int(Split.HELDOUT):
                    raise errors.InvalidArgument(
                        f"labels[{i}].item_id {c.item_id!r} is a held-out item; it is labelled at upload",
                        field=f"labels[{i}].item_id",
                        reason="HELDOUT_ITEM",
                    )
                content = LabelContent(c.item_id, c.preference, c.annotator_id, c.replaces)
                stored = existing.get(c.label_id)
                old = stored.content if stored is not None else seen.get(c.label_id)
                if old is not None:
                    if old == content:
                        dup += 1
                        continue
                    raise errors.AlreadyExists(
                        f"labels[{i}].label_id {c.label_id!r} exists with different content",
                        field=f"labels[{i}].label_id",
                        reason="LABEL_CONFLICT",
                        metadata={
                            "stored_item_id": old.item_id,
                            "stored_preference": Preference(old.preference).name,
                            "stored_annotator_id": old.annotator_id,
                            "stored_replaces_label_id": old.replaces,
                            # Where a client that revises an answer finds the latest revision.
                            "stored_superseded_by": stored.superseded_by if stored is not None else "",
                        },
                    )
                if c.replaces:
                    _check_revision(i, c, existing.get(c.replaces), revised)
                    head = await self._latest_revision(key, c.replaces, existing)
                    revised.add(head)
                    if existing[head].content.preference == c.preference:  # the answer stands: nothing to store
                        dup += 1
                        continue
                    c = dataclasses.replace(c, supersedes=head)
                seen[c.label_id] = content
                fresh.append(c)
            if fresh or request_id:
                # Durable (fsynced) before the reply, in a worker thread: the loop keeps serving.
                await settled(self.writes.submit(
                    LabelWrite(
                        pool_key=key,
                        labels=tuple(fresh),
                        labels_per_item=info.settings.labels_per_item,
                        request_id=request_id,
                        request_digest=req_digest,
                        response_json=json.dumps({"stored_count": len(fresh), "duplicate_count": dup}),
                    )
                ))
            if rt.occupancy is not None:
                for c in fresh:
                    if not rt.apply_label(rt.row_of.get(c.item_id), c.annotator_id):
                        break
        return IngestResult(len(fresh), dup, await self.store.call(self.store.label_count, key))

    async def _latest_revision(self, key: str, label_id: str, known: dict[str, ExistingLabel]) -> str:
        """The latest revision of the answer `label_id` belongs to (itself when never revised)."""
        head = label_id
        for _ in range(MAX_REVISIONS):
            by = known[head].superseded_by
            if not by:
                return head
            if by not in known:
                known.update(await self.store.call(self.store.existing_labels, key, [by]))
            head = by
        raise errors.FailedPrecondition(
            f"label {label_id!r} has more than {MAX_REVISIONS} revisions", field="labels.replaces_label_id",
            reason="TOO_MANY_REVISIONS",
        )

    async def export_labels(
        self, tenant: str, pool_id: str, page_size: int, page_token_in: str
    ) -> AsyncIterator[tuple[list[tuple[StoredLabel, dict[str, str]]], str]]:
        """Yield pages of (label, item texts) with the token that resumes after each page."""
        key = (await self.pools.require(tenant, pool_id)).key
        if page_size < 0 or page_size > MAX_EXPORT_LABELS_PAGE:
            raise errors.InvalidArgument(f"page_size must be in [0, {MAX_EXPORT_LABELS_PAGE}]", field="page_size")
        size = page_size or DEFAULT_EXPORT_LABELS_PAGE
        after = parse_page_token(page_token_in)
        while True:
            page = await self.store.call(self.store.labels_page, key, after, size)
            if not page:
                return
            texts = await self.store.call(self.store.item_texts, key, [lb.item_id for lb in page])
            after = page[-1].seq
            more = bool(await self.store.call(self.store.labels_page, key, after, 1))
            yield (
                [(lb, dataclasses.asdict(texts[lb.item_id])) for lb in page],
                page_token(after) if more else "",
            )
            if not more:
                return

    async def export_items(
        self,
        tenant: str,
        pool_id: str,
        page_size: int,
        page_token_in: str,
        *,
        include_features: bool = False,
        split: Split | None = None,
    ) -> AsyncIterator[tuple[list[ExportedItem], str]]:
        """Yield pages of the pool's items in upload (row) order, with the token that resumes after each.

        Args:
            tenant: The caller's tenant.
            pool_id: The tenant's pool.
            page_size: Items per page, 0..5000 (0: 500, or 100 with features).
            page_token_in: "" or a token from an earlier page of this export.
            include_features: Also read each featurised item's feature vectors (items
                still waiting for server features come without them).
            split: Only items of this split (None: every item).

        Raises:
            errors.InvalidArgument: page_size out of range, or a token this server did not issue.
            errors.NotFound: The tenant has no such pool.
        """
        info = await self.pools.require(tenant, pool_id)
        if page_size < 0 or page_size > MAX_EXPORT_ITEMS_PAGE:
            raise errors.InvalidArgument(
                f"page_size must be in [0, {MAX_EXPORT_ITEMS_PAGE}], got {page_size}",
                field="page_size",
                reason="OUT_OF_RANGE",
            )
        size = page_size or (DEFAULT_EXPORT_ITEMS_PAGE_WITH_FEATURES if include_features else DEFAULT_EXPORT_ITEMS_PAGE)
        from_row = parse_page_token(page_token_in)  # the first row not yet exported
        fs = self.cache.features(info) if include_features else None
        while True:
            # One row beyond the page says whether another page follows.
            page = await self.store.call(self.store.items_page, info.key, from_row, size + 1, split)
            more = len(page) > size
            page = page[:size]
            if not page:
                return
            from_row = page[-1].row + 1
            yield self._with_features(page, fs), page_token(from_row) if more else ""
            if not more:
                return

    @staticmethod
    def _with_features(page: list[ItemRecord], fs: FeatureStore | None) -> list[ExportedItem]:
        """The page's items, with the feature vectors of featurised items when `fs` is given."""
        if fs is None:
            return [ExportedItem(it) for it in page]
        done = [i for i, it in enumerate(page) if it.featurized]
        rows_R = np.array([page[i].row for i in done], dtype=np.int64)
        # float32 values on the wire whatever the pool stores (float16 -> float32 is exact)
        feats = {kind: fs.read_rows(kind, rows_R).astype(np.float32, copy=False) for kind in FEATURE_KINDS}
        out = [ExportedItem(it) for it in page]
        for j, i in enumerate(done):
            out[i] = ExportedItem(page[i], {kind: feats[kind][j] for kind in FEATURE_KINDS})
        return out
