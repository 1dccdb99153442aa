"""Search checkpoints: one safetensors file (tensors + a JSON metadata entry), written atomically.

No pickle: network weights, optimiser moments, the replay buffer and the RNG state are tensors;
the episode counter, best result and history are JSON in the file's metadata. The file is
written to a temporary name and moved into place with ``os.replace`` so an interrupted write
never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink import __version__, atomic_write

log = logging.getLogger("netshrink")

FORMAT = "netshrink-rlprune-search/1"


def search_key(model: nn.Module, config: dict[str, Any], layer_names: list[str], seed: int,
               reward_data: tuple[torch.Tensor, torch.Tensor]) -> str:
    """A digest of everything the search result depends on: the model's tensors, the search
    config, the selected layers, the seed, the reward subset, and the netshrink and torch
    versions (a search cached by other code is run again rather than reused)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"config": config, "layers": layer_names, "seed": seed,
                              "format": FORMAT, "netshrink": __version__,
                              "torch": torch.__version__}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for tensor in reward_data:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save(path: Path, key: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save as st_save

    meta = {"format": FORMAT, "key": key, "state": json.dumps(state)}
    atomic_write(path, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                               metadata=meta))


def load(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint's tensors and state if ``path`` holds one for this ``key``, else None
    (a checkpoint of another search, or an unreadable file, is ignored with a warning)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                log.warning("rlprune: %s belongs to another search (different model, config, "
                            "layers or seed); starting afresh and overwriting it", path)
                return None
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        return tensors, json.loads(meta["state"])
    except Exception as exc:  # a corrupt file must not block a new search
        log.warning("rlprune: cannot read checkpoint %s (%s); starting afresh", path, exc)
        return None
