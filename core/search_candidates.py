"""The search's candidates: per layer, the options every compressor offers, alone and chained
(pruning, then value-encoding); applying one to a layer the way a recipe step does; and the
layer's exact stored bytes and MACs.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from netshrink.adapters import ModelInfo
from netshrink.compressor import Compressor, LayerOption
from netshrink.context import CompressionContext
from netshrink.data import DataSplits
from netshrink.encodings import Encoding, EncodingTable
from netshrink.errors import ConfigError, NetshrinkError
from netshrink.registry import compressors, get_compressor

_GLOB = re.compile(r"[*?\[\]]")


@dataclass(frozen=True)
class Candidate:
    """One choice for one layer: a chain of options applied in order (empty: left dense)."""

    layer: str
    options: tuple[LayerOption, ...] = ()

    @property
    def label(self) -> str:
        """``dense``, or the options' labels joined by ``+``."""
        return "+".join(o.label for o in self.options) or "dense"

    @property
    def key(self) -> str:
        """Identifies the candidate in a checkpoint."""
        return f"{self.layer}\t{self.label}"


def _order(cls: type[Compressor]) -> int:
    """Chain order: structural first, then pruning, then value-encoding."""
    caps = cls.capabilities
    return 0 if caps.changes_structure else (2 if caps.encodes_values else 1)


def layer_candidates(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], methods: Sequence[str] | None = None
) -> dict[str, list[Candidate]]:
    """Per layer: ``dense``, each option alone, and each pair (pruning option, then
    value-encoding option) of two compressors that do not change structure.

    ``methods`` restricts the compressors (default: every registered one that declares
    options); a named compressor that declares none is an error."""
    classes = _option_classes(methods)
    out: dict[str, list[Candidate]] = {}
    for name, module in layers:
        offered: dict[str, list[LayerOption]] = {}
        for cls in classes:
            if not isinstance(module, cls.handled_types()):
                continue
            options = list(cls.layer_options(module, name))
            wrong = [
                o for o in options if not isinstance(o, LayerOption) or o.compressor != cls.name
            ]
            if wrong:
                raise NetshrinkError(
                    f"{cls.__qualname__}.layer_options returned {wrong[0]!r} for layer {name!r}; "
                    f"build each option with {cls.__qualname__}.option(config, bytes=...)"
                )
            if options:
                offered[cls.name] = options
        chains: list[tuple[LayerOption, ...]] = [(o,) for opts in offered.values() for o in opts]
        prune = [c for c in classes if c.name in offered and _order(c) == 1]
        value = [c for c in classes if c.name in offered and _order(c) == 2]
        for first, second in itertools.product(prune, value):
            chains += list(itertools.product(offered[first.name], offered[second.name]))
        out[name] = [Candidate(name), *(Candidate(name, chain) for chain in chains)]
    return out


def _declares_options(cls: type[Compressor]) -> bool:
    """Whether ``cls`` overrides :meth:`Compressor.layer_options`."""
    return getattr(cls.layer_options, "__func__", None) is not Compressor.layer_options.__func__


def _option_classes(methods: Sequence[str] | None) -> list[type[Compressor]]:
    if methods is None:
        found = [e.obj for _, e in sorted(compressors().items())]
        return [c for c in found if _declares_options(c)]
    classes = []
    for name in methods:
        try:
            cls = get_compressor(name)
        except KeyError as exc:
            raise ConfigError(f"search field 'methods': {exc}") from None
        if not _declares_options(cls):
            raise ConfigError(
                f"search field 'methods': {name!r} declares no per-layer options "
                "(Compressor.layer_options), so a search cannot choose its settings"
            )
        classes.append(cls)
    return classes


# -- applying a candidate ------------------------------------------------------------------------


def apply_candidate(
    model: nn.Module,
    candidate: Candidate,
    table: EncodingTable,
    *,
    data: DataSplits | None = None,
    info: ModelInfo | None = None,
    seed: int = 0,
) -> nn.Module:
    """Apply ``candidate``'s options, in order, to its layer of ``model`` (recording the
    encodings in ``table``) the way a recipe step does; returns the (possibly new) model."""
    for index, option in enumerate(candidate.options):
        cls = get_compressor(option.compressor)
        ctx = CompressionContext(
            data=data, encodings=table, info=info, seed=seed, step_index=index,
            step_name=f"search {option.label}",
        )
        module = model.get_submodule(candidate.layer)
        model = _build(cls, candidate.layer, option.config).compress(
            model, [(candidate.layer, module)], ctx
        ).model
        table.reconcile(model)
    return model


def _per_layer(cls: type[Compressor], config: dict[str, Any]) -> bool:
    return bool(cls.layer_fields) and set(config) <= set(cls.layer_fields)


def _build(cls: type[Compressor], layer: str, config: dict[str, Any]) -> Compressor:
    if _per_layer(cls, config):
        return cls(overrides={_pattern(layer): config})
    return cls(config)


def _pattern(layer: str) -> str:
    """A name pattern matching exactly ``layer``."""
    return f"re:^{re.escape(layer)}$" if _GLOB.search(layer) else layer


def layer_bytes(model: nn.Module, table: EncodingTable, layer: str) -> int:
    """Exact stored bytes of the tensors of ``layer`` (its own and its submodules')."""
    return sum(e.payload_bytes for e in _layer_encodings(model, table, layer).values())


def _layer_encodings(model: nn.Module, table: EncodingTable, layer: str) -> dict[str, Encoding]:
    """The encodings of ``layer``'s tensors (its own and its submodules'), by name relative to
    the layer (``weight``, ``0.bias``)."""
    prefix = f"{layer}."
    return {
        n.removeprefix(prefix): e for n, e in table.complete(model).items() if n.startswith(prefix)
    }


def layer_macs(macs: dict[str, int], layer: str) -> int:
    """MACs per sample of ``layer`` and its submodules from :func:`count_macs`'s output."""
    return sum(v for n, v in macs.items() if n == layer or n.startswith(f"{layer}."))


class _Holder(nn.Module):
    """A module holding one layer as ``layer`` (to apply an option to it alone)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def option_bytes(cls: type[Compressor], module: nn.Module, config: dict[str, Any]) -> int:
    """Exact stored bytes of ``module``'s tensors after ``cls`` compresses a copy of it alone
    with ``config``, without data: what a compressor's ``layer_options`` reports for an option
    whose bytes depend on what the encoder keeps (scales, clusters that survive k-means)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(module))
    ctx = CompressionContext()
    out = cls(config).compress(holder, [("layer", holder.layer)], ctx)
    return sum(enc.payload_bytes for enc in ctx.encodings.complete(out.model).values())


def check_layer_options(cls: type[Compressor], module: nn.Module) -> list[str]:
    """Problems with ``cls.layer_options`` on ``module`` (for conformance tests): each option
    must be a :class:`LayerOption` of ``cls`` whose declared bytes are the bytes ``cls``
    stores when the option is applied to a copy of the layer alone (no data)."""
    problems = []
    for option in cls.layer_options(copy.deepcopy(module), "layer"):
        if not isinstance(option, LayerOption) or option.compressor != cls.name:
            problems.append(f"{cls.name}: layer_options returned {option!r}, not its own option")
            continue
        table = EncodingTable()
        held = apply_candidate(
            _Holder(copy.deepcopy(module)), Candidate("layer", (option,)), table
        )
        stored = layer_bytes(held, table, "layer")
        if stored != option.bytes:
            problems.append(
                f"{cls.name}: option {option.label} declares {option.bytes:,} bytes but the "
                f"compressor stores {stored:,}"
            )
    return problems


__all__ = [
    "Candidate",
    "apply_candidate",
    "check_layer_options",
    "layer_bytes",
    "layer_candidates",
    "layer_macs",
    "option_bytes",
]
