"""The benchmark harness: every page's compressions plan on their models, pages use only the
public API, the statistics are right, and the runner writes a page with command and commit."""

from __future__ import annotations

import ast
import io
import subprocess
import types
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import netshrink as ns
from netshrink.cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    """The ``benchmarks`` package (it lives at the repository root, not in the install)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.__main__ as runner
    from benchmarks import harness
    from benchmarks.pages import PAGES

    return types.SimpleNamespace(runner=runner, h=harness, PAGES=PAGES)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_page_case_plans_on_its_model(bench, quick, tmp_path, small_shapes):
    """Compressor names, config fields and selectors of every compression a page runs are valid
    for its model (`netshrink validate`), so a long run cannot die on a typo an hour in."""
    checked, seen = 0, set()
    for page_name, page in bench.PAGES.items():
        for label, (model, steps) in page.cases(quick).items():
            spec, data, _ = bench.h.MODELS[model]
            if spec.startswith("timm:"):
                pytest.importorskip("timm")
            text = yaml.safe_dump({"steps": steps})
            if (spec, data, text) in seen:  # pages share cases: each is validated once
                continue
            seen.add((spec, data, text))
            recipe = tmp_path / "r.yaml"
            recipe.write_text(text)
            args = ["validate", str(recipe), "--model", spec, "--data", data]
            out = CliRunner().invoke(cli, args)
            assert out.exit_code == 0, f"{page_name} / {label}: {out.output}{out.exception or ''}"
            checked += 1
    assert checked > 30


def test_bioclust_stem_override_matches_the_first_conv_of_every_shapes_model(bench):
    """The overview pages label bioclust "8-bit stem": its stem pattern must name each shapes
    model's first conv (and nothing else), whatever the family calls it."""
    from netshrink.selector import name_matches

    pytest.importorskip("timm")
    from benchmarks.pages import overview

    (stem, _), *_ = overview.BIOCLUST_8BIT.items()
    for model in overview.SHAPES_MODELS:
        convs = [n for n, m in ns.load_model(bench.h.MODELS[model][0]).named_modules()
                 if isinstance(m, torch.nn.Conv2d)]
        assert [n for n in convs if name_matches(stem, n)] == convs[:1], model


def test_overview_row_time_limit_grows_with_the_seeds(bench, tmp_path, monkeypatch):
    """An overview row runs all its seeds in one interpreter: its time limit is per seed (a
    single hour for three seeds timed out normsparse -> bioclust on resnet_small@shapes32)."""
    from benchmarks.pages import overview

    limits = []
    monkeypatch.setattr(overview.h, "isolated", lambda *a, timeout: (
        limits.append(timeout), {"error": "not measured"})[1])
    b = bench.h.Bench(quick=True, seeds=3, page=tmp_path / "p.md", tmp=tmp_path)
    text = "\n".join(overview.section(b, "lenet300"))
    assert limits and set(limits) == {3 * overview.ROW_SECONDS_PER_SEED}
    assert "| dense | - | failed: not measured |" in text


def _netshrink_uses(tree: ast.AST) -> list[str]:
    """Every netshrink name a module imports or reads (``ns.X``, ``h.ns.X``)."""
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used += [a.name for a in node.names if a.name.startswith("netshrink")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("netshrink"):
            used += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and (
            (isinstance(node.value, ast.Name) and node.value.id == "ns")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "ns")
        ):
            used.append(f"netshrink.{node.attr}")
    return used


def test_benchmarks_use_only_the_public_api():
    """No ``netshrink.<submodule>`` import, no name outside ``netshrink.__all__`` (and the
    plugin authors' testing kit, ``netshrink.testing.__all__``)."""
    import netshrink.testing as kit

    allowed = {"netshrink", *(f"netshrink.{n}" for n in ns.__all__), "netshrink.testing",
               *(f"netshrink.testing.{n}" for n in kit.__all__)}
    files = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) >= 10
    bad = [f"{f.relative_to(ROOT)}: {name}" for f in files
           for name in _netshrink_uses(ast.parse(f.read_text())) if name not in allowed]
    assert not bad, bad
    # The check itself can fail:
    assert _netshrink_uses(ast.parse("from netshrink.training import evaluate")) == [
        "netshrink.training.evaluate"]


def test_intervals_and_verdicts(bench):
    h = bench.h
    lo, hi = h.wilson(0.5, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    assert h.wilson(1.0, 360)[1] == 1.0 and h.wilson(1.0, 360)[0] > 0.98
    # Seeds share the test set: the interval is on its n, however many seeds.
    assert h.acc_cell([0.9, 0.92], 360) == "91.00 ± 1.41% [87.6, 93.5] n=360"
    assert h.acc_compare([0.99], [0.90], 360) == "higher"
    assert h.acc_compare([0.90], [0.99], 360) == "lower"
    assert h.acc_compare([0.97], [0.98], 360) == "indistinguishable"
    assert h.at_least([0.99], 360, 0.95) == "**met**"
    assert h.at_least([0.90], 360, 0.95) == "**missed**"
    assert h.at_least([0.95], 360, 0.95).startswith("undecided")


def test_isolated_turns_failures_into_rows(bench):
    out = bench.h.isolated(bench.h.reference, "no-such-model", timeout=120)
    assert out["error"].startswith("KeyError") and out["peak_rss_mb"] > 0
    assert bench.h.isolated(bench.h.reference, "lenet300", timeout=0.01) == {
        "error": "timed out after 0 s"}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's clear_refs")
def test_a_methods_peak_excludes_what_came_before_the_reset(bench):
    """The overview's "method's peak" column: a transient before the reset does not count, an
    allocation after it does (the whole-process peak was the same on every shapes64 row)."""
    h = bench.h
    before = b"x" * (300 * 2**20)  # a 300 MB transient, like loading the data
    del before
    loaded = h.reset_peak_rss()
    assert loaded is not None and h.peak_rss_since_reset() - loaded < 100
    during = b"y" * (200 * 2**20)
    assert 150 < h.peak_rss_since_reset() - loaded < 400
    del during


def test_page_header_names_the_cpu_and_the_digest_of_the_data_it_names(bench, monkeypatch):
    """References trained on two machines differed (docs/datasets.md): a page records the CPU
    and the digest of each generated set its text names, read from the data as loaded (a -gray
    variant by its RGB source), valid digests only."""
    h = bench.h
    digests = {"shapes32": "2" * 64, "shapes64": "not hex"}
    asked = []

    def load(name):
        asked.append(name)
        if name not in digests:
            raise ns.UnknownNameError("dataset", name, digests)
        extra = {"sha256": digests[name], "generator_version": 2, "seed": 0}
        return types.SimpleNamespace(extra=extra)

    monkeypatch.setattr(h.ns.datasets, "load", load)
    line = f"`shapes32` (v2, seed 0) {'2' * 64}"
    assert h.data_digests("LeNet-5 on shapes32 and shapes32-gray") == [line]
    assert asked == ["shapes32"]
    assert h.data_digests("shapes32, shapes64 and shapes16") == [line]
    assert h.data_digests("digits28 only") == []
    assert isinstance(h.cpu_model(), str) and h.cpu_model()


def test_reference_training_prints_its_epochs_while_the_runner_silences_rows(
        bench, tmp_path, monkeypatch, capsys):
    """The runner sets NETSHRINK_PROGRESS=0 for the rows; a reference that is not cached still
    prints a line per epoch, unless the user silenced progress (no REFERENCE_LINES then)."""
    h = bench.h
    monkeypatch.setattr(h, "MODELS", {"m": ("zoo:lenet300", "digits28", {"epochs": 2})})
    monkeypatch.setenv("NETSHRINK_PROGRESS", "0")
    for cache, lines, expected in (("a", "1", 2), ("b", None, 0)):
        monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / cache))
        if lines:
            monkeypatch.setenv(h.REFERENCE_LINES, lines)
        else:
            monkeypatch.delenv(h.REFERENCE_LINES, raising=False)
        h.reference.__wrapped__("m")
        err = capsys.readouterr().err
        assert err.count("training reference zoo:lenet300 on digits28: epoch") == expected, err
    assert h.ns.progress.enabled() is False  # the user's setting is back after the reference


def test_compress_reports_each_seed_on_stderr(bench, capsys):
    """Long pages show progress in a log: one line per seed with time, accuracy and ratio."""
    model, data = bench.h.reference("lenet300")
    runs = bench.h.compress(model, [{"compressor": "magnitude", "config": {"sparsity": 0.5}},
                                    ns.step("quantize", bits=4)], data, seeds=2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    for seed, line in enumerate(lines):
        acc, ratio = 100 * runs.accs[seed], runs.results[seed].report.compression_ratio
        assert f"magnitude -> quantize on {data.name}, seed {seed}: " in line
        assert f"test {acc:.2f}%" in line and f"{ratio:.2f}x" in line


def test_compress_stops_after_two_seeds_only_when_their_artifacts_are_identical(bench, capsys):
    """Post-training quantization does not depend on the seed: seeds 0 and 1 give the same
    weights and seed 2 is not run; a seeded fine-tune differs, and every seed runs."""
    model, data = bench.h.reference("lenet300")
    same = bench.h.compress(model, [ns.step("quantize", bits=4)], data, seeds=3)
    assert same.deterministic and len(same.results) == 2
    assert bench.h.same_weights(same.results[0].model, same.results[1].model)
    assert "seeds 0 and 1 gave the same weights: deterministic, seeds 2-2 not run" \
        in capsys.readouterr().err
    tuned = bench.h.compress(model, [ns.step("magnitude", sparsity=0.9, finetune={
        "epochs": 1, "lr": 0.01, "patience": None})], data, seeds=3)
    assert not tuned.deterministic and len(tuned.results) == 3
    assert not bench.h.same_weights(tuned.results[0].model, tuned.results[1].model)


def test_runner_writes_page_with_command_commit_and_intervals(bench, tmp_path, monkeypatch):
    """A tiny page through the same runner as every page: header, table, plot."""
    h = bench.h

    def run(b):
        model, data = h.reference("lenet300")
        runs = h.compress(model, [ns.step("quantize", bits=4)], data, b.seeds)
        lat = h.speedups(model, {"q": runs.first.model}, data.val.tensors[0][:1], rounds=2,
                         min_time=0.01)["q"]
        path, link = b.plot("tiny.png")
        h.save_plot(lambda ax: ax.plot([1, 2], [runs.accs[0], runs.accs[-1]]), path)
        return [*h.table(["method", "acc", "speedup b1"], [["quantize 4-bit", runs.acc(), lat[1]]]),
                f"![tiny]({link})"]

    page = types.SimpleNamespace(TITLE="Tiny", OUT="benchmarks/tiny.md", ABOUT=["About it."],
                                 cases=lambda quick: {}, run=run)
    monkeypatch.setitem(bench.PAGES, "tiny", page)
    monkeypatch.setenv("NETSHRINK_THREADS", "1")
    out = bench.runner.main(["tiny", "--quick", "--seeds", "2", "--out", str(tmp_path)])
    assert out == tmp_path / "benchmarks" / "tiny.md"
    text = out.read_text()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    assert f"Produced by `NETSHRINK_THREADS=1 python -m benchmarks tiny --quick --seeds 2` at " \
           f"commit `{head}" in text
    assert "load average (1 min)" in text and "About it." in text
    row = next(line for line in text.splitlines() if line.startswith("| quantize 4-bit"))
    assert " ± " in row and "n=360" in row  # two seeds: mean ± std, interval on the test n
    assert "x (" in row  # the speedup with its spread
    assert (tmp_path / "benchmarks" / "tiny.png").stat().st_size > 5_000


# -- the peers page: every peer as a curve of points ---------------------------------------------


class _Tiny(torch.nn.Module):
    """A conv + two Linear layers every peer accepts (torchao's int4 CPU layout needs
    in % 32 == 0 and out % 16 == 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(256, 32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture
def tiny():
    """A tiny model and random 8x8 data (64 samples per split)."""
    gen = torch.Generator().manual_seed(0)

    def split():
        return torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8, generator=gen),
                                              torch.randint(0, 10, (64,), generator=gen))

    torch.manual_seed(0)
    data = ns.DataSplits("tiny", split(), split(), split(), num_classes=10)
    return _Tiny().eval(), data


PEER_NAMES = ["torchao weight-only", "NNCF compress_weights", "NNCF int8 PTQ", "AIMET QuantSim",
              "AIMET AdaRound", "Torch-Pruning", "torch.nn.utils.prune", "PyTorch dynamic int8"]
# Their libraries alone import in 10-100 s on the shared 2 cores (AIMET the longest), and NNCF's
# PTQ builds a C++ extension on first use; the torch-only peers stay in the default run.
SLOW_PEERS = {"torchao weight-only", "NNCF compress_weights", "NNCF int8 PTQ", "AIMET QuantSim",
              "AIMET AdaRound", "Torch-Pruning"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PEERS
                                  else n for n in PEER_NAMES])
def test_each_peer_runs_as_a_curve_of_points(bench, tiny, name):
    """Every peer runs on a tiny model and returns one measured point per quick knob value:
    label, bytes of a real file, an accuracy in [0, 1], reload notes."""
    from benchmarks import peers

    assert set(PEER_NAMES) == set(peers.PEERS)  # a new peer gets a case here
    peer = peers.PEERS[name]
    pytest.importorskip(peer.library)
    model, data = tiny
    points = peers.curve(name, model, data, epochs=1, quick=True)
    assert [pt.label for pt in points] == [peers.label(name, k) for k in peer.quick_values]
    for pt in points:
        assert isinstance(pt, peers.Point) and pt.ok, pt.notes
        assert pt.bytes > 1_000 and 0.0 <= pt.accuracy <= 1.0 and "reload" in pt.notes
        assert pt.model is None or isinstance(pt.model, torch.nn.Module)
    if name.startswith("AIMET"):
        assert "theoretical" in points[0].notes


def test_peer_failures_and_missing_libraries_are_points(bench, tiny, monkeypatch):
    from benchmarks import peers

    model, data = tiny

    def broken(*args):
        raise ValueError("unsupported layer: Conv3d\nsecond line")

    monkeypatch.setitem(peers.PEERS, "broken", peers.Peer("torch", "k", (1, 2), (1,), broken))
    monkeypatch.setitem(peers.PEERS, "absent", peers.Peer("no_such_lib_xyz", "k", (1,), (1,),
                                                          broken))
    pts = peers.curve("broken", model, data, epochs=0)
    assert [pt.notes for pt in pts] == ["failed: ValueError: unsupported layer: Conv3d"] * 2
    assert not any(pt.ok for pt in pts) and all(pt.bytes == 0 for pt in pts)
    (absent,) = peers.curve("absent", model, data, epochs=0)
    assert absent.notes == "no_such_lib_xyz not installed (pip install netshrink[peers])"
    with pytest.raises(RuntimeError, match="failed: ValueError"):
        monkeypatch.setitem(peers.OVERVIEW, "b", ("broken", 1))
        peers.single("b", model, data, epochs=0)


def test_sparse_state_is_compact_and_reloads(bench, tiny):
    """torch.nn.utils.prune's compact save: CSR weights with int32 indices when smaller,
    reloadable with weights_only and equal to the dense weights."""
    from benchmarks import peers

    model, _ = tiny
    with torch.no_grad():
        model.fc.weight[:, 8:] = 0  # 97% zeros: CSR wins; conv stays dense
    state = peers.sparse_state(model)
    assert state["fc.weight"].layout == torch.sparse_csr
    assert state["fc.weight"].col_indices().dtype == torch.int32
    assert state["conv.weight"].layout == torch.strided
    assert peers.file_bytes(state) < peers.file_bytes(model.state_dict())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    assert torch.equal(back["fc.weight"].to_dense().view_as(model.fc.weight), model.fc.weight)


def test_aimet_gets_timm_linears_as_torch_linears_with_the_same_weights(bench):
    """AIMET refuses timm's Linear subclass (UnknownModuleError): its peers swap it for a
    torch.nn.Linear holding the same parameters, so the outputs stay equal bit for bit."""
    pytest.importorskip("timm")
    import timm.layers

    from benchmarks import peers

    model = torch.nn.Sequential(timm.layers.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(5, 6)
    before = model(x)
    swapped, count = peers.torch_linears(model)
    assert count == 1
    assert type(swapped[0]) is torch.nn.Linear and type(swapped[2]) is torch.nn.Linear
    assert torch.equal(swapped(x), before)
    assert peers.torch_linears(swapped)[1] == 0


def test_aimet_points_quantize_activations_at_the_set_bits(bench):
    """AIMET's points simulate 16-bit activations (its W·A16 setting): at its default 8 bits
    the activation ranges, not the weight bits the page compares, decided timm MobileNetV3's
    accuracy. The weights get the knob's bits."""
    pytest.importorskip("aimet_torch")
    from benchmarks import peers

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    data = types.SimpleNamespace(batch=lambda split, n: (torch.randn(n, 3, 8, 8), None))
    sim = peers._aimet_sim(model, data, 4, quick=True)
    outputs = [q.bitwidth for m in sim.model.modules()
               for q in getattr(m, "output_quantizers", []) if q is not None]
    weights = [m.param_quantizers["weight"].bitwidth for m in sim.model.modules()
               if "weight" in getattr(m, "param_quantizers", {})]
    assert outputs and set(outputs) == {peers.AIMET_ACTIVATION_BITS} == {16}
    assert weights == [4, 4]


def test_peers_page_verdicts_are_computed(bench):
    """A peer point is dominated only by a smaller netshrink point whose accuracy is not below
    it; every undominated point is named."""
    from benchmarks.pages import peers as page

    def row(curve, method, size, acc):
        return {"curve": curve, "method": method, "knob": method, "bytes": size, "accs": [acc]}

    ours = [row("netshrink", "ns small", 1_000, 0.95), row("netshrink", "ns big", 5_000, 0.99)]
    names = list(page.p.PEERS)
    rows = [*ours, row(names[0], "a1", 2_000, 0.95), row(names[0], "a2", 9_000, 0.99),
            row(names[1], "b1", 800, 0.95), row(names[1], "b2", 6_000, 0.80),
            {"curve": names[2], "method": "c", "knob": "c", "error": "failed: X: y"}]
    text = page.verdicts(rows, n=360)
    assert text[0].startswith(f"- **{names[0]}**: **dominated**") and "a2 by ns big" in text[0]
    assert text[1].startswith(f"- **{names[1]}**: **not dominated**")
    assert "b1 (800 B, 95.00%)" in text[1] and "b2 by ns small" in text[1]
    assert text[2] == f"- **{names[2]}**: no point measured (failed: X: y)."
    # A smaller netshrink point that is clearly less accurate does not dominate:
    assert page.dominators(row(names[0], "z", 2_000, 0.99), ours[:1], 360) == []


def test_overview_verdicts_pick_the_smallest_not_clearly_less_accurate(bench):
    """Per peer, the overview names netshrink's largest ratio among rows whose 95% interval is
    not below the peer's, says the interval is how it decided, and lets the peer win when that
    row is bigger or every netshrink row is clearly less accurate."""
    from benchmarks.pages import overview

    def row(family, method, ratio, acc):
        return {"family": family, "method": method, "ratio": ratio, "accs": [acc], "acc": acc,
                "n": 360}

    rows = [row("netshrink", "tiny but bad", 50.0, 0.80), row("netshrink", "close", 10.0, 0.96),
            row("netshrink", "exact", 2.0, 0.97), row("peer", "P", 4.0, 0.97),
            row("peer", "Q", 20.0, 0.97), row("peer", "R", 3.0, 0.995)]
    p_line, q_line, r_line = overview.verdicts(rows)
    # 96% is within the 95% interval of 97% at n=360; 80% is not.
    assert "**close**, 10.0x" in p_line and "(95% intervals)" in p_line
    assert p_line.endswith("netshrink wins on size.")
    assert "**close**" in q_line and q_line.endswith("the peer wins on size.")
    # 99.5% at n=360: 96% is below its interval, 97% is not (the intervals overlap).
    assert "**exact**, 2.0x" in r_line and r_line.endswith("the peer wins on size.")
    assert overview.verdicts([row("netshrink", "bad", 9.0, 0.5), row("peer", "S", 1.0, 0.99)]
                             ) == ["- **S** wins: every netshrink method is less accurate."]


def test_normsparse_bad_input_rows_show_the_error_each_case_is_about(bench):
    """Each bad-input row of the normsparse page raises the error its label names (a model
    without Linear/Conv layers fails on selection, not on its output width)."""
    from benchmarks.pages import normsparse

    rows = [line for line in normsparse.bad_input() if line.startswith("| ") and "`" in line]
    errors = {row.split(" | ")[0][2:]: row.split("`")[1] for row in rows}
    assert errors == {"negative L1 weight": "RecipeError", "threshold ≥ 1": "RecipeError",
                      "no Linear/Conv layer selected": "SelectionError",
                      "only the classifier head selected": "SelectionError"}


# -- resuming an interrupted page ---------------------------------------------------------------


def test_bench_rows_are_saved_and_resumed_but_not_errors_or_foreign_files(bench, tmp_path):
    calls = []

    def measure(value):
        def go():
            calls.append(value)
            return value
        return go

    b = bench.h.Bench(quick=True, seeds=1, page=tmp_path / "p.md", tmp=tmp_path,
                      rows=tmp_path / "rows")
    assert b.row("m / a", measure({"acc": 0.5, "accs": [0.5]})) == {"acc": 0.5, "accs": [0.5]}
    assert b.row("m / a", measure({"acc": 0.9})) == {"acc": 0.5, "accs": [0.5]}  # resumed
    assert b.resumed == ["m / a"] and len(calls) == 1
    assert b.row("m / e", measure({"error": "boom"})) == {"error": "boom"}
    assert b.row("m / e", measure({"error": "again"})) == {"error": "again"}  # not saved
    saved = list((tmp_path / "rows").iterdir())
    assert len(saved) == 1
    saved[0].write_text("{not json")  # a damaged file is measured again, not trusted
    assert b.row("m / a", measure({"acc": 0.7})) == {"acc": 0.7}
    saved[0].write_text('{"key": "m / other", "row": {"acc": 0.1}}')  # another row's file
    assert b.row("m / a", measure({"acc": 0.8})) == {"acc": 0.8}
    nothing = bench.h.Bench(quick=True, seeds=1, page=tmp_path / "p.md", tmp=tmp_path)
    assert nothing.row("m / a", measure({"acc": 0.6})) == {"acc": 0.6}  # rows=None: no resume
    assert nothing.resumed == [] and len(calls) == 6


def test_bench_runs_resume_with_the_artifact_model_and_refuse_a_changed_side_file(bench,
                                                                                tmp_path):
    """Bench.runs saves each seed's report and records and seed 0's artifact: a rerun resumes
    them without compressing (first.model is the loaded artifact, fresh or resumed); a side
    file that no longer matches its recorded hash is measured again, not trusted."""
    model, data = bench.h.reference("lenet300")
    steps = [ns.step("magnitude", sparsity=0.8, finetune={"epochs": 1, "patience": None}),
             ns.step("quantize", bits=4)]
    calls = []
    real = bench.h.compress

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def bench_at(rows):
        return bench.h.Bench(quick=True, seeds=2, page=tmp_path / "p.md", tmp=tmp_path,
                             rows=rows)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.h, "compress", counted)
        fresh = bench_at(tmp_path / "rows").runs("m / a", model, steps, data, 2)
        b = bench_at(tmp_path / "rows")
        again = b.runs("m / a", model, steps, data, 2)
        assert len(calls) == 1 and b.resumed == ["m / a"]
        assert again.accs == fresh.accs and again.walls == fresh.walls and len(fresh.accs) == 2
        assert again.first.report == fresh.first.report
        assert again.first.records == fresh.first.records and again.first.records
        assert ns.accuracy(again.first.model, data) == fresh.accs[0]
        assert again.results[1].model is None
        side = next((tmp_path / "rows").glob("*.nsk"))
        side.write_bytes(side.read_bytes()[:-1] + b"x")  # a changed artifact is not trusted
        b = bench_at(tmp_path / "rows")
        assert b.runs("m / a", model, steps, data, 2).accs == fresh.accs
        assert len(calls) == 2 and b.resumed == []
        nothing = bench_at(None)  # rows=None: measured, the artifact in tmp, nothing resumed
        assert nothing.runs("m / a", model, steps, data, 2).accs == fresh.accs
        assert len(calls) == 3 and nothing.resumed == []
        # A freshly measured artifact that does not reload is an error, not measured again.
        mp.setattr(bench.h.ns, "load", lambda path: (_ for _ in ()).throw(ns.ArtifactError("x")))
        with pytest.raises(ns.ArtifactError):
            bench_at(tmp_path / "rows2").runs("m / a", model, steps, data, 2)
        assert len(calls) == 4


def test_runner_resumes_rows_of_an_interrupted_run_at_the_same_commit(bench, tmp_path,
                                                                       monkeypatch):
    """Rows persist per commit: a rerun reuses them and the header says which; --fresh, a
    different commit or uncommitted code measures everything again."""
    measured = []

    def run(b):
        rows = [b.row(f"tiny / {name}", lambda name=name: measured.append(name) or {"v": name})
                for name in ("a", "b")]
        return [str(rows)]

    page = types.SimpleNamespace(TITLE="Tiny", OUT="benchmarks/tiny.md", ABOUT=[],
                                 cases=lambda quick: {}, run=run)
    monkeypatch.setitem(bench.PAGES, "tiny", page)
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench.runner, "commit", lambda: "0123456789ab")
    args = ["tiny", "--quick", "--out", str(tmp_path)]
    first = bench.runner.main(args).read_text()
    assert measured == ["a", "b"] and "resumed" not in first
    second = bench.runner.main(args).read_text()
    assert measured == ["a", "b"]
    assert "2 row(s) of this page were measured by an earlier, interrupted run" in second
    assert "`tiny / a`, `tiny / b`" in second and "{'v': 'a'}" in second
    bench.runner.main([*args, "--fresh"])
    assert measured == ["a", "b", "a", "b"]
    monkeypatch.setattr(bench.runner, "commit", lambda: "0123456789ab + uncommitted changes")
    bench.runner.main(args)
    monkeypatch.setattr(bench.runner, "commit", lambda: "ba9876543210")
    bench.runner.main(args)
    assert measured == ["a", "b"] * 4


def test_per_model_peers_page_resumes_its_points_and_keeps_failures_unsaved(bench, tmp_path,
                                                                            monkeypatch):
    """peers_<model>: each netshrink point, the search rows and each peer curve are saved rows;
    a rerun measures nothing that succeeded and again what failed; the page has table, plot
    and verdicts."""
    from benchmarks import peers
    from benchmarks.pages import peers as page

    def broken(*args):
        raise ValueError("nope")

    fast = {"PyTorch dynamic int8": peers.PEERS["PyTorch dynamic int8"],
            "broken": peers.Peer("torch", "k", (1,), (1,), broken)}
    monkeypatch.setattr(peers, "PEERS", fast)
    monkeypatch.setattr(page, "ours", lambda quick: {"quantize 4-bit/ch": (
        "bits 4", [{"compressor": "quantize", "select": bench.h.EVERYTHING,
                    "config": {"bits": 4}}])})
    monkeypatch.setattr(page, "QUICK_SEARCH_BUDGETS", ("8x", "100000x"))  # the 2nd unreachable
    measured = []
    for name in ("ours_rows", "search_rows", "peer_rows"):
        real = getattr(page, name)
        monkeypatch.setattr(page, name, lambda *a, real=real, name=name, **k: (
            measured.append(name), real(*a, **k))[1])
    b = bench.h.Bench(quick=True, seeds=1, page=tmp_path / "benchmarks" / "p.md", tmp=tmp_path,
                      rows=tmp_path / "rows")
    text = "\n".join(page.model_run(b, "lenet5"))
    assert measured == ["ours_rows", "search_rows", "peer_rows", "peer_rows"]
    assert "| quantize 4-bit/ch | netshrink |" in text and "PyTorch dynamic int8" in text
    assert "| search: quantize bits per layer, 8x | netshrink | budget 8x | " in text
    assert "| search: quantize bits per layer, 100000x | netshrink | budget 100000x | — |" in text
    assert "bytes is the smallest reachable" in text
    assert "- **broken**: no point measured (failed: ValueError: nope)." in text
    n_train = min(2_000, len(bench.h.reference("lenet5")[1].train))  # quick: at most 2,000
    assert f"fine-tune epoch(s) of {n_train:,} training images" in text
    assert (tmp_path / "benchmarks" / "peers_lenet5.png").stat().st_size > 5_000
    again = "\n".join(page.model_run(b, "lenet5"))
    assert measured[4:] == ["peer_rows"]  # only the failed curve (not the unreachable budget)
    assert b.resumed == ["lenet5 / netshrink / quantize 4-bit/ch", "lenet5 / netshrink / search",
                         "lenet5 / peer / PyTorch dynamic int8"]
    assert again.split("![")[0] == text.split("![")[0]
    # The peers page (every model, whole training sets) saves the same rows of each model.
    monkeypatch.setattr(page, "QUICK_MODELS", ["lenet5"])
    b = bench.h.Bench(quick=True, seeds=1, page=tmp_path / "benchmarks" / "p.md", tmp=tmp_path,
                      rows=tmp_path / "rows-peers")
    whole = "\n".join(page.run(b))
    assert measured[5:] == ["ours_rows", "search_rows", "peer_rows", "peer_rows"]
    assert "| quantize 4-bit/ch | netshrink |" in whole and "training images)" not in whole
    assert "\n".join(page.run(b)).split("![")[0] == whole.split("![")[0]
    assert measured[9:] == ["peer_rows"] and len(b.resumed) == 3


def test_defaults_page_resumes_its_compressor_rows(bench, tmp_path, monkeypatch):
    """defaults: each compressor is a saved row; a rerun measures only the one that failed."""
    from benchmarks.pages import defaults as page

    monkeypatch.setattr(page, "compressors", lambda: ["no-such-compressor", "quantize"])
    measured = []
    real = page.row
    monkeypatch.setattr(page, "row", lambda name, *a: (measured.append(name), real(name, *a))[1])
    b = bench.h.Bench(quick=True, seeds=1, page=tmp_path / "benchmarks" / "d.md", tmp=tmp_path,
                      rows=tmp_path / "rows")
    text = "\n".join(page.run(b))
    assert measured == ["no-such-compressor", "quantize"]
    assert "| no-such-compressor | - | failed: " in text and "| quantize | " in text
    again = "\n".join(page.run(b))
    assert measured[2:] == ["no-such-compressor"]
    assert b.resumed == ["lenet5 / quantize"]
    assert again == text


def test_search_chains_resumes_chain_rows_and_shares_the_scan(bench, tmp_path, monkeypatch):
    from benchmarks.pages import search_chains as page

    calls = []

    def fake_chain_row(name, steps, model, data, seeds, table):
        calls.append((name, table))
        return [name, "1,000", "acc", "990", 1, "acc", "indistinguishable", "plan"], "scan"

    monkeypatch.setattr(page, "chain_row", fake_chain_row)
    b = bench.h.Bench(quick=True, seeds=1, page=tmp_path / "p.md", tmp=tmp_path,
                      rows=tmp_path / "rows")
    recipes = [("a.yaml", []), ("b.yaml", [])]
    first = page.model_section(b, "lenet5", recipes)
    assert calls == [("a.yaml", None), ("b.yaml", "scan")]  # the second reuses the scan
    assert page.model_section(b, "lenet5", recipes) == first and len(calls) == 2
    assert b.resumed == ["lenet5 / a.yaml", "lenet5 / b.yaml"]
    assert any(line.startswith("| a.yaml | 1,000 |") for line in first)


# -- the index: docs/benchmarks.md -------------------------------------------------------------


def _page(path: Path, title: str, header: str, body: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{header}\n\n{body}\n", encoding="utf-8")


def test_index_reads_each_page_header_and_names_pages_not_run(bench, tmp_path):
    """Commit, command, data, wall time and seeds come from each page; a page without commit
    or header says so; a page run with fewer seeds than its command runs now is flagged; a
    defined page not generated yet shows the command that makes it."""
    from benchmarks import index

    pages = tmp_path / "benchmarks"
    _page(pages / "overview_lenet5@shapes32.md", "Benchmarks: lenet5@shapes32",
          "Produced by `NETSHRINK_THREADS=1 python -m benchmarks overview_lenet5@shapes32` at "
          "commit `0123456789ab` on 2026-12-01 14:29 UTC; every number below comes from that "
          "run (3 seed(s) per configuration).\n\nMachine: total wall time 38.3 min, CPU time "
          "2 min.",
          "## lenet5@shapes32 (`zoo:lenet5` on `shapes32`)\n\n"
          "| method | test acc [95% CI] | bytes |\n|---|---|---|\n"
          "| dense | 97.25% [96.6, 97.9] n=10000 | 10 |\n"
          "| a | 81.48 ± 0.16% [80.7, 82.2] n=10000 | 5 |\n"
          "| b | 85.86 ± 0.00% [85.2, 86.5] n=10000 | 4 |\n"
          "| c | 86.64% [86.0, 87.3] n=10000 | 3 |\n")
    _page(pages / "old.md", "Old", "Produced by `python -m benchmarks` on 2026-11-23 20:42 UTC.",
          "## lenet5@shapes32 on digits28")
    _page(pages / "hand.md", "Hand written", "No header here.")
    _page(pages / "joint.md", "Joint", "Produced by `python -m benchmarks joint` at commit "
          "`bbbbbbbbbbbb` on 2026-12-01 14:12 UTC; every number below comes from that run (1 "
          "seed(s) per configuration).")
    _page(pages / "peers_vgg_small@shapes32.md", "Peers: vgg",
          "Produced by `python -m benchmarks peers_vgg_small@shapes32` at commit `aaaaaaaaaaaa` "
          "on 2026-12-01 20:00 UTC.",
          "## vgg_small@shapes32 (`zoo:vgg_small` on `shapes32`)\n\n"
          "- **torchao weight-only**: **dominated** by netshrink — every point.\n"
          "- **AIMET AdaRound**: **not dominated** — no netshrink point is smaller.\n"
          "- **AIMET QuantSim**: no point measured (failed: UnknownModuleError: x).\n")
    import datetime
    text = index.render(tmp_path, "fedcba987654",
                        datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc))
    assert "at commit `fedcba987654` on 2026-12-01 00:00 UTC" in text
    lines = text.splitlines()
    lenet5 = next(line for line in lines if line.startswith("| lenet5@shapes32 |"))
    assert "[`0123456789ab`](benchmarks/overview_lenet5@shapes32.md)" in lenet5
    assert "[old](benchmarks/old.md)" in lenet5  # another page with a section on it
    # b and c overlap; a is apart from both; the dense reference is above the band
    assert "dense 97.25% [96.6, 97.9], **outside** the 85–95% band; 2 of 3 pairs" in lenet5
    vgg = next(line for line in lines if line.startswith("| vgg_small@shapes32 |"))
    assert "not run yet: `python -m benchmarks overview_vgg_small@shapes32`" in vgg
    assert "[`aaaaaaaaaaaa`](benchmarks/peers_vgg_small@shapes32.md)" in vgg
    # a curve whose every point failed counts and is named, neither dominated nor beating us
    assert ("netshrink dominates 1 of 3 peer curves ([peers_vgg_small@shapes32](benchmarks/"
            "peers_vgg_small@shapes32.md)); not: AIMET AdaRound; failed on the page (no point "
            "measured): AIMET QuantSim") in vgg
    row = next(line for line in lines if "(benchmarks/overview_lenet5@shapes32.md) |" in line
               and line.startswith("| [Benchmarks"))
    assert "| `shapes32` |" in row and "38.3 min | 3 |" in row and "`0123456789ab`" in row
    old = next(line for line in lines if line.startswith("| [Old]"))
    assert "not recorded" in old and "`digits28`" in old
    assert "no header" in next(line for line in lines if line.startswith("| [Hand written]"))
    # joint's command runs bench.PAGES["joint"].SEEDS (3) seeds now: its 1-seed page is flagged
    assert "| 1 (its command now runs 3; not re-run yet) |" in next(
        line for line in lines if line.startswith("| [Joint]"))
    assert "`smoke_digits`" in text  # defined, not generated, outside the per-model table


def test_docs_benchmarks_index_is_current(bench):
    """docs/benchmarks.md is what ``python -m benchmarks.index`` makes of the pages now (fails
    when a page was regenerated or added without rerunning the index)."""
    import datetime

    from benchmarks import index

    docs = ROOT / "docs"
    saved = (docs / "benchmarks.md").read_text(encoding="utf-8").splitlines()
    now = index.render(docs, "x", datetime.datetime.now(datetime.timezone.utc)).splitlines()
    generated = next(i for i, line in enumerate(saved) if line.startswith("Generated by"))
    assert saved[:generated] + saved[generated + 1:] == now[:generated] + now[generated + 1:], \
        "docs/benchmarks.md is stale: run `python -m benchmarks.index`"
