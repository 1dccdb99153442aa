"""Fast settings for the conformance suite, kept with the tests rather than on the classes.

A compressor class describes the method; how briefly a test may run it is a test setting. Pass
it where the suite is called (``conformance_cases(cls, config={...})``,
``check_compressor(cls, config={...})``, ``pytest --netshrink-conformance-config
NAME='{...}'``, ``netshrink plugin check NAME --config '{...}'``). The built-in compressors
whose defaults train or search for too long get theirs from :data:`BUILTIN_FAST_CONFIGS`.
"""

from __future__ import annotations

from typing import Any

#: Built-in compressor name → config overrides that keep one tiny-model run to seconds.
BUILTIN_FAST_CONFIGS: dict[str, dict[str, Any]] = {
    # Two epochs of a strong constant penalty are enough to remove units.
    "normsparse": {"epochs": 2, "l1": 0.05, "schedule": "constant", "lr_magnitude": 0.05},
    "joint": {"epochs": 0, "target_ratio": 1.05, "calib_batches": 2},
    "rlprune": {"episodes": 4, "warmup": 2, "hidden": 16, "batch_size": 8},
}

#: Built-in compressor name → further configs the suite also runs, one per option that changes
#: what is stored or how codes are chosen (each on top of the fast config above).
BUILTIN_OPTION_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "quantize": [
        # Group scales, one of them ragged (the last group of each row shorter), asymmetric.
        {"bits": 4, "group_size": 32},
        {"bits": 3, "group_size": 5, "symmetric": False, "clip": "mse"},
        {"bits": 4, "clip": "percentile", "percentile": 99.0},
        # GPTQ codes on per-channel and on group scales, from two small calibration batches.
        {"bits": 4, "rounding": "gptq", "calibration_batches": 2, "calibration_batch_size": 16},
        {"bits": 4, "group_size": 16, "symmetric": False, "rounding": "gptq",
         "calibration_batches": 2, "calibration_batch_size": 16},
        # Static int8 activations (W8A8), calibrated on one batch.
        {"bits": 8, "activations": "int8", "calibration_batches": 1},
    ],
}

_BUILTIN_PACKAGE = "netshrink.plugins."


def builtin_fast_config(cls: type) -> dict[str, Any]:
    """The fast config netshrink ships for built-in compressor ``cls`` (``{}`` for any other
    class, a third-party one of the same name included)."""
    if not cls.__module__.startswith(_BUILTIN_PACKAGE):
        return {}
    return dict(BUILTIN_FAST_CONFIGS.get(getattr(cls, "name", ""), {}))
