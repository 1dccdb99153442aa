"""Run one method on one model in this process and print a JSON result line.

``python -m benchmarks.run_one MODEL LABEL [--quick]`` (LABEL from benchmarks.catalogue, a
peer name, or ``dense``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import netshrink as ns
from benchmarks import catalogue, peers
from netshrink.metrics import compare_latency
from netshrink.training import evaluate


def main(argv: list[str]) -> dict:
    if os.environ.get("NETSHRINK_THREADS"):
        torch.set_num_threads(int(os.environ["NETSHRINK_THREADS"]))
    model_name, label = argv[0], argv[1]
    quick = "--quick" in argv
    spec, data_name = catalogue.MODELS[model_name]
    data = ns.datasets.load(data_name)
    reference = ns.reference_model(spec, data, epochs=8 if spec.startswith("timm:") else None)
    test = data.loader("test", batch_size=256, shuffle=False)
    example = data.val.tensors[0][:1]
    dense_acc = evaluate(reference, test)
    dense_bytes = sum(t.numel() * 4 for t in reference.state_dict().values())
    row = {"model": model_name, "method": label, "dense_acc": dense_acc, "dense_bytes": dense_bytes}
    t0 = time.perf_counter()
    if label == "dense":
        compressed, size, family = reference, dense_bytes, "dense"
    elif label in peers.PEERS:
        compressed, size = peers.PEERS[label](reference, data)
        family = "peer"
    else:
        steps = catalogue.netshrink_methods(model_name, quick)[label]
        result = ns.compress(reference, steps, data=data, latency=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = result.save(Path(tmp) / "m.nsk", report=False)
            size = path.stat().st_size
            assert size == result.report.storage_bytes, "report and file disagree"
        compressed, family = result.model, "netshrink"
    wall = time.perf_counter() - t0
    lat = compare_latency(reference, compressed, example)
    row.update(
        family=family,
        acc=evaluate(compressed, test),
        bytes=size,
        ratio=dense_bytes / size,
        wall_s=round(wall, 2),
        speedup_b1=lat["batch1"]["speedup"],
        speedup_b64=lat["batch64"]["speedup"],
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    return row


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1:])))
