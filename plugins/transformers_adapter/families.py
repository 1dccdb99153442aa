"""Model families, presets and the module that turns a Hugging Face model into a classifier
netshrink can compress: token ids ``(batch, seq)`` in, logits ``(batch, num_classes)`` out."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netshrink import ModelSpecError

PAD_TOKEN = 0
"""Token id 0 is padding for every model this adapter builds (sequence data never uses it)."""

MAX_PARAMS = 2**30
"""Models built from a config are refused above this many parameters (an estimate made before
anything is allocated): a spec, or an artifact's options, must not exhaust memory."""

#: Short option names shared by every family: alias -> the family's config key.
ALIASES = ("layers", "hidden", "heads", "intermediate", "vocab", "seq_len")

#: Config keys never taken from options: bookkeeping, or settings that change what is loaded.
_NOT_OPTIONS = {
    "self", "kwargs", "transformers_version", "architectures", "id2label", "label2id",
    "dtype", "torch_dtype", "return_dict", "output_hidden_states", "output_attentions",
    "num_labels", "problem_type", "is_decoder", "add_cross_attention", "is_encoder_decoder",
    "use_cache", "tie_word_embeddings", "chunk_size_feed_forward", "auto_map",
}


@dataclass(frozen=True)
class Family:
    """One supported architecture: its config and model classes and option aliases."""

    model_type: str
    config_class: str
    model_class: str
    keys: dict[str, str]  # alias -> config key
    extra: dict[str, Any] = field(default_factory=dict)  # fixed config settings

    def classes(self) -> tuple[Any, Any]:
        """The transformers config and model classes."""
        import transformers

        return getattr(transformers, self.config_class), getattr(transformers, self.model_class)

    def config_keys(self) -> set[str]:
        """Config keys an option may set directly (the config class's own parameters)."""
        config_class, _ = self.classes()
        params = inspect.signature(config_class.__init__).parameters
        return {k for k in params if k not in _NOT_OPTIONS}


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "bert", "BertConfig", "BertForSequenceClassification",
        {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
         "intermediate": "intermediate_size", "vocab": "vocab_size",
         "seq_len": "max_position_embeddings"},
    ),
    "gpt2": Family(
        "gpt2", "GPT2Config", "GPT2ForSequenceClassification",
        {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "intermediate": "n_inner",
         "vocab": "vocab_size", "seq_len": "n_positions"},
        {"bos_token_id": None, "eos_token_id": None},
    ),
    "llama": Family(
        "llama", "LlamaConfig", "LlamaForSequenceClassification",
        {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
         "intermediate": "intermediate_size", "vocab": "vocab_size",
         "seq_len": "max_position_embeddings"},
        {"bos_token_id": None, "eos_token_id": None},
    ),
}

_TINY = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 32, "seq_len": 64}

#: Small presets, name -> (family, default options); a family name alone is the HF default size.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-tiny": ("bert", _TINY),
    "gpt2-tiny": ("gpt2", _TINY),
    "llama-tiny": ("llama", _TINY),
    **{name: (name, {}) for name in FAMILIES},
}


class SequenceClassifier(nn.Module):
    """A Hugging Face ``*ForSequenceClassification`` model as a plain classifier: ``forward``
    takes token ids ``(batch, seq)`` (0 is padding and is masked) and returns the logits.

    BERT pools the first token; GPT-2 and Llama classify from the last non-padding token
    (``transformers``' own heads, ``hf.classifier`` / ``hf.score``)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for token ids ``(batch, seq)``."""
        if input_ids.is_floating_point():
            raise TypeError(
                f"expects integer token ids, got {input_ids.dtype}; sequence data holds int64"
            )
        mask = (input_ids != PAD_TOKEN).long()
        return self.hf(input_ids=input_ids, attention_mask=mask).logits


def linear_from_conv1d(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what ``transformers``' GPT-style ``Conv1D`` computes (its
    weight is stored transposed), so compressors that handle ``Linear`` handle GPT-2 too."""
    nx, nf = module.weight.shape
    linear = nn.Linear(nx, nf, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def replace_conv1d(model: nn.Module) -> int:
    """Replace every ``transformers`` ``Conv1D`` in ``model`` with an equal ``nn.Linear``;
    returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear_from_conv1d(module))
    return len(targets)


def estimate_params(sizes: dict[str, int]) -> int:
    """A rough parameter count from the alias sizes (embeddings + per-layer attention and MLP),
    used to refuse absurd configs before any memory is allocated."""
    hidden = sizes["hidden"]
    intermediate = sizes.get("intermediate") or 4 * hidden
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    return (sizes["vocab"] + sizes["seq_len"]) * hidden + sizes["layers"] * per_layer


def build_config(family: Family, spec: str, options: dict[str, Any], num_classes: int) -> Any:
    """The family's config from alias and config-key options; checks sizes before building."""
    config_class, _ = family.classes()
    allowed = family.config_keys()
    values: dict[str, Any] = {}
    for key, value in options.items():
        target = family.keys.get(key, key)
        if target not in allowed:
            raise ModelSpecError(
                f"{spec}: unknown option {key!r}; valid: num_classes, {', '.join(ALIASES)}, "
                f"or a {family.config_class} field ({', '.join(sorted(allowed)[:12])}, ...)"
            )
        if isinstance(value, (dict, list)):
            raise ModelSpecError(f"{spec}: option {key!r} must be a single value, got {value!r}")
        values[target] = value
    defaults = config_class()
    sizes = {
        alias: values.get(key, getattr(defaults, key, None)) for alias, key in family.keys.items()
    }
    for alias in ("layers", "hidden", "heads", "vocab", "seq_len"):
        size = sizes[alias]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ModelSpecError(f"{spec}: {alias} must be a positive integer, got {size!r}")
    if sizes["hidden"] % sizes["heads"]:
        raise ModelSpecError(
            f"{spec}: hidden={sizes['hidden']} is not divisible by heads={sizes['heads']}"
        )
    count = estimate_params(sizes)
    if count > MAX_PARAMS:
        raise ModelSpecError(
            f"{spec}: about {count:.3g} parameters, more than the {MAX_PARAMS:.3g} a model built "
            "from a config may have; use smaller sizes, or load a local folder (hf:./folder)"
        )
    values.update({**family.extra, "pad_token_id": PAD_TOKEN, "num_labels": num_classes})
    try:
        return config_class(**values)
    except Exception as exc:  # transformers validates in its own ways
        raise ModelSpecError(f"{spec}: invalid config: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def positive_int(spec: str, key: str, value: Any) -> int:
    """``value`` as a positive int, or a :class:`ModelSpecError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"{spec}: {key} must be a positive integer, got {value!r}")
    return value


_OPTION_INT = 2**16  # what an artifact's options may hold (netshrink.manifest's OptionValue)


def _storable(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) <= _OPTION_INT
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= 256


def as_options(family: Family, config: Any) -> dict[str, Any] | None:
    """Options that rebuild ``config`` exactly from ``hf:<family>`` (the config fields that
    differ from the family's defaults, by their own names), or None if some field cannot be
    an option (a nested value, a value too large) or the rebuilt config differs."""
    config_class, _ = family.classes()
    defaults = config_class()
    keys = sorted(family.config_keys())
    options = {
        key: getattr(config, key)
        for key in keys
        if hasattr(config, key) and getattr(config, key) != getattr(defaults, key, None)
    }
    options.pop("pad_token_id", None)  # set by build_config
    for key in family.extra:
        options.pop(key, None)
    if len(options) > 28 or not all(_storable(v) for v in options.values()):
        return None
    try:
        rebuilt = build_config(family, f"hf:{family.model_type}", options, config.num_labels)
    except ModelSpecError:
        return None
    same = all(getattr(rebuilt, k, None) == getattr(config, k, None) for k in keys)
    return options if same else None
