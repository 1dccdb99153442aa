"""Measurements: multiply-accumulates per layer and latency (median of repeated forward passes)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of one forward pass of ``example`` (batch 1), per Conv/Linear
    module (dense: zeros in sparse weights still cost a MAC on dense hardware)."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(module: nn.Module, inputs, output) -> None:
            out = output if isinstance(output, torch.Tensor) else output[0]
            per_sample = out.numel() // max(out.shape[0], 1)
            if isinstance(module, nn.modules.conv._ConvNd):
                k = module.weight[0].numel()  # (in/groups) * kernel
                macs[name] = macs.get(name, 0) + per_sample * k
            elif isinstance(module, nn.Linear):
                macs[name] = macs.get(name, 0) + per_sample * module.in_features

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


@torch.inference_mode()
def latency_ms(
    model: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time of a forward pass of ``example`` in milliseconds."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(example)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def compare_latency(
    dense: nn.Module,
    compressed: nn.Module,
    example: torch.Tensor,
    batches: tuple[int, ...] = (1, 64),
) -> dict[str, dict[str, float]]:
    """Dense vs compressed latency, interleaved in one run, at each batch size."""
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        repeats = 30 if batch == 1 else 8
        # Interleave rounds so background load affects both models alike.
        d_times, c_times = [], []
        for _ in range(3):
            d_times.append(latency_ms(dense, x, repeats=repeats // 3 or 1, warmup=1))
            c_times.append(latency_ms(compressed, x, repeats=repeats // 3 or 1, warmup=1))
        d, c = statistics.median(d_times), statistics.median(c_times)
        out[f"batch{batch}"] = {
            "dense_ms": round(d, 4),
            "compressed_ms": round(c, 4),
            "speedup": round(d / c, 3) if c > 0 else float("nan"),
        }
    return out
