"""Benchmark of ``statprune`` + ``tucker`` (paper 002): the paper's combination on the small ResNet
and timm resnet18 (digits32), Torch-Pruning's MagnitudePruner at the same MACs, and a coverage
table over timm CNN architectures.

Run: ``.venv/bin/python benchmarks/bench_statprune_tucker.py [--quick]`` (writes
``docs/benchmarks/statprune_tucker.md``). Reference models are trained once and cached
(``netshrink.reference_model``); their training time is not part of this run.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import signal
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, model_info
from netshrink.encodings import EncodingTable
from netshrink.errors import NetshrinkError
from netshrink.recipe import Recipe
from netshrink.registry import get_compressor
from netshrink.training import evaluate, finetune

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "statprune_tucker.md"
DATA = "digits32"
RESNET18_EPOCHS = 4  # reference training epochs of timm:resnet18 on digits32 (cached)

#: The paper's combination (prune the narrow convs, decompose the wide ones, fine-tune), as
#: shipped in recipes/; reference-model options; whether the TP comparison runs in --quick.
CASES = {
    "zoo:resnet_small": {"recipe": "recipes/paper002_resnet_small.yaml", "kwargs": {},
                         "tp_quick": False},
    "timm:resnet18": {"recipe": "recipes/paper002_resnet18.yaml",
                      "kwargs": {"epochs": RESNET18_EPOCHS}, "tp_quick": True},
}

COVERAGE = [
    "resnet18", "resnext26ts", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv3_large_100", "efficientnet_b0", "regnetx_002", "regnety_002", "convnext_atto",
    "densenet121", "ghostnet_050", "mnasnet_050", "lcnet_050", "rexnet_100",
]
COVERAGE_FULL_EXTRA = ["resnet50", "cspresnet50"]  # the slowest to decompose: full run only


# -- measurements -----------------------------------------------------------------------------


@torch.inference_mode()
def latency(dense: nn.Module, compressed: nn.Module, shape: tuple[int, ...], batch: int,
            rounds: int, per_round: int) -> tuple[float, float]:
    """Median ms of dense and compressed forward passes, interleaved round by round so that
    background load hits both alike."""
    x = torch.randn(batch, *shape)
    dense.eval()
    compressed.eval()
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (dense, compressed):
        model(x)  # warm-up
    for _ in range(rounds):
        for key, model in ((0, dense), (1, compressed)):
            for _ in range(per_round):
                t0 = time.perf_counter()
                model(x)
                times[key].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def macs_params(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """MACs and parameters by Torch-Pruning's counter (the same counter for every model)."""
    import torch_pruning as tp

    was = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *shape))
    finally:
        model.train(was)
    return int(macs), int(params)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict stored dense (what a plain checkpoint holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def tp_magnitude_at(dense: nn.Module, target_macs: int, shape: tuple[int, ...],
                    head: str | None) -> tuple[nn.Module, float]:
    """Torch-Pruning's MagnitudePruner (L2, uniform ratio) with the ratio bisected so the MACs
    match ``target_macs``."""
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense).eval()
        ignored = [model.get_submodule(head)] if head else []
        pruner = tp.pruner.MagnitudePruner(
            model, torch.zeros(1, *shape), importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        return model

    lo, hi = 0.0, 0.95
    for _ in range(9):
        mid = (lo + hi) / 2
        if macs_params(pruned(mid), shape)[0] > target_macs:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi


# -- sections ---------------------------------------------------------------------------------


def compress_case(spec: str, case: dict, data, lat: dict, with_tp: bool) -> dict[str, Any]:
    """The paper's combination (the shipped recipe) on one model, then Torch-Pruning's
    magnitude pruner at the same MACs with the same fine-tune budget."""
    dense = ns.reference_model(spec, data, **case["kwargs"])
    shape = tuple(data.input_shape)
    recipe = Recipe.from_file(ROOT / case["recipe"]).model_copy(update={"latency": False})
    ft = recipe.finetune
    t0 = time.perf_counter()
    result = ns.compress(dense, recipe, data=data, seed=0)
    wall = time.perf_counter() - t0
    rep = result.report
    ours = result.model.eval()
    row: dict[str, Any] = {
        "spec": spec, "wall_s": wall, "dense_bytes": rep.dense_bytes,
        "storage_bytes": rep.storage_bytes, "acc_before": rep.accuracy_before,
        "acc_after": rep.accuracy_after, "steps": rep.steps, "recipe": case["recipe"],
        "ft": ft,
    }
    row["macs_dense"], row["params_dense"] = macs_params(dense, shape)
    row["macs_ours"], row["params_ours"] = macs_params(ours, shape)
    for batch in (1, 64):
        row[f"lat{batch}"] = latency(dense, ours, shape, batch, **lat[batch])
    if not with_tp:
        return row
    # Torch-Pruning's own magnitude pruner at the same MACs, same fine-tune budget
    t0 = time.perf_counter()
    info = model_info(dense)
    head = info.head if info else None
    tp_model, ratio = tp_magnitude_at(dense, row["macs_ours"], shape, head)
    teacher = copy.deepcopy(dense).eval()
    finetune(tp_model, data, EncodingTable(), ft, teacher=teacher, seed=0)
    tp_model.eval()
    row["tp_ratio"] = ratio
    row["tp_macs"], row["tp_params"] = macs_params(tp_model, shape)
    row["tp_bytes"] = state_bytes(tp_model)
    row["tp_acc"] = evaluate(tp_model, data.loader("test", batch_size=256, shuffle=False))
    row["tp_wall_s"] = time.perf_counter() - t0
    for batch in (1, 64):
        row[f"tp_lat{batch}"] = latency(dense, tp_model, shape, batch, **lat[batch])
    return row


def coverage_one(name: str, size: int) -> dict[str, Any]:
    """statprune and tucker (default configs, all Conv2d but the head) on a random-init timm
    model: did it compress and still run forward, or refuse, and why."""
    out: dict[str, Any] = {"name": name}
    torch.manual_seed(0)
    base = ns.load_model(f"timm:{name}", in_chans=1, num_classes=10, input_size=size).eval()
    info = model_info(base)
    x = torch.randn(2, 1, size, size)
    out["params"] = sum(p.numel() for p in base.parameters())
    for method in ("statprune", "tucker"):
        model = copy.deepcopy(base)
        cls = get_compressor(method)
        ctx = CompressionContext(info=info, seed=0, step_name=method)
        t0 = time.perf_counter()
        signal.alarm(COVERAGE_TIMEOUT_S)  # a hang is a result too (raises _Timeout)
        try:
            layers = LayerSelector(types=["Conv2d"]).resolve(model, head=info.head)
            res = cls({}).compress(model, layers, ctx)
            with torch.no_grad():
                y = res.model.eval()(x)
            after = sum(p.numel() for p in res.model.parameters())
            skipped = res.summary.get("skipped", {})
            if tuple(y.shape) != (2, 10) or not torch.isfinite(y).all():
                status = f"failed: bad output {tuple(y.shape)}"
            elif after >= out["params"]:
                status = "refused: " + (next(iter(skipped.values())) if skipped else "no change")
            else:
                status = "ok"
            out[method] = {"status": status, "params": after, "skipped": len(skipped),
                           "layers": len(layers)}
        except _Timeout:
            out[method] = {"status": f"failed: no result within {COVERAGE_TIMEOUT_S} s"}
        except NetshrinkError as exc:
            out[method] = {"status": f"refused: {exc}"}
        except Exception as exc:  # a crash is a result here: it goes in the table
            out[method] = {"status": f"failed: {type(exc).__name__}: {exc}"[:160]}
            traceback.print_exc()
        finally:
            signal.alarm(0)
        out[method]["wall_s"] = time.perf_counter() - t0
    return out


class _Timeout(Exception):
    """Raised by SIGALRM when one coverage compression runs too long."""


def _on_alarm(signum, frame):
    raise _Timeout


COVERAGE_TIMEOUT_S = 90


# -- report -----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def render(rows: list[dict], cov: list[dict], quick: bool, wall: float, size: int) -> str:
    """The markdown page."""
    ft = rows[0]["ft"]
    cmd = "python benchmarks/bench_statprune_tucker.py" + (" --quick" if quick else "")
    lines = [
        "# statprune + tucker (paper 002)",
        "",
        f"Command: `{cmd}` — run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"total wall time {wall:.0f} s.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs; "
        f"load average {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s). Latency: CPU, median of interleaved "
        "dense/compressed forward passes in the same process.",
        "",
        "Recipes (the paper's combination, `recipes/paper002_resnet_small.yaml` and "
        "`recipes/paper002_resnet18.yaml`, loaded from the files): `statprune` on the convs "
        "with few channels, `tucker` (Tucker-2, ratio 0.5) on the wide convs, then one "
        f"fine-tune of {ft.epochs} epochs (Adam lr {ft.lr}, distillation from the uncompressed "
        f"model: {ft.distill}). Data: {DATA} (1,078 train / 359 val / 360 test images); accuracy "
        "is on the test split.",
        "",
        "## Storage, accuracy, latency",
        "",
        "| model | dense bytes | artifact bytes | storage reduction | test acc dense | "
        "test acc after | Δ (pp) | MACs dense → ours | latency b1 dense/ours (ms) | speedup b1 "
        "| latency b64 dense/ours (ms) | speedup b64 | compress+FT wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in rows:
        red = 1 - r["storage_bytes"] / r["dense_bytes"]
        delta = 100 * (r["acc_after"] - r["acc_before"])
        s1 = r["lat1"][0] / r["lat1"][1]
        s64 = r["lat64"][0] / r["lat64"][1]
        lines.append(
            f"| {r['spec']} | {r['dense_bytes']:,} | {r['storage_bytes']:,} | {100 * red:.1f}% | "
            f"{_pct(r['acc_before'])} | {_pct(r['acc_after'])} | {delta:+.2f} | "
            f"{r['macs_dense'] / 1e6:.1f}M → {r['macs_ours'] / 1e6:.1f}M | "
            f"{r['lat1'][0]:.2f} / {r['lat1'][1]:.2f} | {s1:.2f}× | "
            f"{r['lat64'][0]:.1f} / {r['lat64'][1]:.1f} | {s64:.2f}× | {r['wall_s']:.0f} |")
        verdicts.append(
            f"- {r['spec']}: storage −{100 * red:.1f}% (target ≥ 50%: {_verdict(red >= 0.5)}); "
            f"accuracy {delta:+.2f} pp (target ≥ −1 pp: {_verdict(delta >= -1.0 - 1e-9)}); "
            f"speedup {s1:.2f}× at batch 1 and {s64:.2f}× at batch 64 (target ≥ 1.4× both: "
            f"{_verdict(s1 >= 1.4 and s64 >= 1.4)}).")
    lines += ["", *verdicts, "", "Per step (from the report):", ""]
    for r in rows:
        for s in r["steps"]:
            extra = {k: s[k] for k in ("params_before", "params_after", "groups_pruned",
                                       "decomposed") if k in s}
            skipped = s.get("skipped") or {}
            lines.append(f"- {r['spec']} step {s['step']} `{s['compressor']}` on {s['layers']} "
                         f"layers: {extra}" + (f", skipped {skipped}" if skipped else ""))
    lines += [
        "",
        "## Against Torch-Pruning's MagnitudePruner at the same MACs",
        "",
        "Torch-Pruning `MagnitudePruner` (L2 magnitude, one uniform channel ratio, classifier "
        "ignored), the ratio bisected until its MACs (`tp.utils.count_ops_and_params`) match "
        "ours, then the same fine-tune (same epochs, lr, distillation, seed). TP bytes are "
        "the fp32 state dict (no artifact header)."
        + (" `--quick` runs this comparison on resnet18 only." if quick else ""),
        "",
        "| model | method | MACs | params | bytes | test acc | speedup b1 | speedup b64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "tp_acc" not in r:
            continue
        lines.append(
            f"| {r['spec']} | statprune + tucker | {r['macs_ours'] / 1e6:.2f}M | "
            f"{r['params_ours']:,} | {r['storage_bytes']:,} | {_pct(r['acc_after'])} | "
            f"{r['lat1'][0] / r['lat1'][1]:.2f}× | {r['lat64'][0] / r['lat64'][1]:.2f}× |")
        lines.append(
            f"| {r['spec']} | TP MagnitudePruner (ratio {r['tp_ratio']:.3f}) | "
            f"{r['tp_macs'] / 1e6:.2f}M | {r['tp_params']:,} | {r['tp_bytes']:,} | "
            f"{_pct(r['tp_acc'])} | {r['tp_lat1'][0] / r['tp_lat1'][1]:.2f}× | "
            f"{r['tp_lat64'][0] / r['tp_lat64'][1]:.2f}× |")
    ok = 0
    lines += [
        "",
        f"## Coverage: timm CNNs at random init (in_chans=1, num_classes=10, {size}×{size})",
        "",
        "Default configs, every Conv2d except the classifier selected; 'ok' = parameters went "
        "down and the model still runs forward with finite outputs of the right shape.",
        "",
        "| architecture | params | statprune | params after | tucker | params after |",
        "|---|---|---|---|---|---|",
    ]
    for c in cov:
        cells = []
        for method in ("statprune", "tucker"):
            m = c[method]
            ok += m["status"] == "ok"
            cells += [m["status"].replace("|", "/"),
                      f"{m['params']:,}" if "params" in m else "—"]
        lines.append(f"| {c['name']} | {c['params']:,} | " + " | ".join(cells) + " |")
    total = 2 * len(cov)
    lines += ["", f"Working: {ok}/{total} ({100 * ok / total:.0f}%) — target ≥ 90%: "
              f"{_verdict(ok / total >= 0.9)}. Tucker skips depthwise/grouped convs and 1×1 "
              "convs where a rank-½ SVD saves nothing, with the reason in each layer record."]
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    """Run everything once and return the markdown section."""
    torch.set_num_threads(1)  # one thread: less noise from the other jobs on a shared machine
    os.environ.setdefault("NETSHRINK_PROGRESS", "0")
    started = time.perf_counter()
    data = ns.datasets.load(DATA)
    lat = {1: {"rounds": 7, "per_round": 5 if quick else 10},
           64: {"rounds": 5, "per_round": 2 if quick else 3}}
    rows = []
    for spec, case in CASES.items():
        print(f"[bench] {spec}", flush=True)
        rows.append(compress_case(spec, case, data, lat, with_tp=case["tp_quick"] or not quick))
    size = 32
    signal.signal(signal.SIGALRM, _on_alarm)
    cov = []
    for name in COVERAGE + ([] if quick else COVERAGE_FULL_EXTRA):
        print(f"[bench] coverage {name}", flush=True)
        cov.append(coverage_one(name, size))
    return render(rows, cov, quick, time.perf_counter() - started, size)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer latency repeats, TP comparison on resnet18 only, 14 "
                        "coverage architectures instead of 16")
    args = parser.parse_args()
    text = run(quick=args.quick)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)
