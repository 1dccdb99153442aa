"""Layer-wise allocation of sparsity and bit-width under a byte budget.

Why this method: every candidate ``(sparsity, bits)`` of every layer gets (a) its exact stored
size, from the very encoding the export will write (index bytes of the magnitude mask, packed
codes, scales), and (b) a predicted loss increase ``ΔL ≈ ½ E[Σ (∂L/∂y)² (Δy)²]``, where ``Δy``
is the change of the layer's outputs on calibration inputs when its weights are pruned and
rounded, and ``∂L/∂y`` the output gradient against labels sampled from the model (Gauss-Newton
/ Fisher, diagonal in the outputs). Both are additive over layers and in the same units for
every layer, so choosing one candidate per layer to minimise the summed ΔL under the summed
bytes is a multiple-choice knapsack, solved by a Lagrangian sweep (``min ΔL + λ·bytes`` per
layer, bisection on λ) and a greedy fill of the remaining bytes. The calibration costs one
forward/backward pass per batch and each candidate one matrix product on sampled rows, where
measuring every candidate on data would cost layers × sparsities × bit-widths full evaluations
(hundreds of passes for the small VGG). A per-weight (diagonal) Fisher was tried first: it
ignores that the errors of a unit's hundreds of inputs add up; on LeNet-5 it put the 400K-weight
FC layer at the largest candidate sparsity while keeping the head dense at 7 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from netshrink import ConfigError, Dense, Sparse, packed_nbytes
from netshrink.plugins.joint.quant import fit_scale, quantize


@dataclass(frozen=True)
class Candidate:
    """One (sparsity, bits) choice for a layer, with its stored bytes and predicted ΔL."""

    sparsity: float
    bits: int
    bytes: int
    dloss: float


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the largest ``1 - sparsity`` of ``weight`` by magnitude (inside ``prior``)."""
    score = weight.detach().abs().float()
    if prior is not None:
        score = torch.where(prior, score, torch.full_like(score, -1.0))
    n = score.numel()
    keep = n - round(sparsity * n)
    if prior is not None:
        keep = min(keep, int(prior.sum()))
    mask = torch.zeros(n, dtype=torch.bool)
    if keep > 0:
        idx = torch.topk(score.reshape(-1), keep, sorted=False).indices
        mask[idx] = True
    return mask.reshape(weight.shape)


@dataclass
class Calibration:
    """What one layer saw on calibration data: input rows ``x`` (samples, or sampled output
    positions of a conv, unfolded) and the squared loss gradients ``g2`` at its outputs for
    the same rows; ``per_row`` turns a sum over rows into a mean loss per example."""

    x: torch.Tensor
    g2: torch.Tensor
    per_row: float
    inputs: torch.Tensor | None = None  # raw inputs, for convs that are not unfolded


def calibrate(
    model: nn.Module,
    layers: dict[str, nn.Module],
    loader,
    batches: int,
    device: torch.device,
    seed: int = 0,
    max_rows: int = 1024,
) -> dict[str, Calibration]:
    """Inputs and squared output gradients of every layer in ``layers`` over ``batches``.

    Labels are sampled from the model's own prediction (the "true" Fisher): the empirical
    Fisher vanishes on a model that fits its training data, which says nothing about how much
    a layer matters."""
    gen = torch.Generator().manual_seed(seed)
    seen_in: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    seen_g: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = []

    def hook(name):
        def fwd(_module, args, output):
            if output.requires_grad:
                seen_in[name].append(args[0].detach().cpu())
                output.register_hook(lambda g: seen_g[name].append(g.detach().cpu()))

        return fwd

    for name, module in layers.items():
        handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()  # the deployed model (BatchNorm on running statistics)
    examples = 0
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            # A module that caches tensors built from its parameters in eval mode (timm's
            # LeViT attention biases) drops them when put in training mode; a cache kept from
            # the last batch would be backpropagated through twice.
            model.train()
            model.eval()
            logits = model(x.to(device))
            sampled = torch.multinomial(
                F.softmax(logits.detach().float().cpu(), 1), 1, generator=gen
            ).reshape(-1)
            # Summed (not mean) loss: per-example gradients, comparable across batch sizes.
            F.cross_entropy(logits, sampled.to(logits.device), reduction="sum").backward()
            examples += len(x)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    out = {}
    for name, module in layers.items():
        x = torch.cat(seen_in[name])
        # One gradient per batch, in batch order: it lines up with the inputs.
        g = torch.cat(seen_g[name])
        out[name] = _rows(module, x, g, examples, max_rows, gen)
    return out


def _rows(
    module: nn.Module,
    x: torch.Tensor,
    g: torch.Tensor,
    examples: int,
    max_rows: int,
    gen: torch.Generator,
) -> Calibration:
    if isinstance(module, nn.Linear):
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    elif (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (examples * positions, cin*k*k)
        g = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    else:  # other convs: keep raw inputs and run the conv itself on weight errors
        return Calibration(x=torch.empty(0), g2=g**2, per_row=1.0 / max(examples, 1), inputs=x)
    rows = x.shape[0]
    if rows > max_rows:  # sample output positions: an unbiased estimate at a fixed cost
        pick = torch.randperm(rows, generator=gen)[:max_rows]
        x, g = x[pick], g[pick]
    return Calibration(x=x, g2=g**2, per_row=rows / x.shape[0] / max(examples, 1))


def predicted_dloss(module: nn.Module, calib: Calibration, delta: torch.Tensor) -> float:
    """``½ E[Σ (∂L/∂y)² (Δy)²]``: the loss increase predicted when the layer's weight changes
    by ``delta`` (Gauss-Newton, diagonal in the outputs). Unlike a per-weight Fisher it sees
    how weight errors add up over a unit's many inputs."""
    if calib.inputs is not None:
        dy = module._conv_forward(calib.inputs, delta.to(calib.inputs.dtype), None)
    else:
        dy = calib.x @ delta.reshape(delta.shape[0], -1).t()
    return 0.5 * float((calib.g2 * dy**2).sum()) * calib.per_row


def candidates(
    weight: torch.Tensor,
    sensitivity,
    sparsities: list[float],
    bits: list[int],
    per_channel: bool,
    prior: torch.Tensor | None,
) -> list[Candidate]:
    """Every ``(sparsity, bits)`` of one layer with its exact stored bytes and predicted ΔL.

    ``sensitivity(delta) -> float`` predicts the loss increase of a weight change ``delta``."""
    weight = weight.detach().float().cpu()
    channels = weight.shape[0] if per_channel and weight.dim() > 1 else 1
    out = []
    for s in sparsities:
        mask = magnitude_mask(weight, s, prior)
        kept = int(mask.sum())
        # Index bytes as the artifact will store them (bitmask or relative indices).
        index = (
            Sparse(
                tuple(weight.shape),
                torch.nonzero(mask.reshape(-1)).reshape(-1),
                Dense(torch.zeros(kept, dtype=torch.uint8)),
            ).payload_bytes
            - kept
        )
        masked = weight * mask
        for b in bits:
            if b == 1 or channels == 1:
                scale = fit_scale(masked[mask], b)
            else:
                scale = fit_scale(masked, b, channels)
            approx = quantize(masked, b, scale)
            dloss = float(sensitivity(weight - approx))
            scale_bytes = 8 if b == 1 else (4 * channels if channels > 1 else 0)
            out.append(Candidate(s, b, index + packed_nbytes(kept, b) + scale_bytes, dloss))
    return out


def _pick(options: list[Candidate], lam: float) -> Candidate:
    return min(options, key=lambda c: (c.dloss + lam * c.bytes, c.bytes))


def allocate_fisher(options: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate]:
    """One candidate per layer minimising summed ΔL with summed bytes <= ``budget``."""
    cheapest = {n: min(opts, key=lambda c: (c.bytes, c.dloss)) for n, opts in options.items()}
    _check_feasible(cheapest, budget)
    lo, hi = -30.0, 30.0  # log10 of λ
    best = cheapest
    for _ in range(80):
        mid = (lo + hi) / 2
        choice = {n: _pick(opts, 10.0**mid) for n, opts in options.items()}
        if sum(c.bytes for c in choice.values()) <= budget:
            best, hi = choice, mid
        else:
            lo = mid
    return _greedy_fill(options, best, budget)


def _greedy_fill(
    options: dict[str, list[Candidate]], choice: dict[str, Candidate], budget: int
) -> dict[str, Candidate]:
    """Spend leftover bytes on the upgrades with the best ΔL reduction per byte."""
    choice = dict(choice)
    while True:
        left = budget - sum(c.bytes for c in choice.values())
        best_gain, best_move = 0.0, None
        for name, opts in options.items():
            cur = choice[name]
            for c in opts:
                extra = c.bytes - cur.bytes
                gain = cur.dloss - c.dloss
                if gain <= 0 or extra > left:
                    continue
                rate = gain / max(extra, 1)
                if rate > best_gain:
                    best_gain, best_move = rate, (name, c)
        if best_move is None:
            return choice
        choice[best_move[0]] = best_move[1]


def allocate_uniform(options: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate]:
    """The same (sparsity, bits) for every layer (overridden layers keep their fixed part).

    For each bit-width the lowest sparsity that fits ``budget`` (a pattern that leaves bytes
    unused is never the fixed-pattern baseline anyone would pick); among those, the lowest
    predicted ΔL."""
    cheapest = {n: min(opts, key=lambda c: (c.bytes, c.dloss)) for n, opts in options.items()}
    _check_feasible(cheapest, budget)
    pairs = sorted({(c.sparsity, c.bits) for opts in options.values() for c in opts})
    frontier: dict[int, tuple[dict[str, Candidate], float]] = {}
    for s, b in pairs:  # ascending sparsity: the first that fits is the lowest
        if b in frontier:
            continue
        choice = {}
        for name, opts in options.items():
            match = (
                [c for c in opts if (c.sparsity, c.bits) == (s, b)]
                or [c for c in opts if c.sparsity == s or c.bits == b]
                or opts
            )
            choice[name] = min(match, key=lambda c: (c.bytes, c.dloss))
        if sum(c.bytes for c in choice.values()) <= budget:
            frontier[b] = (choice, sum(c.dloss for c in choice.values()))
    if not frontier:
        raise ConfigError(
            f"no single (sparsity, bits) for all layers fits the weight budget of {budget} bytes; "
            "add larger sparsities or lower bit-widths, or use allocation: fisher"
        )
    return min(frontier.values(), key=lambda item: item[1])[0]


def _check_feasible(cheapest: dict[str, Candidate], budget: int) -> None:
    need = sum(c.bytes for c in cheapest.values())
    if need > budget:
        raise ConfigError(
            f"target_ratio/target_bytes: the smallest candidates (largest sparsity, fewest bits) "
            f"need {need} bytes of weights but the budget leaves {budget}; lower the target, "
            "add larger sparsities, lower min_bits or select more layers"
        )
