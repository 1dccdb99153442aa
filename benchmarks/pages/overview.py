"""Page ``smoke_digits`` (docs/benchmarks/smoke_digits.md): every method and the shipped chains
on the reference models against the peers a user would pick instead, each row in a fresh
interpreter, on the digits sets; and the same rows per model on the shapes data
(``overview_<model>``)."""

from __future__ import annotations

import copy
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

from benchmarks import harness as h
from benchmarks.peers import OVERVIEW as PEERS
from benchmarks.peers import single

TITLE = "Benchmarks: smoke run on the digits sets"
OUT = "benchmarks/smoke_digits.md"
ABOUT = [
    "A smoke run on the digits sets (`digits28`, `digits32`: 360 test images, one image = "
    "0.28 pp): it shows that every method and chain runs on each model and cannot tell methods "
    "apart; the figures on the hard shapes data are on the per-topic pages and the method "
    "pages, and the same rows per shapes model come from `python -m benchmarks "
    "overview_<model>` (docs/benchmarks/overview_<model>.md), every peer curve per shapes "
    "CNN from `python -m benchmarks peers_<model>` (docs/benchmarks/peers_<model>.md).",
    "Sizes are the bytes of the file each method saves (netshrink: the `.nsk` artifact, equal "
    "to the report's `storage_bytes`; peers: the file each peer's docs tell a user to save, "
    "see the peers page). Ratio = dense fp32 bytes / that size. Every fine-tune (netshrink's and the peers') gets the same "
    "epochs. Each row runs in a fresh interpreter; peak RSS is that whole process (torch, "
    "the data and the reference included), and the method's peak is how far the resident "
    "size rose above what was resident once the reference and the data were loaded, over the "
    "compression, fine-tune and evaluation (Linux's VmHWM, reset before the method; "
    "latency timing excluded). The dense row's own speedup (a copy timed against itself) shows "
    "the noise.",
]
MODELS = ("lenet300", "lenet5", "vgg_small", "resnet_small", "resnet18")
QUICK_MODELS = ("lenet300",)
#: The models of the per-model pages on the shapes data (``python -m benchmarks
#: overview_<model>`` writes docs/benchmarks/overview_<model>.md): every zoo CNN in the 85-95%
#: band and the RGB ImageNet-style CNNs of docs/datasets.md. One page per model, because one
#: model's rows take about an hour here.
SHAPES_MODELS = ("lenet5@shapes32", "vgg_small@shapes32", "resnet_small@shapes32",
                 "mobilenetv3_small_100@shapes64", "mobilenet_v3_small@shapes64",
                 "shufflenet_v2_x0_5@shapes64")
#: On the shapes data every method trains and fine-tunes on the first TRAIN_IMAGES training
#: images (validation and test splits whole), one fine-tune epoch, shorter method training.
TRAIN_IMAGES = 10_000
SHAPES_FT_EPOCHS = 1
#: normsparse's L1 training on the shapes data: 6 epochs; at the recipes' ``val_tolerance`` of
#: 0.01 nothing is admissible there (docs/benchmarks/normsparse.md). LeNet-5 keeps 0.04 (its
#: pages ran so); on vgg_small no epoch stays within 0.04 (the best: -7.4 pp at 90% of the
#: weights removed, before the fine-tune that follows), so the CNNs allow 0.10.
SHAPES_NORMSPARSE = {"epochs": 6, "val_tolerance": 0.04}
SHAPES_NORMSPARSE_CNN = {"epochs": 6, "val_tolerance": 0.10}
SHAPES_JOINT_EPOCHS = 2
#: Seconds one row may take per seed (each row runs all its seeds in one fresh interpreter): on
#: ``resnet_small@shapes32`` one seed of normsparse -> bioclust took 25-27 min here with two
#: pages running, so a single hour for three seeds timed the row out.
ROW_SECONDS_PER_SEED = 3600


def train_subset(data: Any, quick: bool) -> Any:
    """``data`` with the shapes pages' training budget: the first :data:`TRAIN_IMAGES` training
    images, validation and test whole (quick: :data:`harness.QUICK_SPLITS`)."""
    return h.subset(data, {"train": TRAIN_IMAGES, **(h.QUICK_SPLITS if quick else {})})


def shapes_normsparse(model: str) -> dict[str, Any]:
    """normsparse's epochs and ``val_tolerance`` on the shapes data for harness ``model``."""
    return SHAPES_NORMSPARSE if model.split("@")[0] == "lenet5" else SHAPES_NORMSPARSE_CNN


# joint's whole-file target per model: the ResNets' BatchNorm tensors and manifest alone exceed
# 1% of their dense size, so 100x is infeasible there; after statprune -> tucker the model is
# already 1.3-2.8x smaller and the fixed rest stays, hence the lower chain targets. On
# ShuffleNetV2 x0.5 (10 classes) the rest alone is 68,139 B of 1.44 MB, so 25x (57,616 B) is
# unreachable (ConfigError at 8680a13) and 12x leaves about 52 kB for the selected weights.
JOINT_TARGET = {"lenet300": 100, "lenet5": 100, "vgg_small": 100, "resnet_small": 25,
                "resnet18": 50, "shufflenet_v2_x0_5": 12}
JOINT_CHAIN_TARGET = {"vgg_small": 100, "resnet_small": 12, "resnet18": 20}
#: The targets of a CNN not named above (the ImageNet-style ones: BatchNorm everywhere, as in
#: the ResNets).
JOINT_DEFAULT, JOINT_CHAIN_DEFAULT = 25, 12
# First convs and shortcut 1x1s keep 8 bits under 4-bit codebooks: at 4 bits they cost most of
# the accuracy (docs/benchmarks/bioclust.md). The stem's name per family: zoo and timm ResNets
# `conv1`, timm MobileNets `conv_stem`, torchvision `conv1.0` (ShuffleNetV2) and `features.0.0`
# (MobileNetV3), `stem.0` and `features.0` elsewhere.
BIOCLUST_8BIT = {"re:^(conv1(\\.0)?|conv_stem|stem\\.0|features\\.0(\\.0)?)$": {"bits": 8},
                 "re:(downsample|shortcut)": {"bits": 8}}


def _step(compressor: str, select: dict[str, Any] = h.EVERYTHING, ft: Any = None,
          **config: Any) -> dict[str, Any]:
    return {"compressor": compressor, "select": select, "config": config,
            **({"finetune": ft} if ft else {})}


def methods(model: str, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """label -> recipe steps for ``model`` (a harness model; ``@shapes`` ones get the shorter
    training of the per-model pages: one fine-tune epoch, 6 L1 epochs at ``val_tolerance``
    0.04 on LeNet-5 and 0.10 on the CNNs, 2 joint epochs)."""
    shapes, base = "@shapes" in model, model.split("@")[0]
    ft = {"epochs": 1 if quick else SHAPES_FT_EPOCHS if shapes else 3, "lr": 0.001}
    mag90 = _step("magnitude", ft=ft, sparsity=0.9, scope="global")
    bio = {**_step("bioclust", bits=4, population=4 if quick else 16, noise_scale=0.5),
           "overrides": BIOCLUST_8BIT}
    normsparse = _step("normsparse", {"types": ["Linear", "Conv2d"]}, ft, l1=0.005,
                       **{**({"epochs": 30} if not shapes else shapes_normsparse(model)),
                          **({"epochs": 10} if quick else {})})
    joint = {"target_ratio": JOINT_TARGET.get(base, JOINT_DEFAULT), "min_bits": 3,
             "epochs": 3 if quick else SHAPES_JOINT_EPOCHS if shapes else 10,
             "lr": 0.002, "batch_size": 32}
    out = {
        "magnitude 90% (global) + ft": [mag90],
        "quantize 4-bit/ch": [_step("quantize", bits=4)],
        "deep-compression style (magnitude 90% + ft + quantize 5-bit)":
            [mag90, _step("quantize", bits=5)],
    }
    if base in ("lenet300", "lenet5"):
        out["svd (Linear, energy 0.9) + ft"] = [
            _step("svd", {"types": ["Linear"]}, ft, rank_by="energy", energy=0.9)]
    out["bioclust (4-bit codebook, 8-bit stem/shortcuts)"] = [bio]
    out["normsparse + ft"] = [normsparse]
    out[f"joint (adaptive sparsity+bits, {joint['target_ratio']}x target)"] = [
        _step("joint", **joint)]
    if base not in ("lenet300", "lenet5"):  # the paper-002/003 combinations target CNNs
        paper002 = h.recipe_steps(f"paper002_{'resnet18' if base == 'resnet18' else 'resnet_small'}.yaml",
                                  **({"epochs": SHAPES_FT_EPOCHS} if shapes else {}))
        out["statprune + tucker + distilled ft (paper 002 recipe)"] = paper002
        rl = _step("rlprune", {"types": ["Conv2d"]}, target_sparsity=0.8,
                   episodes=12 if quick else 30, warmup=4 if quick else 8, reward_samples=200,
                   prior="magnitude", resume=False)  # time the search, not a cached one
        if base == "vgg_small":
            paper003 = [rl, _step("sigmaprune", {"types": ["Linear"]}, ft, k=2.0, statistic="abs")]
            out["rlprune + sigmaprune + ft (paper 003)"] = paper003
            out["rlprune + sigmaprune + ft -> quantize 5-bit"] = [*paper003, _step("quantize", bits=5)]
        else:  # ResNets have no FC layer but the head: the RL half of paper 003 only
            out["rlprune 80% conv weights + ft (paper 003, RL half)"] = [{**rl, "finetune": ft}]
        out["statprune -> tucker -> joint"] = [
            *paper002, _step("joint", **{**joint, "target_ratio": JOINT_CHAIN_TARGET.get(
                base, JOINT_CHAIN_DEFAULT)})]
    out["normsparse -> bioclust"] = [normsparse, bio]
    return out


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every netshrink row of the page."""
    return {f"{m} / {label}": (m, steps) for m in (QUICK_MODELS if quick else MODELS)
            for label, steps in methods(m, quick).items()}


def row(model: str, label: str, quick: bool, seeds: int) -> dict[str, Any]:
    """One row, measured in a fresh interpreter (see :func:`harness.isolated`)."""
    reference, data = h.reference(model)
    shapes = "@shapes" in model
    if shapes:
        data = train_subset(data, quick)
    example = data.batch("val", 1)[0]
    dense_bytes = sum(t.numel() * 4 for t in reference.state_dict().values())
    dense_acc = h.ns.accuracy(reference, data)
    loaded_mb = h.reset_peak_rss()
    t0 = time.perf_counter()
    if label == "dense":
        family, compressed, size, accs = "dense", copy.deepcopy(reference), dense_bytes, [dense_acc]
    elif label in PEERS:
        compressed, size = single(label, reference, data, 1 if quick or shapes else 3)
        family, accs = "peer", [h.ns.accuracy(compressed, data)]
    else:
        runs = h.compress(reference, methods(model, quick)[label], data, seeds)
        family, compressed, accs = "netshrink", runs.first.model, runs.accs
        size = runs.mean(lambda r: r.report.storage_bytes)
    wall = time.perf_counter() - t0
    peak_mb = h.peak_rss_since_reset()
    lat = h.speedups(reference, {"m": compressed}, example)["m"]
    return {"method": label, "family": family, "accs": accs, "acc": statistics.fmean(accs),
            "n": len(data.test),
            "dense_acc": dense_acc, "bytes": size, "ratio": dense_bytes / size, "wall_s": wall,
            "b1": lat[1], "b64": lat[64],
            "method_peak_mb": None if loaded_mb is None or peak_mb is None else peak_mb - loaded_mb}


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per peer: netshrink's best ratio among methods whose accuracy is not below the peer's
    (95% intervals), or the peer wins."""
    ours = [r for r in rows if r["family"] == "netshrink"]
    lines = []
    for peer in (r for r in rows if r["family"] == "peer"):
        match = [r for r in ours if h.acc_compare(r["accs"], peer["accs"], r["n"]) != "lower"]
        if not match:
            lines.append(f"- **{peer['method']}** wins: every netshrink method is less accurate.")
            continue
        best = max(match, key=lambda r: r["ratio"])
        who = "netshrink wins" if best["ratio"] > peer["ratio"] else "the peer wins"
        lines.append(
            f"- vs **{peer['method']}** ({peer['ratio']:.1f}x at {h.pct(peer['acc'])}): "
            f"netshrink's smallest at an accuracy not below it (95% intervals) is "
            f"**{best['method']}**, {best['ratio']:.1f}x at {h.mean_std(best['accs'], 100)}% "
            f"— {who} on size.")
    return lines or ["- no peer ran"]


def pareto(ax: Any, rows: list[dict[str, Any]], model: str) -> None:
    """Accuracy vs ratio, netshrink's Pareto front dashed."""
    for family, marker in (("dense", "o"), ("netshrink", "*"), ("peer", "s")):
        pts = [r for r in rows if r["family"] == family]
        ax.scatter([r["ratio"] for r in pts], [100 * r["acc"] for r in pts],
                   marker=marker, s=90 if family == "netshrink" else 50, label=family)
        for r in pts:
            ax.annotate(r["method"][:28], (r["ratio"], 100 * r["acc"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    front, best = [], -1.0
    for r in sorted((r for r in rows if r["family"] == "netshrink"), key=lambda r: -r["ratio"]):
        if r["acc"] > best:
            front.append(r)
            best = r["acc"]
    ax.plot([r["ratio"] for r in front], [100 * r["acc"] for r in front], "--", alpha=0.5,
            label="netshrink Pareto front")
    ax.set(xscale="log" if rows else "linear",  # no point measured: an empty plot
           xlabel="compression ratio (dense fp32 bytes / file on disk, log)",
           ylabel="test accuracy (%)", title=f"{model}: accuracy vs honest compression")
    ax.legend(fontsize=8)


def _mb(value: float | None) -> str:
    """A method's own peak in MB, or ``-`` (not measurable here, or a row saved before 2026-12-02)."""
    return "-" if value is None else f"{value:+.0f}"


def section(b: h.Bench, model: str) -> list[str]:
    """One model: the table, the Pareto plot, the verdicts."""
    labels = ["dense", *methods(model, b.quick), *PEERS]
    rows = []
    for label in labels:
        print(f"[{model}] {label}", file=sys.stderr, flush=True)
        rows.append(b.row(f"{model} / {label}", lambda label=label: h.isolated(
            row, model, label, b.quick, b.seeds, timeout=ROW_SECONDS_PER_SEED * b.seeds)))
        rows[-1].setdefault("method", label)
    ok = [r for r in rows if "error" not in r]
    path, link = b.plot(f"pareto_{model}.png")
    h.save_plot(lambda ax: pareto(ax, ok, model), path)
    spec, data_name, _ = h.MODELS[model]
    return [f"## {model} (`{spec}` on `{data_name}`)", "", *h.table(
        ["method", "family", "test acc [95% CI]", "Δ acc (pp)", "size on disk", "ratio",
         "speedup b1", "speedup b64", "wall (s)", "peak RSS (MB)", "method's peak (MB)"],
        [[r["method"], "-", f"failed: {r['error']}", *[""] * 8] if "error" in r else
         [r["method"], r["family"], h.acc_cell(r["accs"], r["n"]),
          f"{100 * (r['acc'] - r['dense_acc']):+.2f}",
          f"{r['bytes']:,.0f} B", f"{r['ratio']:.1f}x", r["b1"], r["b64"],
          f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}", _mb(r.get("method_peak_mb"))]
         for r in rows]),
        f"![Pareto plot for {model}]({link})", "", "Verdicts:", "", *verdicts(ok), ""]


def run(b: h.Bench) -> list[str]:
    """Every model of the smoke page in turn."""
    return [line for model in (QUICK_MODELS if b.quick else MODELS)
            for line in section(b, model)]


def model_page(model: str) -> SimpleNamespace:
    """The page spec of one shapes model (``python -m benchmarks overview_<model>``)."""
    spec, data_name, _ = h.MODELS[model]
    about = [
        "Every method and peer of the digits smoke page (docs/benchmarks/smoke_digits.md) on "
        f"`{spec}` trained on `{data_name}` (docs/datasets.md). Every method trains and "
        f"fine-tunes on the first {TRAIN_IMAGES:,} training images, {SHAPES_FT_EPOCHS} fine-tune "
        "epoch (netshrink's and the peers'), "
        f"{shapes_normsparse(model)['epochs']} L1 epochs for normsparse (`val_tolerance` "
        f"{shapes_normsparse(model)['val_tolerance']}) and {SHAPES_JOINT_EPOCHS} epochs for "
        "joint; validation and test splits whole "
        "(test n = 10,000). Quick mode: 2,000 training and test images, one seed.",
        *ABOUT[1:],
    ]
    return SimpleNamespace(
        TITLE=f"Benchmarks: {model}", OUT=f"benchmarks/overview_{model}.md", ABOUT=about,
        SEEDS=3, run=lambda b: section(b, model),
        cases=lambda quick: {f"{model} / {label}": (model, steps)
                             for label, steps in methods(model, quick).items()})
