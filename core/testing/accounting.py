"""Size accounting recomputed from the artifact file alone, for the conformance suite.

The report sums ``Encoding.payload_bytes`` per layer; the artifact holds whatever
``Encoding.to_record`` wrote. An encoding whose ``payload_bytes`` under-counts its arrays (or a
``to_record`` that writes more than ``packed()``) leaves the total right, since the report's
total is the file's length, but shifts the missing bytes into the ``(header + manifest)`` row.
So these helpers read the saved file (the format in :mod:`netshrink.artifact`: a safetensors
file with a JSON ``manifest`` and a ``blob``), sum the ``[dtype, offset, nbytes]`` array
references of each tensor's record, and attribute tensors to layers by name, without using the
encoding objects the report summed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from netshrink.artifact import read_manifest
from netshrink.encodings import DTYPES, Encoding

#: Report rows that are not layers (see :func:`netshrink.report.build_report`).
OTHER_ROW = "(other tensors)"
HEADER_ROW = "(header + manifest)"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the artifact stores it: its manifest record and the blob bytes it uses."""

    name: str
    record: dict[str, Any]
    nbytes: int
    """Bytes of every array the record references, nested encodings included."""

    @property
    def kinds(self) -> str:
        """The record's kinds, outermost first, e.g. ``sparse+quant``."""
        out, record = [], self.record
        while True:
            out.append(str(record.get("k")))
            children = record.get("c") or {}
            if not children:
                return "+".join(out)
            record = next(iter(children.values()))

    @property
    def plain_dense(self) -> bool:
        """Stored as a dense tensor in its own dtype: what netshrink stores when no step
        recorded an encoding."""
        record = self.record
        return record.get("k") == "dense" and "d" not in record and not record.get("c")


def read_artifact(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """The manifest (validated by :func:`netshrink.read_manifest`) and the blob of a file."""
    manifest = read_manifest(path)
    with safe_open(str(path), framework="pt") as fh:
        blob = fh.get_tensor("blob").numpy().tobytes()
    return manifest, blob


def _array_bytes(record: Mapping[str, Any], blob_size: int, where: str) -> int:
    total = 0
    for role, ref in (record.get("a") or {}).items():
        try:
            dtype, offset, nbytes = ref
            offset, nbytes = int(offset), int(nbytes)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: array {role!r} has a malformed reference {ref!r}") from None
        if dtype not in DTYPES or offset < 0 or nbytes < 0 or offset + nbytes > blob_size:
            raise ValueError(f"{where}: array {role!r} reference {ref!r} is outside the blob "
                             f"({blob_size} bytes)")
        total += nbytes
    for name, child in (record.get("c") or {}).items():
        total += _array_bytes(child, blob_size, f"{where}/{name}")
    return total


def stored_tensors(manifest: Mapping[str, Any], blob_size: int) -> dict[str, StoredTensor]:
    """Every tensor of the manifest with the bytes its record references."""
    return {name: StoredTensor(name, record, _array_bytes(record, blob_size, name))
            for name, record in manifest["t"].items()}


def owner(tensor_name: str, layers: Iterable[str]) -> str | None:
    """The longest layer name that is a module prefix of ``tensor_name`` (``conv1`` owns
    ``conv1.weight`` and, once factorised, ``conv1.0.weight``)."""
    best = None
    for layer in layers:
        if tensor_name.startswith(layer + ".") and (best is None or len(layer) > len(best)):
            best = layer
    return best


def expected_rows(layers: list[str], tensors: Mapping[str, StoredTensor],
                  file_size: int) -> dict[str, int]:
    """What each report row must say: the bytes of the layer's tensors, the rest under
    ``(other tensors)``, and the file's bytes outside the packed arrays as the header."""
    rows = {name: 0 for name in [*layers, OTHER_ROW]}
    for name, tensor in tensors.items():
        rows[owner(name, layers) or OTHER_ROW] += tensor.nbytes
    rows[HEADER_ROW] = file_size - sum(t.nbytes for t in tensors.values())
    return rows


def byte_mismatches(reported: Mapping[str, int], layers: list[str],
                    tensors: Mapping[str, StoredTensor], file_size: int) -> list[str]:
    """One line per report row whose ``storage_bytes`` differs from the artifact's bytes."""
    expected = expected_rows(layers, tensors, file_size)
    problems = []
    for row, want in expected.items():
        got = reported.get(row)
        if got == want:
            continue
        if got is None:
            problems.append(f"the report has no row {row!r} (the artifact stores {want} bytes "
                            "for it)")
            continue
        if row == HEADER_ROW:
            problems.append(f"row {row!r} reports {got} bytes but the file has {want} bytes "
                            "outside the packed arrays")
            continue
        owned = [t for n, t in tensors.items() if (owner(n, layers) or OTHER_ROW) == row]
        detail = ", ".join(f"{t.name} {t.nbytes} ({t.kinds})" for t in owned[:6])
        problems.append(f"row {row!r} reports {got} bytes but the artifact stores {want} for its "
                        f"tensors ({detail or 'none'})")
    extra = sorted(set(reported) - set(expected))
    if extra:
        problems.append(f"rows {extra} are neither recorded layers nor {OTHER_ROW!r}")
    return problems


def unattributed(layers: list[str], tensors: Mapping[str, StoredTensor],
                 original: Iterable[str]) -> list[str]:
    """Tensors outside every recorded layer that a step must have written: new tensors, and
    tensors stored other than plain dense. Their bytes land in ``(other tensors)``, so the
    layer they belong to looks smaller than it is."""
    before = set(original)
    problems = []
    for name, tensor in tensors.items():
        if owner(name, layers) is not None:
            continue
        if name not in before:
            problems.append(f"{name} (a new tensor, {tensor.nbytes} bytes)")
        elif not tensor.plain_dense:
            problems.append(f"{name} (stored {tensor.kinds}, {tensor.nbytes} bytes)")
    return problems


def decode_record(record: Mapping[str, Any], blob: bytes) -> Encoding:
    """The :class:`~netshrink.encodings.Encoding` a manifest record describes."""

    def read(ref: Any) -> torch.Tensor:
        dtype, offset, nbytes = ref
        if not nbytes:
            return torch.zeros(0, dtype=DTYPES[dtype])
        data = bytearray(blob[int(offset):int(offset) + int(nbytes)])
        return torch.frombuffer(data, dtype=DTYPES[dtype])

    return Encoding.from_record(dict(record), read)
