"""The :class:`Encoding` contract: how one tensor is stored, and how it is rebuilt from storage."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from netshrink.errors import ArtifactError

#: dtype names used in manifests (safetensors' spelling) and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Writes one array into the artifact and returns its reference; reads it back by reference.
ArrayWriter = Callable[[torch.Tensor], Any]
ArrayReader = Callable[[Any], torch.Tensor]

_KINDS: dict[str, type[Encoding]] = {}


def f32(x: float) -> str:
    """Shortest text that round-trips ``x`` as a float32 (for compact manifests)."""
    return str(np.float32(x))


class Encoding(ABC):
    """How one tensor (a parameter, a buffer, or the value vector of a sparse tensor) is stored.

    Subclasses hold the *packed* arrays that go into the artifact; :meth:`decode` rebuilds the
    tensor. ``payload_bytes`` counts exactly the bytes of those arrays.
    """

    kind: ClassVar[str]
    #: True when the stored values are restricted to a grid or codebook (quantized, codebook):
    #: later steps must not rewrite them.
    value_encoded: ClassVar[bool] = False

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(s) for s in shape)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    @property
    def numel(self) -> int:
        """Number of elements of the decoded tensor."""
        return int(np.prod(self.shape)) if self.shape else 1

    @abstractmethod
    def decode(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rebuild the tensor. ``positions`` (flat indices into the parent tensor) are given when
        this encoding stores the value vector of a sparse tensor."""

    @abstractmethod
    def arrays(self) -> dict[str, torch.Tensor]:
        """The packed arrays to store, by role."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-able fields (besides kind, shape, arrays and children)."""

    @classmethod
    @abstractmethod
    def from_parts(
        cls,
        shape: tuple[int, ...],
        meta: dict[str, Any],
        arrays: dict[str, torch.Tensor],
        children: dict[str, Encoding],
    ) -> Encoding:
        """Rebuild the encoding from :meth:`meta`, :meth:`arrays` and :meth:`children`."""

    def children(self) -> dict[str, Encoding]:
        """Nested encodings (e.g. the values of a sparse tensor)."""
        return {}

    def describe(self) -> str:
        """A short label for tables, e.g. ``sparse(rel4)+q4``."""
        return self.kind

    @property
    def is_value_encoded(self) -> bool:
        """True if this encoding or a nested one restricts values to a grid or codebook."""
        return self.value_encoded or any(c.is_value_encoded for c in self.children().values())

    def packed(self) -> dict[str, torch.Tensor]:
        """:meth:`arrays`, computed once (encodings are immutable once built)."""
        cached = self.__dict__.get("_packed")
        if cached is None:
            cached = self.__dict__["_packed"] = self.arrays()
        return cached

    @property
    def payload_bytes(self) -> int:
        """Bytes of the stored arrays, nested encodings included."""
        own = sum(a.numel() * a.element_size() for a in self.packed().values())
        return own + sum(c.payload_bytes for c in self.children().values())

    @property
    def nonzeros(self) -> int:
        """Number of non-zero elements of the decoded tensor."""
        return int(torch.count_nonzero(self.decode()))

    def bits_per_weight(self) -> float:
        """Stored bits per element of the decoded tensor."""
        return 8.0 * self.payload_bytes / max(self.numel, 1)

    # -- manifest round trip -------------------------------------------------------------------

    def to_record(self, write: ArrayWriter) -> dict[str, Any]:
        """Serialise to a JSON record; arrays go through ``write`` (which returns references)."""
        record: dict[str, Any] = {"k": self.kind, "s": list(self.shape)}
        record.update(self.meta())
        arrays = self.packed()
        if arrays:
            record["a"] = {role: write(arr.contiguous()) for role, arr in arrays.items()}
        children = self.children()
        if children:
            record["c"] = {name: child.to_record(write) for name, child in children.items()}
        return record

    @staticmethod
    def from_record(record: dict[str, Any], read: ArrayReader) -> Encoding:
        """Inverse of :meth:`to_record`; raises :class:`ArtifactError` on malformed records
        (:mod:`netshrink.manifest` checks a file's records against the schema first)."""
        if not isinstance(record, dict):
            raise ArtifactError(f"malformed encoding record: a {type(record).__name__}")
        try:
            kind = record["k"]
            cls = _KINDS[kind]
            shape = tuple(int(s) for s in record["s"])
            arrays = {role: read(ref) for role, ref in record.get("a", {}).items()}
            children = {
                name: Encoding.from_record(child, read)
                for name, child in record.get("c", {}).items()
            }
            meta = {k: v for k, v in record.items() if k not in ("k", "s", "a", "c")}
            return cls.from_parts(shape, meta, arrays, children)
        except ArtifactError:
            raise
        except KeyError as exc:
            raise ArtifactError(
                f"malformed encoding record: missing or unknown {str(exc)[:80]}"
            ) from None
        except (TypeError, ValueError, RuntimeError, IndexError, OverflowError) as exc:
            raise ArtifactError(
                f"malformed encoding record {str(record.get('k'))[:40]!r}: {str(exc)[:200]}"
            ) from None
