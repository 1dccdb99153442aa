"""The context a compressor receives: data, evaluation, encodings, seed, device, progress."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from netshrink.adapters import ModelInfo
from netshrink.artifact import artifact_bytes
from netshrink.data import DataSplits, Split
from netshrink.encodings import Encoding, EncodingTable, Sparse
from netshrink.errors import DataError
from netshrink.progress import progress as _progress
from netshrink.training import FinetuneConfig, evaluate, finetune

T = TypeVar("T")


@dataclass
class CompressionContext:
    """Everything a compressor may use besides the model and its selected layers."""

    data: DataSplits | None = None
    encodings: EncodingTable = field(default_factory=EncodingTable)
    info: ModelInfo | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step_index: int = 0
    step_name: str = ""
    teacher: nn.Module | None = None
    """The uncompressed model (for distillation or comparisons); never modify it."""
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("netshrink"))
    recipe: dict[str, Any] | None = None
    """The run's recipe as the artifact's manifest stores it (set by the pipeline)."""

    # -- data -------------------------------------------------------------------------------

    def require_data(self) -> DataSplits:
        """The data, or a clear error naming the step."""
        if self.data is None:
            raise DataError(f"step {self.step_index} ({self.step_name}) needs data; pass data=...")
        return self.data

    def loader(
        self,
        split: Split = "train",
        batch_size: int = 64,
        shuffle: bool | None = None,
        limit: int | None = None,
    ) -> torch.utils.data.DataLoader:
        """A loader over a split of the data (seeded shuffling for ``train``)."""
        return self.require_data().loader(split, batch_size, shuffle, seed=self.seed, limit=limit)

    def evaluate(self, model: nn.Module, split: Split = "val", limit: int | None = None) -> float:
        """Top-1 accuracy on a split (optionally only its first ``limit`` examples)."""
        return evaluate(
            model, self.loader(split, batch_size=256, shuffle=False, limit=limit), self.device
        )

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A batch of real inputs if data is given, else zeros of the model's input shape."""
        if self.data is not None and len(self.data.val) >= batch:
            return self.data.batch("val", batch)[0].to(self.device)
        shape = self.info.input_shape if self.info and self.info.input_shape else None
        if shape is None:
            raise DataError("no data and no known input shape: pass data=... to compress")
        return self.info.example_input(batch, self.device)

    def example_input_if_known(self, batch: int = 1) -> torch.Tensor | None:
        """:meth:`example_input`, or None when there is no data and no known input shape (a
        check that needs an input is then skipped)."""
        if self.data is None and not (self.info and self.info.input_shape):
            return None
        return self.example_input(batch)

    # -- randomness, progress ---------------------------------------------------------------

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run seed, the step index and ``offset``."""
        return torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.step_index * 7919 + offset
        )

    def progress(
        self, iterable: Iterable[T], desc: str = "", total: int | None = None
    ) -> Iterator[T]:
        """A progress bar labelled with the step."""
        label = f"[{self.step_index}] {self.step_name}" + (f": {desc}" if desc else "")
        return _progress(iterable, desc=label, total=total)

    # -- encodings --------------------------------------------------------------------------

    def encode(self, model: nn.Module, tensor_name: str, encoding: Encoding) -> None:
        """Record how ``tensor_name`` is stored and write the decoded values into ``model``."""
        self.encodings.apply(model, tensor_name, encoding)

    def encoding_of(self, tensor_name: str) -> Encoding | None:
        """The current encoding of a tensor, if a previous step set one."""
        return self.encodings.get(tensor_name)

    def prune(self, model: nn.Module, tensor_name: str, keep: torch.Tensor) -> torch.Tensor:
        """Zero ``tensor_name`` where ``keep`` is False and record it as sparse (the kept values
        dense). Zeros an earlier step pruned stay pruned: the mask actually applied, ``keep``
        and the earlier mask, is returned."""
        tensor = model.get_parameter(tensor_name).detach()
        mask = keep.to(device=tensor.device, dtype=torch.bool)
        previous = self.encoding_of(tensor_name)
        if isinstance(previous, Sparse):
            mask = mask & previous.mask().to(mask.device)
        self.encode(model, tensor_name, Sparse.from_dense(tensor * mask, mask=mask))
        return mask

    def artifact_size(self, model: nn.Module, encodings: EncodingTable | None = None) -> int:
        """The exact bytes of the artifact if the run ended with ``model`` stored as
        ``encodings`` (default: the encodings recorded so far); what the report will print
        for the same model and encodings. Tensors without an encoding count as dense."""
        table = self.encodings if encodings is None else encodings
        with torch.no_grad():
            return len(artifact_bytes(model, table, self.info, self.recipe))

    def finetune(
        self,
        model: nn.Module,
        config: FinetuneConfig | dict[str, Any] | None = None,
        desc: str = "fine-tune",
    ) -> dict[str, Any]:
        """Fine-tune ``model`` keeping pruned zeros and freezing quantized/clustered tensors."""
        cfg = (
            config
            if isinstance(config, FinetuneConfig)
            else FinetuneConfig.model_validate(config or {})
        )
        return finetune(
            model,
            self.require_data(),
            self.encodings,
            cfg,
            teacher=self.teacher,
            seed=self.seed,
            device=self.device,
            desc=f"[{self.step_index}] {desc}",
        )
