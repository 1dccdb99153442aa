"""The data contract: a classification dataset as fixed train/val/test splits of any map-style
``torch.utils.data.Dataset``, handed out through ``DataLoader``s."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from netshrink.errors import DataError, first_line

Split = Literal["train", "val", "test"]


def _channel_view(values: Sequence[float] | float | None, ndim: int) -> torch.Tensor | None:
    """Per-channel values shaped to broadcast over one sample of ``ndim`` dimensions."""
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 1 or ndim == 0:
        return t.reshape(())
    return t.reshape(-1, *([1] * (ndim - 1)))


class ArrayDataset(Dataset):
    """Samples held as two tensors, inputs and integer labels; inputs become normalised float32
    only when fetched, so images can stay compact (``uint8``) in memory.

    Fetching is ``(x * scale - mean) / std`` per channel (the first dimension of a sample);
    ``scale`` defaults to 1/255 for ``uint8`` inputs and 1 otherwise. ``transform``, if given,
    then maps a batch ``(n, *sample_shape)`` to a batch (e.g. a resize). ``DataLoader`` fetches
    whole batches at once through ``__getitems__``.

    Example::

        images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
        mean, std = ArrayDataset.channel_stats(images)
        ds = ArrayDataset(images, torch.arange(100) % 10, mean=mean, std=std)
        x, y = ds[0]  # float32 (3, 32, 32), int64 label
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        scale: float | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise DataError(
                f"inputs and targets differ in length: {len(inputs)} inputs, {len(targets)} targets"
            )
        if targets.dtype.is_floating_point or targets.dim() != 1:
            raise DataError(
                f"targets must be a 1-D integer tensor of class indices, got dtype "
                f"{targets.dtype} and shape {tuple(targets.shape)}"
            )
        self.inputs = inputs
        self.targets = targets.long()
        self.scale = (1 / 255 if inputs.dtype == torch.uint8 else 1.0) if scale is None else scale
        ndim = inputs.dim() - 1
        self.mean = _channel_view(mean, ndim)
        self.std = _channel_view(std, ndim)
        self.transform = transform

    @staticmethod
    def channel_stats(
        inputs: torch.Tensor, scale: float | None = None, chunk: int = 4096
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of ``inputs * scale`` (the first dimension after the batch is
        the channel), accumulated in float64 chunk by chunk."""
        if scale is None:
            scale = 1 / 255 if inputs.dtype == torch.uint8 else 1.0
        if len(inputs) == 0:
            raise DataError("cannot compute statistics of an empty split")
        flat = inputs.reshape(len(inputs), inputs.shape[1] if inputs.dim() > 1 else 1, -1)
        total = torch.zeros(flat.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(flat), chunk):
            part = flat[start : start + chunk].to(torch.float64) * scale
            total += part.sum((0, 2))
            squares += part.square().sum((0, 2))
        count = flat.shape[0] * flat.shape[2]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(mean.tolist()), tuple(std.tolist())

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x if self.transform is None else self.transform(x)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = range(len(self))[index]  # negative indices and IndexError as for a sequence
        return self._convert(self.inputs[i : i + 1])[0], self.targets[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._convert(self.inputs[idx])
        return list(zip(x.unbind(0), self.targets[idx].unbind(0)))

    def __repr__(self) -> str:
        return (
            f"ArrayDataset({len(self)} samples, input {tuple(self.inputs.shape[1:])} "
            f"{self.inputs.dtype})"
        )


def _check_split(name: str, dataset: Any) -> None:
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise DataError(
            f"split {name!r} must be a map-style torch Dataset (with __getitem__ and __len__), "
            f"got {type(dataset).__name__}"
        )


@dataclass
class DataSplits:
    """A classification dataset with fixed splits; each split is any map-style ``Dataset``
    whose items are ``(input tensor, class index)``, already converted and normalised."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the data (``mean``/``std`` used, ``input_shape``, source, ...)."""

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            _check_split(split, getattr(self, split))
        # Nothing can train on an empty train split (a DataLoader would fail deep inside).
        self.check_nonempty("train")

    def check_nonempty(self, *splits: Split) -> None:
        """Raise :class:`DataError` naming the dataset and the split if any of ``splits``
        (default: all three) holds no samples."""
        for split in splits or ("train", "val", "test"):
            if len(self.split(split)) == 0:
                raise DataError(
                    f"dataset {self.name!r}: the {split!r} split is empty; every split needs "
                    "at least one sample (check the files, or the split fractions)"
                )

    def check_model(self, model: nn.Module, model_name: str, split: Split = "train") -> None:
        """Push two samples of ``split`` through ``model`` (eval mode, no gradients; its mode
        is restored) and raise :class:`DataError` if that fails, naming the data's input shape,
        ``model_name`` and the error, or if the model's output width is not ``num_classes``."""
        try:
            x, _ = self.batch(split, 2)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"dataset {self.name!r}: cannot read the {split!r} split: {first_line(exc)}"
            ) from exc
        shape = tuple(x.shape[1:])
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                device = next((p.device for p in model.parameters()), torch.device("cpu"))
                out = model(x.to(device))
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # not a mismatch: the machine ran out of memory
        except Exception as exc:
            raise DataError(
                f"dataset {self.name!r} (inputs of shape {shape}) does not fit model "
                f"{model_name}: one batch through it raised {first_line(exc)}; pick data "
                "or model options that match (in_chans, input_size)"
            ) from exc
        finally:
            for module, training in modes:
                module.training = training
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != self.num_classes:
            raise DataError(
                f"dataset {self.name!r} has {self.num_classes} classes but model {model_name} "
                f"has {out.shape[1]} outputs; build the model with num_classes="
                f"{self.num_classes}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without batch), e.g. ``(1, 28, 28)``."""
        shape = self.extra.get("input_shape")
        if shape is not None:
            return tuple(shape)
        if len(self.train) == 0:
            raise DataError(f"dataset {self.name!r} has an empty train split")
        return tuple(self.train[0][0].shape)

    def split(self, split: Split) -> Dataset:
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
        """A DataLoader over a split (only its first ``limit`` samples if given); training
        shuffles with a seeded generator by default."""
        dataset = self.split(split)
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(limit))
        shuffle = split == "train" if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)

    def batch(self, split: Split = "val", size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``size`` samples of a split as one batch ``(inputs, targets)`` (fewer if
        the split is smaller)."""
        if len(self.split(split)) == 0:
            raise DataError(f"dataset {self.name!r} has an empty {split} split")
        x, y = next(iter(self.loader(split, batch_size=size, shuffle=False)))
        return x, y

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
