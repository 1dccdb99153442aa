"""Models by spec through the registry (:func:`load_model`) and trained reference models, cached
on disk (:func:`reference_model`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from netshrink import datasets
from netshrink.adapters import model_info, parse_spec, set_model_info
from netshrink.data import DataSplits
from netshrink.fileio import atomic_write, cache_dir
from netshrink.registry import get_model_adapter
from netshrink.training import FinetuneConfig, train

TRAINING_VERSION = 1  # bump when reference training changes, to invalidate caches
REFERENCE_EPOCHS = {"lenet300": 20, "lenet5": 15, "vgg_small": 20, "resnet_small": 20}


def load_model(spec: str, **options: Any) -> nn.Module:
    """Build a model from a spec string; the result carries its :class:`ModelInfo`.

    ``options`` override options in the spec's query string, e.g.
    ``load_model("timm:resnet18", in_chans=1, num_classes=10)``.
    """
    prefix, name, spec_options = parse_spec(spec)
    adapter = get_model_adapter(prefix)
    model, info = adapter.load(name, **{**spec_options, **options})
    set_model_info(model, info)
    return model


def reference_model(
    spec: str,
    data: DataSplits | str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    lr: float = 1e-3,
    **options: Any,
) -> nn.Module:
    """A model built from ``spec`` and trained on ``data`` (cached on disk, keyed by spec,
    options, data, seed and training settings). Training takes seconds for the zoo models."""
    data = datasets.load(data)
    opts = {**data.model_options(), **options}
    torch.manual_seed(seed)
    model = load_model(spec, **opts)
    info = model_info(model)
    name = parse_spec(spec)[1]
    epochs = epochs if epochs is not None else REFERENCE_EPOCHS.get(name, 15)
    key = json.dumps(
        {
            "spec": spec,
            "options": info.options if info else opts,
            "data": data.name,
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "v": TRAINING_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() else "_" for c in f"{spec}-{data.name}")
    path = cache_dir() / "reference" / f"{safe}-{digest}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model
    train(
        model,
        data,
        FinetuneConfig(epochs=epochs, lr=lr),
        seed=seed,
        desc=f"training reference {spec} on {data.name}",
    )
    atomic_write(
        path,
        st_save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"key": key}),
    )
    model.eval()
    return model
