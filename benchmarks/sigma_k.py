"""Issue 16, paper 003: sigmaprune's threshold μ + kσ at the paper's k = 3 against the default
k = 2, on the fully connected layers (the paper's use), before and after a short fine-tune.

    NETSHRINK_THREADS=1 python -m benchmarks.sigma_k [--model lenet5@shapes32] [--seeds 3]

Rows: k in ``--k`` (default 2 3); "no fine-tune" is deterministic (one run); "+ ft" fine-tunes
``--epochs`` (default 1) at lr 1e-3 once per seed. The step's default selector: Linear
layers, the head protected. Prints a markdown table with
n and the 95% Wilson interval of the mean test accuracy.
"""

from __future__ import annotations

import argparse
import sys

import netshrink as ns
from benchmarks import harness as h


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sigma_k", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5@shapes32", choices=sorted(h.MODELS))
    parser.add_argument("--k", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    model, data = h.reference(args.model)
    n = len(data.test)
    rows = []
    for k in args.k:
        step = {"compressor": "sigmaprune", "config": {"k": k}}
        plain = h.compress(model, [step], data)
        removed = ", ".join(f"{r.name} {100 * r.details['sparsity']:.1f}%"
                            for r in plain.first.report.rows if "sparsity" in r.details)
        rows.append([f"{k:g}", "no fine-tune", f"{plain.first.report.compression_ratio:.2f}x",
                     h.acc_cell(plain.accs, n), removed or "—"])
        tuned = h.compress(model, [{**step, "finetune": {"epochs": args.epochs, "lr": 1e-3}}],
                           data, args.seeds)
        rows.append([f"{k:g}", f"+ {args.epochs} fine-tune epoch(s), {args.seeds} seeds",
                     f"{tuned.first.report.compression_ratio:.2f}x", h.acc_cell(tuned.accs, n),
                     "—"])
        print(f"k={k:g} done", file=sys.stderr, flush=True)
    spec, data_name, _ = h.MODELS[args.model]
    print(f"`python -m benchmarks.sigma_k {' '.join(sys.argv[1:])}` — {spec} on {data_name}, "
          f"dense test {100 * ns.accuracy(model, data):.2f}% (n={n})\n")
    print("\n".join(h.table(["k", "fine-tune", "storage ratio", "test acc [95% CI]",
                             "weights removed per layer"], rows)))


if __name__ == "__main__":
    main()
