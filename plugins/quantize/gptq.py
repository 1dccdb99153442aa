"""GPTQ rounding (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023,
https://arxiv.org/abs/2210.17323).

Per layer, ``H = mean(x xᵀ)`` over the layer's inputs on a few calibration batches (for a
Conv2d, the unfolded input patches, so the layer is a matmul over ``cin * kh * kw`` columns).
The weight's columns are then rounded in order, each onto the fixed grid chosen beforehand
(the scales the artifact stores), and each column's rounding error is spread over the columns
not yet rounded through the Cholesky factor of ``H⁻¹``: the greedy solution of
``min ||X Wᵀ - X Qᵀ||²`` column by column. Cost per layer: one ``K × K`` Cholesky inverse
(``K`` = input columns) and ``out * K²`` multiply-adds, plus one forward pass per
calibration batch for all layers together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netshrink import ConfigError, Quantized

#: Columns rounded together before the error is pushed to the rest (the paper's lazy batches).
BLOCK = 128
#: Largest input width (columns) whose ``K × K`` Hessian GPTQ builds (512 MiB in float64).
MAX_COLUMNS = 8192


def unsupported(module: nn.Module) -> str | None:
    """Why GPTQ cannot run on ``module`` (``None`` if it can): Linear and Conv2d only."""
    if type(module) is nn.Linear:
        columns = module.in_features
    elif type(module) is nn.Conv2d:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(
            module.padding, str
        ):
            return "a Conv2d with groups, non-zero padding mode or string padding"
        columns = module.weight[0].numel()
    else:
        return f"a {type(module).__name__} (GPTQ handles Linear and Conv2d)"
    if columns > MAX_COLUMNS:
        return f"{columns} input columns (more than {MAX_COLUMNS})"
    return None


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of its matmul: ``(rows, K)``."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def hessians(
    model: nn.Module, layers: dict[str, nn.Module], loader, batches: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """``mean(x xᵀ)`` (float64, on the CPU) of each layer's input rows over ``batches`` batches
    of ``loader``, from one forward pass per batch of the model as it is now."""
    sums = {name: torch.zeros(0, dtype=torch.float64) for name in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str, module: nn.Module):
        def fwd(_module, args, _output):
            x = _rows(module, args[0].detach()).to("cpu", torch.float64)
            sums[name] = x.T @ x if not counts[name] else sums[name] + x.T @ x
            counts[name] += x.shape[0]

        return fwd

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise ConfigError(
            f"quantize: rounding 'gptq' saw no calibration inputs for layer(s) {missing[:5]}: "
            "they did not run in the forward pass; select only layers the model uses"
        )
    return {name: sums[name] / counts[name] for name in layers}


def _inverse_factor(h: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp * mean(diag H)``; inputs that
    were always 0 get a unit diagonal (their columns round to nearest)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    lam = damp * float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h + lam * (10**attempt) * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ConfigError(
        f"quantize: layer {layer}: the calibration Hessian is not positive definite even with "
        f"damping {damp * 1000:g}x its mean diagonal; raise damp or calibration_batches"
    )


def gptq_codes(
    weight: torch.Tensor,
    h: torch.Tensor,
    grid: Quantized,
    damp: float,
    layer: str,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ codes ``(out, K)`` of ``weight`` (any shape, seen as ``(out, K)``) on ``grid``'s
    scales and zero points (a :class:`Quantized` of the same full shape).

    ``keep`` (a bool mask like ``weight``) marks the stored entries of a pruned tensor: the
    others stay exactly 0, and their drift is compensated like a rounding error.
    """
    out = weight.shape[0]
    w = weight.detach().to("cpu", torch.float32).reshape(out, -1).clone()
    k = w.shape[1]
    index = grid.scale_index().reshape(out, k)
    scale, zero = grid.scale[index], grid.zero_point[index]
    mask = None if keep is None else keep.to("cpu").reshape(out, k).bool()
    hinv = _inverse_factor(h, damp, layer).to(torch.float32)
    codes = torch.zeros(out, k, dtype=torch.int64)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            c = Quantized.round_codes(block[:, i], scale[:, col], zero[:, col], grid.bits)
            q = (c - zero[:, col]).float() * scale[:, col]
            if mask is not None:
                q = torch.where(mask[:, col], q, torch.zeros_like(q))
            codes[:, col] = c
            err = (block[:, i] - q) / hblock[i, i]
            block[:, i:] -= err[:, None] * hblock[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return codes
