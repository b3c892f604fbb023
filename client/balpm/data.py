"""Reading preference files and turning them into items with hidden labels.

The shared format is JSON lines `{"id", "prompt", "chosen", "rejected"}` (optionally
gzipped). Items present the two responses as A/B in a seeded random order so that
position carries no information; the true preference stays with the caller.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balpm.errors import InvalidInputError


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a .jsonl or .jsonl.gz file, skipping blank lines.

    Raises:
        balpm.errors.InvalidInputError: The file cannot be read, or a line is not a JSON object
            (the message names the file and line).
    """
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _bad_file(f"{p}:{line_no}: not valid JSON: {e}") from e
                    if not isinstance(row, dict):
                        raise _bad_file(f"{p}:{line_no}: expected a JSON object, got {type(row).__name__}")
                    yield row
    except (OSError, UnicodeDecodeError, EOFError) as e:  # missing, unreadable, not gzip, not UTF-8
        raise _bad_file(f"cannot read {p}: {e}") from e


def _bad_file(message: str) -> InvalidInputError:
    return InvalidInputError.local(message, reason="BAD_FILE")


@dataclass(frozen=True)
class HiddenPair:
    """An item to upload and the preference an oracle would give."""

    item: dict[str, Any]
    preference: str  # "A", "B" or "TIE"


def safe_id(raw: Any, index: int) -> str:
    """An item id the server accepts ([A-Za-z0-9_.:-], at most 128 chars)."""
    text = "".join(ch if ch.isalnum() or ch in "_.:-" else "_" for ch in str(raw))[:128]
    return text or f"item-{index}"


def hide_preferences(rows: list[dict[str, Any]], seed: int, *, heldout: bool = False) -> list[HiddenPair]:
    """Turn chosen/rejected rows into A/B items in a seeded random order.

    Rows that already carry item_id/completion_a/completion_b (and optionally
    `preference`) are passed through.

    Raises:
        balpm.errors.InvalidInputError: A chosen/rejected row lacks prompt or rejected (rows[i].<key>).
    """
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        for key in ("prompt", "rejected") if "chosen" in row else ():
            if key not in row:
                raise InvalidInputError.local(
                    f"row {i} has 'chosen' but no {key!r} (the shared format is prompt, chosen, rejected)",
                    field=f"rows[{i}].{key}",
                )
        if "chosen" in row:
            chosen_first = rng.random() < 0.5
            a, b = (row["chosen"], row["rejected"]) if chosen_first else (row["rejected"], row["chosen"])
            pref = "TIE" if row["chosen"] == row["rejected"] else ("A" if chosen_first else "B")
            item = {
                "item_id": safe_id(row.get("id", i), i),
                "prompt": row["prompt"],
                "completion_a": a,
                "completion_b": b,
            }
        else:
            item = {k: row[k] for k in row if k != "preference"}
            item.setdefault("item_id", safe_id(row.get("id", i), i))
            pref = str(row.get("preference", "TIE")).upper()
        if heldout:
            item["split"] = "HELDOUT"
            item["heldout_preference"] = pref
        out.append(HiddenPair(item, pref))
    return out


def demo_rows(n: int, seed: int, *, label_noise: float = 0.2) -> list[dict[str, Any]]:
    """Synthetic preference rows (shared format) for the README demo.

    Annotators prefer the response that stays on the prompt's topic and gives a
    concrete tip; the other one drifts to another topic or stays vague. A fraction
    `label_noise` of the rows has its preference flipped, as real annotators disagree,
    so a model learns a real but imperfect curve.
    """
    rng = random.Random(seed)
    topics = ["python lists", "baking bread", "tax returns", "tomato plants", "bike repair", "sleep habits",
              "learning french", "saving money", "running shoes", "chess openings", "car batteries", "coffee"]
    tips = ["start small", "measure twice", "keep notes", "ask a specialist", "compare options", "be patient"]
    openers = ["Sure.", "Good question.", "Happy to help.", "Here is what I would do."]
    rows = []
    for i in range(n):
        t = rng.choice(topics)
        other = rng.choice([x for x in topics if x != t])
        prompt = f"\n\nHuman: Can you help me with {t}? Variant {rng.randint(0, 9999)}.\n\nAssistant:"
        good = f" {rng.choice(openers)} For {t}, {rng.choice(tips)} and check the result."
        bad = rng.choice([
            f" {rng.choice(openers)} For {other}, {rng.choice(tips)} and check the result.",
            f" {rng.choice(openers)} It depends on many things about {t}.",
        ])
        chosen, rejected = (bad, good) if rng.random() < label_noise else (good, bad)
        rows.append({"id": f"demo-{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
