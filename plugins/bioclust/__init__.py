"""``bioclust``: bio-inspired weight clustering + seeded random perturbation + selection.

Paper: Zhu Qianqian, Liu Yuan, Li Fu, "Bio-inspired matrix reduction and quantization method for
deep neural network" (深度神经网络的仿生矩阵约简与量化方法), Journal of Computer Applications
(计算机应用) 40(10):2817-2821, 2020. "Evolution + randomness + selection": cluster each layer's
weights, rebuild them as centroid + random perturbation, evaluate the rebuilt models and keep the
best. The perturbation is regenerated from a stored seed, so it costs no storage.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from netshrink import (
    Capabilities,
    CompressionContext,
    Compressor,
    LayerRecord,
    StepResult,
    hookimpl,
)
from netshrink.plugins.bioclust.config import BioclustConfig
from netshrink.plugins.bioclust.finetune import finetune_centroids
from netshrink.plugins.bioclust.kmeans import Clustering, kmeans1d
from netshrink.plugins.bioclust.options import layer_options as _search_options
from netshrink.plugins.bioclust.search import (
    Candidate,
    CandidateScorer,
    SearchResult,
    Target,
    cluster_targets,
    population_search,
    stats,
)

PAPER = ('Zhu Qianqian, Liu Yuan, Li Fu, "Bio-inspired matrix reduction and quantization method '
         'for deep neural network", Journal of Computer Applications (计算机应用) '
         '40(10):2817-2821, 2020')

__all__ = [
    "Bioclust",
    "BioclustConfig",
    "Candidate",
    "Clustering",
    "SearchResult",
    "Target",
    "kmeans1d",
]


class Bioclust(Compressor):
    """Per-layer k-means weight sharing with a seeded perturbation chosen by population search."""

    name = "bioclust"
    Config = BioclustConfig
    capabilities = Capabilities(
        handles=("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Embedding"),
        needs_data=True, encodes_values=True)
    paper = PAPER
    # What cluster_targets reads per layer (a step's overrides, e.g. 8 bits for a stem conv).
    layer_fields = ("bits", "k", "noise_scale", "init", "kmeans_iterations", "sample_size")
    config: BioclustConfig

    def __init__(self, config: BioclustConfig | dict[str, Any] | None = None, *,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(config, overrides=overrides)
        self.last_search: SearchResult | None = None
        """The last run's clustering and candidates (for benchmarks and analysis)."""

    @classmethod
    def layer_options(cls, module, name):
        """Plain k-means (``noise_scale: 0``) at each width of
        :data:`~netshrink.plugins.bioclust.options.SEARCH_BITS`, with the exact bytes of the
        layer clustered alone (``plugins/bioclust/options.py``)."""
        return _search_options(cls, module, name)

    def compress(self, model, layers, ctx: CompressionContext) -> StepResult:
        cfg = self.config
        targets = cluster_targets(model, layers, ctx, cfg, self.config_for)
        evaluate_many = None
        if cfg.executor != "local":
            loader = ctx.loader("val", batch_size=256, shuffle=False, limit=cfg.eval_limit)
            scorer = CandidateScorer(model, targets, cfg.distribution, loader, ctx.device)
            evaluate_many = functools.partial(_executor(cfg.executor, cfg.workers).map, scorer)
        evaluate: Callable[[], float] = functools.partial(
            ctx.evaluate, model, "val", limit=cfg.eval_limit)
        if all(t.base_scale == 0 for t in targets):
            # Plain k-means (e.g. a search's options and its scan): no candidate to select, so
            # the unperturbed reconstruction is not evaluated (with data or without); the
            # report's accuracy after is still measured on the test split.
            evaluate = _unmeasured
        search = population_search(targets, ctx, cfg, evaluate, evaluate_many)
        self.last_search = search
        chosen = search.chosen
        assert chosen is not None
        finetune_info: dict[str, Any] | None = None
        centroids = [t.clustering.centroids for t in targets]
        if cfg.centroid_epochs > 0:
            centroids, finetune_info = finetune_centroids(
                targets, chosen, model, ctx, epochs=cfg.centroid_epochs, lr=cfg.centroid_lr,
                distribution=cfg.distribution, eval_limit=cfg.eval_limit)
        records: list[LayerRecord] = []
        for target, seed, scale, cents in zip(targets, chosen.seeds, chosen.scales, centroids):
            codebook = target.codebook(seed, scale, cfg.distribution, centroids=cents)
            encoding = target.encoding(codebook)
            ctx.encode(model, target.tensor_name, encoding)
            records.append(LayerRecord(target.layer, {
                    "k": codebook.centroids.numel(),
                    "k_requested": target.requested_k,
                    "index_bits": codebook.bits,
                    "bits_per_weight": round(encoding.bits_per_weight(), 4),
                    "encoding": encoding.describe(),
                    "seed": codebook.seed,
                    "noise_scale": round(codebook.noise_scale, 6),
                    "distribution": cfg.distribution,
                    "kmeans_iterations": target.clustering.iterations,
                    "relative_error": round(
                        target.clustering.reconstruction_error(target.values), 6),
                    "sparse": target.positions is not None,
                }))
        return StepResult(model, records, self._summary(search, finetune_info))

    def _summary(self, search: SearchResult,
                 finetune_info: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.config
        chosen = search.chosen
        assert chosen is not None
        generations = []
        for g in range(1, cfg.generations + 1):
            accs = [c.val_acc for c in search.candidates if c.generation == g]
            if accs:
                generations.append({"generation": g, **stats(accs)})
        summary: dict[str, Any] = {
            "val_acc_unperturbed": _rounded(search.plain.val_acc),
            "population": stats([c.val_acc for c in search.first_generation()]),
            "generations": generations,
            "chosen": "perturbed" if chosen.perturbed else "unperturbed",
            "chosen_val_acc": _rounded(chosen.val_acc),
            "chosen_candidate": None if not chosen.perturbed else chosen.describe(),
            "evaluations": 1 + len(search.candidates),
            # The whole population (seeds, scales, validation accuracy): the stability record,
            # and enough to rebuild any candidate from the same clustering.
            "candidates": [c.describe() for c in search.candidates],
        }
        if search.candidates:
            summary["best_val_acc"] = round(search.best().val_acc, 6)
        if finetune_info is not None:
            summary["centroid_finetune"] = finetune_info
        return summary


def _unmeasured() -> float:
    """The accuracy of a reconstruction measured without data: not a number."""
    return math.nan


def _rounded(accuracy: float) -> float | None:
    """An accuracy for the summary (None when it was not measured)."""
    return None if math.isnan(accuracy) else round(accuracy, 6)


def _executor(name: str, workers: int | None) -> Any:
    """The executor ``name`` (imported here: only a search that fans out needs it)."""
    from netshrink import get_executor

    return get_executor(name, workers)


@hookimpl
def register_compressors(register):
    register(Bioclust)
