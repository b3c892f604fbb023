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


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a .jsonl or .jsonl.gz file, skipping blank lines."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{line_no}: not valid JSON: {e}") from e


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
    """
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
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


def demo_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic preference rows (shared format) for the README demo.

    The preferred response is the one that answers the prompt's topic helpfully;
    the rejected one is evasive, so the preference is learnable from text features.
    """
    rng = random.Random(seed)
    topics = [
        "python lists",
        "baking bread",
        "tax returns",
        "tomato plants",
        "bike repair",
        "sleep habits",
        "learning french",
        "saving money",
        "running shoes",
        "chess openings",
        "car batteries",
        "coffee",
    ]
    helpful = [
        "Here is a clear step-by-step answer about {t}: first, {x}; then check the result carefully.",
        "Good question about {t}. The key idea is {x}, and here is an example to make it concrete.",
        "For {t}, most experts recommend {x}. I can explain the reasons if you like.",
    ]
    unhelpful = [
        "I don't know anything about {t}.",
        "Why would you ask about {t}? Figure it out yourself.",
        "{t} is boring. Let's talk about something else.",
    ]
    tips = ["start small", "measure twice", "keep notes", "ask a specialist", "compare options", "be patient"]
    rows = []
    for i in range(n):
        t = rng.choice(topics)
        x = rng.choice(tips)
        prompt = f"\n\nHuman: Can you help me with {t}? Variant {rng.randint(0, 9999)}.\n\nAssistant:"
        rows.append(
            {
                "id": f"demo-{i}",
                "prompt": prompt,
                "chosen": " " + rng.choice(helpful).format(t=t, x=x),
                "rejected": " " + rng.choice(unhelpful).format(t=t),
            }
        )
    return rows
