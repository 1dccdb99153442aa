"""Issue 17: how long ``netshrink.search`` takes with its default settings, from a cold start
(no scan checkpoint), and how much of it is the scan: the same search is run again on the first
one's scan table, and the scan's share is the difference.

    NETSHRINK_THREADS=1 python -m benchmarks.search_time [--model vgg_small@shapes32]
        [--budget 8x] [--executor local|process] [--workers N]

The reference is the harness's cached model (trained before the clock starts). The scan uses
every compressor that offers per-layer options, on the first 512 validation images (the
defaults); ``--executor process --workers 2`` spreads it over two processes. Prints one
markdown table row per phase with wall and CPU seconds, and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time

import torch

import netshrink as ns
from benchmarks import harness as h
from benchmarks.__main__ import commit


def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    return sum(sum(resource.getrusage(who)[:2])
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg_small@shapes32", choices=sorted(h.MODELS))
    parser.add_argument("--budget", default="8x")
    parser.add_argument("--executor", default="local", choices=["local", "process"])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    threads = int(os.environ.get("NETSHRINK_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    model, data = h.reference(args.model)  # before the clock and the fresh cache
    with tempfile.TemporaryDirectory() as tmp, h.fresh_cache(tmp):
        t0, c0 = time.perf_counter(), _cpu()
        first = ns.search(model, data, args.budget, executor=args.executor, workers=args.workers)
        t1, c1 = time.perf_counter(), _cpu()
        table = first.sensitivity
        found = ns.search(model, data, args.budget, sensitivity=table)
        t2, c2 = time.perf_counter(), _cpu()
    report = first.result.report
    spec, data_name, _ = h.MODELS[args.model]
    print(f"`NETSHRINK_THREADS={threads} python -m benchmarks.search_time "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}` at commit `{commit()}`; "
          f"{spec} on {data_name}; {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{threads} torch thread(s), load average (1 min) {os.getloadavg()[0]:.2f} at the end\n")
    rest, rest_cpu = t2 - t1, c2 - c1
    rows = [
        ["search, cold start (the figure)", f"budget {args.budget}; artifact "
         f"{first.artifact_bytes:,} B ({report.compression_ratio:.1f}x), test "
         f"{h.acc_cell([report.accuracy_after], len(data.test))}", f"{t1 - t0:.0f}",
         f"{c1 - c0:.0f}"],
        ["of which the scan (cold start − rerun)",
         f"{len(table.rows())} candidates on {table.n_val} validation images",
         f"{t1 - t0 - rest:.0f}", f"{c1 - c0 - rest_cpu:.0f}"],
        ["rerun on the same scan: solve, measure plans whole, compress",
         f"{len(found.measured_plans)} plans measured", f"{rest:.0f}", f"{rest_cpu:.0f}"],
    ]
    print("\n".join(h.table(["phase", "what", "wall (s)", "CPU (s)"], rows)))


if __name__ == "__main__":
    main()
