"""The data contract: a classification dataset as fixed train/val/test splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, TensorDataset

Split = Literal["train", "val", "test"]


@dataclass
class DataSplits:
    """A classification dataset with fixed splits, already normalised."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without batch), e.g. ``(1, 28, 28)``."""
        return tuple(self.train.tensors[0].shape[1:])

    def split(self, split: Split) -> TensorDataset:
        """One of ``train``, ``val``, ``test``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        return getattr(self, split)

    def loader(
        self,
        split: Split,
        batch_size: int = 64,
        shuffle: bool | None = None,
        seed: int = 0,
        limit: int | None = None,
    ) -> DataLoader:
        """A DataLoader over a split; training shuffles with a seeded generator by default."""
        dataset = self.split(split)
        if limit is not None and limit < len(dataset):
            dataset = TensorDataset(*(t[:limit] for t in dataset.tensors))
        shuffle = split == "train" if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)

    def model_options(self) -> dict[str, Any]:
        """Adapter options that make a model fit this data (channels, classes, input size)."""
        shape = self.input_shape
        options: dict[str, Any] = {"num_classes": self.num_classes, "in_chans": shape[0]}
        if len(shape) == 3:
            options["input_size"] = shape[-1]
        return options

    def __repr__(self) -> str:
        return (
            f"DataSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, input={self.input_shape}, classes={self.num_classes})"
        )
