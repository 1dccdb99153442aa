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
from torch.overrides import TorchFunctionMode

from netshrink import manifest as schema
from netshrink import modules as arch
from netshrink.adapters import ModelInfo, model_info, set_model_info
from netshrink.encodings import DTYPE_NAMES, DTYPES, Encoding, EncodingTable, model_tensors
from netshrink.errors import ArtifactError, ConfigError, NetshrinkError
from netshrink.fileio import atomic_write
from netshrink.models import load_model
from netshrink.runtime import RUNTIMES, is_packable, pack_tensor
from netshrink.version import __version__

FORMAT = "netshrink"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = schema.MAX_MANIFEST_BYTES


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
    """The manifest of an artifact, checked against the schema (:mod:`netshrink.manifest`)."""
    path = Path(path)
    raw, blob_bytes = _read_header(path)
    try:
        manifest = _parse(raw)
        schema.validate(manifest, blob_bytes)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    return manifest


def _read_header(path: Path) -> tuple[bytes, int]:
    """The manifest's bytes (inflated) and the blob's length; the blob itself is not read."""
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
            sizes = {}
            for key in ("manifest", "blob"):
                part = fh.get_slice(key)
                shape = part.get_shape()
                if part.get_dtype() != "U8" or len(shape) != 1:
                    raise ArtifactError(f"{path}: the artifact's {key} is not a byte array")
                sizes[key] = int(shape[0])
            if sizes["manifest"] > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            raw = fh.get_tensor("manifest").numpy().tobytes()
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error types for foreign/corrupt files
        raise ArtifactError(
            f"{path}: not a readable netshrink artifact (truncated, corrupted or another format: "
            f"{str(exc)[:200]})"
        ) from None
    if str(meta[FORMAT]).endswith(";zlib"):
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(raw, MAX_MANIFEST_BYTES)
        except zlib.error as exc:
            raise ArtifactError(f"{path}: corrupted manifest: {exc}") from None
        if inflater.unconsumed_tail:
            raise ArtifactError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    return raw, sizes["blob"]


def _parse(raw: bytes) -> dict[str, Any]:
    """The manifest's JSON, with the format and version checked before the schema."""
    manifest = schema.parse(raw)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError("manifest is not a netshrink manifest")
    version = manifest.get("v")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {schema.show(version)} is not supported "
            f"(this netshrink reads version {FORMAT_VERSION})"
        )
    return manifest


def _read_blob(path: Path) -> bytes:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("blob").numpy().tobytes()
    except Exception as exc:  # the file changed since its header was read
        raise ArtifactError(f"not a readable netshrink artifact: {str(exc)[:200]}") from None


def _reader(blob: bytes):
    def read(ref: Any) -> torch.Tensor:
        try:
            dtype_name, offset, nbytes = ref
            dtype = DTYPES[dtype_name]
            offset, nbytes = int(offset), int(nbytes)
        except (ValueError, TypeError, KeyError):
            raise ArtifactError(f"malformed array reference {schema.show(ref)}") from None
        if offset < 0 or nbytes < 0 or offset + nbytes > len(blob):
            raise ArtifactError(
                f"array reference {schema.show(ref)} points outside the data "
                f"({len(blob)} bytes): the file is truncated or corrupted"
            )
        if nbytes == 0:
            return torch.zeros(0, dtype=dtype)
        return torch.frombuffer(bytearray(blob[offset : offset + nbytes]), dtype=dtype)

    return read


# In-place initialisers do nothing on the meta device but still cost about a millisecond each
# through the meta kernels (a model with thousands of layers would take many seconds to count).
_META_NOOPS = frozenset(
    {
        "uniform_",
        "normal_",
        "trunc_normal_",
        "fill_",
        "zero_",
        "clamp_",
        "clamp_min_",
        "clamp_max_",
        "erfinv_",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "copy_",
        "exponential_",
        "bernoulli_",
        "random_",
        "log_normal_",
        "geometric_",
        "cauchy_",
        "addcmul_",
        "addcdiv_",
        "sqrt_",
        "exp_",
        "neg_",
        "abs_",
        "sign_",
        "masked_fill_",
        "index_fill_",
        "lerp_",
        "pow_",
        "tanh_",
        "sigmoid_",
    }
)


class _SkipMetaInit(TorchFunctionMode):
    """Skip elementwise in-place ops on meta tensors (they change no shape)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (
            getattr(func, "__name__", "") in _META_NOOPS
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_meta
        ):
            return args[0]
        return func(*args, **(kwargs or {}))


class _NoMetaBuild(Exception):
    """The adapter cannot build this model on the meta device (it touches tensor data)."""


def _build_arch(manifest: dict[str, Any]) -> nn.Module:
    """The model the manifest describes, edits applied, with its initial (random) weights."""
    arch_spec = manifest["arch"]
    if "tree" in arch_spec:
        return arch.build(arch_spec["tree"], "arch.tree")
    spec, options = arch_spec["spec"], arch_spec.get("options", {})
    try:
        model = load_model(spec, **options)
    except NetshrinkError as exc:
        raise ArtifactError(
            f"arch: cannot build {schema.show(spec)} with options {schema.show(options)}: "
            f"{str(exc)[:300]}"
        ) from None
    for i, edit in enumerate(manifest.get("edits", [])):
        try:
            arch.apply_edits(model, [edit])
        except ArtifactError as exc:
            raise ArtifactError(f"edits[{i}]: {exc}") from None
    return model


def _guarded_build(manifest: dict[str, Any], budget: int, meta: bool) -> nn.Module:
    """:func:`_build_arch` under an allocation guard; on the meta device nothing is allocated
    (raises :class:`_NoMetaBuild` when the model cannot be built there)."""
    with arch.allocation_guard(budget, schema.MAX_MODULES, "the model") as count:
        try:
            if meta:
                with torch.device("meta"), _SkipMetaInit():
                    model = _build_arch(manifest)
            else:
                model = _build_arch(manifest)
        except Exception as exc:
            if count.error is not None:
                raise ArtifactError(f"arch: {count.error}; {schema.budget_hint()}") from None
            if isinstance(exc, ArtifactError):
                raise
            if meta:
                raise _NoMetaBuild from exc
            spec = manifest["arch"].get("spec", "the module tree")
            raise ArtifactError(
                f"arch: cannot build {schema.show(spec)}: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        if count.error is not None:
            raise ArtifactError(f"arch: {count.error}; {schema.budget_hint()}")
    return model


def _expected_shapes(model: nn.Module, set_paths: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes the tensors of allow-listed modules must have: a module an edit changed is
    rebuilt (on the meta device) from its new attributes; others keep their built shapes.
    Tensors of other module classes are only held to the budget."""
    edited = set(set_paths)
    out: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if name in edited:
            try:
                with torch.device("meta"), _SkipMetaInit():
                    shapes = arch.rebuilt_shapes(module)
            except ArtifactError as exc:
                raise ArtifactError(f"edits: module {name!r}: {exc}") from None
            except Exception as exc:  # describe() refuses a non-simple attribute
                raise ArtifactError(f"edits: module {name!r}: {str(exc)[:200]}") from None
        elif _allow_listed(module):
            shapes = {
                key: tuple(t.shape)
                for key, t in {**module._parameters, **module._buffers}.items()
                if t is not None and key not in module._non_persistent_buffers_set
            }
        else:
            shapes = None
        for key, shape in (shapes or {}).items():
            out[f"{name}.{key}" if name else key] = shape
    return out


def _allow_listed(module: nn.Module) -> bool:
    entry = arch.MODULE_TYPES.get(type(module).__name__)
    return entry is not None and type(module) is entry[0]


def _check_tensors(model: nn.Module, plan: schema.Plan) -> None:
    """The manifest's tensor table names exactly the model's tensors, with fitting shapes."""
    expected = set(model_tensors(model))
    missing = expected - set(plan.tensors)
    if missing:
        raise ArtifactError(f"manifest lacks tensors {sorted(missing)[:5]}")
    extra = sorted(set(plan.tensors) - expected)
    if extra:
        raise ArtifactError(
            f"t[{schema.show(extra[0])}]: manifest has a tensor {extra[0]!r} the model does "
            "not have"
        )
    for name, shape in _expected_shapes(model, plan.set_paths).items():
        declared = plan.tensors[name].shape if name in plan.tensors else shape
        if declared != shape:
            owner = name.rpartition(".")[0]
            raise ArtifactError(
                f"t[{schema.show(name)}].shape: {list(declared)} does not match the model's "
                f"{list(shape)} (module {owner!r}: {model.get_submodule(owner)})"
            )


def load(
    path: str | Path, *, max_decoded_bytes: int | None = None, runtime: str = "dense"
) -> nn.Module:
    """Rebuild a runnable model from an artifact alone (no pickle, no code from the file).

    ``runtime="dense"`` (the default) decodes every tensor to an ordinary dense module, for
    fine-tuning and inspection. ``runtime="packed"`` keeps each encoded tensor in its stored
    form (int8 / int4 kernels, CSR, or on-the-fly decoding: see :mod:`netshrink.runtime`), so
    the loaded model takes about as much memory as the file; it is for inference.

    Nothing in the file is trusted: the manifest is checked against a schema, and the model and
    its decoded tensors must fit a budget the file's size justifies (``max(64 MiB, 1000 x file
    size)``) before anything is built. For a trusted file that needs more, pass
    ``max_decoded_bytes`` or set ``NETSHRINK_MAX_DECODED_BYTES``. Raises
    :class:`~netshrink.ArtifactError` naming the offending field.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"load: field 'runtime': {runtime!r} is not one of {list(RUNTIMES)}")
    path = Path(path)
    raw, blob_bytes = _read_header(path)
    try:
        budget = schema.decoded_budget(path.stat().st_size, max_decoded_bytes)
        manifest = _parse(raw)
        plan = schema.validate(manifest, blob_bytes)
        schema.check_budget(plan, budget, path.stat().st_size)
        model = _load_checked(path, manifest, plan, budget, packed=runtime == "packed")
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    return model


def _all_stored(model: nn.Module, stored: dict[str, Any]) -> bool:
    """True when every parameter and buffer of ``model`` (non-persistent ones included) has a
    record in the file, so nothing is left on the meta device once the records are set."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    return all(name in stored for name in names)


def _load_checked(
    path: Path, manifest: dict[str, Any], plan: schema.Plan, budget: int, packed: bool = False
) -> nn.Module:
    meta_model: nn.Module | None = None
    try:  # count on the meta device first: a model too big for the budget is never allocated
        meta_model = _guarded_build(manifest, budget, meta=True)
        _check_tensors(meta_model, plan)
    except _NoMetaBuild:
        pass  # built for real below, still capped by the guard
    if packed and meta_model is not None and _all_stored(meta_model, manifest["t"]):
        # Every tensor comes from the file: fill the meta model in place, so the dense weights
        # of packed layers are never allocated (peak memory stays near the packed size).
        model = meta_model
    else:
        model = _guarded_build(manifest, budget, meta=False)
        if meta_model is None:
            _check_tensors(model, plan)
    read = _reader(_read_blob(path))
    for name, record in manifest["t"].items():
        where = f"t[{schema.show(name)}]"
        try:
            encoding = Encoding.from_record(record, read)
            value = encoding.decode()
        except NetshrinkError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        except Exception as exc:  # a decoder's own error on a record that passed the schema
            raise ArtifactError(
                f"{where}: cannot decode: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        if tuple(value.shape) != plan.tensors[name].shape:
            raise ArtifactError(
                f"{where}: decodes to shape {list(value.shape)}, the record says "
                f"{list(plan.tensors[name].shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ArtifactError(
                f"{where}: decodes to {bad} non-finite values (NaN or infinity); netshrink "
                "refuses non-finite weights"
            )
        if packed and is_packable(encoding):
            del value  # checked; the packed form keeps the stored arrays instead
            pack_tensor(model, name, record, read, encoding)
        else:
            arch.set_tensor(model, name, value.clone())
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # _all_stored said every tensor had a record: a module re-created one
        raise ArtifactError(f"tensors {left[:4]} were not filled from the file")
    model.eval()
    info = model_info(model) or ModelInfo(spec="")
    stored = manifest.get("info") or {}
    info = ModelInfo.from_json({**info.to_json(), **stored})
    try:
        schema.check_input_shape(info.input_shape)
    except ValueError as exc:  # the adapter derived it from arch.options
        raise ArtifactError(f"info.input_shape: {exc}") from None
    set_model_info(model, info)
    return model
