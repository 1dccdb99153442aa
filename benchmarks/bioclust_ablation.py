"""Issue 16, paper 000: does bioclust's perturbation + selection carry its result, or would
plain k-means, or simply the best of N k-means restarts, do as well?

    NETSHRINK_THREADS=1 python -m benchmarks.bioclust_ablation [--bits 8 4] [--seeds 5] [--n 16]

On the reference of ``--model`` (default ``lenet5@shapes32``: ``zoo:lenet5`` on ``shapes32``),
every Conv2d and Linear layer (head included) clustered at ``--bits`` index bits, no fine-tune,
three variants per seed:

- **plain k-means**: ``noise_scale: 0`` (deterministic ``linear`` init; the seed only moves
  k-means' sample on large layers);
- **best of N restarts**: N plain k-means runs from ``init: random`` with seeds
  ``1000 * seed + i``, the one with the best accuracy on the first ``--eval-limit`` validation
  images kept: the same selection budget as the population, without perturbation;
- **perturbation + selection** (the paper): ``population: N``, ``keep_unperturbed: false``, so the
  kept model is the validation-best *perturbed* candidate, selected on the same images.

Test accuracy is on the whole test split: mean ± std over the seeds and the 95% Wilson interval
of the mean. Ratio = dense fp32 bytes / artifact bytes. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import netshrink as ns
from benchmarks import harness as h

SELECT = h.EVERYTHING


def _step(bits: int, **config: Any) -> list[dict[str, Any]]:
    return [{"compressor": "bioclust", "select": SELECT, "config": {"bits": bits, **config}}]


def _val(model: Any, data: ns.DataSplits, limit: int) -> float:
    return ns.evaluate(model, data.loader("val", batch_size=256, shuffle=False, limit=limit))


def _run(model: Any, data: ns.DataSplits, steps: list[dict[str, Any]], seed: int
         ) -> ns.CompressionResult:
    return ns.compress(model, steps, data, seed=seed, latency=False)


def variants(model: Any, data: ns.DataSplits, bits: int, seed: int, n: int, limit: int
             ) -> dict[str, tuple[float, int]]:
    """(test accuracy, artifact bytes) of each variant for one seed."""
    out = {}
    plain = _run(model, data, _step(bits, noise_scale=0.0), seed)
    out["plain k-means"] = (plain.report.accuracy_after, plain.report.storage_bytes)
    best, best_val = None, -1.0
    for i in range(n):
        run = _run(model, data, _step(bits, noise_scale=0.0, init="random"), 1000 * seed + i)
        val = _val(run.model, data, limit)
        if val > best_val:
            best, best_val = run, val
    assert best is not None
    out[f"best of {n} k-means restarts"] = (best.report.accuracy_after, best.report.storage_bytes)
    paper = _run(model, data, _step(bits, population=n, keep_unperturbed=False,
                                     eval_limit=limit), seed)
    out["perturbation + selection (paper)"] = (paper.report.accuracy_after,
                                               paper.report.storage_bytes)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bioclust_ablation",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5@shapes32", choices=sorted(h.MODELS))
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=16, help="restarts = population (default 16)")
    parser.add_argument("--eval-limit", type=int, default=2000,
                        help="validation images every selection uses (default 2000)")
    args = parser.parse_args(argv)
    model, data = h.reference(args.model)
    n_test = len(data.test)
    rows = []
    for bits in args.bits:
        per: dict[str, list[tuple[float, int]]] = {}
        t0 = time.time()
        for seed in range(args.seeds):
            for name, result in variants(model, data, bits, seed, args.n, args.eval_limit).items():
                per.setdefault(name, []).append(result)
            print(f"bits {bits} seed {seed} done ({time.time() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        for name, results in per.items():
            accs = [a for a, _ in results]
            size = statistics.fmean(b for _, b in results)
            rows.append([f"{bits}", name, f"{size:,.0f}", h.acc_cell(accs, n_test)])
    spec, data_name, _ = h.MODELS[args.model]
    print(f"`python -m benchmarks.bioclust_ablation {' '.join(sys.argv[1:])}` — {spec} on "
          f"{data_name}, dense test {100 * ns.accuracy(model, data):.2f}% (n={n_test}), "
          f"{args.seeds} seeds, N = {args.n}, selection on {args.eval_limit} validation images\n")
    print("\n".join(h.table(["index bits", "variant", "artifact bytes (mean)",
                             "test acc [95% CI]"], rows)))


if __name__ == "__main__":
    main()
