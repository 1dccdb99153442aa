"""The encoding table: which encoding stores each parameter of a model, carried between steps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from netshrink.encodings.base import Encoding
from netshrink.encodings.kinds import Dense, Sparse
from netshrink.errors import EncodingError


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` by qualified name (state-dict order)."""
    return {name: t for name, t in model.state_dict(keep_vars=True).items()}


def refit(encoding: Encoding, tensor: torch.Tensor) -> Encoding:
    """Re-encode ``tensor`` with the same scheme as ``encoding`` (after fine-tuning or a
    structural change). Sparse keeps its zeros (re-derived from the tensor); dense stays dense;
    value-encoded schemes must already match the tensor exactly.
    """
    tensor = tensor.detach().cpu()
    if isinstance(encoding, Dense):
        return Dense(tensor, storage_dtype=encoding.data.dtype, dtype=encoding.dtype)
    if isinstance(encoding, Sparse) and not encoding.is_value_encoded:
        storage = encoding.values.data.dtype if isinstance(encoding.values, Dense) else None
        return Sparse.from_dense(
            tensor, value_encoder=lambda v, p, s: Dense(v, storage_dtype=storage, dtype=v.dtype)
        )
    if tuple(tensor.shape) == encoding.shape and torch.equal(
        encoding.decode().to(tensor.dtype), tensor
    ):
        return encoding
    raise EncodingError(
        f"a {encoding.describe()} tensor of shape {encoding.shape} was changed to shape "
        f"{tuple(tensor.shape)} or new values; quantized and codebook values cannot be refitted "
        "(run structural and fine-tuning steps before quantizing steps)"
    )


class EncodingTable(Mapping[str, Encoding]):
    """Maps qualified tensor names (``features.0.weight``) to their encodings.

    Tensors without an entry are stored dense in their own dtype.
    """

    def __init__(self, entries: Mapping[str, Encoding] | None = None) -> None:
        self._entries: dict[str, Encoding] = dict(entries or {})

    def __getitem__(self, name: str) -> Encoding:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, name: str, encoding: Encoding) -> None:
        """Record the encoding of tensor ``name``."""
        self._entries[name] = encoding

    def copy(self) -> EncodingTable:
        """A shallow copy (encodings are immutable once built)."""
        return EncodingTable(self._entries)

    def encoding_for(self, name: str, tensor: torch.Tensor) -> Encoding:
        """The encoding of ``name``, or dense in the tensor's dtype."""
        return self._entries.get(name) or Dense(tensor.detach())

    def reconcile(self, model: nn.Module) -> None:
        """Bring entries in line with ``model`` after a step: drop tensors that no longer exist,
        refit those whose shape or values changed, and write decoded values into the model so
        the in-memory model is exactly what the artifact will load."""
        tensors = model_tensors(model)
        for name in list(self._entries):
            if name not in tensors:
                del self._entries[name]
                continue
            tensor = tensors[name]
            enc = self._entries[name]
            if tuple(tensor.shape) != enc.shape or not torch.equal(
                enc.decode().to(tensor.dtype), tensor.detach().cpu()
            ):
                enc = refit(enc, tensor)
                self._entries[name] = enc
            with torch.no_grad():
                tensor.copy_(enc.decode().to(tensor.dtype))

    def complete(self, model: nn.Module) -> dict[str, Encoding]:
        """An encoding for every tensor of ``model`` (dense where no step encoded it)."""
        return {name: self.encoding_for(name, t) for name, t in model_tensors(model).items()}

    def apply(self, model: nn.Module, name: str, encoding: Encoding) -> None:
        """Record ``encoding`` for tensor ``name`` and write its decoded values into ``model``."""
        tensors = model_tensors(model)
        if name not in tensors:
            raise EncodingError(f"model has no tensor {name!r}")
        tensor = tensors[name]
        if tuple(tensor.shape) != encoding.shape:
            raise EncodingError(
                f"encoding shape {encoding.shape} does not match {name!r} of shape "
                f"{tuple(tensor.shape)}"
            )
        with torch.no_grad():
            tensor.copy_(encoding.decode().to(tensor.dtype))
        self._entries[name] = encoding
