"""Page ``peers``: netshrink's points against every peer library at its best, each peer a curve
over its own main knob, in one run: bytes on disk against test accuracy, and per peer curve
whether netshrink's points dominate it."""

from __future__ import annotations

import statistics
import sys
from types import SimpleNamespace
from typing import Any

from benchmarks import harness as h
from benchmarks import peers as p
from benchmarks.pages import overview

TITLE = "Peers at their best: bytes on disk against accuracy"
OUT = "benchmarks/peers.md"
SEEDS = 3  # the fine-tuned rows (netshrink magnitude, Torch-Pruning): mean ± std over seeds
MODELS = ("lenet5@shapes32",)
QUICK_MODELS = ("lenet5",)
#: The CNNs with a page of their own (``python -m benchmarks peers_<model>`` writes
#: docs/benchmarks/peers_<model>.md): everything there trains on the first
#: ``overview.TRAIN_IMAGES`` training images, as on the per-model overview pages (one epoch of
#: all 50,000 is about 6 min for vgg_small here, and every training peer fine-tunes once per
#: knob value and seed).
CNN_MODELS = ("vgg_small@shapes32", "resnet_small@shapes32", "mobilenetv3_small_100@shapes64",
              "mobilenet_v3_small@shapes64", "shufflenet_v2_x0_5@shapes64")
SPARSITIES = (0.7, 0.9, 0.95)
QUICK_SPARSITIES = (0.9,)
#: netshrink's search (docs/search.md) of per-layer ``quantize`` bit-widths (8, 4, 3, 2) at these
#: budgets, ratios of the dense model: what a user runs to fit a size. Its default selection
#: leaves the classifier head dense. Nothing in it is random, so one run per budget; the budgets
#: share one sensitivity scan.
SEARCH_BUDGETS = ("8x", "12x")
QUICK_SEARCH_BUDGETS = ("8x",)
#: The notes cell of every netshrink row.
NSK_NOTES = "`.nsk` artifact (safetensors, no pickle): reload needs netshrink"
ABOUT = [
    "Each peer runs as a curve over its own main knob (bits, group size, calibration size, "
    "channel ratio, sparsity). Sizes are the bytes of the file each one's docs tell a user to "
    "save, written to a temporary folder and stat-ed (netshrink: the `.nsk` artifact); "
    "\"theoretical\" marks AIMET, whose QuantSim keeps fp32 weights plus an encodings file, "
    "sized as bits × weight parameters + fp32 for the rest; its points keep "
    f"{p.AIMET_ACTIVATION_BITS}-bit activations (AIMET's W·A16 setting), as netshrink's rows "
    "and the other weight peers keep float ones. Ratio = bytes of `torch.save` of "
    "the dense state dict / that size. Everything that trains (netshrink's magnitude rows, "
    "Torch-Pruning, `torch.nn.utils.prune`) gets the same fine-tune: the epochs below, "
    f"lr {p.LR}. Post-training peers do not train.",
    "",
    "The `search` rows are `netshrink.search` with only `quantize`'s options: 8, 4, 3 or 2 bits "
    "per layer (the classifier head left dense, the search's default), chosen under a "
    "size budget given as a ratio of the dense model, no fine-tune (docs/search.md). Nothing "
    "in the search is random, so each budget is one run.",
    "",
    "A peer point is *dominated* when some netshrink point is smaller on disk and its accuracy "
    "is not below the peer's (95% Wilson intervals overlap or netshrink's is higher). The "
    "verdicts below are computed from the table, and every peer point that is not dominated is "
    "named. A peer that failed or is not installed is a row with its reason.",
]


def epochs(quick: bool) -> int:
    """Fine-tune epochs of every row that trains (one epoch of shapes32 is 50,000 images)."""
    return 1


def _step(compressor: str, ft: dict[str, Any] | None = None, **config: Any) -> dict[str, Any]:
    return {"compressor": compressor, "select": h.EVERYTHING, "config": config,
            **({"finetune": ft} if ft else {})}


def ours(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """netshrink's points: label -> (knob, recipe steps)."""
    ft = {"epochs": epochs(quick), "lr": p.LR}

    def magnitude(s: float) -> dict[str, Any]:
        return _step("magnitude", ft, sparsity=s, scope="global")

    out = {f"magnitude {s:.0%} (global) + ft": (f"sparsity {s}", [magnitude(s)])
           for s in (QUICK_SPARSITIES if quick else SPARSITIES)}
    for bits in (8, 4):
        out[f"quantize {bits}-bit/ch"] = (f"bits {bits}", [_step("quantize", bits=bits)])
    if not quick:  # the post-training options of issue 21, against NNCF / AIMET / torchao
        out["quantize 4-bit g32 mse-clip"] = (
            "bits 4, group 32", [_step("quantize", bits=4, group_size=32, clip="mse")])
        out["quantize 4-bit g32 mse-clip gptq"] = (
            "bits 4, group 32, gptq",
            [_step("quantize", bits=4, group_size=32, clip="mse", rounding="gptq")])
        out["quantize 4-bit/ch gptq"] = (
            "bits 4, gptq", [_step("quantize", bits=4, rounding="gptq")])
        # 3 bits with a clipped range: a quarter smaller than 4 bits, for the peers' 4-bit
        # points (AIMET's AdaRound among them) to be compared against.
        out["quantize 3-bit/ch mse-clip gptq"] = (
            "bits 3, gptq", [_step("quantize", bits=3, clip="mse", rounding="gptq")])
        out["quantize W8A8"] = ("bits 8, int8 activations",
                                [_step("quantize", bits=8, activations="int8")])
        out["quantize W4A8 g32 gptq"] = (
            "bits 4, group 32, gptq, int8 activations",
            [_step("quantize", bits=4, group_size=32, clip="mse", rounding="gptq",
                   activations="int8")])
    out["magnitude 90% + ft -> quantize 4-bit"] = (
        "sparsity 0.9, bits 4", [magnitude(0.9), _step("quantize", bits=4)])
    return out


def cases(quick: bool) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every netshrink compression of the page."""
    return {f"{m} / {label}": (m, steps) for m in (QUICK_MODELS if quick else MODELS)
            for label, (_, steps) in ours(quick).items()}


# -- measuring ----------------------------------------------------------------------------------


def ours_rows(model: Any, data: Any, b: h.Bench,
              points: dict[str, tuple[str, list[dict[str, Any]]]] | None = None,
              seeds: int | None = None) -> list[dict[str, Any]]:
    """netshrink's rows: each of ``points`` (default: this page's) compressed once per seed."""
    rows = []
    for label, (knob, steps) in (ours(b.quick) if points is None else points).items():
        print(f"  netshrink: {label}", file=sys.stderr, flush=True)
        row = {"method": label, "library": "netshrink", "curve": "netshrink", "knob": knob}
        try:
            runs = h.compress(model, steps, data, seeds or b.seeds)
        except Exception as exc:  # a failing row is a finding, not a crash
            rows.append({**row, "error": p.failed(label, exc).notes})
            continue
        rows.append({**row, "accs": runs.accs,
                     "bytes": runs.mean(lambda r: r.report.storage_bytes),
                     "notes": NSK_NOTES})
    return rows


def merge(name: str, knobs: tuple[Any, ...], curves: list[list[p.Point]]) -> list[dict[str, Any]]:
    """Rows of one peer from its curve per seed over ``knobs``: accuracy per seed, mean bytes;
    a point that failed in any seed is an error row."""
    peer, rows = p.PEERS[name], []
    for knob, points in zip(knobs, zip(*curves)):
        row = {"method": points[0].label, "library": peer.library, "curve": name,
               "knob": f"{peer.knob} {knob}"}
        bad = next((pt for pt in points if not pt.ok), None)
        if bad is not None:
            rows.append({**row, "error": bad.notes})
        else:
            rows.append({**row, "accs": [pt.accuracy for pt in points],
                         "bytes": statistics.fmean(pt.bytes for pt in points),
                         "notes": points[0].notes})
    return rows


def peer_rows(model: Any, data: Any, b: h.Bench,
              values: dict[str, tuple[Any, ...]] | None = None,
              names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every peer curve (``values``: only these peers, at these knob values; ``names``: only
    these peers, at their own values)."""
    rows = []
    for name, peer in p.PEERS.items():
        if (values is not None and name not in values) or (names is not None
                                                            and name not in names):
            continue
        print(f"  peer: {name}", file=sys.stderr, flush=True)
        seeds = range(b.seeds) if peer.finetunes else range(1)
        knobs = (values[name] if values is not None
                 else peer.quick_values if b.quick else peer.values)
        curves = [p.curve(name, model, data, epochs(b.quick), quick=b.quick, seed=s,
                          values=knobs)
                  for s in seeds]
        rows += merge(name, knobs, curves)
    return rows


def search_rows(model: Any, data: Any, b: h.Bench) -> list[dict[str, Any]]:
    """netshrink's search rows: ``netshrink.search`` over ``quantize``'s per-layer bit-widths
    at each budget of :data:`SEARCH_BUDGETS` (one scan, shared), measured on the test split."""
    rows: list[dict[str, Any]] = []
    table = None
    for budget in QUICK_SEARCH_BUDGETS if b.quick else SEARCH_BUDGETS:
        label = f"search: quantize bits per layer, {budget}"
        print(f"  netshrink: {label}", file=sys.stderr, flush=True)
        row = {"method": label, "library": "netshrink", "curve": "netshrink",
               "knob": f"budget {budget}"}
        try:
            found = h.ns.search(model, data, budget, methods=["quantize"], sensitivity=table,
                                checkpoint=False)
        except h.ns.ConfigError as exc:  # e.g. an unreachable budget: the same on every run
            rows.append({**row, "error": p.failed(label, exc).notes, "finding": True})
            continue
        except Exception as exc:
            rows.append({**row, "error": p.failed(label, exc).notes})
            continue
        table = found.sensitivity
        rows.append({**row, "accs": [found.result.report.accuracy_after],
                     "bytes": found.artifact_bytes,
                     "notes": f"{NSK_NOTES}; deterministic, one run"})
    return rows


# -- verdicts -----------------------------------------------------------------------------------


def dominators(point: dict[str, Any], ours_rows: list[dict[str, Any]], n: int
               ) -> list[dict[str, Any]]:
    """netshrink rows smaller on disk than ``point`` whose accuracy is not below it (95%
    intervals), smallest first."""
    return sorted((o for o in ours_rows if o["bytes"] < point["bytes"]
                   and h.acc_compare(o["accs"], point["accs"], n) != "lower"),
                  key=lambda o: o["bytes"])


def _short(row: dict[str, Any]) -> str:
    return f"{row['method']} ({row['bytes']:,.0f} B, {h.mean_std(row['accs'], 100)}%)"


def verdicts(rows: list[dict[str, Any]], n: int) -> list[str]:
    """Per peer curve, in words: dominated by netshrink's points or not, naming every peer
    point that is not dominated and what dominates each one that is."""
    mine = [r for r in rows if r["curve"] == "netshrink" and "error" not in r]
    lines = []
    for name in p.PEERS:
        points = [r for r in rows if r["curve"] == name]
        measured = [r for r in points if "error" not in r]
        if not points:
            continue
        if not measured:
            lines.append(f"- **{name}**: no point measured ({points[0]['error']}).")
            continue
        free = [r for r in measured if not dominators(r, mine, n)]
        beaten = [f"{r['knob']} by {dominators(r, mine, n)[0]['method']}" for r in measured
                  if r not in free]
        unrun = len(points) - len(measured)
        tail = f" ({unrun} point(s) failed: not compared)" if unrun else ""
        if not free:
            lines.append(f"- **{name}**: **dominated** by netshrink — every measured point has a "
                         f"smaller netshrink point at an accuracy not below it "
                         f"({'; '.join(beaten)}){tail}.")
        else:
            lines.append(
                f"- **{name}**: **not dominated** — no netshrink point is smaller at an "
                f"accuracy not below {', '.join(_short(r) for r in free)}"
                + (f"; dominated: {'; '.join(beaten)}" if beaten else "") + f"{tail}.")
    return lines


# -- the page -----------------------------------------------------------------------------------


def _acc(row: dict[str, Any]) -> float:
    return 100 * statistics.fmean(row["accs"])


def draw(ax: Any, rows: list[dict[str, Any]], dense: dict[str, Any], title: str) -> None:
    """Bytes on disk (log) against accuracy: one line per curve, the dense model a star."""
    ok = [r for r in rows if "error" not in r]
    for curve in dict.fromkeys(r["curve"] for r in ok):
        pts = sorted((r for r in ok if r["curve"] == curve), key=lambda r: r["bytes"])
        if curve == "netshrink":  # separate methods: the points and their Pareto front
            ax.scatter([r["bytes"] for r in pts], [_acc(r) for r in pts], marker="*", s=140,
                       zorder=4, label="netshrink")
            front = [r for i, r in enumerate(pts) if all(_acc(r) > _acc(q) for q in pts[:i])]
            ax.plot([r["bytes"] for r in front], [_acc(r) for r in front], "--", linewidth=2,
                    label="netshrink Pareto front")
        else:
            ax.plot([r["bytes"] for r in pts], [_acc(r) for r in pts], marker="o",
                    markersize=5, linewidth=1.2, alpha=0.85, label=curve)
    ax.scatter([dense["bytes"]], [100 * dense["accs"][0]], marker="X", s=90, color="black",
               label="dense fp32", zorder=5)
    ax.set(xscale="log", xlabel="bytes on disk (log)", ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize=7, ncol=2)


def _cells(r: dict[str, Any], dense_bytes: float, n: int) -> list[str]:
    if "error" in r:
        return [r["method"], r["library"], r["knob"], "—", "—", "—", r["error"]]
    return [r["method"], r["library"], r["knob"], f"{r['bytes']:,.0f}",
            f"{dense_bytes / r['bytes']:.1f}x", h.acc_cell(r["accs"], n), r["notes"]]


def dense_row(model: Any, data: Any) -> dict[str, Any]:
    """The reference model as a row: its ``torch.save``-d state dict and test accuracy."""
    return {"method": "dense (fp32 state_dict)", "library": "torch", "curve": "dense",
            "knob": "—", "bytes": p.file_bytes(model.state_dict()),
            "accs": [h.ns.accuracy(model, data)], "notes": "reference"}


def section(b: h.Bench, m: str, heading: str, plot: str, dense: dict[str, Any],
            rows: list[dict[str, Any]], n: int, extra: list[str] | None = None) -> list[str]:
    """One model's part of a page: the heading, the table, the plot (``<plot>_<m>.png``),
    ``extra`` lines, and whether netshrink dominates each peer curve."""
    path, link = b.plot(f"{plot}_{m}.png")
    spec = h.MODELS[m][0]
    h.save_plot(lambda ax: draw(ax, rows, dense, spec), path, (9, 5.5))
    return [
        heading, "",
        *h.table(["method", "library", "knob", "bytes on disk", "ratio vs dense",
                  "test acc [95% CI]", "reload / notes"],
                 [_cells(r, dense["bytes"], n) for r in [dense, *rows]]),
        f"![bytes on disk against accuracy, {m}]({link})", "",
        *(extra or []),
        "Does netshrink dominate each peer curve?", "", *verdicts(rows, n), ""]


def run(b: h.Bench) -> list[str]:
    """Per model: netshrink's points and every peer curve, the table, the plot, the verdicts
    (each point and curve a saved row: see :func:`saved_rows`)."""
    lines: list[str] = []
    for m in QUICK_MODELS if b.quick else MODELS:
        print(f"[{m}]", file=sys.stderr, flush=True)
        model, data = h.reference(m)
        rows = saved_rows(b, m, model, data)
        spec, data_name, _ = h.MODELS[m]
        heading = f"## {m} (`{spec}` on `{data_name}`, {epochs(b.quick)} fine-tune epoch(s))"
        lines += section(b, m, heading, "peers", dense_row(model, data), rows, len(data.test))
    return lines


# -- one page per CNN ---------------------------------------------------------------------------


def _saved(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows as one :meth:`Bench.row` value; with an ``error`` key (so not saved, and measured
    again by a rerun) when any of them failed. An error row marked ``finding`` (a
    ``ConfigError`` from the search, e.g. an unreachable budget: the same on every run) does
    not count as a failure."""
    failed = [r["error"] for r in rows if "error" in r and not r.get("finding")]
    return {"rows": rows, **({"error": failed[0]} if failed else {})}


def saved_rows(b: h.Bench, m: str, model: Any, data: Any) -> list[dict[str, Any]]:
    """Every netshrink point, the search's points and every peer curve of ``m``, each a saved
    row, so an interrupted run at the same commit resumes (:meth:`Bench.row`)."""
    rows: list[dict[str, Any]] = []
    for label, point in ours(b.quick).items():
        rows += b.row(f"{m} / netshrink / {label}", lambda label=label, point=point: _saved(
            ours_rows(model, data, b, {label: point})))["rows"]
    rows += b.row(f"{m} / netshrink / search", lambda: _saved(search_rows(model, data, b)))["rows"]
    for name in p.PEERS:
        rows += b.row(f"{m} / peer / {name}", lambda name=name: _saved(
            peer_rows(model, data, b, names=(name,))))["rows"]
    return rows


def model_run(b: h.Bench, m: str) -> list[str]:
    """One CNN's page body: as :func:`run`, on the first ``overview.TRAIN_IMAGES`` training
    images, each netshrink point and each peer curve a saved row (:func:`saved_rows`)."""
    print(f"[{m}]", file=sys.stderr, flush=True)
    model, data = h.reference(m)
    data = overview.train_subset(data, b.quick)
    rows = saved_rows(b, m, model, data)
    spec, data_name, _ = h.MODELS[m]
    heading = (f"## {m} (`{spec}` on `{data_name}`, {epochs(b.quick)} fine-tune epoch(s) of "
               f"{len(data.train):,} training images)")
    return section(b, m, heading, "peers", dense_row(model, data), rows, len(data.test))


def model_page(m: str) -> SimpleNamespace:
    """The page spec of one CNN (``python -m benchmarks peers_<model>``)."""
    spec, data_name, _ = h.MODELS[m]
    about = [
        f"The peers page's curves on `{spec}` trained on `{data_name}` (docs/datasets.md), "
        f"everything that trains on the first {overview.TRAIN_IMAGES:,} training images "
        "(validation and test splits whole); quick mode: 2,000 training and test images, one "
        "seed, fewer points.", "", *ABOUT]
    return SimpleNamespace(
        TITLE=f"Peers at their best: {m}", OUT=f"benchmarks/peers_{m}.md", ABOUT=about,
        SEEDS=3, run=lambda b: model_run(b, m),
        cases=lambda quick: {f"{m} / {label}": (m, steps)
                             for label, (_, steps) in ours(quick).items()})
