"""Rendering of a :class:`~netshrink.report.Report`: a rich table, plain text, and a PNG plot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from netshrink.fileio import atomic_write

if TYPE_CHECKING:
    from netshrink.report import Report


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def compact(n: float) -> str:
    """``431080 -> '431K'``, ``2300000 -> '2.3M'``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(report: Report) -> Group:
    """Per-layer table, totals, accuracy and latency as one rich renderable."""
    table = Table(
        title=f"netshrink report: {report.model}" + (f" on {report.data}" if report.data else ""),
        show_footer=True,
        header_style="bold",
    )
    columns = [
        ("layer", "TOTAL"),
        ("method", ""),
        ("stored as", ""),
        ("params", compact(report.params_before)),
        ("kept", compact(report.params_after)),
        ("non-zeros", compact(report.nonzeros)),
        (
            "sparsity",
            _pct(1 - report.nonzeros / report.params_before if report.params_before else 0),
        ),
        ("bits/w", f"{8 * report.storage_bytes / max(report.params_before, 1):.2f}"),
        ("stored", human_bytes(report.storage_bytes)),
        ("ratio", f"{report.compression_ratio:.1f}x"),
        ("MACs", f"{compact(report.macs_before)}→{compact(report.macs_after)}"),
    ]
    for i, (title, footer) in enumerate(columns):
        table.add_column(
            title, footer=footer, justify="left" if i < 3 else "right", overflow="fold"
        )
    for row in report.rows:
        meta = row.name.startswith("(header")
        if row.name.startswith("(other") and not row.storage_bytes:
            continue
        table.add_row(
            row.name,
            row.methods.replace(",", "+"),
            row.encoding,
            "" if meta else compact(row.params_before),
            "" if meta else compact(row.params_after),
            "" if meta else compact(row.nonzeros),
            "" if meta else _pct(row.sparsity),
            "" if meta else f"{row.bits_per_weight:.2f}",
            human_bytes(row.storage_bytes),
            "" if meta else f"{row.ratio:.1f}x",
            ""
            if meta or not row.macs_before
            else f"{compact(row.macs_before)}→{compact(row.macs_after)}",
        )
    lines = [
        f"dense fp32: {human_bytes(report.dense_bytes)} ({report.dense_bytes:,} B)  ->  "
        f"artifact: {human_bytes(report.storage_bytes)} ({report.storage_bytes:,} B), "
        f"ratio {report.compression_ratio:.2f}x"
    ]
    if report.accuracy_before is not None:
        delta = report.accuracy_delta or 0.0
        lines.append(
            f"test accuracy: {_pct(report.accuracy_before)} -> {_pct(report.accuracy_after)} "
            f"({100 * delta:+.2f} pp)"
        )
    if report.latency:
        parts = [
            f"{k}: {v['dense_ms']:.3f} -> {v['compressed_ms']:.3f} ms ({v['speedup']:.2f}x)"
            for k, v in report.latency.items()
        ]
        lines.append("latency (median, dense -> compressed): " + "; ".join(parts))
    lines.append(f"compression wall time: {report.wall_time_s:.1f} s")
    return Group(table, Text("\n".join(lines)))


def to_text(report: Report, width: int = 160) -> str:
    """The rendered report as plain text."""
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(render(report))
    return console.export_text()


def plot(report: Report, path: Path) -> Path:
    """Per-layer sparsity and stored bits per weight; size vs accuracy (dense vs compressed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if not r.name.startswith("(")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    names = [r.name for r in rows] or ["(none)"]
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [100 * r.sparsity for r in rows] or [0],
        width=0.4,
        label="sparsity (%)",
        color="tab:blue",
    )
    ax.set_ylabel("sparsity (% of original params not stored)")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.bar(
        [x + 0.2 for x in xs],
        [r.bits_per_weight for r in rows] or [0],
        width=0.4,
        label="bits per original weight",
        color="tab:orange",
    )
    ax2.set_ylabel("stored bits per original weight")
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    ax.set_title("per layer")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center",
              bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8)
    ax = axes[1]
    if report.accuracy_before is not None:
        ax.scatter(
            [report.dense_bytes / 1024], [100 * report.accuracy_before], label="dense fp32", s=60
        )
        ax.scatter(
            [report.storage_bytes / 1024],
            [100 * report.accuracy_after],
            label="compressed",
            s=60,
            marker="*",
        )
        ax.set_ylabel("test accuracy (%)")
    else:
        ax.bar(["dense", "compressed"], [report.dense_bytes / 1024, report.storage_bytes / 1024])
    ax.set_xscale("log") if report.accuracy_before is not None else None
    ax.set_xlabel("size (KiB, log)")
    ax.set_title(f"size vs accuracy ({report.compression_ratio:.1f}x)")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())
