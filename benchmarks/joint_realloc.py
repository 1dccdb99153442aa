"""Issue 16, paper 004: does re-allocating each layer's sparsity and bit-width during joint
training beat allocating them once, before training, at the same file budget?

    NETSHRINK_THREADS=1 python -m benchmarks.joint_realloc [--quick] [--seeds 3]

On the reference of ``--model`` (default ``lenet5@shapes32``: ``zoo:lenet5`` trained on
``shapes32``), one ``joint`` step over every Conv2d and Linear (head included,
``protect_head: false``) at the LeNet-5 target of the ``joint`` benchmark page (``TARGETS`` in
``benchmarks/pages/joint.py``: target_ratio 100, min_bits 3; ``--target-ratio`` changes the
ratio), with that page's training (lr 2e-3, batch 32, distillation from the dense model),
``--epochs`` (default 2) for both rows:

- **allocate once**: ``reallocate: 0`` (the default), the allocation made before training;
- **re-allocate**: ``reallocate: --reallocate`` (default 3): the sensitivity is measured again
  on the partly trained, masked, fake-quantized model at evenly spaced points of the sparsity
  ramp, and the knapsack re-run under the same byte budget.

Each row is compressed once per seed 0..``--seeds``-1. Sizes:

- **file bytes / file ratio**: the whole artifact (header, manifest, biases, every tensor), dense
  fp32 bytes of all tensors / file bytes: what netshrink reports;
- **weights-only ratio**, as the paper counts compression: dense fp32 bytes of the ``.weight``
  tensors of the selected layers (4 bytes each) / their stored payload bytes (sparse indices,
  packed codes, scales). Biases, the manifest and the header are not counted.

Test accuracy: mean ± std over seeds and the 95% Wilson interval of the mean on the n test
images; the two rows are called different only when their intervals do not overlap
(``harness.acc_compare``), else "equal within the 95% intervals". The per-layer table shows how
the allocation moved in the seed-0 re-allocation run (step 0: before training).

``--quick`` checks the script, not its figures: the first 2,000 train, 1,000 validation and
2,000 test images, 1 seed (unless ``--seeds``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

import netshrink as ns
from benchmarks import harness as h
from benchmarks.__main__ import commit
from benchmarks.pages.joint import TARGETS


def steps(ratio: float, epochs: int, reallocate: int) -> list[dict[str, Any]]:
    """The one ``joint`` step of a row."""
    extra = TARGETS["lenet5"][4]
    config = {"target_ratio": ratio, **extra, "epochs": epochs, "lr": 2e-3, "batch_size": 32,
              "distill": True, "reallocate": reallocate}
    return [{"compressor": "joint", "select": {"protect_head": False}, "config": config}]


def weight_ratio(result: ns.CompressionResult) -> float:
    """Dense fp32 bytes of the selected layers' weights / their stored payload bytes."""
    dense = stored = 0
    for record in result.records:
        enc = result.encodings[f"{record.name}.weight"]
        dense += 4 * enc.numel
        stored += enc.payload_bytes
    return dense / stored


def history(record: ns.LayerRecord) -> str:
    """``sparsity/bits`` of each allocation, in order, with the step it was made after."""
    return " → ".join(f"{100 * e['sparsity']:g}%/{e['bits']}b@{e['step']}"
                      for e in record.details["allocation_history"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.joint_realloc",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5@shapes32", choices=sorted(h.MODELS))
    parser.add_argument("--seeds", type=int, default=None,
                        help="compression seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="joint training epochs, the same for both rows (default 2)")
    parser.add_argument("--reallocate", type=int, default=3,
                        help="re-allocations of the re-allocate row (default 3)")
    parser.add_argument("--target-ratio", type=float, default=TARGETS["lenet5"][0],
                        help=f"joint target_ratio (default {TARGETS['lenet5'][0]})")
    parser.add_argument("--quick", action="store_true",
                        help="data subsets, 1 seed: checks the script only")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else 1 if args.quick else 3
    if seeds < 1:
        parser.error(f"--seeds must be at least 1, got {seeds}")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1 (re-allocation happens while training), got "
                     f"{args.epochs}")
    if args.reallocate < 1:
        parser.error(f"--reallocate must be at least 1, got {args.reallocate}")
    h.set_threads()
    rev, t0 = commit(), time.perf_counter()
    dense, data = h.reference(args.model)
    if args.quick:
        data = h.subset(data, h.QUICK_SPLITS)
    n = len(data.test)

    runs: dict[str, h.Runs] = {}
    for label, count in (("allocate once", 0), (f"re-allocate ×{args.reallocate}",
                                                 args.reallocate)):
        runs[label] = h.compress(dense, steps(args.target_ratio, args.epochs, count), data, seeds)
        print(f"{label} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    rows = []
    for label, r in runs.items():
        sizes = [x.report.storage_bytes for x in r.results]
        rows.append([label, h.span(sizes), f"{r.mean(lambda x: x.report.compression_ratio):.1f}x",
                     f"{r.mean(weight_ratio):.1f}x", r.acc(), f"{r.wall:.0f}"])
    once, again = runs.values()
    realloc = again.first
    at = realloc.report.steps[0]["reallocated_at_steps"]
    layers = [[rec.name, f"{rec.params_before:,}",
               f"{100 * o.details['target_sparsity']:g}%/{o.details['bits']}b",
               history(rec), h.pct(rec.details["sparsity"]), f"{rec.details['weight_bytes']:,}"]
              for rec, o in zip(realloc.records, once.first.records, strict=True)]
    rep = once.first.report

    spec, data_name, _ = h.MODELS[args.model]
    mode = (f" — quick mode (first {h.QUICK_SPLITS['train']:,} train / {h.QUICK_SPLITS['val']:,} "
            f"val / {h.QUICK_SPLITS['test']:,} test images): a check of the script, not its "
            "figures" if args.quick else "")
    load = os.getloadavg()[0]
    print(f"`python -m benchmarks.joint_realloc {' '.join(sys.argv[1:])}` at commit `{rev}`"
          f"{mode}\n")
    print(f"{spec} on {data_name}, dense {rep.dense_bytes:,} bytes fp32, test "
          f"{100 * rep.accuracy_before:.2f}% (n={n}); joint target_ratio {args.target_ratio:g}"
          + "".join(f", {k} {v}" for k, v in TARGETS["lenet5"][4].items())
          + f", {args.epochs} epoch(s), lr 2e-3, batch 32, distillation; {seeds} seed(s). "
          f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch thread(s); load average "
          f"(1 min) {load:.2f} at the end; wall {(time.perf_counter() - t0) / 60:.1f} min.\n")
    print("\n".join(h.table(
        ["allocation", "file bytes", "file ratio (mean)", "weights-only ratio (mean)",
         f"test acc, {seeds} seed(s) [95% CI]", "wall per seed (s)"], rows)))
    print(f"- re-allocate against allocate once: {h.verdict(again.accs, once.accs, n)} "
          f"(mean {100 * (statistics.fmean(again.accs) - statistics.fmean(once.accs)):+.2f} "
          "points).\n")
    print(f"Per-layer allocation, seed 0 (sparsity/bits@step; re-allocated after steps {at}):\n")
    print("\n".join(h.table(["layer", "params", "allocate once", "re-allocate: history",
                             "re-allocate: stored sparsity", "re-allocate: weight bytes"],
                            layers)))


if __name__ == "__main__":
    main()
