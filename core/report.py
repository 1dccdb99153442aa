"""The report: per-layer and total sizes from what is actually stored, MACs, latency, accuracy.

The report reads what the pipeline built: ``storage_bytes`` is the length of the artifact's
bytes (which ``CompressionResult.save`` writes unchanged), so the size the report prints is the
size of the file on disk; per-layer bytes come from the same encodings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from netshrink.adapters import ModelInfo
from netshrink.compressor import LayerRecord
from netshrink.data import DataSplits
from netshrink.encodings import EncodingTable, model_tensors
from netshrink.fileio import atomic_write
from netshrink.metrics import compare_latency, count_macs
from netshrink.recipe import Recipe
from netshrink.training import evaluate


class LayerRow(BaseModel):
    """One row of the report: a compressed layer, or the 'other' / 'metadata' remainder."""

    name: str
    methods: str = ""
    encoding: str = ""
    params_before: int = 0
    params_after: int = 0
    nonzeros: int = 0
    dense_bytes: int = 0
    storage_bytes: int = 0
    macs_before: int = 0
    macs_after: int = 0
    details: dict[str, Any] = {}

    @property
    def sparsity(self) -> float:
        """Fraction of the original parameters that are no longer stored."""
        return 1 - self.nonzeros / self.params_before if self.params_before else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original parameter (everything the layer stores, indices included)."""
        return 8 * self.storage_bytes / self.params_before if self.params_before else 0.0

    @property
    def ratio(self) -> float:
        """Dense fp32 bytes / stored bytes for this row."""
        return self.dense_bytes / self.storage_bytes if self.storage_bytes else float("inf")


class Report(BaseModel):
    """Sizes, speed and accuracy of a compressed model against its original."""

    model: str
    data: str | None = None
    rows: list[LayerRow]
    storage_bytes: int
    dense_bytes: int
    params_before: int
    params_after: int
    nonzeros: int
    macs_before: int
    macs_after: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    latency: dict[str, dict[str, float]] | None = None
    steps: list[dict[str, Any]] = []
    wall_time_s: float = 0.0
    recipe: dict[str, Any] = {}

    @property
    def compression_ratio(self) -> float:
        """Dense fp32 bytes of the original model / bytes of the artifact."""
        return self.dense_bytes / self.storage_bytes if self.storage_bytes else float("inf")

    @property
    def accuracy_delta(self) -> float | None:
        """Accuracy after minus before (test split), when data was given."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return self.accuracy_after - self.accuracy_before

    def summary(self) -> dict[str, Any]:
        """Headline figures."""
        return {
            "storage_bytes": self.storage_bytes,
            "dense_bytes": self.dense_bytes,
            "compression_ratio": round(self.compression_ratio, 3),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "nonzeros": self.nonzeros,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (with the computed figures)."""
        data = self.model_dump()
        data["compression_ratio"] = self.compression_ratio
        for row, raw in zip(self.rows, data["rows"]):
            raw.update(sparsity=row.sparsity, bits_per_weight=row.bits_per_weight)
        return data

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def load_json(cls, path: str | Path) -> Report:
        """Read a report written by :meth:`save_json`."""
        data = json.loads(Path(path).read_text())
        data.pop("compression_ratio", None)
        for row in data.get("rows", []):
            row.pop("sparsity", None)
            row.pop("bits_per_weight", None)
        return cls.model_validate(data)

    def table(self):
        """The report as a rich renderable (per-layer table plus totals)."""
        from netshrink.report_render import render

        return render(self)

    def __str__(self) -> str:
        from netshrink.report_render import to_text

        return to_text(self)

    def plot(self, path: str | Path) -> Path:
        """Draw per-layer sparsity and bits, and size vs accuracy, to a PNG."""
        from netshrink.report_render import plot

        return plot(self, Path(path))


def _owner(tensor_name: str, layers: list[str]) -> str | None:
    best = None
    for layer in layers:
        if tensor_name.startswith(layer + ".") and (best is None or len(layer) > len(best)):
            best = layer
    return best


def _group_macs(macs: dict[str, int], layers: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for module, value in macs.items():
        owner = module if module in layers else _owner(module, layers)
        out[owner or ""] = out.get(owner or "", 0) + value
    return out


def build_report(
    *,
    original: nn.Module,
    model: nn.Module,
    encodings: EncodingTable,
    artifact: bytes,
    records: list[LayerRecord],
    info: ModelInfo,
    data: DataSplits | None,
    recipe: Recipe,
    steps: list[dict[str, Any]],
    wall_time_s: float,
    measure_latency: bool = True,
) -> Report:
    """Measure ``model`` against ``original``: sizes from ``artifact`` (the bytes the pipeline
    built) and its ``encodings``, MACs, latency and, with ``data``, accuracy."""
    layers: list[str] = []
    methods: dict[str, list[str]] = {}
    details: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.name not in methods:
            layers.append(rec.name)
            methods[rec.name] = []
            details[rec.name] = {}
        if rec.method not in methods[rec.name]:
            methods[rec.name].append(rec.method)
        details[rec.name].update(rec.details)

    before = model_tensors(original)
    params_orig = {n for n, _ in original.named_parameters()}
    params_new = {n for n, _ in model.named_parameters()}
    complete = encodings.complete(model)
    rows: dict[str, LayerRow] = {
        name: LayerRow(name=name, methods=",".join(methods[name])) for name in layers
    }
    other = LayerRow(name="(other tensors)", methods="-", encoding="as trained")
    for name, tensor in before.items():
        row = rows.get(_owner(name, layers) or "", other)
        row.dense_bytes += (
            tensor.numel() * 4
            if tensor.is_floating_point()
            else tensor.numel() * tensor.element_size()
        )
        if name in params_orig:
            row.params_before += tensor.numel()
    kinds: dict[str, list[str]] = {}
    for name, enc in complete.items():
        owner = _owner(name, layers)
        row = rows.get(owner or "", other)
        row.storage_bytes += enc.payload_bytes
        if name in params_new:
            row.params_after += enc.numel
            row.nonzeros += enc.nonzeros
            if owner and name.endswith("weight"):
                kinds.setdefault(owner, []).append(enc.describe())
    for name, row in rows.items():
        row.encoding = " / ".join(dict.fromkeys(kinds.get(name, [])))
        row.details = details[name]

    example = None
    if data is not None and len(data.val):
        example = data.batch("val", 1)[0]
    elif info.input_shape:
        example = torch.zeros((1, *info.input_shape))
    macs_before = macs_after = 0
    if example is not None:
        mb = _group_macs(count_macs(original, example), layers)
        ma = _group_macs(count_macs(model, example), layers)
        for name, row in rows.items():
            row.macs_before, row.macs_after = mb.get(name, 0), ma.get(name, 0)
        other.macs_before, other.macs_after = mb.get("", 0), ma.get("", 0)
        macs_before, macs_after = sum(mb.values()), sum(ma.values())

    acc_before = acc_after = None
    if data is not None:
        test = data.loader("test", batch_size=256, shuffle=False)
        acc_before = evaluate(original, test)
        acc_after = evaluate(model, test)
    latency = None
    if measure_latency and example is not None:
        latency = compare_latency(original, model, example)

    all_rows = [*rows.values(), other]
    payload = sum(r.storage_bytes for r in all_rows)
    all_rows.append(
        LayerRow(
            name="(header + manifest)",
            methods="-",
            encoding="json/zlib",
            storage_bytes=len(artifact) - payload,
        )
    )
    return Report(
        model=info.spec or type(original).__name__,
        data=data.name if data else None,
        rows=all_rows,
        storage_bytes=len(artifact),
        dense_bytes=sum(r.dense_bytes for r in all_rows),
        params_before=sum(r.params_before for r in all_rows),
        params_after=sum(r.params_after for r in all_rows),
        nonzeros=sum(r.nonzeros for r in all_rows),
        macs_before=macs_before,
        macs_after=macs_after,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        latency=latency,
        steps=steps,
        wall_time_s=round(wall_time_s, 3),
        recipe=recipe.model_dump(exclude_defaults=True),
    )
