"""The sensitivity scan: every layer × candidate applied alone to the reference model and
measured (bytes, MACs, validation loss and accuracy, and latency when asked), through an
executor, checkpointed so an interrupted scan resumes.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink import search_latency
from netshrink.adapters import ModelInfo
from netshrink.data import DataSplits
from netshrink.datasets import load as load_data
from netshrink.encodings import EncodingTable
from netshrink.errors import ConfigError
from netshrink.executors import Executor, get_executor
from netshrink.metrics import count_macs
from netshrink.pipeline import _info_for, _resolve_model, _settled
from netshrink.progress import enabled as progress_enabled
from netshrink.search_candidates import (
    Candidate,
    _layer_encodings,
    apply_candidate,
    layer_bytes,
    layer_candidates,
    layer_macs,
)
from netshrink.search_checkpoint import (
    _checkpoint_key,
    _checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)
from netshrink.search_latency import _latency_example, _layer_inputs, packed_layer
from netshrink.search_prefix import PrefixCache, PrefixMismatch
from netshrink.selector import LayerSelector

log = logging.getLogger("netshrink")


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
    reference_logp: torch.Tensor | None = None
    """The reference model's log-probabilities on ``inputs`` (what ``kl`` is measured from)."""
    reuse_bytes: int = 0
    """Memory for the reference's recorded activations (:class:`PrefixCache`; 0: none)."""
    token: str = ""
    """Identifies this scan's reference and inputs: a worker keeps one :class:`PrefixCache`
    per token and builds it at its first task."""


#: What the solver can minimise: ``kl``, the KL divergence of the compressed model's
#: predictions from the reference's (never below 0: only the reference itself scores 0), or
#: ``loss``, the increase of the labels' cross-entropy (a less confident model can lower it
#: while getting fewer samples right).
OBJECTIVES = ("kl", "loss")

_BATCH = 256


def _batches(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor`` in the batches every forward pass of the scan runs (the batches a
    :class:`PrefixCache` records and replays)."""
    return [tensor[start : start + _BATCH] for start in range(0, len(tensor), _BATCH)]


@torch.no_grad()
def _log_probs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model``'s log-probabilities on ``inputs`` (eval mode, in batches)."""
    model.eval()
    return torch.cat([
        nn.functional.log_softmax(model(batch).float(), dim=1) for batch in _batches(inputs)
    ])


@torch.no_grad()
def _measure(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
    reference_logp: torch.Tensor | None,
) -> tuple[float, float, float]:
    """Mean cross-entropy, accuracy and mean KL(reference || model) per sample (0 without
    ``reference_logp``), in one pass."""
    model.eval()
    loss, correct, kl = 0.0, 0, 0.0
    refs = _batches(reference_logp) if reference_logp is not None else None
    for index, (batch, y) in enumerate(zip(_batches(inputs), _batches(targets), strict=True)):
        out = model(batch)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        if refs is not None:
            ref = refs[index]
            logp = nn.functional.log_softmax(out.float(), dim=1)
            kl += float((ref.exp() * (ref - logp)).sum())
    n = len(targets)
    return loss / n, correct / n, max(0.0, kl / n)  # float error can go a hair below 0


# One recorded reference per process (a scan's workers each build their own at their first
# task; a new scan replaces it).
_PREFIX: dict[str, PrefixCache] = {}


def _prefix_cache(shared: _ScanInputs) -> PrefixCache | None:
    if shared.reuse_bytes <= 0:
        return None
    cache = _PREFIX.get(shared.token)
    if cache is None or cache.broken:
        _PREFIX.clear()
        _PREFIX[shared.token] = cache = PrefixCache(
            shared.model, _batches(shared.inputs), shared.reuse_bytes,
            every_name_copied=cache is not None,
        )
    return cache


def _measure_candidate(
    shared: _ScanInputs, model: nn.Module
) -> tuple[float, float, float]:
    """:func:`_measure` on ``model``, starting where it differs from the reference when a
    :class:`PrefixCache` is on (the same figures; a forward pass that does not replay as
    recorded is measured again whole)."""
    cache = _prefix_cache(shared)
    if cache is not None:
        try:
            with cache.patch(model):
                return _measure(model, shared.inputs, shared.targets, shared.reference_logp)
        except PrefixMismatch as exc:
            log.debug("search: measuring the whole model again: %s", exc)
    return _measure(model, shared.inputs, shared.targets, shared.reference_logp)


def _loss_accuracy(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    loss, acc, _ = _measure(model, inputs, targets, None)
    return loss, acc


def _scan_one(shared: _ScanInputs, candidate: Candidate) -> dict[str, Any]:
    """Apply ``candidate`` alone to a copy of the reference model; measure it."""
    model = copy.deepcopy(shared.model)
    table = EncodingTable()
    torch.manual_seed(shared.seed)
    model = apply_candidate(
        model, candidate, table, data=shared.data, info=shared.info, seed=shared.seed
    )
    loss, acc, kl = _measure_candidate(shared, model)
    macs = count_macs(model, shared.inputs[:1])
    row: dict[str, Any] = {
        "bytes": layer_bytes(model, table, candidate.layer),
        "macs": layer_macs(macs, candidate.layer),
        "loss": round(loss, 6),
        "kl": round(kl, 9),
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
    """Candidate key -> ``bytes``, ``macs``, ``loss``, ``kl``, ``accuracy`` (dense included), and
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

    def cost(self, candidate: Candidate, objective: str = "kl") -> float:
        """What ``candidate`` alone costs under ``objective`` (see :data:`OBJECTIVES`): its
        KL divergence from the reference's predictions, or its cross-entropy increase."""
        row = self.row(candidate)
        return row["kl"] if objective == "kl" else row["loss"] - self.base_loss

    @property
    def has_latency(self) -> bool:
        """Whether the scan timed latency (every candidate and the whole dense model)."""
        return self.model_latency is not None and all(
            "latency" in self.row(c) for cands in self.candidates.values() for c in cands
        )

    def rows(self) -> list[dict[str, Any]]:
        """A flat table: layer, candidate, bytes, MACs, loss change, KL divergence, accuracy
        change (pp), and ``latency`` (seconds per batch) when the scan timed it."""
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
                    "kl": self.row(c)["kl"],
                    "delta_acc_pp": round(
                        100 * (self.row(c)["accuracy"] - self.base_accuracy), 3
                    ),
                }
                if timed:
                    row["latency"] = self.row(c)["latency"]
                out.append(row)
        return out


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
    activation_cache_mb: int = 1024,
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
    batch (``torch.utils.benchmark``, in this process, whatever the executor).

    ``activation_cache_mb`` (default 1024; 0 turns it off): memory, in each process that
    measures candidates, for the reference's activations on the validation subset. Each
    candidate then runs only from the first module it changed (the figures are the same:
    :mod:`netshrink.search_prefix`); modules are recorded in the order they run while their
    outputs fit."""
    splits = load_data(data) if isinstance(data, str) else data
    if val_limit < 1:
        raise ConfigError(f"search field 'val_limit': must be at least 1, got {val_limit}")
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
        raise ConfigError(
            f"search field 'latency_batch': must be an integer of at least 1, got "
            f"{latency_batch!r}"
        )
    if isinstance(activation_cache_mb, bool) or not isinstance(activation_cache_mb, int) \
            or activation_cache_mb < 0:
        raise ConfigError(
            "search field 'activation_cache_mb': must be an integer of at least 0, got "
            f"{activation_cache_mb!r}"
        )
    reference = _reference(model, splits, seed)
    info = _info_for(reference, splits)
    chosen = _selector(select).resolve(
        reference, head=info.head, default_types=["Linear", "Conv2d"]
    )
    candidates = layer_candidates(reference, chosen, methods)
    run = get_executor(executor, workers)
    inputs, targets = splits.batch("val", min(val_limit, len(splits.val)))
    shared = _ScanInputs(reference, splits, info, inputs, targets, seed, latency,
                         reference_logp=_log_probs(copy.deepcopy(reference), inputs),
                         reuse_bytes=activation_cache_mb << 20, token=uuid.uuid4().hex)
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
    # A row without a KL divergence or a latency (a file written by hand or by an older scan)
    # is measured again.
    missing = [
        c for c in todo if c.key not in measured or "kl" not in measured[c.key]
        or (latency and "latency" not in measured[c.key])
    ]
    if path and measured:
        log.info(
            "search: resuming the scan from %s (%d of %d done)", path, len(measured), len(todo)
        )
    started = time.perf_counter()
    task = functools.partial(_scan_one, shared)
    try:
        for first in range(0, len(missing), max(1, chunk)):
            part = missing[first : first + max(1, chunk)]
            for cand, result in zip(part, run.map(task, part), strict=True):
                if latency:
                    module, encodings = result.pop(_TIMING)
                    result["latency"] = search_latency._time_module(
                        packed_layer(module, encodings), layer_inputs[cand.layer]
                    )
                measured[cand.key] = result
            if path:
                write_checkpoint(path, key, measured)
            _progress_line(
                f"search: scanned {len(todo) - len(missing) + first + len(part)}/{len(todo)} "
                f"candidates ({run.name} executor, {time.perf_counter() - started:.1f}s)"
            )
    finally:
        _PREFIX.pop(shared.token, None)  # the recorded activations are freed
    model_latency = search_latency._time_module(reference, (example,)) if latency else None
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


__all__ = [
    "Sensitivity",
    "scan",
]
