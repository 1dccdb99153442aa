"""One search across every method, per layer, under a size budget.

For each selected layer, every compressor that declares :meth:`Compressor.layer_options` offers
settings; options of a pruning compressor and a value-encoding one combine (prune, then
quantize). :func:`scan` applies each candidate *alone* to the reference model (no fine-tune) and
measures the layer's exact stored bytes, its MACs and the validation loss and accuracy on a
fixed validation subset, through an executor, checkpointing to the cache so an interrupted scan
resumes; asked for a latency budget, it also times each candidate's layer as the packed runtime
runs it. :func:`solve` picks one candidate per layer minimising the summed loss increase under
the byte budget (a multiple-choice knapsack by dynamic programming; with a MACs or latency
budget too, a MILP through ``scipy.optimize.milp``). :func:`search` measures the chosen plan
whole against re-solves and uniform plans (layers interact; the summed loss is only a
prediction) and keeps the best measured, turns it into a recipe whose steps use per-layer
``overrides``, runs it with :func:`netshrink.compress` (so the same recipe reproduces the
artifact byte for byte) and tightens the budget until the real artifact fits (and, with a
latency budget, until the artifact loaded in the packed runtime, timed whole, does).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.benchmark as tbench
import yaml
from torch import nn

from netshrink.adapters import ModelInfo
from netshrink.artifact import artifact_bytes, load
from netshrink.compressor import Compressor, LayerOption
from netshrink.context import CompressionContext
from netshrink.data import DataSplits
from netshrink.datasets import load as load_data
from netshrink.encodings import Encoding, EncodingTable
from netshrink.errors import ConfigError, NetshrinkError
from netshrink.executors import Executor, get_executor
from netshrink.fileio import atomic_write, cache_dir
from netshrink.metrics import count_macs
from netshrink.pipeline import CompressionResult, _info_for, _resolve_model, _settled, compress
from netshrink.progress import enabled as progress_enabled
from netshrink.recipe import Recipe
from netshrink.registry import compressors, get_compressor
from netshrink.runtime import is_packable, pack_tensor
from netshrink.selector import LayerSelector
from netshrink.training import FinetuneConfig

log = logging.getLogger("netshrink")

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x|b|kb|kib|mb|mib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}
_GLOB = re.compile(r"[*?\[\]]")
_CHECKPOINT_VERSION = 1


# -- candidates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One choice for one layer: a chain of options applied in order (empty: left dense)."""

    layer: str
    options: tuple[LayerOption, ...] = ()

    @property
    def label(self) -> str:
        """``dense``, or the options' labels joined by ``+``."""
        return "+".join(o.label for o in self.options) or "dense"

    @property
    def key(self) -> str:
        """Identifies the candidate in a checkpoint."""
        return f"{self.layer}\t{self.label}"


def _order(cls: type[Compressor]) -> int:
    """Chain order: structural first, then pruning, then value-encoding."""
    caps = cls.capabilities
    return 0 if caps.changes_structure else (2 if caps.encodes_values else 1)


def layer_candidates(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], methods: Sequence[str] | None = None
) -> dict[str, list[Candidate]]:
    """Per layer: ``dense``, each option alone, and each pair (pruning option, then
    value-encoding option) of two compressors that do not change structure.

    ``methods`` restricts the compressors (default: every registered one that declares
    options); a named compressor that declares none is an error."""
    classes = _option_classes(methods)
    out: dict[str, list[Candidate]] = {}
    for name, module in layers:
        offered: dict[str, list[LayerOption]] = {}
        for cls in classes:
            if not isinstance(module, cls.handled_types()):
                continue
            options = list(cls.layer_options(module, name))
            wrong = [
                o for o in options if not isinstance(o, LayerOption) or o.compressor != cls.name
            ]
            if wrong:
                raise NetshrinkError(
                    f"{cls.__qualname__}.layer_options returned {wrong[0]!r} for layer {name!r}; "
                    f"build each option with {cls.__qualname__}.option(config, bytes=...)"
                )
            if options:
                offered[cls.name] = options
        chains: list[tuple[LayerOption, ...]] = [(o,) for opts in offered.values() for o in opts]
        prune = [c for c in classes if c.name in offered and _order(c) == 1]
        value = [c for c in classes if c.name in offered and _order(c) == 2]
        for first, second in itertools.product(prune, value):
            chains += list(itertools.product(offered[first.name], offered[second.name]))
        out[name] = [Candidate(name), *(Candidate(name, chain) for chain in chains)]
    return out


def _declares_options(cls: type[Compressor]) -> bool:
    """Whether ``cls`` overrides :meth:`Compressor.layer_options`."""
    return getattr(cls.layer_options, "__func__", None) is not Compressor.layer_options.__func__


def _option_classes(methods: Sequence[str] | None) -> list[type[Compressor]]:
    if methods is None:
        found = [e.obj for _, e in sorted(compressors().items())]
        return [c for c in found if _declares_options(c)]
    classes = []
    for name in methods:
        try:
            cls = get_compressor(name)
        except KeyError as exc:
            raise ConfigError(f"search field 'methods': {exc}") from None
        if not _declares_options(cls):
            raise ConfigError(
                f"search field 'methods': {name!r} declares no per-layer options "
                "(Compressor.layer_options), so a search cannot choose its settings"
            )
        classes.append(cls)
    return classes


# -- applying a candidate ------------------------------------------------------------------------


def apply_candidate(
    model: nn.Module,
    candidate: Candidate,
    table: EncodingTable,
    *,
    data: DataSplits | None = None,
    info: ModelInfo | None = None,
    seed: int = 0,
) -> nn.Module:
    """Apply ``candidate``'s options, in order, to its layer of ``model`` (recording the
    encodings in ``table``) the way a recipe step does; returns the (possibly new) model."""
    for index, option in enumerate(candidate.options):
        cls = get_compressor(option.compressor)
        ctx = CompressionContext(
            data=data, encodings=table, info=info, seed=seed, step_index=index,
            step_name=f"search {option.label}",
        )
        module = model.get_submodule(candidate.layer)
        model = _build(cls, candidate.layer, option.config).compress(
            model, [(candidate.layer, module)], ctx
        ).model
        table.reconcile(model)
    return model


def _per_layer(cls: type[Compressor], config: dict[str, Any]) -> bool:
    return bool(cls.layer_fields) and set(config) <= set(cls.layer_fields)


def _build(cls: type[Compressor], layer: str, config: dict[str, Any]) -> Compressor:
    if _per_layer(cls, config):
        return cls(overrides={_pattern(layer): config})
    return cls(config)


def _pattern(layer: str) -> str:
    """A name pattern matching exactly ``layer``."""
    return f"re:^{re.escape(layer)}$" if _GLOB.search(layer) else layer


def layer_bytes(model: nn.Module, table: EncodingTable, layer: str) -> int:
    """Exact stored bytes of the tensors of ``layer`` (its own and its submodules')."""
    return sum(e.payload_bytes for e in _layer_encodings(model, table, layer).values())


def _layer_encodings(model: nn.Module, table: EncodingTable, layer: str) -> dict[str, Encoding]:
    """The encodings of ``layer``'s tensors (its own and its submodules'), by name relative to
    the layer (``weight``, ``0.bias``)."""
    prefix = f"{layer}."
    return {
        n.removeprefix(prefix): e for n, e in table.complete(model).items() if n.startswith(prefix)
    }


def layer_macs(macs: dict[str, int], layer: str) -> int:
    """MACs per sample of ``layer`` and its submodules from :func:`count_macs`'s output."""
    return sum(v for n, v in macs.items() if n == layer or n.startswith(f"{layer}."))


class _Holder(nn.Module):
    """A module holding one layer as ``layer`` (to apply an option to it alone)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def option_bytes(cls: type[Compressor], module: nn.Module, config: dict[str, Any]) -> int:
    """Exact stored bytes of ``module``'s tensors after ``cls`` compresses a copy of it alone
    with ``config``, without data: what a compressor's ``layer_options`` reports for an option
    whose bytes depend on what the encoder keeps (scales, clusters that survive k-means)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(module))
    ctx = CompressionContext()
    out = cls(config).compress(holder, [("layer", holder.layer)], ctx)
    return sum(enc.payload_bytes for enc in ctx.encodings.complete(out.model).values())


def check_layer_options(cls: type[Compressor], module: nn.Module) -> list[str]:
    """Problems with ``cls.layer_options`` on ``module`` (for conformance tests): each option
    must be a :class:`LayerOption` of ``cls`` whose declared bytes are the bytes ``cls``
    stores when the option is applied to a copy of the layer alone (no data)."""
    problems = []
    for option in cls.layer_options(copy.deepcopy(module), "layer"):
        if not isinstance(option, LayerOption) or option.compressor != cls.name:
            problems.append(f"{cls.name}: layer_options returned {option!r}, not its own option")
            continue
        table = EncodingTable()
        held = apply_candidate(
            _Holder(copy.deepcopy(module)), Candidate("layer", (option,)), table
        )
        stored = layer_bytes(held, table, "layer")
        if stored != option.bytes:
            problems.append(
                f"{cls.name}: option {option.label} declares {option.bytes:,} bytes but the "
                f"compressor stores {stored:,}"
            )
    return problems


# -- latency -------------------------------------------------------------------------------------

#: Seconds each latency figure is timed for (``Timer.blocked_autorange``'s ``min_run_time``).
LATENCY_MIN_RUN_S = 0.2

_LATENCY = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e-?\d+)?)\s*(%|s|ms|us)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@torch.inference_mode()
def _time_module(module: nn.Module, args: tuple[Any, ...]) -> float:
    """Seconds per call of ``module(*args)`` in eval mode: the median block of
    ``torch.utils.benchmark.Timer.blocked_autorange`` at this process's torch thread count
    (tests replace this function with a deterministic one)."""
    was_training = module.training
    module.eval()
    try:
        timer = tbench.Timer(
            "module(*args)", globals={"module": module, "args": args},
            num_threads=torch.get_num_threads(),
        )
        return float(timer.blocked_autorange(min_run_time=LATENCY_MIN_RUN_S).median)
    finally:
        module.train(was_training)


def _as_record(enc: Encoding) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor]]:
    """``enc``'s manifest record and a reader of its arrays, as an artifact stores them (flat
    arrays, read back by reference)."""
    arrays: list[torch.Tensor] = []

    def write(array: torch.Tensor) -> int:
        arrays.append(array.detach().cpu().contiguous().reshape(-1).clone())
        return len(arrays) - 1

    record = enc.to_record(write)
    return record, arrays.__getitem__


def packed_layer(module: nn.Module, encodings: dict[str, Encoding]) -> nn.Module:
    """A copy of ``module`` as ``netshrink.load(..., runtime="packed")`` runs it: each of its
    tensors whose encoding is packable (``encodings``, by name relative to ``module``) goes
    through :func:`netshrink.runtime.pack_tensor` from its manifest record, as the loader
    does (an int8 / int4 / CSR kernel module, or decoding on the fly); the rest stay dense."""
    holder = _Holder(copy.deepcopy(module))
    for name, enc in encodings.items():
        if is_packable(enc):
            record, read = _as_record(enc)
            pack_tensor(holder, f"layer.{name}", record, read, Encoding.from_record(record, read))
    return holder.layer


def _latency_example(inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """The first validation input repeated to ``batch`` rows (what latency is timed on)."""
    return inputs[:1].expand(batch, *inputs.shape[1:]).contiguous()


@torch.no_grad()
def _layer_inputs(
    model: nn.Module, layers: Sequence[str], example: torch.Tensor
) -> dict[str, tuple[Any, ...]]:
    """The positional inputs each of ``layers`` receives (its first call) when ``model`` runs
    ``example``: the real input shapes each layer is timed on."""
    found: dict[str, tuple[Any, ...]] = {}

    def grab(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in found:
                found[name] = tuple(
                    a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args
                )

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(grab(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in found]
    if missing:
        raise NetshrinkError(
            f"search: layers {missing[:4]} did not run in a forward pass of the model, so their "
            "latency cannot be timed; leave them out of 'select'"
        )
    return found


def _packed_latency(artifact: bytes, example: torch.Tensor) -> float:
    """Seconds per call of the artifact loaded with ``runtime="packed"`` on ``example``."""
    with tempfile.TemporaryDirectory(prefix="netshrink-search-") as folder:
        path = Path(folder) / "model.nsk"
        path.write_bytes(artifact)
        model = load(path, runtime="packed")
    return _time_module(model, (example,))


def parse_latency(max_latency: float | str, dense_latency: float) -> float:
    """The latency budget in seconds per batch: a number of seconds (``0.002``), a string with
    a unit (``"0.002"``, ``"2ms"``, ``"150us"``, ``"0.5s"``), or a percentage of the dense
    model's measured latency ``dense_latency`` (``"80%"``; above 100% allows a slower model)."""
    bad = (
        f"search field 'max_latency': {max_latency!r} is not a latency; give seconds per batch "
        "(0.002), a time with a unit ('2ms', '150us') or a share of the dense model's measured "
        "latency ('80%')"
    )
    if isinstance(max_latency, bool) or not isinstance(max_latency, (int, float, str)):
        raise ConfigError(bad)
    if isinstance(max_latency, str):
        match = _LATENCY.match(max_latency)
        if not match:
            raise ConfigError(bad)
        value, unit = float(match.group(1)), (match.group(2) or "s").lower()
    else:
        value, unit = float(max_latency), "s"
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"search field 'max_latency': must be positive, got {max_latency!r}")
    if unit == "%":
        return value / 100 * dense_latency
    return value * _SECONDS[unit]


# -- the sensitivity scan ------------------------------------------------------------------------


@dataclass
class _ScanInputs:
    """What every scan task needs (pickled once per worker chunk by a process pool)."""

    model: nn.Module
    data: DataSplits | None
    info: ModelInfo | None
    inputs: torch.Tensor
    targets: torch.Tensor
    seed: int
    latency: bool = False
    """Also hand back the candidate's layer and encodings (timed in the calling process)."""


@torch.no_grad()
def _loss_accuracy(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(targets), 256):
        out = model(inputs[start : start + 256])
        y = targets[start : start + 256]
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss / len(targets), correct / len(targets)


def _scan_one(shared: _ScanInputs, candidate: Candidate) -> dict[str, Any]:
    """Apply ``candidate`` alone to a copy of the reference model; measure it."""
    model = copy.deepcopy(shared.model)
    table = EncodingTable()
    torch.manual_seed(shared.seed)
    model = apply_candidate(
        model, candidate, table, data=shared.data, info=shared.info, seed=shared.seed
    )
    loss, acc = _loss_accuracy(model, shared.inputs, shared.targets)
    macs = count_macs(model, shared.inputs[:1])
    row: dict[str, Any] = {
        "bytes": layer_bytes(model, table, candidate.layer),
        "macs": layer_macs(macs, candidate.layer),
        "loss": round(loss, 6),
        "accuracy": acc,
    }
    if shared.latency:
        layer = candidate.layer
        row[_TIMING] = (model.get_submodule(layer), _layer_encodings(model, table, layer))
    return row


# The key of a scan row that carries the candidate's layer and its encodings back to the calling
# process, which times the layer (one machine and thread count for every figure) and drops it.
_TIMING = "_timing"


@dataclass
class Sensitivity:
    """The scan's result: per layer, its candidates and what each measured alone."""

    candidates: dict[str, list[Candidate]]
    measured: dict[str, dict[str, Any]]
    """Candidate key -> ``bytes``, ``macs``, ``loss``, ``accuracy`` (dense included), and
    ``latency`` (seconds per batch of ``latency_batch``, the layer alone as the packed runtime
    runs it) when the scan timed latency."""
    base_loss: float
    base_accuracy: float
    n_val: int
    model_latency: float | None = None
    """Seconds per batch of ``latency_batch`` inputs of the whole dense reference model (when
    the scan timed latency)."""
    latency_batch: int | None = None
    """The batch size latency was timed at (None: latency not timed)."""

    def row(self, candidate: Candidate) -> dict[str, Any]:
        """What ``candidate`` measured."""
        return self.measured[candidate.key]

    @property
    def has_latency(self) -> bool:
        """Whether the scan timed latency (every candidate and the whole dense model)."""
        return self.model_latency is not None and all(
            "latency" in self.row(c) for cands in self.candidates.values() for c in cands
        )

    def rows(self) -> list[dict[str, Any]]:
        """A flat table: layer, candidate, bytes, MACs, loss change, accuracy change (pp), and
        ``latency`` (seconds per batch) when the scan timed it."""
        timed = self.has_latency
        out = []
        for cands in self.candidates.values():
            for c in cands:
                row = {
                    "layer": c.layer,
                    "candidate": c.label,
                    "bytes": self.row(c)["bytes"],
                    "macs": self.row(c)["macs"],
                    "delta_loss": round(self.row(c)["loss"] - self.base_loss, 6),
                    "delta_acc_pp": round(
                        100 * (self.row(c)["accuracy"] - self.base_accuracy), 3
                    ),
                }
                if timed:
                    row["latency"] = self.row(c)["latency"]
                out.append(row)
        return out


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _checkpoint_key(
    model: nn.Module, data: DataSplits, val_limit: int, seed: int, keys: list[str],
    latency: str | None = None,
) -> str:
    """The scan's identity; ``latency`` (how latency is timed) is part of it only when the scan
    times latency, so a timed scan never reuses an untimed one's checkpoint and an untimed
    scan keeps the key it always had."""
    body: list[Any] = [
        _CHECKPOINT_VERSION, _state_digest(model), data.name, len(data.val), val_limit, seed, keys
    ]
    if latency is not None:
        body.append(latency)
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _entries_digest(entries: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def read_checkpoint(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """The entries of a scan checkpoint if it is intact and for this scan, else ``{}`` (a
    damaged or foreign file is reported in the log and ignored: the scan starts over)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        entries = raw["entries"]
        ok = (
            raw.get("version") == _CHECKPOINT_VERSION
            and raw.get("key") == key
            and isinstance(entries, dict)
            and raw.get("sha256") == _entries_digest(entries)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("search: ignoring unreadable scan checkpoint %s (%s)", path, exc)
        return {}
    if not ok:
        log.warning("search: ignoring scan checkpoint %s (another scan's, or damaged)", path)
        return {}
    return entries


def write_checkpoint(path: Path, key: str, entries: dict[str, dict[str, Any]]) -> None:
    """Write the scan's entries atomically, with a checksum :func:`read_checkpoint` verifies."""
    body = {
        "version": _CHECKPOINT_VERSION,
        "key": key,
        "sha256": _entries_digest(entries),
        "entries": entries,
    }
    atomic_write(path, json.dumps(body, sort_keys=True))


def scan(
    model: nn.Module | str,
    data: DataSplits | str,
    *,
    methods: Sequence[str] | None = None,
    select: LayerSelector | dict[str, Any] | None = None,
    val_limit: int = 512,
    seed: int = 0,
    executor: Executor | str | None = None,
    workers: int | None = None,
    checkpoint: bool | str | Path = True,
    chunk: int = 16,
    latency: bool = False,
    latency_batch: int = 1,
) -> Sensitivity:
    """Measure every layer × candidate alone on the first ``val_limit`` validation samples.

    Work goes through ``executor`` (``local``, ``process`` or an :class:`Executor`) in chunks
    of ``chunk`` candidates; after each, a progress line is logged and (``checkpoint`` True: in
    the cache; a path: there) the results so far are written, so a rerun after an interruption
    measures only what is missing.

    ``latency`` (off by default: it adds about :data:`LATENCY_MIN_RUN_S` seconds per
    candidate): also time each candidate's layer alone as the packed runtime runs it
    (:func:`packed_layer`) on the input it receives in the reference model for a batch of
    ``latency_batch`` copies of the first validation sample, and the whole dense model on that
    batch (``torch.utils.benchmark``, in this process, whatever the executor)."""
    splits = load_data(data) if isinstance(data, str) else data
    if val_limit < 1:
        raise ConfigError(f"search field 'val_limit': must be at least 1, got {val_limit}")
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
        raise ConfigError(
            f"search field 'latency_batch': must be an integer of at least 1, got "
            f"{latency_batch!r}"
        )
    reference = _reference(model, splits, seed)
    info = _info_for(reference, splits)
    chosen = _selector(select).resolve(
        reference, head=info.head, default_types=["Linear", "Conv2d"]
    )
    candidates = layer_candidates(reference, chosen, methods)
    run = get_executor(executor, workers)
    inputs, targets = splits.batch("val", min(val_limit, len(splits.val)))
    shared = _ScanInputs(reference, splits, info, inputs, targets, seed, latency)
    base_loss, base_acc = _loss_accuracy(copy.deepcopy(reference), inputs, targets)
    timing = None
    if latency:
        example = _latency_example(inputs, latency_batch)
        layer_inputs = _layer_inputs(reference, list(candidates), example)
        timing = f"latency batch={latency_batch} threads={torch.get_num_threads()}"

    todo = [c for cands in candidates.values() for c in cands]
    key = _checkpoint_key(reference, splits, len(targets), seed, [c.key for c in todo], timing)
    path = _checkpoint_path(checkpoint, key)
    measured = read_checkpoint(path, key) if path else {}
    # A row without a latency (a file written by hand or by an older scan) is measured again.
    missing = [
        c for c in todo if c.key not in measured or (latency and "latency" not in measured[c.key])
    ]
    if path and measured:
        log.info(
            "search: resuming the scan from %s (%d of %d done)", path, len(measured), len(todo)
        )
    started = time.perf_counter()
    task = functools.partial(_scan_one, shared)
    for first in range(0, len(missing), max(1, chunk)):
        part = missing[first : first + max(1, chunk)]
        for cand, result in zip(part, run.map(task, part), strict=True):
            if latency:
                module, encodings = result.pop(_TIMING)
                result["latency"] = _time_module(
                    packed_layer(module, encodings), layer_inputs[cand.layer]
                )
            measured[cand.key] = result
        if path:
            write_checkpoint(path, key, measured)
        _progress_line(
            f"search: scanned {len(todo) - len(missing) + first + len(part)}/{len(todo)} "
            f"candidates ({run.name} executor, {time.perf_counter() - started:.1f}s)"
        )
    model_latency = _time_module(reference, (example,)) if latency else None
    return Sensitivity(
        candidates, measured, round(base_loss, 6), base_acc, len(targets), model_latency,
        latency_batch if latency else None,
    )


def _reference(model: nn.Module | str, data: DataSplits, seed: int) -> nn.Module:
    """The reference model as a run starts from it (a module given is copied, not touched)."""
    source = copy.deepcopy(model) if isinstance(model, nn.Module) else model
    return _settled(_resolve_model(source, data, seed))


def _progress_line(line: str) -> None:
    """Log ``line``; also print it to stderr unless progress output is off
    (``NETSHRINK_PROGRESS=0``), so a long scan on the command line shows where it is."""
    log.info("%s", line)
    if progress_enabled() is not False:
        print(line, file=sys.stderr, flush=True)


def _selector(select: LayerSelector | dict[str, Any] | None) -> LayerSelector:
    if select is None or isinstance(select, LayerSelector):
        return select or LayerSelector()
    return LayerSelector.model_validate(select)


def _checkpoint_path(checkpoint: bool | str | Path, key: str) -> Path | None:
    if checkpoint is False:
        return None
    if checkpoint is True:
        return cache_dir() / "search" / f"scan-{key[:24]}.json"
    return Path(checkpoint)


# -- the solver ----------------------------------------------------------------------------------


def solve(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[int]],
    budget: int,
    *,
    macs: Sequence[Sequence[int]] | None = None,
    max_macs: int | None = None,
    latency: Sequence[Sequence[float]] | None = None,
    max_latency: float | None = None,
    resolution: int = 4096,
) -> list[int] | None:
    """One choice per group minimising the summed cost with summed size ≤ ``budget`` (and
    summed ``macs`` ≤ ``max_macs``, summed ``latency`` ≤ ``max_latency`` if given); the chosen
    index per group, or None when no choice fits.

    Without a MACs or latency budget: dynamic programming over sizes in ``budget /
    resolution`` buckets, each size rounded *up* (a choice found always fits exactly; ties go
    to the earlier option). With one: a MILP through ``scipy.optimize.milp``, one row per
    budget."""
    if budget < 0 or (max_latency is not None and max_latency < 0):
        return None
    if max_macs is not None or max_latency is not None:
        rows: list[tuple[Sequence[Sequence[float]], float]] = []
        if max_macs is not None:
            rows.append((macs or [], max_macs))
        if max_latency is not None:
            rows.append((latency or [], max_latency))
        return _solve_milp(costs, sizes, budget, rows)
    unit = max(1, math.ceil(budget / resolution))
    capacity = budget // unit
    best = np.zeros(capacity + 1)  # best[c]: least cost of the groups so far within c units
    picks: list[np.ndarray] = []
    for group_costs, group_sizes in zip(costs, sizes, strict=True):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1)
        for index, (cost, size) in enumerate(zip(group_costs, group_sizes, strict=True)):
            w = math.ceil(size / unit)
            if w > capacity:
                continue
            shifted = np.full(capacity + 1, np.inf)
            shifted[w:] = best[: capacity + 1 - w] + cost
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = index
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):
        return None
    chosen: list[int] = []
    c = capacity
    for group_sizes, pick in zip(reversed(list(sizes)), reversed(picks), strict=True):
        index = int(pick[c])
        chosen.append(index)
        c -= math.ceil(group_sizes[index] / unit)
    return chosen[::-1]


def _solve_milp(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[int]],
    budget: int,
    extra: Sequence[tuple[Sequence[Sequence[float]], float]],
) -> list[int] | None:
    """The MILP: one choice per group, bytes ≤ ``budget`` and, per ``(values, limit)`` of
    ``extra`` (MACs, latency), the summed values ≤ ``limit``."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise ConfigError("a MACs or latency budget needs scipy (pip install scipy)") from None
    flat = [(g, i) for g, group in enumerate(costs) for i in range(len(group))]
    n = len(flat)
    one = np.zeros((len(costs), n))
    for j, (g, _) in enumerate(flat):
        one[g, j] = 1
    rows = [[float(sizes[g][i]) for g, i in flat]]
    limits = [float(budget)]
    for values, limit in extra:
        # Each row scaled by its limit: latencies are microseconds, and the solver's absolute
        # feasibility tolerance (1e-7) must stay far below a row's resolution.
        scale = float(limit) if limit > 0 else 1.0
        rows.append([values[g][i] / scale for g, i in flat])
        limits.append(limit / scale)
    res = milp(
        c=np.array([costs[g][i] for g, i in flat]),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one, 1, 1),
            LinearConstraint(np.array(rows), -np.inf, np.array(limits)),
        ],
    )
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    chosen = [0] * len(costs)
    for (g, i), v in zip(flat, x, strict=True):
        if v:
            chosen[g] = i
    return chosen


# -- budgets and recipes ------------------------------------------------------------------------


def parse_budget(budget: int | str, reference_bytes: int) -> int:
    """The byte budget: an int or ``"123456"`` (bytes), ``"40x"`` (the dense artifact's size
    divided by 40), or a size with a unit (``"120kB"``, ``"1.5MiB"``)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ConfigError(
            f"search field 'budget': give bytes or a ratio like '40x', got {budget!r}"
        )
    if isinstance(budget, int):
        value, unit = float(budget), "b"
    else:
        match = _BUDGET.match(budget)
        if not match:
            raise ConfigError(
                f"search field 'budget': {budget!r} is not a size; give a ratio like '40x', "
                "bytes like '120000', or a size like '120kB' / '1.5MiB'"
            )
        value, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "x":
        if value <= 1:
            raise ConfigError(f"search field 'budget': a ratio must be above 1x, got {budget!r}")
        return int(reference_bytes / value)
    if value <= 0:
        raise ConfigError(f"search field 'budget': must be positive, got {budget!r}")
    return int(value * _UNITS[unit])


def plan_recipe(
    plan: dict[str, Candidate],
    *,
    model: str | None = None,
    data: str | None = None,
    seed: int = 0,
    finetune: FinetuneConfig | dict[str, Any] | None = None,
    latency: bool = False,
    head: str | None = None,
) -> Recipe:
    """The recipe that applies ``plan`` (layer -> candidate): one step per compressor in
    chain order (structural, pruning, value-encoding), selecting exactly its layers, with the
    most common setting as the step's config and per-layer ``overrides`` for the rest; a
    compressor without per-layer fields gets one step per distinct setting instead."""
    by_method: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for layer, cand in plan.items():
        for option in cand.options:
            by_method.setdefault(option.compressor, []).append((layer, option.config))
    classes = {name: get_compressor(name) for name in by_method}
    steps: list[dict[str, Any]] = []
    for name in sorted(by_method, key=lambda n: (_order(classes[n]), n)):
        cls, entries = classes[name], by_method[name]
        if all(_per_layer(cls, cfg) for _, cfg in entries):
            steps.append(_overrides_step(cls, entries, head))
        else:
            groups: dict[str, list[str]] = {}
            configs: dict[str, dict[str, Any]] = {}
            for layer, cfg in entries:
                text = json.dumps(cfg, sort_keys=True)
                groups.setdefault(text, []).append(layer)
                configs[text] = cfg
            for text, layers in groups.items():
                steps.append(
                    {"compressor": name, "config": configs[text], "select": _select(layers, head),
                     "label": f"search: {name}"}
                )
    if not steps:
        raise ConfigError(
            "search field 'budget': the uncompressed model already fits it and no option "
            "lowers the validation loss, so there is nothing to compress; give a smaller budget"
        )
    body: dict[str, Any] = {"seed": seed, "steps": steps, "latency": latency}
    if model:
        body["model"] = model
    if data:
        body["data"] = data
    if finetune is not None:
        body["finetune"] = finetune if isinstance(finetune, dict) else finetune.model_dump()
    return Recipe.model_validate(body)


def _overrides_step(
    cls: type[Compressor], entries: list[tuple[str, dict[str, Any]]], head: str | None
) -> dict[str, Any]:
    texts = [json.dumps(cfg, sort_keys=True) for _, cfg in entries]
    common = max(dict.fromkeys(texts), key=texts.count)
    overrides = {
        _pattern(layer): cfg
        for (layer, cfg), text in zip(entries, texts, strict=True)
        if text != common
    }
    step: dict[str, Any] = {
        "compressor": cls.name,
        "config": json.loads(common),
        "select": _select([layer for layer, _ in entries], head),
        "label": f"search: {cls.name}",
    }
    if overrides:
        step["overrides"] = overrides
    return step


def _select(layers: list[str], head: str | None) -> dict[str, Any]:
    select: dict[str, Any] = {"names": [_pattern(n) for n in layers]}
    if head and head in layers:
        select["protect_head"] = False
    return select


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as YAML (what ``netshrink compress --recipe`` reads back to the same run)."""
    return yaml.safe_dump(recipe.model_dump(exclude_defaults=True), sort_keys=False)


# -- the search ----------------------------------------------------------------------------------


@dataclass
class MeasuredPlan:
    """One whole plan (a candidate per layer) applied together to the reference model, no
    fine-tune, and measured on the scan's validation subset, next to what the scan predicted."""

    label: str
    """``solver``, ``re-solve N`` (interaction penalised) or ``uniform <option>``."""
    plan: dict[str, Candidate]
    layer_bytes: int
    """Stored bytes of the searched layers, from the scan (what the layer budget bounds)."""
    predicted_delta_loss: float
    """The sum of the candidates' loss increases measured alone (what the solver minimises)."""
    delta_loss: float
    """The loss increase measured with every candidate applied together."""
    accuracy: float
    """Accuracy measured with every candidate applied together."""
    chosen: bool = False

    def row(self) -> dict[str, Any]:
        """The plan as a JSON-able row (``SearchResult.save``'s ``measured_plans``)."""
        return {
            "label": self.label,
            "plan": {layer: c.label for layer, c in self.plan.items()},
            "layer_bytes": self.layer_bytes,
            "predicted_delta_loss": self.predicted_delta_loss,
            "measured_delta_loss": self.delta_loss,
            "measured_accuracy": self.accuracy,
            "chosen": self.chosen,
        }


_RESOLVE_ROUNDS = 3  # re-solves with an interaction penalty, at most, per budget try


class _PlanMeter:
    """Measures whole plans on the scan's validation subset, each plan once per search."""

    def __init__(
        self, reference: nn.Module, data: DataSplits, info: ModelInfo, table: Sensitivity,
        seed: int,
    ) -> None:
        self.reference, self.data, self.info, self.table, self.seed = (
            reference, data, info, table, seed,
        )
        self.inputs, self.targets = data.batch("val", table.n_val)
        self.done: dict[tuple[str, ...], tuple[float, float]] = {}
        self.extra = 0  # fresh measurements of plans other than the solver's

    def measure(self, label: str, plan: dict[str, Candidate]) -> MeasuredPlan:
        """Apply every candidate of ``plan`` to a copy of the reference, layer after layer,
        each as the scan applied it alone, and measure the loss and accuracy."""
        key = tuple(c.key for c in plan.values())
        if key not in self.done:
            model = copy.deepcopy(self.reference)
            encodings = EncodingTable()
            torch.manual_seed(self.seed)
            for cand in plan.values():
                model = apply_candidate(
                    model, cand, encodings, data=self.data, info=self.info, seed=self.seed
                )
            loss, acc = _loss_accuracy(model, self.inputs, self.targets)
            self.done[key] = (round(loss - self.table.base_loss, 6), acc)
            fresh = True
        else:
            fresh = False
        delta, acc = self.done[key]
        predicted = round(sum(self.table.row(c)["loss"] - self.table.base_loss
                              for c in plan.values()), 6)
        found = MeasuredPlan(
            label, dict(plan), sum(self.table.row(c)["bytes"] for c in plan.values()),
            predicted, delta, acc,
        )
        if fresh:
            _progress_line(
                f"search: measured plan {label}: loss {delta:+.4f} (predicted {predicted:+.4f}),"
                f" accuracy {100 * acc:.2f}% on {len(self.targets)} validation samples"
            )
        return found


def _same(a: dict[str, Candidate], b: dict[str, Candidate]) -> bool:
    return [c.key for c in a.values()] == [c.key for c in b.values()]


def _uniform_plans(
    table: Sensitivity, allowed: dict[str, list[Candidate]], layer_budget: int,
    max_macs: int | None, max_latency: float | None = None,
) -> list[tuple[str, dict[str, Candidate]]]:
    """Per candidate label offered anywhere: that candidate on every layer that offers it, the
    others dense; those within the layer budget (and ``max_macs``, and the layers' latency
    budget ``max_latency``), by predicted loss."""
    labels = dict.fromkeys(c.label for cands in allowed.values() for c in cands if c.options)
    plans = []
    for label in labels:
        plan = {
            layer: next((c for c in cands if c.label == label), cands[0])
            for layer, cands in allowed.items()
        }
        if sum(table.row(c)["bytes"] for c in plan.values()) > layer_budget:
            continue
        if max_macs is not None and sum(table.row(c)["macs"] for c in plan.values()) > max_macs:
            continue
        if max_latency is not None and (
            sum(table.row(c)["latency"] for c in plan.values()) > max_latency
        ):
            continue
        plans.append((label, plan))
    return sorted(
        plans, key=lambda lp: sum(table.row(c)["loss"] for c in lp[1].values())
    )


def _verify_plan(
    meter: _PlanMeter,
    allowed: dict[str, list[Candidate]],
    plan: dict[str, Candidate],
    solve_again: Callable[[dict[str, float]], dict[str, Candidate] | None],
    *,
    layer_budget: int,
    max_macs: int | None,
    max_drop: float | None,
    max_alternatives: int,
    max_latency: float | None = None,
) -> tuple[dict[str, Candidate], list[MeasuredPlan], list[str]]:
    """Measure the solver's ``plan`` whole and its alternatives (as :func:`search`'s
    ``verify`` describes); return the plan to keep, every plan measured and the notes.
    ``solve_again(penalty)`` solves with ``penalty`` (candidate key -> cost) added;
    ``max_latency`` is the searched layers' latency budget (uniform plans over it are
    skipped)."""
    table = meter.table
    measured = [meter.measure("solver", plan)]

    def room() -> bool:
        return meter.extra < max_alternatives

    def add(label: str, candidate: dict[str, Candidate]) -> MeasuredPlan | None:
        """Measure ``candidate`` unless it is all dense or measured already this try."""
        seen = next((m for m in measured if _same(m.plan, candidate)), None)
        if seen is not None or not any(c.options for c in candidate.values()):
            return seen
        before = len(meter.done)
        found = meter.measure(label, candidate)
        meter.extra += len(meter.done) - before
        measured.append(found)
        return found

    # The solver trusts the sum of losses measured alone; when the plan loses more, spread
    # the unexplained loss over its compressed layers' candidates as a cost and solve again.
    penalty: dict[str, float] = {}
    current: MeasuredPlan | None = measured[0]
    for round_ in range(1, _RESOLVE_ROUNDS + 1):
        if current is None or not room() or current.delta_loss <= current.predicted_delta_loss:
            break
        compressed = [c for c in current.plan.values() if c.options]
        share = (current.delta_loss - current.predicted_delta_loss) / max(1, len(compressed))
        for cand in compressed:
            penalty[cand.key] = penalty.get(cand.key, 0.0) + share
        again = solve_again(penalty)
        current = None if again is None else add(f"re-solve {round_}", again)
    for label, uniform in _uniform_plans(table, allowed, layer_budget, max_macs, max_latency):
        if not room():
            break
        add(f"uniform {label}", uniform)

    def drop(m: MeasuredPlan) -> float:
        return 100 * (table.base_accuracy - m.accuracy)

    within = [m for m in measured if max_drop is None or drop(m) <= max_drop]
    best = min(within or measured, key=lambda m: m.delta_loss)  # ties: the earlier measured
    best.chosen = True
    notes = []
    solver = measured[0]
    if best is not solver:
        how = ("more than" if solver.delta_loss > solver.predicted_delta_loss
               else "against")
        notes.append(
            f"the solver's plan lost {solver.delta_loss:.4f} (validation loss, first "
            f"{table.n_val} samples), {how} the predicted {solver.predicted_delta_loss:.4f}; "
            f"kept {best.label}, which lost {best.delta_loss:.4f}"
        )
    if not within:
        notes.append(
            f"no measured plan stays within max_drop {max_drop} pp on the first {table.n_val} "
            f"validation samples (the kept plan drops {drop(best):.2f} pp)"
        )
    for note in notes:
        log.warning("search: %s", note)
    return best.plan, measured, notes


@dataclass
class SearchLatency:
    """The latency side of a search with ``max_latency``: seconds per batch of ``batch``
    copies of the first validation sample, for the whole model."""

    batch: int
    budget: float
    """``max_latency`` in seconds (a percentage resolved against ``dense``)."""
    dense: float
    """The dense reference model, timed whole by the scan."""
    fixed: float
    """The part of ``dense`` outside the searched layers: ``dense`` less the searched layers'
    dense latencies timed alone (at least 0); added to every plan's prediction."""
    predicted: float
    """``fixed`` plus the chosen candidates' latencies timed alone (what the solver bounds)."""
    measured: float | None = None
    """The artifact loaded with ``runtime="packed"``, timed whole."""
    tries: int = 0
    """Compressions whose packed model was timed (a retry shrinks the layers' budget)."""

    def row(self) -> dict[str, Any]:
        """The figures as a JSON-able row (``SearchResult.save``'s ``latency``)."""
        return {
            "batch": self.batch, "budget_s": self.budget, "dense_s": self.dense,
            "fixed_s": self.fixed, "predicted_s": self.predicted, "measured_s": self.measured,
            "tries": self.tries,
        }


@dataclass
class SearchResult:
    """What :func:`search` returns: the chosen candidate per layer, the recipe that reproduces
    it, the compressed result, and the honest figures."""

    plan: dict[str, Candidate]
    recipe: Recipe
    result: CompressionResult
    budget_bytes: int
    val_accuracy: float
    reference_val_accuracy: float
    predicted_delta_loss: float
    sensitivity: Sensitivity
    notes: list[str] = field(default_factory=list)
    measured_plans: list[MeasuredPlan] = field(default_factory=list)
    """The plans measured whole before compressing (``verify``): the solver's first, one of
    them ``chosen``; empty with ``verify=False``."""
    latency: SearchLatency | None = None
    """With ``max_latency``: the budget, the predicted and the measured packed latency."""

    @property
    def artifact_bytes(self) -> int:
        """Bytes of the artifact (what the budget bounds)."""
        return len(self.result.artifact)

    def plan_rows(self) -> list[dict[str, Any]]:
        """Per layer: the chosen candidate, its bytes and measured-alone loss change (and its
        latency alone, seconds per batch, when the search had a latency budget)."""
        table = self.sensitivity
        rows = []
        for layer, c in self.plan.items():
            row = {"layer": layer, "choice": c.label, "bytes": table.row(c)["bytes"],
                   "delta_loss": round(table.row(c)["loss"] - table.base_loss, 6)}
            if self.latency is not None:
                row["latency"] = table.row(c)["latency"]
            rows.append(row)
        return rows

    def save(self, out_dir: str | Path, stem: str = "model") -> dict[str, Path]:
        """Write ``<stem>.nsk`` (+ its report files), ``<stem>.search.yaml`` (the recipe) and
        ``<stem>.search.json`` (plan, sensitivity table, the plans measured whole, the
        latency figures and the notes), each atomically."""
        out = Path(out_dir)
        recipe_path = atomic_write(out / f"{stem}.search.yaml", recipe_yaml(self.recipe))
        summary = {
            "budget_bytes": self.budget_bytes,
            "artifact_bytes": self.artifact_bytes,
            "val_accuracy": self.val_accuracy,
            "reference_val_accuracy": self.reference_val_accuracy,
            "plan": self.plan_rows(),
            "sensitivity": self.sensitivity.rows(),
            "measured_plans": [m.row() for m in self.measured_plans],
            "latency": None if self.latency is None else self.latency.row(),
            "notes": self.notes,
        }
        table_path = atomic_write(out / f"{stem}.search.json", json.dumps(summary, indent=2))
        artifact = self.result.save(out / f"{stem}.nsk")
        return {"artifact": artifact, "recipe": recipe_path, "table": table_path}


def search(
    model: nn.Module | str,
    data: DataSplits | str,
    budget: int | str,
    *,
    max_drop: float | None = None,
    max_macs: int | None = None,
    max_latency: float | str | None = None,
    latency_batch: int = 1,
    methods: Sequence[str] | None = None,
    select: LayerSelector | dict[str, Any] | None = None,
    finetune: FinetuneConfig | dict[str, Any] | None = None,
    val_limit: int = 512,
    seed: int = 0,
    executor: Executor | str | None = None,
    workers: int | None = None,
    checkpoint: bool | str | Path = True,
    sensitivity: Sensitivity | None = None,
    tries: int = 4,
    verify: bool = True,
    max_alternatives: int = 16,
) -> SearchResult:
    """Search per-layer settings across every method under ``budget`` (bytes, ``"40x"``,
    ``"120kB"``) and return a :class:`SearchResult`; ``result.recipe`` run by
    :func:`netshrink.compress` reproduces ``result.result.artifact`` byte for byte.

    ``max_drop`` (percentage points of validation accuracy) drops any candidate that alone
    loses more, and notes when the final model does. The solver's budget for the layers is
    ``budget`` less the rest of the artifact (header, manifest, other tensors); if the real
    artifact still exceeds ``budget`` the layer budget shrinks by the excess and the solve
    runs again (up to ``tries`` times), so the returned artifact is never over ``budget``.

    ``max_latency`` (see :func:`parse_latency`: seconds per batch, ``"2ms"``, or ``"80%"`` of
    the dense model's measured latency) bounds the whole model's latency on a batch of
    ``latency_batch`` inputs in the packed runtime: the scan times each candidate's layer
    alone (``scan(latency=True)``; a ``sensitivity`` given must have been scanned so, at the
    same batch) and the solver bounds the sum over the searched layers plus the rest of the
    dense model (its whole latency less the searched layers' dense ones). The artifact is then
    loaded with ``runtime="packed"`` and timed whole (``result.latency``); if it is over the
    budget the layers' latency budget shrinks by the ratio and the search runs again, within
    the same ``tries``, after which a note says so (timings on a shared machine are noisy).

    ``verify`` (default on): the solver minimises the *sum* of the loss increases each
    candidate caused alone, and layers interact. So before compressing, the solver's plan is
    applied whole to the reference (every layer's candidate as the scan applied it, no
    fine-tune) and measured on the scan's validation subset (the first ``val_limit``
    samples), and so are alternatives within the same layer budget (and ``max_macs``,
    ``max_latency``):

    - if the plan lost more than predicted, up to 3 re-solves, each adding the unexplained
      loss (measured less predicted), shared equally, to the cost of the last plan's
      compressed candidates;
    - every *uniform* plan: one candidate (same compressor(s) and config) on every layer
      that offers it, the other layers dense, by predicted loss.

    At most ``max_alternatives`` plans besides the solver's are measured. The plan kept is the
    one with the lowest measured increase of the validation cross-entropy loss over the
    reference (ties: the solver's, then the first measured); with ``max_drop``, only plans
    whose measured accuracy drop is within ``max_drop`` compete, unless none is (a note says
    so). ``notes`` says when a plan other than the solver's was kept; every plan measured is
    in ``measured_plans``. ``verify=False`` compresses the solver's plan unmeasured."""
    if max_alternatives < 0:
        raise ConfigError(
            f"search field 'max_alternatives': must be at least 0, got {max_alternatives}"
        )
    splits = load_data(data) if isinstance(data, str) else data
    table = sensitivity or scan(
        model, splits, methods=methods, select=select, val_limit=val_limit, seed=seed,
        executor=executor, workers=workers, checkpoint=checkpoint,
        latency=max_latency is not None, latency_batch=latency_batch,
    )
    reference = _reference(model, splits, seed)
    info = _info_for(reference, splits)
    layers = list(table.candidates)
    allowed = {
        layer: [
            c for c in cands
            if not c.options or max_drop is None
            or 100 * (table.base_accuracy - table.row(c)["accuracy"]) <= max_drop
        ]
        for layer, cands in table.candidates.items()
    }
    dense_total = len(artifact_bytes(reference, EncodingTable(), info, None))
    limit = parse_budget(budget, dense_total)
    dense_layers = sum(table.row(allowed[layer][0])["bytes"] for layer in layers)
    layer_budget = limit - (dense_total - dense_layers)
    timing = None if max_latency is None else _latency_budget(table, layers, max_latency,
                                                               latency_batch)
    layer_latency = None if timing is None else timing.budget - timing.fixed
    spec = model if isinstance(model, str) else None
    data_name = data if isinstance(data, str) else None
    meter = _PlanMeter(reference, splits, info, table, seed) if verify else None

    def solve_for(
        budget_now: int, latency_now: float | None, penalty: dict[str, float]
    ) -> list[int] | None:
        return solve(
            [[_cost(table, c, dense_layers) + penalty.get(c.key, 0.0) for c in allowed[n]]
             for n in layers],
            [[table.row(c)["bytes"] for c in allowed[n]] for n in layers],
            budget_now,
            macs=[[table.row(c)["macs"] for c in allowed[n]] for n in layers],
            max_macs=max_macs,
            latency=None if latency_now is None else [
                [table.row(c)["latency"] for c in allowed[n]] for n in layers
            ],
            max_latency=latency_now,
        )

    def as_plan(choice: list[int] | None) -> dict[str, Candidate] | None:
        if choice is None:
            return None
        return {n: allowed[n][i] for n, i in zip(layers, choice, strict=True)}

    kept: _Try | None = None
    latency_notes: list[str] = []
    for attempt in range(max(1, tries)):
        choice = solve_for(layer_budget, layer_latency, {})
        if choice is None:
            if kept is not None:  # only a shrunk latency budget gets here: keep the last fit
                latency_notes.append(
                    f"no plan fits the searched layers' latency budget shrunk to "
                    f"{_ms(layer_latency)} after the packed model measured over max_latency; "
                    "kept the last plan that fit the byte budget"
                )
                break
            raise _nothing_fits(table, allowed, limit, layer_budget, dense_total - dense_layers,
                                max_drop, timing)
        plan = {n: allowed[n][i] for n, i in zip(layers, choice, strict=True)}
        measured: list[MeasuredPlan] = []
        verify_notes: list[str] = []
        if meter is not None:
            plan, measured, verify_notes = _verify_plan(
                meter, allowed, plan,
                lambda penalty, now=layer_budget, fast=layer_latency: as_plan(
                    solve_for(now, fast, penalty)
                ),
                layer_budget=layer_budget, max_macs=max_macs, max_drop=max_drop,
                max_alternatives=max_alternatives, max_latency=layer_latency,
            )
        recipe = plan_recipe(
            plan, model=spec, data=data_name, seed=seed, finetune=finetune, head=info.head
        )
        result = compress(reference if spec is None else spec, recipe, splits)
        excess = len(result.artifact) - limit
        log.info(
            "search: try %d: artifact %d bytes for a budget of %d (%+d)",
            attempt + 1, len(result.artifact), limit, excess,
        )
        if excess > 0:
            layer_budget -= excess
            continue
        kept = _Try(plan, recipe, result, measured, verify_notes)
        if timing is None or layer_latency is None:
            break
        timing.tries += 1
        timing.predicted = timing.fixed + sum(table.row(c)["latency"] for c in plan.values())
        timing.measured = _packed_latency(
            result.artifact, _latency_example(splits.batch("val", 1)[0], timing.batch)
        )
        _progress_line(
            f"search: try {attempt + 1}: packed model {_ms(timing.measured)} per batch of "
            f"{timing.batch} (predicted {_ms(timing.predicted)}, max_latency "
            f"{_ms(timing.budget)})"
        )
        if timing.measured <= timing.budget:
            break
        layer_latency *= timing.budget / timing.measured
    if kept is None:
        raise NetshrinkError(
            f"search: after {tries} tries the artifact is still {excess:,} bytes over the "
            f"budget of {limit:,} bytes; raise the budget or 'tries'"
        )
    plan, recipe, result = kept.plan, kept.recipe, kept.result
    if timing is not None and timing.measured is not None and timing.measured > timing.budget:
        latency_notes.append(
            f"the packed model measured {_ms(timing.measured)} per batch of {timing.batch}, "
            f"over max_latency {_ms(timing.budget)} (predicted {_ms(timing.predicted)} from "
            f"the layers timed alone) after {timing.tries} timed tries; timings on a shared "
            "machine are noisy, and layers timed alone do not add up exactly"
        )
    for note in latency_notes:
        log.warning("search: %s", note)
    val_acc = _loss_accuracy(result.model, *splits.batch("val", len(splits.val)))[1]
    ref_acc = _loss_accuracy(copy.deepcopy(reference), *splits.batch("val", len(splits.val)))[1]
    notes = [*kept.verify_notes, *latency_notes]
    if max_drop is not None and 100 * (ref_acc - val_acc) > max_drop:
        notes.append(
            f"validation accuracy dropped {100 * (ref_acc - val_acc):.2f} pp, more than "
            f"max_drop {max_drop} pp (options were filtered alone; together they lose more)"
        )
        log.warning("search: %s", notes[-1])
    predicted = sum(table.row(c)["loss"] - table.base_loss for c in plan.values())
    return SearchResult(
        plan, recipe, result, limit, val_acc, ref_acc, round(predicted, 6), table, notes,
        kept.measured, timing,
    )


@dataclass
class _Try:
    """One compression of a search that fit the byte budget."""

    plan: dict[str, Candidate]
    recipe: Recipe
    result: CompressionResult
    measured: list[MeasuredPlan]
    verify_notes: list[str]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.3f} ms"


def _latency_budget(
    table: Sensitivity, layers: list[str], max_latency: float | str, batch: int
) -> SearchLatency:
    """The whole-model latency budget and the part of the dense model no layer choice
    changes, from a scan that timed latency at ``batch``."""
    if not table.has_latency or table.model_latency is None:
        raise ConfigError(
            "search field 'max_latency': the sensitivity scan has no latency figures; scan with "
            "latency=True (search scans so itself when no sensitivity is given)"
        )
    if table.latency_batch != batch:
        raise ConfigError(
            f"search field 'latency_batch': {batch} differs from the batch the scan timed "
            f"({table.latency_batch}); scan again with latency_batch={batch}"
        )
    limit = parse_latency(max_latency, table.model_latency)
    dense_layers = sum(table.row(table.candidates[n][0])["latency"] for n in layers)
    fixed = max(0.0, table.model_latency - dense_layers)
    return SearchLatency(batch, limit, table.model_latency, fixed, table.model_latency)


def _nothing_fits(
    table: Sensitivity, allowed: dict[str, list[Candidate]], limit: int, layer_budget: int,
    rest: int, max_drop: float | None, timing: SearchLatency | None,
) -> ConfigError:
    """The error when no choice fits: the fastest latency reachable within the bytes when some
    choice fits them (the latency budget is what cannot be met), else the smallest size."""
    with_drop = f" with max_drop {max_drop}" if max_drop is not None else ""
    groups = list(allowed.values())
    if timing is not None:
        seconds = [[table.row(c)["latency"] for c in cands] for cands in groups]
        sizes = [[table.row(c)["bytes"] for c in cands] for cands in groups]
        fastest = solve(seconds, sizes, layer_budget)  # the least latency within the bytes
        if fastest is not None:
            reachable = timing.fixed + sum(seconds[g][i] for g, i in enumerate(fastest))
            return ConfigError(
                f"search field 'max_latency': no choice of the scanned options fits "
                f"{_ms(timing.budget)} per batch of {timing.batch} within {limit:,} bytes "
                f"(about {_ms(reachable)} is the fastest reachable there{with_drop}; dense "
                f"{_ms(timing.dense)}); raise max_latency or the budget, or add methods"
            )
    smallest = rest + sum(min(table.row(c)["bytes"] for c in cands) for cands in groups)
    return ConfigError(
        f"search field 'budget': no choice of the scanned options fits {limit:,} bytes "
        f"(about {smallest:,} bytes is the smallest reachable{with_drop}); raise the budget, "
        "relax max_drop/max_macs/max_latency, or add methods"
    )


def _cost(table: Sensitivity, candidate: Candidate, dense_bytes: int) -> float:
    """The solver's cost: the loss increase measured alone, plus a tie-break far below the
    loss's 1e-6 resolution that prefers the smaller of equally good candidates."""
    size = table.row(candidate)["bytes"] / max(dense_bytes, 1)
    return table.row(candidate)["loss"] - table.base_loss + 1e-8 * size


# -- Pareto front --------------------------------------------------------------------------------


@dataclass
class ParetoPoint:
    """One budget's searched result."""

    budget: str
    budget_bytes: int
    artifact_bytes: int
    ratio: float
    val_accuracy: float
    test_accuracy: float | None


def pareto(
    model: nn.Module | str,
    data: DataSplits | str,
    budgets: Sequence[int | str],
    **kwargs: Any,
) -> list[ParetoPoint]:
    """Search at each of ``budgets`` with one shared scan (``kwargs`` as :func:`search`
    takes them, ``verify`` and ``max_latency`` included); the points sorted by size."""
    splits = load_data(data) if isinstance(data, str) else data
    scan_keys = ("methods", "select", "val_limit", "seed", "executor", "workers", "checkpoint",
                 "latency_batch")
    table = kwargs.pop("sensitivity", None) or scan(
        model, splits, latency=kwargs.get("max_latency") is not None,
        **{k: kwargs[k] for k in scan_keys if k in kwargs},
    )
    points = []
    for budget in budgets:
        found = search(model, data, budget, sensitivity=table, **kwargs)
        report = found.result.report
        points.append(
            ParetoPoint(
                str(budget), found.budget_bytes, found.artifact_bytes,
                round(report.compression_ratio, 3), found.val_accuracy, report.accuracy_after,
            )
        )
    return sorted(points, key=lambda p: p.artifact_bytes)


def pareto_table(points: Sequence[ParetoPoint]) -> str:
    """The points as a markdown table."""
    lines = [
        "| budget | budget bytes | artifact bytes | ratio | val accuracy | test accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        test = "-" if p.test_accuracy is None else f"{100 * p.test_accuracy:.2f}%"
        lines.append(
            f"| {p.budget} | {p.budget_bytes:,} | {p.artifact_bytes:,} | {p.ratio:.1f}x | "
            f"{100 * p.val_accuracy:.2f}% | {test} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """Draw validation accuracy against artifact bytes as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "drawing the Pareto front needs matplotlib (pip install matplotlib)"
        ) from None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p.artifact_bytes for p in points], [100 * p.val_accuracy for p in points], "o-")
    for p in points:
        ax.annotate(p.budget, (p.artifact_bytes, 100 * p.val_accuracy), fontsize=8)
    ax.set_xlabel("artifact bytes")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("netshrink search: Pareto front")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


# -- the command line (wired by netshrink.cli) --------------------------------------------------


def run_command(
    model: str,
    data: str,
    budget: str,
    *,
    out_dir: str | Path = "out",
    max_drop: float | None = None,
    max_macs: int | None = None,
    max_latency: float | str | None = None,
    methods: Sequence[str] | None = None,
    executor: str | None = None,
    workers: int | None = None,
    finetune_epochs: int = 0,
    val_limit: int = 512,
    seed: int = 0,
    pareto_budgets: Sequence[str] = (),
    verify: bool = True,
) -> list[str]:
    """What ``netshrink search MODEL --data D --budget B`` does: scan (checkpointed in the
    cache), search, write ``<stem>.nsk`` with its report, ``<stem>.search.yaml`` and
    ``<stem>.search.json`` under ``out_dir``, and with ``pareto_budgets`` also
    ``<stem>.pareto.md`` and ``<stem>.pareto.png`` (the PNG needs matplotlib); ``verify``
    and ``max_latency`` (batch 1) as in :func:`search`. Returns the lines to print."""
    finetune = {"epochs": finetune_epochs} if finetune_epochs > 0 else None
    if max_latency is not None:  # a bad value is refused before the scan, not after it
        parse_latency(max_latency, 1.0)
    table = scan(
        model, data, methods=methods, val_limit=val_limit, seed=seed, executor=executor,
        workers=workers, latency=max_latency is not None,
    )
    common: dict[str, Any] = {
        "max_drop": max_drop, "max_macs": max_macs, "max_latency": max_latency,
        "finetune": finetune, "seed": seed, "sensitivity": table, "verify": verify,
    }
    found = search(model, data, budget, **common)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.split(":", 1)[-1]) or "model"
    paths = found.save(out_dir, stem)
    lines = [f"{row['layer']}: {row['choice']} ({row['bytes']:,} bytes, loss {row['delta_loss']:+})"
             for row in found.plan_rows()]
    lines.append(
        f"artifact {found.artifact_bytes:,} bytes (budget {found.budget_bytes:,}); validation "
        f"accuracy {100 * found.val_accuracy:.2f}% (reference "
        f"{100 * found.reference_val_accuracy:.2f}%)"
    )
    if found.latency is not None:
        timed = found.latency
        lines.append(
            f"latency {_ms(timed.measured)} per batch of {timed.batch}, packed runtime "
            f"(max_latency {_ms(timed.budget)}; predicted {_ms(timed.predicted)}; dense "
            f"{_ms(timed.dense)})"
        )
    lines += [f"note: {note}" for note in found.notes]
    lines.append(f"wrote {paths['artifact']}, {paths['recipe']}, {paths['table']}")
    if pareto_budgets:
        points = pareto(model, data, list(pareto_budgets), **common)
        md = atomic_write(Path(out_dir) / f"{stem}.pareto.md", pareto_table(points))
        lines.append(f"wrote {md}")
        try:
            lines.append(f"wrote {plot_pareto(points, Path(out_dir) / f'{stem}.pareto.png')}")
        except ConfigError as exc:
            lines.append(f"no Pareto plot: {exc}")
    return lines


__all__ = [
    "LATENCY_MIN_RUN_S",
    "Candidate",
    "MeasuredPlan",
    "ParetoPoint",
    "SearchLatency",
    "SearchResult",
    "Sensitivity",
    "apply_candidate",
    "check_layer_options",
    "layer_candidates",
    "option_bytes",
    "packed_layer",
    "pareto",
    "pareto_table",
    "parse_budget",
    "parse_latency",
    "plan_recipe",
    "plot_pareto",
    "read_checkpoint",
    "recipe_yaml",
    "run_command",
    "scan",
    "search",
    "solve",
    "write_checkpoint",
]
