"""Page ``runtime``: bytes on disk, bytes in memory and latency of each way to run a model."""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import netshrink as ns
from benchmarks import harness as h

TITLE = "Run time: memory and latency of the packed runtime"
OUT = "benchmarks/runtime.md"
ABOUT = [
    "For each built-in method on each model: the artifact's bytes on disk; the bytes the loaded "
    "model holds (`netshrink.resident_bytes`: every distinct tensor storage); how much "
    "the resident set of a fresh process grows when it loads the artifact (after a warm-up "
    "load, packed before dense; the allocator may reuse freed pages, so small models can read "
    "near 0); and "
    "latency at batch 1 and 64 as dense latency / this latency. Variants: the dense decode "
    "(`netshrink.load(path)`), the packed runtime (`netshrink.load(path, runtime=\"packed\")`), "
    "the ONNX export (`netshrink.export_onnx`) run by onnxruntime (when onnxruntime is "
    "installed), and torchao's int8 / int4 weight-only quantization of the same uncompressed "
    "model (when torchao is installed). All timings of a model are interleaved in one run "
    "(`torch.utils.benchmark`; rounds alternate between the variants), so background load hits "
    "all of them alike; the bracket is the lowest and highest round. No fine-tuning: this page "
    "is about size and speed, not accuracy.",
]

#: Models (keys of harness.MODELS) and methods; quick mode keeps the first model and three
#: methods. The CNNs use the hard shapes32 references (the same 32x32 inputs as digits32, so
#: the same latencies, and accuracies on n = 10,000); the MLP stays on digits28 (on shapes32 it
#: reaches only 65.5%, below the band, docs/datasets.md).
MODELS = ("lenet300", "lenet5@shapes32", "vgg_small@shapes32")
METHODS: dict[str, list[dict[str, Any]]] = {
    "quantize 8-bit": [{"compressor": "quantize", "config": {"bits": 8}}],
    "quantize 4-bit": [{"compressor": "quantize", "config": {"bits": 4}}],
    "magnitude 90%": [{"compressor": "magnitude", "config": {"sparsity": 0.9}}],
    "magnitude 90% + q8": [{"compressor": "magnitude", "config": {"sparsity": 0.9}},
                           {"compressor": "quantize", "config": {"bits": 8}}],
    "bioclust": [{"compressor": "bioclust"}],
    "svd": [{"compressor": "svd"}],
}
QUICK_METHODS = ("quantize 8-bit", "quantize 4-bit", "magnitude 90%")


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every compression the page runs."""
    models = MODELS[:1] if quick else MODELS
    methods = QUICK_METHODS if quick else tuple(METHODS)
    return {f"{m} / {k}": (m, METHODS[k]) for m in models for k in methods}


class _Onnx(nn.Module):
    """An onnxruntime session behind ``nn.Module``'s call, for the shared timer."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def _onnx(path: Path) -> tuple[nn.Module | None, str]:
    try:
        out = ns.export_onnx(path, path.with_suffix(".onnx"))
        return _Onnx(out), ""
    except Exception as exc:  # a refused export is a finding of the page
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}"


def _torchao(model: nn.Module, kind: str) -> tuple[nn.Module | None, str]:
    """torchao weight-only quantization of the Linear layers: int8, or int4 in groups of 32
    (``PrototypeInt4WeightOnlyConfig``, the layout torchao 0.18 runs on CPU; a Linear layer it
    cannot pack stays fp32 and the note says how many were packed)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None, "torchao not installed (pip install netshrink[peers])"
    model = copy.deepcopy(model).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        if kind == "int8":
            quantize_(model, Int8WeightOnlyConfig())
        else:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            def packable(module: nn.Module, fqn: str) -> bool:
                return (isinstance(module, nn.Linear) and module.in_features % 32 == 0
                        and module.out_features % 16 == 0)

            quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=32), filter_fn=packable)
        with torch.inference_mode():
            model(torch.zeros(1, *ns.model_info(model).input_shape))
    except Exception as exc:
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}"
    packed = sum(type(m.weight) is not nn.Parameter for m in linears)
    if not packed:
        return None, f"no Linear layer it can pack ({len(linears)} Linear)"
    return model, ""


def _rss() -> int:
    """This process's resident set size now, in bytes (Linux ``/proc/self/statm``)."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load_rss(path: str) -> dict[str, Any]:
    """In a fresh process: how much the resident set grows when ``path`` is loaded, packed and
    then dense (after a warm-up load, so imports and first-use allocations do not count)."""
    import gc

    import netshrink as ns

    ns.load(path, runtime="packed")
    out: dict[str, Any] = {}
    for runtime in ("packed", "dense"):  # packed first: the dense load cannot reuse its pages
        gc.collect()
        before = _rss()
        model = ns.load(path, runtime=runtime)
        gc.collect()
        out[runtime] = _rss() - before
        del model
    return out


def _kb(n: int | float) -> str:
    return f"{n / 1024:,.1f}"


def run(b: h.Bench) -> list[str]:
    """One table per model; then the targets of issue 15 checked in words."""
    resident_bytes = ns.resident_bytes
    body: list[str] = []
    findings: list[str] = []
    by_model = h.cases_by_model(cases(b.quick))
    work = Path(tempfile.mkdtemp(dir=b.tmp))
    for model_key, methods in by_model.items():
        model, data = h.reference(model_key)
        example, _ = data.batch("test", 1)
        dense_bytes = resident_bytes(model)
        variants: dict[str, nn.Module] = {}
        rows: list[list[Any]] = []
        notes: list[str] = []
        for kind in ("int8", "int4"):
            peer, why = _torchao(model, kind)
            if peer is None:
                notes.append(f"torchao {kind}: {why}")
            else:
                variants[f"torchao {kind} weight-only"] = peer
        sizes: dict[str, tuple[int, int, float, float]] = {}
        onnx_bytes: dict[str, int] = {}
        for name, steps in methods:
            print(f"{model_key}: {name}", file=sys.stderr, flush=True)
            result = ns.compress(model, steps, data=data, latency=False)
            path = result.save(work / f"{model_key}-{len(sizes)}.nsk", report=False)
            variants[f"{name}: dense decode"] = ns.load(path)
            packed = ns.load(path, runtime="packed")
            variants[f"{name}: packed"] = packed
            rss = h.isolated(_load_rss, str(path), timeout=300)
            sizes[name] = (path.stat().st_size, resident_bytes(packed),
                           rss.get("dense", float("nan")), rss.get("packed", float("nan")))
            onnx, why = _onnx(path)
            if onnx is None:
                notes.append(f"{name}: ONNX: {why}")
            else:
                variants[f"{name}: onnxruntime"] = onnx
                onnx_bytes[name] = path.with_suffix(".onnx").stat().st_size
        speed = h.speedups(model, variants, example, rounds=3 if b.quick else 7,
                           min_time=0.02 if b.quick else 0.1)
        rows.append(["dense fp32 (the reference)", "-", _kb(dense_bytes), "1.00x", "1.00x"])
        for label, spreads in speed.items():
            name = label.split(": ")[0]
            disk, resident = "-", "-"
            if label.endswith(": packed"):
                disk, resident = _kb(sizes[name][0]), _kb(sizes[name][1])
            elif label.endswith(": dense decode"):
                disk, resident = _kb(sizes[name][0]), _kb(dense_bytes)
            elif label.endswith(": onnxruntime"):
                disk = _kb(onnx_bytes[name])
            elif label.startswith("torchao"):
                resident = _kb(resident_bytes(variants[label]))
            rows.append([label, disk, resident, str(spreads[1]), str(spreads[64])])
        body += [f"## {model_key} ({ns.model_info(model).spec}, {data.name})", ""]
        body += h.table(["variant", "disk (KiB)", "resident (KiB)", "speedup batch 1",
                         "speedup batch 64"], rows)
        body += h.table(["method", "RSS growth on load, dense decode (KiB)",
                         "RSS growth on load, packed (KiB)"],
                        [[n, _kb(s[2]), _kb(s[3])] for n, s in sizes.items()])
        if notes:
            body += ["Not measured: " + "; ".join(notes) + ".", ""]
        findings += _targets(model_key, speed)
    body += ["## Targets", "", *(findings or ["No target applies to the models of this run."]),
             "", _cpu_note(), ""]
    return body


def _cpu_note() -> str:
    """What the CPU offers the int8 kernels (the likely reason a weight-only target is missed)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh
                          if line.startswith("flags")), [])
    except OSError:
        return "CPU features: unknown (no /proc/cpuinfo)."
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    have = [f for f in wanted if f in flags]
    missing = [f for f in wanted if f not in flags]
    return (f"CPU features for int8 kernels: has {', '.join(have) or 'none of them'}; lacks "
            f"{', '.join(missing) or 'none'}. The likely reason for a missed target (not "
            "measured separately): without VNNI or AMX, torch's weight-only int8 / int4 "
            "kernels have no int8 dot-product instructions and convert codes to float on the "
            "fly, so on layers this small they cost more than the fp32 matmul they replace; "
            "CSR at batch 1 likewise pays its index overhead on a layer that fits in cache.")


def _targets(model_key: str, speed: dict[str, dict[int, h.Spread]]) -> list[str]:
    """Issue 15's targets, in words: int8 weight-only faster than dense at batch 1 on the
    Linear-only model; a >= 90% sparse Linear model faster than dense at batch 1."""
    out = []
    if model_key != "lenet300":  # the Linear-only model (LeNet-300-100)
        return out
    for label, target in (("quantize 8-bit: packed", "int8 weight-only Linear model"),
                          ("magnitude 90%: packed", "90%-sparse Linear model (CSR)")):
        s = speed.get(label, {}).get(1)
        if s is None:
            continue
        if s.low > 1:
            verdict = f"met: {s} faster than dense at batch 1 in every round"
        elif s.high < 1:
            verdict = f"**missed**: {s}, slower than dense at batch 1 in every round"
        else:
            verdict = f"not settled: {s} straddles 1 across rounds"
        out.append(f"- {target} ({model_key}): {verdict}.")
    return out
