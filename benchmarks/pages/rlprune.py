"""Page ``rlprune`` (paper 003, with sigmaprune) on the small VGG / shapes32."""

from __future__ import annotations

from typing import Any

from benchmarks import harness as h

TITLE = "rlprune + sigmaprune benchmark (paper 003)"
OUT = "benchmarks/rlprune.md"
SEEDS = 3
MODEL, TARGET, K = "vgg_small@shapes32", 0.8, 2.0
#: How the agent starts: AMC's (the paper's) uniformly random warm-up, or the global-magnitude
#: prior (episode 0 = global magnitude's ratios; warm-up explores around them). The short
#: search decays the noise faster than AMC's 0.95 per episode, which assumes hundreds.
MODES = {"magnitude prior": {"prior": "magnitude", "noise": 0.1, "noise_decay": 0.95},
         "AMC random warm-up": {"prior": "none", "noise": 0.5, "noise_decay": 0.93}}
ABOUT = [
    f"Model `{h.MODELS[MODEL][0]}` on {h.MODELS[MODEL][1]} (its reference: 5 epochs); target "
    f"sparsity {TARGET} of the conv weights. The search's reward is accuracy on the first "
    "validation images; the test split is never seen by it. The fine-tunes of part 2 run one "
    "epoch of the 50,000 training images (about 7 minutes per epoch for this model on one "
    "thread here); `recipes/paper003.yaml`, written for the digits32 demo, fine-tunes 2 "
    "epochs of its 1,078 training images.",
]


def settings(quick: bool) -> dict[str, Any]:
    """Search sizes (quick: a handful of episodes, one fine-tune epoch)."""
    if quick:
        return {"episodes": 6, "warmup": 2, "reward_samples": 64, "ft_epochs": 1}
    return {"episodes": 30, "warmup": 8, "reward_samples": 200, "ft_epochs": 1}


def rl(quick: bool, mode: str = "magnitude prior", **extra: Any) -> dict[str, Any]:
    """The rlprune step on the convs."""
    s = settings(quick)
    config = {"target_sparsity": TARGET, "episodes": s["episodes"], "warmup": s["warmup"],
              "reward_samples": s["reward_samples"], **MODES[mode], **extra}
    return {"compressor": "rlprune", "select": {"types": ["Conv2d"]}, "config": config}


def _sigma(types: list[str]) -> dict[str, Any]:
    return {"compressor": "sigmaprune", "select": {"types": types},
            "config": {"k": K, "statistic": "abs"}}


def before_ft(quick: bool) -> dict[str, list[dict[str, Any]]]:
    """Part 1: the agent's ratios (each mode) vs uniform vs global magnitude."""
    out = {f"rlprune, {m}": [rl(quick, m)] for m in MODES}
    for label, scope in ((f"uniform (every conv {TARGET})", "layer"), ("global magnitude", "global")):
        out[label] = [{"compressor": "magnitude", "select": {"types": ["Conv2d"]},
                       "config": {"sparsity": TARGET, "scope": scope}}]
    return out


def ablation(quick: bool) -> dict[str, list[dict[str, Any]]]:
    """Part 2, the paper's Table 4 (fine-tuned): the RL steps resume part 1's search."""
    ft = {"epochs": settings(quick)["ft_epochs"], "lr": 1e-3}
    return {"RL alone (convs)": [{**rl(quick), "finetune": ft}],
            f"3σ alone (all layers, k={K})": [{**_sigma(["Conv2d", "Linear"]), "finetune": ft}],
            f"combined (RL convs + 3σ FC, k={K})": [rl(quick), {**_sigma(["Linear"]),
                                                                 "finetune": ft}]}


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every compression of the page."""
    return {label: (MODEL, steps) for label, steps in {**before_ft(quick),
                                                        **ablation(quick)}.items()}


def run(b: h.Bench) -> list[str]:
    """Part 1, the ablation, the targets."""
    dense, data = h.reference(MODEL)
    with h.fresh_cache(b.tmp):  # searches start afresh; part 2 resumes part 1's checkpoints
        runs = {k: h.compress(dense, s, data, b.seeds) for k, s in before_ft(b.quick).items()}
        abl = {k: h.compress(dense, s, data, b.seeds) for k, s in ablation(b.quick).items()}
    uniform, glob = runs[f"uniform (every conv {TARGET})"], runs["global magnitude"]
    glob_ratios = {r.name: r.details["sparsity"] for r in glob.first.records}
    search = {label: [r.report.steps[0]["search_time_s"] for r in runs[label].results]
              for label in runs if label.startswith("rlprune")}
    part1 = [[label, f"{h.zero_share(r.first.model):.4f}", r.acc(),
              ", ".join(f"{100 * a:.2f}" for a in r.accs),
              h.mean_std(search[label], digits=0) if label in search else "-"]
             for label, r in runs.items()]
    verdicts = [f"- {m} vs {name}: test accuracy "
                f"{h.acc_compare(runs[f'rlprune, {m}'].accs, other.accs, glob.n)}." for m in MODES
                for name, other in (("uniform", uniform), ("global magnitude", glob))]
    ratios = [[m, *(f"{v:.3f}" for v in runs[f"rlprune, {m}"].first.report.steps[0]["ratios"]
                    .values())] for m in MODES]
    ratios.append(["global magnitude", *(f"{v:.3f}" for v in glob_ratios.values())])
    combined = list(abl.values())[-1]
    rep = combined.first.report
    share = 1 - rep.nonzeros / rep.params_before
    recipe = h.recipe_steps("paper003.yaml")
    ours = [rl(b.quick), _sigma(["Linear"])]
    matches = [s["config"] for s in recipe] == [s["config"] for s in ours]
    times = search["rlprune, magnitude prior"]
    return [
        "## 1. Agent's ratios vs uniform vs global magnitude (conv weights, before fine-tune)", "",
        *h.table(["ratios", "conv sparsity", "test acc [95% CI]", "per seed", "search s"], part1),
        "Ratios per conv (seed 0; global magnitude's are implied by its threshold):", "",
        *h.table(["ratios", *glob_ratios], ratios), "Verdicts:", "", *verdicts, "",
        f"## 2. Ablation (paper Table 4), each followed by {settings(b.quick)['ft_epochs']} "
        "fine-tune epoch(s)", "",
        "The RL steps use the magnitude-prior search of part 1 (same model, config and seed: "
        "the finished search is resumed from its checkpoint), so the wall times are pruning + "
        "fine-tune only.", "",
        *h.table(["variant", "params pruned (all layers)", "storage compression",
                  "test acc [95% CI]", "Δ vs dense pp", "wall per seed (s)"],
                 [[label, h.pct(1 - r.first.report.nonzeros / r.first.report.params_before, 1),
                   f"{r.first.report.compression_ratio:.2f}x", r.acc(), r.delta(),
                   f"{r.wall:.0f}"] for label, r in abl.items()]),
        f"`recipes/paper003.yaml` has exactly the 'combined' row's compressor settings: "
        f"**{'yes' if matches else 'no'}** (its fine-tune: "
        f"{recipe[-1]['finetune']['epochs']} epochs of digits32).", "",
        "## 3. Targets", "",
        *h.table(["target", "measured", "met"], [
            ["≥ 80% of parameters pruned", h.pct(share, 1), "yes" if share >= 0.8 else "NO"],
            ["test acc ≥ dense − 1.5 pp after fine-tune", combined.acc(),
             h.at_least(combined.accs, combined.n, rep.accuracy_before - 0.015)],
            ["search ≤ 5 min (magnitude prior)", f"{h.mean_std(times, digits=0)} s",
             "yes" if max(times) <= 300 else "NO"]]),
    ]
