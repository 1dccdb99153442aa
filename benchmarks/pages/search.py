"""Page ``search``: the per-layer search against single-method recipes of the same size (the
shipped chains: page ``search_chains``)."""

from __future__ import annotations

import sys
from typing import Any

import netshrink as ns
from benchmarks import harness as h

TITLE = "Search across methods against single-method recipes"
OUT = "benchmarks/search.md"
ABOUT = [
    "For each single-method recipe (one compressor, one setting for every layer, no "
    "fine-tune), `netshrink.search` runs with that recipe's artifact size as its budget, over "
    "the default option grids of every compressor that offers them (`magnitude`, `quantize`, "
    "`svd`, `tucker`, `bioclust` as plain k-means) and its default objective (the KL divergence "
    "from the reference's predictions), no fine-tune either; "
    "then the searched artifact is compared with the recipe's on the test split. The search "
    "scans once per model (each layer × option alone, on up to 512 validation images) and "
    "reuses the scan for every budget. Nothing here is random (magnitude, quantize, svd, "
    "plain k-means from its deterministic init, Tucker-2 from its SVD init, and the scan), so "
    "one run per row. Verdicts compare the 95% intervals: 'indistinguishable' when they "
    "overlap.",
]

MODELS = ("lenet5@shapes32", "vgg_small@shapes32", "regnetx_002@shapes32")
QUICK_MODELS = ("lenet300",)
SINGLE: dict[str, dict[str, Any]] = {
    "quantize 8-bit": {"compressor": "quantize", "config": {"bits": 8}},
    "quantize 4-bit": {"compressor": "quantize", "config": {"bits": 4}},
    "quantize 3-bit": {"compressor": "quantize", "config": {"bits": 3}},
    "quantize 2-bit": {"compressor": "quantize", "config": {"bits": 2}},
    "magnitude 75%": {"compressor": "magnitude", "config": {"sparsity": 0.75}},
    "magnitude 90%": {"compressor": "magnitude", "config": {"sparsity": 0.9}},
    "magnitude 95%": {"compressor": "magnitude", "config": {"sparsity": 0.95}},
}


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every single-method recipe the page compresses (the searches follow from them)."""
    models = QUICK_MODELS if quick else MODELS
    names = list(SINGLE)[1:3] if quick else list(SINGLE)
    return {f"{m} / {n}": (m, [SINGLE[n]]) for m in models for n in names}


def run(b: h.Bench) -> list[str]:
    """One table per model: recipe vs searched artifact at the recipe's size."""
    body: list[str] = []
    by_model = h.cases_by_model(cases(b.quick))
    for model_key in by_model:  # before the fresh cache below, which would retrain them
        h.reference(model_key)
    with h.fresh_cache(b.tmp):  # no scan checkpoint of an earlier run is reused
        for model_key, recipes in by_model.items():
            model, data = h.reference(model_key)
            n = len(data.test)
            table = None
            rows = []
            for name, steps in recipes:
                print(f"{model_key}: {name}", file=sys.stderr, flush=True)
                single = h.compress(model, steps, data)
                size = single.first.report.storage_bytes
                try:
                    found = ns.search(model, data, size, sensitivity=table)
                except ns.ConfigError as exc:  # a size the options cannot reach is a finding
                    rows.append([name, f"{size:,}", single.acc(), "not reachable", "", "",
                                 str(exc).split(": ", 1)[-1]])
                    continue
                table = found.sensitivity
                searched = found.result.report.accuracy_after
                rows.append([
                    name, f"{size:,}", single.acc(), f"{found.artifact_bytes:,}",
                    h.acc_cell([searched], n),
                    h.acc_compare([searched], single.accs, n),
                    "; ".join(f"{r['layer']}: {r['choice']}" for r in found.plan_rows()),
                ])
            body += [f"## {model_key} ({ns.model_info(model).spec}, {data.name})", ""]
            body += h.table(["single-method recipe", "its bytes", "its test acc [95% CI]",
                             "searched bytes", "searched test acc [95% CI]",
                             "searched vs recipe", "searched choice per layer"], rows)
    return body
