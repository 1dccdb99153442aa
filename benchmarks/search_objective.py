"""Issue 17: what the search minimises. For each single-method recipe of the search page (one
compressor, one setting on every layer, no fine-tune), ``netshrink.search`` runs at that
recipe's artifact size twice on one shared scan: with ``objective="kl"`` (the default: the KL
divergence of the model's predictions from the reference's) and with ``objective="loss"``
(the increase of the labels' cross-entropy, the search's objective before). Everything else is
the default (``verify`` on, the default option grids, 512 validation samples, no fine-tune).

    NETSHRINK_THREADS=1 python -m benchmarks.search_objective [--model lenet5@shapes32]
        [--recipes "quantize 8-bit,magnitude 95%"]

Nothing here is random (the recipes, the scan and plain k-means are deterministic), so one run
per row. Test accuracy with the 95% Wilson interval on the n test images; 'kl vs loss' and
'kl vs recipe' compare the intervals (``harness.acc_compare``: 'indistinguishable' when they
overlap). Prints a markdown table with the command, the commit and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import netshrink as ns
from benchmarks import harness as h
from benchmarks.__main__ import commit
from benchmarks.pages.search import SINGLE


def main(argv: list[str] | None = None) -> list[str]:
    """Run the comparison and print (and return) the markdown lines."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search_objective",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5@shapes32", choices=sorted(h.MODELS))
    parser.add_argument("--recipes", default=",".join(SINGLE),
                        help="comma-separated names of the search page's single-method recipes "
                             "(default: all seven)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SINGLE]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; known: {', '.join(SINGLE)}")
    h.set_threads()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    model, data = h.reference(args.model)
    n = len(data.test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, h.fresh_cache(Path(tmp)):
        table = None
        for name in names:
            single = h.compress(model, [SINGLE[name]], data)
            size = single.first.report.storage_bytes
            found = {}
            for objective in ("kl", "loss"):
                print(f"{args.model}: {name}, objective {objective}", file=sys.stderr,
                      flush=True)
                found[objective] = ns.search(model, data, size, sensitivity=table,
                                             objective=objective)
                table = found[objective].sensitivity
            kl, loss = (found[o].result.report.accuracy_after for o in ("kl", "loss"))
            rows.append([
                name, f"{size:,}", single.acc(),
                f"{found['kl'].artifact_bytes:,}", h.acc_cell([kl], n),
                f"{found['loss'].artifact_bytes:,}", h.acc_cell([loss], n),
                h.acc_compare([kl], [loss], n), h.acc_compare([kl], single.accs, n),
            ])
    lines = [
        f"`NETSHRINK_THREADS={os.environ.get('NETSHRINK_THREADS', '')} python -m "
        f"benchmarks.search_objective {' '.join(sys.argv[1:])}` at commit `{commit()}`: "
        f"{args.model}, n={n} test images; {platform.machine()}, {os.cpu_count()} cores, load "
        f"average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"{(time.perf_counter() - t0) / 60:.1f} min.", "",
        *h.table(["single-method recipe", "its bytes", "its test acc [95% CI]",
                  "kl: searched bytes", "kl: test acc [95% CI]",
                  "loss: searched bytes", "loss: test acc [95% CI]",
                  "kl vs loss", "kl vs recipe"], rows),
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
