"""Pure request builders and response helpers shared by `balpm.Client` and `balpm.AsyncClient`.

Nothing here does I/O: these functions turn the SDK's plain arguments (dicts, enum names) into
balpm.v1 request messages and replies into the SDK's return values. Bad local input raises
`balpm.errors.InvalidInputError` naming the offending field, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from balpm.errors import CallCancelledError, InvalidInputError, from_status
from balpm.v1 import balpm_pb2 as pb

PREFERENCES = {"A": pb.PREFERENCE_A, "B": pb.PREFERENCE_B, "TIE": pb.PREFERENCE_TIE}
STRATEGIES = {name[len("STRATEGY_") :]: num for name, num in pb.Strategy.items() if name != "STRATEGY_UNSPECIFIED"}
SPLITS = {"POOL": pb.SPLIT_POOL, "HELDOUT": pb.SPLIT_HELDOUT}
_FEATURE_KEYS = ("prompt_features", "completion_a_features", "completion_b_features")
#: PoolSettings fields given by enum name, with the enum and its value prefix.
_SETTING_ENUMS: dict[str, tuple[Any, str]] = {
    "feature_source": (pb.FeatureSource, "FEATURE_SOURCE_"),
    "default_strategy": (pb.Strategy, "STRATEGY_"),
    "posterior_kind": (pb.PosteriorKind, "POSTERIOR_KIND_"),
    "knn_convention": (pb.KnnConvention, "KNN_CONVENTION_"),
    "feature_storage": (pb.FeatureStorage, "FEATURE_STORAGE_"),
}


def _bad(field: str, message: str) -> InvalidInputError:
    return InvalidInputError.local(f"{field}: {message}", reason="INVALID_INPUT", field=field)


def enum_number(enum: Any, prefix: str, value: str | int | None, field: str) -> int:
    """The number of an enum value given by name ("balpm", "BALPM", "STRATEGY_BALPM") or number (None -> 0).

    Raises:
        InvalidInputError: Unknown name.
    """
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad(field, f"expected a name or number, got {type(value).__name__}")
    if isinstance(value, int):
        return value
    key = prefix + value.strip().upper().removeprefix(prefix).replace("-", "_")
    known = [n for n in enum.keys() if not n.endswith("_UNSPECIFIED")]  # noqa: SIM118 (not a dict)
    if key not in known:
        names = [n[len(prefix) :] for n in known]
        raise _bad(field, f"unknown value {value!r}; choose from {', '.join(names)}")
    return int(enum.Value(key))


def strategy_number(strategy: str | int | None) -> int:
    """Map "BALPM"/"balpm"/"STRATEGY_BALPM" or an enum number to the Strategy enum number (None -> unset)."""
    return enum_number(pb.Strategy, "STRATEGY_", strategy, "strategy")


def preference_number(preference: str | int, field: str = "preference") -> int:
    """Map "A", "B", "TIE" (any case) to the Preference enum; numbers pass through (the server checks them)."""
    if isinstance(preference, int) and not isinstance(preference, bool):
        return preference
    key = str(preference).strip().upper()
    if key not in PREFERENCES:
        raise _bad(field, f"unknown preference {preference!r}; choose from A, B, TIE")
    return PREFERENCES[key]


def split_number(split: str | int | None) -> int:
    """Map "POOL"/"HELDOUT"/"SPLIT_HELDOUT" or a number to the Split enum (None -> every split)."""
    return enum_number(pb.Split, "SPLIT_", split, "split")


def item_message(item: Mapping[str, Any] | pb.Item, field: str = "item") -> pb.Item:
    """Build an Item from a dict with item_id, prompt, completion_a, completion_b and optional
    prompt_features / completion_a_features / completion_b_features / split / heldout_preference.

    Raises:
        InvalidInputError: The dict lacks item_id, a vector is not numbers, or a held-out item has
            no valid heldout_preference.
    """
    if isinstance(item, pb.Item):
        return item
    if not isinstance(item, Mapping):
        raise _bad(field, f"expected a dict or balpm.v1.Item, got {type(item).__name__}")
    if item.get("item_id") in (None, ""):
        raise _bad(f"{field}.item_id", "missing")
    try:
        msg = pb.Item(
            item_id=str(item["item_id"]),
            prompt=item.get("prompt", ""),
            completion_a=item.get("completion_a", ""),
            completion_b=item.get("completion_b", ""),
        )
    except (TypeError, ValueError) as e:
        raise _bad(field, f"prompt and completions must be strings ({e})") from e
    for key in _FEATURE_KEYS:
        if item.get(key) is not None:
            try:
                getattr(msg, key).extend([float(x) for x in item[key]])
            except (TypeError, ValueError) as e:
                raise _bad(f"{field}.{key}", f"must be a sequence of numbers ({e})") from e
    split = split_number(item.get("split")) if item.get("split") is not None else pb.SPLIT_UNSPECIFIED
    if split == pb.SPLIT_HELDOUT:
        msg.split = pb.SPLIT_HELDOUT
        if item.get("heldout_preference") is None:
            raise _bad(f"{field}.heldout_preference", "required for a HELDOUT item")
        msg.heldout_preference = preference_number(item["heldout_preference"], f"{field}.heldout_preference")  # type: ignore[assignment]
    elif split:
        msg.split = split  # type: ignore[assignment]
    return msg


def label_message(label: Mapping[str, Any] | pb.Label, field: str = "label") -> pb.Label:
    """Build a Label from a dict with label_id, item_id, preference ("A", "B", "TIE"), optional annotator_id
    and optional replaces_label_id (the stored label this one revises).

    Raises:
        InvalidInputError: A required key is missing or the preference is unknown.
    """
    if isinstance(label, pb.Label):
        return label
    if not isinstance(label, Mapping):
        raise _bad(field, f"expected a dict or balpm.v1.Label, got {type(label).__name__}")
    for key in ("label_id", "item_id", "preference"):
        if label.get(key) in (None, ""):
            raise _bad(f"{field}.{key}", "missing")
    return pb.Label(
        label_id=str(label["label_id"]),
        item_id=str(label["item_id"]),
        preference=preference_number(label["preference"], f"{field}.preference"),  # type: ignore[arg-type]
        annotator_id=str(label.get("annotator_id") or ""),
        replaces_label_id=str(label.get("replaces_label_id") or ""),
    )


def _message(cls: Any, field: str, fields: Mapping[str, Any]) -> Any:
    """`cls(**fields)`, with protobuf's TypeError/ValueError (unknown field, wrong type) as InvalidInputError."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise _bad(field, str(e)) from e


def pool_settings(settings: Mapping[str, Any]) -> pb.PoolSettings:
    """PoolSettings from keyword settings; enum fields may be names (feature_source="CLIENT")."""
    s = dict(settings)
    for key, (enum, prefix) in _SETTING_ENUMS.items():
        if key in s:
            s[key] = enum_number(enum, prefix, s[key], f"settings.{key}")
    return _message(pb.PoolSettings, "settings", s)  # type: ignore[no-any-return]


def create_pool_request(pool_id: str, settings: Mapping[str, Any]) -> pb.CreatePoolRequest:
    """CreatePool request."""
    return pb.CreatePoolRequest(pool_id=pool_id, settings=pool_settings(settings))


def ingest_labels_request(
    pool_id: str, labels: Iterable[Mapping[str, Any] | pb.Label], request_id: str = ""
) -> pb.IngestLabelsRequest:
    """IngestLabels request."""
    msgs = [label_message(lb, f"labels[{i}]") for i, lb in enumerate(labels)]
    return pb.IngestLabelsRequest(pool_id=pool_id, labels=msgs, request_id=request_id)


def update_item_scores_request(pool_id: str, scores: Mapping[str, Mapping[str, float]]) -> pb.UpdateItemScoresRequest:
    """UpdateItemScores request from item_id -> {logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b}."""
    return pb.UpdateItemScoresRequest(
        pool_id=pool_id,
        scores=[
            pb.ItemScores(item_id=iid, apl_scores=_message(pb.AplScores, f"scores[{iid!r}]", s))
            for iid, s in scores.items()
        ],
    )


def acquire_request(
    pool_id: str,
    *,
    batch_size: int,
    strategy: str | int | None,
    seed: int,
    lease_ttl_s: float,
    annotator_id: str,
    options: Mapping[str, float],
) -> pb.AcquireBatchRequest:
    """AcquireBatch request; options are StrategyOptions fields."""
    return _message(  # type: ignore[no-any-return]
        pb.AcquireBatchRequest,
        "options",
        {
            "pool_id": pool_id,
            "batch_size": batch_size,
            "strategy": strategy_number(strategy),
            "seed": seed,
            "lease_ttl_s": lease_ttl_s,
            "annotator_id": annotator_id,
            "options": _message(pb.StrategyOptions, "options", options),
        },
    )


def predict_request(
    pool_id: str, item_ids: Sequence[str], items: Iterable[Mapping[str, Any] | pb.Item]
) -> pb.PredictRequest:
    """Predict request for stored items (ids) or ad-hoc items."""
    return pb.PredictRequest(
        pool_id=pool_id, item_ids=list(item_ids), items=[item_message(it, f"items[{i}]") for i, it in enumerate(items)]
    )


def evaluate_request(pool_id: str, items: Iterable[tuple[Mapping[str, Any] | pb.Item, str]]) -> pb.EvaluateRequest:
    """Evaluate request on (item, preference) pairs (none: the pool's held-out split)."""
    return pb.EvaluateRequest(
        pool_id=pool_id,
        items=[
            pb.LabelledItem(
                item=item_message(it, f"items[{i}].item"),
                preference=preference_number(p, f"items[{i}].preference"),  # type: ignore[arg-type]
            )
            for i, (it, p) in enumerate(items)
        ],
    )


def export_items_request(
    pool_id: str, *, include_features: bool, split: str | int | None, page_size: int, page_token: str
) -> pb.ExportItemsRequest:
    """ExportItems request."""
    return pb.ExportItemsRequest(
        pool_id=pool_id,
        page_size=page_size,
        page_token=page_token,
        include_features=include_features,
        split=split_number(split),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class UploadSummary:
    """Totals of an upload."""

    accepted_count: int
    duplicate_count: int
    rejections: list[pb.Rejection]
    pool: pb.Pool


def upload_summary(resp: pb.UploadItemsResponse) -> UploadSummary:
    """The SDK's summary of an UploadItems reply."""
    return UploadSummary(resp.accepted_count, resp.duplicate_count, list(resp.rejections), resp.pool)


def _noop() -> None:
    return None


class UploadStream:
    """The request messages of one UploadItems call: the header, then chunks of `chunk_size` items.

    Items are converted lazily, chunk by chunk, so a large upload streams. The first exception while
    converting or iterating the caller's items (or in `progress`) is kept in `error` and `cancel` (set by
    the client to the call's cancel) is called, so the client raises that error rather than a
    cancelled call.
    """

    def __init__(
        self,
        pool_id: str,
        items: Iterable[Mapping[str, Any] | pb.Item],
        chunk_size: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        if chunk_size < 1:
            raise _bad("chunk_size", f"must be >= 1, got {chunk_size}")
        self.pool_id = pool_id
        self.error: Exception | None = None
        self.cancel: Callable[[], object] = _noop
        self._items = items
        self._chunk_size = chunk_size
        self._progress = progress

    def __iter__(self) -> Iterator[pb.UploadItemsRequest]:
        yield pb.UploadItemsRequest(header=pb.UploadHeader(pool_id=self.pool_id))
        try:
            chunk: list[pb.Item] = []
            sent = 0
            for i, it in enumerate(self._items):
                chunk.append(item_message(it, f"items[{i}]"))
                if len(chunk) >= self._chunk_size:
                    yield pb.UploadItemsRequest(chunk=pb.ItemChunk(items=chunk))
                    sent, chunk = sent + len(chunk), []
                    if self._progress is not None:
                        self._progress(sent)
            if chunk:
                yield pb.UploadItemsRequest(chunk=pb.ItemChunk(items=chunk))
                if self._progress is not None:
                    self._progress(sent + len(chunk))
        except Exception as e:  # the caller's iterable or callback: re-raised by the client
            self.error = e
            self.cancel()

    def outcome(self, resp: Any, error: Exception | None = None) -> Any:
        """The call's reply (None: it was cancelled), or the error to raise: first the one kept in `error`."""
        if self.error is not None:
            raise self.error
        if error is not None:
            raise error
        if resp is None:
            raise CallCancelledError.local("the upload was cancelled", reason="CANCELLED")
        return resp


def operation_outcome(op: pb.Operation) -> pb.Operation:
    """Return a succeeded operation; raise the error of a failed or cancelled one.

    Raises:
        balpm.errors.BalpmError: The subclass of the operation's error code, reason
            OPERATION_STATE_FAILED or OPERATION_STATE_CANCELLED (the error's own ErrorInfo reason in
            metadata["error_reason"]).
    """
    if op.state == pb.Operation.STATE_SUCCEEDED:
        return op
    raise from_status(op.error, reason="OPERATION_" + pb.Operation.State.Name(op.state))


__all__ = [
    "PREFERENCES",
    "SPLITS",
    "STRATEGIES",
    "UploadStream",
    "UploadSummary",
    "acquire_request",
    "create_pool_request",
    "enum_number",
    "evaluate_request",
    "export_items_request",
    "ingest_labels_request",
    "item_message",
    "label_message",
    "operation_outcome",
    "pool_settings",
    "predict_request",
    "preference_number",
    "split_number",
    "strategy_number",
    "update_item_scores_request",
    "upload_summary",
]
