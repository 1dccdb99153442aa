"""Benchmark of ``bioclust`` (paper 000): clustering + seeded perturbation + selection.

    python -m benchmarks.bench_bioclust [--quick]     # writes docs/benchmarks/bioclust.md

One run measures the issue's "must show" items:

1. LeNet-5 / digits28 and the small ResNet / digits32 with the shipped recipes: honest
   compression ratio (artifact bytes) and test accuracy against the dense model; the artifact is
   saved, loaded and checked bit for bit.
2. The population: validation *and test* accuracy of each of the 16 random reconstructions
   (mean ± std, min, best) against the candidate selected on validation — i.e. is selection
   better than a single random reconstruction?
3. Same data, same run: plain k-means weight sharing (no perturbation, its own artifact) — does
   the perturbation + selection help?
4. Stress regimes: no protection of the sensitive ResNet stem (always), 2-bit LeNet-5 (full run
   only): the plain reconstruction loses accuracy; does selection recover some of it?
5. timm resnet18 (in_chans=1, 32x32): compresses, saves, loads, runs.

Candidates' test accuracies come from rebuilding each candidate (its per-layer seeds and scales,
recorded in the step summary) on the same clustering; the rebuild of the chosen candidate is
checked to reproduce the compressed model exactly.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, model_info
from netshrink.plugins.bioclust import Bioclust, BioclustConfig, Candidate
from netshrink.plugins.bioclust.search import apply, cluster_targets

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "bioclust.md"
EVERYTHING = {"protect_head": False}



def _recipe_config(name: str) -> dict[str, Any]:
    """The bioclust config of a shipped recipe (so the benchmark measures exactly those)."""
    recipe = ns.Recipe.from_file(ROOT / "recipes" / name)
    return dict(recipe.steps[0].config)


LENET5 = _recipe_config("bioclust_lenet5.yaml")
RESNET = _recipe_config("bioclust_resnet_small.yaml")
RESNET18 = _recipe_config("bioclust_resnet18.yaml")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return _pct(values[0]) if values else "—"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.pstdev(values):.2f}"


def _save_load(result, tmp: Path, name: str) -> dict[str, Any]:
    path = result.save(tmp / f"{name}.nsk", report=False)
    size = path.stat().st_size
    loaded = ns.load(path)
    expected = result.model.state_dict()
    exact = all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    return {"file_bytes": size, "bit_exact": exact, "loaded": loaded}


def _candidates_on_test(reference, data, config: dict[str, Any], summary: dict[str, Any],
                        compressed, seed: int) -> dict[str, Any]:
    """Rebuild the unperturbed and every recorded candidate on the same clustering and measure
    their test accuracy; check the chosen one reproduces ``compressed`` exactly."""
    model = copy.deepcopy(reference)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=seed, step_index=0, step_name="bioclust")
    layers = LayerSelector(**EVERYTHING).resolve(
        model, head=info.head, default_types=list(Bioclust.capabilities.handles))
    cfg = BioclustConfig.model_validate(config)
    targets = cluster_targets(model, layers, ctx, cfg)
    plain = Candidate([None] * len(targets), [0.0] * len(targets), generation=0, index=-1)
    apply(targets, plain, cfg.distribution)
    out: dict[str, Any] = {"plain_test": ns.accuracy(model, data)}
    cands = [Candidate.from_description(c) for c in summary["candidates"]]
    tests = []
    for cand in cands:
        apply(targets, cand, cfg.distribution)
        tests.append(ns.accuracy(model, data))
    out["val"] = [c.val_acc for c in cands]
    out["test"] = tests
    best = max(range(len(cands)), key=lambda i: (cands[i].val_acc, -i)) if cands else None
    out["best_val_index"] = best
    out["best_by_val_test"] = tests[best] if best is not None else None
    chosen = summary.get("chosen_candidate")
    rebuilt = plain if chosen is None else Candidate.from_description(chosen)
    apply(targets, rebuilt, cfg.distribution)
    ref_state = compressed.state_dict()
    out["rebuild_exact"] = all(
        torch.equal(model.get_parameter(t.tensor_name).detach(), ref_state[t.tensor_name])
        for t in targets)
    return out


def _run_case(spec: str, data_name: str, config: dict[str, Any], tmp: Path, name: str,
              seed: int = 0) -> dict[str, Any]:
    data = ns.datasets.load(data_name)
    reference = ns.reference_model(spec, data)
    row: dict[str, Any] = {"name": name, "spec": spec, "data": data_name, "config": config}
    started = time.perf_counter()
    plain = ns.compress(reference, [ns.step("bioclust", select=EVERYTHING,
                                            **{**config, "noise_scale": 0.0, "overrides": {
                                                k: {**v, "noise_scale": 0.0}
                                                for k, v in config.get("overrides", {}).items()}})],
                        data=data, seed=seed, latency=False)
    row["plain_wall_s"] = time.perf_counter() - started
    row["plain"] = {"ratio": plain.report.compression_ratio, "bytes": plain.report.storage_bytes,
                    "test": plain.report.accuracy_after,
                    "val": plain.report.steps[0]["val_acc_unperturbed"]}
    started = time.perf_counter()
    result = ns.compress(reference, [ns.step("bioclust", select=EVERYTHING, **config)],
                         data=data, seed=seed, latency=False)
    row["wall_s"] = time.perf_counter() - started
    report = result.report
    summary = report.steps[0]
    row.update(dense_test=report.accuracy_before, test=report.accuracy_after,
               ratio=report.compression_ratio, bytes=report.storage_bytes,
               dense_bytes=report.dense_bytes, summary=summary)
    saved = _save_load(result, tmp, name)
    row["file_bytes"], row["bit_exact"] = saved["file_bytes"], saved["bit_exact"]
    row["loaded_test"] = ns.accuracy(saved["loaded"], data)
    row["population"] = _candidates_on_test(reference, data, config, summary, result.model, seed)
    return row


def _timm_case(tmp: Path, quick: bool) -> dict[str, Any]:
    data = ns.datasets.load("digits32")
    started = time.perf_counter()
    # Same reference as benchmarks/run_one.py (8 epochs): shares its cache.
    reference = ns.reference_model("timm:resnet18", data, epochs=8)
    train_s = time.perf_counter() - started
    rows = []
    for config in ({**RESNET18, "overrides": {}, "population": 2},
                   {**RESNET18, "population": 2 if quick else RESNET18["population"]}):
        rows.append(_timm_row(reference, data, config, tmp))
    return {"params": sum(p.numel() for p in reference.parameters()), "train_s": train_s,
            "rows": rows}


def _timm_row(reference, data, config: dict[str, Any], tmp: Path) -> dict[str, Any]:
    started = time.perf_counter()
    result = ns.compress(reference, [ns.step("bioclust", select=EVERYTHING, **config)],
                         data=data, seed=0, latency=False)
    wall = time.perf_counter() - started
    saved = _save_load(result, tmp, "resnet18")
    x = data.test.tensors[0][:8]
    with torch.no_grad():
        same_logits = torch.equal(saved["loaded"].eval()(x), result.model.eval()(x))
    return {"config": config, "wall_s": wall, "ratio": result.report.compression_ratio,
            "bytes": result.report.storage_bytes, "file_bytes": saved["file_bytes"],
            "dense_test": result.report.accuracy_before, "test": result.report.accuracy_after,
            "loaded_test": ns.accuracy(saved["loaded"], data), "bit_exact": saved["bit_exact"],
            "same_logits": same_logits, "summary": result.report.steps[0]}


def _verdict(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


def _render(rows: list[dict[str, Any]], stress: list[dict[str, Any]], timm: dict[str, Any] | None,
            quick: bool, started: float, load: tuple[float, float, float]) -> str:
    lines = [
        "# bioclust benchmark",
        "",
        f"Command: `python -m benchmarks.bench_bioclust{' --quick' if quick else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average at start {load[0]:.1f} (shared "
        f"machine, so wall times are inflated).  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; total "
        f"wall time {time.perf_counter() - started:.0f} s.",
        "",
        "Test accuracy is on the held-out test split (360 images: one image = 0.28 pp); "
        "candidates are selected on the validation split (359 images). Ratio = dense fp32 "
        "bytes / artifact bytes (the file written by `result.save`). The classifier head is "
        "included (`select: {protect_head: false}`); biases and BatchNorm stay dense fp32.",
        "",
        "## 1. Shipped recipes: compression and accuracy",
        "",
        "| model / data | recipe | ratio | artifact bytes | dense test | bioclust test | Δ pp | "
        "loaded = in-memory (bit-exact) | target ≥8× and ≥ dense−0.5 pp | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = 100 * (r["test"] - r["dense_test"])
        ok = r["ratio"] >= 8 and delta >= -0.5
        lines.append(
            f"| {r['spec']} / {r['data']} | `{_short(r['config'])}` | {r['ratio']:.2f}× | "
            f"{r['bytes']:,} (file {r['file_bytes']:,}) | {_pct(r['dense_test'])} | "
            f"{_pct(r['test'])} | {delta:+.2f} | {_verdict(r['bit_exact'])} | {_verdict(ok)} | "
            f"{r['wall_s']:.0f} |")
    lines += [
        "",
        "## 2. Population: a single random reconstruction vs selection, and vs plain k-means",
        "",
        "Each row is one run: the unperturbed (plain k-means) reconstruction, the random "
        "candidates of the population (16, each one seed and scale per layer), and the "
        "candidate with the best "
        "validation accuracy. *Chosen* is what the step kept (`keep_unperturbed: true` keeps the "
        "plain reconstruction unless a candidate beats it on validation).",
        "",
        "| case | plain val | candidates val mean ± std (min – best) | plain test | "
        "candidates test mean ± std (min – max) | best-on-val candidate test | chosen | "
        "chosen test | plain k-means ratio | rebuild exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + stress:
        p, s = r["population"], r["summary"]
        pop = s["population"]
        lines.append(
            f"| {r['name']} | {_pct(s['val_acc_unperturbed'])} | {_mean_std(p['val'])} "
            f"({_pct(pop['min'])} – {_pct(pop['best'])}) | {_pct(p['plain_test'])} | "
            f"{_mean_std(p['test'])} ({_pct(min(p['test']))} – {_pct(max(p['test']))}) | "
            f"{_pct(p['best_by_val_test'])} | {s['chosen']} | {_pct(r['test'])} | "
            f"{r['plain']['ratio']:.2f}× | {_verdict(p['rebuild_exact'])} |")
    lines += ["", "### Answers (computed from the rows above)", ""]
    for r in rows + stress:
        p = r["population"]
        mean_test = statistics.fmean(p["test"])
        sel_gain = 100 * (p["best_by_val_test"] - mean_test)
        vs_plain = 100 * (p["best_by_val_test"] - p["plain_test"])
        mean_vs_plain = 100 * (mean_test - p["plain_test"])
        lines.append(
            f"- **{r['name']}**: selection vs a single random reconstruction (test): "
            f"{sel_gain:+.2f} pp; best-on-val candidate vs plain k-means (test): {vs_plain:+.2f} "
            f"pp; an average random reconstruction vs plain k-means: {mean_vs_plain:+.2f} pp. "
            f"{_answer(sel_gain, vs_plain, mean_vs_plain)}")
    if timm is not None:
        t = timm
        lines += [
            "",
            "## 3. timm resnet18 (in_chans=1, num_classes=10, 32×32)",
            "",
            f"Reference: `ns.reference_model('timm:resnet18', 'digits32', epochs=8)` "
            f"({t['params']:,} parameters; {t['train_s']:.0f} s incl. cache lookup). First row: "
            "4-bit everywhere; second: `recipes/bioclust_resnet18.yaml` (8-bit stem and "
            "downsample convs). Head included.",
            "",
            "| recipe | ratio | artifact bytes | dense test | bioclust test | loaded test | "
            "bit-exact | same logits after load | candidates val mean ± std / best | chosen | "
            "wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            pop = r["summary"]["population"]
            lines.append(
                f"| `{_short(r['config'])}` | {r['ratio']:.2f}× | {r['bytes']:,} (file "
                f"{r['file_bytes']:,}) | {_pct(r['dense_test'])} | {_pct(r['test'])} | "
                f"{_pct(r['loaded_test'])} | {_verdict(r['bit_exact'])} | "
                f"{_verdict(r['same_logits'])} | {_pct(pop['mean'])} ± {_pct(pop['std'])} / "
                f"{_pct(pop['best'])} | {r['summary']['chosen']} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _answer(sel_gain: float, vs_plain: float, mean_vs_plain: float) -> str:
    one = 100 / 360  # one test image
    parts = []
    if sel_gain > one:
        parts.append("selection beats a random reconstruction by more than one test image")
    elif sel_gain >= -one:
        parts.append("selection is within one test image of a random reconstruction")
    else:
        parts.append("the validation-best candidate is worse on test than an average one "
                     "(selection overfits the validation split)")
    if vs_plain > one:
        parts.append("perturbation + selection beats plain k-means")
    elif vs_plain >= -one:
        parts.append("perturbation + selection ties plain k-means (within one test image)")
    else:
        parts.append("plain k-means is better")
    if mean_vs_plain < -one:
        parts.append("the perturbation itself costs accuracy on average")
    return "Verdict: " + "; ".join(parts) + "."


def _short(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in config.items())


def run(quick: bool = False) -> str:
    """Measure everything in one run and return the markdown section."""
    started = time.perf_counter()
    load = os.getloadavg()
    os.environ.setdefault("NETSHRINK_PROGRESS", "0")
    rows, stress = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        rows.append(_run_case("zoo:lenet5", "digits28", LENET5, tmp, "lenet5 (recipe)"))
        rows.append(_run_case("zoo:resnet_small", "digits32", RESNET, tmp, "resnet_small (recipe)"))
        # Stress regime: the stem clustered to 16 values like every other layer.
        stress.append(_run_case("zoo:resnet_small", "digits32", {**RESNET, "overrides": {}},
                                tmp, "resnet_small, 4-bit everywhere, stem included (stress)"))
        if not quick:
            stress.append(_run_case("zoo:lenet5", "digits28",
                                    {**LENET5, "bits": 2, "overrides": {}},
                                    tmp, "lenet5, 2-bit everywhere (stress)"))
        timm = _timm_case(tmp, quick)
    return _render(rows, stress, timm, quick, started, load)


def main(argv: list[str] | None = None) -> None:
    """CLI entry: run and write docs/benchmarks/bioclust.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the LeNet-5 stress regime, smaller resnet18 population")
    args = parser.parse_args(argv)
    text = run(quick=args.quick)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
