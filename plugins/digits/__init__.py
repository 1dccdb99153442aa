"""Built-in datasets: scikit-learn's embedded handwritten digits (no download), with fixed splits.

``digits`` is the original 8x8 data; ``digits28`` and ``digits32`` are bilinearly resized to
28x28 and 32x32 (sized for LeNet and small CNNs). Splits are 60/20/20, stratified, seed 0.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from netshrink import DataSplits, hookimpl


@lru_cache(maxsize=8)
def _digits(size: int) -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    idx = np.arange(len(labels))
    train_idx, rest = train_test_split(idx, test_size=0.4, random_state=0, stratify=bunch.target)
    val_idx, test_idx = train_test_split(
        rest, test_size=0.5, random_state=0, stratify=bunch.target[rest]
    )
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    images = (images - mean) / std

    def subset(ix: np.ndarray) -> TensorDataset:
        ix_t = torch.from_numpy(np.sort(ix))
        return TensorDataset(images[ix_t].contiguous(), labels[ix_t].contiguous())

    name = "digits" if size == 8 else f"digits{size}"
    return DataSplits(
        name=name,
        train=subset(train_idx),
        val=subset(val_idx),
        test=subset(test_idx),
        num_classes=10,
        description=f"scikit-learn handwritten digits, {size}x{size}, 1797 images",
        extra={"mean": mean, "std": std},
    )


@hookimpl
def register_datasets(register):
    register("digits", lambda: _digits(8), description="scikit-learn digits, 8x8 (embedded)")
    register("digits28", lambda: _digits(28), description="scikit-learn digits resized to 28x28")
    register("digits32", lambda: _digits(32), description="scikit-learn digits resized to 32x32")
