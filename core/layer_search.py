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

The parts live in ``netshrink.search_*`` modules (candidates, latency, checkpoint, scan, solver,
recipe, verify, run, pareto, cli); this module is the public surface and re-exports them.
"""

from __future__ import annotations

from netshrink.search_candidates import (
    Candidate,
    apply_candidate,
    check_layer_options,
    layer_candidates,
    option_bytes,
)
from netshrink.search_checkpoint import read_checkpoint, write_checkpoint
from netshrink.search_cli import run_command
from netshrink.search_latency import LATENCY_MIN_RUN_S, packed_layer, parse_latency
from netshrink.search_pareto import ParetoPoint, pareto, pareto_table, plot_pareto
from netshrink.search_recipe import parse_budget, plan_recipe, recipe_yaml
from netshrink.search_run import SearchLatency, SearchResult, search
from netshrink.search_scan import Sensitivity, scan
from netshrink.search_solver import solve
from netshrink.search_verify import MeasuredPlan

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
