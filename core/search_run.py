"""The search itself (:func:`search`): scan, solve, verify the plan whole, compress it with a
recipe and tighten the byte (and latency) budget until the real artifact fits; and what it
returns (:class:`SearchResult`, :class:`SearchLatency`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.artifact import artifact_bytes
from netshrink.data import DataSplits
from netshrink.datasets import load as load_data
from netshrink.encodings import EncodingTable
from netshrink.errors import ConfigError, NetshrinkError
from netshrink.executors import Executor
from netshrink.fileio import atomic_write
from netshrink.pipeline import CompressionResult, _info_for, compress
from netshrink.recipe import Recipe
from netshrink.search_candidates import Candidate
from netshrink.search_latency import _latency_example, _packed_latency, parse_latency
from netshrink.search_recipe import parse_budget, plan_recipe, recipe_yaml
from netshrink.search_scan import (
    OBJECTIVES,
    Sensitivity,
    _loss_accuracy,
    _progress_line,
    _reference,
    scan,
)
from netshrink.search_solver import solve
from netshrink.search_verify import MeasuredPlan, _PlanMeter, _verify_plan
from netshrink.selector import LayerSelector
from netshrink.training import FinetuneConfig

log = logging.getLogger("netshrink")


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
    objective: str = "kl"
    """What the solver minimised and ``verify`` compared plans by (see ``search``)."""

    @property
    def artifact_bytes(self) -> int:
        """Bytes of the artifact (what the budget bounds)."""
        return len(self.result.artifact)

    def plan_rows(self) -> list[dict[str, Any]]:
        """Per layer: the chosen candidate, its bytes, measured-alone loss change and KL (and its
        latency alone, seconds per batch, when the search had a latency budget)."""
        table = self.sensitivity
        rows = []
        for layer, c in self.plan.items():
            row = {"layer": layer, "choice": c.label, "bytes": table.row(c)["bytes"],
                   "delta_loss": round(table.row(c)["loss"] - table.base_loss, 6),
                   "kl": table.row(c)["kl"]}
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
            "objective": self.objective,
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
    warn_drop: float | None = 5.0,
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
    objective: str = "kl",
    activation_cache_mb: int = 1024,
) -> SearchResult:
    """Search per-layer settings across every method under ``budget`` (bytes, ``"40x"``,
    ``"120kB"``) and return a :class:`SearchResult`; ``result.recipe`` run by
    :func:`netshrink.compress` reproduces ``result.result.artifact`` byte for byte.

    ``max_drop`` (percentage points of validation accuracy) drops any candidate that alone
    loses more, and notes when the final model does. Without ``max_drop``, ``warn_drop``
    (percentage points, default 5; ``None``: never) is how far the final model's validation
    accuracy may fall below the reference's before a note (and a logged warning) says so, with
    what to try: the budget may be too small for the options. The solver's budget for the layers is
    ``budget`` less the rest of the artifact (header, manifest, other tensors); if the real
    artifact still exceeds ``budget`` the layer budget becomes that plan's layer bytes less
    the excess and the solve runs again (up to ``tries`` times), so the returned artifact is
    never over ``budget``.

    ``max_latency`` (see :func:`parse_latency`: seconds per batch, ``"2ms"``, or ``"80%"`` of
    the dense model's measured latency) bounds the whole model's latency on a batch of
    ``latency_batch`` inputs in the packed runtime: the scan times each candidate's layer
    alone (``scan(latency=True)``; a ``sensitivity`` given must have been scanned so, at the
    same batch) and the solver bounds the sum over the searched layers plus the rest of the
    dense model (its whole latency less the searched layers' dense ones). The artifact is then
    loaded with ``runtime="packed"`` and timed whole (``result.latency``); if it is over the
    budget the layers' latency budget shrinks by the ratio and the search runs again, within
    the same ``tries``, after which a note says so (timings on a shared machine are noisy).

    ``objective`` is what each candidate costs, measured alone on the scan's validation
    subset: ``"kl"`` (default), the mean KL divergence of the model's predictions from the
    reference's, which only the reference scores 0; or ``"loss"``, the increase of the
    labels' cross-entropy, which a compressed, less confident model can *lower* while it gets
    fewer samples right (seen on LeNet-5, shapes32).

    ``verify`` (default on): the solver minimises the *sum* of the costs each candidate
    caused alone, and layers interact. So before compressing, the solver's plan is
    applied whole to the reference (every layer's candidate as the scan applied it, no
    fine-tune) and measured on the scan's validation subset (the first ``val_limit``
    samples), and so are alternatives within the same layer budget (and ``max_macs``,
    ``max_latency``):

    - if the plan cost more than predicted, up to 3 re-solves, each adding the unexplained
      cost (measured less predicted), shared equally, to the cost of the last plan's
      compressed candidates;
    - every *uniform* plan: one candidate (same compressor(s) and config) on every layer
      that offers it, the other layers dense, by predicted cost.

    At most ``max_alternatives`` plans besides the solver's are measured. The plan kept is the
    one with the lowest measured cost under ``objective``
    (ties: the solver's, then the first measured); with ``max_drop``, only plans
    whose measured accuracy drop is within ``max_drop`` compete, unless none is (a note says
    so). ``notes`` says when a plan other than the solver's was kept; every plan measured is
    in ``measured_plans``. ``verify=False`` compresses the solver's plan unmeasured.

    ``activation_cache_mb``: memory for the reference's activations that the scan reuses
    (see :func:`netshrink.search_scan.scan`; 0 turns it off; the figures are the same)."""
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"search field 'objective': must be one of {', '.join(OBJECTIVES)}, got "
            f"{objective!r}"
        )
    if warn_drop is not None and not warn_drop >= 0:
        raise ConfigError(
            f"search field 'warn_drop': must be at least 0 (percentage points) or None, got "
            f"{warn_drop}"
        )
    if max_alternatives < 0:
        raise ConfigError(
            f"search field 'max_alternatives': must be at least 0, got {max_alternatives}"
        )
    splits = load_data(data) if isinstance(data, str) else data
    table = sensitivity or scan(
        model, splits, methods=methods, select=select, val_limit=val_limit, seed=seed,
        executor=executor, workers=workers, checkpoint=checkpoint,
        latency=max_latency is not None, latency_batch=latency_batch,
        activation_cache_mb=activation_cache_mb,
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
            [[_cost(table, c, dense_layers, objective) + penalty.get(c.key, 0.0)
              for c in allowed[n]]
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
                objective=objective,
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
            # The next plan must be smaller than this one by the excess: shrinking the budget
            # alone can leave this same plan inside it (the solver rounds sizes to buckets,
            # and verify may have kept a plan well under the budget).
            plan_bytes = sum(table.row(c)["bytes"] for c in plan.values())
            layer_budget = min(layer_budget, plan_bytes) - excess
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
    drop = 100 * (ref_acc - val_acc)
    if max_drop is not None and drop > max_drop:
        notes.append(
            f"validation accuracy dropped {drop:.2f} pp, more than "
            f"max_drop {max_drop} pp (options were filtered alone; together they lose more)"
        )
        log.warning("search: %s", notes[-1])
    elif max_drop is None and warn_drop is not None and drop > warn_drop:
        notes.append(
            f"the searched model holds {100 * val_acc:.2f}% validation accuracy against the "
            f"reference's {100 * ref_acc:.2f}% ({drop:.2f} pp lost, over "
            f"warn_drop {warn_drop} pp): the budget may be too small for these options; try a "
            "larger budget, more methods or options, 'finetune', or 'max_drop'"
        )
        log.warning("search: %s", notes[-1])
    predicted = sum(table.row(c)["loss"] - table.base_loss for c in plan.values())
    return SearchResult(
        plan, recipe, result, limit, val_acc, ref_acc, round(predicted, 6), table, notes,
        kept.measured, timing, objective,
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


def _cost(table: Sensitivity, candidate: Candidate, dense_bytes: int,
          objective: str = "kl") -> float:
    """The solver's cost: ``objective`` measured alone (:meth:`Sensitivity.cost`), plus a
    tie-break far below the measures' resolution (KL 1e-9, loss 1e-6) that prefers the
    smaller of equally good candidates."""
    size = table.row(candidate)["bytes"] / max(dense_bytes, 1)
    return table.cost(candidate, objective) + 1e-11 * size


__all__ = [
    "SearchLatency",
    "SearchResult",
    "search",
]
