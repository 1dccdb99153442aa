"""netshrink: plugin-based compression for PyTorch models, with honest on-disk sizes.

This package's ``__all__`` is the whole public API, for users and plugin authors alike: the
built-in plugins import from ``netshrink`` and nothing deeper (a contract checked in CI).
"""

from netshrink import datasets
from netshrink.adapters import ModelAdapter, ModelInfo, last_linear, model_info, set_model_info
from netshrink.artifact import load, read_manifest
from netshrink.compressor import Capabilities, Compressor, CompressorConfig, LayerRecord, StepResult
from netshrink.config import NetshrinkConfig
from netshrink.context import CompressionContext
from netshrink.data import ArrayDataset, DataSplits
from netshrink.encodings import (
    Codebook,
    Dense,
    Encoding,
    EncodingTable,
    Quantized,
    Sparse,
    encode_values,
    model_tensors,
    packed_nbytes,
)
from netshrink.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    DuplicateNameError,
    EncodingError,
    ModelSpecError,
    NetshrinkError,
    RecipeError,
    SelectionError,
    UnknownNameError,
)
from netshrink.fileio import atomic_write, cache_dir
from netshrink.lowrank import (
    LowRank,
    rank_by_energy,
    rank_by_ratio,
    rank_by_vbmf,
    singular_values,
    truncated_svd,
)
from netshrink.models import load_model, reference_model
from netshrink.pipeline import CompressionResult, accuracy, compress, save
from netshrink.recipe import Recipe, Step, step
from netshrink.registry.hookspecs import hookimpl
from netshrink.report import LayerRow, Report
from netshrink.selector import LayerSelector
from netshrink.training import (
    CheckpointPolicy,
    FinetuneConfig,
    TrainState,
    distillation_loss,
    evaluate,
    train,
)
from netshrink.version import __version__

__all__ = [
    "ArrayDataset",
    "ArtifactError",
    "Capabilities",
    "CheckpointPolicy",
    "Codebook",
    "CompressionContext",
    "CompressionResult",
    "Compressor",
    "CompressorConfig",
    "ConfigError",
    "DataError",
    "DataSplits",
    "Dense",
    "DuplicateNameError",
    "Encoding",
    "EncodingError",
    "EncodingTable",
    "FinetuneConfig",
    "LayerRecord",
    "LayerRow",
    "LayerSelector",
    "LowRank",
    "ModelAdapter",
    "ModelInfo",
    "ModelSpecError",
    "NetshrinkConfig",
    "NetshrinkError",
    "Quantized",
    "Recipe",
    "RecipeError",
    "Report",
    "SelectionError",
    "Sparse",
    "Step",
    "StepResult",
    "TrainState",
    "UnknownNameError",
    "__version__",
    "accuracy",
    "atomic_write",
    "cache_dir",
    "compress",
    "datasets",
    "distillation_loss",
    "encode_values",
    "evaluate",
    "hookimpl",
    "last_linear",
    "load",
    "load_model",
    "model_info",
    "model_tensors",
    "packed_nbytes",
    "rank_by_energy",
    "rank_by_ratio",
    "rank_by_vbmf",
    "read_manifest",
    "reference_model",
    "save",
    "set_model_info",
    "singular_values",
    "step",
    "train",
    "truncated_svd",
]
