"""Latency for the search: a layer as the packed runtime runs it (:func:`packed_layer`), the
inputs each layer receives, timing with ``torch.utils.benchmark`` and the latency budget's
parsing (:func:`parse_latency`).
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench
from torch import nn

from netshrink.artifact import load
from netshrink.encodings import Encoding
from netshrink.errors import ConfigError, NetshrinkError
from netshrink.runtime import is_packable, pack_tensor
from netshrink.search_candidates import _Holder

#: Seconds each latency figure is timed for (``Timer.blocked_autorange``'s ``min_run_time``).
LATENCY_MIN_RUN_S = 0.2

_LATENCY = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e-?\d+)?)\s*(%|s|ms|us)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@torch.inference_mode()
def _time_module(module: nn.Module, args: tuple[Any, ...]) -> float:
    """Seconds per call of ``module(*args)`` in eval mode: the median block of
    ``torch.utils.benchmark.Timer.blocked_autorange`` at this process's torch thread count
    (tests replace this function with a deterministic one)."""
    was_training = module.training
    module.eval()
    try:
        timer = tbench.Timer(
            "module(*args)", globals={"module": module, "args": args},
            num_threads=torch.get_num_threads(),
        )
        return float(timer.blocked_autorange(min_run_time=LATENCY_MIN_RUN_S).median)
    finally:
        module.train(was_training)


def _as_record(enc: Encoding) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor]]:
    """``enc``'s manifest record and a reader of its arrays, as an artifact stores them (flat
    arrays, read back by reference)."""
    arrays: list[torch.Tensor] = []

    def write(array: torch.Tensor) -> int:
        arrays.append(array.detach().cpu().contiguous().reshape(-1).clone())
        return len(arrays) - 1

    record = enc.to_record(write)
    return record, arrays.__getitem__


def packed_layer(module: nn.Module, encodings: dict[str, Encoding]) -> nn.Module:
    """A copy of ``module`` as ``netshrink.load(..., runtime="packed")`` runs it: each of its
    tensors whose encoding is packable (``encodings``, by name relative to ``module``) goes
    through :func:`netshrink.runtime.pack_tensor` from its manifest record, as the loader
    does (an int8 / int4 / CSR kernel module, or decoding on the fly); the rest stay dense."""
    holder = _Holder(copy.deepcopy(module))
    for name, enc in encodings.items():
        if is_packable(enc):
            record, read = _as_record(enc)
            pack_tensor(holder, f"layer.{name}", record, read, Encoding.from_record(record, read))
    return holder.layer


def _latency_example(inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """The first validation input repeated to ``batch`` rows (what latency is timed on)."""
    return inputs[:1].expand(batch, *inputs.shape[1:]).contiguous()


@torch.no_grad()
def _layer_inputs(
    model: nn.Module, layers: Sequence[str], example: torch.Tensor
) -> dict[str, tuple[Any, ...]]:
    """The positional inputs each of ``layers`` receives (its first call) when ``model`` runs
    ``example``: the real input shapes each layer is timed on."""
    found: dict[str, tuple[Any, ...]] = {}

    def grab(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in found:
                found[name] = tuple(
                    a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args
                )

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(grab(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in found]
    if missing:
        raise NetshrinkError(
            f"search: layers {missing[:4]} did not run in a forward pass of the model, so their "
            "latency cannot be timed; leave them out of 'select'"
        )
    return found


def _packed_latency(artifact: bytes, example: torch.Tensor) -> float:
    """Seconds per call of the artifact loaded with ``runtime="packed"`` on ``example``."""
    with tempfile.TemporaryDirectory(prefix="netshrink-search-") as folder:
        path = Path(folder) / "model.nsk"
        path.write_bytes(artifact)
        model = load(path, runtime="packed")
    return _time_module(model, (example,))


def parse_latency(max_latency: float | str, dense_latency: float) -> float:
    """The latency budget in seconds per batch: a number of seconds (``0.002``), a string with
    a unit (``"0.002"``, ``"2ms"``, ``"150us"``, ``"0.5s"``), or a percentage of the dense
    model's measured latency ``dense_latency`` (``"80%"``; above 100% allows a slower model)."""
    bad = (
        f"search field 'max_latency': {max_latency!r} is not a latency; give seconds per batch "
        "(0.002), a time with a unit ('2ms', '150us') or a share of the dense model's measured "
        "latency ('80%')"
    )
    if isinstance(max_latency, bool) or not isinstance(max_latency, (int, float, str)):
        raise ConfigError(bad)
    if isinstance(max_latency, str):
        match = _LATENCY.match(max_latency)
        if not match:
            raise ConfigError(bad)
        value, unit = float(match.group(1)), (match.group(2) or "s").lower()
    else:
        value, unit = float(max_latency), "s"
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"search field 'max_latency': must be positive, got {max_latency!r}")
    if unit == "%":
        return value / 100 * dense_latency
    return value * _SECONDS[unit]


__all__ = [
    "LATENCY_MIN_RUN_S",
    "packed_layer",
    "parse_latency",
]
