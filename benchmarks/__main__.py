"""Regenerate docs/benchmarks.md: every method and peer on the reference models, one run.

python -m benchmarks [--quick] [--models lenet5,vgg_small] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import catalogue, peers

ROOT = Path(__file__).resolve().parent.parent


def run_one(model: str, label: str, quick: bool, timeout: int) -> dict:
    """Run one (model, method) pair in a fresh interpreter; failures become rows too."""
    cmd = [sys.executable, "-m", "benchmarks.run_one", model, label] + (
        ["--quick"] if quick else []
    )
    env = {**os.environ, "NETSHRINK_PROGRESS": "0"}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return {"model": model, "method": label, "error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": model, "method": label, "error": tail[:300]}


def pareto_plot(rows: list[dict], model: str, path: Path) -> None:
    """Accuracy vs compression ratio; netshrink points and peers, Pareto front of netshrink."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ok = [r for r in rows if "error" not in r]
    for family, marker in (("dense", "o"), ("netshrink", "*"), ("peer", "s")):
        pts = [r for r in ok if r["family"] == family]
        if pts:
            ax.scatter(
                [r["ratio"] for r in pts],
                [100 * r["acc"] for r in pts],
                marker=marker,
                s=90 if family == "netshrink" else 50,
                label=family,
            )
            for r in pts:
                ax.annotate(
                    r["method"][:28],
                    (r["ratio"], 100 * r["acc"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    front, best = [], -1.0
    for r in sorted((r for r in ok if r["family"] == "netshrink"), key=lambda r: -r["ratio"]):
        if r["acc"] > best:
            front.append(r)
            best = r["acc"]
    if front:
        ax.plot(
            [r["ratio"] for r in front],
            [100 * r["acc"] for r in front],
            "--",
            alpha=0.5,
            label="netshrink Pareto front",
        )
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense fp32 bytes / file on disk, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}: accuracy vs honest compression")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(rows: list[dict]) -> list[str]:
    """Per peer: netshrink's best ratio at equal accuracy (within 0.5 pp), or the peer wins."""
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["family"] == "netshrink"]
    lines = []
    for peer in (r for r in ok if r["family"] == "peer"):
        match = [r for r in ours if r["acc"] >= peer["acc"] - 0.005]
        if not match:
            lines.append(
                f"- **{peer['method']}** wins: no netshrink method reaches its accuracy "
                f"({100 * peer['acc']:.2f}%) within 0.5 pp."
            )
            continue
        best = max(match, key=lambda r: r["ratio"])
        if best["ratio"] > peer["ratio"]:
            lines.append(
                f"- vs **{peer['method']}** ({peer['ratio']:.1f}x at {100 * peer['acc']:.2f}%): "
                f"netshrink **{best['method']}** reaches {best['ratio']:.1f}x at "
                f"{100 * best['acc']:.2f}% — netshrink wins."
            )
        else:
            lines.append(
                f"- vs **{peer['method']}** ({peer['ratio']:.1f}x at {100 * peer['acc']:.2f}%): "
                f"netshrink's best at that accuracy is {best['method']} at "
                f"{best['ratio']:.1f}x — the peer wins."
            )
    return lines


def table(rows: list[dict]) -> list[str]:
    """Markdown table of one model's rows."""
    out = [
        "| method | family | test acc | Δ acc (pp) | size on disk | ratio | speedup b1 | speedup b64 | wall (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | - | failed: {r['error']} | | | | | | | |")
            continue
        out.append(
            f"| {r['method']} | {r['family']} | {100 * r['acc']:.2f}% | {100 * (r['acc'] - r['dense_acc']):+.2f} "
            f"| {r['bytes']:,} B | {r['ratio']:.1f}x | {r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x "
            f"| {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer models, 1 fine-tune epoch")
    parser.add_argument("--models", default=None, help="comma-separated model names")
    parser.add_argument("--only", default=None, help="comma-separated substrings of method labels")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per method")
    args = parser.parse_args()
    models = (
        args.models.split(",")
        if args.models
        else list(catalogue.QUICK_MODELS if args.quick else catalogue.MODELS)
    )
    out = Path(args.out)
    plots = out.parent / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("NETSHRINK_THREADS")
    command = (
        (f"NETSHRINK_THREADS={threads} " if threads else "")
        + "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (f" --models {args.models}" if args.models else "")
        + (f" --only '{args.only}'" if args.only else "")
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {started:%Y-%m-%d %H:%M} UTC; every number below comes "
        "from that run.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {platform.platform()}.",
        "",
        "Sizes are the bytes of the file each method saves (netshrink: the `.nsk` artifact, "
        "checked equal to the report; PyTorch peers: `torch.save` of the state dict; "
        "Torch-Pruning: safetensors of the pruned model). Ratio = dense fp32 bytes / that "
        "size. Speedups are dense vs compressed latency medians at batch 1 and 64, measured "
        "interleaved in the same process. Peak RSS is the whole process (torch included).",
        "",
    ]
    for model in models:
        labels = ["dense", *catalogue.netshrink_methods(model, args.quick), *peers.PEERS]
        if args.only:
            keys = args.only.split(",")
            labels = [lbl for lbl in labels if lbl == "dense" or any(k in lbl for k in keys)]
        rows = []
        for label in labels:
            print(f"[{model}] {label} ...", file=sys.stderr, flush=True)
            rows.append(run_one(model, label, args.quick, args.timeout))
            print(f"    -> {rows[-1]}", file=sys.stderr, flush=True)
        spec, data = catalogue.MODELS[model]
        png = plots / f"pareto_{model}.png"
        pareto_plot(rows, model, png)
        lines += [
            f"## {model} (`{spec}` on `{data}`)",
            "",
            *table(rows),
            "",
            f"![Pareto plot for {model}]({png.relative_to(out.parent).as_posix()})",
            "",
            "Verdicts (equal accuracy = within 0.5 pp):",
            "",
            *(verdicts(rows) or ["- no peer ran"]),
            "",
        ]
    elapsed = datetime.datetime.now(datetime.timezone.utc) - started
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines += [
        f"Total benchmark wall time: {elapsed.total_seconds() / 60:.1f} minutes. Load average "
        f"(1, 5, 15 min) at the end: {load} — latency ratios are noisier when other jobs run; "
        "the dense row's own speedup shows the noise level.",
        "",
    ]
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
