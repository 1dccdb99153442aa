"""The runner: ``python -m benchmarks PAGE [--quick] [--seeds N] [--out DIR]``.

Every page is generated here: the page's spec (benchmarks/pages/<page>.py) measures and returns
its body; the runner adds the header (command, commit, machine and CPU, threads, load average,
wall time, the digests of the generated data the page names) and writes
docs/benchmarks/<page>.md. ``python -m benchmarks.index`` then rewrites docs/benchmarks.md, the
index of the pages.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import netshrink as ns
from benchmarks.harness import REFERENCE_LINES, ROOT, Bench, cpu_model, data_digests
from benchmarks.pages import PAGES


def commit() -> str:
    """The git commit of the working tree, marked ``+ uncommitted changes`` when code (anything
    outside docs/) differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    try:
        head = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
        # The pages this runner writes under docs/ do not make the measured code uncommitted.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs").strip()
    except OSError:
        return "unknown (no git)"
    return head + (" + uncommitted changes" if dirty else "")


def cpu() -> float:
    """CPU seconds of this process and its finished children (wall time inflates under load)."""
    return sum(sum(resource.getrusage(who)[:2])
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line (one form for every page)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", nargs="?", default="smoke_digits", choices=sorted(PAGES),
                        help="the page to (re)generate (default: smoke_digits, the digits smoke "
                        "run, docs/benchmarks/smoke_digits.md)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller models and fewer epochs: checks the page, not its figures")
    parser.add_argument("--seeds", type=int, default=None,
                        help="compression seeds per configuration (default: the page's; "
                        "1 with --quick)")
    parser.add_argument("--fresh", action="store_true",
                        help="measure every row again instead of resuming the rows an "
                        "interrupted run of the same command saved at the same commit")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="documentation root the page goes under (default: docs/)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this page (``--out`` does not change the figures)."""
    threads = os.environ.get("NETSHRINK_THREADS")
    return " ".join(
        ([f"NETSHRINK_THREADS={threads}"] if threads else [])
        + ["python -m benchmarks", shlex.quote(args.page)]
        + (["--quick"] if args.quick else [])
        + ([f"--seeds {args.seeds}"] if args.seeds is not None else []))


def rows_dir(args: argparse.Namespace, rev: str, seeds: int) -> Path | None:
    """Where the page's finished rows persist, so an interrupted run resumes: one folder per
    clean commit, page, mode, seeds and ``NETSHRINK_THREADS`` under the netshrink cache;
    ``None`` (nothing saved or resumed) when the code differs from the commit or git is
    missing."""
    if re.fullmatch(r"[0-9a-f]{12}", rev) is None:  # "+ uncommitted changes", "unknown"
        return None
    threads = os.environ.get("NETSHRINK_THREADS", "unset")
    run = f"{args.page}{'-quick' if args.quick else ''}-seeds{seeds}-threads{threads}"
    return ns.cache_dir() / "benchmark-rows" / rev / run


def main(argv: list[str] | None = None) -> Path:
    """Generate one page; returns the path written."""
    args = parse(argv)
    spec = PAGES[args.page]
    if "NETSHRINK_PROGRESS" not in os.environ:  # rows are quiet; references keep epoch lines
        os.environ.update({"NETSHRINK_PROGRESS": "0", REFERENCE_LINES: "1"})
    if os.environ.get("NETSHRINK_THREADS"):
        torch.set_num_threads(int(os.environ["NETSHRINK_THREADS"]))
    out = args.out / spec.OUT
    seeds = args.seeds or (1 if args.quick else getattr(spec, "SEEDS", 1))
    load_start, rev = os.getloadavg(), commit()  # the commit the run starts from
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.page}-") as tmp:
        rows = rows_dir(args, rev, seeds)
        if rows is not None and args.fresh:
            shutil.rmtree(rows, ignore_errors=True)
        bench = Bench(quick=args.quick, seeds=seeds, page=out, tmp=Path(tmp), rows=rows)
        body = spec.run(bench)
    load_end = os.getloadavg()
    head = [
        f"# {spec.TITLE}",
        "",
        f"Produced by `{command(args)}` at commit `{rev}` on {started:%Y-%m-%d %H:%M} UTC"
        f"{' (quick mode: a check of the page, not its figures)' if args.quick else ''}; every "
        f"number below comes from that run ({seeds} seed(s) per configuration).",
        "",
        f"Machine: {platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch "
        f"thread(s) (NETSHRINK_THREADS={os.environ.get('NETSHRINK_THREADS', 'unset')}); load "
        f"average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; total "
        f"wall time {(time.perf_counter() - t0) / 60:.1f} min, CPU time {cpu() / 60:.1f} min.",
        "",
        *([f"Data: the generated sets this page names, with the SHA-256 of the data as loaded "
           f"(docs/datasets.md lists one machine's): {'; '.join(digests)}.", ""]
          if (digests := data_digests("\n".join(body))) else []),
        *([f"{len(bench.resumed)} row(s) of this page were measured by an earlier, interrupted "
           "run of the same command at the same commit and resumed from its saved rows: "
           + ", ".join(f"`{k}`" for k in bench.resumed) + ". The wall and CPU times above "
           "do not include them.", ""]
          if bench.resumed else []),
        "Accuracies are on the test split: mean ± std over the seeds, and the 95% Wilson interval "
        "of that mean on the n test examples; a comparison whose intervals overlap gets no "
        "verdict. A configuration whose compressed weights for seeds 0 and 1 are identical "
        "does not depend on the seed and is not run for further seeds (its ± 0.00 comes from "
        "those two). Speedups are dense latency / compressed latency, median over interleaved "
        "rounds with the lowest and highest round in brackets.",
        "",
        *spec.ABOUT,
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*head, "", *body]).rstrip() + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
