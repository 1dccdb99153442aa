"""Measurements and the statistics that say what they can support.

Multiply-accumulates per layer; per-example correctness, the Wilson interval of an accuracy and
McNemar's paired test between two models scored on the same examples; latency with its spread
(``torch.utils.benchmark``), and the verdict that spread allows.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.utils.benchmark as tbench
from torch import nn

#: Significance level of the accuracy verdict (McNemar) and of the intervals (95%).
ALPHA = 0.05
#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054
#: A latency ratio is "too noisy to call" when its interleaved rounds disagree by more than this
#: factor (highest round's dense/compressed ratio over the lowest's) ...
NOISE_SPREAD = 1.5
#: ... or when either model's timed blocks have an interquartile range above this fraction of
#: their median (a machine busy with other work).
NOISE_IQR = 0.5
#: Rounds of latency measurement for a model that needs more than a block's time per call.
SLOW_ROUNDS = 3


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


@torch.no_grad()
def correct_per_example(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Whether ``model``'s top-1 prediction is right, one bool per example of ``batches`` in
    their order (model left in eval mode); its mean is the accuracy ``training.evaluate``
    reports, and two models scored on the same batches can be compared pair by pair."""
    model.eval()
    parts = [
        model(x.to(device)).argmax(1).cpu() == y.reshape(-1).cpu() for x, y in batches
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def state_digest(model: nn.Module) -> bytes | None:
    """A digest of every tensor of ``model``'s state dict (names, dtypes, shapes, bytes);
    ``None`` when one cannot be read as plain bytes (sparse, quantized or meta tensors)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided \
                or value.is_quantized or value.is_meta:
            return None
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(value.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.digest()


class BaselineCorrect:
    """The uncompressed model's :func:`correct_per_example` on a test split, reused while the
    same model object, with the same tensors, is scored on the same split object again.

    A benchmark compresses one reference model many times (each method, each seed); scoring
    the reference again each time was half the wall time of a post-training run on VGG-small.
    The result is reused only when the model is the same object (weakly referenced), its state
    dict hashes to the same digest, and the test split is the same object with the same
    length: change a weight, or pass other data, and it is measured again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one entry, read and replaced whole
        self._entry: tuple[tuple[Any, ...], weakref.ref[Any], weakref.ref[Any],
                           torch.Tensor] | None = None

    def get(self, model: nn.Module, split: Any, measure: Callable[[], torch.Tensor]
            ) -> torch.Tensor:
        """``measure()``'s result, or the one remembered for this model and split."""
        digest = state_digest(model)
        try:
            refs = (weakref.ref(model), weakref.ref(split))
        except TypeError:  # an object that takes no weak reference: never reused
            return measure()
        key = (type(model), digest, len(split))
        with self._lock:
            entry = self._entry
        if digest is not None and entry is not None and entry[0] == key \
                and entry[1]() is model and entry[2]() is split:
            return entry[3].clone()
        correct = measure()
        if digest is not None:
            with self._lock:
                self._entry = (key, *refs, correct.clone())
        return correct


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` measured on ``n`` examples
    (``(0, 1)`` when ``n`` is 0: nothing was measured).

    Unlike ``p ± z·sqrt(p(1-p)/n)`` it stays inside [0, 1] and keeps its coverage near 0 and 1
    (Wilson 1927; Brown, Cai & DasGupta 2001)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a proportion must be in [0, 1], got {p}")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); say so despite rounding.
    lo = 0.0 if p == 0 else max(0.0, centre - half)
    hi = 1.0 if p == 1 else min(1.0, centre + half)
    return lo, hi


def mcnemar_midp(only_first: int, only_second: int) -> float:
    """Two-sided mid-p value of McNemar's exact test on paired outcomes.

    ``only_first`` examples were right with the first model only, ``only_second`` with the
    second only (the discordant pairs; examples both got right or both got wrong say nothing
    about which is better). Under "equally accurate" each discordant pair goes either way with
    probability 1/2, so ``only_first ~ Binomial(only_first + only_second, 1/2)``. The mid-p
    value counts half the probability of the observed count: it keeps the test's level close
    to nominal without the exact test's conservatism (Fagerland, Lydersen & Laake 2013)."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be >= 0, got {only_first} and {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)

    def pmf(i: int) -> float:
        return math.exp(
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        )

    below = math.fsum(pmf(i) for i in range(k))
    return min(1.0, 2 * (below + 0.5 * pmf(k)))


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


class _BlockTimer:
    """Times ``model(x)`` in blocks of a fixed number of calls (``torch.utils.benchmark``).

    The block size is calibrated once, so that a block lasts about ``block_s`` seconds (timer
    overhead is then negligible), instead of re-estimated at every call as
    ``Timer.blocked_autorange`` does, which would cost more than the measurement itself for a
    small model."""

    def __init__(self, model: nn.Module, x: torch.Tensor, block_s: float) -> None:
        self.timer = tbench.Timer(
            "model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads()
        )
        once = self.timer.timeit(1).median
        self.number = max(1, min(10_000, round(block_s / max(once, 1e-7))))

    def blocks(self, count: int) -> list[float]:
        """Seconds per call, one figure per block."""
        return [self.timer.timeit(self.number).median for _ in range(count)]


@torch.inference_mode()
def compare_latency(
    dense: nn.Module,
    compressed: nn.Module,
    example: torch.Tensor,
    batches: tuple[int, ...] = (1, 64),
    rounds: int = 5,
    blocks: int = 3,
    block_s: float = 0.002,
) -> dict[str, dict[str, float]]:
    """Dense vs compressed latency with its spread, at each batch size.

    Each of ``rounds`` rounds times ``blocks`` blocks of each model (``torch.utils.benchmark``
    ``Timer``, a block about ``block_s`` seconds), alternating which model goes first, so
    background load hits both alike. Per batch size (key ``batch<N>``): ``dense_ms`` /
    ``compressed_ms`` (median over every block) with ``*_iqr_ms`` (their interquartile
    range); ``speedup`` (median over rounds of dense / compressed, each round's figure the
    median of its blocks) with ``speedup_low`` / ``speedup_high`` (the lowest and highest
    round) and ``rounds``. A model for which one call outlasts a block gets
    ``min(rounds, SLOW_ROUNDS)`` rounds of one block. :func:`latency_verdict` says what these
    figures support.
    """
    if rounds < 1 or blocks < 1:
        raise ValueError(f"rounds and blocks must be >= 1, got {rounds} and {blocks}")
    dense.eval()
    compressed.eval()
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        timers = {
            "dense": _BlockTimer(dense, x, block_s),
            "compressed": _BlockTimer(compressed, x, block_s),
        }
        # A model slower than a block: each block is one call plus the Timer's two warm-up
        # calls, so fewer of them keep the measurement within a few seconds.
        slow = max(t.number for t in timers.values()) == 1
        n_rounds, n_blocks = (min(rounds, SLOW_ROUNDS), 1) if slow else (rounds, blocks)
        times: dict[str, list[float]] = {name: [] for name in timers}
        ratios = []
        for r in range(n_rounds):
            medians = {}
            for name in list(timers) if r % 2 == 0 else list(reversed(timers)):
                round_times = timers[name].blocks(n_blocks)
                times[name].extend(round_times)
                medians[name] = statistics.median(round_times)
            ratios.append(medians["dense"] / medians["compressed"])
        ms = {name: [1000 * t for t in values] for name, values in times.items()}
        out[f"batch{batch}"] = {
            "dense_ms": round(statistics.median(ms["dense"]), 4),
            "dense_iqr_ms": round(_iqr(ms["dense"]), 4),
            "compressed_ms": round(statistics.median(ms["compressed"]), 4),
            "compressed_iqr_ms": round(_iqr(ms["compressed"]), 4),
            "speedup": round(statistics.median(ratios), 3),
            "speedup_low": round(min(ratios), 3),
            "speedup_high": round(max(ratios), 3),
            "rounds": n_rounds,
        }
    return out


def latency_verdict(figures: Mapping[str, float]) -> str:
    """What one batch size's :func:`compare_latency` figures support, in words.

    "too noisy to call" when the rounds' ratios disagree by more than :data:`NOISE_SPREAD`
    (highest / lowest) or either model's blocks have IQR / median above :data:`NOISE_IQR`;
    "no measurable difference" when the rounds' ratios lie on both sides of 1 but agree;
    otherwise the median ratio with its range, "faster" or "slower". Figures from older
    reports (no spread stored) give the ratio marked as a single median.
    """
    speedup = figures.get("speedup", float("nan"))
    low, high = figures.get("speedup_low"), figures.get("speedup_high")
    if low is None or high is None:
        return f"{speedup:.2f}x (a single median: spread not measured)"
    spread = f"{low:.2f}-{high:.2f}x over {figures.get('rounds', float('nan')):.0f} rounds"
    noisy = not low > 0 or high / low > NOISE_SPREAD
    for name in ("dense", "compressed"):
        median, iqr = figures.get(f"{name}_ms", 0.0), figures.get(f"{name}_iqr_ms", 0.0)
        noisy = noisy or not median > 0 or iqr / median > NOISE_IQR
    if noisy:
        return f"too noisy to call (ratio {spread})"
    if low <= 1 <= high:
        return f"no measurable difference (ratio {spread})"
    return f"{speedup:.2f}x {'faster' if low > 1 else 'slower'} ({spread})"
