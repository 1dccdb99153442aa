"""``svd``: low-rank factorisation by truncated SVD, W ≈ U·V (Denton et al. 2014,
https://arxiv.org/abs/1404.0736). Rank from a ratio of the full rank or an energy threshold.

A Linear layer becomes two smaller plain ``nn.Linear`` layers. A Conv2d ``W (O, I, kh, kw)`` is
factorised as the matrix ``(O, I·kh·kw)``: a ``kh x kw`` convolution ``I -> r`` (the original
stride, padding, dilation and padding mode) then a 1x1 convolution ``r -> O`` (the original
bias). Grouped convolutions and subclasses that override ``forward`` are skipped with the reason
in the layer's record, and so is a layer the model still needs as it was (a forward pass checks
the factorised model; :func:`netshrink.replace_or_put_back`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from netshrink import (
    Capabilities,
    Compressor,
    CompressorConfig,
    LayerRecord,
    StepResult,
    hookimpl,
    rank_by_energy,
    rank_by_ratio,
    replace_or_put_back,
    truncated_svd,
)


class SVDConfig(CompressorConfig):
    """Configuration of :class:`SVD`."""

    rank_by: Literal["ratio", "energy"] = Field(
        "ratio",
        description="'ratio': rank = ratio x full rank; 'energy': smallest rank keeping "
        "`energy` of the squared singular values.",
    )
    ratio: float = Field(
        0.25, gt=0, le=1,
        description="Rank as a fraction of the full rank: min(in, out) for Linear, "
        "min(out_channels, in_channels x kernel area) for Conv2d.")
    energy: float = Field(0.9, gt=0, le=1, description="Fraction of spectral energy to keep.")
    rank: int | None = Field(
        None,
        ge=1,
        description="Exact rank (capped at the full rank); when set, wins over `rank_by`. "
        "What a search's per-layer choice sets.",
    )
    only_if_smaller: bool = Field(
        True, description="Leave a layer alone when the factorised form would not be smaller."
    )


def choose_rank(singular: torch.Tensor, cfg: SVDConfig) -> int:
    """The rank the config asks for, given the singular values."""
    if cfg.rank is not None:
        return min(cfg.rank, singular.numel())
    if cfg.rank_by == "ratio":
        return rank_by_ratio(singular.numel(), cfg.ratio)
    return rank_by_energy(singular, cfg.energy)


class SVD(Compressor):
    """Truncated-SVD factorisation of Linear and Conv2d layers into two smaller layers."""

    name = "svd"
    Config = SVDConfig
    capabilities = Capabilities(handles=("Linear", "Conv2d"), changes_structure=True,
                                needs_finetune=True)
    paper = ('Denton, Zaremba, Bruna, LeCun, Fergus, "Exploiting Linear Structure Within '
             'Convolutional Networks for Efficient Evaluation", NeurIPS 2014, '
             'https://arxiv.org/abs/1404.0736')
    config: SVDConfig
    layer_fields = ("rank", "rank_by", "ratio", "energy")
    #: Ranks a search offers per layer, as fractions of the full rank.
    search_fractions = (1 / 16, 1 / 8, 1 / 4)

    @classmethod
    def layer_options(cls, module, name):
        """For a Linear layer, one option per distinct rank of :attr:`search_fractions` whose
        factorised form is smaller; bytes of the two dense float32 factors (and the bias), MACs
        per sample. Convolutions are offered by :mod:`tucker`, which knows their kernels."""
        if not isinstance(module, nn.Linear):
            return []
        out_f, in_f = module.weight.shape
        full = min(out_f, in_f)
        bias = out_f if getattr(module, "bias", None) is not None else 0
        size = torch.empty(0).element_size()  # the factors are new default-dtype nn.Linear
        options = []
        for rank in sorted({max(1, round(f * full)) for f in cls.search_fractions}):
            if rank * (in_f + out_f) >= in_f * out_f:
                continue  # only_if_smaller would leave the layer alone
            stored = (rank * (in_f + out_f) + bias) * size
            options.append(cls.option({"rank": rank}, bytes=stored, macs=rank * (in_f + out_f)))
        return options

    def compress(self, model, layers, ctx) -> StepResult:
        found: list[tuple[str, dict[str, Any]]] = []
        replacements: dict[str, nn.Module] = {}
        for lname, module in ctx.progress(layers, desc="factorise"):
            details, replacement = self._factorise(lname, module)
            if replacement is not None:
                replacement.train(module.training)
                replacements[lname] = replacement
            found.append((lname, details))
        # a layer the model still needs as it was (its type or attributes) is put back
        put_back = replace_or_put_back(model, replacements, ctx.example_input_if_known(1))
        for lname, details in found:
            if lname in put_back:
                details["skipped"] = put_back[lname]
        return StepResult(model, [LayerRecord(lname, details) for lname, details in found])

    def _factorise(self, lname: str, module: nn.Module) -> tuple[dict[str, Any], nn.Module | None]:
        """The record's details and the replacement of one layer (None: left alone)."""
        cfg = self.config_for(lname)
        if isinstance(module, nn.Conv2d):
            why = _conv_refusal(module)
            if why:
                return {"skipped": why}, None
            matrix = module.weight.reshape(module.out_channels, -1)
        else:
            matrix = module.weight
        factors = truncated_svd(matrix, lambda s, _cfg=cfg: choose_rank(s, _cfg))
        s, rank = factors.singular_values, factors.rank
        out_f, in_f = matrix.shape
        before, after = out_f * in_f, rank * (in_f + out_f)
        details: dict[str, Any] = {
            "rank": rank,
            "full_rank": s.numel(),
            "energy_kept": round(float((s[:rank] ** 2).sum() / (s**2).sum()), 6),
        }
        if cfg.only_if_smaller and after >= before:
            return {**details, "skipped": "factorised form is not smaller"}, None
        if isinstance(module, nn.Conv2d):
            return details, _conv_factors(module, factors.left, factors.right)
        return details, _linear_factors(module, factors.left, factors.right)


def _conv_refusal(conv: nn.Conv2d) -> str:
    """Why ``conv`` cannot be factorised as one matrix ('' when it can)."""
    if type(conv).forward is not nn.Conv2d.forward:
        # e.g. timm's StdConv2d (weight standardisation) or Conv2dSame (dynamic padding)
        return (f"{type(conv).__name__} overrides Conv2d.forward; plain Conv2d factors would "
                "compute something else")
    if conv.groups > 1:
        return (f"grouped conv (groups={conv.groups}): its weight is {conv.groups} separate "
                "matrices, not one")
    return ""


def _linear_factors(linear: nn.Linear, left: torch.Tensor, right: torch.Tensor) -> nn.Module:
    """``Linear(in, r, bias=False) -> Linear(r, out)`` (the original bias), from
    ``W ~ left @ right``."""
    rank = right.shape[0]
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_(right.float())
        second.weight.copy_(left.float())
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second)


def _conv_factors(conv: nn.Conv2d, left: torch.Tensor, right: torch.Tensor) -> nn.Module:
    """``Conv2d(I, r, k)`` (the original stride, padding, dilation, padding mode) then
    ``Conv2d(r, O, 1)`` (the original bias), from ``W.reshape(O, -1) ~ left @ right``."""
    rank = right.shape[0]
    first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, bias=False,
                      padding_mode=conv.padding_mode)
    second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(right.reshape(first.weight.shape).float())
        second.weight.copy_(left[:, :, None, None].float())
        if conv.bias is not None:
            second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second)


@hookimpl
def register_compressors(register):
    register(SVD)
