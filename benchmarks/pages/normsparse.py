"""Page ``normsparse`` (paper 001): parameters removed, accuracy and latency against magnitude
pruning at the same stored-parameter count; kernel-level sparsity on vgg_small; bad input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks import harness as h

TITLE = "normsparse benchmark (paper 001)"
OUT = "benchmarks/normsparse.md"
SEEDS = 3  # rows with a fine-tune, a search or random init: mean ± std over seeds
#: Config changes on shapes32: the L1 epochs capped (the recipe's 30 would take ~35 min per
#: method here) and ``val_tolerance`` 0.04 (at the recipe's 0.01 and the default 0.02 no L1
#: epoch is admissible on shapes32 and the step returns the model unpruned, docs/methods).
SHAPES = {"epochs": 6, "val_tolerance": 0.04}
ABOUT = [
    '"Removed" is 1 − stored parameters / dense parameters (stored parameters: the non-zeros '
    "the artifact holds, physically smaller tensors plus sparse values).",
    "LeNet-300-100 stays on digits28 (a smoke run: 360 test images; on shapes32 this MLP "
    "reaches only 65.5%, below the 85–95% band of docs/datasets.md). LeNet-5 and vgg_small "
    "run on their shapes32 references (test n = 10,000). There the LeNet-5 "
    f"steps run with `{SHAPES}`: the L1 phase capped (about a minute per epoch here, and "
    "magnitude pruning gets the same budget again) and a looser admissibility rule (at the "
    "recipe's `val_tolerance` 0.01 no L1 epoch qualifies on shapes32 and the model comes back "
    "unpruned).",
]
#: model -> (recipe, paper's claim, target share removed, quick L1 epochs, harness model,
#: config changes of the full run)
PAPER = {
    "lenet300": ("normsparse_lenet300.yaml", "LeNet-300-100 on MNIST, −85.4% parameters for "
                 "+0.09% error", 0.85, 15, "lenet300", {}),
    "lenet5": ("normsparse_lenet5_fc.yaml", "LeNet-5 FC layers only, −82.2% parameters, no "
               "error increase", 0.80, 10, "lenet5@shapes32", SHAPES),
}
#: One L1 epoch over the ramp (about 9 minutes of vgg_small on shapes32 here); any accuracy drop
#: admissible, since this section shows the kernel-level storage and its reload, not accuracy.
KERNELS = {"l1": 0.005, "lr_magnitude": 0.002, "epochs": 1, "warmup_epochs": 1,
           "val_tolerance": 1.0}
KERNEL_MODEL = "vgg_small@shapes32"


def _paper_steps(model: str, quick: bool) -> list[dict[str, Any]]:
    steps = h.recipe_steps(PAPER[model][0])
    if quick:  # fewer L1 epochs: the figures are then not the deliverable ones
        steps[0]["config"]["epochs"] = PAPER[model][3]
    else:
        steps[0]["config"].update(PAPER[model][5])
    return steps


def _model(model: str, quick: bool) -> str:
    """The harness model of a paper row (quick: LeNet-5 on digits28, which checks the page)."""
    return model if quick else PAPER[model][4]


def _magnitude(model: nn.Module, layers: list[str], nonzeros: int, epochs: int,
               lr: float) -> tuple[list[dict[str, Any]], float]:
    """Global magnitude pruning of ``layers`` to ``nonzeros`` stored parameters in the whole
    model, fine-tuned for ``epochs``: the steps and the sparsity of the selected weights."""
    selected = sum(model.get_submodule(n).weight.numel() for n in layers)
    sparsity = round(1 - (nonzeros - (h.params(model) - selected)) / selected, 6)
    return [{"compressor": "magnitude", "select": {"names": layers},
             "config": {"sparsity": sparsity, "scope": "global"},
             "finetune": {"epochs": epochs, "lr": lr}}], sparsity


def _all_layers(quick: bool) -> list[dict[str, Any]]:
    return [{"compressor": "normsparse", "config": {"epochs": 8} if quick else dict(SHAPES),
             "finetune": {"epochs": 3}}]


def _kernels() -> list[dict[str, Any]]:
    # No fine-tune: one epoch of the core fine-tune (fresh Adam at lr 1e-3) cost timm resnet18
    # 15 pp on digits32.
    return [{"compressor": "normsparse", "select": {"types": ["Conv2d"]}, "config": KERNELS}]


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """The compressions whose steps are known before the run (magnitude's sparsity follows
    normsparse's result)."""
    out = {f"{m} / paper": (_model(m, quick), _paper_steps(m, quick)) for m in PAPER}
    out["lenet5 / all layers"] = (_model("lenet5", quick), _all_layers(quick))
    if not quick:
        out[f"{KERNEL_MODEL} / convs"] = (KERNEL_MODEL, _kernels())
    return out


def paper(b: h.Bench, m: str) -> list[str]:
    """The paper's model: normsparse vs magnitude at the same stored-parameter count."""
    dense, data = h.reference(_model(m, b.quick))
    steps = _paper_steps(m, b.quick)
    changed = {k: steps[0]["config"][k] for k in (["epochs"] if b.quick else PAPER[m][5])}
    capped = f" (changed: `{changed}`)" if changed else ""
    ours = b.runs(f"{m} / normsparse", dense, steps, data, b.seeds)  # saved: a rerun resumes
    rep, s = ours.first.report, ours.first.report.steps[0]
    layers = [r.name for r in ours.first.records]
    ft = steps[0].get("finetune")
    budget = int(s["epochs_run"]) + (h.ns.FinetuneConfig(**ft).epochs if ft else 0)
    mag_steps, mag_sparsity = _magnitude(dense, layers, rep.nonzeros, budget,
                                         steps[0]["config"].get("lr", 1e-3))
    mag = b.runs(f"{m} / magnitude {mag_sparsity}", dense, mag_steps, data, b.seeds)
    lat = h.speedups(dense, {"normsparse": ours.first.model, "magnitude": mag.first.model},
                     data.batch("val", 1)[0])
    rows = [[label, r.acc(), r.delta(), f"{r.first.report.nonzeros:,}",
             h.pct(1 - r.first.report.nonzeros / rep.params_before),
             f"{r.first.report.storage_bytes:,}", f"{r.first.report.compression_ratio:.2f}x",
             lat[key][64], lat[key][1], f"{r.wall:.1f}"]
            for key, label, r in (("normsparse", "normsparse", ours), ("magnitude", "magnitude "
                                  f"(global, {h.pct(mag_sparsity)} of selected weights)", mag))]
    removed = 1 - rep.nonzeros / rep.params_before
    shapes = ", ".join(f"{n}: {tuple(ours.first.model.get_submodule(n).weight.shape)}"
                       for n in layers)
    fc = [n for n, mod in dense.named_modules() if isinstance(mod, nn.Linear)]
    fc_after = sum(h.params(ours.first.model.get_submodule(n)) for n in fc)
    fc_before = sum(h.params(dense.get_submodule(n)) for n in fc)
    return [
        f"## {m} / {data.name}", "", f"Paper: {PAPER[m][1]}.", "",
        f"Recipe `recipes/{PAPER[m][0]}`{capped}: "
        f"`{steps}`. normsparse ran {s['epochs_run']} L1 epochs (best: epoch {s['best_epoch']}), "
        f"so magnitude gets {budget} fine-tune epochs. Dense: {rep.params_before:,} parameters, "
        f"{rep.dense_bytes:,} bytes, test accuracy {h.pct(rep.accuracy_before)}.", "",
        *h.table(["method", "test acc [95% CI]", "Δ pp", "stored params", "removed",
                  "storage bytes", "ratio", "speedup b64", "speedup b1", "wall per seed (s)"],
                 rows),
        f"normsparse layer shapes after removal: {shapes}. FC parameters (head included): "
        f"{fc_before:,} → {fc_after:,} ({h.pct(1 - fc_after / fc_before)} removed).", "",
        f"**Verdict:** {h.pct(removed)} of parameters removed (target ≥ {h.pct(PAPER[m][2])}: "
        f"{'**met**' if removed >= PAPER[m][2] else '**missed**'}); accuracy ≥ dense − 0.5 pp: "
        f"{h.at_least(ours.accs, ours.n, rep.accuracy_before - 0.005)}; speedup at batch 64 "
        f"{lat['normsparse'][64]}. Against magnitude at the same stored-parameter count, "
        f"normsparse's accuracy is {h.acc_compare(ours.accs, mag.accs, ours.n)}, its artifact "
        f"{mag.first.report.storage_bytes / rep.storage_bytes:.2f}x smaller (no indices: its "
        "removal is structural).", "",
    ]


def all_layers(b: h.Bench) -> list[str]:
    """The default config on every LeNet-5 layer but the head: kernel slices and filters."""
    dense, data = h.reference(_model("lenet5", b.quick))
    result = h.compress(dense, _all_layers(b.quick), data).first
    rep = result.report
    rows = []
    for rec in result.records:
        d, enc = rec.details, result.encodings.get(f"{rec.name}.weight")
        rows.append([rec.name, f"{tuple(dense.get_submodule(rec.name).weight.shape)} → "
                     f"{tuple(result.model.get_submodule(rec.name).weight.shape)}",
                     f"{d['units_removed']:,} / {d['units']:,}",
                     d.get("filters_removed", d.get("neurons_removed")),
                     enc.describe() if enc is not None else "dense (smaller)"])
    return [
        f"## lenet5 / {data.name}, all layers but the head, default config"
        f"{'' if b.quick else ' but ' + str(SHAPES)}", "",
        f"Steps `{_all_layers(b.quick)}`: conv kernel slices stored sparse, empty filters and dead "
        "neurons removed physically.", "",
        *h.table(["layer", "weight shape before → after", "units removed", "removed "
                  "physically", "stored as"], rows),
        f"Stored parameters {rep.params_before:,} → {rep.nonzeros:,} "
        f"({h.pct(1 - rep.nonzeros / rep.params_before)} removed), {rep.storage_bytes:,} bytes "
        f"({rep.compression_ratio:.2f}x); test accuracy {h.pct(rep.accuracy_before)} → "
        f"{h.pct(rep.accuracy_after)}.", "",
    ]


def kernels(b: h.Bench) -> list[str]:
    """Kernel-level sparsity on the convs of a CNN: slices, filters, reload."""
    dense, data = h.reference(KERNEL_MODEL)
    runs = h.compress(dense, _kernels(), data)
    result, rep = runs.first, runs.first.report
    loaded = h.ns.load(result.save(b.tmp / "kernels.nsk", report=False)).eval()
    x = data.batch("test", 32)[0]
    with torch.no_grad():
        diff = float((loaded(x) - result.model.eval()(x)).abs().max())
    sparse = [e for e in result.encodings.values() if isinstance(e, h.ns.Sparse)]
    convs = [r.details for r in result.records if r.details.get("kind") == "conv"]
    units, removed = sum(d["units"] for d in convs), sum(d["units_removed"] for d in convs)
    return [
        f"## {h.MODELS[KERNEL_MODEL][0]} on {data.name}, the convs", "",
        f"Step `{_kernels()}`, no fine-tune.", "",
        *h.table(["figure", "value"], [
            ["conv kernel slices removed", f"{removed:,} / {units:,} ({h.pct(removed / units)})"],
            ["conv filters removed physically", sum(d["filters_removed"] for d in convs)],
            ["conv weights stored sparse", f"{len(sparse)} of {len(convs)}"],
            ["stored parameters", f"{rep.params_before:,} → {rep.nonzeros:,}"],
            ["artifact bytes", f"{rep.storage_bytes:,} ({rep.compression_ratio:.2f}x)"],
            ["test accuracy dense → compressed → reloaded", f"{h.pct(rep.accuracy_before)} → "
             f"{runs.acc()} → {h.pct(h.ns.accuracy(loaded, data))}"],
            ["max output difference, reloaded vs in memory", f"{diff:.2e}"],
            ["compression wall time", f"{runs.wall:.0f} s"]]),
    ]


def bad_input() -> list[str]:
    """The errors a user sees."""
    lenet, data = h.reference("lenet300")
    cases = {
        "negative L1 weight": (lenet, {"compressor": "normsparse", "config": {"l1": -0.01}}),
        "threshold ≥ 1": (lenet, {"compressor": "normsparse", "config": {"threshold": 1.0}}),
        "no Linear/Conv layer selected": (nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(10),
                                                        nn.LayerNorm(10)),
                                          {"compressor": "normsparse"}),
        "only the classifier head selected": (lenet, {"compressor": "normsparse", "select": {
            "names": ["fc3"], "protect_head": False}}),
    }
    rows = []
    for label, (model, step) in cases.items():
        try:
            h.ns.compress(model, [step], data=data)
            rows.append([label, "NO ERROR (bug)"])
        except h.ns.NetshrinkError as exc:
            rows.append([label, f"`{type(exc).__name__}`: {str(exc).splitlines()[0]}"])
    return ["## Bad input", "", *h.table(["input", "error"], rows)]


def run(b: h.Bench) -> list[str]:
    """The page's sections in order."""
    return [*paper(b, "lenet300"), *paper(b, "lenet5"), *all_layers(b),
            *([] if b.quick else kernels(b)), *bad_input()]
