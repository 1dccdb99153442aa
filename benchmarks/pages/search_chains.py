"""Page ``search_chains``: the per-layer search against every chain shipped in recipes/, at the
chain's size and with as many fine-tune epochs as the chain's fine-tunes add up to."""

from __future__ import annotations

import copy
import sys
from typing import Any

import netshrink as ns
from benchmarks import harness as h
from benchmarks.pages import overview

TITLE = "Search against the shipped chains"
OUT = "benchmarks/search_chains.md"
SEEDS = 3
#: Shipped chains -> the harness model of the page: the model each was written for, on shapes32.
CHAINS = {"chain_normsparse_bioclust_vgg_small.yaml": "vgg_small@shapes32",
          "chain_rlprune_sigmaprune_quantize_vgg_small.yaml": "vgg_small@shapes32",
          "chain_statprune_tucker_joint_resnet_small.yaml": "resnet_small@shapes32"}
QUICK_CHAINS = {"chain_rlprune_sigmaprune_quantize_vgg_small.yaml": "vgg_small@shapes32"}
ABOUT = [
    "Each chain of `recipes/chain_*.yaml` runs once per seed on the model it was written for, "
    "on shapes32 instead of the recipe's `digits32`, with the training budget of the per-model "
    f"overview pages: the first {overview.TRAIN_IMAGES:,} training images (validation and test "
    f"splits whole), {overview.SHAPES_FT_EPOCHS} fine-tune epoch per fine-tune, normsparse "
    f"{overview.SHAPES_NORMSPARSE_CNN['epochs']} L1 epochs at `val_tolerance` "
    f"{overview.SHAPES_NORMSPARSE_CNN['val_tolerance']}, joint {overview.SHAPES_JOINT_EPOCHS} "
    "epochs; every other setting as shipped. (As shipped, normsparse's 30 epochs of vgg_small "
    "on shapes32 alone take about five hours here.) "
    "`netshrink.search` then runs with the chain's smallest artifact (over the seeds) as its "
    "budget, over the default option grids (`magnitude`, `quantize`, `svd`, `tucker`, "
    "`bioclust` as plain k-means) and the default objective (KL divergence from the "
    "reference's predictions), fine-tuned for as many epochs as the chain's own fine-tunes add "
    "up to "
    "(lr 1e-3), once per seed on one shared scan. The chains' methods also train on their own "
    "(normsparse's L1 epochs, joint's epochs, rlprune's search), which the search does not get. "
    "Verdicts compare the 95% intervals: 'indistinguishable' when they overlap. A size the "
    "search's options cannot reach is a row that says so.",
]


def chains(quick: bool) -> dict[str, str]:
    """Chain recipe -> harness model of the page."""
    return QUICK_CHAINS if quick else CHAINS


def shapes_budget(steps: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """A chain's steps with the overview pages' shapes budget for harness ``model``: every
    fine-tune ``SHAPES_FT_EPOCHS`` epochs, normsparse :func:`overview.shapes_normsparse`, joint
    ``SHAPES_JOINT_EPOCHS`` epochs; the rest as shipped."""
    out = copy.deepcopy(steps)
    for step in out:
        if step.get("finetune"):
            step["finetune"]["epochs"] = overview.SHAPES_FT_EPOCHS
        config = step.setdefault("config", {})
        if step["compressor"] == "normsparse":
            config.update(overview.shapes_normsparse(model))
        elif step["compressor"] == "joint":
            config["epochs"] = overview.SHAPES_JOINT_EPOCHS
    return out


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every chain the page compresses (the searches follow from them)."""
    return {f"{m} / {name}": (m, shapes_budget(h.recipe_steps(name), m))
            for name, m in chains(quick).items()}


def finetune_epochs(steps: list[dict[str, Any]]) -> int:
    """The fine-tune epochs a chain's steps add up to (its methods' own training not counted)."""
    return sum(int((s.get("finetune") or {}).get("epochs", 0)) for s in steps)


def chain_row(name: str, steps: list[dict[str, Any]], model: Any, data: ns.DataSplits,
              seeds: int, table: Any) -> tuple[list[str], Any]:
    """One chain (``seeds`` seeds) against the search at its smallest artifact; the row and
    the scan table (shared by every chain of the model)."""
    n = len(data.test)
    chain = h.compress(model, steps, data, seeds)
    size = min(r.report.storage_bytes for r in chain.results)
    epochs = finetune_epochs(steps)
    finetune = {"epochs": epochs, "lr": 1e-3} if epochs else None
    found = []
    for seed in range(seeds):
        try:
            found.append(ns.search(model, data, size, sensitivity=table, seed=seed,
                                   finetune=finetune))
        except ns.ConfigError as exc:  # a size the options cannot reach is a finding
            return [name, f"{size:,}", chain.acc(), "not reachable", epochs, "", "",
                    str(exc).split(": ", 1)[-1]], table
        table = found[-1].sensitivity
    accs = [f.result.report.accuracy_after for f in found]
    return [
        name, f"{size:,}", chain.acc(), f"{max(f.artifact_bytes for f in found):,}", epochs,
        h.acc_cell(accs, n), h.acc_compare(accs, chain.accs, n),
        "; ".join(f"{r['layer']}: {r['choice']}" for r in found[0].plan_rows()),
    ], table


def model_section(b: h.Bench, model_key: str,
                  recipes: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """One model's table: each chain a saved row (:meth:`Bench.row`), so an interrupted run at
    the same commit resumes; the chains measured in one run share the sensitivity scan."""
    model, data = h.reference(model_key)
    data = overview.train_subset(data, b.quick)
    table, rows = None, []
    for name, steps in recipes:
        print(f"{model_key}: {name}", file=sys.stderr, flush=True)

        def measure(name: str = name, steps: list[dict[str, Any]] = steps) -> dict[str, Any]:
            nonlocal table
            cells, table = chain_row(name, steps, model, data, b.seeds, table)
            return {"cells": cells}

        rows.append(b.row(f"{model_key} / {name}", measure)["cells"])
    return [f"## {model_key} ({ns.model_info(model).spec}, {data.name})", "",
            *h.table(["chain", "its smallest bytes", "its test acc [95% CI]",
                      "searched bytes (largest seed)", "search fine-tune epochs",
                      "searched test acc [95% CI]", "searched vs chain",
                      "searched choice per layer (seed 0)"], rows)]


def run(b: h.Bench) -> list[str]:
    """One table per model: each chain against the search at the chain's size."""
    by_model = h.cases_by_model(cases(b.quick))
    for model_key in by_model:  # before the fresh cache below, which would retrain them
        h.reference(model_key)
    with h.fresh_cache(b.tmp):  # no scan checkpoint of an earlier run is reused
        return [line for model_key, recipes in by_model.items()
                for line in model_section(b, model_key, recipes)]
