"""Configuration of the ``normsparse`` compressor."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from netshrink import CompressorConfig


class NormSparseConfig(CompressorConfig):
    """Configuration of :class:`~netshrink.plugins.normsparse.NormSparse`."""

    l1: float = Field(
        5e-3,
        json_schema_extra={"minimum": 0},
        description="Weight lambda of the penalty lambda * sum(r) on the magnitudes of all "
        "selected neurons/kernel slices (larger: more removed, more accuracy at risk).",
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear",
        description="How lambda reaches its value: 'constant' from the first step; "
        "'linear' or 'cosine' ramp from 0 over `warmup_epochs` (lets the directions settle "
        "before units are pushed to zero).",
    )
    warmup_epochs: int = Field(
        2, ge=0, le=1000, description="Epochs of the lambda ramp (ignored for 'constant')."
    )
    threshold: float = Field(
        0.05,
        json_schema_extra={"minimum": 0, "exclusiveMaximum": 1},
        description="A neuron/kernel slice is removed when r < threshold * (largest r of its "
        "layer); in [0, 1).",
    )
    epochs: int = Field(
        20, ge=1, le=1000, description="Most epochs of L1 training over the train split."
    )
    lr: float = Field(
        1e-3,
        gt=0,
        le=10,
        description="Adam learning rate of the L1 training "
        "(directions, biases and every other trained tensor).",
    )
    lr_magnitude: float = Field(
        1e-2,
        gt=0,
        le=10,
        description="Adam learning rate of the magnitudes r. Adam moves a "
        "parameter by about its learning rate per step, so this sets how many steps a unit that "
        "the penalty wins over needs to reach zero (r starts at the row/slice norm, "
        "typically 0.1-2).",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Mini-batch size of the L1 training.")
    patience: int | None = Field(
        6,
        ge=1,
        description="Early stopping: once the lambda ramp is over, stop after this "
        "many epochs without a new best checkpoint on the validation split (None: run all "
        "epochs).",
    )
    val_tolerance: float = Field(
        0.02,
        ge=0,
        le=1,
        description="A checkpoint is admissible when the validation accuracy of its pruned "
        "model is at most this much (absolute) below the model's accuracy before the step; the "
        "admissible checkpoint that removes most weights is kept.",
    )
    bn_batches: int = Field(
        8,
        ge=0,
        le=100000,
        description="Training batches used to recompute BatchNorm "
        "statistics of the pruned model before each validation (0: keep the running "
        "statistics). Ignored for models without BatchNorm.",
    )
    remove_filters: bool = Field(
        True,
        description="Remove a conv filter physically when all its kernel slices are gone "
        "(and every channel coupled to it, e.g. through a residual add, is gone too).",
    )
    min_keep: int = Field(
        1, ge=1, description="Neurons/filters every layer keeps at least (never empties a layer)."
    )
    time_limit: float = Field(
        600.0, gt=0, description="Seconds Torch-Pruning may take, twice: its trace of the model, "
        "checked before any training (past it the step is refused, the model unchanged), and the "
        "removal of dead units after training (past it the layers not yet done keep their dead "
        "units as zeros, which their records say).")

    @field_validator("l1")
    @classmethod
    def _l1_non_negative(cls, value: float) -> float:
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"l1 (the L1 weight on the magnitudes) must be >= 0, got {value}")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold_fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(
                f"threshold must be in [0, 1) (a fraction of the layer's largest magnitude), "
                f"got {value}"
            )
        return value

    def l1_at(self, epoch_progress: float) -> float:
        """Lambda after ``epoch_progress`` epochs (fractional) under the schedule."""
        import math

        if self.schedule == "constant" or self.warmup_epochs == 0:
            return self.l1
        t = min(1.0, epoch_progress / self.warmup_epochs)
        if self.schedule == "linear":
            return self.l1 * t
        return self.l1 * 0.5 * (1 - math.cos(math.pi * t))
