"""Whole-plan verification: the solver trusts the sum of losses measured alone, and layers
interact, so the chosen plan is applied whole and measured against re-solves and uniform
plans, and the best measured is kept.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netshrink.adapters import ModelInfo
from netshrink.data import DataSplits
from netshrink.encodings import EncodingTable
from netshrink.search_candidates import Candidate, apply_candidate
from netshrink.search_scan import Sensitivity, _log_probs, _measure, _progress_line

log = logging.getLogger("netshrink")


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
    predicted_kl: float = 0.0
    """The sum of the candidates' KL divergences from the reference measured alone."""
    kl: float = 0.0
    """The KL divergence from the reference's predictions with every candidate applied."""
    chosen: bool = False

    def score(self, objective: str) -> tuple[float, float]:
        """``(measured, predicted)`` under ``objective`` (``kl`` or ``loss``)."""
        if objective == "kl":
            return self.kl, self.predicted_kl
        return self.delta_loss, self.predicted_delta_loss

    def row(self) -> dict[str, Any]:
        """The plan as a JSON-able row (``SearchResult.save``'s ``measured_plans``)."""
        return {
            "label": self.label,
            "plan": {layer: c.label for layer, c in self.plan.items()},
            "layer_bytes": self.layer_bytes,
            "predicted_delta_loss": self.predicted_delta_loss,
            "measured_delta_loss": self.delta_loss,
            "predicted_kl": self.predicted_kl,
            "measured_kl": self.kl,
            "measured_accuracy": self.accuracy,
            "chosen": self.chosen,
        }


#: How a note names each objective: the verb and what is measured.
_WORDS = {"kl": ("diverged by", "KL divergence from the reference's predictions"),
          "loss": ("lost", "validation loss")}


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
        self.reference_logp = _log_probs(copy.deepcopy(reference), self.inputs)
        self.done: dict[tuple[str, ...], tuple[float, float, float]] = {}
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
            loss, acc, kl = _measure(model, self.inputs, self.targets, self.reference_logp)
            self.done[key] = (round(loss - self.table.base_loss, 6), acc, round(kl, 9))
            fresh = True
        else:
            fresh = False
        delta, acc, kl = self.done[key]
        predicted = round(sum(self.table.cost(c, "loss") for c in plan.values()), 6)
        predicted_kl = round(sum(self.table.cost(c, "kl") for c in plan.values()), 9)
        found = MeasuredPlan(
            label, dict(plan), sum(self.table.row(c)["bytes"] for c in plan.values()),
            predicted, delta, acc, predicted_kl, kl,
        )
        if fresh:
            _progress_line(
                f"search: measured plan {label}: loss {delta:+.4f} (predicted {predicted:+.4f}),"
                f" KL {kl:.4g} (predicted {predicted_kl:.4g}), accuracy {100 * acc:.2f}% on "
                f"{len(self.targets)} validation samples"
            )
        return found


def _same(a: dict[str, Candidate], b: dict[str, Candidate]) -> bool:
    return [c.key for c in a.values()] == [c.key for c in b.values()]


def _uniform_plans(
    table: Sensitivity, allowed: dict[str, list[Candidate]], layer_budget: int,
    max_macs: int | None, max_latency: float | None = None, objective: str = "kl",
) -> list[tuple[str, dict[str, Candidate]]]:
    """Per candidate label offered anywhere: that candidate on every layer that offers it, the
    others dense; those within the layer budget (and ``max_macs``, and the layers' latency
    budget ``max_latency``), by predicted ``objective``."""
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
        plans, key=lambda lp: sum(table.cost(c, objective) for c in lp[1].values())
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
    objective: str = "kl",
) -> tuple[dict[str, Candidate], list[MeasuredPlan], list[str]]:
    """Measure the solver's ``plan`` whole and its alternatives (as :func:`search`'s
    ``verify`` describes); return the plan to keep, every plan measured and the notes.
    ``solve_again(penalty)`` solves with ``penalty`` (candidate key -> cost) added;
    ``max_latency`` is the searched layers' latency budget (uniform plans over it are
    skipped); ``objective`` is what plans are compared by (measured against predicted)."""
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

    # The solver trusts the sum of costs measured alone; when the plan costs more, spread
    # the unexplained cost over its compressed layers' candidates and solve again.
    penalty: dict[str, float] = {}
    current: MeasuredPlan | None = measured[0]
    for round_ in range(1, _RESOLVE_ROUNDS + 1):
        if current is None or not room():
            break
        got, predicted = current.score(objective)
        if got <= predicted:
            break
        compressed = [c for c in current.plan.values() if c.options]
        share = (got - predicted) / max(1, len(compressed))
        for cand in compressed:
            penalty[cand.key] = penalty.get(cand.key, 0.0) + share
        again = solve_again(penalty)
        current = None if again is None else add(f"re-solve {round_}", again)
    for label, uniform in _uniform_plans(table, allowed, layer_budget, max_macs, max_latency,
                                         objective):
        if not room():
            break
        add(f"uniform {label}", uniform)

    def drop(m: MeasuredPlan) -> float:
        return 100 * (table.base_accuracy - m.accuracy)

    within = [m for m in measured if max_drop is None or drop(m) <= max_drop]
    # ties: the earlier measured
    best = min(within or measured, key=lambda m: m.score(objective)[0])
    best.chosen = True
    notes = []
    solver = measured[0]
    if best is not solver:
        got, predicted = solver.score(objective)
        verb, what = _WORDS[objective]
        notes.append(
            f"the solver's plan {verb} {got:.4g} ({what}, first {table.n_val} samples), "
            f"{'more than' if got > predicted else 'against'} the predicted {predicted:.4g}; "
            f"kept {best.label}, which {verb} {best.score(objective)[0]:.4g}"
        )
    if not within:
        notes.append(
            f"no measured plan stays within max_drop {max_drop} pp on the first {table.n_val} "
            f"validation samples (the kept plan drops {drop(best):.2f} pp)"
        )
    for note in notes:
        log.warning("search: %s", note)
    return best.plan, measured, notes


__all__ = [
    "MeasuredPlan",
]
