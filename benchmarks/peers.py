"""Peers a user would pick instead of netshrink, each at its best: a curve over its own main
knob, with the same fine-tune budget as netshrink's rows. A point's size is the bytes of the
file the peer's own docs tell a user to save (written to a temporary folder and stat-ed); its
notes say what reloading needs. A peer that fails is a point carrying its error, never a crash.

The libraries are an optional extra (``pip install netshrink[peers]``: torchao, nncf,
aimet-torch, torch-pruning); a missing one is a "not installed" point.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import netshrink as ns

INSTALL = "pip install netshrink[peers]"
LR = 1e-3  # the fine-tune learning rate of every row, netshrink's and the peers'


class Point(NamedTuple):
    """One point of a peer curve; a failed or missing peer has ``bytes == 0`` and a NaN
    accuracy, its reason in ``notes``."""

    label: str
    model: nn.Module | None
    bytes: int
    accuracy: float
    notes: str

    @property
    def ok(self) -> bool:
        """Whether the point was measured (not an error or a missing library)."""
        return self.bytes > 0 and not math.isnan(self.accuracy)


def failed(label: str, exc: BaseException) -> Point:
    """The point of a peer that raised: its error type and the first line of its message."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return Point(label, None, 0, math.nan, f"failed: {type(exc).__name__}: {first}")


def missing(label: str, library: str) -> Point:
    """The point of a peer whose library is not installed."""
    return Point(label, None, 0, math.nan, f"{library} not installed ({INSTALL})")


# -- what every peer shares ---------------------------------------------------------------------


def file_bytes(obj: Any, name: str = "model.pt") -> int:
    """Bytes of ``torch.save(obj)`` written to a temporary file."""
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        path = Path(tmp) / name
        torch.save(obj, path)
        return path.stat().st_size


def _head(model: nn.Module) -> set[nn.Module]:
    """The classifier head (the adapter's, else the last Linear): every peer keeps it whole."""
    info = ns.model_info(model)
    name = info.head if info and info.head else ns.last_linear(model)
    return {model.get_submodule(name)} if name else set()


def _layers(model: nn.Module, head: bool = True) -> list[nn.Module]:
    """Conv2d and Linear layers (without the classifier head when ``head`` is False)."""
    skip = set() if head else _head(model)
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in skip]


def _example(data: ns.DataSplits) -> torch.Tensor:
    return data.batch("val", 1)[0]


def _calibration(data: ns.DataSplits, samples: int, batch: int = 32) -> list[torch.Tensor]:
    """Input batches from the val split, ``samples`` inputs in all."""
    return [x for x, _ in data.loader("val", batch_size=batch, shuffle=False, limit=samples)]


def _quiet_nncf() -> None:
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)


def _finetune(model: nn.Module, data: ns.DataSplits, epochs: int, seed: int, desc: str) -> None:
    if epochs > 0:
        ns.train(model, data, ns.FinetuneConfig(epochs=epochs, lr=LR), seed=seed, desc=desc)


def _point(label: str, model: nn.Module, data: ns.DataSplits, size: int, notes: str,
           keep: bool = True) -> Point:
    model.eval()
    return Point(label, model if keep else None, size, ns.accuracy(model, data), notes)


# -- the peers: one function per knob value, returning its point --------------------------------

Knob = Any
PeerFn = Callable[[str, nn.Module, ns.DataSplits, int, Knob, int, bool], Point]


def torchao_weight_only(label: str, model: nn.Module, data: ns.DataSplits, epochs: int,
                        knob: Knob, seed: int, quick: bool) -> Point:
    """torchao ``quantize_`` weight-only (Linear layers): ``"int8"`` (Int8WeightOnlyConfig) or
    ``"int4-gN"`` (int4 groups of N, CPU tinygemm layout of PrototypeInt4WeightOnlyConfig: the
    layout 0.18 runs on CPU; layers it cannot pack, N∤in or 16∤out, stay fp32)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(model).eval()
    if knob == "int8":
        quantize_(model, Int8WeightOnlyConfig())
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        group = int(str(knob).split("-g")[1])

        def packable(module: nn.Module, fqn: str) -> bool:
            return (isinstance(module, nn.Linear) and module.in_features % group == 0
                    and module.out_features % 16 == 0)

        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group), filter_fn=packable)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    packed = sum(type(m.weight) is not nn.Parameter for m in linears)  # now a torchao tensor
    # torchao's docs: torch.save(model.state_dict()) of its tensor subclasses.
    return _point(label, model, data, file_bytes(model.state_dict()),
                  f"{packed} of {len(linears)} Linear quantized, convs fp32; state_dict of "
                  "torchao tensor subclasses: reload needs torchao + the original class")


def nncf_weights(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
                 seed: int, quick: bool) -> Point:
    """``nncf.compress_weights``: ``"INT8_ASYM"`` (per channel) or ``"INT4_SYM-gN"`` (groups
    of N, ``-g-1`` per channel; NNCF's default backup keeps the last layer int8), with
    ``+gptq`` / ``+scale_estimation`` / ``+awq`` appended to turn on those data-aware
    algorithms (e.g. ``"INT4_SYM-g-1+gptq+scale_estimation"``)."""
    import nncf

    _quiet_nncf()
    spec, *flags = str(knob).split("+")
    mode, _, group = spec.partition("-g")
    options: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode)}
    if group:
        options.update(group_size=int(group), ratio=1.0)
    options.update({flag: True for flag in flags})
    dataset = nncf.Dataset(_calibration(data, 64))  # the torch backend traces with it
    compressed = nncf.compress_weights(copy.deepcopy(model).eval(), dataset=dataset, **options)
    # get_config cannot describe weight decompressors, so the state dict is what can be saved.
    return _point(label, compressed, data, file_bytes(compressed.state_dict()),
                  "state_dict (uint8 weights + fp16 scales): reload needs nncf + the original "
                  "class (re-apply compress_weights, then load_state_dict)")


def nncf_ptq(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
             seed: int, quick: bool) -> Point:
    """``nncf.quantize`` int8 post-training quantization, calibrated on ``knob`` val samples,
    then ``nncf.strip(..., StripFormat.DQ)`` so weights are stored as int8."""
    import nncf
    import nncf.torch

    # Its fake-quant ops are a C++ extension built (then loaded) on first use: minutes on a
    # busy 2-core machine, past NNCF's 60 s default.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    _quiet_nncf()
    dataset = nncf.Dataset(_calibration(data, int(knob), batch=1))  # subset_size counts items
    quantized = nncf.quantize(copy.deepcopy(model).eval(), dataset, subset_size=int(knob))
    notes = "checkpoint {state_dict, nncf_config}: reload needs nncf + the original class"
    try:
        stripped = nncf.strip(quantized, do_copy=True, strip_format=nncf.StripFormat.DQ)
        size = file_bytes(stripped.state_dict())
        notes = ("state_dict after strip(DQ) (int8 weights): reload needs nncf + the original "
                 "class")
    except Exception as exc:  # e.g. its default overflow fix: the checkpoint its docs save
        stripped, why = quantized, failed(label, exc).notes.removeprefix("failed: ")
        size = file_bytes({"state_dict": quantized.state_dict(),
                           "nncf_config": nncf.torch.get_config(quantized)})
        notes = (f"fp32 weights + fake-quant (strip(DQ) refused: {why}; int8 only after an "
                 f"OpenVINO export); {notes}")
    return _point(label, stripped, data, size, notes)


def _timm_linear(module: nn.Module) -> bool:
    return type(module).__module__ == "timm.layers.linear" and type(module).__name__ == "Linear"


def torch_linears(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` with every timm ``Linear`` (a ``torch.nn.Linear`` subclass whose eager forward
    is ``F.linear``, the same as torch's) replaced by a ``torch.nn.Linear`` holding the same
    parameters, and how many were replaced. AIMET refuses module classes it has no quantized
    definition for (``UnknownModuleError``), and timm MobileNetV3's classifier is one; a user
    swaps it, or registers a definition as AIMET's error message says."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _timm_linear(child):
                plain = nn.Linear(child.in_features, child.out_features,
                                  bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
                swapped += 1
    return model, swapped


#: Activation bits of every AIMET point (AIMET's W·A16 setting). The page compares bytes on
#: disk, which only the weight bits set; netshrink's rows and the other weight peers keep float
#: activations. At AIMET's default 8 bits, activation ranges calibrated on 512 images cost timm
#: MobileNetV3 on shapes64 29 pp at 8-bit weights (QuantSim 57.36% on its peers page at 4c16ff8,
#: 86.62% at 16 bits at 4a1b279; dense 86.54%), which says nothing about weight compression.
AIMET_ACTIVATION_BITS = 16


def _aimet_sim(model: nn.Module, data: ns.DataSplits, bits: int, quick: bool) -> Any:
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    return QuantizationSimModel(model, dummy_input=_example(data),
                                quant_scheme=QuantScheme.post_training_tf_enhanced,
                                default_param_bw=bits, default_output_bw=AIMET_ACTIVATION_BITS)


def _aimet_calibrate(sim: Any, data: ns.DataSplits, quick: bool) -> None:
    batches = _calibration(data, 64 if quick else 512)

    def forward(model: nn.Module, _: Any = None) -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    sim.compute_encodings(forward)


def theoretical_bytes(model: nn.Module, bits: int) -> int:
    """bits × weight parameters of every Conv2d/Linear / 8 + 4 bytes × every other tensor of
    the state dict: the size an integer export would have (QuantSim itself keeps fp32)."""
    weights = {id(m.weight) for m in _layers(model)}
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        total += math.ceil(t.numel() * bits / 8) if id(t) in weights else t.numel() * 4
    return total


AIMET_NOTES = ("theoretical (bits × params; QuantSim saves fp32 weights + an encodings JSON): "
               f"reload needs aimet + the original class; {AIMET_ACTIVATION_BITS}-bit "
               "activations")


def _aimet_notes(swapped: int) -> str:
    return AIMET_NOTES + (f"; {swapped} timm Linear swapped for torch.nn.Linear (same weights) "
                          "first, as AIMET refuses unregistered module classes" if swapped else "")


def aimet_quantsim(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
                   seed: int, quick: bool) -> Point:
    """AIMET QuantSim (tf_enhanced, :data:`AIMET_ACTIVATION_BITS`-bit activations) with
    ``knob``-bit weights."""
    plain, swapped = torch_linears(copy.deepcopy(model).eval())
    sim = _aimet_sim(plain, data, int(knob), quick)
    _aimet_calibrate(sim, data, quick)
    return _point(label, sim.model, data, theoretical_bytes(model, int(knob)),
                  _aimet_notes(swapped), keep=False)


def aimet_adaround(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
                   seed: int, quick: bool) -> Point:
    """AIMET AdaRound (``knob``-bit weights) frozen into a QuantSim, as AIMET's docs chain
    them; fewer iterations than AIMET's 10k default (2 CPU cores)."""
    from aimet_torch.adaround import Adaround, AdaroundParameters

    loader = data.loader("val", batch_size=32, shuffle=False, limit=64 if quick else 512)
    params = AdaroundParameters(data_loader=loader, num_batches=len(loader),
                                default_num_iterations=10 if quick else 1000)
    with tempfile.TemporaryDirectory(prefix="adaround-") as tmp:
        plain, swapped = torch_linears(copy.deepcopy(model).eval())
        rounded = Adaround.apply_adaround(plain, _example(data), params,
                                          path=tmp, filename_prefix="peer",
                                          default_param_bw=int(knob))
        sim = _aimet_sim(rounded, data, int(knob), quick)
        sim.set_and_freeze_param_encodings(encoding_path=os.path.join(tmp, "peer.encodings"))
        _aimet_calibrate(sim, data, quick)
    return _point(label, sim.model, data, theoretical_bytes(model, int(knob)),
                  _aimet_notes(swapped), keep=False)


def torch_pruning(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
                  seed: int, quick: bool) -> Point:
    """Torch-Pruning MagnitudePruner (L2 group importance) removing ``knob`` of the channels
    (head kept), then the same fine-tune."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        model, _example(data), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=float(knob), ignored_layers=list(_head(model)))
    pruner.step()
    _finetune(model, data, epochs, seed, "torch-pruning fine-tune")
    # Torch-Pruning's docs save the whole pruned module: the shapes changed.
    return _point(label, model, data, file_bytes(model),
                  "torch.save(model): reload needs pickle + the original class")


def sparse_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each Conv2d/Linear weight as CSR (int32 indices; conv weights
    flattened to 2-D) when that is smaller than dense, as a careful user would save it."""
    layers = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    out = {}
    for key, t in model.state_dict().items():
        if key in layers:
            csr = t.detach().flatten(1).to_sparse_csr()
            csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(),
                                          csr.values(), csr.shape, check_invariants=True)
            if 4 * csr.values().numel() + 4 * (csr.values().numel() + t.shape[0] + 1) \
                    < 4 * t.numel():
                out[key] = csr
                continue
        out[key] = t
    return out


def torch_prune(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
                seed: int, quick: bool) -> Point:
    """``torch.nn.utils.prune`` global L1 unstructured at sparsity ``knob`` (head kept),
    fine-tuned with the masks, ``prune.remove``, saved as CSR tensors."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    params = [(m, "weight") for m in _layers(model, head=False)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(knob))
    _finetune(model, data, epochs, seed, "torch.prune fine-tune")
    for module, name in params:
        prune.remove(module, name)
    return _point(label, model, data, file_bytes(sparse_state(model)),
                  "state_dict with CSR weights: reload with torch alone (weights_only), "
                  "to_dense + reshape, and the original class")


def torch_dynamic(label: str, model: nn.Module, data: ns.DataSplits, epochs: int, knob: Knob,
                  seed: int, quick: bool) -> Point:
    """PyTorch dynamic int8 quantization (Linear only; convs stay fp32); no fine-tune."""
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear},
                                                    dtype=torch.qint8)
    return _point(label, qmodel, data, file_bytes(qmodel.state_dict()),
                  "state_dict of packed int8 Linear: reload needs pickle + the original class "
                  "re-quantized")


@dataclass(frozen=True)
class Peer:
    """A peer curve: its library (import name), knob, values (full and quick), function."""

    library: str
    knob: str
    values: tuple[Knob, ...]
    quick_values: tuple[Knob, ...]
    fn: PeerFn
    finetunes: bool = False  # whether it trains (then it runs once per seed)


PEERS: dict[str, Peer] = {
    "torchao weight-only": Peer("torchao", "weights", ("int8", "int4-g128", "int4-g64",
                                                       "int4-g32"), ("int8", "int4-g32"),
                                torchao_weight_only),
    # INT4 per channel (g-1) too: groups need in_features divisible by the group size, which
    # LeNet-5's fc1 (1,250 inputs) is not.
    "NNCF compress_weights": Peer("nncf", "mode", ("INT8_ASYM", "INT4_SYM-g-1", "INT4_SYM-g128",
                                                   "INT4_SYM-g64", "INT4_SYM-g32"),
                                  ("INT8_ASYM", "INT4_SYM-g32"), nncf_weights),
    "NNCF int8 PTQ": Peer("nncf", "calibration samples", (300,), (64,), nncf_ptq),
    "AIMET QuantSim": Peer("aimet_torch", "weight bits", (8, 6, 4), (8, 4), aimet_quantsim),
    "AIMET AdaRound": Peer("aimet_torch", "weight bits", (8, 4), (4,), aimet_adaround),
    "Torch-Pruning": Peer("torch_pruning", "channel ratio", (0.3, 0.5, 0.7), (0.5,),
                          torch_pruning, finetunes=True),
    "torch.nn.utils.prune": Peer("torch", "sparsity", (0.5, 0.7, 0.9, 0.95), (0.9,),
                                 torch_prune, finetunes=True),
    "PyTorch dynamic int8": Peer("torch", "layers", ("Linear",), ("Linear",), torch_dynamic),
}


def label(name: str, knob: Knob) -> str:
    """A point's label: the peer and its knob value."""
    return f"{name} ({PEERS[name].knob} {knob})"


def curve(name: str, model: nn.Module, data: ns.DataSplits, epochs: int, *, quick: bool = False,
          seed: int = 0, values: Sequence[Knob] | None = None) -> list[Point]:
    """Every point of peer ``name`` (its full or quick knob values, or ``values``); a missing
    library or a failing point becomes a point with its reason, never an exception."""
    peer = PEERS[name]
    knobs = tuple(values) if values is not None else peer.quick_values if quick else peer.values
    if importlib.util.find_spec(peer.library) is None:
        return [missing(label(name, k), peer.library) for k in knobs]
    points = []
    for knob in knobs:
        try:
            points.append(peer.fn(label(name, knob), model, data, epochs, knob, seed, quick))
        except Exception as exc:  # a failing peer is a row, not a crash
            points.append(failed(label(name, knob), exc))
    return points


#: The single peer points the overview pages (``smoke_digits``, ``overview_<model>``) show:
#: label -> (peer, knob).
OVERVIEW: dict[str, tuple[str, Knob]] = {
    "torch.nn.utils.prune (global L1 90%, CSR)": ("torch.nn.utils.prune", 0.9),
    "PyTorch dynamic int8": ("PyTorch dynamic int8", "Linear"),
    "Torch-Pruning magnitude (50% channels)": ("Torch-Pruning", 0.5),
}


def single(overview_label: str, model: nn.Module, data: ns.DataSplits,
           epochs: int) -> tuple[nn.Module, int]:
    """One :data:`OVERVIEW` point as (model, bytes on disk); raises ``RuntimeError`` with the
    peer's reason when it failed or its library is missing."""
    name, knob = OVERVIEW[overview_label]
    (point,) = curve(name, model, data, epochs, values=[knob])
    if not point.ok or point.model is None:
        raise RuntimeError(point.notes)
    return point.model, point.bytes
