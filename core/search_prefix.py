"""Reusing the reference model's activations in the sensitivity scan.

Each scan candidate changes one layer; every module that runs before it computes exactly what it
computed in the reference model. :class:`PrefixCache` records, once, the outputs of the reference
model's leaf modules on the scan's validation batches (up to a memory cap, in execution order).
:meth:`PrefixCache.patch` then makes the unchanged modules that run *before* the first changed
one return their recorded outputs instead of computing them, so a candidate's forward pass
starts, in effect, at its layer. The result is the same as running the whole model: replay
stops at the first call of a module that is not the reference's (another class, other settings
in its ``extra_repr``, other hooks, or any parameter or buffer changed, added or removed; a
change that belongs to no called module turns replay off), and a module that also runs after that
point is never replayed. A forward pass that does not call a replayed module the way the
recording did (another input shape, more or fewer calls: data-dependent control flow), or that
changes a replayed output in place where the recording did not, raises :class:`PrefixMismatch`,
and the scan measures that candidate again without the cache; after a call that did not match,
the cache replays nothing more, and after an output changed in place the scan records the
reference again and hands out copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class PrefixMismatch(RuntimeError):
    """A patched module was not called the way the recording was (the scan then measures the
    candidate without the cache)."""


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


class PrefixCache:
    """The reference model's leaf-module outputs on ``batches``, for :meth:`patch`.

    ``max_bytes`` caps the memory: modules are recorded in execution order while their
    outputs (all batches, all calls) fit; later ones simply run. ``max_bytes=0`` records
    nothing (every candidate runs the whole model). ``every_name_copied``: replay every output
    as a copy (after a replayed output was changed in place by code the recording did not
    see change it)."""

    def __init__(self, reference: nn.Module, batches: list[torch.Tensor], max_bytes: int,
                 *, every_name_copied: bool = False):
        self.reference = reference
        self.order: list[str] = []
        """Leaf module names in the order of their calls in one forward pass (repeats kept)."""
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.input_shapes: dict[str, list[tuple[int, ...]]] = {}
        self.mutated: set[str] = {"*"} if every_name_copied else set()
        """Modules whose outputs are replayed as copies ("*": all)."""
        self.broken = False
        """Set when a replayed output was changed in place: build a new cache that copies."""
        self.usable = True
        """Cleared when a forward pass did not call a replayed module as recorded
        (data-dependent control flow): :meth:`patch` then replays nothing."""
        self._state = {k: v.detach() for k, v in reference.state_dict(keep_vars=True).items()}
        if max_bytes <= 0 or not batches:
            return
        leaves = _leaves(reference)
        per_call = self._probe(reference, leaves, batches[0][:1])
        total = sum(len(b) for b in batches)
        chosen, used = set(), 0
        for name in dict.fromkeys(self.order):
            if per_call.get(name) is None:
                continue  # not a single tensor: never patched
            need = per_call[name] * total
            if used + need > max_bytes:
                break
            chosen.add(name)
            used += need
        self._record(reference, {n: leaves[n] for n in chosen}, batches)

    @torch.no_grad()
    def _probe(self, model: nn.Module, leaves: dict[str, nn.Module],
               sample: torch.Tensor) -> dict[str, int | None]:
        """Call order of the leaves on one sample, and each one's output bytes per sample per
        call (summed over its calls; None when an output is not a tensor)."""
        sizes: dict[str, int | None] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
                self.order.append(name)
                if not isinstance(out, torch.Tensor) or (name in sizes and sizes[name] is None):
                    sizes[name] = None
                else:
                    sizes[name] = (sizes.get(name) or 0) + out.numel() * out.element_size()
            return record

        model.eval()
        with _hooks(leaves, hook):
            model(sample)
        return sizes

    @torch.no_grad()
    def _record(self, model: nn.Module, chosen: dict[str, nn.Module],
                batches: list[torch.Tensor]) -> None:
        watched: list[tuple[str, torch.Tensor, int]] = []

        def hook(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
                first = _first_tensor(args)
                self.input_shapes.setdefault(name, []).append(
                    tuple(first.shape) if first is not None else ())
                self.outputs.setdefault(name, []).append(out.detach().clone())
                watched.append((name, out, out._version))
            return record

        model.eval()
        with _hooks(chosen, hook):
            for batch in batches:
                model(batch)
                # outputs that the code after them changes in place (a ReLU(inplace=True),
                # ``out += identity``) are handed out as copies when replayed
                self.mutated |= {n for n, out, version in watched if out._version != version}
                watched.clear()

    @property
    def recorded(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for ts in self.outputs.values() for t in ts)

    def _boundary(self, model: nn.Module) -> int:
        """Index into :attr:`order` of the first call of a module that differs from the
        reference (``len(order)``: none differs; 0: a change that cannot be placed)."""
        state = model.state_dict(keep_vars=True)
        changed = self._state.keys() ^ state.keys()
        changed |= {
            k for k in self._state.keys() & state.keys()
            if self._state[k].shape != state[k].shape
            or not torch.equal(self._state[k], state[k].detach())
        }
        names = dict(self.reference.named_modules())
        owners = set()
        for key in changed:
            owner = key.rpartition(".")[0]
            while owner and owner not in names:
                owner = owner.rpartition(".")[0]
            owners.add(owner)
        mine = dict(model.named_modules())
        owners |= {n for n, ref in names.items() if n not in mine or not _same(mine[n], ref)}
        boundary = len(self.order)
        for owner in owners:
            if not owner:
                return 0
            prefix = f"{owner}."
            first = next((i for i, n in enumerate(self.order)
                          if n == owner or n.startswith(prefix)), None)
            if first is None:
                return 0  # not called as a module: its tensors may be used anywhere
            boundary = min(boundary, first)
        return boundary

    @contextmanager
    def patch(self, model: nn.Module) -> Iterator[list[str]]:
        """Within the block, the modules of ``model`` that run before its first changed one
        return the recorded outputs (in the recorded batches and call order); yields their
        names. Leaving the block restores them and checks each was called as recorded."""
        boundary = self._boundary(model) if self.usable else 0
        after = set(self.order[boundary:])
        names = [
            n for n in dict.fromkeys(self.order[:boundary]) if n in self.outputs and n not in after
        ]
        calls = dict.fromkeys(names, 0)
        modules = {n: model.get_submodule(n) for n in names}

        handed: list[tuple[str, torch.Tensor, int]] = []
        copy_all = "*" in self.mutated

        def replay(name: str) -> Callable[..., torch.Tensor]:
            def forward(*args: Any, **_kwargs: Any) -> torch.Tensor:
                index = calls[name]
                if index >= len(self.outputs[name]):
                    self.usable = False
                    raise PrefixMismatch(f"{name!r} called more often than recorded")
                first = _first_tensor(args)
                shape = tuple(first.shape) if first is not None else ()
                if shape != self.input_shapes[name][index]:
                    self.usable = False
                    raise PrefixMismatch(f"{name!r} got input {shape}, recorded "
                                         f"{self.input_shapes[name][index]}")
                calls[name] = index + 1
                out = self.outputs[name][index]
                if copy_all or name in self.mutated:
                    return out.clone()
                handed.append((name, out, out._version))
                return out
            return forward

        own = {n: m.__dict__.get("forward") for n, m in modules.items()}  # set on an instance
        for name, module in modules.items():
            module.forward = replay(name)
        try:
            yield names
        finally:
            for name, module in modules.items():
                if own[name] is None:
                    del module.forward
                else:
                    module.forward = own[name]
            changed = [n for n, out, version in handed if out._version != version]
            if changed:
                self.broken = True
                raise PrefixMismatch(f"the recorded output of {changed[0]!r} was changed in "
                                     "place")
        short = [n for n in names if calls[n] != len(self.outputs[n])]
        if short:
            self.usable = False
            raise PrefixMismatch(f"{short[0]!r} called {calls[short[0]]} times, recorded "
                                 f"{len(self.outputs[short[0]])}")


def _same(mine: nn.Module, ref: nn.Module) -> bool:
    """Same class, settings (``extra_repr``) and number of hooks."""
    return (type(mine) is type(ref) and mine.extra_repr() == ref.extra_repr()
            and len(mine._forward_hooks) == len(ref._forward_hooks)
            and len(mine._forward_pre_hooks) == len(ref._forward_pre_hooks))


@contextmanager
def _hooks(modules: dict[str, nn.Module],
           make: Callable[[str], Callable[..., None]]) -> Iterator[None]:
    # first of the hooks: the output of ``forward`` itself, which is what a replay stands for
    # (the module's own hooks then run on the replayed output as they ran on the forward's)
    handles = [m.register_forward_hook(make(n), prepend=True) for n, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["PrefixCache", "PrefixMismatch"]
