"""Peers a user would pick instead of netshrink, measured with the same yardstick: the size of
the file each one saves, and the same fine-tune budget. Each returns (model, bytes on disk)."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

import netshrink as ns


def _saved_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(state_dict)``: what a PyTorch user would ship."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _ignored(model: nn.Module) -> list[nn.Module]:
    info = ns.model_info(model)
    return [model.get_submodule(info.head)] if info and info.head else []


def torch_prune_global(model: nn.Module, data: ns.DataSplits, epochs: int):
    """torch.nn.utils.prune global L1 unstructured 90% + fine-tune with masks, then
    prune.remove and torch.save (the zeros are stored dense: that is what PyTorch saves)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    head = set(_ignored(model))
    params = [(m, "weight") for m in model.modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in head]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.9)
    ns.train(model, data, ns.FinetuneConfig(epochs=epochs), desc="torch.prune fine-tune")
    for module, name in params:
        prune.remove(module, name)
    return model, _saved_bytes(model)


def torch_dynamic_int8(model: nn.Module, data: ns.DataSplits, epochs: int):
    """PyTorch dynamic int8 quantization of Linear layers (convs stay fp32); no fine-tune."""
    qmodel = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    return qmodel, _saved_bytes(qmodel)


def torch_pruning_magnitude(model: nn.Module, data: ns.DataSplits, epochs: int):
    """Torch-Pruning's MagnitudePruner (L1, 50% of channels) + fine-tune."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        model, data.val.tensors[0][:1], importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5, ignored_layers=_ignored(model))
    pruner.step()
    ns.train(model, data, ns.FinetuneConfig(epochs=epochs), desc="torch-pruning fine-tune")
    return model, _saved_bytes(model)


PEERS = {
    "torch.nn.utils.prune (global L1 90%)": torch_prune_global,
    "PyTorch dynamic int8": torch_dynamic_int8,
    "Torch-Pruning magnitude (50% channels)": torch_pruning_magnitude,
}
