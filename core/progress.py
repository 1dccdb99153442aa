"""Progress bars (tqdm) that stay quiet when output is not a terminal or NETSHRINK_PROGRESS=0."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool | None:
    """False when disabled by the environment; None lets tqdm decide (off when not a TTY)."""
    return (
        False if os.environ.get("NETSHRINK_PROGRESS", "").strip() in ("0", "false", "no") else None
    )


def progress(
    iterable: Iterable[T],
    desc: str = "",
    total: int | None = None,
    leave: bool = False,
    **kwargs: Any,
) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar."""
    flag = enabled()
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            leave=leave,
            disable=None if flag is None else not flag,
            **kwargs,
        )
    )
