"""Page ``defaults``: every registered compressor with its default config on LeNet-5 trained on
the hard dataset (shapes32)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import harness as h

TITLE = "Default configs on shapes32"
OUT = "benchmarks/defaults.md"
SEEDS = 3  # rows with a fine-tune, a search or random init: mean ± std over seeds
BUDGET_S = 120
#: Only LeNet-5: the defaults of joint (10 epochs) and normsparse (up to 20) train on all of
#: shapes32, about 12 and 20 minutes on LeNet-5 and several hours on vgg_small on 2 cores.
MODELS = ("lenet5@shapes32",)
QUICK_MODELS = ("lenet5",)
ABOUT = [
    "Each registered compressor runs with its default config and default selector (the head "
    "protected), without fine-tuning, one after another in one process, on each model's "
    "cached reference. The goal this checks: every default compresses `zoo:lenet5` in under "
    f"{BUDGET_S // 60} minutes on 2 CPU cores (longer searches are opt-in). The compressors "
    "are those `netshrink plugins --json` lists. "
    "Nothing is fine-tuned, so the accuracy column is what each default costs before any "
    "training; the verdict compares each row's 95% interval with the dense model's.",
]


def compressors() -> list[str]:
    """Registered compressor names, from the public CLI's JSON listing."""
    cli = Path(sys.executable).with_name("netshrink")
    out = subprocess.run([str(cli), "plugins", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return sorted({n for p in json.loads(out) for n in p["registered"].get("compressors", [])})


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """One default step per compressor and model."""
    return {f"{m} / {name}": (m, [{"compressor": name}])
            for m in (QUICK_MODELS if quick else MODELS) for name in compressors()}


def row(name: str, model: Any, steps: list[dict[str, Any]], data: Any, seeds: int,
        dense: float) -> dict[str, Any]:
    """One compressor's table cells (a saved :meth:`Bench.row`: a rerun at the same commit
    resumes); a failing default is a row with its error, measured again by a rerun."""
    try:
        runs = h.compress(model, steps, data, seeds)
    except Exception as exc:  # a failing default is a finding, not a crash
        error = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        return {"cells": [name, "-", error, "", "", "", ""], "error": error}
    return {"cells": [name, f"{runs.wall:.1f}", "yes" if runs.wall < BUDGET_S else "**no**",
                      f"{runs.first.report.compression_ratio:.2f}x", runs.acc(), runs.delta(),
                      h.acc_compare(runs.accs, [dense], runs.n)]}


def run(b: h.Bench) -> list[str]:
    """One table per model: wall time against the budget, ratio, accuracy against dense."""
    by_model = h.cases_by_model(cases(b.quick))
    for model_key in by_model:  # before the fresh cache below, which would retrain them
        h.reference(model_key)
    body: list[str] = []
    with h.fresh_cache(b.tmp):  # a cold start: no search checkpoint of an earlier run
        for model_key, steps_by_name in by_model.items():
            model, data = h.reference(model_key)
            dense = h.ns.accuracy(model, data)
            rows = [["dense", "-", "-", "1.00x", h.acc_cell([dense], len(data.test)), "", ""]]
            for name, steps in steps_by_name:
                print(f"{model_key}: {name}", file=sys.stderr, flush=True)
                rows.append(b.row(f"{model_key} / {name}", functools.partial(
                    row, name, model, steps, data, b.seeds, dense))["cells"])
            body += [f"## {model_key} ({h.ns.model_info(model).spec}, {data.name})", ""]
            body += h.table(["compressor", "wall per seed (s)", f"within {BUDGET_S} s", "ratio",
                             "test acc [95% CI]", "Δ acc (pp)", "vs dense"], rows)
    return body
