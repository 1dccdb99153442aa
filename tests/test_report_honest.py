"""An honest report: accuracies with n, intervals and a paired test; latency with its spread;
a side file that must belong to its artifact; plots whose legends label something."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import netshrink as ns
from netshrink import metrics
from netshrink import report as report_module
from netshrink.cli import cli
from netshrink.errors import ArtifactError
from netshrink.metrics import latency_verdict, mcnemar_midp, wilson_interval
from netshrink.report import Report
from netshrink.report_render import figure
from netshrink.training import evaluate

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pruned(lenet, digits):
    """LeNet-5 on digits, 90% magnitude-pruned without fine-tuning (accuracy drops)."""
    return ns.compress(lenet, [ns.step("magnitude", sparsity=0.9)], data=digits, latency=False)


@pytest.fixture(scope="module")
def no_data(lenet):
    """The same compression without data: no accuracy in the report."""
    return ns.compress(lenet, [ns.step("magnitude", sparsity=0.5)], latency=False)


# -- statistics ----------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0.0, 10)  # never below 0, and not the useless [0, 0] of Wald
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    assert wilson_interval(1.0, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0.7, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(0.9, 10_000), wilson_interval(0.9, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="proportion"):
        wilson_interval(1.5, 10)


def _exact_midp(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    below = sum(Fraction(math.comb(n, i), 2**n) for i in range(k))
    return float(min(Fraction(1), 2 * (below + Fraction(math.comb(n, k), 2**n) / 2)))


def test_mcnemar_midp_matches_exact_arithmetic():
    assert mcnemar_midp(1, 9) == pytest.approx(12 / 1024)  # 2 * (1 + 10 / 2) / 2**10
    assert mcnemar_midp(0, 0) == 1.0 and mcnemar_midp(7, 7) == pytest.approx(1.0)
    for b, c in [(0, 5), (3, 11), (20, 9), (40, 61), (150, 190)]:
        assert mcnemar_midp(b, c) == pytest.approx(_exact_midp(b, c), rel=1e-9)
        assert mcnemar_midp(b, c) == mcnemar_midp(c, b)
    big = mcnemar_midp(3000, 3200)  # no overflow or underflow with thousands of pairs
    assert 0 < big < 0.05
    with pytest.raises(ValueError):
        mcnemar_midp(-1, 3)


def test_latency_verdicts():
    base = {"dense_ms": 2.0, "dense_iqr_ms": 0.1, "compressed_ms": 1.0,
            "compressed_iqr_ms": 0.05, "rounds": 5}
    fast = latency_verdict({**base, "speedup": 2.0, "speedup_low": 1.9, "speedup_high": 2.1})
    assert fast.startswith("2.00x faster") and "1.90-2.10x over 5 rounds" in fast
    slow = latency_verdict({**base, "speedup": 0.5, "speedup_low": 0.45, "speedup_high": 0.55})
    assert "slower" in slow
    # Issue 18: rounds from 0.55x to 15.7x for one model: no ratio is given.
    wild = latency_verdict({**base, "speedup": 1.4, "speedup_low": 0.55, "speedup_high": 15.7})
    assert wild.startswith("too noisy to call") and "faster" not in wild
    same = latency_verdict({**base, "speedup": 1.0, "speedup_low": 0.97, "speedup_high": 1.04})
    assert same.startswith("no measurable difference")
    busy = latency_verdict({**base, "dense_iqr_ms": 1.5, "speedup": 2.0, "speedup_low": 1.9,
                            "speedup_high": 2.1})
    assert busy.startswith("too noisy to call")
    old = latency_verdict({"dense_ms": 1.0, "compressed_ms": 0.5, "speedup": 2.0})
    assert "spread not measured" in old


def test_compare_latency_reports_spread():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    small = nn.Sequential(nn.Linear(16, 4))
    out = metrics.compare_latency(dense, small, torch.randn(1, 16), batches=(1, 8), rounds=3,
                                  blocks=2, block_s=0.0005)
    assert set(out) == {"batch1", "batch8"}
    for fig in out.values():
        assert fig["rounds"] == 3
        assert fig["dense_ms"] > 0 and fig["compressed_ms"] > 0
        assert fig["dense_iqr_ms"] >= 0 and fig["compressed_iqr_ms"] >= 0
        assert fig["speedup_low"] <= fig["speedup"] <= fig["speedup_high"]
    # Calls longer than a block (here: any call): fewer rounds, so big models stay affordable.
    slow = metrics.compare_latency(dense, small, torch.randn(1, 16), batches=(2,), rounds=5,
                                   block_s=1e-9)
    assert slow["batch2"]["rounds"] == metrics.SLOW_ROUNDS < 5


# -- the report's accuracy -----------------------------------------------------------------------


def test_accuracy_with_n_and_paired_counts(pruned, lenet, digits):
    rep = pruned.report
    test = digits.loader("test", batch_size=256, shuffle=False)
    assert rep.n_test == len(digits.test)
    assert rep.accuracy_before == pytest.approx(evaluate(lenet, test))
    assert rep.accuracy_after == pytest.approx(evaluate(pruned.model, test))
    # The discordant counts account exactly for the change in accuracy.
    lost, gained = rep.only_before_correct, rep.only_after_correct
    assert lost + gained > 0
    assert rep.accuracy_delta == pytest.approx((gained - lost) / rep.n_test)
    assert rep.accuracy_p_value == pytest.approx(mcnemar_midp(lost, gained))
    lo, hi = rep.accuracy_interval("before")
    assert lo <= rep.accuracy_before <= hi
    text = str(rep)
    assert f"n={rep.n_test:,}; 95% CI {lo:.3f}-{hi:.3f} -> " in text
    assert f"{lost:,} test images right only before, {gained:,} right only after" in text
    assert "after vs before: " + rep.accuracy_verdict in text


def test_report_says_which_fine_tune_epoch_was_kept(pruned, lenet, digits):
    """A fine-tune that helps names the epoch kept; one that only hurts (a learning rate far
    too high) says so, and the step's own weights are what the artifact holds."""
    helped = ns.compress(lenet, [ns.step("magnitude", sparsity=0.9,
                                         finetune={"epochs": 2, "lr": 0.001})],
                         data=digits, latency=False).report
    step = helped.steps[0]
    assert step["finetune_epochs"] == 2 and step["finetune_best_epoch"] in (1, 2)
    assert (f"step 0 (magnitude) fine-tune: kept epoch {step['finetune_best_epoch']}/2, "
            f"validation accuracy {step['finetune_best_val_acc']:.4f}, from "
            f"{step['finetune_start_val_acc']:.4f} before it") in str(helped)
    assert step["finetune_best_val_acc"] > step["finetune_start_val_acc"]

    hurt = ns.compress(lenet, [ns.step("magnitude", sparsity=0.9,
                                       finetune={"epochs": 2, "lr": 10.0})],
                       data=digits, latency=False).report
    assert hurt.steps[0]["finetune_best_epoch"] == 0
    assert "step 0 (magnitude) fine-tune: no epoch of 2 beat the step's own weights" \
        in str(hurt)
    assert hurt.accuracy_after == pruned.report.accuracy_after  # the pruned weights, unchanged
    assert "fine-tune" not in str(pruned.report)  # no fine-tune, no line


def test_reference_scores_are_reused_only_for_the_same_model_weights_and_split(
        lenet, digits, monkeypatch):
    """Compressing the same model again on the same test split scores the reference once; a
    changed weight or another split object is scored again, and the figures stay exact."""
    import copy

    calls = []
    real = report_module.correct_per_example

    def counting(model, batches, *args, **kwargs):
        calls.append(model)
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(report_module, "correct_per_example", counting)
    monkeypatch.setattr(report_module, "_BASELINE", metrics.BaselineCorrect())
    model = copy.deepcopy(lenet)
    steps = [ns.step("quantize", bits=4)]
    first = ns.compress(model, steps, data=digits, latency=False).report
    assert [m is model for m in calls] == [True, False]  # reference, then the compressed one
    again = ns.compress(model, steps, data=digits, latency=False).report
    assert [m is model for m in calls[2:]] == [False]  # the reference was not scored again
    assert (again.accuracy_before, again.only_before_correct, again.only_after_correct) == (
        first.accuracy_before, first.only_before_correct, first.only_after_correct)

    with torch.no_grad():  # another weight: scored again, and the figure follows the weights
        model.fc1.weight.mul_(-1)
    changed = ns.compress(model, steps, data=digits, latency=False).report
    assert [m is model for m in calls[3:]] == [True, False]
    test = digits.loader("test", batch_size=256, shuffle=False)
    assert changed.accuracy_before == pytest.approx(evaluate(model, test))
    assert changed.accuracy_before != first.accuracy_before

    other = ns.DataSplits(name=digits.name, train=digits.train, val=digits.val,
                          test=torch.utils.data.Subset(digits.test, range(len(digits.test))),
                          num_classes=digits.num_classes)  # same images, another split object
    ns.compress(model, steps, data=other, latency=False)
    assert [m is model for m in calls[5:]] == [True, False]


def test_accuracy_verdict_follows_the_paired_test(pruned):
    rep, n = pruned.report, pruned.report.n_test

    def with_counts(lost: int, gained: int) -> Report:
        before = 0.9
        return rep.model_copy(update={"accuracy_before": before, "only_before_correct": lost,
                                      "only_after_correct": gained,
                                      "accuracy_after": before + (gained - lost) / n})

    assert with_counts(4, 2).accuracy_verdict == "equal within the 95% interval"
    assert with_counts(0, 0).accuracy_verdict == "equal within the 95% interval"
    assert with_counts(20, 2).accuracy_verdict == f"lower by {100 * 18 / n:.2f} pp"
    assert with_counts(1, 15).accuracy_verdict == f"higher by {100 * 14 / n:.2f} pp"
    assert "equal within the 95% interval" in str(with_counts(4, 2))


def test_report_without_data_has_no_accuracy(no_data):
    rep = no_data.report
    assert rep.accuracy_before is None and rep.n_test is None
    assert rep.accuracy_verdict is None and rep.accuracy_interval("after") is None
    assert "test accuracy" not in str(rep)


def test_build_report_latency_uses_spread(lenet, monkeypatch):
    quick = functools.partial(metrics.compare_latency, rounds=2, blocks=1, block_s=0.0005)
    monkeypatch.setattr(report_module, "compare_latency", quick)
    rep = ns.compress(lenet, [ns.step("magnitude", sparsity=0.5)], latency=True).report
    assert set(rep.latency) == {"batch1", "batch64"}
    assert all(fig["rounds"] == 2 and "speedup_low" in fig for fig in rep.latency.values())
    text = str(rep)
    for key, verdict in rep.latency_verdicts().items():
        assert f"{key}: " in text and verdict in text


# -- the side file belongs to its artifact -------------------------------------------------------


def test_report_records_artifact_sha256(pruned, tmp_path):
    assert pruned.report.artifact_sha256 == hashlib.sha256(pruned.artifact).hexdigest()
    path = _save(pruned, tmp_path / "m.nsk")
    side = tmp_path / "m.report.json"
    assert Report.load_json(side, artifact=path) == pruned.report
    assert Report.load_json(side, artifact=pruned.artifact) == pruned.report
    with pytest.raises(ArtifactError, match=r"m.report.json: written for another artifact"):
        Report.load_json(side, artifact=pruned.artifact + b"x")


def _save(result: ns.CompressionResult, path):
    """The artifact and its .report.json (no plot: drawing it is slow and not tested here)."""
    path = result.save(path, report=False)
    result.report.save_json(path.with_suffix(".report.json"))
    return path


def _old_style(rep: Report) -> dict:
    """The JSON an older netshrink wrote: no n, counts, hash or latency spread."""
    data = rep.to_dict()
    for key in ("n_test", "only_before_correct", "only_after_correct", "artifact_sha256"):
        data.pop(key)
    data["latency"] = {"batch1": {"dense_ms": 0.5, "compressed_ms": 0.25, "speedup": 2.0}}
    return data


def test_old_reports_still_load(pruned, tmp_path):
    side = tmp_path / "old.report.json"
    side.write_text(json.dumps(_old_style(pruned.report)))
    rep = Report.load_json(side)
    assert rep.accuracy_before == pruned.report.accuracy_before and rep.n_test is None
    text = str(rep)
    assert "n not recorded: no interval" in text and "spread not measured" in text
    with pytest.raises(ArtifactError, match="no artifact_sha256"):
        Report.load_json(side, artifact=pruned.artifact)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"model": "a", "model": "b"}', "duplicate key 'model'"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"model": "m"}', "field rows: Field required"),
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_malformed_side_files_are_one_line(tmp_path, content, reason):
    side = tmp_path / "m.report.json"
    side.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ArtifactError) as info:
        Report.load_json(side)
    message = str(info.value)
    assert message.startswith("m.report.json: malformed: ") and reason in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"accuracy_before": 2.0}, "field accuracy_before: Input should be less than or equal"),
        ({"n_test": 0}, "field n_test: Input should be greater than or equal to 1"),
        ({"only_before_correct": 10**6}, "exceeds n_test"),
        ({"artifact_sha256": "ABC"}, "field artifact_sha256: String should match pattern"),
        ({"latency": {"batch1": {"speedup": "fast"}}}, "field latency.batch1.speedup:"),
        ({"latency": {"b\n1": {"speedup": "fast"}}}, "field latency.b\\n1.speedup:"),
    ],
)
def test_out_of_range_fields_are_refused(pruned, tmp_path, change, reason):
    """Values the report could not have written (and that would break its arithmetic) are
    refused when read, even in a file that carries the right hash."""
    side = tmp_path / "m.report.json"
    side.write_text(json.dumps({**pruned.report.to_dict(), **change}))
    with pytest.raises(ArtifactError, match=r"m\.report\.json: malformed: ") as info:
        Report.load_json(side, artifact=pruned.artifact)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_oversized_side_file_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "MAX_REPORT_BYTES", 1024)
    side = tmp_path / "m.report.json"
    side.write_text(json.dumps({"model": "m", "pad": "x" * 2000}))
    with pytest.raises(ArtifactError, match="malformed: larger than"):
        Report.load_json(side)


def _cli_report(path) -> tuple[int, str]:
    out = CliRunner().invoke(cli, ["report", str(path)])
    return out.exit_code, out.output


def test_cli_report_trusts_only_its_own_side_file(pruned, no_data, tmp_path):
    path = _save(pruned, tmp_path / "m.nsk")
    code, out = _cli_report(path)
    assert code == 0 and "TOTAL" in out and "after vs before" in out and "warning" not in out
    assert f"{path.stat().st_size:,} bytes" in out and "recipe steps: magnitude" in out

    # A newer artifact written over the old one, its report left behind: stale.
    path.write_bytes(no_data.artifact)
    code, out = _cli_report(path)
    assert code == 0 and "Traceback" not in out
    assert "ignoring m.report.json: written for another artifact (stale)" in out
    assert "TOTAL" not in out and f"{len(no_data.artifact):,} bytes" in out

    (tmp_path / "m.report.json").write_text('{"model": "m", "rows": "nope"}')
    code, out = _cli_report(path)
    assert code == 0 and "Traceback" not in out and "TOTAL" not in out
    assert "ignoring m.report.json: malformed: field rows:" in out


# -- the plot ------------------------------------------------------------------------------------


def test_plot_without_data_or_layers_has_no_empty_legend(no_data):
    import matplotlib.pyplot as plt

    rep = no_data.report
    bare = rep.model_copy(update={"rows": [r for r in rep.rows if r.name.startswith("(")]})
    fig = figure(bare)
    try:
        layers, size = fig.axes[:2]
        assert len(fig.axes) == 2  # no twin axis for bars that are not there
        assert layers.get_legend() is None and size.get_legend() is None
        assert "no compressed layers" in [t.get_text() for t in layers.texts]
        assert size.get_ylabel() == "size (KiB)" and size.get_xlabel() == ""
        assert [t.get_text() for t in size.get_xticklabels()] == ["dense fp32", "artifact"]
    finally:
        plt.close(fig)


def test_plot_with_data_labels_what_it_draws(pruned):
    import matplotlib.pyplot as plt

    fig = figure(pruned.report)
    try:
        layers, size, bits = fig.axes
        labels = [t.get_text() for t in layers.get_legend().get_texts()]
        assert labels == ["sparsity (%)", "stored bits per original weight"]
        assert layers.get_xlabel() == "compressed layer"
        assert bits.get_ylabel() == "stored bits per original weight"
        legend = [t.get_text() for t in size.get_legend().get_texts()]
        assert legend == ["dense fp32 (95% CI)", "compressed (95% CI)"]
        assert size.get_xlabel() == "size (KiB, log scale)"
        assert size.get_ylabel() == "test accuracy (%)"
    finally:
        plt.close(fig)
