"""The report: per-layer and total sizes from what is actually stored, MACs, latency, accuracy.

The report reads what the pipeline built: ``storage_bytes`` is the length of the artifact's
bytes (which ``CompressionResult.save`` writes unchanged), so the size the report prints is the
size of the file on disk; per-layer bytes come from the same encodings.

Every figure says what it can support. Accuracies come with the test split's size ``n_test`` and
a 95% Wilson interval; before and after are compared pair by pair (McNemar's mid-p test on the
images one model gets right and the other wrong: both models see the same images, so comparing
two independent intervals would waste most of the evidence). Latency comes with its spread, and
a ratio the spread cannot support is reported as "too noisy to call". The report records the
SHA-256 of the artifact it describes, so a stale ``.report.json`` is recognised as such.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator
from torch import nn

from netshrink.adapters import ModelInfo
from netshrink.artifact import load
from netshrink.compressor import LayerRecord
from netshrink.data import DataSplits
from netshrink.encodings import EncodingTable, model_tensors
from netshrink.errors import ArtifactError, NetshrinkError
from netshrink.fileio import atomic_write
from netshrink.metrics import (
    ALPHA,
    BaselineCorrect,
    compare_latency,
    correct_per_example,
    count_macs,
    latency_verdict,
    mcnemar_midp,
    wilson_interval,
)
from netshrink.recipe import Recipe
from netshrink.runtime import resident_bytes

#: The largest ``.report.json`` :meth:`Report.load_json` reads (a real one is a few kilobytes
#: per layer).
MAX_REPORT_BYTES = 16 * 1024 * 1024


logger = logging.getLogger("netshrink")
#: The uncompressed model's test predictions, reused across reports of the same model object
#: with unchanged tensors on the same test split (see :class:`~netshrink.metrics.BaselineCorrect`).
_BASELINE = BaselineCorrect()


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
    accuracy_before: float | None = Field(None, ge=0, le=1)
    accuracy_after: float | None = Field(None, ge=0, le=1)
    n_test: int | None = Field(None, ge=1)
    """Examples in the test split the accuracies were measured on (None in older reports)."""
    only_before_correct: int | None = Field(None, ge=0)
    """Test examples the original model got right and the compressed model got wrong."""
    only_after_correct: int | None = Field(None, ge=0)
    """Test examples the compressed model got right and the original model got wrong."""
    latency: dict[str, dict[str, float]] | None = None
    """Per batch size (``batch<N>``): :func:`netshrink.metrics.compare_latency`'s figures
    (older reports hold only ``dense_ms``, ``compressed_ms`` and ``speedup``)."""
    artifact_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    """Hex SHA-256 of the artifact's bytes: which file this report describes."""
    #: Bytes the loaded model holds (``netshrink.resident_bytes``): dense decode and packed
    #: runtime (``netshrink.load(path, runtime="packed")``), measured on the artifact.
    resident_bytes_dense: int | None = Field(None, ge=0)
    resident_bytes_packed: int | None = Field(None, ge=0)
    steps: list[dict[str, Any]] = []
    """Per step: ``step`` (index), ``compressor``, ``layers``, the compressor's own summary,
    ``wall_time_s``; after a step's fine-tune also ``finetune_epochs``,
    ``finetune_start_val_acc``, ``finetune_best_val_acc`` and ``finetune_best_epoch`` (the epoch
    whose weights were kept; 0 when none beat the step's own weights)."""
    wall_time_s: float = 0.0
    recipe: dict[str, Any] = {}

    @model_validator(mode="after")
    def _counts_fit_n(self) -> Report:
        lost, gained = self.only_before_correct or 0, self.only_after_correct or 0
        if self.n_test is not None and lost + gained > self.n_test:
            raise ValueError(
                f"only_before_correct + only_after_correct ({lost} + {gained}) exceeds "
                f"n_test ({self.n_test})"
            )
        return self

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

    def accuracy_interval(self, which: str) -> tuple[float, float] | None:
        """The 95% Wilson interval of ``accuracy_before`` or ``accuracy_after``
        (``which``: ``"before"`` / ``"after"``), or None without the accuracy or ``n_test``."""
        value = {"before": self.accuracy_before, "after": self.accuracy_after}[which]
        if value is None or not self.n_test:
            return None
        return wilson_interval(value, self.n_test)

    @property
    def accuracy_p_value(self) -> float | None:
        """McNemar's two-sided mid-p value for "the compression changed accuracy", from the
        discordant test examples (None when they were not counted)."""
        if self.only_before_correct is None or self.only_after_correct is None:
            return None
        return mcnemar_midp(self.only_before_correct, self.only_after_correct)

    @property
    def accuracy_verdict(self) -> str | None:
        """After vs before in words: "equal within the 95% interval" unless McNemar's paired
        test rejects equality at the 5% level, then "lower" / "higher" by the difference."""
        p = self.accuracy_p_value
        delta = self.accuracy_delta
        if p is None or delta is None:
            return None
        if p >= ALPHA or delta == 0:
            return "equal within the 95% interval"
        return f"{'lower' if delta < 0 else 'higher'} by {100 * abs(delta):.2f} pp"

    def latency_verdicts(self) -> dict[str, str]:
        """Per batch size, what the latency figures support (see
        :func:`netshrink.metrics.latency_verdict`)."""
        return {key: latency_verdict(fig) for key, fig in (self.latency or {}).items()}

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
            "n_test": self.n_test,
            "accuracy_p_value": self.accuracy_p_value,
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
    def load_json(cls, path: str | Path, artifact: str | Path | bytes | None = None) -> Report:
        """Read a report written by :meth:`save_json`.

        The file is read only up to :data:`MAX_REPORT_BYTES`; JSON with a duplicate key, or
        that does not validate, raises :class:`~netshrink.errors.ArtifactError` in one line
        naming the file. With ``artifact`` (its path or bytes), the report must carry that
        artifact's SHA-256 (``artifact_sha256``), else ArtifactError says it is stale.
        """
        path = Path(path)
        report = cls._parse(path.name, _read_capped(path))
        if artifact is not None:
            report.check_artifact(artifact, name=path.name)
        return report

    @classmethod
    def _parse(cls, name: str, raw: bytes) -> Report:
        try:
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise ArtifactError(f"{name}: malformed: duplicate key {exc.args[0]!r}") from None
        except RecursionError:
            raise ArtifactError(f"{name}: malformed: JSON nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"{name}: malformed: not JSON ({str(exc)[:200]})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{name}: malformed: not a JSON object")
        data.pop("compression_ratio", None)
        for row in data.get("rows", []) if isinstance(data.get("rows"), list) else []:
            if isinstance(row, dict):
                row.pop("sparsity", None)
                row.pop("bits_per_weight", None)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            field = f"field {_one_line(where)}: " if where else ""
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise ArtifactError(
                f"{name}: malformed: {field}{_one_line(first['msg'])}{more}"
            ) from None

    def check_artifact(self, artifact: str | Path | bytes, *, name: str = "report") -> None:
        """Raise :class:`~netshrink.errors.ArtifactError` unless this report was written for
        ``artifact`` (a path or the bytes): its ``artifact_sha256`` must match."""
        label = "the given bytes" if isinstance(artifact, bytes) else Path(artifact).name
        if not self.artifact_sha256:
            raise ArtifactError(
                f"{name}: records no artifact_sha256 (written by an older netshrink): "
                f"cannot tell whether it describes {label}; rebuild the report"
            )
        digest = sha256_of(artifact)
        if digest != self.artifact_sha256:
            raise ArtifactError(
                f"{name}: written for another artifact (stale): it describes SHA-256 "
                f"{self.artifact_sha256[:12]}..., {label} has {digest[:12]}..."
            )

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


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` (from the file, e.g. a key) on one line, cut to ``limit`` characters."""
    return text.replace("\r", "\\r").replace("\n", "\\n")[:limit]


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_capped(path: Path) -> bytes:
    """The file's bytes, refusing one larger than :data:`MAX_REPORT_BYTES`."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"{path.name}: malformed: cannot read it ({exc.strerror})") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise ArtifactError(
            f"{path.name}: malformed: larger than {MAX_REPORT_BYTES // 2**20} MiB"
        )
    return raw


def sha256_of(artifact: str | Path | bytes) -> str:
    """Hex SHA-256 of an artifact's bytes, or of the file at a path (read in chunks)."""
    if isinstance(artifact, bytes):
        return hashlib.sha256(artifact).hexdigest()
    digest = hashlib.sha256()
    try:
        with open(artifact, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ArtifactError(f"{artifact}: cannot read the artifact ({exc.strerror})") from None
    return digest.hexdigest()


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


def _resident(model: nn.Module, artifact: bytes) -> tuple[int | None, int | None]:
    """Bytes held by the dense decode (``model`` is exactly what the artifact decodes to) and by
    the artifact loaded with the packed runtime; None for packed when it cannot be loaded."""
    dense = resident_bytes(model)
    with tempfile.TemporaryDirectory(prefix="netshrink-report-") as tmp:
        path = Path(tmp) / "m.nsk"
        path.write_bytes(artifact)
        try:  # our own artifact, just built: no decode budget
            packed = resident_bytes(load(path, runtime="packed", max_decoded_bytes=1 << 50))
        except NetshrinkError as exc:
            logger.warning("report: the packed runtime could not load the artifact: %s", exc)
            packed = None
    return dense, packed


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
    built, whose SHA-256 the report records) and its ``encodings``, MACs, latency and, with
    ``data``, accuracy on the test split: one pass of each model, so the accuracies, their
    intervals and the paired comparison all come from the same per-example results."""
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
        example = info.example_input(1)
    macs_before = macs_after = 0
    if example is not None:
        mb = _group_macs(count_macs(original, example), layers)
        ma = _group_macs(count_macs(model, example), layers)
        for name, row in rows.items():
            row.macs_before, row.macs_after = mb.get(name, 0), ma.get(name, 0)
        other.macs_before, other.macs_after = mb.get("", 0), ma.get("", 0)
        macs_before, macs_after = sum(mb.values()), sum(ma.values())

    acc_before = acc_after = n_test = lost = gained = None
    if data is not None:
        test = data.loader("test", batch_size=256, shuffle=False)
        right_before = _BASELINE.get(original, data.test,
                                     lambda: correct_per_example(original, test))
        right_after = correct_per_example(model, test)
        n_test = len(right_before)
        if n_test:
            acc_before = int(right_before.sum()) / n_test
            acc_after = int(right_after.sum()) / n_test
            lost = int((right_before & ~right_after).sum())
            gained = int((~right_before & right_after).sum())
    latency = None
    if measure_latency and example is not None:
        latency = compare_latency(original, model, example)

    resident_dense, resident_packed = _resident(model, artifact)
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
        n_test=n_test if acc_before is not None else None,
        only_before_correct=lost,
        only_after_correct=gained,
        latency=latency,
        artifact_sha256=sha256_of(artifact),
        resident_bytes_dense=resident_dense,
        resident_bytes_packed=resident_packed,
        steps=steps,
        wall_time_s=round(wall_time_s, 3),
        recipe=recipe.model_dump(exclude_defaults=True),
    )
