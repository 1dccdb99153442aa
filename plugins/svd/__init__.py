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
    rank: int | None = Field(
        None,
        ge=1,
        description="Exact rank (capped at min(in, out)); when set, wins over `rank_by`. "
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
    """Truncated-SVD factorisation of Linear layers into two smaller Linear layers."""

    name = "svd"
    Config = SVDConfig
    capabilities = Capabilities(handles=("Linear",), changes_structure=True, needs_finetune=True)
    paper = ('Denton, Zaremba, Bruna, LeCun, Fergus, "Exploiting Linear Structure Within '
             'Convolutional Networks for Efficient Evaluation", NeurIPS 2014, '
             'https://arxiv.org/abs/1404.0736')
    config: SVDConfig
    layer_fields = ("rank", "rank_by", "ratio", "energy")
    #: Ranks a search offers per layer, as fractions of the full rank.
    search_fractions = (1 / 16, 1 / 8, 1 / 4)

    @classmethod
    def layer_options(cls, module, name):
        """One option per distinct rank of :attr:`search_fractions` whose factorised form is
        smaller; bytes of the two dense float32 factors (and the bias), MACs per sample."""
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
        records = []
        for lname, module in ctx.progress(layers, desc="factorise"):
            cfg = self.config_for(lname)
            factors = truncated_svd(module.weight, lambda s, _cfg=cfg: choose_rank(s, _cfg))
            s, rank = factors.singular_values, factors.rank
            out_f, in_f = module.weight.shape
            before = out_f * in_f
            after = rank * (in_f + out_f)
            details = {
                "rank": rank,
                "full_rank": s.numel(),
                "energy_kept": round(float((s[:rank] ** 2).sum() / (s**2).sum()), 6),
            }
            if cfg.only_if_smaller and after >= before:
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
