"""Issue 16, paper 002: what do statprune and tucker each contribute? statprune alone, tucker
alone, statprune then tucker, and Torch-Pruning's MagnitudePruner at statprune's MACs, on the
convolutions of LeNet-5, all with the same short fine-tune; then a sweep of statprune's rate.

    NETSHRINK_THREADS=1 python -m benchmarks.statprune_ablation [--quick] [--seeds 3]

On the reference of ``--model`` (default ``lenet5@shapes32``: ``zoo:lenet5`` trained on
``shapes32``), every Conv2d selected (the layers the paper's LeNet-5 study prunes):

- **dense**: the reference, and the reference fine-tuned with the same budget as every other row
  (so the table shows what the extra epoch alone does);
- **statprune alone**: its default config, which is the paper's procedure (mean and variance
  per filter, k-means with 2 clusters, the weak cluster removed; floor 25% / 4 channels). The
  paper's abstract gives no per-layer rate for its LeNet-5 study, so the rate is what the
  clustering finds, not a number picked here;
- **tucker alone**: Tucker-2 at rank 0.5 (``method: ratio``) on the convs;
- **statprune then tucker**: both steps, tucker on the convs statprune left;
- **TP MagnitudePruner**: Torch-Pruning's L2 magnitude channel pruner (one uniform ratio over
  every layer but the head, so the hidden Linear too), the ratio bisected until its MACs match
  statprune alone's (seed 0), as on the ``statprune_tucker`` page (``macs`` and ``tp_at`` are
  reused from it).

Each compressed model (one compression per seed 0..``--seeds``-1) is evaluated as it comes out,
then fine-tuned ``--epochs`` (default 1) at lr 1e-3 with ``netshrink.train`` and the same seed:
the same loop, budget and seed for every row, TP's included. Like every netshrink fine-tune it
keeps the weights with the best validation accuracy, the incoming ones included, so "after" can
equal "before" when the epoch did not help on validation. MACs are Torch-Pruning's counter;
bytes are the netshrink artifact (dense and TP: fp32 weights, no artifact header); ratio =
dense fp32 bytes / bytes. Test accuracy: mean ± std over seeds and the 95% Wilson interval of
the mean on the n test images; two rows are called different only when their intervals do not
overlap (``harness.acc_compare``), else "equal within the 95% intervals".

The sweep varies statprune's clusters / dropped clusters on the same convs, without fine-tune
(seed 0), to show the rates statprune reaches on LeNet-5 and what each costs before recovery.

``--quick`` checks the script, not its figures: the first 2,000 train, 1,000 validation and
2,000 test images, 2 seeds (unless ``--seeds``), two sweep points.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import netshrink as ns
from benchmarks import harness as h
from benchmarks.__main__ import commit
from benchmarks.pages.statprune_tucker import macs, tp_at

CONVS = {"types": ["Conv2d"]}
STATPRUNE: dict[str, Any] = {"compressor": "statprune", "select": CONVS}
TUCKER: dict[str, Any] = {"compressor": "tucker", "select": CONVS,
                          "config": {"method": "ratio", "rank": 0.5}}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "statprune alone": [STATPRUNE],
    "tucker alone": [TUCKER],
    "statprune then tucker": [STATPRUNE, TUCKER],
}
#: (clusters, drop_clusters) of the rate sweep; (2, 1) is the default config.
SWEEP = [(2, 1), (3, 1), (3, 2), (4, 2), (4, 3)]
QUICK_SWEEP = [(2, 1), (3, 2)]
#: --quick: the first N images of each split.


@dataclasses.dataclass
class Row:
    """One variant: its size figures per seed and its test accuracies before/after fine-tune."""

    name: str
    params: list[int]
    macs: list[int]
    nbytes: list[int]
    before: list[float]
    after: list[float]


def finetuned_accuracy(model: nn.Module, data: ns.DataSplits, epochs: int, seed: int) -> float:
    """Test accuracy of a copy of ``model`` after ``epochs`` of fine-tuning at lr 1e-3."""
    work = copy.deepcopy(model)
    ns.train(work, data, ns.FinetuneConfig(epochs=epochs, lr=1e-3), seed=seed,
             desc=f"fine-tune seed {seed}")
    return ns.accuracy(work, data)


def compressed(name: str, dense: nn.Module, data: ns.DataSplits, steps: list[dict[str, Any]],
               seeds: int, epochs: int) -> Row:
    """``steps`` compressed once per seed, each result evaluated, then fine-tuned."""
    shape = tuple(data.input_shape)
    runs = h.compress(dense, steps, data, seeds)
    models = [r.model for r in runs.results]
    after = [finetuned_accuracy(m, data, epochs, seed) for seed, m in enumerate(models)]
    return Row(name, [h.params(m) for m in models], [macs(m, shape) for m in models],
               [r.report.storage_bytes for r in runs.results], runs.accs, after)


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as stored (fp32 here): no artifact header."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def fixed(name: str, model: nn.Module, data: ns.DataSplits, seeds: int, epochs: int) -> Row:
    """A model that needs no compression run (dense, TP): one evaluation, fine-tuned per seed."""
    shape = tuple(data.input_shape)
    after = [finetuned_accuracy(model, data, epochs, seed) for seed in range(seeds)]
    return Row(name, [h.params(model)], [macs(model, shape)], [fp32_bytes(model)],
               [ns.accuracy(model, data)], after)


def sweep(dense: nn.Module, data: ns.DataSplits, points: Sequence[tuple[int, int]]
          ) -> list[list[str]]:
    """statprune at each (clusters, drop_clusters) on the convs, seed 0, no fine-tune."""
    shape, dense_params, n = tuple(data.input_shape), h.params(dense), len(data.test)
    rows = []
    for clusters, drop in points:
        step = {**STATPRUNE, "config": {"clusters": clusters, "drop_clusters": drop}}
        run = h.compress(dense, [step], data).first
        layers = ", ".join(
            f"{r.name} {r.details['channels_before']}→{r.details['channels_after']}"
            for r in run.report.rows if "channels_after" in r.details)
        rows.append([f"{clusters} / {drop}", layers or "—",
                     f"{h.params(run.model):,} ({h.pct(h.params(run.model) / dense_params, 1)})",
                     f"{macs(run.model, shape) / 1e6:.2f}M",
                     h.acc_cell([run.report.accuracy_after], n)])
        print(f"sweep clusters={clusters} drop={drop} done", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.statprune_ablation",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5@shapes32", choices=sorted(h.MODELS))
    parser.add_argument("--seeds", type=int, default=None,
                        help="fine-tune / compression seeds 0..N-1 (default 3; --quick: 2)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="fine-tune epochs, the same for every row (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="data subsets, 2 seeds, 2 sweep points: checks the script only")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else 2 if args.quick else 3
    if seeds < 1:
        parser.error(f"--seeds must be at least 1, got {seeds}")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    h.set_threads()
    rev, t0 = commit(), time.perf_counter()
    dense, data = h.reference(args.model)
    if args.quick:
        data = h.subset(data, h.QUICK_SPLITS)
    dense.eval()
    shape, n = tuple(data.input_shape), len(data.test)

    rows = [fixed("dense", dense, data, seeds, args.epochs)]
    for name, steps in VARIANTS.items():
        rows.append(compressed(name, dense, data, steps, seeds, args.epochs))
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    target = rows[1].macs[0]
    tp_model, ratio = tp_at(dense, target, shape)
    rows.append(fixed(f"TP MagnitudePruner (ratio {ratio:.3f})", tp_model, data, seeds,
                      args.epochs))
    print(f"TP done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    sweep_rows = sweep(dense, data, QUICK_SWEEP if args.quick else SWEEP)

    dense_row, sp, tk, both, tp = rows
    dense_params, dense_bytes = dense_row.params[0], dense_row.nbytes[0]
    table = [[r.name, f"{h.span(r.params)} ({h.pct(statistics.fmean(r.params) / dense_params, 1)})",
              f"{h.span(r.macs, 1e6, '.2f')}M", f"{statistics.fmean(r.nbytes):,.0f}",
              f"{dense_bytes / statistics.fmean(r.nbytes):.2f}x", h.acc_cell(r.before, n),
              h.acc_cell(r.after, n), h.verdict(r.after, dense_row.before, n)]
             for r in rows]
    removed_both = dense_params - statistics.fmean(both.params)
    tucker_share = (statistics.fmean(sp.params) - statistics.fmean(both.params)) / removed_both
    verdicts = [
        f"- statprune alone against TP MagnitudePruner at the same MACs ({target / 1e6:.2f}M vs "
        f"{tp.macs[0] / 1e6:.2f}M), after fine-tune: {h.verdict(sp.after, tp.after, n)}.",
        f"- statprune then tucker against statprune alone, after fine-tune: "
        f"{h.verdict(both.after, sp.after, n)}; against tucker alone: "
        f"{h.verdict(both.after, tk.after, n)}.",
        f"- tucker's share of the parameters statprune then tucker removes: "
        f"{h.pct(tucker_share, 1)} (statprune's: {h.pct(1 - tucker_share, 1)}); on the "
        "shipped ResNet recipes tucker removes 85–91%.",
    ]

    spec, data_name, _ = h.MODELS[args.model]
    mode = (f" — quick mode (first {h.QUICK_SPLITS['train']:,} train / {h.QUICK_SPLITS['val']:,} "
            f"val / {h.QUICK_SPLITS['test']:,} test images): a check of the script, not its "
            "figures" if args.quick else "")
    load = os.getloadavg()[0]
    print(f"`python -m benchmarks.statprune_ablation {' '.join(sys.argv[1:])}` at commit `{rev}`"
          f"{mode}\n")
    print(f"{spec} on {data_name}, dense test {100 * dense_row.before[0]:.2f}% (n={n}); {seeds} "
          f"seed(s); fine-tune {args.epochs} epoch(s) at lr 1e-3 for every row, keeping the "
          "best weights on validation, the incoming ones included. Machine: "
          f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s); load average (1 min) {load:.2f} at the "
          f"end; wall {(time.perf_counter() - t0) / 60:.1f} min.\n")
    print("\n".join(h.table(
        ["variant", "params kept", "MACs (TP counter)", "bytes (mean)", "ratio",
         "test acc before fine-tune [95% CI]",
         f"test acc after {args.epochs} fine-tune epoch(s), {seeds} seed(s) [95% CI]",
         "after fine-tune vs dense reference"], table)))
    print("\n".join(verdicts) + "\n")
    print("statprune rate sweep on the convs (seed 0, no fine-tune; clusters / dropped "
          "clusters, floor 25% / 4 channels):\n")
    print("\n".join(h.table(["clusters / dropped", "channels kept", "params kept",
                             "MACs (TP counter)", "test acc, no fine-tune [95% CI]"],
                            sweep_rows)))


if __name__ == "__main__":
    main()
