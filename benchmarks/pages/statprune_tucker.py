"""Page ``statprune_tucker`` (paper 002): the shipped combination on the small ResNet and the
small VGG (shapes32), Torch-Pruning's MagnitudePruner at the same MACs, and coverage of timm
CNNs."""

from __future__ import annotations

import contextlib
import copy
import signal
import time
from typing import Any

import torch
from torch import nn

from benchmarks import harness as h

TITLE = "statprune + tucker (paper 002)"
OUT = "benchmarks/statprune_tucker.md"
SEEDS = 3  # rows with a fine-tune, a search or random init: mean ± std over seeds
#: harness model -> shipped recipe (its selectors, narrow convs ≤ 32 channels and wide ≥ 64, fit
#: both zoo CNNs).
RECIPES = {"resnet_small@shapes32": "paper002_resnet_small.yaml",
           "vgg_small@shapes32": "paper002_resnet_small.yaml"}
#: Fine-tune epochs on shapes32 (the recipe's 10 distilled epochs are written for digits32; one
#: distilled epoch of 50,000 images takes about 10 minutes of resnet_small here).
SHAPES_FT_EPOCHS = 1
COVERAGE = ["resnet18", "resnext26ts", "mobilenetv2_050", "mobilenetv3_small_050",
            "mobilenetv3_large_100", "efficientnet_b0", "regnetx_002", "regnety_002",
            "convnext_atto", "densenet121", "ghostnet_050", "mnasnet_050", "lcnet_050",
            "rexnet_100", "resnet50", "cspresnet50"]
QUICK_COVERAGE = ["resnet18", "mobilenetv3_small_050", "regnetx_002"]
COVERAGE_TIMEOUT_S = 90
ABOUT = [
    "The paper's combination as shipped (`recipes/paper002_*.yaml`): `statprune` on the narrow "
    "convs, `tucker` (Tucker-2, ratio 0.5) on the wide ones, then one distilled fine-tune. "
    "MACs are counted by Torch-Pruning's counter for every model.",
    "The models are `zoo:resnet_small` (4 epochs) and `zoo:vgg_small` (5 epochs) on their "
    "shapes32 references (test n = 10,000), both with `recipes/paper002_resnet_small.yaml`'s "
    f"steps and {SHAPES_FT_EPOCHS} distilled fine-tune epoch(s) of the 50,000 training images "
    "(the recipe's 10 are for its digits32 demo).",
]


def models(quick: bool) -> list[str]:
    """The models of the first two sections."""
    return ["resnet_small"] if quick else list(RECIPES)


def _recipe(model: str) -> str:
    return RECIPES.get(model, "paper002_resnet_small.yaml")


def steps(model: str, quick: bool) -> list[dict[str, Any]]:
    """The shipped recipe (quick, and on shapes32: :data:`SHAPES_FT_EPOCHS` fine-tune epochs)."""
    return h.recipe_steps(_recipe(model), epochs=1 if quick else SHAPES_FT_EPOCHS)


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """The paper-002 compressions (coverage runs default configs on untrained timm models)."""
    return {f"{m} / paper 002": (m, steps(m, quick)) for m in models(quick)}


def macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of one forward pass by Torch-Pruning's counter."""
    import torch_pruning as tp

    return int(tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, *shape))[0])


def tp_at(dense: nn.Module, target: int, shape: tuple[int, ...]) -> tuple[nn.Module, float]:
    """Torch-Pruning's MagnitudePruner (L2, one uniform ratio, head ignored), the ratio
    bisected until its MACs match ``target``."""
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense).eval()
        info = h.ns.model_info(model)
        tp.pruner.MagnitudePruner(
            model, torch.zeros(1, *shape), importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[model.get_submodule(info.head)]).step()
        return model

    lo, hi = 0.0, 0.95
    for _ in range(9):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(pruned(mid), shape) > target else (lo, mid)
    return pruned(hi), hi


def paper(b: h.Bench, m: str) -> tuple[list[Any], list[str], list[list[Any]]]:
    """The recipe, then TP at the same MACs with the same fine-tune: rows, verdict, TP rows."""
    dense, data = h.reference(m)
    shape = tuple(data.input_shape)
    runs = b.runs(f"{m} / statprune + tucker", dense, steps(m, b.quick), data, b.seeds)
    rep, ours = runs.first.report, runs.first.model
    t0 = time.perf_counter()
    pruned, ratio = tp_at(dense, macs(ours, shape), shape)
    prune_wall, tp_accs, tp_model = time.perf_counter() - t0, [], pruned
    for seed in range(b.seeds):  # the fine-tune's order is random: as many seeds as ours
        tuned = copy.deepcopy(pruned)
        h.ns.train(tuned, data, h.ns.FinetuneConfig(**steps(m, b.quick)[-1]["finetune"]),
                   seed=seed, teacher=copy.deepcopy(dense).eval(), desc="TP fine-tune")
        tp_accs.append(h.ns.accuracy(tuned, data))
        if seed == 0:
            tp_model = tuned
        h.say(f"TP MagnitudePruner on {m}, seed {seed}: test {100 * tp_accs[-1]:.2f}%")
    tp_wall = prune_wall + (time.perf_counter() - t0 - prune_wall) / b.seeds
    lat = h.speedups(dense, {"ours": ours, "tp": tp_model}, data.batch("val", 1)[0])
    red = 1 - rep.storage_bytes / rep.dense_bytes
    spreads = lat["ours"].values()
    speed = ("**met**" if min(s.low for s in spreads) >= 1.4 else "**missed**"
             if min(s.high for s in spreads) < 1.4 else "undecided (the rounds straddle 1.4x)")
    row = [m, f"{rep.dense_bytes:,}", f"{rep.storage_bytes:,}", h.pct(red, 1),
           h.pct(rep.accuracy_before), runs.acc(), runs.delta(),
           f"{macs(dense, shape) / 1e6:.1f}M → {macs(ours, shape) / 1e6:.1f}M", lat["ours"][1],
           lat["ours"][64], f"{runs.wall:.0f}"]
    verdict = [f"- {m}: storage −{h.pct(red, 1)} (≥ 50%: {'**met**' if red >= 0.5 else '**missed**'});"
               f" accuracy ≥ dense − 1 pp: {h.at_least(runs.accs, runs.n, rep.accuracy_before - 0.01)};"
               f" speedup ≥ 1.4x at batch 1 and 64: {speed}."]
    verdict += [f"  - step {s['step']} `{s['compressor']}` on {s['layers']} layers: "
                + ", ".join(f"{k} {s[k]}" for k in ("params_before", "params_after",
                            "groups_pruned", "decomposed", "skipped") if s.get(k))
                for s in rep.steps]
    tp = [[m, "statprune + tucker", f"{macs(ours, shape) / 1e6:.2f}M", f"{h.params(ours):,}",
           f"{rep.storage_bytes:,}", runs.acc(), lat["ours"][1], lat["ours"][64], f"{runs.wall:.0f}"],
          [m, f"TP MagnitudePruner (ratio {ratio:.3f})", f"{macs(tp_model, shape) / 1e6:.2f}M",
           f"{h.params(tp_model):,}", f"{sum(t.numel() * t.element_size() for t in tp_model.state_dict().values()):,}",
           h.acc_cell(tp_accs, len(data.test)), lat["tp"][1], lat["tp"][64],
           f"{tp_wall:.0f}"]]
    return row, verdict, tp


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in this thread after ``seconds`` (a hang is a result too)."""
    def fail(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def coverage(name: str, size: int = 32) -> list[Any]:
    """statprune and tucker (default configs, every Conv2d but the head) on a random-init timm
    model: did it compress and still run, or refuse, and why."""
    torch.manual_seed(0)
    base = h.ns.load_model(f"timm:{name}", in_chans=1, num_classes=10, input_size=size).eval()
    cells: list[Any] = [name, f"{h.params(base):,}"]
    for method in ("statprune", "tucker"):
        try:
            with time_limit(COVERAGE_TIMEOUT_S):
                result = h.ns.compress(base, [{"compressor": method, "select": {"types": ["Conv2d"]}}],
                                       latency=False)
                with torch.no_grad():
                    y = result.model.eval()(torch.randn(2, 1, size, size))
            after = h.params(result.model)
            skipped = result.report.steps[0].get("skipped") or {}
            status = (f"failed: bad output {tuple(y.shape)}" if tuple(y.shape) != (2, 10)
                      or not torch.isfinite(y).all() else "ok" if after < h.params(base)
                      else "refused: " + (next(iter(skipped.values()), "no change")))
            cells += [status, f"{after:,}"]
        except h.ns.NetshrinkError as exc:
            cells += [f"refused: {exc}", "—"]
        except Exception as exc:  # a crash is a result here: it goes in the table
            cells += [f"failed: {type(exc).__name__}: {exc}"[:160], "—"]
    return cells


def run(b: h.Bench) -> list[str]:
    """The sections in order."""
    rows, verdicts, tp = [], [], []
    for m in models(b.quick):
        row, verdict, tps = paper(b, m)
        rows.append(row)
        verdicts += verdict
        tp += tps
    cov = [coverage(name) for name in (QUICK_COVERAGE if b.quick else COVERAGE)]
    ok = sum(c.count("ok") for c in cov)
    return [
        "## Storage, accuracy, latency", "",
        *h.table(["model", "dense bytes", "artifact bytes", "storage reduction", "test acc dense",
                  "test acc after [95% CI]", "Δ (pp)", "MACs dense → ours", "speedup b1",
                  "speedup b64", "compress+FT wall per seed (s)"], rows),
        *verdicts, "",
        "## Against Torch-Pruning's MagnitudePruner at the same MACs", "",
        "The ratio bisected until its MACs match ours, then the same fine-tune (epochs, lr, "
        "distillation) over the same seeds (the pruning itself is deterministic); the latency "
        "is seed 0's model. TP bytes are its fp32 state dict; its wall time is the bisection "
        "plus one seed's fine-tune.", "",
        *h.table(["model", "method", "MACs", "params", "bytes", "test acc [95% CI]",
                  "speedup b1", "speedup b64", "wall per seed (s)"], tp),
        "## Coverage: timm CNNs at random init (in_chans=1, num_classes=10, 32×32)", "",
        "Default configs, every Conv2d except the classifier selected; 'ok' = parameters went "
        "down and the model still runs forward with finite outputs of the right shape.", "",
        *h.table(["architecture", "params", "statprune", "params after", "tucker",
                  "params after"], cov),
        f"Working: {ok}/{2 * len(cov)} ({100 * ok / (2 * len(cov)):.0f}%) — target ≥ 90%: "
        f"{'**met**' if ok >= 0.9 * 2 * len(cov) else '**missed**'}.",
    ]
