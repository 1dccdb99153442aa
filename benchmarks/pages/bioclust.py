"""Page ``bioclust`` (paper 000): k-means weight sharing + seeded perturbation + selection."""

from __future__ import annotations

import copy
from typing import Any

import torch

from benchmarks import harness as h

TITLE = "bioclust benchmark (paper 000)"
OUT = "benchmarks/bioclust.md"
SEEDS = 3
ABOUT = [
    "Candidates are selected on the validation split; accuracies are on the test split. Ratio "
    "= dense fp32 bytes / artifact bytes. The classifier head is included; biases and "
    "BatchNorm stay dense fp32. Three variants of each configuration, each run once per seed: "
    "**selection** (the population searched, the validation-best kept), **single random** "
    "(population 1, always perturbed: one random reconstruction per seed) and **plain "
    "k-means** (no perturbation).",
    "References (docs/datasets.md): `zoo:lenet5` and `zoo:vgg_small` (5 epochs) on shapes32, "
    "timm `mobilenetv3_small_100` on shapes64; every test split has n = 10,000.",
]


def _recipe(name: str) -> dict[str, Any]:
    return h.recipe_steps(name)[0]


def _variant(step: dict[str, Any], overrides: dict | None = None, **config: Any) -> dict[str, Any]:
    """``step`` with ``config`` changed (``overrides``: replaces the per-layer settings)."""
    out = copy.deepcopy(step)
    out["config"].update(config)
    if overrides is not None:
        out["overrides"] = overrides
    if config.get("noise_scale") == 0.0:  # plain k-means everywhere, overrides included
        out["overrides"] = {k: {**v, "noise_scale": 0.0} for k, v in out.get("overrides", {}).items()}
    return out


def configs(quick: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (model, bioclust step): the shipped LeNet-5 recipe and stress regimes on the
    shapes32/shapes64 references (quick: LeNet-5 on digits28, which checks the page only)."""
    lenet5 = _recipe("bioclust_lenet5.yaml")
    if quick:
        return {"lenet5 (recipe)": ("lenet5", lenet5)}
    everywhere = _variant(lenet5, {})  # 4 bits in every layer, no per-layer overrides
    return {"lenet5 (recipe)": ("lenet5@shapes32", lenet5),
            "lenet5, 2-bit everywhere (stress)": ("lenet5@shapes32", _variant(lenet5, {}, bits=2)),
            "vgg_small, 4-bit everywhere": ("vgg_small@shapes32", everywhere),
            "mobilenetv3_small_100, 4-bit everywhere": ("mobilenetv3_small_100@shapes64",
                                                        everywhere),
            "mobilenetv3_small_100, 6-bit everywhere": ("mobilenetv3_small_100@shapes64",
                                                        _variant(lenet5, {}, bits=6))}


def variants(step: dict[str, Any], quick: bool) -> dict[str, dict[str, Any]]:
    """The three variants of one configuration."""
    pop = 4 if quick else step["config"].get("population", 16)
    return {"selection": _variant(step, population=pop),
            "single random": _variant(step, population=1, keep_unperturbed=False),
            "plain k-means": _variant(step, population=1, noise_scale=0.0)}


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every compression of the page."""
    return {f"{name} / {v}": (model, [s]) for name, (model, step) in configs(quick).items()
            for v, s in variants(step, quick).items()}


def reload(result: h.ns.CompressionResult, data: h.ns.DataSplits, path: Any) -> tuple[bool, bool, float]:
    """Save, load: bit-exact state, same logits, test accuracy of the loaded model."""
    loaded = h.ns.load(result.save(path, report=False)).eval()
    expected = result.model.eval().state_dict()
    exact = all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    x = data.batch("test", 8)[0]
    with torch.no_grad():
        same = torch.equal(loaded(x), result.model(x))
    return exact, same, h.ns.accuracy(loaded, data)


def run(b: h.Bench) -> list[str]:
    """Compression and accuracy of each configuration; selection vs random vs plain k-means."""
    sizes, pops, answers = [], [], []
    for name, (model_name, step) in configs(b.quick).items():
        model, data = h.reference(model_name)
        runs = {v: h.compress(model, [s], data, b.seeds) for v, s in variants(step, b.quick).items()}
        sel, rnd, plain = runs["selection"], runs["single random"], runs["plain k-means"]
        rep, n = sel.first.report, sel.n
        exact, same, loaded_acc = reload(sel.first, data, b.tmp / "m.nsk")
        overrides = step.get("overrides", {})
        sizes.append([name, f"`bits {step['config'].get('bits', 4)}, overrides {overrides}`",
                      f"{rep.compression_ratio:.2f}x", f"{rep.storage_bytes:,}",
                      h.pct(rep.accuracy_before), sel.acc(), sel.delta(), h.pct(loaded_acc),
                      "yes" if exact and same else "**no**",
                      f"≥8x: {'**met**' if rep.compression_ratio >= 8 else '**missed**'}; "
                      f"≥ dense − 0.5 pp: {h.at_least(sel.accs, n, rep.accuracy_before - 0.005)}",
                      f"{sel.wall:.0f}"])
        s = rep.steps[0]
        pop = s["population"]
        pops.append([name, h.pct(s["val_acc_unperturbed"]),
                     f"{100 * pop['mean']:.2f} ± {100 * pop['std']:.2f} ({h.pct(pop['min'])} – "
                     f"{h.pct(pop['best'])})", s["chosen"], sel.acc(), rnd.acc(), plain.acc(),
                     f"{plain.first.report.compression_ratio:.2f}x"])
        answers.append(
            f"- **{name}**: selection vs a single random reconstruction: "
            f"{h.acc_compare(sel.accs, rnd.accs, n)}; selection vs plain k-means: "
            f"{h.acc_compare(sel.accs, plain.accs, n)}; a single random reconstruction vs plain "
            f"k-means: {h.acc_compare(rnd.accs, plain.accs, n)}.")
    return [
        "## 1. Compression and accuracy (selection)", "",
        *h.table(["case", "config", "ratio", "artifact bytes", "dense test", "test [95% CI]",
                  "Δ pp", "loaded test", "reload bit-exact, same logits", "targets",
                  "wall per seed (s)"], sizes),
        "## 2. Selection vs a single random reconstruction vs plain k-means", "",
        "Validation figures are seed 0's step summary: the unperturbed reconstruction and the "
        "population's candidates (mean ± std, min – best); *chosen* is what the step kept "
        "(`keep_unperturbed` keeps the plain reconstruction unless a candidate beats it on "
        "validation).", "",
        *h.table(["case", "plain val", "candidates val", "chosen", "selection test",
                  "single random test", "plain k-means test", "plain k-means ratio"], pops),
        "Answers (from the 95% intervals of the test accuracies above):", "", *answers,
    ]
