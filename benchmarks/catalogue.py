"""What the benchmark runs: the reference models, netshrink's methods and combinations, peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

#: name -> (model spec, dataset)
MODELS: dict[str, tuple[str, str]] = {
    "lenet300": ("zoo:lenet300", "digits28"),
    "lenet5": ("zoo:lenet5", "digits28"),
    "vgg_small": ("zoo:vgg_small", "digits32"),
    "resnet_small": ("zoo:resnet_small", "digits32"),
    "resnet18": ("timm:resnet18", "digits32"),
}
QUICK_MODELS = ("lenet300", "lenet5", "resnet_small")

FT = {"epochs": 3, "lr": 0.001}
FT_QUICK = {"epochs": 1, "lr": 0.001}
EVERYTHING = {"types": ["Conv2d", "Linear"], "protect_head": False}


# joint's whole-file target per model: the ResNets' BatchNorm tensors and manifest alone exceed
# 1% of their dense size, so 100x is infeasible there (joint refuses it with a clear error).
JOINT_TARGET = {
    "lenet300": 100,
    "lenet5": 100,
    "vgg_small": 100,
    "resnet_small": 25,
    "resnet18": 50,
}
# The same after statprune -> tucker: joint's ratio is relative to the model it receives (already
# 1.3-2.8x smaller), and the fixed rest (BatchNorm, manifest) stays.
JOINT_CHAIN_TARGET = {
    "vgg_small": 100,
    "resnet_small": 12,
    "resnet18": 20,
}
# First convs (they feed BatchNorm) and shortcut 1x1s keep 8 bits under bioclust's 4-bit
# codebooks: at 4 bits they cost most of the accuracy (docs/benchmarks/bioclust.md; on vgg_small
# after normsparse, features.0 alone at 4 bits drops test accuracy from 98.6% to 59.4%).
BIOCLUST_8BIT = {
    "re:^(conv1|stem\\.0|features\\.0)$": {"bits": 8},
    "re:(downsample|shortcut)": {"bits": 8},
}


def _recipe_steps(name: str) -> list[dict[str, Any]]:
    """The steps of a shipped recipe, with its recipe-level fine-tune folded into the last step."""
    from netshrink.recipe import Recipe

    recipe = Recipe.from_file(RECIPES / name)
    steps = [s.model_dump(exclude_defaults=True) for s in recipe.steps]
    if recipe.finetune is not None:
        steps[-1]["finetune"] = recipe.finetune.model_dump()
    return steps


def netshrink_methods(model: str, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """label -> recipe steps (dicts as in a YAML recipe) for ``model``."""
    ft = FT_QUICK if quick else FT
    convs = model not in ("lenet300", "lenet5")  # the paper-002/003 combinations target CNNs
    methods: dict[str, list[dict[str, Any]]] = {
        "magnitude 90% (global) + ft": [
            {
                "compressor": "magnitude",
                "select": EVERYTHING,
                "config": {"sparsity": 0.9, "scope": "global"},
                "finetune": ft,
            }
        ],
        "quantize 4-bit/ch": [
            {"compressor": "quantize", "select": EVERYTHING, "config": {"bits": 4}}
        ],
        "deep-compression style (magnitude 90% + ft + quantize 5-bit)": [
            {
                "compressor": "magnitude",
                "select": EVERYTHING,
                "config": {"sparsity": 0.9, "scope": "global"},
                "finetune": ft,
            },
            {"compressor": "quantize", "select": EVERYTHING, "config": {"bits": 5}},
        ],
    }
    if model in ("lenet300", "lenet5"):
        methods["svd (Linear, energy 0.9) + ft"] = [
            {
                "compressor": "svd",
                "select": {"types": ["Linear"]},
                "config": {"rank_by": "energy", "energy": 0.9},
                "finetune": ft,
            }
        ]
    methods.update(_plugin_methods(model, quick, ft, convs))
    return methods


def _plugin_methods(
    model: str, quick: bool, ft: dict[str, Any], convs: bool
) -> dict[str, list[dict[str, Any]]]:
    """The paper methods; filled in from each plugin's documented defaults."""
    out: dict[str, list[dict[str, Any]]] = {}
    bio = {
        "bits": 4,
        "population": 4 if quick else 16,
        "noise_scale": 0.5,
        "overrides": BIOCLUST_8BIT,
    }
    out["bioclust (4-bit codebook, 8-bit stem/shortcuts)"] = [
        {"compressor": "bioclust", "select": EVERYTHING, "config": bio}
    ]
    out["normsparse + ft"] = [
        {
            "compressor": "normsparse",
            "select": {"types": ["Linear", "Conv2d"]},
            "config": {"l1": 0.005, "epochs": 10 if quick else 30},
            "finetune": ft,
        }
    ]
    # recipes/joint_lenet5.yaml's settings (min_bits 3: ternary fc1 trained worse there).
    joint = {
        "target_ratio": JOINT_TARGET[model],
        "min_bits": 3,
        "epochs": 3 if quick else 10,
        "lr": 0.002,
        "batch_size": 32,
    }
    out[f"joint (adaptive sparsity+bits, {JOINT_TARGET[model]}x target)"] = [
        {"compressor": "joint", "select": EVERYTHING, "config": joint}
    ]
    if convs:
        # The paper-002 combination exactly as shipped (recipes/paper002_*.yaml): statprune on
        # narrow convs, Tucker-2 on wide ones, then a distilled fine-tune of the whole model.
        paper002 = _recipe_steps(
            "paper002_resnet18.yaml" if model == "resnet18" else "paper002_resnet_small.yaml"
        )
        out["statprune + tucker + distilled ft (paper 002 recipe)"] = paper002
        rl = {
            "compressor": "rlprune",
            "select": {"types": ["Conv2d"]},
            "config": {
                "target_sparsity": 0.8,
                "episodes": 12 if quick else 30,
                "warmup": 4 if quick else 8,
                "reward_samples": 200,
                "prior": "magnitude",
            },
        }
        if model == "vgg_small":
            paper003 = [
                rl,
                {
                    "compressor": "sigmaprune",
                    "select": {"types": ["Linear"]},
                    "config": {"k": 2.0, "statistic": "abs"},
                    "finetune": ft,
                },
            ]
            out["rlprune + sigmaprune + ft (paper 003)"] = paper003
            out["rlprune + sigmaprune + ft -> quantize 5-bit"] = [
                *paper003,
                {"compressor": "quantize", "select": EVERYTHING, "config": {"bits": 5}},
            ]
        else:  # ResNets have no FC layer but the head: the RL half of paper 003 only
            out["rlprune 80% conv weights + ft (paper 003, RL half)"] = [{**rl, "finetune": ft}]
        out["statprune -> tucker -> joint"] = [
            *paper002,
            {
                "compressor": "joint",
                "select": EVERYTHING,
                "config": {**joint, "target_ratio": JOINT_CHAIN_TARGET[model]},
            },
        ]
    out["normsparse -> bioclust"] = [
        {
            "compressor": "normsparse",
            "select": {"types": ["Linear", "Conv2d"]},
            "config": {"l1": 0.005, "epochs": 10 if quick else 30},
            "finetune": ft,
        },
        {"compressor": "bioclust", "select": EVERYTHING, "config": bio},
    ]
    return out
