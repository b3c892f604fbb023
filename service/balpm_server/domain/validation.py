"""Request validation shared by every entry point; raises `errors.InvalidArgument` naming the field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from balpm_server import errors
from balpm_server.domain.models import AplScores

POOL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")
ITEM_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
ANNOTATOR_RE = re.compile(r"[A-Za-z0-9_.:@\-]{1,128}")
MAX_TEXT_CHARS = 100_000
MAX_FEATURE_DIM = 65_536
# Largest |value| of a client feature. Real embeddings stay far below it (even LLM
# "massive activations" are ~1e4); it keeps every squared distance of the kNN graph
# (at most MAX_FEATURE_DIM * (2 * MAX_ABS_FEATURE)^2 ~ 3e17) finite in float32.
MAX_ABS_FEATURE = 1e6
# Largest |value| of a client feature of a FEATURE_STORAGE_FLOAT16 pool: float16's largest
# finite value (anything larger would be stored as inf).
MAX_ABS_FEATURE_FLOAT16 = 65504.0


def pool_id(value: str, field: str = "pool_id") -> str:
    """Check a pool id: 1-63 chars of [A-Za-z0-9_.-], starting with a letter or digit."""
    if not value:
        raise errors.InvalidArgument(f"{field} is required", field=field, reason="MISSING_FIELD")
    if not POOL_ID_RE.fullmatch(value):
        raise errors.InvalidArgument(
            f"{field} must be 1-63 characters of [A-Za-z0-9_.-] starting with a letter or digit",
            field=field,
            reason="INVALID_ID",
        )
    return value


def item_id(value: str, field: str) -> str:
    """Check an item or label id: 1-128 chars of [A-Za-z0-9_.:-]."""
    if not value:
        raise errors.InvalidArgument(f"{field} is required", field=field, reason="MISSING_FIELD")
    if not ITEM_ID_RE.fullmatch(value):
        raise errors.InvalidArgument(
            f"{field} must be 1-128 characters of [A-Za-z0-9_.:-]", field=field, reason="INVALID_ID"
        )
    return value


def annotator_id(value: str, field: str) -> str:
    """Check an annotator id; "" becomes "anonymous"."""
    if not value:
        return "anonymous"
    if not ANNOTATOR_RE.fullmatch(value):
        raise errors.InvalidArgument(
            f"{field} must be 1-128 characters of [A-Za-z0-9_.:@-]", field=field, reason="INVALID_ID"
        )
    return value


def text(value: str, field: str) -> str:
    """Check a text field's length and that it is valid Unicode without NUL bytes."""
    if len(value) > MAX_TEXT_CHARS:
        raise errors.InvalidArgument(
            f"{field} has {len(value)} characters, more than the limit {MAX_TEXT_CHARS}",
            field=field,
            reason="TOO_LONG",
        )
    if "\x00" in value:
        raise errors.InvalidArgument(f"{field} contains a NUL character", field=field, reason="INVALID_TEXT")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise errors.InvalidArgument(f"{field} is not valid UTF-8", field=field, reason="INVALID_TEXT") from e
    return value


def features(values: Sequence[float], dim: int, field: str, *, float16: bool = False) -> np.ndarray:
    """Check a feature vector's length, finiteness and range.

    Args:
        values: The vector as sent.
        dim: The pool's feature dimension.
        field: The field named in errors.
        float16: The pool stores float16 features: magnitudes up to `MAX_ABS_FEATURE_FLOAT16`
            (else up to `MAX_ABS_FEATURE`).

    Returns:
        float32 `[D]` (a float16 pool rounds it when storing it).

    Raises:
        errors.InvalidArgument: Wrong length (WRONG_DIMENSION), NaN or infinity (NOT_FINITE),
            a value beyond the bound (FEATURE_OUT_OF_RANGE).
    """
    if len(values) != dim:
        raise errors.InvalidArgument(
            f"{field} has {len(values)} values, expected feature_dim={dim}",
            field=field,
            reason="WRONG_DIMENSION",
        )
    vec_D = np.asarray(values, dtype=np.float64)
    if not np.isfinite(vec_D).all():
        raise errors.InvalidArgument(f"{field} contains NaN or infinity", field=field, reason="NOT_FINITE")
    bound = MAX_ABS_FEATURE_FLOAT16 if float16 else MAX_ABS_FEATURE
    if vec_D.size and float(np.abs(vec_D).max()) > bound:
        why = " (the pool stores float16 features: FEATURE_STORAGE_FLOAT16)" if float16 else ""
        raise errors.InvalidArgument(
            f"{field} has a value of magnitude {float(np.abs(vec_D).max()):.6g}; feature values must lie in "
            f"[-{bound:g}, {bound:g}]{why}",
            field=field,
            reason="FEATURE_OUT_OF_RANGE",
        )
    return vec_D.astype(np.float32)


def finite(value: float, field: str, *, low: float | None = None, low_open: bool = False) -> float:
    """Check a scalar is finite and above a bound."""
    if not math.isfinite(value):
        raise errors.InvalidArgument(f"{field} must be finite, got {value}", field=field, reason="NOT_FINITE")
    if low is not None and (value < low or (low_open and value == low)):
        op = ">" if low_open else ">="
        raise errors.InvalidArgument(f"{field} must be {op} {low}, got {value}", field=field, reason="OUT_OF_RANGE")
    return value


def apl_scores(scores: AplScores, field: str) -> AplScores:
    """Check APL scores: finite log-probabilities, a finite non-negative predictive entropy if given."""
    for name in ("logp_policy_a", "logp_policy_b", "logp_ref_a", "logp_ref_b"):
        finite(getattr(scores, name), f"{field}.{name}")
    if scores.predictive_entropy is not None:
        finite(scores.predictive_entropy, f"{field}.predictive_entropy", low=0.0)
    return scores


def int_range(value: int, field: str, low: int, high: int) -> int:
    """Check an integer lies in [low, high]."""
    if not low <= value <= high:
        raise errors.InvalidArgument(
            f"{field} must be in [{low}, {high}], got {value}", field=field, reason="OUT_OF_RANGE"
        )
    return value
