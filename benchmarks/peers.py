"""Peers a user would pick instead of netshrink, measured with the same honest yardstick: the
size of the file each one actually saves (written here, never loaded from a user)."""

from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

import torch
from torch import nn

import netshrink as ns


def _torch_save_size(obj) -> int:
    """Bytes of ``torch.save(obj)``: what a PyTorch user would ship."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _safetensors_size(model: nn.Module) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path))
        return path.stat().st_size


def _prunable(model: nn.Module, head: str | None) -> list[tuple[nn.Module, str]]:
    return [
        (m, "weight")
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n != head
    ]


def torch_prune_global(model: nn.Module, data, sparsity: float = 0.9, epochs: int = 2):
    """torch.nn.utils.prune global L1 unstructured + fine-tune with masks; then prune.remove
    and torch.save the state dict (zeros are stored dense: that is what PyTorch saves)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    head = ns.model_info(model).head if ns.model_info(model) else None
    params = _prunable(model, head)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    ns.training.train(model, data, ns.FinetuneConfig(epochs=epochs), desc="torch.prune fine-tune")
    for module, name in params:
        prune.remove(module, name)
    return model, _torch_save_size(model.state_dict())


def torch_dynamic_int8(model: nn.Module, data):
    """PyTorch dynamic int8 quantization of Linear layers (convs stay fp32), torch.save size."""
    qmodel = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8
    )
    return qmodel, _torch_save_size(qmodel.state_dict())


def torch_pruning_magnitude(model: nn.Module, data, ratio: float = 0.5, epochs: int = 2):
    """Torch-Pruning's MagnitudePruner (L1, channel pruning) + fine-tune; safetensors size."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    info = ns.model_info(model)
    example = data.val.tensors[0][:1]
    ignored = [model.get_submodule(info.head)] if info and info.head else []
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    ns.training.train(model, data, ns.FinetuneConfig(epochs=epochs), desc="torch-pruning fine-tune")
    return model, _safetensors_size(model)


PEERS = {
    "torch.nn.utils.prune (global L1 90%)": torch_prune_global,
    "PyTorch dynamic int8": torch_dynamic_int8,
    "Torch-Pruning magnitude (50% channels)": torch_pruning_magnitude,
}
