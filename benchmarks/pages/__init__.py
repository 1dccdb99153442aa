"""The pages: each module is a short spec with ``TITLE``, ``OUT`` (path under docs/), ``ABOUT``
(lines under the header), optionally ``SEEDS``, ``cases(quick)`` (label -> (model, steps):
every compression it runs, validated by the tests) and ``run(bench)`` (the page body)."""

from benchmarks.pages import (
    bioclust,
    defaults,
    joint,
    normsparse,
    overview,
    peers,
    ptq,
    rlprune,
    runtime,
    search,
    search_chains,
    statprune_tucker,
)

PAGES = {
    "bioclust": bioclust,
    "defaults": defaults,
    "joint": joint,
    "normsparse": normsparse,
    "peers": peers,
    "ptq": ptq,
    "rlprune": rlprune,
    "runtime": runtime,
    "search": search,
    "search_chains": search_chains,
    # The digits smoke run (docs/benchmarks/smoke_digits.md).
    "smoke_digits": overview,
    "statprune_tucker": statprune_tucker,
    # One page per model on the shapes data (docs/benchmarks/overview_<model>.md).
    **{f"overview_{m}": overview.model_page(m) for m in overview.SHAPES_MODELS},
    # The peers page's curves per CNN on the shapes data (docs/benchmarks/peers_<model>.md).
    **{f"peers_{m}": peers.model_page(m) for m in peers.CNN_MODELS},
}
