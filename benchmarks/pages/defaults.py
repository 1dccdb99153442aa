"""Page ``defaults``: every registered compressor with its default config on LeNet-5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import harness as h

TITLE = "Default configs on LeNet-5 / digits28"
OUT = "benchmarks/defaults.md"
BUDGET_S = 120
ABOUT = [
    "Each registered compressor runs with its default config and default selector (the head "
    "protected), without fine-tuning, one after another in one process. The goal this checks: "
    f"every default compresses `zoo:lenet5` on `digits28` in under {BUDGET_S // 60} minutes on "
    "2 CPU cores (longer searches are opt-in). The compressors are those `netshrink plugins "
    "--json` lists.",
]


def compressors() -> list[str]:
    """Registered compressor names, from the public CLI's JSON listing."""
    cli = Path(sys.executable).with_name("netshrink")
    out = subprocess.run([str(cli), "plugins", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return sorted({n for p in json.loads(out) for n in p["registered"].get("compressors", [])})


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """One default step per compressor."""
    return {name: ("lenet5", [{"compressor": name}]) for name in compressors()}


def run(b: h.Bench) -> list[str]:
    """The table: wall time against the budget, ratio, accuracy."""
    model, data = h.reference("lenet5")
    rows = []
    with h.fresh_cache(b.tmp):  # a cold start: no search checkpoint of an earlier run
        for name, (_, steps) in cases(b.quick).items():
            print(name, file=sys.stderr, flush=True)
            try:
                runs = h.compress(model, steps, data, b.seeds)
            except Exception as exc:  # a failing default is a finding, not a crash of the page
                rows.append([name, "-", f"failed: {type(exc).__name__}: {str(exc)[:120]}", "",
                             "", ""])
                continue
            rows.append([name, f"{runs.wall:.1f}", "yes" if runs.wall < BUDGET_S else "**no**",
                         f"{runs.first.report.compression_ratio:.2f}x", runs.acc(), runs.delta()])
    return h.table(["compressor", "wall per seed (s)", f"within {BUDGET_S} s", "ratio",
                    "test acc [95% CI]", "Δ acc (pp)"], rows)
