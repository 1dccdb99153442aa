"""Configuration of the ``bioclust`` compressor (Pydantic: typed, bounded, described)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from netshrink import CompressorConfig


class BioclustConfig(CompressorConfig):
    """Configuration of :class:`~netshrink.plugins.bioclust.Bioclust`."""

    bits: int = Field(
        4, ge=1, le=8,
        description="Index bits per weight: each selected layer gets k = 2**bits clusters.")
    k: int | None = Field(
        None, ge=2, le=256,
        description="Clusters per layer, when not a power of two (ceil(log2 k) index bits); "
        "give either bits or k.")
    init: Literal["linear", "quantile", "random"] = Field(
        "linear", description="k-means initialisation: 'linear' spaces centroids evenly between "
        "the smallest and largest weight (best in Deep Compression), 'quantile' by density, "
        "'random' picks weights.")
    kmeans_iterations: int = Field(100, ge=1, le=1000, description="Maximum Lloyd iterations.")
    sample_size: int | None = Field(
        500_000, ge=1000,
        description="Fit k-means on a random sample of this many weights for larger layers, "
        "then assign every weight (None: fit on all).")
    noise_scale: float = Field(
        0.5, ge=0.0, le=10.0,
        description="Perturbation size relative to each cluster's spread: a weight of cluster i "
        "is rebuilt as centroid[i] + noise_scale * spread[i] * noise (0: plain k-means).")
    scale_jitter: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Each candidate draws its per-layer scale uniformly in "
        "noise_scale * [1 - jitter, 1 + jitter] (0: every candidate uses noise_scale).")
    distribution: Literal["normal", "uniform"] = Field(
        "normal", description="Noise distribution: standard normal, or uniform on [-1, 1].")
    population: int = Field(
        16, ge=1, le=4096,
        description="Candidate reconstructions per generation (one seed per layer each), each "
        "evaluated on the validation split.")
    generations: int = Field(
        1, ge=1, le=100,
        description="Generations: after the first, each generation mutates the best candidates "
        "found so far (new seeds and rescaled noise for some layers).")
    elite: int = Field(
        4, ge=1, le=4096,
        description="Candidates kept as parents between generations (at most all evaluated).")
    mutation_rate: float = Field(
        0.3, gt=0.0, le=1.0,
        description="Probability that a child re-draws a layer's seed and rescales its noise "
        "(at least one layer always mutates).")
    scale_mutation: float = Field(
        0.2, ge=0.0, le=2.0,
        description="A mutated layer's scale is multiplied by exp(scale_mutation * N(0, 1)).")
    keep_unperturbed: bool = Field(
        True, description="Also evaluate the unperturbed k-means reconstruction and keep it "
        "unless a perturbed candidate beats it on validation by more than min_gain.")
    min_gain: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Validation accuracy (fraction) a perturbed candidate must gain over the "
        "unperturbed one to be kept.")
    eval_limit: int | None = Field(
        None, ge=1, description="Evaluate candidates on only the first N validation examples "
        "(faster, noisier selection); None: the whole split.")
    executor: str = Field(
        "local", description="Where a generation's candidates are evaluated: 'local' (here, "
        "one by one), 'process' (a pool of local processes), 'ray' (Ray tasks, on a cluster "
        "when RAY_ADDRESS is set; pip install 'netshrink[ray]'), or a plugin's executor. The "
        "result is the same for every executor.")
    workers: int | None = Field(
        None, ge=1, description="Candidates evaluated at once by the executor (default: its "
        "own).")
    centroid_epochs: int = Field(
        0, ge=0, le=100,
        description="Epochs of centroid fine-tuning after selection (Deep Compression's "
        "shared-gradient update: each centroid moves by the summed gradient of its weights; "
        "the chosen perturbation is kept). 0: off.")
    centroid_lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate of the "
                               "centroid fine-tuning.")

    @model_validator(mode="after")
    def _bits_or_k(self) -> BioclustConfig:
        if self.k is not None and "bits" in self.model_fields_set:
            raise ValueError(f"give either bits or k, not both (got bits={self.bits}, k={self.k})")
        return self

    @property
    def clusters(self) -> int:
        """Clusters per layer: ``k`` when given, else ``2**bits``."""
        return self.k if self.k is not None else 1 << self.bits

    def merged(self, override: Mapping[str, Any]) -> BioclustConfig:
        """A per-layer override's ``bits`` or ``k`` replaces the step's ``bits`` and ``k``
        (they are alternatives), so ``{'fc1': {'bits': 3}}`` works under a step with ``k``."""
        base = self.model_dump(exclude_unset=True)
        if "bits" in override or "k" in override:
            base.pop("bits", None)
            base.pop("k", None)
        return self.model_validate({**base, **override})
