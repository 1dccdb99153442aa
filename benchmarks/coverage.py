"""The architecture coverage matrix: ``python -m benchmarks.coverage [--quick] [--out PATH]``.

Every registered compressor (its default config, made fast with the built-in fast configs and a
small data set) and each structural method at a fixed ratio runs on a fixed list of timm,
torchvision and Hugging Face models: compress, save, load in a fresh process, compare outputs.
Each cell runs in its own process under a time limit and becomes one table cell:
``ok 3.2x 4 s``, ``refused: <reason>``, ``FAILED: <error>`` or ``timeout``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent

#: Cell states, best first.
OK, REFUSED, FAILED, TIMEOUT = "ok", "refused", "FAILED", "timeout"
#: Error classes that mean "this cannot work, said before the model was changed" (validation).
REFUSAL_ERRORS = ("ConfigError", "RecipeError", "SelectionError", "ModelSpecError", "DataError")
#: Outputs of the reloaded model must match the compressed model's to this (absolute, on logits
#: scaled to at most 1): bit-exact decoding gives 0; the slack covers BLAS order in a new process.
TOLERANCE = 1e-4
#: Samples per split of the generated data: enough for every method's loop, fast on 2 cores.
N_TRAIN, N_EVAL = 128, 32


@dataclass(frozen=True)
class Model:
    """One row: a model spec, its family (for the page) and its input size."""

    spec: str
    family: str
    input_size: int = 32

    @property
    def sequence(self) -> bool:
        """A transformers model fed token ids (``seq-majority`` data) rather than images."""
        return self.spec.startswith("hf:")

    @property
    def cnn(self) -> bool:
        """A timm convolutional network (the rows the structural-method share counts)."""
        return self.spec.startswith("timm:") and self.family in CNN_FAMILIES


@dataclass(frozen=True)
class Method:
    """One column: a compressor and the config the matrix runs it with."""

    column: str
    compressor: str
    config: dict[str, Any] = field(default_factory=dict)


CNN_FAMILIES = {"ResNet/RegNet", "MobileNet/EfficientNet/GhostNet", "ConvNeXt", "DenseNet",
                "DPN/CSP/Res2Net", "RepVGG", "other CNN"}

#: The timm rows (random init, never downloaded), grouped by family.
TIMM: dict[str, list[str]] = {
    "ResNet/RegNet": ["resnet18", "resnet50", "resnet10t", "seresnet18", "regnetx_002",
                      "regnety_002"],
    "MobileNet/EfficientNet/GhostNet": [
        "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv3_large_100", "efficientnet_b0",
        "efficientnet_lite0", "tinynet_a", "ghostnet_100", "mnasnet_small", "lcnet_050",
        "mixnet_s", "rexnet_100"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"],
    "DenseNet": ["densenet121"],
    "DPN/CSP/Res2Net": ["dpn68", "cspresnet50", "cspdarknet53", "res2net50_14w_8s", "dla34"],
    "RepVGG": ["repvgg_a0", "mobileone_s0"],
    "ViT/DeiT": ["vit_tiny_patch16_224", "deit_tiny_patch16_224"],
    "Swin": ["swin_tiny_patch4_window7_224"],
    "LeViT": ["levit_128s"],
    "MobileViT": ["mobilevit_xxs"],
    "EfficientViT": ["efficientvit_b0", "efficientvit_m0"],
    "other hybrid": ["edgenext_xx_small", "fastvit_t8"],
}
#: Input side per timm model where 32 does not fit its patch or window grid.
INPUT_SIZE = {"swin_tiny_patch4_window7_224": 64, "levit_128s": 64, "efficientvit_m0": 64,
              "vit_tiny_patch16_224": 64, "deit_tiny_patch16_224": 64}
TORCHVISION = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0",
               "mnasnet0_5", "efficientnet_b0", "regnet_y_400mf"]
TRANSFORMERS = ["bert-tiny", "gpt2-tiny", "llama-tiny"]
QUICK = ["timm:deit_tiny_patch16_224", "hf:gpt2-tiny", "timm:mobilenetv3_small_050",
         "torchvision:resnet18"]

#: Beyond each compressor's fast config: budgets cut for the matrix (it tests that a method
#: works on an architecture; the benchmark pages say how well).
MATRIX_BUDGET: dict[str, dict[str, Any]] = {
    "bioclust": {"population": 2},
    # Surgery that Torch-Pruning cannot finish is refused by the method's own time limit, under
    # the cell's (300 s by default), so the cell says why instead of "timeout". normsparse
    # traces twice (a check before training, the removal after it).
    "normsparse": {"epochs": 1, "time_limit": 80},
    "statprune": {"time_limit": 240},
    "rlprune": {"time_limit": 200},
}
#: Structural methods at a fixed ratio (a second column each where the default is not one).
FIXED_RATIO: dict[str, tuple[str, dict[str, Any]]] = {
    "svd": ("svd @ rank 0.5", {"ratio": 0.5}),
    "tucker": ("tucker @ rank 0.5", {"method": "ratio", "rank": 0.5}),
    "statprune": ("statprune @ keep ≥ 0.5", {"min_keep_ratio": 0.5, "time_limit": 240}),
    "rlprune": ("rlprune channel 0.5", {"granularity": "channel", "target_sparsity": 0.5}),
}


def models(quick: bool = False) -> list[Model]:
    """The rows: every timm, torchvision and transformers model (``quick``: a small subset)."""
    rows = [Model(f"timm:{name}", family, INPUT_SIZE.get(name, 32))
            for family, names in TIMM.items() for name in names]
    rows += [Model(f"torchvision:{name}", "torchvision") for name in TORCHVISION]
    rows += [Model(f"hf:{name}", "transformers") for name in TRANSFORMERS]
    if quick:
        return sorted((m for m in rows if m.spec in QUICK), key=lambda m: QUICK.index(m.spec))
    return rows


def methods() -> list[Method]:
    """The columns: every registered compressor's default config (with the built-in fast config
    and :data:`MATRIX_BUDGET`), then each structural method at a fixed ratio."""
    from benchmarks.pages.defaults import compressors  # the CLI's JSON listing
    from netshrink.testing import BUILTIN_FAST_CONFIGS

    cols: list[Method] = []
    for name in compressors():
        config = {**BUILTIN_FAST_CONFIGS.get(name, {}), **MATRIX_BUDGET.get(name, {})}
        cols.append(Method(name, name, config))
        if name in FIXED_RATIO:
            column, fixed = FIXED_RATIO[name]
            cols.append(Method(column, name, {**config, **fixed}))
    return cols


# -- one cell ----------------------------------------------------------------------------------


@dataclass
class Cell:
    """The outcome of one model × method run."""

    model: str
    method: str
    status: str
    ratio: float | None = None
    seconds: float | None = None
    reason: str = ""

    def text(self) -> str:
        """The table cell: ``ok 3.2x 4 s`` / ``refused: why`` / ``FAILED: error`` / ``timeout``."""
        if self.status == OK:
            return f"ok {self.ratio:.1f}x {self.seconds:.0f} s"
        if self.status == TIMEOUT:
            return TIMEOUT
        return f"{self.status}: {_short(self.reason)}"


def _short(text: str, limit: int = 150) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for an exception a cell raised: netshrink's validation errors are
    refusals, anything else (a step failing mid-run, a bare exception) is a failure."""
    names = {c.__name__ for c in type(exc).__mro__}
    first = (str(exc).strip().splitlines() or [""])[0]
    # The model's spec and options are the row already: keep the cell for the error itself.
    first = re.sub(r" on model [^()]*(\([^()]*\))?: ", ": ", first, count=1)
    message = f"{type(exc).__name__}: {first}"
    if "StepError" not in names and names & set(REFUSAL_ERRORS):
        return REFUSED, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return FAILED, message


def make_data(model: Model) -> Any:
    """Small seeded data fitting ``model``: ``seq:majority`` (the seq-majority task, fewer
    samples) for transformers, random 3-channel images of its input size otherwise."""
    import netshrink as ns

    if model.sequence:
        return ns.datasets.load(
            f"seq:majority?n_train={N_TRAIN}&n_val={N_EVAL}&n_test={N_EVAL}")
    gen = torch.Generator().manual_seed(0)
    side = model.input_size

    def split(n: int) -> ns.ArrayDataset:
        images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
        return ns.ArrayDataset(images, torch.arange(n) % 10, mean=0.5, std=0.25)

    return ns.DataSplits(name=f"random{side}", train=split(N_TRAIN), val=split(N_EVAL),
                         test=split(N_EVAL), num_classes=10,
                         extra={"input_shape": (3, side, side)})


def run_cell(model: Model, method: Method, workdir: str) -> dict[str, Any]:
    """Build, compress and save one cell (in its own process); returns the :class:`Cell` fields
    and, when the artifact was written, where it and the expected outputs are."""
    import netshrink as ns

    os.environ.setdefault("NETSHRINK_PROGRESS", "0")
    os.environ["NETSHRINK_CACHE"] = str(Path(workdir) / "cache")  # no resumed searches
    t0 = time.perf_counter()
    cell = Cell(model.spec, method.column, FAILED)
    try:
        data = make_data(model)
        torch.manual_seed(0)  # the random init too, so a cell is the same in every run
        net = ns.load_model(model.spec, **data.model_options())
        result = ns.compress(net, [ns.step(method.compressor, **method.config)], data=data,
                             seed=0, latency=False)
        cell.seconds = time.perf_counter() - t0
        stem = Path(workdir) / _slug(f"{model.spec}-{method.column}")
        result.save(stem.with_suffix(".nsa"), report=False)
        x, _ = data.batch("test", 4)
        with torch.no_grad():
            expected = result.model.eval()(x)
        torch.save({"x": x, "y": expected}, stem.with_suffix(".pt"))
        cell.status, cell.ratio = OK, result.report.compression_ratio
        return {**asdict(cell), "artifact": str(stem.with_suffix(".nsa"))}
    except Exception as exc:  # every outcome is a cell of the table
        cell.status, cell.reason = classify(exc)
        cell.seconds = time.perf_counter() - t0
        return asdict(cell)


def reload_row(artifacts: list[str]) -> dict[str, Any]:
    """Load every artifact of one row (in a fresh interpreter: :func:`harness.isolated`) and
    compare its outputs on the saved inputs; returns artifact -> error message or ''."""
    import netshrink as ns

    out: dict[str, str] = {}
    for path in artifacts:
        try:
            saved = torch.load(Path(path).with_suffix(".pt"), weights_only=True)
            model = ns.load(path).eval()
            with torch.no_grad():
                got = model(saved["x"])
            scale = max(float(saved["y"].abs().max()), 1.0)
            diff = float((got - saved["y"]).abs().max()) / scale
            out[path] = "" if diff <= TOLERANCE else (
                f"reloaded outputs differ from the compressed model's by {diff:.2e} (relative)")
        except Exception as exc:  # a load failure is this cell's finding
            out[path] = f"reload: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return {"errors": out}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


# -- the matrix --------------------------------------------------------------------------------


def _child(conn: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    conn.send(fn(*args))


@dataclass
class _Job:
    """A function running in a child process: its key, process, pipe end and deadline."""

    key: tuple[int, int]  # (row index, column index); column -1 is the row's reload
    proc: Any
    conn: Any
    deadline: float


def _start(ctx: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], timeout: float,
           key: tuple[int, int] = (0, 0)) -> _Job:
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    return _Job(key, proc, parent, time.monotonic() + timeout)


def _finish(job: _Job, ready: bool) -> dict[str, Any] | None:
    """The job's answer when ``ready``, None when it ran past its deadline; the process is
    killed if still alive, ``{"status": FAILED, ...}`` if it died without an answer."""
    try:
        return job.conn.recv() if ready else None
    except EOFError:
        job.proc.join(5)
        return {"status": FAILED,
                "reason": f"the cell's process died (exit code {job.proc.exitcode})"}
    finally:
        if job.proc.is_alive():
            job.proc.kill()
        job.proc.join()
        job.conn.close()


def _in_process(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], timeout: float,
                ctx: Any) -> dict[str, Any] | None:
    """``fn(*args)`` in a child process of ``ctx``; None if it ran past ``timeout`` (it is
    killed), ``{"status": FAILED, ...}`` if it died without an answer."""
    job = _start(ctx, fn, args, timeout)
    return _finish(job, job.conn.poll(timeout))


def _reload_isolated(artifacts: list[str], timeout: float) -> dict[str, Any]:
    """:func:`reload_row` in a fresh interpreter (no module of the compressing process loaded)."""
    from benchmarks.harness import isolated

    return isolated(reload_row, artifacts, timeout=timeout)


def run_matrix(rows: Sequence[Model], cols: Sequence[Method], timeout: float, workdir: Path,
               log: Callable[[str], None] = lambda s: None,
               on_row: Callable[[list[Cell]], None] = lambda cells: None,
               jobs: int = 1, done: Sequence[Cell] = ()) -> list[Cell]:
    """Every cell in its own process (forked from this one, which has imported netshrink, so a
    cell costs its own work, not an interpreter start) under ``timeout`` seconds, ``jobs`` at a
    time; once a row's cells are done its artifacts are loaded in a fresh interpreter and
    compared. ``done``: cells of an earlier run (a checkpoint) whose rows are not run again.
    ``on_row(cells so far)`` is called after each row (the page is rewritten and the
    checkpoint saved, so a long run shows its progress and can resume)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    # fork: the parent only orchestrates (it runs no torch op and starts no thread, so no
    # thread pool or held lock is forked).
    ctx = multiprocessing.get_context("fork")
    _preload()
    cells: list[Cell] = list(done)
    finished = {c.model for c in done}
    todo = [i for i, r in enumerate(rows) if r.spec not in finished]
    queue = deque((i, j) for i in todo for j in range(len(cols)))
    row_cells: dict[int, dict[int, tuple[Cell, str | None]]] = {i: {} for i in todo}
    reloads: deque[int] = deque()
    running: list[_Job] = []

    def complete(i: int) -> None:
        cells.extend(row_cells[i][j][0] for j in range(len(cols)))
        on_row(cells)

    def on_cell(i: int, j: int, out: dict[str, Any] | None) -> None:
        model, method = rows[i], cols[j]
        if out is None:
            cell, artifact = Cell(model.spec, method.column, TIMEOUT, seconds=timeout), None
        else:
            artifact = out.pop("artifact", None)
            cell = Cell(**{"model": model.spec, "method": method.column, **out})
        row_cells[i][j] = (cell, artifact)
        log(f"{model.spec} × {method.column}: {cell.text()}")
        if len(row_cells[i]) == len(cols):
            if any(a for _, a in row_cells[i].values()):
                reloads.append(i)
            else:
                complete(i)

    def on_reload(i: int, back: dict[str, Any] | None) -> None:
        back = back if back is not None else {"error": "the reload ran past its time limit"}
        errors = back.get("errors") or {a: back.get("error", "reload")
                                        for _, a in row_cells[i].values() if a}
        for cell, artifact in row_cells[i].values():
            if artifact and errors.get(artifact):
                cell.status, cell.reason = FAILED, errors[artifact]
                log(f"{cell.model} × {cell.method}: {cell.text()}")
        complete(i)

    while queue or reloads or running:
        while len(running) < jobs and (reloads or queue):
            if reloads:  # a finished row first: its page row and checkpoint come sooner
                i = reloads.popleft()
                saved = [a for _, a in row_cells[i].values() if a]
                running.append(_start(ctx, _reload_isolated, (saved, timeout + 60),
                                      timeout + 120, (i, -1)))
            else:
                i, j = queue.popleft()
                running.append(_start(ctx, run_cell, (rows[i], cols[j], str(workdir)),
                                      timeout, (i, j)))
        wait = max(0.0, min(job.deadline for job in running) - time.monotonic())
        ready = set(mp_connection.wait([job.conn for job in running], timeout=wait))
        for job in list(running):
            if job.conn in ready or job.deadline <= time.monotonic():
                running.remove(job)
                out = _finish(job, job.conn in ready)
                i, j = job.key
                if j < 0:
                    on_reload(i, out)
                else:
                    on_cell(i, j, out)
    return cells


def _preload() -> None:
    """Import the model libraries once in the parent, so no forked cell pays for it (about 6 s
    a cell: timm pulls in torchvision and torch._dynamo). Imports only: no torch op, no thread."""
    import contextlib
    import importlib

    for name in ("timm", "torchvision", "transformers"):
        with contextlib.suppress(ImportError):  # an extra not installed: its rows are refused
            importlib.import_module(name)


# -- checkpoint --------------------------------------------------------------------------------


def checkpoint_key(rev: str, timeout: float, cols: Sequence[Method]) -> dict[str, Any]:
    """What a checkpoint's cells depend on: the commit, the time limit and the columns."""
    return {"commit": rev, "timeout": timeout,
            "columns": [[m.column, m.compressor, json.dumps(m.config, sort_keys=True)]
                        for m in cols]}


def save_checkpoint(path: Path, key: dict[str, Any], cells: Sequence[Cell],
                    started: str, wall: float) -> None:
    """Write the finished cells atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, **key, "started": started, "wall_s": wall,
                               "cells": [asdict(c) for c in cells]}))
    os.replace(tmp, path)


#: A checkpoint holds one small record per cell: a file far past this is not one.
MAX_CHECKPOINT_BYTES = 16 * 2**20


def load_checkpoint(path: Path, key: dict[str, Any], rows: Sequence[Model],
                    ncols: int) -> tuple[list[Cell], str | None, float, str]:
    """The cells of complete rows in ``path`` if it was written for ``key`` (same commit, time
    limit and columns), with the first run's start and wall time; otherwise no cell and why.
    The file is untrusted: size-bounded, JSON only, every field type-checked."""
    if not path.is_file():
        return [], None, 0.0, f"no checkpoint at {path}: starting fresh"
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"checkpoint {path}: {path.stat().st_size:,} bytes, more than a "
                         f"checkpoint can be ({MAX_CHECKPOINT_BYTES:,}); remove it")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a version-1 coverage checkpoint")
        if any(data.get(k) != v for k, v in key.items()):
            changed = [k for k, v in key.items() if data.get(k) != v]
            return [], None, 0.0, (f"checkpoint {path} was written for another "
                                   f"{', '.join(changed)}: starting fresh")
        fields = {"model": str, "method": str, "status": str, "reason": str}
        cells = []
        for raw in data["cells"]:
            if not isinstance(raw, dict) or set(raw) != {*fields, "ratio", "seconds"}:
                raise ValueError("a cell record has unexpected fields")
            if any(not isinstance(raw[k], t) for k, t in fields.items()) or any(
                    raw[k] is not None and not isinstance(raw[k], (int, float))
                    for k in ("ratio", "seconds")):
                raise ValueError("a cell record has a field of the wrong type")
            if raw["status"] not in (OK, REFUSED, FAILED, TIMEOUT):
                raise ValueError(f"unknown cell status {raw['status']!r}")
            cells.append(Cell(**raw))
        started, wall = data["started"], data["wall_s"]
        if not isinstance(started, str) or not isinstance(wall, (int, float)):
            raise ValueError("'started' or 'wall_s' has the wrong type")
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"checkpoint {path} is not readable ({exc}); remove it") from None
    specs = {r.spec for r in rows}
    per_row: dict[str, list[Cell]] = {}
    for c in cells:
        per_row.setdefault(c.model, []).append(c)
    kept = [c for spec, cs in per_row.items() if spec in specs and len(cs) == ncols for c in cs]
    rows_kept = len({c.model for c in kept})
    return kept, started, float(wall), f"resuming: {rows_kept} finished rows from {path}"


# -- the page ----------------------------------------------------------------------------------


def render(cells: Sequence[Cell], rows: Sequence[Model], cols: Sequence[Method]) -> list[str]:
    """The page body: the matrix, the counts per method, and the configs each column ran."""
    from benchmarks.harness import table

    by = {(c.model, c.method): c for c in cells}
    lines = ["## Matrix", ""]
    lines += table(["model", *(m.column for m in cols)],
                   [[r.spec, *(by[r.spec, m.column].text() if (r.spec, m.column) in by else "—"
                               for m in cols)] for r in rows])
    lines += ["## Per method", "",
              "Counts over the rows above; *timm CNN ok* is the share of timm convolutional "
              "rows (families ResNet/RegNet to RepVGG) that are ok.", ""]
    lines += table(["method", "ok", "refused", "FAILED", "timeout", "timm CNN ok"],
                   [summary(cells, rows, m.column) for m in cols])
    lines += ["## Configs", "", "Each column ran one step with this config on top of the "
              "compressor's defaults (seed 0):", ""]
    lines += table(["column", "compressor", "config"],
                   [[m.column, m.compressor, f"`{m.config}`" if m.config else "defaults"]
                    for m in cols])
    return lines


def summary(cells: Sequence[Cell], rows: Sequence[Model], column: str) -> list[Any]:
    """One row of the per-method table: counts per state and the timm CNN ok share."""
    mine = [c for c in cells if c.method == column]
    counts = [sum(c.status == s for c in mine) for s in (OK, REFUSED, FAILED, TIMEOUT)]
    cnn = {r.spec for r in rows if r.cnn}
    cnn_cells = [c for c in mine if c.model in cnn]
    share = (f"{sum(c.status == OK for c in cnn_cells)}/{len(cnn_cells)}" if cnn_cells else "—")
    return [column, *counts, share]


def header(args: argparse.Namespace, rev: str, started: datetime.datetime, wall: float,
           rows: Sequence[Model], timeout: float) -> list[str]:
    """The page header: command, commit, machine, what a cell means and the reduced budgets."""
    command = ("python -m benchmarks.coverage" + (" --quick" if args.quick else "")
               + (f" --jobs {args.jobs}" if args.jobs > 1 else ""))
    return [
        "# Architecture coverage matrix", "",
        f"Produced by `{command}` at commit `{rev}` on {started:%Y-%m-%d %H:%M} UTC"
        + (" (**quick mode**: a subset of the rows; the full list is "
           f"{len(models())} models)" if args.quick else "")
        + f"; every cell below comes from that run ({len(rows)} models).", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; total wall time "
        f"{wall / 60:.1f} min with {args.jobs} cell{'s' if args.jobs > 1 else ''} at a time, "
        f"{cell_threads(args.jobs)} torch thread(s) each"
        + (" (a resumed run: the sum of its parts)" if args.resume else "") + ".", "",
        "Each cell is one process: build the model (random init, nothing downloaded), compress "
        f"it with one step (seed 0), save the artifact; then a fresh interpreter loads every "
        f"artifact of the row and compares outputs on 4 test inputs (relative difference ≤ "
        f"{TOLERANCE:g}). Time limit {timeout:.0f} s per cell.", "",
        "- **ok R x T s**: compressed, saved, reloaded with the same outputs; R is dense fp32 "
        "bytes / artifact bytes, T the compression wall time.",
        "- **refused: reason**: a netshrink validation error (config, selection, model spec, "
        "data) before the model was changed.",
        "- **FAILED: error**: an error mid-run, or a reload that failed or differed "
        "(a finding to fix).",
        "- **timeout**: the cell ran past its time limit and was killed.", "",
        f"Data: images are {N_TRAIN} train / {N_EVAL} val / {N_EVAL} test random 3-channel "
        "images at the row's input size (32 unless the model's patch or window grid needs "
        f"more), 10 classes; transformers use `seq:majority` (the seq-majority task) with "
        f"{N_TRAIN} / {N_EVAL} / {N_EVAL} samples. **Reduced budgets**: methods that train or "
        "search run with the built-in fast configs (netshrink.testing.fast_configs) and the "
        "cuts in the Configs table (normsparse 1 epoch, joint one-shot, rlprune 4 episodes, "
        "bioclust a population of 2), on that small data: the matrix says whether a method "
        "works on an architecture, the benchmark pages say how well. statprune's and rlprune's "
        "own time limits for Torch-Pruning surgery are set below the cell's (240 s and 200 s), "
        "so surgery that does not finish is a refusal naming what was being done.", "",
        "*Structural methods* are those that change the model's structure "
        "(`changes_structure`): normsparse, rlprune in channel mode, statprune, svd and tucker. "
        "A layer whose pruning Torch-Pruning gets wrong (the pruned model no longer runs) is "
        "put back by statprune, left out of rlprune's search and kept as zeros by normsparse, "
        "with the reason in its record, so such a cell is ok with the other layers pruned.",
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"only {len(QUICK)} models (a few minutes): checks the page")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md",
                        help="the page to write (default: docs/coverage.md)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="time limit per cell in seconds (default 300)")
    parser.add_argument("--models", default="",
                        help="comma-separated specs to run instead of the fixed list")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once, each in its own process with the cores "
                             "divided between them (NETSHRINK_THREADS overrides; default 1)")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "out" / "coverage_cells.json",
                        help="finished rows are saved here after each row "
                             "(default out/coverage_cells.json)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the checkpoint's finished rows when it was written at the "
                             "same commit, time limit and columns (otherwise start fresh)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def cell_threads(jobs: int) -> int:
    """torch threads per cell: ``NETSHRINK_THREADS`` when set, else the cores shared by
    ``jobs`` cells."""
    if os.environ.get("NETSHRINK_THREADS"):
        return int(os.environ["NETSHRINK_THREADS"])
    return max(1, (os.cpu_count() or 1) // jobs)


def main(argv: list[str] | None = None) -> Path:
    """Run the matrix and write the page; returns its path."""
    from benchmarks.__main__ import commit

    args = parse(argv)
    rows = models(args.quick)
    if args.models:
        known = {m.spec: m for m in models()}
        rows = [known.get(s, Model(s, "other")) for s in args.models.split(",")]
    cols = methods()
    # Cells fork from this process and keep its torch thread count: one core each at --jobs 2
    # on 2 cores (more threads than cores made heavy cells up to 3x slower).
    torch.set_num_threads(cell_threads(args.jobs))
    rev, t0 = commit(), time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    key = checkpoint_key(rev, args.timeout, cols)
    done: list[Cell] = []
    earlier = 0.0
    if args.resume and "uncommitted" in rev:
        print("not resuming: the working tree has uncommitted changes, so a checkpoint cannot "
              "say which code its cells ran", file=sys.stderr, flush=True)
    elif args.resume:
        done, first_start, earlier, message = load_checkpoint(args.checkpoint, key, rows,
                                                              len(cols))
        started = first_start or started
        print(message, file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(cells: list[Cell]) -> None:
        wall = earlier + time.perf_counter() - t0
        save_checkpoint(args.checkpoint, key, cells, started, wall)
        finished = {c.model for c in cells}
        done_rows = [r for r in rows if r.spec in finished]
        lines = header(args, rev, datetime.datetime.fromisoformat(started), wall, done_rows,
                       args.timeout)
        if len(done_rows) < len(rows):
            lines += ["", f"**Partial: {len(done_rows)} of {len(rows)} rows done so far.**"]
        text = "\n".join([*lines, "", *render(cells, done_rows, cols)]).rstrip() + "\n"
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)

    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        cells = run_matrix(rows, cols, args.timeout, Path(tmp),
                           log=lambda s: print(s, file=sys.stderr, flush=True), on_row=write,
                           jobs=args.jobs, done=done)
    write(cells)  # also when the checkpoint held every row
    print(f"wrote {args.out}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    # Through the imported module, so the cells' processes find run_cell and the dataclasses
    # under benchmarks.coverage rather than __main__.
    from benchmarks.coverage import main as _main

    _main()
