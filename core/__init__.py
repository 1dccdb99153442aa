"""netshrink: plugin-based compression for PyTorch models, with honest on-disk sizes."""

from netshrink import datasets
from netshrink.adapters import ModelAdapter, ModelInfo, load_model, model_info
from netshrink.artifact import load, read_manifest, save
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
from netshrink.pipeline import CompressionResult, accuracy, compress
from netshrink.recipe import Recipe, Step, step
from netshrink.registry.hookspecs import hookimpl
from netshrink.report import LayerRow, Report
from netshrink.selector import LayerSelector
from netshrink.training import FinetuneConfig, reference_model

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "Capabilities",
    "CompressionContext",
    "CompressionResult",
    "Compressor",
    "CompressorConfig",
    "ConfigError",
    "DataError",
    "DuplicateNameError",
    "EncodingError",
    "FinetuneConfig",
    "LayerRecord",
    "LayerRow",
    "LayerSelector",
    "ModelAdapter",
    "ModelInfo",
    "ModelSpecError",
    "NetshrinkConfig",
    "NetshrinkError",
    "Recipe",
    "RecipeError",
    "Report",
    "SelectionError",
    "Step",
    "StepResult",
    "UnknownNameError",
    "__version__",
    "accuracy",
    "compress",
    "datasets",
    "hookimpl",
    "load",
    "load_model",
    "model_info",
    "read_manifest",
    "reference_model",
    "save",
    "step",
]
