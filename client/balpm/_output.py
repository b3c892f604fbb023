"""How the `balpm` CLI prints results: human-readable tables (`-o table`, the default) or JSON (`-o json`).

JSON is the proto3 JSON mapping of the reply (field names as in the .proto, every field present, 64-bit
integers as strings) and, for lists (`pools list`), one JSON array, so `balpm -o json ... | jq` works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from google.protobuf.json_format import MessageToDict

from balpm.v1 import balpm_pb2 as pb


def to_jsonable(value: Any) -> Any:
    """A reply (or a list / dict of replies) as JSON-ready data."""
    if hasattr(value, "DESCRIPTOR"):
        return MessageToDict(value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if isinstance(value, Mapping):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """JSON text of `value` (see `to_jsonable`)."""
    return json.dumps(to_jsonable(value), indent=indent, default=str)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return "" if value is None else str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: a header line, then one line per row; numbers right-aligned."""
    raw = [list(r) for r in rows]
    cells = [[_cell(v) for v in r] for r in raw]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in raw) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column `key  value` table."""
    rows = [(k, _cell(v)) for k, v in pairs]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)


def enum_name(enum: Any, number: int, prefix: str) -> str:
    """An enum value's name without its prefix ("STRATEGY_BALPM" -> "BALPM"); the number if unknown."""
    try:
        return str(enum.Name(number)).removeprefix(prefix)
    except ValueError:
        return str(number)


def timestamp(ts: Any) -> str:
    """A google.protobuf.Timestamp as "YYYY-MM-DD HH:MM:SSZ" ("" when unset)."""
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


POOL_COLUMNS = ("POOL", "STATE", "ITEMS", "HELDOUT", "FEATURIZED", "LABELS", "LEASED", "POSTERIOR", "FEATURES",
                "STRATEGY", "CREATED")


def pool_row(pool: pb.Pool) -> list[Any]:
    """One line of the `pools list` table."""
    s = pool.settings
    return [
        pool.pool_id,
        enum_name(pb.Pool.State, pool.state, "STATE_"),
        pool.item_count,
        pool.heldout_count,
        pool.featurized_count,
        pool.label_count,
        pool.leased_item_count,
        pool.posterior_version,
        enum_name(pb.FeatureSource, s.feature_source, "FEATURE_SOURCE_"),
        enum_name(pb.Strategy, s.default_strategy, "STRATEGY_"),
        timestamp(pool.create_time),
    ]


def pools_table(pools: Iterable[pb.Pool]) -> str:
    """The `pools list` table."""
    return table(POOL_COLUMNS, [pool_row(p) for p in pools])


def pause_text(pool: pb.Pool) -> str:
    """Why the pool's featurisation is paused, for people ("" when it is not)."""
    if not pool.HasField("featurization_pause"):
        return ""
    p = pool.featurization_pause
    return (
        f"{p.reason}: {p.message} (since {timestamp(p.paused_since)}, {p.attempts} failed "
        f"attempt{'s' if p.attempts != 1 else ''}, next at {timestamp(p.next_retry_time)})"
    )


def pool_details(pool: pb.Pool) -> str:
    """The `pools get` view: the pool's counters, then every setting."""
    pairs: list[tuple[str, Any]] = [
        ("pool", pool.pool_id),
        ("state", enum_name(pb.Pool.State, pool.state, "STATE_")),
        ("items", pool.item_count),
        ("held-out items", pool.heldout_count),
        ("featurised", f"{pool.featurized_count}/{pool.item_count + pool.heldout_count}"),
        *([("featurisation paused", pause_text(pool))] if pool.HasField("featurization_pause") else []),
        ("labels", pool.label_count),
        ("labelled items", pool.labelled_item_count),
        ("leased items", pool.leased_item_count),
        ("excluded items", pool.excluded_count),
        ("posterior version", pool.posterior_version),
        ("extractor", pool.extractor or "(client features)"),
        ("created", timestamp(pool.create_time)),
    ]
    settings = to_jsonable(pool.settings)
    for key in sorted(settings):
        value = settings[key]
        pairs.append((f"settings.{key}", ", ".join(map(str, value)) if isinstance(value, list) else value))
    return key_values(pairs)


def message_details(msg: Any, *, skip: Sequence[str] = ()) -> str:
    """Any reply as `key  value` lines (nested fields dotted)."""
    pairs: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            pairs.append((prefix, f"{len(value)} entries"))
        else:
            pairs.append((prefix, ", ".join(map(str, value)) if isinstance(value, list) else value))

    data = to_jsonable(msg)
    walk("", {k: v for k, v in data.items() if k not in skip})
    return key_values(pairs)


def batch_table(resp: pb.AcquireBatchResponse) -> str:
    """The `acquire` view: one line per item, then the batch's posterior version and lease expiry."""
    rows = [
        [a.rank, a.item.item_id, a.scores.total, a.scores.epistemic, a.scores.entropy, _clip(a.item.prompt, 50)]
        for a in resp.items
    ]
    head = table(("RANK", "ITEM", "TOTAL", "EPISTEMIC", "ENTROPY", "PROMPT"), rows)
    tail = (
        f"{len(resp.items)} items, strategy {enum_name(pb.Strategy, resp.strategy, 'STRATEGY_')}, posterior version "
        f"{resp.posterior_version}, leased until {timestamp(resp.lease_expire_time)}"
    )
    return f"{head}\n{tail}"


def predictions_table(resp: pb.PredictResponse) -> str:
    """The `predict` view."""
    rows = [[p.item_id, p.prob_a, p.epistemic, p.aleatoric] for p in resp.predictions]
    return table(("ITEM", "P(A)", "EPISTEMIC", "ALEATORIC"), rows) + f"\nposterior version {resp.posterior_version}"


def rounds_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The `simulate` view: one line per round of every run."""
    rows = [
        [r.get("strategy"), r.get("round"), r.get("labels"), r.get("test_log_likelihood"), r.get("test_accuracy"),
         r.get("test_ece"), r.get("distinct_prompts"), r.get("train_s")]
        for r in records
    ]
    return table(("STRATEGY", "ROUND", "LABELS", "TEST LL", "ACCURACY", "ECE", "PROMPTS", "TRAIN S"), rows)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def emit(output: str, value: Any, render: Callable[[], str]) -> None:
    """Print `value` as JSON (`output == "json"`) or as `render()`'s table."""
    print(dumps(value) if output == "json" else render())


__all__ = [
    "batch_table",
    "dumps",
    "emit",
    "key_values",
    "message_details",
    "pool_details",
    "pools_table",
    "predictions_table",
    "rounds_table",
    "table",
    "to_jsonable",
]


def learning_curve(resp: pb.GetLearningCurveResponse) -> str:
    """The `curve` view: the savings estimate, the stopping signal, then both curves."""
    sv, st = resp.savings, resp.stopping
    if sv.estimable:
        saving = (f"{100 * sv.labels_saved_share:.0f}% fewer labels than random (95% interval "
                  f"{100 * sv.labels_saved_share_low:.0f}% to {100 * sv.labels_saved_share_high:.0f}%): "
                  f"{sv.active_label_count:.0f} vs {sv.random_label_count} labels for held-out LL "
                  f"{sv.log_likelihood:.4f}")
    else:
        saving = sv.reason
    g = resp.gain
    if g.estimable:
        gain = (f"{g.gain:+.4f} nats per label over random at {g.label_count} labels (95% interval "
                f"{g.gain_low:+.4f} to {g.gain_high:+.4f})")
    else:
        gain = g.reason or "not computed yet"
    if st.estimable:
        advice = enum_name(pb.StoppingSignal.Recommendation, st.recommendation, "RECOMMENDATION_")
        stop = (f"{advice}: held-out LL {st.slope_per_1k_labels:+.4f} per 1,000 labels (95% interval "
                f"{st.slope_low:+.4f} to {st.slope_high:+.4f}; threshold {st.threshold_per_1k_labels:g})")
    else:
        stop = st.reason
    state = f"computing ({resp.fits_done}/{resp.fits_total} fits)" if resp.computing else "up to date"
    head = key_values([
        ("held-out LL gain", gain),
        ("savings", saving),
        ("stopping", stop),
        ("next batch information gain", f"{st.expected_information_gain:.3f} nats"),
        ("labels", f"{resp.label_count} ({resp.control_label_count} control)"),
        ("estimate", state + (f"; last computation failed: {resp.error}" if resp.error else "")),
    ])
    rows = [
        ["active" if p.posterior_version else "random", p.posterior_version or "-", p.label_count, p.eval_count,
         p.log_likelihood, p.log_likelihood_stderr, p.accuracy]
        for p in [*resp.active, *resp.random]
    ]
    if not rows:
        return head
    return head + "\n\n" + table(("LEARNER", "VERSION", "LABELS", "EVAL", "HELD-OUT LL", "STDERR", "ACCURACY"), rows)
