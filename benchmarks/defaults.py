"""Every registered compressor with its *default* config on zoo:lenet5 / digits28: wall time,
honest ratio and accuracy. DESIGN.md promises each default finishes in under two minutes on 2
CPU cores; this measures it (one process, one method after another).

    python -m benchmarks.defaults [--out docs/benchmarks/defaults.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import netshrink as ns
from netshrink.registry import compressors

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "defaults.md"))
    args = parser.parse_args()
    threads = os.environ.get("NETSHRINK_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    data = ns.datasets.load("digits28")
    model = ns.reference_model("zoo:lenet5", data)
    lines = [
        "# Default configs on LeNet-5 / digits28",
        "",
        f"Produced by `{'NETSHRINK_THREADS=' + threads + ' ' if threads else ''}python -m benchmarks.defaults` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC, {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}. Each "
        "compressor runs with its default config and default selector (the head protected), "
        "without fine-tuning. Budget: 120 s each.",
        "",
        "| compressor | wall (s) | within 2 min | ratio | test acc | Δ acc (pp) |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(compressors()):
        print(f"{name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = ns.compress(model, [ns.step(name)], data=data, latency=False)
        except Exception as exc:  # a failing default is a finding, not a crash of the page
            lines.append(f"| {name} | - | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |")
            continue
        wall = time.perf_counter() - t0
        rep = result.report
        lines.append(
            f"| {name} | {wall:.1f} | {'yes' if wall < 120 else '**no**'} | {rep.compression_ratio:.2f}x "
            f"| {100 * rep.accuracy_after:.2f}% | {100 * rep.accuracy_delta:+.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
