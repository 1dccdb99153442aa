"""What ``netshrink search`` runs (:func:`run_command`; the command itself is wired by
:mod:`netshrink.cli`, through :mod:`netshrink.layer_search`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netshrink.errors import ConfigError
from netshrink.fileio import atomic_write
from netshrink.search_latency import parse_latency
from netshrink.search_pareto import pareto, pareto_table, plot_pareto
from netshrink.search_run import _ms, search
from netshrink.search_scan import scan


def run_command(
    model: str,
    data: str,
    budget: str,
    *,
    out_dir: str | Path = "out",
    max_drop: float | None = None,
    warn_drop: float | None = 5.0,
    max_macs: int | None = None,
    max_latency: float | str | None = None,
    methods: Sequence[str] | None = None,
    executor: str | None = None,
    workers: int | None = None,
    finetune_epochs: int = 0,
    val_limit: int = 512,
    seed: int = 0,
    pareto_budgets: Sequence[str] = (),
    verify: bool = True,
    objective: str = "kl",
    activation_cache_mb: int = 1024,
) -> list[str]:
    """What ``netshrink search MODEL --data D --budget B`` does: scan (checkpointed in the
    cache), search, write ``<stem>.nsk`` with its report, ``<stem>.search.yaml`` and
    ``<stem>.search.json`` under ``out_dir``, and with ``pareto_budgets`` also
    ``<stem>.pareto.md`` and ``<stem>.pareto.png`` (the PNG needs matplotlib); ``verify``,
    ``objective``, ``warn_drop`` and ``max_latency`` (batch 1) as in :func:`search`, and
    ``activation_cache_mb`` as in :func:`~netshrink.search_scan.scan`. Returns the lines to
    print."""
    finetune = {"epochs": finetune_epochs} if finetune_epochs > 0 else None
    if max_latency is not None:  # a bad value is refused before the scan, not after it
        parse_latency(max_latency, 1.0)
    table = scan(
        model, data, methods=methods, val_limit=val_limit, seed=seed, executor=executor,
        workers=workers, latency=max_latency is not None,
        activation_cache_mb=activation_cache_mb,
    )
    common: dict[str, Any] = {
        "max_drop": max_drop, "warn_drop": warn_drop, "max_macs": max_macs,
        "max_latency": max_latency, "finetune": finetune, "seed": seed, "sensitivity": table,
        "verify": verify, "objective": objective,
    }
    found = search(model, data, budget, **common)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.split(":", 1)[-1]) or "model"
    paths = found.save(out_dir, stem)
    lines = [f"{row['layer']}: {row['choice']} ({row['bytes']:,} bytes, KL {row['kl']:.6f}, "
             f"loss {row['delta_loss']:+})" for row in found.plan_rows()]
    lines.append(
        f"artifact {found.artifact_bytes:,} bytes (budget {found.budget_bytes:,}); validation "
        f"accuracy {100 * found.val_accuracy:.2f}% (reference "
        f"{100 * found.reference_val_accuracy:.2f}%)"
    )
    if found.latency is not None:
        timed = found.latency
        lines.append(
            f"latency {_ms(timed.measured)} per batch of {timed.batch}, packed runtime "
            f"(max_latency {_ms(timed.budget)}; predicted {_ms(timed.predicted)}; dense "
            f"{_ms(timed.dense)})"
        )
    lines += [f"note: {note}" for note in found.notes]
    lines.append(f"wrote {paths['artifact']}, {paths['recipe']}, {paths['table']}")
    if pareto_budgets:
        points = pareto(model, data, list(pareto_budgets), **common)
        md = atomic_write(Path(out_dir) / f"{stem}.pareto.md", pareto_table(points))
        lines.append(f"wrote {md}")
        try:
            lines.append(f"wrote {plot_pareto(points, Path(out_dir) / f'{stem}.pareto.png')}")
        except ConfigError as exc:
            lines.append(f"no Pareto plot: {exc}")
    return lines


__all__ = [
    "run_command",
]
