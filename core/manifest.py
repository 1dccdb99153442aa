"""The manifest's schema and the decoded-size budget: what the reader checks before it builds.

Nothing in an artifact is trusted. :func:`parse` reads the manifest's JSON within fixed limits
(size, number of objects and arrays, nesting depth, no duplicate keys); :func:`validate` checks
it against the schema below (Pydantic models with bounds and ``extra="forbid"``) and the blob's
length: every field's type and range, every array reference inside the blob and no two of them
reading the same bytes, shapes whose element counts fit int64 and agree with each encoding's
arrays, module trees of bounded size and depth. The :class:`Plan` it returns says what decoding
will allocate; :func:`check_budget` refuses a file whose decoded size its own size cannot
justify (:func:`decoded_budget`). Every failure is an :class:`~netshrink.errors.ArtifactError`
that names the field, e.g. ``t['fc1.weight'].shape[0]``.

Record keys are short on disk; errors spell them out (:data:`FIELD_NAMES`: ``s`` is ``shape``,
``a`` is ``arrays``, ...). See ``docs/security.md`` for the threat model.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from netshrink.encodings import DTYPES, packed_nbytes
from netshrink.encodings.base import _KINDS
from netshrink.errors import ArtifactError, ConfigError
from netshrink.modules import MODULE_TYPES

# -- limits ------------------------------------------------------------------------------------

MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # the manifest's JSON text, after inflating
MAX_JSON_CONTAINERS = 250_000  # JSON objects + arrays (counted on the text, before parsing)
MAX_JSON_DEPTH = 128
MAX_MODULES = 10_000  # modules described by the manifest, and modules any build registers
MAX_MODULE_DEPTH = 32  # nesting of a module tree
MAX_TENSORS = 20_000
MAX_NDIM = 16
MAX_DIM = 2**62
MAX_ELEMENTS = 2**63 - 1  # int64: what torch can index
MAX_OFFSET = 2**62
MAX_GROUP_SIZE = 2**20  # input columns per quantization scale (Quantized.group_size)
MAX_INPUT_ELEMENTS = 2**24  # one input sample (info.input_shape); 3 x 2048 x 2048 fits
MIN_DECODED_BYTES = 64 * 1024 * 1024
DECODED_BYTES_PER_FILE_BYTE = 1000
BUDGET_ENV = "NETSHRINK_MAX_DECODED_BYTES"

#: The long names errors use for a record's short keys.
FIELD_NAMES = {
    "k": "kind",
    "s": "shape",
    "a": "arrays",
    "c": "children",
    "d": "dtype",
    "b": "bits",
    "sc": "scale",
    "zp": "zero_point",
    "fs": "full_shape",
    "g": "group_size",
    "n": "centroids",
    "seed": "seed",
    "ns": "noise_scale",
    "dist": "distribution",
    "ib": "index_bits",
    "nr": "index_codes",
}
# Fields whose next location item is a free-form key (a tensor name, an option name, a role).
_KEYED = {"t", "a", "c", "options", "attrs", "args"}

_NAME = r"[A-Za-z0-9_\-]+"
_PATH = rf"{_NAME}(\.{_NAME})*"
_F32_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_F32_MAX = 3.4028234663852886e38
_FORBIDDEN_OPTIONS = {
    "checkpoint": "names a local file to read",
    "arch": "names another architecture to load weights into",
}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 48
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4
_repr.maxlevel = 2


def show(value: Any) -> str:
    """A bounded ``repr`` for error messages (a hostile value may be huge)."""
    try:
        return _repr.repr(value)
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


def _fail(loc: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{loc}: {msg}" if loc else msg)


# -- the decoded-size budget -------------------------------------------------------------------

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def decoded_budget(file_size: int, override: int | None = None) -> int:
    """Bytes a file of ``file_size`` bytes may decode to: ``override`` if given, else
    ``$NETSHRINK_MAX_DECODED_BYTES`` if set (bytes, or with a K/M/G/T suffix), else
    ``max(64 MiB, 1000 * file_size)``. The same figure caps the model the reader builds."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 0:
            raise ConfigError(
                f"max_decoded_bytes must be a non-negative whole number of bytes, got "
                f"{show(override)}"
            )
        return override
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text, re.IGNORECASE)
        if match is None:
            raise ConfigError(
                f"{BUDGET_ENV} must be a number of bytes such as 2000000000 or 8G, got {show(text)}"
            )
        return int(match[1]) * _SUFFIX[match[2].upper()]
    return max(MIN_DECODED_BYTES, DECODED_BYTES_PER_FILE_BYTE * file_size)


def budget_hint() -> str:
    """How to load a trusted file that exceeds the budget."""
    return (
        "if you trust this file, raise the limit with netshrink.load(path, "
        f"max_decoded_bytes=N) or {BUDGET_ENV}=N"
    )


def human_bytes(n: int) -> str:
    """``1.5 GiB``-style text."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# -- JSON ----------------------------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ArtifactError(f"manifest: duplicate key {show(key)} in one JSON object")
            seen.add(key)
    return out


def parse(text: bytes) -> Any:
    """The manifest's JSON, read within :data:`MAX_MANIFEST_BYTES`, :data:`MAX_JSON_CONTAINERS`
    and :data:`MAX_JSON_DEPTH`, refusing duplicate keys."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    # An upper bound (brackets inside strings count too), so the parser never builds millions
    # of Python objects from a few kilobytes of zlib.
    containers = text.count(b"{") + text.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise ArtifactError(
            f"manifest has {containers} JSON objects and arrays, more than the "
            f"{MAX_JSON_CONTAINERS} a netshrink manifest may hold"
        )
    try:
        value = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ArtifactError:
        raise
    except RecursionError:
        raise ArtifactError(
            f"manifest is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, int digit limits
        raise ArtifactError(f"corrupted manifest: {str(exc)[:200]}") from None
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ArtifactError(
                f"manifest is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
            )
        items = node.values() if isinstance(node, dict) else node
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return value


# -- value types -----------------------------------------------------------------------------------


def _f32(value: Any) -> Any:
    """A finite float32, as a JSON number or its text (how the writer stores scales)."""
    if isinstance(value, str):
        if len(value) > 64 or not _F32_TEXT.fullmatch(value):
            raise ValueError(f"must be a finite float32 (a number or its text), got {show(value)}")
        number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"must be a finite float32 (a number or its text), got {show(value)}")
    if not math.isfinite(number) or abs(number) > _F32_MAX:
        raise ValueError(f"must be a finite float32, got {show(value)}")
    return value


def _scalar(value: Any, int_bound: int) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -int_bound <= value <= int_bound
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 256
    return False


def _simple(int_bound: int):
    def check(value: Any) -> Any:
        ok = _scalar(value, int_bound) or (
            isinstance(value, list)
            and len(value) <= 16
            and all(_scalar(v, int_bound) for v in value)
        )
        if not ok:
            raise ValueError(
                "must be a number (|int| <= "
                f"{int_bound}, floats finite), a bool, a string of at most 256 characters, "
                f"null, or a list of at most 16 of them; got {show(value)}"
            )
        return value

    return PlainValidator(check)


Dim = Annotated[StrictInt, Field(ge=0, le=MAX_DIM)]
Shape = Annotated[list[Dim], Field(max_length=MAX_NDIM)]
Offset = Annotated[StrictInt, Field(ge=0, le=MAX_OFFSET)]
DtypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]
Ref = Annotated[tuple[DtypeName, Offset, Offset], Field(strict=False)]
F32 = Annotated[Any, PlainValidator(_f32)]
Name = Annotated[StrictStr, Field(max_length=128, pattern=rf"^{_NAME}$")]
TensorName = Annotated[StrictStr, Field(max_length=1024, pattern=rf"^{_PATH}$")]
ArgValue = Annotated[Any, _simple(2**62)]
OptionValue = Annotated[Any, _simple(2**16)]  # adapters may loop over sizes and depths


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- module trees and edits ------------------------------------------------------------------------


class ModuleSpec(_Strict):
    """One module of an architecture tree: an allow-listed ``torch.nn`` class and its arguments."""

    type: StrictStr
    args: Annotated[dict[Name, ArgValue], Field(max_length=16)] = {}
    children: Annotated[
        list[Annotated[tuple[Name, ModuleSpec], Field(strict=False)]],
        Field(max_length=MAX_MODULES),
    ] = []

    @field_validator("type")
    @classmethod
    def _allowed(cls, value: str) -> str:
        if value not in MODULE_TYPES:
            raise ValueError(
                f"module type {show(value)} is not allowed in artifacts (allowed: "
                f"{', '.join(sorted(MODULE_TYPES))})"
            )
        return value

    @model_validator(mode="after")
    def _args_and_children(self) -> ModuleSpec:
        allowed = MODULE_TYPES[self.type][1]
        unexpected = sorted(set(self.args) - set(allowed))
        if unexpected:
            raise ValueError(
                f"unexpected arguments {unexpected} for {self.type} (valid: {list(allowed)})"
            )
        if self.children and self.type != "Sequential":
            raise ValueError(f"a {self.type} has no children; only a Sequential has")
        return self


class SetEdit(_Strict):
    """Set simple attributes of the module at ``path`` ('' is the root)."""

    op: Literal["set"]
    path: Annotated[StrictStr, Field(max_length=1024, pattern=rf"^({_PATH})?$")]
    attrs: Annotated[dict[Name, ArgValue], Field(max_length=64)]


class ReplaceEdit(_Strict):
    """Replace (or add) the module at ``path`` with one built from a :class:`ModuleSpec`."""

    op: Literal["replace"]
    path: TensorName
    module: ModuleSpec


class ArchSpec(_Strict):
    """The base model: a spec its adapter builds, with JSON options."""

    spec: Annotated[StrictStr, Field(max_length=256, pattern=r"^[A-Za-z][A-Za-z0-9_\-]*:[^?\s]+$")]
    options: Annotated[dict[Name, OptionValue], Field(max_length=32)] = {}

    @field_validator("spec")
    @classmethod
    def _no_files(cls, value: str) -> str:
        prefix, _, name = value.partition(":")
        if prefix == "file" or (prefix == "hf" and ("/" in name or "\\" in name)):
            raise ValueError(
                f"an artifact's base model cannot be another file ({show(value)}); a model "
                "spec such as 'zoo:lenet5' or a module tree is expected"
            )
        return value

    @field_validator("options")
    @classmethod
    def _no_file_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, why in _FORBIDDEN_OPTIONS.items():
            if key in value:
                raise ValueError(f"option {key!r} {why}; an artifact may not use it")
        return value


class ArchTree(_Strict):
    """A model described as data (plain ``torch.nn`` modules only)."""

    tree: ModuleSpec


class Info(_Strict):
    """What the loaded model's :class:`~netshrink.ModelInfo` takes from the file."""

    input_shape: (
        Annotated[list[Annotated[StrictInt, Field(ge=1, le=2**20)]], Field(max_length=8)] | None
    ) = None
    num_classes: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    head: Annotated[StrictStr, Field(max_length=1024)] | None = None

    @field_validator("input_shape")
    @classmethod
    def _sample_size(cls, value: list[int] | None) -> list[int] | None:
        check_input_shape(value)
        return value


def check_input_shape(shape: Any) -> None:
    """Refuse an input shape whose one sample has more than :data:`MAX_INPUT_ELEMENTS`
    elements (tools make dummy inputs of this shape)."""
    if shape and math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(
            f"{list(shape)} is {math.prod(shape)} elements per sample, more than "
            f"{MAX_INPUT_ELEMENTS}"
        )


class _Top(_Strict):
    format: Literal["netshrink"]
    v: Literal[1]
    netshrink: Annotated[StrictStr, Field(max_length=64)]
    arch: dict[str, Any]
    edits: Annotated[list[Any], Field(max_length=MAX_MODULES)] = []
    info: Info | None = None
    t: Annotated[dict[TensorName, Any], Field(max_length=MAX_TENSORS)]
    recipe: dict[str, Any] | None = None  # provenance, free-form (within the JSON limits)
    summary: dict[str, Any] | None = None  # accuracy figures `netshrink report` prints


# -- encoding records ------------------------------------------------------------------------------


class _Record(_Strict):
    k: StrictStr
    s: Shape


class _DenseArrays(_Strict):
    data: Ref


class DenseRecord(_Record):
    """:class:`~netshrink.Dense`: ``data`` in its storage dtype, decoded to ``d``."""

    k: Literal["dense"]
    d: DtypeName | None = None
    a: _DenseArrays


class _QuantArrays(_Strict):
    codes: Ref
    scale: Ref | None = None
    zp: Ref | None = None


class QuantRecord(_Record):
    """:class:`~netshrink.Quantized`: packed codes, scales and zero points."""

    k: Literal["quant"]
    b: Annotated[StrictInt, Field(ge=1, le=8)]
    sc: F32 | None = None
    zp: Annotated[StrictInt, Field(ge=0, le=255)] | None = None
    fs: Shape | None = None
    g: Annotated[StrictInt, Field(ge=1, le=MAX_GROUP_SIZE)] | None = None
    a: _QuantArrays


class _CodebookArrays(_Strict):
    idx: Ref
    centroids: Ref
    spreads: Ref | None = None


class CodebookRecord(_Record):
    """:class:`~netshrink.Codebook`: packed indices, centroids, an optional seeded perturbation."""

    k: Literal["codebook"]
    n: Annotated[StrictInt, Field(ge=1, le=2**16)]
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    ns: F32 | None = None
    dist: Literal["normal", "uniform"] | None = None
    a: _CodebookArrays


class _SparseArrays(_Strict):
    mask: Ref | None = None
    rel: Ref | None = None


class SparseRecord(_Record):
    """:class:`~netshrink.Sparse`: a bitmask or relative indices, and the values' record."""

    k: Literal["sparse"]
    ib: Annotated[StrictInt, Field(ge=0, le=8)]
    nr: Annotated[StrictInt, Field(ge=0, le=MAX_OFFSET)] | None = None
    a: _SparseArrays
    c: Annotated[dict[StrictStr, Any], Field(min_length=1, max_length=1)]


class PluginRecord(_Record):
    """A kind a plugin registered: arrays and children are checked, its own fields are JSON."""

    model_config = ConfigDict(extra="allow", strict=True)
    a: Annotated[dict[Name, Ref], Field(max_length=64)] = {}
    c: Annotated[dict[Name, Any], Field(max_length=64)] = {}


RECORDS: dict[str, type[_Record]] = {
    "dense": DenseRecord,
    "quant": QuantRecord,
    "codebook": CodebookRecord,
    "sparse": SparseRecord,
}


# -- errors --------------------------------------------------------------------------------------


def _loc(base: str, loc: tuple[Any, ...], record: bool) -> str:
    out, keyed = base, False
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
            keyed = False
        elif keyed:
            out += f"[{show(item)}]"
            keyed = False
        else:
            name = FIELD_NAMES.get(item, item) if record else item
            out += f".{name}" if out else str(name)
            keyed = item in _KEYED
    return out


def _validate(model: type[BaseModel], value: Any, base: str, record: bool = False) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:3]:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (not part of the netshrink format)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif "got" not in msg:
                msg += f" (got {show(err.get('input'))})"
            parts.append(f"{_loc(base, err['loc'], record) or 'manifest'}: {msg}")
        more = exc.error_count() - len(parts)
        tail = f" (and {more} more)" if more > 0 else ""
        raise ArtifactError("; ".join(parts) + tail) from None


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """One tensor as the manifest declares it."""

    shape: tuple[int, ...]
    decoded_bytes: int


@dataclass
class Plan:
    """What a validated manifest will make the reader build and allocate."""

    tensors: dict[str, TensorPlan]
    modules: int
    set_paths: list[str] = field(default_factory=list)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of every decoded tensor together."""
        return sum(t.decoded_bytes for t in self.tensors.values())


def _numel(shape: tuple[int, ...], loc: str) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > MAX_ELEMENTS:
            raise _fail(
                f"{loc}.shape",
                f"{list(shape)} has more elements than int64 can count (overflow)",
            )
    return numel


def _count_modules(tree: Any, loc: str) -> int:
    """Modules in a (not yet validated) tree, refusing more than :data:`MAX_MODULES` or a
    deeper nesting than :data:`MAX_MODULE_DEPTH` before anything walks it recursively."""
    count, stack = 0, [(tree, loc, 1)]
    while stack:
        node, where, depth = stack.pop()
        count += 1
        if count > MAX_MODULES:
            raise _fail(loc, f"describes more than {MAX_MODULES} modules")
        if depth > MAX_MODULE_DEPTH:
            raise _fail(where, f"modules nested more than {MAX_MODULE_DEPTH} deep")
        children = node.get("children") if isinstance(node, dict) else None
        if isinstance(children, list):
            for i, pair in enumerate(children):
                if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], dict):
                    stack.append((pair[1], f"{where}.children[{i}][1]", depth + 1))
    return count


class _Checker:
    def __init__(self, blob_bytes: int) -> None:
        self.blob_bytes = blob_bytes
        self.refs: list[tuple[int, int, str]] = []

    def ref(self, loc: str, ref: tuple[str, int, int], dtypes: tuple[str, ...] = ()) -> int:
        """Check one array reference; returns its element count."""
        dtype, offset, nbytes = ref
        if dtypes and dtype not in dtypes:
            raise _fail(loc, f"dtype must be {' or '.join(dtypes)}, got {dtype}")
        if offset + nbytes > self.blob_bytes:
            raise _fail(
                loc,
                f"array reference {list(ref)} points outside the data ({self.blob_bytes} "
                "bytes): the file is truncated or corrupted",
            )
        size = DTYPES[dtype].itemsize
        if nbytes % size:
            raise _fail(loc, f"{nbytes} bytes is not a whole number of {dtype} elements")
        if nbytes:
            self.refs.append((offset, nbytes, loc))
        return nbytes // size

    def overlaps(self) -> None:
        end, owner = 0, ""
        for offset, nbytes, loc in sorted(self.refs):
            if offset < end:
                raise _fail(
                    loc,
                    f"reads bytes {offset}..{offset + nbytes} of the data, which {owner} "
                    "also reads: no two arrays may share bytes",
                )
            if offset + nbytes > end:
                end, owner = offset + nbytes, loc

    def record(
        self, record: Any, loc: str, parent: tuple[int, ...] | None = None
    ) -> tuple[tuple[int, ...], int]:
        """Check one encoding record; returns its shape and decoded element size."""
        if not isinstance(record, dict):
            raise _fail(loc, f"must be an encoding record (a JSON object), got {show(record)}")
        nulls = [k for k, v in record.items() if v is None]
        if nulls:
            raise _fail(f"{loc}.{FIELD_NAMES.get(nulls[0], nulls[0])}", "must not be null")
        kind = record.get("k")
        if not isinstance(kind, str) or kind not in _KINDS:
            raise _fail(
                f"{loc}.kind",
                f"unknown encoding kind {show(kind)} (known: {', '.join(sorted(_KINDS))})",
            )
        if isinstance(record.get("a"), dict) and None in record["a"].values():
            raise _fail(f"{loc}.arrays", "an array reference is null")
        model = _validate(RECORDS.get(kind, PluginRecord), record, loc, record=True)
        shape = tuple(model.s)
        numel = _numel(shape, loc)
        return shape, getattr(self, f"_{kind}", self._plugin)(model, loc, shape, numel, parent)

    def _dense(self, m: DenseRecord, loc, shape, numel, parent) -> int:
        count = self.ref(f"{loc}.arrays['data']", m.a.data)
        if count != numel:
            raise _fail(f"{loc}.arrays['data']", f"holds {count} elements for shape {list(shape)}")
        return DTYPES[m.d or m.a.data[0]].itemsize

    def _quant(self, m: QuantRecord, loc, shape, numel, parent) -> int:
        want = parent if parent is not None else shape
        if m.fs is not None and tuple(m.fs) != want:
            whose = "the sparse tensor's shape" if parent is not None else "shape"
            raise _fail(f"{loc}.full_shape", f"{m.fs} must equal {whose} {list(want)}")
        full = tuple(m.fs) if m.fs is not None else shape
        codes = self.ref(f"{loc}.arrays['codes']", m.a.codes, ("U8",))
        if codes != packed_nbytes(numel, m.b):
            raise _fail(
                f"{loc}.arrays['codes']",
                f"{codes} bytes for {numel} codes of {m.b} bits "
                f"(expected {packed_nbytes(numel, m.b)})",
            )
        channels = 1
        if m.g is not None:
            channels = self._quant_groups(m, loc, full, parent)
        elif m.a.scale is not None:
            channels = self.ref(f"{loc}.arrays['scale']", m.a.scale, ("F32",))
            if channels not in (1, full[0] if full else 1):
                raise _fail(
                    f"{loc}.arrays['scale']",
                    f"{channels} scales for a tensor of shape {list(full)} (1 or one per "
                    "output channel)",
                )
            if channels > 1 and parent is not None and full != parent:
                raise _fail(
                    f"{loc}.full_shape",
                    "per-channel values of a sparse tensor need full_shape, the sparse "
                    "tensor's shape",
                )
        elif m.sc is None:
            raise _fail(f"{loc}.scale", "required without a per-channel scale array")
        if m.a.zp is not None:
            count = self.ref(f"{loc}.arrays['zp']", m.a.zp, ("U8",))
            if count != channels:
                raise _fail(f"{loc}.arrays['zp']", f"{count} zero points for {channels} scales")
        elif m.zp is None:
            raise _fail(f"{loc}.zero_point", "required without a zero-point array")
        elif m.zp >= 1 << m.b:
            raise _fail(f"{loc}.zero_point", f"{m.zp} is not a {m.b}-bit code")
        return 4

    def _quant_groups(self, m: QuantRecord, loc, full: tuple[int, ...], parent) -> int:
        """Check a grouped record's scales: one per row and group of ``g`` columns."""
        if parent is not None and full != parent:
            raise _fail(
                f"{loc}.full_shape",
                "grouped values of a sparse tensor need full_shape, the sparse tensor's shape",
            )
        if len(full) < 2:
            raise _fail(
                f"{loc}.group_size",
                f"needs a tensor of at least 2 dimensions, the shape is {list(full)}",
            )
        if m.a.scale is None:
            raise _fail(f"{loc}.arrays['scale']", "required with a group_size")
        if m.sc is not None:
            raise _fail(f"{loc}.scale", "a grouped record stores its scales in an array only")
        columns = math.prod(full[1:])
        want = full[0] * -(-columns // m.g)
        count = self.ref(f"{loc}.arrays['scale']", m.a.scale, ("F32",))
        if count != want:
            raise _fail(
                f"{loc}.arrays['scale']",
                f"{count} scales for shape {list(full)} with group_size {m.g} (expected "
                f"{full[0]} rows x ceil({columns} / {m.g}) groups = {want})",
            )
        return count

    def _codebook(self, m: CodebookRecord, loc, shape, numel, parent) -> int:
        bits = max(1, (m.n - 1).bit_length())
        idx = self.ref(f"{loc}.arrays['idx']", m.a.idx, ("U8",))
        if idx != packed_nbytes(numel, bits):
            raise _fail(
                f"{loc}.arrays['idx']",
                f"{idx} bytes for {numel} indices of {bits} bits "
                f"(expected {packed_nbytes(numel, bits)})",
            )
        count = self.ref(f"{loc}.arrays['centroids']", m.a.centroids, ("F32",))
        if count != m.n:
            raise _fail(f"{loc}.arrays['centroids']", f"{count} centroids, the record says {m.n}")
        if m.a.spreads is not None:
            count = self.ref(f"{loc}.arrays['spreads']", m.a.spreads, ("F16",))
            if count != m.n:
                raise _fail(f"{loc}.arrays['spreads']", f"{count} spreads for {m.n} centroids")
        elif m.seed is not None and m.ns is not None and float(m.ns) != 0.0:
            raise _fail(f"{loc}.arrays", "a perturbed codebook needs per-cluster spreads")
        return 4

    def _sparse(self, m: SparseRecord, loc, shape, numel, parent) -> int:
        if m.ib == 0:
            if m.a.mask is None or m.a.rel is not None or m.nr is not None:
                raise _fail(f"{loc}.arrays", "a bitmask (index_bits 0) stores 'mask' only")
            nbytes = self.ref(f"{loc}.arrays['mask']", m.a.mask, ("U8",))
            if nbytes != (numel + 7) // 8:
                raise _fail(
                    f"{loc}.arrays['mask']",
                    f"{nbytes} bytes for a mask of {numel} elements (expected {(numel + 7) // 8})",
                )
            most = numel
        else:
            if m.a.rel is None or m.a.mask is not None or m.nr is None:
                raise _fail(f"{loc}.arrays", "relative indices store 'rel' and index_codes only")
            nbytes = self.ref(f"{loc}.arrays['rel']", m.a.rel, ("U8",))
            if nbytes != packed_nbytes(m.nr, m.ib):
                raise _fail(
                    f"{loc}.arrays['rel']",
                    f"{nbytes} bytes for {m.nr} codes of {m.ib} bits "
                    f"(expected {packed_nbytes(m.nr, m.ib)})",
                )
            most = min(numel, m.nr)
        if set(m.c) != {"v"}:
            raise _fail(f"{loc}.children", "must hold exactly the values' record 'v'")
        where = f"{loc}.children['v']"
        values, itemsize = self.record(m.c["v"], where, parent=shape)
        if len(values) != 1 or values[0] > most:
            raise _fail(
                f"{where}.shape",
                f"{list(values)} must be one dimension of at most {most} kept values",
            )
        return itemsize

    def _plugin(self, m: PluginRecord, loc, shape, numel, parent) -> int:
        for role, ref in m.a.items():
            self.ref(f"{loc}.arrays[{role!r}]", ref)
        for name, child in m.c.items():
            self.record(child, f"{loc}.children[{name!r}]", parent=shape)
        return 8  # unknown: assume the widest dtype


def validate(manifest: Any, blob_bytes: int) -> Plan:
    """Check ``manifest`` (parsed JSON) against the schema and a blob of ``blob_bytes`` bytes;
    returns what loading it will build. Raises :class:`ArtifactError` naming the field."""
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest is not a netshrink manifest (not a JSON object)")
    top = _validate(_Top, manifest, "")
    modules = 0
    arch = top.arch
    if "spec" in arch:
        _validate(ArchSpec, arch, "arch")
    elif "tree" in arch:
        modules += _count_modules(arch["tree"], "arch.tree")
        _validate(ArchTree, arch, "arch")
        if top.edits:
            raise _fail("edits", "only apply to a model built from a spec (arch.spec)")
    else:
        raise _fail("arch", "needs 'spec' (a model spec and its options) or 'tree' (a module tree)")
    set_paths = []
    for i, edit in enumerate(top.edits):
        loc = f"edits[{i}]"
        op = edit.get("op") if isinstance(edit, dict) else None
        if op == "set":
            set_paths.append(_validate(SetEdit, edit, loc).path)
        elif op == "replace":
            modules += _count_modules(edit.get("module"), f"{loc}.module")
            if modules > MAX_MODULES:
                raise _fail(loc, f"the manifest describes more than {MAX_MODULES} modules")
            _validate(ReplaceEdit, edit, loc)
        elif isinstance(edit, dict):
            raise _fail(f"{loc}.op", f"unknown edit operation {show(op)} (valid: set, replace)")
        else:
            raise _fail(loc, f"must be an edit (a JSON object), got {show(edit)}")
    if modules > MAX_MODULES:
        raise _fail("arch", f"the manifest describes more than {MAX_MODULES} modules")
    checker = _Checker(blob_bytes)
    tensors = {}
    for name, record in top.t.items():
        shape, itemsize = checker.record(record, f"t[{show(name)}]")
        tensors[name] = TensorPlan(shape, math.prod(shape) * itemsize)
    checker.overlaps()
    return Plan(tensors=tensors, modules=modules, set_paths=set_paths)


def check_budget(plan: Plan, budget: int, file_size: int) -> None:
    """Refuse a manifest whose tensors decode to more than ``budget`` bytes."""
    total = plan.decoded_bytes
    if total <= budget:
        return
    name, largest = max(plan.tensors.items(), key=lambda item: item[1].decoded_bytes)
    raise _fail(
        f"t[{show(name)}].shape",
        f"{list(largest.shape)} decodes to {human_bytes(largest.decoded_bytes)} (all tensors: "
        f"{human_bytes(total)}), more than the {human_bytes(budget)} a "
        f"{human_bytes(file_size)} file may decode to; {budget_hint()}",
    )
