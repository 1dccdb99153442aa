"""Guards around Torch-Pruning surgery: a time limit, and finding the module a forward fails in.

Torch-Pruning can hang on some graphs (it walked rexnet_100's for minutes) or leave a model that
no longer runs (cspresnet50, mobilevit_xxs). statprune therefore works on a copy, under a
deadline, and refuses the step, naming the module or op, when either happens: the caller's
model is never left half-pruned.
"""

from __future__ import annotations

from torch import nn

from netshrink import Deadline, deadline, failing_module

__all__ = ["Deadline", "deadline", "describe_module", "failing_module"]


def describe_module(model: nn.Module, name: str) -> str:
    """``name (Type)`` for a module of ``model``."""
    try:
        return f"{name} ({type(model.get_submodule(name)).__name__})"
    except AttributeError:
        return name
