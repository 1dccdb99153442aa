"""Channel mode's check before the search: Torch-Pruning must trace the model, and the model
pruned at the target and at the largest ratio the search may pick must still run, within a
time limit.

Refusing here, before any episode, names the module or op; otherwise the search would fail
after minutes of episodes, or hang inside Torch-Pruning (it walked some timm graphs for
minutes)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from netshrink import NetshrinkError, SelectionError, deadline, failing_module, why_broken


def _line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def check_channel_surgery(model: nn.Module, names: list[str], ratios: list[float],
                          example: torch.Tensor, seconds: float, link) -> dict[str, str]:
    """Trace ``model`` (``link()``: the search's own use of the dependency graph), find the
    layers whose channel pruning at one of ``ratios`` fails or breaks the model (pruned one by
    one on a copy, each such group put back), then prune a copy at each of ``ratios`` on every
    other layer of ``names``. Returns the layers to leave out, with why; refuses with a
    :class:`SelectionError` naming the module or op if the trace or a whole-model check fails,
    or takes over ``seconds``. ``model`` is not changed."""
    from netshrink.plugins.rlprune.env import copy_model, prune_channels

    broken: dict[str, str] = {}
    try:
        with deadline(seconds, "Torch-Pruning traced the model") as limit:
            try:
                link()
            except (TimeoutError, SelectionError):
                raise  # a SelectionError already names the layer (e.g. an attention's qkv)
            except Exception as exc:
                found = failing_module(model, example[:1])
                at = f" in module {found[0]}" if found else " (an op it does not handle)"
                raise SelectionError(
                    f"rlprune channel mode: Torch-Pruning cannot trace the model{at}: "
                    f"{_line(exc)}; use granularity='weight' or exclude that module") from None
            for ratio in ratios:
                limit.doing = (f"each layer of a copy was pruned at ratio {ratio:g} to check the "
                           "model still runs")
                work = copy_model(model)
                check = functools.partial(why_broken, work, example[:1], "pruning its channels")
                try:
                    prune_channels(work, names, [ratio] * len(names), _widths(work, names),
                                   example, check=check, broken=broken)
                except NetshrinkError as exc:  # a layer that could not be put back
                    if isinstance(exc, SelectionError):
                        raise
                    raise SelectionError(
                        f"rlprune channel mode refused (nothing changed): {exc}; use "
                        "granularity='weight' or exclude that module") from None
                names = [n for n in names if n not in broken]
            if not names:
                raise SelectionError(
                    "rlprune channel mode refused (nothing changed): pruning any selected "
                    f"layer breaks the model, e.g. {next(iter(broken))}: "
                    f"{next(iter(broken.values()))}; use granularity='weight'")
            found = None
            for ratio in ratios:
                limit.doing = f"a copy was pruned at ratio {ratio:g} to check it still runs"
                work = copy_model(model)
                try:
                    prune_channels(work, names, [ratio] * len(names), _widths(work, names),
                                   example)
                except (TimeoutError, SelectionError):
                    raise
                except Exception as exc:
                    raise SelectionError(
                        f"rlprune channel mode: Torch-Pruning failed pruning the model's "
                        f"channels at ratio {ratio:g}: {_line(exc)}; use granularity='weight' "
                        "or exclude those layers") from None
                found = failing_module(work, example[:1])
                if found is not None:
                    break
    except TimeoutError as exc:
        raise SelectionError(
            f"rlprune channel mode refused (nothing changed): {exc}; raise 'time_limit', use "
            "granularity='weight' or select fewer layers") from None
    if found is not None:
        raise SelectionError(
            f"rlprune channel mode refused (nothing changed): the model pruned at "
            f"ratio {ratio:g} no longer runs: module {found[0]} raised "
            f"{_line(found[1])}; Torch-Pruning missed a dependency there: exclude that module "
            "(and the layers feeding it) from 'select', or use granularity='weight'")
    return broken


def _widths(model: nn.Module, names: list[str]) -> list[int]:
    modules = dict(model.named_modules())
    return [int(modules[n].weight.shape[0]) for n in names]
