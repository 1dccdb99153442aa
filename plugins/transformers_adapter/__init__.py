"""``hf:<preset>`` and ``hf:./folder`` model adapter: Hugging Face ``transformers`` sequence
classifiers, built from a config (random init) or loaded from a local ``save_pretrained`` folder.
Nothing is downloaded, nothing is unpickled, no remote code runs.

- ``hf:bert-tiny``, ``hf:gpt2-tiny``, ``hf:llama-tiny``: 2 layers, hidden 64, 2 heads; options
  ``layers``, ``hidden``, ``heads``, ``intermediate``, ``vocab``, ``seq_len``, ``num_classes``
  or any field of the family's config (``hf:gpt2-tiny?layers=4&attn_pdrop=0``). ``hf:bert``,
  ``hf:gpt2``, ``hf:llama`` start from transformers' default sizes instead.
- ``hf:./folder`` or ``hf:/abs/folder`` (a name with a ``/``): ``config.json`` +
  ``model.safetensors`` written by ``save_pretrained``.

The model takes token ids ``(batch, seq)`` (int64; id 0 is padding) and returns classification
logits ``(batch, num_classes)``; GPT-2 and Llama classify from the last non-padding token.
GPT-2's ``Conv1D`` layers become equal ``nn.Linear`` layers, so every method that handles
``Linear`` handles them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from netshrink import ModelAdapter, ModelInfo, ModelSpecError, hookimpl, last_linear

from .families import (
    FAMILIES,
    PRESETS,
    Family,
    SequenceClassifier,
    as_options,
    build_config,
    positive_int,
    replace_conv1d,
)

__all__ = ["TransformersAdapter"]


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelSpecError(
            "transformers is not installed: pip install 'netshrink[transformers]'"
        ) from None


def _sequence_length(spec: str, opts: dict[str, Any]) -> int | None:
    """``seq_len``, or ``in_chans``: what ``DataSplits.model_options()`` passes for 1-D data
    (the length of a sequence sample)."""
    in_chans = opts.pop("in_chans", None)
    seq_len = opts.pop("seq_len", None)
    if in_chans is not None:
        in_chans = positive_int(spec, "in_chans", in_chans)
        if seq_len is not None and int(seq_len) != in_chans:
            raise ModelSpecError(
                f"{spec}: seq_len={seq_len} but the data's samples are {in_chans} tokens long"
            )
        seq_len = in_chans
    return None if seq_len is None else positive_int(spec, "seq_len", seq_len)


def _float32() -> dict[str, Any]:
    """``from_pretrained``'s keyword for loading in float32 (``dtype`` since transformers 5,
    ``torch_dtype`` before), whatever dtype the folder was saved in."""
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def _wrap(hf_model: nn.Module) -> SequenceClassifier:
    replace_conv1d(hf_model)
    model = SequenceClassifier(hf_model)
    model.eval()
    return model


class TransformersAdapter(ModelAdapter):
    """Hugging Face sequence classifiers: ``hf:gpt2-tiny?num_classes=4&seq_len=24``,
    ``hf:bert-tiny?layers=4``, ``hf:./my-saved-model``."""

    prefix = "hf"
    description = "transformers sequence classifiers from a config preset or a local folder"

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        _require_transformers()
        if "/" in name:
            return self._load_folder(name, dict(options))
        if name not in PRESETS:
            raise ModelSpecError(
                f"hf:{name}: no such preset; presets: {', '.join(PRESETS)}; a local "
                "save_pretrained folder is written with a '/': hf:./NAME or hf:/path/NAME"
            )
        family_name, defaults = PRESETS[name]
        family = FAMILIES[family_name]
        spec = f"hf:{name}"
        opts = dict(options)
        seq_len = _sequence_length(spec, opts)  # before the preset's default length
        opts = {**defaults, **opts}
        if seq_len is not None:
            opts["seq_len"] = seq_len
        num_classes = positive_int(spec, "num_classes", opts.pop("num_classes", 2))
        config = build_config(family, spec, opts, num_classes)
        model = self._build(family, spec, config)
        return model, self._info(spec, {**opts, "num_classes": num_classes}, config, family, model)

    @staticmethod
    def _build(family: Family, spec: str, config: Any) -> SequenceClassifier:
        _, model_class = family.classes()
        try:
            hf_model = model_class(config)
        except Exception as exc:
            raise ModelSpecError(f"{spec}: cannot build the model: {exc}") from None
        return _wrap(hf_model)

    @staticmethod
    def _info(
        spec: str, options: dict[str, Any], config: Any, family: Family, model: nn.Module
    ) -> ModelInfo:
        seq_len = int(getattr(config, family.keys["seq_len"]))
        options = {**options, "seq_len": seq_len}
        return ModelInfo(
            spec=spec,
            options=options,
            input_shape=(seq_len,),
            num_classes=int(config.num_labels),
            head=last_linear(model),
            input_dtype="int64",
        )

    def _load_folder(self, name: str, opts: dict[str, Any]) -> tuple[nn.Module, ModelInfo]:
        """A ``save_pretrained`` folder: safetensors weights only, a supported family only."""
        from transformers import AutoConfig

        spec = f"hf:{name}"
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelSpecError(f"{spec}: not a save_pretrained folder (no config.json there)")
        if not any(folder.glob("*.safetensors")):
            raise ModelSpecError(
                f"{spec}: no *.safetensors weights in the folder; netshrink never unpickles "
                "(pytorch_model.bin): save with model.save_pretrained(folder) (safetensors "
                "is its default)"
            )
        try:
            config = AutoConfig.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            raise ModelSpecError(f"{spec}: cannot read config.json: {exc}") from None
        family = FAMILIES.get(getattr(config, "model_type", None))
        if family is None:
            raise ModelSpecError(
                f"{spec}: model_type {getattr(config, 'model_type', None)!r} is not supported; "
                f"supported: {', '.join(FAMILIES)}"
            )
        seq_len = _sequence_length(spec, opts)
        num_classes = opts.pop("num_classes", None)
        if opts:
            raise ModelSpecError(
                f"{spec}: options {sorted(opts)} do not apply to a saved model (only "
                "num_classes and seq_len, which must match it)"
            )
        if num_classes is not None and int(num_classes) != config.num_labels:
            raise ModelSpecError(
                f"{spec}: the saved model has {config.num_labels} classes, not "
                f"num_classes={num_classes}"
            )
        max_len = int(getattr(config, family.keys["seq_len"]))
        if seq_len is not None and seq_len > max_len:
            raise ModelSpecError(
                f"{spec}: sequences of {seq_len} tokens are longer than the model's "
                f"{max_len} positions"
            )
        _, model_class = family.classes()
        try:
            hf_model = model_class.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True,
                trust_remote_code=False, **_float32(),
            )
        except Exception as exc:
            raise ModelSpecError(f"{spec}: cannot load the weights: {exc}") from None
        model = _wrap(hf_model)
        options = as_options(family, hf_model.config)
        if options is None:  # not expressible as options: the folder stays the spec
            info = self._info(spec, {}, config, family, model)
            if seq_len is not None:
                info.options["seq_len"] = seq_len
        else:  # the architecture as data: an artifact rebuilds it without the folder
            options["num_classes"] = int(config.num_labels)
            info = self._info(f"hf:{family.model_type}", options, config, family, model)
            del info.options["seq_len"]  # the positions are among the options
        if seq_len is not None:
            info.input_shape = (seq_len,)
        return model, info

    def names(self) -> list[str]:
        """The preset names."""
        return list(PRESETS)


@hookimpl
def register_model_adapters(register):
    register(TransformersAdapter())
