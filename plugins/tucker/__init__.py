"""``tucker``: Tucker-2 decomposition of convolutions and SVD of linear layers (paper 002: Gong,
Zhang, Zeng, "Convolution neural network model compression method based on pruning and tensor
decomposition", Journal of Computer Applications 40(11):3146-3151, 2020,
https://doi.org/10.11772/j.issn.1001-9081.2020030362; Tucker-2 for CNNs after Kim et al., ICLR
2016, https://arxiv.org/abs/1511.06530).

A ``kxk`` convolution ``W (O, I, k, k)`` is approximated by HOOI over its two channel modes
(``backend``: netshrink's Gram-matrix iterations by default, or tensorly's ``partial_tucker``)
and replaced by three cascaded convolutions: ``1x1 I->R_in``,
``kxk R_in->R_out`` (the original stride, padding and dilation) and ``1x1 R_out->O`` (the original
bias). A linear layer (and a 1x1 convolution) becomes two factors of a truncated SVD. Ranks come
from a ratio, an energy threshold or VBMF; a layer is replaced only when that saves parameters.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from netshrink import (
    Capabilities,
    Compressor,
    CompressorConfig,
    LayerRecord,
    NetshrinkError,
    StepResult,
    hookimpl,
    rank_by_energy,
    rank_by_ratio,
    rank_by_vbmf,
    replace_or_put_back,
    singular_values,
    truncated_svd,
)
from netshrink.plugins.tucker.factorize import (
    svd_linear,
    svd_params,
    svd_pointwise,
    tucker2,
    tucker2_conv,
    tucker2_error,
    tucker2_params,
)

PAPER = ('Gong Kaiqiang, Zhang Chunmei, Zeng Guanghua, "Convolution neural network model '
         'compression method based on pruning and tensor decomposition", Journal of Computer '
         'Applications (计算机应用) 40(11):3146-3151, 2020')


class TuckerConfig(CompressorConfig):
    """Configuration of :class:`Tucker`."""

    method: Literal["ratio", "energy", "vbmf"] = Field(
        "ratio", description="How ranks are chosen: 'ratio' (a fraction of the channels), "
        "'energy' (keep this share of each unfolding's squared singular values) or 'vbmf' "
        "(empirical variational Bayesian matrix factorisation, no knob).")
    rank: float = Field(
        0.5, gt=0.0, le=1.0, description="method='ratio': ranks = ceil(rank * channels) per "
        "mode (for SVD: of min(in, out)).")
    energy: float = Field(
        0.9, gt=0.0, le=1.0, description="method='energy': share of squared singular values kept.")
    min_rank: int = Field(1, ge=1, description="Lower bound on every rank (VBMF may return 0).")
    round_to: int = Field(
        1, ge=1, le=256, description="Ranks are rounded up to a multiple of this (capped at the "
        "channel count).")
    min_saving: float = Field(
        0.1, ge=0.0, lt=1.0, description="Replace a layer only if the factors have at most "
        "(1 - min_saving) of its parameters (0: any strict saving).")
    pointwise: Literal["svd", "skip"] = Field(
        "svd", description="1x1 convolutions: 'svd' (two 1x1 convs, like a linear layer) or "
        "'skip'.")
    grouped: Literal["skip", "error"] = Field(
        "skip", description="Grouped/depthwise convolutions cannot be Tucker-2 decomposed as "
        "one tensor: 'skip' records the reason, 'error' stops the step.")
    n_iter_max: int = Field(10, ge=1, le=1000, description="HOOI iterations at most (after the "
                            "HOSVD initialisation).")
    backend: Literal["gram", "tensorly"] = Field(
        "gram", description="HOOI implementation: 'tensorly' (tensorly.partial_tucker, full SVDs "
        "of the unfoldings) or 'gram' (the same iterations with eigendecompositions of the small "
        "Gram matrices; ~10x faster on CPU, same result).")
    tol: float = Field(1e-4, gt=0.0, le=1.0, description="HOOI stopping tolerance.")


class Tucker(Compressor):
    """Tucker-2 decomposition of convolutions (1x1 -> kxk core -> 1x1) and SVD of linear layers."""

    name = "tucker"
    Config = TuckerConfig
    capabilities = Capabilities(handles=("Conv2d", "Linear"), changes_structure=True,
                                needs_finetune=True)
    paper = PAPER
    config: TuckerConfig
    #: Ranks a search offers per convolution, as fractions of the channels (``rank``).
    search_ranks = (0.25, 0.5)

    @classmethod
    def layer_options(cls, module, name):
        """For a plain, ungrouped ``Conv2d`` (linear layers are :mod:`svd`'s): one option per
        rank of :attr:`search_ranks` that the default ``min_saving`` lets through; bytes of
        the factors in the layer's dtype (and the bias). A kxk convolution becomes Tucker-2
        factors, a 1x1 one two SVD factors."""
        if not isinstance(module, nn.Conv2d) or type(module).forward is not nn.Conv2d.forward \
                or module.groups > 1:
            return []
        size = module.weight.element_size()
        before = sum(p.numel() for p in module.parameters(recurse=False))
        keep = 1 - TuckerConfig().min_saving
        options = []
        o, i = module.out_channels, module.in_channels
        for ratio in cls.search_ranks:
            if module.kernel_size == (1, 1):
                after = svd_params(o, i, rank_by_ratio(min(o, i), ratio), module.bias is not None)
            else:
                after = tucker2_params(module, rank_by_ratio(o, ratio), rank_by_ratio(i, ratio))
            if after <= keep * before and after < before:
                options.append(cls.option({"rank": ratio}, bytes=after * size))
        return options

    def compress(self, model, layers, ctx) -> StepResult:
        records: list[LayerRecord] = []
        params_before = sum(p.numel() for p in model.parameters())
        replacements: dict[str, nn.Module] = {}
        for index, (lname, module) in enumerate(ctx.progress(layers, desc="decompose")):
            details, replacement = self._factorise(lname, module, ctx.seed + index)
            if replacement is not None:
                replacement.train(module.training)
                replacements[lname] = replacement
                details["params_after"] = sum(p.numel() for p in replacement.parameters())
            records.append(LayerRecord(lname, details))
        # a layer the model still needs as it was (its type or attributes) is put back
        put_back = replace_or_put_back(model, replacements, ctx.example_input_if_known(1))
        for record in records:
            if record.name in put_back:
                record.details.pop("params_after", None)
                record.details["skipped"] = put_back[record.name]
        params_after = sum(p.numel() for p in model.parameters())
        return StepResult(model, records, {
            "params_before": params_before, "params_after": params_after,
            "decomposed": sum("skipped" not in r.details for r in records),
            "skipped": {r.name: r.details["skipped"] for r in records if "skipped" in r.details},
        })

    def _factorise(self, lname: str, module: nn.Module,
                   seed: int) -> tuple[dict[str, Any], nn.Module | None]:
        """The replacement of one layer (or None) and the record's details."""
        cfg = self.config
        if isinstance(module, nn.Linear):
            return self._svd(module.weight, module, lambda a, b: svd_linear(module, a, b))
        if not isinstance(module, nn.Conv2d):
            return {"skipped": f"{type(module).__name__} is not Conv2d/Linear"}, None
        if type(module).forward is not nn.Conv2d.forward:
            # e.g. timm's StdConv2d (weight standardisation) or Conv2dSame (dynamic padding):
            # plain Conv2d factors would not compute the same function.
            return {"skipped": f"{type(module).__name__} overrides Conv2d.forward; its factors "
                    "as plain Conv2d would compute something else"}, None
        if module.groups > 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            reason = (f"{kind} conv (groups={module.groups}) is a block-diagonal tensor; "
                      "Tucker-2 of the whole kernel would add parameters")
            if cfg.grouped == "error":
                raise NetshrinkError(f"tucker: layer {lname!r}: {reason}; set grouped: skip or "
                                     "exclude it from the selector (skip_depthwise: true)")
            return {"skipped": reason}, None
        if module.kernel_size == (1, 1):
            if cfg.pointwise == "skip":
                return {"skipped": "1x1 conv and pointwise='skip'"}, None
            matrix = module.weight.reshape(module.out_channels, module.in_channels)
            return self._svd(matrix, module, lambda a, b: svd_pointwise(module, a, b))
        return self._tucker(module, seed)

    def _tucker(self, conv: nn.Conv2d, seed: int) -> tuple[dict[str, Any], nn.Module | None]:
        cfg = self.config
        weight = conv.weight
        o, i = conv.out_channels, conv.in_channels
        r_out = self._rank(weight.reshape(o, -1), o)
        r_in = self._rank(weight.transpose(0, 1).reshape(i, -1), i)
        before = sum(p.numel() for p in conv.parameters(recurse=False))
        after = tucker2_params(conv, r_out, r_in)
        details: dict[str, Any] = {"kind": "tucker2", "ranks": [r_out, r_in]}
        if after > (1 - cfg.min_saving) * before or after >= before:
            return {**details, "skipped": f"no parameter saving at ranks ({r_out}, {r_in}): "
                    f"{after} vs {before} parameters"}, None
        core, u_out, u_in = tucker2(weight, r_out, r_in, n_iter_max=cfg.n_iter_max,
                                    tol=cfg.tol, seed=seed, backend=cfg.backend)
        details["rel_error"] = round(tucker2_error(weight, core, u_out, u_in), 6)
        return details, tucker2_conv(conv, core, u_out, u_in)

    def _svd(self, matrix, module: nn.Module, build) -> tuple[dict[str, Any], nn.Module | None]:
        rows, cols = matrix.shape
        rank = self._rank(matrix, min(rows, cols))
        before = sum(p.numel() for p in module.parameters(recurse=False))
        after = svd_params(rows, cols, rank, getattr(module, "bias", None) is not None)
        details: dict[str, Any] = {"kind": "svd", "ranks": [rank]}
        if after > (1 - self.config.min_saving) * before or after >= before:
            return {**details, "skipped": f"no parameter saving at rank {rank}: {after} vs "
                    f"{before} parameters"}, None
        a, b, s = truncated_svd(matrix, rank)  # ||W - A B|| = ||s[rank:]||
        details["rel_error"] = round(float(s[rank:].norm() / max(float(s.norm()), 1e-12)), 6)
        return details, build(a, b)

    def _rank(self, unfolding, size: int) -> int:
        """Rank for one mode from its unfolding ``(size, rest)``."""
        cfg = self.config
        if cfg.method == "ratio":
            rank = rank_by_ratio(size, cfg.rank)
        elif cfg.method == "energy":
            rank = rank_by_energy(singular_values(unfolding), cfg.energy)
        else:
            rank = rank_by_vbmf(unfolding)
        rank = max(rank, cfg.min_rank)
        if cfg.round_to > 1:
            rank = -(-rank // cfg.round_to) * cfg.round_to
        return int(min(rank, size))


@hookimpl
def register_compressors(register):
    register(Tucker)
