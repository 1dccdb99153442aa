"""The Pareto front of a search: one shared scan, a search per budget, as a markdown table
and a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.data import DataSplits
from netshrink.datasets import load as load_data
from netshrink.errors import ConfigError
from netshrink.fileio import atomic_write
from netshrink.search_run import search
from netshrink.search_scan import scan


@dataclass
class ParetoPoint:
    """One budget's searched result."""

    budget: str
    budget_bytes: int
    artifact_bytes: int
    ratio: float
    val_accuracy: float
    test_accuracy: float | None


def pareto(
    model: nn.Module | str,
    data: DataSplits | str,
    budgets: Sequence[int | str],
    **kwargs: Any,
) -> list[ParetoPoint]:
    """Search at each of ``budgets`` with one shared scan (``kwargs`` as :func:`search`
    takes them, ``verify`` and ``max_latency`` included); the points sorted by size."""
    splits = load_data(data) if isinstance(data, str) else data
    scan_keys = ("methods", "select", "val_limit", "seed", "executor", "workers", "checkpoint",
                 "latency_batch")
    table = kwargs.pop("sensitivity", None) or scan(
        model, splits, latency=kwargs.get("max_latency") is not None,
        **{k: kwargs[k] for k in scan_keys if k in kwargs},
    )
    points = []
    for budget in budgets:
        found = search(model, data, budget, sensitivity=table, **kwargs)
        report = found.result.report
        points.append(
            ParetoPoint(
                str(budget), found.budget_bytes, found.artifact_bytes,
                round(report.compression_ratio, 3), found.val_accuracy, report.accuracy_after,
            )
        )
    return sorted(points, key=lambda p: p.artifact_bytes)


def pareto_table(points: Sequence[ParetoPoint]) -> str:
    """The points as a markdown table."""
    lines = [
        "| budget | budget bytes | artifact bytes | ratio | val accuracy | test accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        test = "-" if p.test_accuracy is None else f"{100 * p.test_accuracy:.2f}%"
        lines.append(
            f"| {p.budget} | {p.budget_bytes:,} | {p.artifact_bytes:,} | {p.ratio:.1f}x | "
            f"{100 * p.val_accuracy:.2f}% | {test} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """Draw validation accuracy against artifact bytes as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "drawing the Pareto front needs matplotlib (pip install matplotlib)"
        ) from None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p.artifact_bytes for p in points], [100 * p.val_accuracy for p in points], "o-")
    for p in points:
        ax.annotate(p.budget, (p.artifact_bytes, 100 * p.val_accuracy), fontsize=8)
    ax.set_xlabel("artifact bytes")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("netshrink search: Pareto front")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


__all__ = [
    "ParetoPoint",
    "pareto",
    "pareto_table",
    "plot_pareto",
]
