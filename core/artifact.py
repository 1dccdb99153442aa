"""The compact artifact: one safetensors file holding packed arrays and a JSON manifest.

Layout: a standard safetensors file with two uint8 tensors, ``manifest`` (JSON, zlib-compressed
when that is smaller) and ``blob`` (every packed array, back to back), and header metadata
``{"netshrink": "1;json"}`` or ``"1;zlib"`` (one key: safetensors writes metadata in hash order,
so a second key would make identical artifacts differ byte for byte). The manifest names the
base model spec (or a full module description), the architecture edits, and each tensor's
encoding with ``[dtype, offset, nbytes]`` references into the blob.

The pipeline builds the artifact once, with :func:`artifact_bytes`; the report measures those
bytes (its ``storage_bytes`` is their length) and ``CompressionResult.save`` writes them as they
are, so the size the report prints is the size of the file. Compressors ask their context for the
same figure mid-run (``ctx.artifact_size(model)``). Loading never unpickles and runs no code from
the file.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from netshrink import modules as arch
from netshrink.adapters import ModelInfo, model_info, set_model_info
from netshrink.encodings import DTYPE_NAMES, DTYPES, Encoding, EncodingTable, model_tensors
from netshrink.errors import ArtifactError, NetshrinkError
from netshrink.fileio import atomic_write
from netshrink.models import load_model
from netshrink.version import __version__

FORMAT = "netshrink"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class _BlobWriter:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0

    def __call__(self, array: torch.Tensor) -> list[Any]:
        data = array.detach().cpu().contiguous().reshape(-1)
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        ref = [DTYPE_NAMES[data.dtype], self.offset, len(raw)]
        self.parts.append(raw)
        self.offset += len(raw)
        return ref


def build_manifest(
    model: nn.Module,
    encodings: EncodingTable,
    info: ModelInfo | None,
    recipe: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """The manifest and the blob for ``model`` stored with ``encodings`` (``recipe``, when
    given, is kept in the manifest as the artifact's provenance)."""
    manifest: dict[str, Any] = {"format": FORMAT, "v": FORMAT_VERSION, "netshrink": __version__}
    if info is not None and info.spec:
        base = load_model(info.spec, **info.options)
        manifest["arch"] = {"spec": info.spec, "options": info.options}
        edits = arch.diff(base, model)
        if edits:
            manifest["edits"] = edits
    else:
        manifest["arch"] = {"tree": arch.describe(model)}
    if info is not None:
        manifest["info"] = {
            k: v
            for k, v in info.to_json().items()
            if k in ("input_shape", "num_classes", "head") and v is not None
        }
    writer = _BlobWriter()
    manifest["t"] = {name: enc.to_record(writer) for name, enc in encodings.complete(model).items()}
    if recipe:
        manifest["recipe"] = recipe
    return manifest, b"".join(writer.parts)


def artifact_bytes(
    model: nn.Module,
    encodings: EncodingTable,
    info: ModelInfo | None,
    recipe: dict[str, Any] | None = None,
) -> bytes:
    """The exact bytes of the artifact file for ``model`` stored with ``encodings``."""
    manifest, blob = build_manifest(model, encodings, info, recipe)
    text = json.dumps(manifest, separators=(",", ":")).encode()
    packed = zlib.compress(text, 9)
    kind = "zlib" if len(packed) < len(text) else "json"
    payload = packed if kind == "zlib" else text
    tensors = {
        "manifest": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        "blob": (
            torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            if blob
            else torch.zeros(0, dtype=torch.uint8)
        ),
    }
    return st_save(tensors, metadata={FORMAT: f"{FORMAT_VERSION};{kind}"})


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Save an uncompressed model (every tensor stored dense) as an artifact, atomically."""
    return atomic_write(path, artifact_bytes(model, EncodingTable(), model_info(model)))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact (validated to be a netshrink file)."""
    manifest, _ = _read(Path(path), want_blob=False)
    return manifest


def _read(path: Path, want_blob: bool) -> tuple[dict[str, Any], bytes]:
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if FORMAT not in meta:
                raise ArtifactError(
                    f"{path}: not a netshrink artifact (safetensors file without "
                    "netshrink metadata)"
                )
            keys = set(fh.keys())
            if not {"manifest", "blob"} <= keys:
                raise ArtifactError(f"{path}: netshrink artifact lacks its manifest or blob")
            raw = fh.get_tensor("manifest").numpy().tobytes()
            blob = fh.get_tensor("blob").numpy().tobytes() if want_blob else b""
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error types for foreign/corrupt files
        raise ArtifactError(
            f"{path}: not a readable netshrink artifact (truncated, corrupted or another format: "
            f"{exc})"
        ) from None
    try:
        if meta[FORMAT].endswith(";zlib"):
            inflater = zlib.decompressobj()
            raw = inflater.decompress(raw, MAX_MANIFEST_BYTES)
            if inflater.unconsumed_tail:
                raise ArtifactError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw)
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupted manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest is not a netshrink manifest")
    if manifest.get("v") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {manifest.get('v')} is not supported "
            f"(this netshrink reads version {FORMAT_VERSION})"
        )
    return manifest, blob


def _reader(blob: bytes, path: Path):
    def read(ref: Any) -> torch.Tensor:
        try:
            dtype_name, offset, nbytes = ref
            dtype = DTYPES[dtype_name]
            offset, nbytes = int(offset), int(nbytes)
        except (ValueError, TypeError, KeyError):
            raise ArtifactError(f"{path}: malformed array reference {ref!r}") from None
        if offset < 0 or nbytes < 0 or offset + nbytes > len(blob):
            raise ArtifactError(
                f"{path}: array reference {ref!r} points outside the data "
                f"({len(blob)} bytes): the file is truncated or corrupted"
            )
        if nbytes == 0:
            return torch.zeros(0, dtype=dtype)
        return torch.frombuffer(bytearray(blob[offset : offset + nbytes]), dtype=dtype)

    return read


def load(path: str | Path) -> nn.Module:
    """Rebuild a runnable model from an artifact alone (no pickle, no code from the file)."""
    path = Path(path)
    manifest, blob = _read(path, want_blob=True)
    arch_spec = manifest.get("arch") or {}
    try:
        if "spec" in arch_spec:
            model = load_model(arch_spec["spec"], **arch_spec.get("options", {}))
            arch.apply_edits(model, manifest.get("edits", []))
        elif "tree" in arch_spec:
            model = arch.build(arch_spec["tree"])
        else:
            raise ArtifactError(f"{path}: manifest has no architecture")
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    read = _reader(blob, path)
    records = manifest.get("t")
    if not isinstance(records, dict):
        raise ArtifactError(f"{path}: manifest has no tensor table")
    expected = set(model_tensors(model))
    missing = expected - set(records)
    if missing:
        raise ArtifactError(f"{path}: manifest lacks tensors {sorted(missing)[:5]}")
    for name, record in records.items():
        if name not in expected:
            raise ArtifactError(f"{path}: manifest has a tensor {name!r} the model does not have")
        try:
            encoding = Encoding.from_record(record, read)
            value = encoding.decode()
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: tensor {name!r}: {exc}") from None
        except NetshrinkError as exc:
            raise ArtifactError(f"{path}: tensor {name!r}: {exc}") from None
        arch.set_tensor(model, name, value.clone())
    model.eval()
    info = model_info(model) or ModelInfo(spec="")
    stored = manifest.get("info", {})
    info = ModelInfo.from_json({**info.to_json(), **stored})
    set_model_info(model, info)
    return model
