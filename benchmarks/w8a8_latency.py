"""Latency of the W8A8 ONNX export against the fp32 ONNX export in onnxruntime, batch 64.

    NETSHRINK_THREADS=1 python -m benchmarks.w8a8_latency [SPEC] [DATA] [EPOCHS] [THREADS] [SKIP_FIRST]

Defaults: ``zoo:vgg_small`` on ``shapes32``, its reference trained for 5 epochs
(``netshrink.reference_model(SPEC, DATA, epochs=5)``, cached; 0 = the reference recipe's own
epochs), one thread, ``activation_skip_first`` 1. The reference is compressed with `quantize`
``bits: 8, activations: int8``. Both files run in onnxruntime with the settings
``netshrink.export.ort_session`` uses, timed with `torch.utils.benchmark` (5 ×
``blocked_autorange(min_run_time=2)`` each, alternating files), and top-1 is measured on the
whole test split for both ONNX files and the simulated W8A8 model, with n and a 95% Wilson
interval. The figures in docs/export.md come from this script.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

import netshrink as ns
from benchmarks.harness import wilson

#: As netshrink.export's onnxruntime session (see docs/export.md).
EXACT = {"session.qdq_matmulnbits_accuracy_level": "1"}
DISABLED = ["QDQPropagationTransformer"]


def main(
    spec: str = "zoo:vgg_small",
    data_name: str = "shapes32",
    epochs: int = 5,
    threads: int = 1,
    skip_first: int = 1,
) -> None:
    import onnxruntime as ort

    data = ns.datasets.load(data_name)
    model = ns.reference_model(spec, data, epochs=epochs or None)
    step = {
        "compressor": "quantize",
        "config": {"bits": 8, "activations": "int8", "activation_skip_first": skip_first},
    }
    w8a8 = ns.compress(model, [step], data, latency=False)
    test_x = torch.cat([b for b, _ in data.loader("test", 256, False)]).numpy()
    test_y = torch.cat([y for _, y in data.loader("test", 256, False)]).numpy()
    x = np.random.default_rng(0).standard_normal((64, *test_x.shape[1:])).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ns.save(model, Path(tmp) / "fp32.nsk")
        w8a8.save(Path(tmp) / "w8a8.nsk", report=False)
        sessions = {}
        for name in ("fp32", "w8a8"):
            path = ns.export_onnx(Path(tmp) / f"{name}.nsk", Path(tmp) / f"{name}.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = threads
            for key, value in EXACT.items():
                opts.add_session_config_entry(key, value)
            sessions[name] = ort.InferenceSession(
                str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED
            )
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(5):  # alternate the files, so background load hits both alike
            for name, sess in sessions.items():
                feed = {sess.get_inputs()[0].name: x}
                timer = benchmark.Timer(
                    "sess.run(None, feed)", globals={"sess": sess, "feed": feed}
                )
                times[name].append(timer.blocked_autorange(min_run_time=2.0).median * 1e3)
        for name, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: test_x}
            top1 = float((sess.run(None, feed)[0].argmax(1) == test_y).mean())
            ms = times[name]
            print(
                f"{name}: top-1 {_acc(top1, len(test_y))}; ms per batch of 64, median of 5 "
                f"runs {statistics.median(ms):.3f} (min {min(ms):.3f}, max {max(ms):.3f})"
            )
    ratios = [a / b for a, b in zip(times["fp32"], times["w8a8"])]
    print(
        f"{spec} on {data.name}: dense top-1 {_acc(w8a8.report.accuracy_before, len(test_y))}, "
        f"simulated W8A8 top-1 {_acc(w8a8.report.accuracy_after, len(test_y))}; speed-up fp32/w8a8: median "
        f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x over "
        f"alternating rounds), threads={threads}"
    )


def _acc(p: float, n: int) -> str:
    lo, hi = wilson(p, n)
    return f"{p:.4f} (n={n}, 95% CI {lo:.4f}-{hi:.4f})"


if __name__ == "__main__":
    args = sys.argv[1:6]
    main(*args[:2], *(int(a) for a in args[2:]))
