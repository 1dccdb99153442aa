"""Page ``joint``: adaptive per-layer sparsity + bits against a uniform pattern and a
Deep-Compression-style baseline at the same file size."""

from __future__ import annotations

from typing import Any

from benchmarks import harness as h

TITLE = "Benchmark: `joint` (adaptive joint sparsity + bits)"
OUT = "benchmarks/joint.md"
SEEDS = 3  # rows with a fine-tune, a search or random init: mean ± std over seeds
DC_SPARSITIES = (0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995)
DC_BITS = 4
#: zoo model -> (target ratio, allowed loss in points, epochs full, epochs quick, extra config).
#: min_bits 3 on LeNet-5: with the default 2, ternary fc1 weights trained worse there. The full
#: run is on shapes32: 5 epochs (about 1.8 minutes per joint epoch of LeNet-5 here).
TARGETS = {"lenet5": (100, 1.0, 5, 1, {"min_bits": 3})}
#: The harness models of the full page (shapes32) and of the quick check (digits28).
FULL_MODELS, QUICK_MODELS = ["lenet5@shapes32"], ["lenet5"]
ABOUT = [
    "Sizes are the artifact (manifest, biases and every other tensor included). Every method "
    "gets the same training budget (epochs, lr 2e-3, batch 32, distillation from the dense "
    "model).",
    "",
    "- **joint (adaptive)**: per-layer sparsity and bits from the Gauss-Newton sensitivity + "
    "knapsack, trained jointly with masks and fake quantization.",
    "- **joint (uniform)**: the same training and export, one sparsity and bit-width for every "
    "layer (the best single pattern that fits the budget).",
    f"- **Deep-Compression-style**: `magnitude` (global, then fine-tune) + `quantize` "
    f"({DC_BITS}-bit, per tensor) at the smallest sparsity of {list(DC_SPARSITIES)} whose file "
    "fits the adaptive run's size (probed without fine-tuning: masks do not move).",
    "",
    "Anchor: Deep Compression reports 39x on LeNet-5/MNIST counting weights only; the ratios "
    "here count the whole file.",
    "",
    f"LeNet-5 runs on its shapes32 reference (test n = 10,000), "
    f"{TARGETS['lenet5'][2]} epochs each (10 in its digits28 setting). vgg_small "
    "is not on this page: on shapes32 an epoch of it takes about 7 minutes here, so its three "
    "methods at 3 epochs would take over an hour per seed.",
]


def _train(epochs: int) -> dict[str, Any]:
    return {"epochs": epochs, "lr": 2e-3, "batch_size": 32, "distill": True}


def _targets(model: str) -> tuple[int, float, int, int, dict[str, Any]]:
    """The :data:`TARGETS` row of a harness model (``lenet5@shapes32`` -> ``lenet5``)."""
    return TARGETS[model.split("@")[0]]


def _epochs(model: str, quick: bool) -> int:
    """Training epochs of every method on ``model``."""
    _, _, full, short, _ = _targets(model)
    return short if quick else full


def _joint(model: str, quick: bool, allocation: str) -> list[dict[str, Any]]:
    config = {"target_ratio": _targets(model)[0], "allocation": allocation,
              **_targets(model)[4], **_train(_epochs(model, quick))}
    return [{"compressor": "joint", "select": {"protect_head": False}, "config": config}]


def _dc(sparsity: float, epochs: int) -> list[dict[str, Any]]:
    select = {"protect_head": False}
    return [{"compressor": "magnitude", "select": select, "config": {"sparsity": sparsity,
             "scope": "global"}, **({"finetune": _train(epochs)} if epochs else {})},
            {"compressor": "quantize", "select": select,
             "config": {"bits": DC_BITS, "per_channel": False}}]


def models(quick: bool) -> list[str]:
    """The models of the page."""
    return QUICK_MODELS if quick else FULL_MODELS


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every compression of the page (the DC-style one at each probed sparsity)."""
    out = {}
    for m in models(quick):
        out |= {f"{m} / joint {a}": (m, _joint(m, quick, a)) for a in ("fisher", "uniform")}
        out |= {f"{m} / DC {s}": (m, _dc(s, 1)) for s in DC_SPARSITIES}
    return out


def _plot(axes: Any, runs: dict[str, h.Runs], dc_sparsity: dict[str, float], title: str) -> None:
    layers = [r.name for r in runs["joint (adaptive)"].first.records]
    series = [(label, {r.name: r.details for r in runs[label].first.records})
              for label in ("joint (adaptive)", "joint (uniform)")]
    series.append((f"Deep-Compression-style ({DC_BITS}-bit)",
                   {n: {"sparsity": dc_sparsity.get(n, 0.0), "bits": DC_BITS} for n in layers}))
    for k, (label, d) in enumerate(series):
        x = [i + (k - 1) * 0.27 for i in range(len(layers))]
        axes[0].bar(x, [100 * d[n]["sparsity"] for n in layers], 0.27, label=label)
        axes[1].bar(x, [d[n]["bits"] for n in layers], 0.27)
    axes[0].set(ylabel="sparsity (%)", title=title)
    axes[1].set(ylabel="weight bits")
    axes[1].set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)


def run(b: h.Bench) -> list[str]:
    """Per model: the three methods, the per-layer allocation, the verdicts."""
    lines: list[str] = []
    for m in models(b.quick):
        model, data = h.reference(m)
        ratio, tol, _, _, extra = _targets(m)
        epochs = _epochs(m, b.quick)
        # Each configuration is a saved row (b.runs): an interrupted run resumes.
        runs = {f"joint ({label})": b.runs(f"{m} / joint {a}", model, _joint(m, b.quick, a),
                                           data, b.seeds)
                for label, a in (("adaptive", "fisher"), ("uniform", "uniform"))}
        budget = runs["joint (adaptive)"].first.report.storage_bytes
        sparsity = next((s for s in DC_SPARSITIES if b.runs(f"{m} / DC probe {s}", model,
                                                            _dc(s, 0), data)
                         .first.report.storage_bytes <= budget), DC_SPARSITIES[-1])
        dc_label = f"Deep-Compression-style (sparsity {sparsity}, {DC_BITS}-bit)"
        runs[dc_label] = b.runs(f"{m} / DC {sparsity}", model, _dc(sparsity, epochs), data,
                                b.seeds)
        dc_sp = {r.name: r.details["sparsity"] for r in runs[dc_label].first.records
                 if r.method == "magnitude"}
        path, link = b.plot(f"joint_allocation_{m}.png")
        h.save_plot(lambda axes, runs=runs, dc_sp=dc_sp, m=m: _plot(axes, runs, dc_sp, m), path,
                    (8, 6.4), nrows=2)
        ad = runs["joint (adaptive)"]
        un = {r.name: r.details for r in runs["joint (uniform)"].first.records}
        rep = ad.first.report
        lines += [
            f"## {h.MODELS[m][0]} on {h.MODELS[m][1]} ({epochs} epoch(s) each)", "",
            f"Dense: {rep.dense_bytes:,} bytes fp32, test accuracy {h.pct(rep.accuracy_before)}. "
            f"Target: ≥ {ratio}x at ≤ {tol} points loss. Joint config: target_ratio {ratio}"
            + "".join(f", {k} {v}" for k, v in extra.items()) + ".", "",
            *h.table(["method", "file bytes", "ratio", "test acc [95% CI]", "Δ (pp)",
                      "wall per seed (s)"],
                     [[label, f"{r.first.report.storage_bytes:,}",
                       f"{r.first.report.compression_ratio:.1f}x", r.acc(), r.delta(),
                       f"{r.wall:.0f}"] for label, r in runs.items()]),
            f"Per-layer allocation: ![allocation]({link})", "",
            *h.table(["layer", "params", "adaptive sparsity", "adaptive bits", "adaptive bytes",
                      "uniform sparsity", "uniform bits", "DC-style sparsity"],
                     [[r.name, f"{r.params_before:,}", h.pct(r.details["sparsity"]),
                       r.details["bits"], f"{r.details['weight_bytes']:,}",
                       h.pct(un[r.name]["sparsity"]), un[r.name]["bits"],
                       h.pct(dc_sp.get(r.name, 0.0))] for r in ad.first.records]),
            "Verdicts:", "",
            f"- adaptive joint: {rep.compression_ratio:.1f}x (≥ {ratio}x: "
            f"{'**met**' if rep.compression_ratio >= ratio else '**missed**'}); accuracy ≥ dense "
            f"− {tol} pp: {h.at_least(ad.accs, ad.n, rep.accuracy_before - tol / 100)}.",
        ]
        for label, other in list(runs.items())[1:]:
            o = other.first.report
            lines.append(
                f"- vs {label} ({o.storage_bytes:,} B): adaptive is "
                f"{'no larger' if rep.storage_bytes <= o.storage_bytes else '**larger**'} "
                f"({rep.storage_bytes:,} B) and its accuracy is "
                f"{h.acc_compare(ad.accs, other.accs, ad.n)}.")
        lines.append("")
    return lines
