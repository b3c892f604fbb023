"""Learning curves of simulated runs (`balpm simulate --plot`); matplotlib from the `balpm[sim]` extra."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from balpm.errors import InvalidInputError, missing_dependency

METRICS = (("test_log_likelihood", "test log-likelihood (nats)"), ("test_accuracy", "test accuracy"))


def run_key(record: Mapping[str, Any]) -> str:
    """The legend label of a round record's run: strategy, plus seed and oracle when not the defaults."""
    label = str(record.get("strategy", "?"))
    if record.get("seed") not in (None, 0):
        label += f" seed {record['seed']}"
    if record.get("oracle") not in (None, "human"):
        label += f" ({record['oracle']})"
    if record.get("run"):
        label = f"{record['run']}: {label}"
    return label


def plot_learning_curves(records: Iterable[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Draw test log-likelihood and accuracy against the number of labels, one line per run.

    Args:
        records: Round records of `balpm.simulate.run_simulation` (or `balpm simulate --out` lines); runs
            are told apart by `run_key`.
        path: Image file to write (the format follows the suffix: .png, .svg, .pdf).
        title: Figure title.

    Returns:
        The path written.

    Raises:
        balpm.errors.MissingDependencyError: matplotlib is not installed.
        balpm.errors.InvalidInputError: No records.
    """
    runs: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        runs[run_key(rec)].append(rec)
    if not runs:
        raise InvalidInputError.local("no round records to plot", field="records")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4.2))
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        for name, recs in sorted(runs.items()):
            recs = sorted(recs, key=lambda r: (r.get("labels", 0), r.get("round", 0)))
            ax.plot([r.get("labels", 0) for r in recs], [r.get(metric) for r in recs], marker="o", label=name)
        ax.set_xlabel("labels")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise missing_dependency("matplotlib", "sim", "plotting learning curves (balpm simulate --plot)") from e
    return plt


def check_plotting() -> None:
    """Raise MissingDependencyError now if plotting will not work (before a long simulation)."""
    _pyplot()


__all__ = ["check_plotting", "plot_learning_curves", "run_key"]
