"""``svd``: low-rank factorisation of Linear layers by truncated SVD, W ≈ U·V, replacing each
layer with two smaller plain ``nn.Linear`` layers (Denton et al. 2014,
https://arxiv.org/abs/1404.0736). Rank from a ratio of the full rank or an energy threshold."""

from __future__ import annotations

from typing import Literal

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
    truncated_svd,
)


class SVDConfig(CompressorConfig):
    """Configuration of :class:`SVD`."""

    rank_by: Literal["ratio", "energy"] = Field(
        "ratio",
        description="'ratio': rank = ratio x full rank; 'energy': smallest rank keeping "
        "`energy` of the squared singular values.",
    )
    ratio: float = Field(0.25, gt=0, le=1, description="Rank as a fraction of min(in, out).")
    energy: float = Field(0.9, gt=0, le=1, description="Fraction of spectral energy to keep.")
    only_if_smaller: bool = Field(
        True, description="Leave a layer alone when the factorised form would not be smaller."
    )


def choose_rank(singular: torch.Tensor, cfg: SVDConfig) -> int:
    """The rank the config asks for, given the singular values."""
    if cfg.rank_by == "ratio":
        return rank_by_ratio(singular.numel(), cfg.ratio)
    return rank_by_energy(singular, cfg.energy)


class SVD(Compressor):
    """Truncated-SVD factorisation of Linear layers into two smaller Linear layers."""

    name = "svd"
    Config = SVDConfig
    capabilities = Capabilities(handles=("Linear",), changes_structure=True, needs_finetune=True)
    paper = ('Denton, Zaremba, Bruna, LeCun, Fergus, "Exploiting Linear Structure Within '
             'Convolutional Networks for Efficient Evaluation", NeurIPS 2014, '
             'https://arxiv.org/abs/1404.0736')
    config: SVDConfig

    def compress(self, model, layers, ctx) -> StepResult:
        records = []
        for lname, module in ctx.progress(layers, desc="factorise"):
            factors = truncated_svd(module.weight, lambda s: choose_rank(s, self.config))
            s, rank = factors.singular_values, factors.rank
            out_f, in_f = module.weight.shape
            before = out_f * in_f
            after = rank * (in_f + out_f)
            details = {
                "rank": rank,
                "full_rank": s.numel(),
                "energy_kept": round(float((s[:rank] ** 2).sum() / (s**2).sum()), 6),
            }
            if self.config.only_if_smaller and after >= before:
                details["skipped"] = "factorised form is not smaller"
                records.append(LayerRecord(lname, details))
                continue
            first = nn.Linear(in_f, rank, bias=False)
            second = nn.Linear(rank, out_f, bias=module.bias is not None)
            with torch.no_grad():
                first.weight.copy_(factors.right.float())
                second.weight.copy_(factors.left.float())
                if module.bias is not None:
                    second.bias.copy_(module.bias.detach())
            parent_name, _, child = lname.rpartition(".")
            setattr(model.get_submodule(parent_name), child, nn.Sequential(first, second))
            records.append(LayerRecord(lname, details))
        return StepResult(model, records)


@hookimpl
def register_compressors(register):
    register(SVD)
