"""How hard a dataset is for one model: train it and print val/test accuracy after every epoch.

    NETSHRINK_THREADS=1 python -m benchmarks.shapes_difficulty SPEC DATA ref[:EPOCHS]
        netshrink.reference_model(SPEC, DATA[, epochs=EPOCHS]): the exact reference recipe
        (cached, so the benchmark pages reuse the model it trains)
    NETSHRINK_THREADS=1 python -m benchmarks.shapes_difficulty SPEC DATA EPOCHS
        the reference optimiser and schedule (Adam 1e-3, cosine over EPOCHS, batch 64, seed 0),
        printing test accuracy after every epoch so a long run can be stopped early

Accuracies are printed with n and a 95% Wilson interval. This produced the table under
"How hard it is" in docs/datasets.md.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import netshrink as ns
from benchmarks.harness import wilson


def _acc(model: torch.nn.Module, data: ns.DataSplits, split: str) -> str:
    acc = ns.evaluate(model, data.loader(split, 256, shuffle=False))
    n = len(getattr(data, split))
    lo, hi = wilson(acc, n)
    return f"{split}={acc:.4f} (n={n}, 95% CI {lo:.4f}-{hi:.4f})"


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit(__doc__)
    spec, data_name, epochs = argv
    torch.set_num_threads(1)
    t0 = time.time()
    data = ns.datasets.load(data_name)
    print(f"data {data} loaded in {time.time() - t0:.1f}s", flush=True)
    if epochs.split(":")[0] == "ref":
        ref_epochs = int(epochs.split(":")[1]) if ":" in epochs else None
        model = ns.reference_model(spec, data, epochs=ref_epochs)
    else:
        n = int(epochs)
        torch.manual_seed(0)
        model = ns.load_model(spec, **data.model_options())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n)
        for epoch in range(n):
            t = time.time()
            model.train()
            for x, y in data.loader("train", batch_size=64, seed=0):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            print(f"{spec} epoch {epoch + 1}/{n} {_acc(model, data, 'val')} "
                  f"{_acc(model, data, 'test')} {time.time() - t:.0f}s", flush=True)
    print(f"FINAL {spec} {data.name} epochs={epochs} {_acc(model, data, 'val')} "
          f"{_acc(model, data, 'test')} total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
