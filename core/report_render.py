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
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from netshrink.report import LayerRow, Report


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
    lines.extend(accuracy_lines(report))
    lines.extend(finetune_lines(report))
    lines.extend(latency_lines(report))
    if report.resident_bytes_dense is not None and report.resident_bytes_packed is not None:
        dense, packed = report.resident_bytes_dense, report.resident_bytes_packed
        lines.append(
            f"in memory once loaded: dense decode {human_bytes(dense)}, packed runtime "
            f"{human_bytes(packed)} (netshrink.load(path, runtime='packed'))"
        )
    lines.append(f"compression wall time: {report.wall_time_s:.1f} s")
    return Group(table, Text("\n".join(lines)))


def _interval(bounds: tuple[float, float] | None) -> str:
    return "?" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}"


def accuracy_lines(report: Report) -> list[str]:
    """Test accuracy before -> after with ``n`` and 95% Wilson intervals, and the paired
    verdict (McNemar) with the discordant counts it rests on."""
    if report.accuracy_before is None or report.accuracy_after is None:
        return []
    head = f"test accuracy: {report.accuracy_before:.4f} -> {report.accuracy_after:.4f}"
    if not report.n_test:
        delta = report.accuracy_delta or 0.0
        return [f"{head} ({100 * delta:+.2f} pp; n not recorded: no interval)"]
    lines = [
        f"{head} (n={report.n_test:,}; 95% CI {_interval(report.accuracy_interval('before'))}"
        f" -> {_interval(report.accuracy_interval('after'))})"
    ]
    verdict, p = report.accuracy_verdict, report.accuracy_p_value
    if verdict is not None and p is not None:
        lines.append(
            f"after vs before: {verdict} (paired McNemar mid-p = {p:.3g}; "
            f"{report.only_before_correct:,} test images right only before, "
            f"{report.only_after_correct:,} right only after)"
        )
    return lines


def finetune_lines(report: Report) -> list[str]:
    """Per step fine-tuned: the epoch whose weights were kept and their validation accuracy,
    and, when no epoch beat the step's own weights, that the fine-tune changed nothing."""
    lines = []
    for step in report.steps:
        best, epochs = step.get("finetune_best_epoch"), step.get("finetune_epochs")
        if not isinstance(best, int) or not isinstance(epochs, int):
            continue  # not fine-tuned, or a report written before these fields
        val, start = step.get("finetune_best_val_acc"), step.get("finetune_start_val_acc")
        acc = f"{val:.4f}" if isinstance(val, float) else "?"
        name = f"step {step.get('step')} ({step.get('compressor')}) fine-tune"
        if best == 0:
            lines.append(
                f"{name}: no epoch of {epochs} beat the step's own weights on validation "
                f"({acc}); they were kept, so the fine-tune changed nothing"
            )
        else:
            gain = f", from {start:.4f} before it" if isinstance(start, float) else ""
            lines.append(f"{name}: kept epoch {best}/{epochs}, validation accuracy {acc}{gain}")
    return lines


def latency_lines(report: Report) -> list[str]:
    """Per batch size: dense -> compressed median (IQR) and what the ratio's spread supports."""
    if not report.latency:
        return []
    verdicts = report.latency_verdicts()
    lines = ["latency (median, dense -> compressed; speedup = dense / compressed):"]
    for key, fig in report.latency.items():
        times = f"{fig.get('dense_ms', float('nan')):.3f} -> "
        times += f"{fig.get('compressed_ms', float('nan')):.3f} ms"
        if "dense_iqr_ms" in fig and "compressed_iqr_ms" in fig:
            times = (
                f"{fig['dense_ms']:.3f} (IQR {fig['dense_iqr_ms']:.3f}) -> "
                f"{fig['compressed_ms']:.3f} (IQR {fig['compressed_iqr_ms']:.3f}) ms"
            )
        lines.append(f"  {key}: {times}: {verdicts[key]}")
    return lines


def to_text(report: Report, width: int = 160) -> str:
    """The rendered report as plain text."""
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(render(report))
    return console.export_text()


def figure(report: Report) -> Figure:
    """The report's matplotlib figure: per-layer sparsity and stored bits per weight (left);
    size vs test accuracy, or size alone without data (right). Legends only label what is
    drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]}
    )
    _per_layer(left, [r for r in report.rows if not r.name.startswith("(")])
    _size_panel(right, report)
    fig.tight_layout()
    return fig


def _per_layer(ax: Axes, rows: list[LayerRow]) -> None:
    ax.set_title("per layer")
    if not rows:
        ax.text(0.5, 0.5, "no compressed layers", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r.sparsity for r in rows], width=0.4,
           label="sparsity (%)", color="tab:blue")
    ax.set_ylabel("sparsity (% of original params not stored)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("compressed layer")
    ax.set_xticks(list(xs), [r.name for r in rows], rotation=45, ha="right", fontsize=8)
    twin = ax.twinx()
    twin.bar([x + 0.2 for x in xs], [r.bits_per_weight for r in rows], width=0.4,
             label="stored bits per original weight", color="tab:orange")
    twin.set_ylabel("stored bits per original weight")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center",
              bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8)


def _size_panel(ax: Axes, report: Report) -> None:
    dense_kib, stored_kib = report.dense_bytes / 1024, report.storage_bytes / 1024
    if report.accuracy_before is None or report.accuracy_after is None:
        ax.bar(["dense fp32", "artifact"], [dense_kib, stored_kib], color=["tab:gray", "tab:green"])
        ax.set_ylabel("size (KiB)")
        ax.set_title(f"size ({report.compression_ratio:.1f}x smaller; no test data)")
        return
    for kib, acc, which, label, marker in (
        (dense_kib, report.accuracy_before, "before", "dense fp32", "o"),
        (stored_kib, report.accuracy_after, "after", "compressed", "*"),
    ):
        bounds = report.accuracy_interval(which)
        yerr = None if bounds is None else [[100 * (acc - bounds[0])], [100 * (bounds[1] - acc)]]
        ax.errorbar([kib], [100 * acc], yerr=yerr, fmt=marker, markersize=8, capsize=4,
                    label=label + ("" if bounds is None else " (95% CI)"))
    ax.set_xscale("log")
    ax.margins(x=0.25)  # keep both points (and their intervals) off the frame
    ax.set_xlabel("size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"size vs accuracy ({report.compression_ratio:.1f}x)")
    ax.legend()


def plot(report: Report, path: Path) -> Path:
    """Draw :func:`figure` to a PNG at ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write(path, buffer.getvalue())
