"""What every benchmark page shares: models and data, runs over seeds, intervals, latency,
tables, plots, fresh-process isolation. Pages use the public ``netshrink`` API only."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.utils.benchmark as tbench
from torch import nn
from torch.utils.data import Subset

import netshrink as ns

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"

#: name -> (model spec, dataset, reference-training options); one reference per model for
#: every page (timm's resnet18 trains 8 epochs on digits32, vgg_small 5 and resnet_small 4 on
#: shapes32; the other zoo models use their defaults).
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "lenet300": ("zoo:lenet300", "digits28", {}),
    "lenet5": ("zoo:lenet5", "digits28", {}),
    "vgg_small": ("zoo:vgg_small", "digits32", {}),
    "resnet_small": ("zoo:resnet_small", "digits32", {}),
    "resnet18": ("timm:resnet18", "digits32", {"epochs": 8}),
    # The hard dataset (docs/datasets.md): vgg_small and resnet_small train 5 and 4 epochs, as in
    # their difficulty rows.
    "lenet5@shapes32": ("zoo:lenet5", "shapes32", {}),
    "vgg_small@shapes32": ("zoo:vgg_small", "shapes32", {"epochs": 5}),
    "resnet_small@shapes32": ("zoo:resnet_small", "shapes32", {"epochs": 4}),
    # An ImageNet-style timm CNN (32x downsampling: 1x1 features at 32x32), 6 epochs; it stays
    # below the 85% band there (docs/datasets.md).
    "regnetx_002@shapes32": ("timm:regnetx_002", "shapes32", {"epochs": 6}),
    # RGB ImageNet-style CNNs at 64x64 (2x2 final features), with the epochs of their rows in
    # the difficulty table of docs/datasets.md (the default 15, in the band; regnetx_002: 10,
    # below it).
    "mobilenet_v3_small@shapes64": ("torchvision:mobilenet_v3_small", "shapes64", {}),
    "shufflenet_v2_x0_5@shapes64": ("torchvision:shufflenet_v2_x0_5", "shapes64", {}),
    "mobilenetv3_small_100@shapes64": ("timm:mobilenetv3_small_100", "shapes64", {}),
    "regnetx_002@shapes64": ("timm:regnetx_002", "shapes64", {"epochs": 10}),
}
EVERYTHING = {"types": ["Conv2d", "Linear"], "protect_head": False}
#: Set to "1" by the runner when it silenced netshrink's progress on its own (the user had not
#: set ``NETSHRINK_PROGRESS``): :func:`reference` then still prints its training epochs.
REFERENCE_LINES = "NETSHRINK_BENCH_REFERENCE_LINES"


@functools.cache
def reference(model: str) -> tuple[nn.Module, ns.DataSplits]:
    """The cached reference model of ``model`` (a key of :data:`MODELS`) and its data."""
    spec, data_name, options = MODELS[model]
    data = ns.datasets.load(data_name)
    # The runner silences netshrink's progress (one line per fine-tune epoch of every row would
    # bury the page's own lines), but a reference that is not cached yet trains for up to half an
    # hour: its epoch lines stay on, unless the user silenced progress themselves.
    lines = {"NETSHRINK_PROGRESS": ""} if os.environ.get(REFERENCE_LINES) == "1" else {}
    with mock.patch.dict(os.environ, lines):
        return ns.reference_model(spec, data, **options), data


def recipe_steps(name: str, **finetune: Any) -> list[dict[str, Any]]:
    """The steps of ``recipes/<name>``, its recipe-level fine-tune folded into the last step
    (``finetune`` overrides fields of it, e.g. fewer epochs in quick mode)."""
    recipe = ns.Recipe.from_file(RECIPES / name)
    steps = [s.model_dump(exclude_unset=True) for s in recipe.steps]
    if recipe.finetune is not None:
        steps[-1]["finetune"] = {**recipe.finetune.model_dump(exclude_unset=True), **finetune}
    return steps


def fresh_cache(path: Path) -> Any:
    """A context pointing ``NETSHRINK_CACHE`` at ``path``, so no search checkpoint of an
    earlier run is resumed (load the reference models before it)."""
    return mock.patch.dict(os.environ, NETSHRINK_CACHE=str(path))


def cases_by_model(
    cases: dict[str, tuple[str, list[dict[str, Any]]]],
) -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    """A page's ``cases`` (``"model / name"`` -> (model, steps)) grouped by model, in order:
    model -> [(name, steps), ...]."""
    grouped: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for label, (model, steps) in cases.items():
        grouped.setdefault(model, []).append((label.split(" / ", 1)[1], steps))
    return grouped


# -- runs over seeds ---------------------------------------------------------------------------


@dataclass
class Runs:
    """One configuration compressed once per seed (0, 1, ...): results, wall times, test n."""

    #: Per seed; :class:`SavedResult` when the runs came through :meth:`Bench.runs`.
    results: list[ns.CompressionResult | SavedResult]
    walls: list[float]
    n: int
    #: Seeds 0 and 1 gave identical weights, so no further seed was run.
    deterministic: bool = False

    @property
    def first(self) -> ns.CompressionResult | SavedResult:
        """The seed-0 result (the one timed and plotted)."""
        return self.results[0]

    @property
    def accs(self) -> list[float]:
        """Test accuracy per seed."""
        return [r.report.accuracy_after for r in self.results]

    def acc(self) -> str:
        """Test accuracy: mean ± std over seeds and the 95% interval with its n."""
        return acc_cell(self.accs, self.n)

    @property
    def wall(self) -> float:
        """Mean wall time per seed (s)."""
        return statistics.fmean(self.walls)

    def delta(self) -> str:
        """Mean accuracy change against the uncompressed model, in points."""
        return f"{100 * (statistics.fmean(self.accs) - self.first.report.accuracy_before):+.2f}"

    def mean(self, figure: Callable[[ns.CompressionResult], float]) -> float:
        """Mean over seeds of ``figure(result)``."""
        return statistics.fmean(figure(r) for r in self.results)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold the same tensors under the same names, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k])
        for k in sa)


def say(message: str) -> None:
    """``[HH:MM:SS] message`` on stderr, flushed: pages run for tens of minutes, often with
    stdout in a log."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compress(model: nn.Module, steps: Any, data: ns.DataSplits, seeds: int = 1) -> Runs:
    """``ns.compress`` once per seed (no latency: pages time models with :func:`speedups`).
    When seeds 0 and 1 give identical weights (every tensor of the compressed models equal;
    the artifacts differ only in the recipe's seed) the configuration does not depend on the
    seed, and the remaining seeds are not run (``Runs.deterministic``; the page header says
    so): on the shapes pages the post-training rows took a third of the time for nothing."""
    results, walls = [], []
    for seed in range(seeds):
        t0 = time.perf_counter()
        results.append(ns.compress(model, steps, data=data, seed=seed, latency=False))
        walls.append(time.perf_counter() - t0)
        rep = results[-1].report
        assert len(results[-1].artifact) == rep.storage_bytes
        names = " -> ".join(str(s["compressor"] if isinstance(s, dict) else
                                getattr(s, "compressor", type(s).__name__))
                            for s in (steps if isinstance(steps, list) else [steps]))
        say(f"{names} on {data.name}, seed {seed}: {walls[-1]:.0f} s, test "
            f"{100 * rep.accuracy_after:.2f}%, {rep.compression_ratio:.2f}x")
        if seed == 1 and seeds > 2 and same_weights(results[0].model, results[1].model):
            print(f"  seeds 0 and 1 gave the same weights: deterministic, seeds 2-{seeds - 1} "
                  "not run", file=sys.stderr, flush=True)
            return Runs(results, walls, len(data.test), deterministic=True)
    return Runs(results, walls, len(data.test))


# -- statistics --------------------------------------------------------------------------------


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` examples (the one
    netshrink's report uses)."""
    return ns.wilson_interval(p, n, z)


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (one value: the value alone)."""
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def acc_cell(accs: Sequence[float], n: int) -> str:
    """Accuracy in %: mean ± std over seeds, and the 95% Wilson interval of the mean on the
    ``n`` test examples (every seed sees the same ones, so n does not grow with seeds)."""
    lo, hi = wilson(statistics.fmean(accs), n)
    return f"{mean_std(accs, 100)}% [{100 * lo:.1f}, {100 * hi:.1f}] n={n}"


def acc_compare(a: Sequence[float], b: Sequence[float], n: int) -> str:
    """'higher' / 'lower' when the 95% intervals of ``a`` and ``b`` do not overlap, else
    'indistinguishable' (no verdict the interval cannot support)."""
    (alo, ahi), (blo, bhi) = (wilson(statistics.fmean(x), n) for x in (a, b))
    return "higher" if alo > bhi else "lower" if ahi < blo else "indistinguishable"


def at_least(accs: Sequence[float], n: int, threshold: float) -> str:
    """Whether accuracy ≥ ``threshold``: **met** / **missed** when the interval decides it,
    else 'undecided at n=...'."""
    lo, hi = wilson(statistics.fmean(accs), n)
    return "**met**" if lo >= threshold else "**missed**" if hi < threshold else (
        f"undecided at n={n}")


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage."""
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def params(model: nn.Module) -> int:
    """Parameter count."""
    return sum(p.numel() for p in model.parameters())


def zero_share(model: nn.Module, kind: type[nn.Module] = nn.Conv2d) -> float:
    """Fraction of zero weights over every ``kind`` layer of ``model``."""
    weights = [m.weight for m in model.modules() if isinstance(m, kind)]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


# -- latency: the one timing helper ------------------------------------------------------------


@dataclass
class Spread:
    """A latency ratio: the median over interleaved rounds, and the lowest and highest round."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}–{self.high:.2f})"


@torch.inference_mode()
def speedups(
    dense: nn.Module,
    models: dict[str, nn.Module],
    example: torch.Tensor,
    batches: Sequence[int] = (1, 64),
    rounds: int = 5,
    min_time: float = 0.05,
) -> dict[str, dict[int, Spread]]:
    """Dense latency / model latency per batch size, each a :class:`Spread` over ``rounds``
    rounds; every round times the dense model and each model in turn
    (``torch.utils.benchmark.Timer.blocked_autorange``), so background load hits all alike."""
    every = {"(dense)": dense, **models}
    for m in every.values():
        m.eval()
    out: dict[str, dict[int, Spread]] = {name: {} for name in models}
    for batch in batches:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        ms: dict[str, list[float]] = {name: [] for name in every}
        for _ in range(rounds):
            for name, m in every.items():
                timer = tbench.Timer("m(x)", globals={"m": m, "x": x},
                                     num_threads=torch.get_num_threads())
                ms[name].append(timer.blocked_autorange(min_run_time=min_time).median)
        for name in models:
            ratios = sorted(d / c for d, c in zip(ms["(dense)"], ms[name]))
            out[name][batch] = Spread(statistics.median(ratios), ratios[0], ratios[-1])
    return out


# -- markdown, plots ---------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table (cells are str()-ed; '|' inside a cell becomes '/')."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]


def save_plot(draw: Callable[[Any], None], path: Path, size: tuple[float, float] = (8, 5),
              nrows: int = 1) -> Path:
    """Draw with ``draw(ax)`` (``nrows`` > 1: an array of Axes sharing x) and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(nrows, 1, figsize=size, sharex=True)
    draw(ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: A saved row larger than this is not a row this harness wrote: it is measured again.
MAX_ROW_BYTES = 1_000_000


def _row_name(key: str) -> str:
    """The file name (without suffix) a row saved under ``key`` gets."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class SavedResult:
    """One seed of a saved :class:`Runs` (:meth:`Bench.runs`): what the pages read of a
    :class:`netshrink.CompressionResult`. ``model`` is the model loaded from the artifact (seed
    0 only; ``None`` for the others)."""

    report: ns.Report
    records: list[ns.LayerRecord]
    model: nn.Module | None = None


def _runs_json(runs: Runs) -> dict[str, Any]:
    """A :class:`Runs` as JSON: per seed the report and the layer records; the SHA-256 of seed
    0's artifact (the artifact itself is a side file)."""
    return {"walls": runs.walls, "n": runs.n, "deterministic": runs.deterministic,
            "artifact_sha256": hashlib.sha256(runs.first.artifact).hexdigest(),
            "results": [{"report": r.report.model_dump(mode="json"),
                         "records": [dataclasses.asdict(rec) for rec in r.records]}
                        for r in runs.results]}


def _runs_from_json(saved: dict[str, Any], artifact: Path) -> Runs:
    """The :class:`Runs` :func:`_runs_json` wrote, seed 0's model loaded from ``artifact``
    (untrusted: its hash must match, and :func:`netshrink.load` validates it)."""
    with artifact.open("rb") as f:  # streamed: the file is not trusted to be small
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != saved["artifact_sha256"]:
        raise ValueError(f"{artifact.name} does not match the saved row's artifact_sha256")
    results = [SavedResult(ns.Report.model_validate(r["report"]),
                           [ns.LayerRecord(**rec) for rec in r["records"]])
               for r in saved["results"]]
    if not results:
        raise ValueError("the saved row has no results")
    results[0].model = ns.load(artifact).eval()
    return Runs(results, [float(w) for w in saved["walls"]], int(saved["n"]),
                deterministic=bool(saved["deterministic"]))


@dataclass
class Bench:
    """What a page's ``run`` receives: the mode, the seeds, where its page and plots go, and
    where finished rows persist (``rows``; ``None``: nothing is saved or resumed)."""

    quick: bool
    seeds: int
    page: Path
    tmp: Path
    rows: Path | None = None
    #: The keys of the rows :meth:`row` took from an earlier, interrupted run.
    resumed: list[str] = field(default_factory=list)

    def row(self, key: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``measure()``, saved under ``key`` in :attr:`rows`; a row an earlier run of the same
        page at the same commit saved there is returned instead of measured again. Rows with an
        ``"error"`` are not saved (a rerun tries them again); a saved file that is not a row
        this harness wrote for ``key`` (unreadable, too large, another key) is measured again.
        Values are saved as JSON (anything else as its ``str``)."""
        path = self._file(key, ".json")
        if path is not None and path.is_file() and path.stat().st_size <= MAX_ROW_BYTES:
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict) and saved.get("key") == key \
                    and isinstance(saved.get("row"), dict):
                self.resumed.append(key)
                return saved["row"]
        out = measure()
        if path is not None and "error" not in out:
            ns.atomic_write(path, json.dumps({"key": key, "row": out}, default=str))
        return out

    def _file(self, key: str, suffix: str) -> Path | None:
        """Where the row saved under ``key`` keeps its ``suffix`` file (``None``: no rows)."""
        return self.rows / f"{_row_name(key)}{suffix}" if self.rows else None

    def runs(self, key: str, model: nn.Module, steps: Any, data: ns.DataSplits,
             seeds: int = 1) -> Runs:
        """:func:`compress`, saved under ``key`` like :meth:`row` (a rerun of the same page at
        the same commit resumes it): each seed's report and layer records, and seed 0's
        artifact in a side file next to the row. ``first.model`` is always the model loaded
        from that artifact (also on a fresh run), so a resumed page measures what a fresh one
        does; the other seeds keep no model. A row whose side file is missing or does not match
        the artifact's recorded SHA-256 is measured again."""
        artifact = self._file(key, ".nsk") or self.tmp / "runs" / f"{_row_name(key)}.nsk"

        def measure() -> dict[str, Any]:
            runs = compress(model, steps, data, seeds)
            ns.atomic_write(artifact, runs.first.artifact)
            return _runs_json(runs)

        before = len(self.resumed)
        saved = self.row(key, measure)
        try:
            return _runs_from_json(saved, artifact)
        except (OSError, ValueError, TypeError, KeyError, ns.NetshrinkError) as exc:
            if len(self.resumed) == before or self.rows is None:
                raise  # just measured: a failure to reload is a bug, not a stale row
            print(f"  saved row {key!r} not usable ({exc}): measured again", file=sys.stderr,
                  flush=True)
            self.resumed.pop()
            self._file(key, ".json").unlink(missing_ok=True)
            return _runs_from_json(self.row(key, measure), artifact)

    def plot(self, name: str) -> tuple[Path, str]:
        """Path for a plot next to the page, and the link to it from the page."""
        path = self.page.parent / name
        return path, path.relative_to(self.page.parent).as_posix()


# -- what the stand-alone ablation scripts share ----------------------------------------------

#: ``--quick`` data sizes of the ablation scripts (they check the script, not its figures).
QUICK_SPLITS = {"train": 2000, "val": 1000, "test": 2000}
SAME = "equal within the 95% intervals"


def set_threads() -> None:
    """Use ``NETSHRINK_THREADS`` torch threads when it is set (timing on a shared machine)."""
    if os.environ.get("NETSHRINK_THREADS"):
        torch.set_num_threads(int(os.environ["NETSHRINK_THREADS"]))


def subset(data: ns.DataSplits, sizes: dict[str, int]) -> ns.DataSplits:
    """``data`` with only the first ``sizes[split]`` examples of each split."""
    return dataclasses.replace(data, **{split: Subset(data.split(split), range(
        min(n, len(data.split(split))))) for split, n in sizes.items()})


def span(values: Sequence[int], scale: float = 1.0, fmt: str = ",.0f") -> str:
    """One value, or ``min–max`` when the seeds differ."""
    lo, hi = min(values) / scale, max(values) / scale
    return f"{lo:{fmt}}" if lo == hi else f"{lo:{fmt}}–{hi:{fmt}}"


def verdict(a: Sequence[float], b: Sequence[float], n: int) -> str:
    """:func:`acc_compare` in words: higher / lower, or equal within the intervals."""
    out = acc_compare(a, b, n)
    return SAME if out == "indistinguishable" else out


# -- what a page ran on ------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def data_digests(text: str) -> list[str]:
    """``shapes<px> (v<version>, seed 0) <SHA-256>`` for each generated shapes set that ``text``
    names (a ``-gray`` variant by its RGB source): the digest of the data as loaded, verified
    against its cache file, over the parameters and every tensor. Two machines with the same
    digest rendered the same data (docs/datasets.md lists one). Each named set is loaded in this
    process (from the cache the page's rows filled; rendered first if it is not there). A set
    that does not load is left out."""
    out = []
    for px in sorted({int(m) for m in re.findall(r"\bshapes(\d+)", text)}):
        try:
            extra = ns.datasets.load(f"shapes{px}").extra
        except ns.NetshrinkError:  # not a registered size
            continue
        digest = str(extra.get("sha256", ""))
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            out.append(f"`shapes{px}` (v{extra.get('generator_version')}, seed "
                       f"{extra.get('seed')}) {digest}")
    return out


# -- a fresh interpreter per measurement -------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    """``field`` (``VmRSS``, ``VmHWM``) of /proc/self/status in MB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Reset this process's peak-RSS mark to what is resident now (Linux: ``5`` into
    /proc/self/clear_refs) and return that resident size in MB, or None where the kernel does not
    allow it. With :func:`peak_rss_since_reset` it measures one step's own peak, without the
    transient of loading the data before it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    return _proc_status_mb("VmRSS")


def peak_rss_since_reset() -> float | None:
    """This process's peak RSS in MB since :func:`reset_peak_rss` (``VmHWM``)."""
    return _proc_status_mb("VmHWM")


def _child(conn: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    set_threads()
    try:
        out = fn(*args)
    except Exception as exc:  # a failing measurement is a row of the page, not a crash
        out = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send(out)


def isolated(fn: Callable[..., dict[str, Any]], *args: Any, timeout: float) -> dict[str, Any]:
    """``fn(*args)`` in a fresh interpreter, so its peak memory is its own; an exception or a
    timeout comes back as ``{"error": ...}``."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            return parent.recv()
        return {"error": f"timed out after {timeout:.0f} s"}
    except EOFError:
        return {"error": f"the worker died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
