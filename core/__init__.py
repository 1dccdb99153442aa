"""netshrink: plugin-based compression for PyTorch models, with honest on-disk sizes.

This package's ``__all__`` is the whole public API, for users and plugin authors alike: the
built-in plugins import from ``netshrink`` and nothing deeper (a contract checked in CI).

The names are resolved on first use (PEP 562), so ``import netshrink`` does not import torch and
``netshrink --help`` starts quickly; ``from netshrink import X`` and ``netshrink.X`` work as if
they were imported here, and type checkers read the ``TYPE_CHECKING`` block below.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netshrink import datasets
    from netshrink.adapters import ModelAdapter, ModelInfo, last_linear, model_info, set_model_info
    from netshrink.artifact import load, read_manifest
    from netshrink.attention import (
        AttentionGroup,
        AttentionHeads,
        attention_group,
        find_attention,
        update_heads,
    )
    from netshrink.compressor import (
        Capabilities,
        Compressor,
        CompressorConfig,
        LayerOption,
        LayerRecord,
        StepResult,
    )
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
        ExportError,
        ModelSpecError,
        NetshrinkError,
        RecipeError,
        SelectionError,
        StepError,
        UnknownNameError,
        WriteError,
    )
    from netshrink.executors import Executor, get_executor
    from netshrink.export import export_onnx, export_pt2
    from netshrink.fileio import atomic_write, cache_dir
    from netshrink.layer_search import option_bytes, search
    from netshrink.lowrank import (
        LowRank,
        rank_by_energy,
        rank_by_ratio,
        rank_by_vbmf,
        singular_values,
        truncated_svd,
    )
    from netshrink.metrics import wilson_interval
    from netshrink.models import load_model, reference_model
    from netshrink.modules import (
        INT8_INPUT_TYPES,
        failing_module,
        prune_or_put_back,
        replace_or_put_back,
        why_broken,
    )
    from netshrink.pipeline import CompressionResult, accuracy, compress, save
    from netshrink.recipe import Recipe, Step, step
    from netshrink.registry.hookspecs import hookimpl
    from netshrink.report import LayerRow, Report
    from netshrink.runtime import resident_bytes
    from netshrink.selector import LayerSelector
    from netshrink.timelimit import Deadline, deadline
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
    "INT8_INPUT_TYPES",
    "ArrayDataset",
    "ArtifactError",
    "AttentionGroup",
    "AttentionHeads",
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
    "Deadline",
    "Dense",
    "DuplicateNameError",
    "Encoding",
    "EncodingError",
    "EncodingTable",
    "Executor",
    "ExportError",
    "FinetuneConfig",
    "LayerOption",
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
    "StepError",
    "StepResult",
    "TrainState",
    "UnknownNameError",
    "WriteError",
    "__version__",
    "accuracy",
    "atomic_write",
    "attention_group",
    "cache_dir",
    "compress",
    "datasets",
    "deadline",
    "distillation_loss",
    "encode_values",
    "evaluate",
    "export_onnx",
    "export_pt2",
    "failing_module",
    "find_attention",
    "get_executor",
    "hookimpl",
    "last_linear",
    "load",
    "load_model",
    "model_info",
    "model_tensors",
    "option_bytes",
    "packed_nbytes",
    "prune_or_put_back",
    "rank_by_energy",
    "rank_by_ratio",
    "rank_by_vbmf",
    "read_manifest",
    "reference_model",
    "replace_or_put_back",
    "resident_bytes",
    "save",
    "search",
    "set_model_info",
    "singular_values",
    "step",
    "train",
    "truncated_svd",
    "update_heads",
    "why_broken",
    "wilson_interval",
]


#: Where each public name is defined: ``name -> module`` (a module itself when they are equal).
_EXPORTS: dict[str, str] = {
    "datasets": "netshrink.datasets",
    **dict.fromkeys(
        ["ModelAdapter", "ModelInfo", "last_linear", "model_info", "set_model_info"],
        "netshrink.adapters",
    ),
    **dict.fromkeys(["load", "read_manifest"], "netshrink.artifact"),
    **dict.fromkeys(
        ["AttentionGroup", "AttentionHeads", "attention_group", "find_attention", "update_heads"],
        "netshrink.attention",
    ),
    **dict.fromkeys(
        ["Capabilities", "Compressor", "CompressorConfig", "LayerOption", "LayerRecord",
         "StepResult"],
        "netshrink.compressor",
    ),
    "NetshrinkConfig": "netshrink.config",
    "CompressionContext": "netshrink.context",
    **dict.fromkeys(["ArrayDataset", "DataSplits"], "netshrink.data"),
    **dict.fromkeys(
        ["Codebook", "Dense", "Encoding", "EncodingTable", "Quantized", "Sparse",
         "encode_values", "model_tensors", "packed_nbytes"],
        "netshrink.encodings",
    ),
    **dict.fromkeys(
        ["ArtifactError", "ConfigError", "DataError", "DuplicateNameError", "EncodingError",
         "ExportError", "ModelSpecError", "NetshrinkError", "RecipeError", "SelectionError",
         "StepError", "UnknownNameError", "WriteError"],
        "netshrink.errors",
    ),
    **dict.fromkeys(["atomic_write", "cache_dir"], "netshrink.fileio"),
    **dict.fromkeys(
        ["LowRank", "rank_by_energy", "rank_by_ratio", "rank_by_vbmf", "singular_values",
         "truncated_svd"],
        "netshrink.lowrank",
    ),
    **dict.fromkeys(["load_model", "reference_model"], "netshrink.models"),
    **dict.fromkeys(["CompressionResult", "accuracy", "compress", "save"], "netshrink.pipeline"),
    **dict.fromkeys(["Recipe", "Step", "step"], "netshrink.recipe"),
    "hookimpl": "netshrink.registry.hookspecs",
    **dict.fromkeys(["LayerRow", "Report"], "netshrink.report"),
    "LayerSelector": "netshrink.selector",
    **dict.fromkeys(["Deadline", "deadline"], "netshrink.timelimit"),
    **dict.fromkeys(["INT8_INPUT_TYPES", "failing_module", "prune_or_put_back",
                    "replace_or_put_back", "why_broken"],
                    "netshrink.modules"),
    **dict.fromkeys(["export_onnx", "export_pt2"], "netshrink.export"),
    **dict.fromkeys(["Executor", "get_executor"], "netshrink.executors"),
    **dict.fromkeys(["option_bytes", "search"], "netshrink.layer_search"),
    "resident_bytes": "netshrink.runtime",
    "wilson_interval": "netshrink.metrics",
    **dict.fromkeys(
        ["CheckpointPolicy", "FinetuneConfig", "TrainState", "distillation_loss", "evaluate",
         "train"],
        "netshrink.training",
    ),
    "__version__": "netshrink.version",
}


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, ``netshrink.pipeline``) on first access."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")  # binds itself here as well
    module = importlib.import_module(module_name)
    value = module if module_name == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    """The public API and what is already bound (for completion and ``dir(netshrink)``)."""
    return sorted(set(globals()) | set(__all__))
