"""netshrink: plugin-based compression for PyTorch models, with honest on-disk sizes."""

from netshrink import datasets
from netshrink.adapters import ModelAdapter, ModelInfo, load_model, model_info
from netshrink.compressor import Capabilities, Compressor, CompressorConfig, LayerRecord, StepResult
from netshrink.config import NetshrinkConfig
from netshrink.context import CompressionContext
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
from netshrink.registry.hookspecs import hookimpl
from netshrink.selector import LayerSelector
from netshrink.training import FinetuneConfig, reference_model

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "Capabilities",
    "CompressionContext",
    "Compressor",
    "CompressorConfig",
    "ConfigError",
    "DataError",
    "DuplicateNameError",
    "EncodingError",
    "FinetuneConfig",
    "LayerRecord",
    "LayerSelector",
    "ModelAdapter",
    "ModelInfo",
    "ModelSpecError",
    "NetshrinkConfig",
    "NetshrinkError",
    "RecipeError",
    "SelectionError",
    "StepResult",
    "UnknownNameError",
    "__version__",
    "datasets",
    "hookimpl",
    "load_model",
    "model_info",
    "reference_model",
]
