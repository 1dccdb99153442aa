"""Configuration of the ``joint`` plugin."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from netshrink import CompressorConfig

DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
DEFAULT_RATIO = 50.0


class JointConfig(CompressorConfig):
    """Configuration of :class:`~netshrink.plugins.joint.Joint`."""

    target_ratio: float | None = Field(
        None,
        gt=1.0,
        le=100_000.0,
        description="Target honest compression ratio of the whole model: dense fp32 bytes / "
        "artifact bytes (manifest and unselected tensors included). Default 50 when "
        "target_bytes is not given either.",
    )
    target_bytes: int | None = Field(
        None, gt=0, description="Target artifact size in bytes (instead of target_ratio)."
    )
    min_bits: int = Field(2, ge=1, le=8, description="Smallest weight bit-width a layer may get.")
    max_bits: int = Field(8, ge=1, le=8, description="Largest weight bit-width a layer may get.")
    sparsities: list[float] = Field(
        default_factory=lambda: list(DEFAULT_SPARSITIES),
        description="Candidate per-layer sparsities the allocator chooses from (each in [0, 1)).",
    )
    allocation: Literal["fisher", "uniform"] = Field(
        "fisher",
        description="'fisher': per-layer sparsity and bits from a Gauss-Newton/Fisher "
        "sensitivity of each layer's outputs and a knapsack under the byte budget; 'uniform': "
        "one sparsity and one bit-width for every layer (the fixed-pattern baseline), the best "
        "that fits.",
    )
    epochs: int = Field(10, ge=0, le=1000, description="Joint training epochs (0: one-shot).")
    lr: float = Field(2e-3, gt=0.0, le=1.0, description="Adam learning rate of the joint training.")
    batch_size: int = Field(
        32, ge=1, le=65536, description="Mini-batch size of the joint training."
    )
    prune_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Fraction of the training over which sparsity ramps "
        "up (cubic schedule) to each layer's target; the rest trains with fixed masks.",
    )
    mask_updates: int = Field(
        16,
        ge=1,
        le=10_000,
        description="How many times masks and scales are recomputed while sparsity ramps up.",
    )
    reallocate: int = Field(
        0,
        ge=0,
        le=100,
        description="Re-allocations during training: the per-layer sensitivity is measured "
        "again on the current (masked, fake-quantized) model and sparsity and bits are chosen "
        "again under the same byte budget, at evenly spaced points of the sparsity ramp "
        "(0: allocate once, before training; needs epochs >= 1).",
    )
    distill: bool = Field(
        True, description="Distil from the uncompressed model (soft targets) when it is given."
    )
    kd_temperature: float = Field(4.0, gt=0.0, le=100.0, description="Distillation temperature.")
    kd_alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the distillation loss.")
    per_channel: bool = Field(
        False,
        description="One scale per output channel (4 bytes each, stored) instead of one "
        "per layer (costs bytes that matter at 100x).",
    )
    bias: Literal["q8", "fp16", "fp32"] = Field(
        "q8", description="How biases of selected layers are stored: 8-bit codes, fp16 or fp32."
    )
    calib_batches: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Training batches (of 32) used to estimate each layer's sensitivity.",
    )
    margin: float = Field(
        0.02,
        ge=0.0,
        lt=0.5,
        description="Fraction of the byte budget kept in reserve for "
        "masks moving during training (a final trim enforces the budget anyway).",
    )
    seed: int | None = Field(
        None, ge=0, description="Seed of the joint training (None: the run's seed)."
    )

    @field_validator("sparsities")
    @classmethod
    def _check_sparsities(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("sparsities must list at least one candidate, got []")
        bad = [v for v in value if not 0.0 <= v < 1.0]
        if bad:
            raise ValueError(f"sparsities must each be in [0, 1), got {bad}")
        return sorted(set(float(v) for v in value))

    @model_validator(mode="after")
    def _check_consistency(self) -> JointConfig:
        if self.target_ratio is not None and self.target_bytes is not None:
            raise ValueError(
                "set either target_ratio or target_bytes, not both "
                f"(got target_ratio={self.target_ratio}, target_bytes={self.target_bytes})"
            )
        if self.min_bits > self.max_bits:
            raise ValueError(
                f"min_bits must be <= max_bits, got min_bits={self.min_bits}, "
                f"max_bits={self.max_bits}"
            )
        if self.reallocate and self.epochs == 0:
            raise ValueError(
                "reallocate needs training (it re-allocates during the epochs), got "
                f"reallocate={self.reallocate} with epochs=0; set epochs >= 1 or reallocate: 0"
            )
        return self

    def bit_choices(self) -> list[int]:
        """Candidate bit-widths, ``min_bits..max_bits``."""
        return list(range(self.min_bits, self.max_bits + 1))
