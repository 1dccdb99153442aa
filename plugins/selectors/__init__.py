"""Named layer-selector presets (``select: convs-except-first`` in a recipe)."""

from __future__ import annotations

from netshrink import LayerSelector, hookimpl

PRESETS = {
    "all-linear": (LayerSelector(types=["Linear"]), "every Linear layer except the head"),
    "all-convs": (LayerSelector(types=["Conv2d"]), "every Conv2d layer"),
    "convs-except-first": (
        LayerSelector(types=["Conv2d"], skip_first=1),
        "every Conv2d except the first (the stem sees raw pixels)",
    ),
    "pointwise-convs": (
        LayerSelector(types=["Conv2d"], skip_depthwise=True),
        "Conv2d layers that are not depthwise",
    ),
    "everything": (
        LayerSelector(types=["Linear", "Conv2d"], protect_head=False),
        "every Linear and Conv2d layer, the head included",
    ),
}


@hookimpl
def register_layer_selectors(register):
    for name, (selector, description) in PRESETS.items():
        register(name, selector, description)
