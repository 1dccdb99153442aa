"""Page ``ptq`` (issue 21): netshrink's post-training quantization options against the peers'
post-training quantizers on the same reference model, side by side in one run."""

from __future__ import annotations

import sys
from typing import Any

from benchmarks import harness as h
from benchmarks.pages import peers as page

TITLE = "Post-training quantization: netshrink's options against NNCF, AIMET, torchao, PyTorch"
OUT = "benchmarks/ptq.md"
MODELS = ("lenet5@shapes32", "mobilenet_v3_small@shapes64")
QUICK_MODELS = ("lenet5",)
SEEDS = 1  # every row is deterministic (no fine-tune, calibration on a fixed split)
ABOUT = [
    "Post-training only: no row trains. netshrink's rows are `quantize` on every Conv2d and "
    "Linear layer, the classifier head included (all at the row's bits); the peers use their "
    "own defaults for which layers they quantize (NNCF's weight compression keeps the first "
    "and last layers in its int8 backup mode; torchao's int4 layout packs only Linear layers "
    "whose input size its group divides; PyTorch dynamic int8 touches Linear layers only). "
    "Sizes are the bytes of the file each library's docs tell a user to save (AIMET: "
    "theoretical, bits × weight parameters + fp32 for the rest; its points keep "
    f"{page.p.AIMET_ACTIVATION_BITS}-bit activations). Calibration uses the "
    "validation split; accuracies are on the test split. NNCF's data-aware options run "
    "where its torch backend has them (scale estimation, AWQ); its GPTQ raised "
    "`ParameterNotSupportedError: Torch backend does not support gptq` in a trial, so it is "
    "not a row.",
]

#: netshrink's points: label -> (knob, steps).
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "quantize 8-bit/ch": ("bits 8", {"bits": 8}),
    "quantize 4-bit/ch": ("bits 4", {"bits": 4}),
    "quantize 4-bit/ch mse-clip": ("bits 4, clip mse", {"bits": 4, "clip": "mse"}),
    "quantize 4-bit/ch gptq": ("bits 4, gptq", {"bits": 4, "rounding": "gptq"}),
    "quantize 4-bit/ch mse-clip gptq": (
        "bits 4, clip mse, gptq", {"bits": 4, "clip": "mse", "rounding": "gptq"}),
    "quantize 4-bit g25 mse-clip gptq": (
        "bits 4, group 25, clip mse, gptq",
        {"bits": 4, "group_size": 25, "clip": "mse", "rounding": "gptq"}),
    "quantize W8A8": ("bits 8, int8 activations", {"bits": 8, "activations": "int8"}),
    "quantize W4A8 gptq": ("bits 4, gptq, int8 activations",
                           {"bits": 4, "rounding": "gptq", "activations": "int8"}),
}
QUICK_OURS = ("quantize 8-bit/ch", "quantize 4-bit/ch gptq")

#: Peer curves and their knob values. Group 25 divides every LeNet-5 layer's input size (75,
#: 500, 1250, 500); NNCF refuses a group that does not, torchao leaves such a layer fp32.
PEER_VALUES: dict[str, tuple[Any, ...]] = {
    "NNCF compress_weights": ("INT8_ASYM", "INT4_SYM-g-1", "INT4_SYM-g25",
                              "INT4_SYM-g-1+scale_estimation",
                              "INT4_SYM-g25+awq+scale_estimation"),
    "NNCF int8 PTQ": (300,),
    "AIMET QuantSim": (8, 4),
    "AIMET AdaRound": (4,),
    "torchao weight-only": ("int8", "int4-g32"),
    "PyTorch dynamic int8": ("Linear",),
}
QUICK_PEER_VALUES: dict[str, tuple[Any, ...]] = {"NNCF compress_weights": ("INT4_SYM-g-1",)}


def points(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """netshrink's rows as (knob, steps)."""
    return {label: (knob, [page._step("quantize", **config)])
            for label, (knob, config) in OURS.items() if not quick or label in QUICK_OURS}


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every netshrink compression of the page."""
    return {f"{m} / {label}": (m, steps) for m in (QUICK_MODELS if quick else MODELS)
            for label, (_, steps) in points(quick).items()}


def _four_bit_verdicts(rows: list[dict[str, Any]], n: int) -> list[str]:
    """Issue 21's bar: netshrink's best 4-bit weights lose no more than NNCF's int4 (within
    the interval) at fewer bytes, for each NNCF int4 point."""
    mine = [r for r in rows if r["curve"] == "netshrink" and "error" not in r
            and "bits 4" in r["knob"] and "activations" not in r["knob"]]
    theirs = [r for r in rows if r["curve"] == "NNCF compress_weights" and "INT4" in r["knob"]]
    lines = []
    for peer in theirs:
        if "error" in peer:
            lines.append(f"- {peer['method']}: not measured ({peer['error']}).")
            continue
        good = [o for o in mine if o["bytes"] < peer["bytes"]
                and h.acc_compare(o["accs"], peer["accs"], n) != "lower"]
        best = max(good, key=lambda o: sum(o["accs"]), default=None)
        lines.append(
            f"- {peer['method']} ({peer['bytes']:,.0f} B, {h.acc_cell(peer['accs'], n)}): "
            + (f"**met** by {best['method']} ({best['bytes']:,.0f} B, "
               f"{h.acc_cell(best['accs'], n)}: "
               f"{h.acc_compare(best['accs'], peer['accs'], n)})" if best else
               "**not met**: no netshrink 4-bit row is smaller at an accuracy not below it")
            + ".")
    return lines


def run(b: h.Bench) -> list[str]:
    """Per model: the table, the plot, issue 21's 4-bit verdicts, domination per peer curve."""
    lines: list[str] = []
    for m in QUICK_MODELS if b.quick else MODELS:
        print(f"[{m}]", file=sys.stderr, flush=True)
        model, data = h.reference(m)
        n = len(data.test)
        rows = (page.ours_rows(model, data, b, points(b.quick), seeds=1)
                + page.peer_rows(model, data, b, QUICK_PEER_VALUES if b.quick else PEER_VALUES))
        spec, data_name, _ = h.MODELS[m]
        verdicts = ["netshrink 4-bit weights against NNCF's int4 (issue 21: lose no more, "
                    "within the interval, at fewer bytes):", "", *_four_bit_verdicts(rows, n), ""]
        lines += page.section(b, m, f"## {m} (`{spec}` on `{data_name}`)", "ptq",
                              page.dense_row(model, data), rows, n, verdicts)
    return lines
