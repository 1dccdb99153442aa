"""normsparse: the norm x direction wrapper, L1 training, physical removal, sparse kernel slices,
folding back to plain weights, and the errors for bad input."""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

import netshrink as ns
from netshrink import CompressionContext, LayerSelector
from netshrink.adapters import ModelInfo, set_model_info
from netshrink.encodings import Sparse
from netshrink.errors import RecipeError, SelectionError
from netshrink.plugins.normsparse import NormSparse, NormSparseConfig
from netshrink.plugins.normsparse.removal import remove_dead_units
from netshrink.plugins.normsparse.reparam import attach, dead_mask, fold, project_
from netshrink.training import FinetuneConfig, train

# A strong penalty so that a few epochs on the 8x8 digits remove units.
FAST = {"epochs": 4, "l1": 0.01, "lr_magnitude": 0.05, "schedule": "constant", "patience": None}


pytestmark = pytest.mark.usefixtures("single_thread")


def MLP() -> nn.Sequential:
    """64 -> 48 -> 32 -> 10, plain torch modules so the artifact can rebuild it."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(64, 48),
            relu1=nn.ReLU(),
            fc2=nn.Linear(48, 32),
            relu2=nn.ReLU(),
            head=nn.Linear(32, 10),
        )
    )


def CNN() -> nn.Sequential:
    """Unpadded convs, so a removed filter's constant output folds exactly into conv2's bias."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 12, 3),
            relu2=nn.ReLU(),
            flatten=nn.Flatten(),
            head=nn.Linear(12 * 4 * 4, 10),
        )
    )


def _info(head: str = "head") -> ModelInfo:
    return ModelInfo(spec="", input_shape=(1, 8, 8), num_classes=10, head=head)


def _trained(cls, data, epochs: int = 6) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    train(model, data, FinetuneConfig(epochs=epochs, lr=3e-3), seed=0)
    set_model_info(model, _info())
    return model.eval()


@pytest.fixture(scope="module")
def mlp(digits):
    return _trained(MLP, digits)


@pytest.fixture(scope="module")
def cnn(digits):
    return _trained(CNN, digits)


def _compress_direct(model, data, select: dict, **config):
    ctx = CompressionContext(data=data, info=_info(), seed=0, step_name="normsparse")
    layers = LayerSelector(**select).resolve(model, head="head", default_types=["Linear", "Conv2d"])
    out = NormSparse(config).compress(model, layers, ctx)
    ctx.encodings.reconcile(out.model)
    return out, ctx


# -- the reparametrisation --------------------------------------------------------------------


def test_wrapper_keeps_function_and_unit_directions():
    torch.manual_seed(0)
    lin, conv = nn.Linear(7, 5), nn.Conv2d(3, 4, 3, groups=1)
    for module, r_shape, dims in ((lin, (5,), (1,)), (conv, (4, 3), (2, 3))):
        before = module.weight.detach().clone()
        rep = attach("m", module)
        assert parametrize.is_parametrized(module, "weight")
        assert rep.r.shape == r_shape and rep.u.shape == before.shape
        torch.testing.assert_close(module.weight, before)
        torch.testing.assert_close(rep.r, before.norm(dim=dims))
        # After an arbitrary update, projection puts every row/slice back on the unit sphere.
        with torch.no_grad():
            rep.u.add_(torch.randn_like(rep.u))
            rep.r.sub_(10.0)
        project_(rep)
        torch.testing.assert_close(rep.u.norm(dim=dims), torch.ones(r_shape))
        assert bool((rep.r >= 0).all())
        fold(rep, torch.zeros(r_shape, dtype=torch.bool))
        assert not parametrize.is_parametrized(module)
        assert isinstance(module.weight, nn.Parameter)


def test_dead_mask_threshold_and_never_empty():
    r = torch.tensor([1.0, 0.04, 0.5, 0.0])
    assert dead_mask(r, 0.05).tolist() == [False, True, False, True]
    # A threshold that would remove everything keeps the largest min_keep units.
    assert dead_mask(torch.zeros(4), 0.5).sum() == 3
    assert (~dead_mask(r, 0.99, min_keep=2)).sum() == 2
    # Conv magnitudes [out, in]: at least min_keep filters keep a live slice.
    slices = torch.zeros(3, 2)
    slices[1, 0] = 1e-3
    dead = dead_mask(slices, 0.5, min_keep=2)
    assert int((~dead).any(dim=1).sum()) == 2 and not bool(dead[1, 0])


# -- removal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MLP, CNN])
def test_removing_zero_units_is_exact(cls, digits):
    """Removed units still emitted a constant (bias through ReLU): it is folded into the next
    layer's bias, so removal does not change the outputs."""
    torch.manual_seed(1)
    model = cls().eval()
    set_model_info(model, _info())
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "head"
    ]
    with torch.no_grad():
        for _, module in layers:
            module.weight[: module.weight.shape[0] // 2] = 0
            module.bias.uniform_(0.1, 0.5)  # dead units output relu(bias) > 0
    x = digits.test.tensors[0][:32]
    expected = model(x)
    ctx = CompressionContext(data=digits, info=_info())
    removed = remove_dead_units(model, ctx, layers, model.head, 1, True)
    assert all(count > 0 for count in removed.values())
    first = layers[0][1]
    assert first.weight.shape[0] == (48 if cls is MLP else 8) // 2
    assert model.head.out_features == 10
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_never_removes_last_unit_or_head_outputs(digits):
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.head.weight.zero_()
    layers = [("fc1", model.fc1), ("head", model.head)]
    removed = remove_dead_units(
        model, CompressionContext(data=digits, info=_info()), layers, model.head, 1, True
    )
    assert model.fc1.out_features == 1 and removed["fc1"] == 47
    assert model.head.out_features == 10 and removed["head"] == 0


def test_residual_coupled_filters_removed_only_together():
    model = ns.load_model("zoo:resnet_small", in_chans=1, num_classes=10, input_size=8).eval()
    info = ns.model_info(model)
    block = model.layers[0][0]  # identity shortcut: its conv2 outputs add to the stem's
    stem = model.stem[0]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    ctx = CompressionContext(info=info)
    with torch.no_grad():
        block.conv2.weight[3] = 0
    remove_dead_units(model, ctx, layers, None, 1, True)
    assert block.conv2.out_channels == 32 and stem.out_channels == 32
    with torch.no_grad():
        stem.weight[3] = 0
    remove_dead_units(model, ctx, layers, None, 1, True)
    assert block.conv2.out_channels == 31 and stem.out_channels == 31
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_removal_out_of_time_keeps_the_rest_as_zeros(digits, monkeypatch):
    import torch_pruning as tp

    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[:10] = 0
        model.fc2.weight[:10] = 0
    layers = [("fc1", model.fc1), ("fc2", model.fc2)]
    calls = []
    real = tp.DependencyGraph.get_pruning_group

    def slow_after_fc1(self, module, fn, idxs):  # Torch-Pruning walking a graph for minutes
        calls.append(module)
        if module is model.fc2:
            time.sleep(5)
        return real(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", slow_after_fc1)
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()
    removed = remove_dead_units(model, CompressionContext(data=digits, info=_info()), layers,
                                model.head, 1, True, skipped=skipped, seconds=1.5)
    assert time.perf_counter() - t0 < 4.5
    assert removed == {"fc1": 10, "fc2": 0} and model.fc1.out_features == 38
    assert list(skipped) == ["fc2"] and skipped["fc2"].startswith(
        "the time limit of 1.5 s ran out while Torch-Pruning grouped the channels of fc2")
    assert model.fc2.out_features == 32 and bool((model.fc2.weight[:10] == 0).all())


def test_deadline_holds_its_alarm_while_paused():
    finished = False
    with (pytest.raises(TimeoutError, match="ran out while changing the model"),
          ns.deadline(0.2, "changing the model") as limit, limit.paused()):
        time.sleep(0.5)
        finished = True
    assert finished


# -- end to end -------------------------------------------------------------------------------


def test_mlp_neurons_removed_physically_and_folded(mlp, digits):
    model = copy.deepcopy(mlp)
    acc_before = ns.pipeline.accuracy(model, digits, "val")
    out, _ctx = _compress_direct(model, digits, {"types": ["Linear"]}, **FAST)
    m = out.model
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
    assert not any("parametrizations" in k for k in m.state_dict())
    assert m.fc1.out_features < 48 and m.fc2.in_features == m.fc1.out_features
    assert m.fc2.out_features < 32 and m.head.in_features == m.fc2.out_features
    assert m.head.out_features == 10
    recs = {r.name: r.details for r in out.records}
    assert recs["fc1"]["neurons_left"] == m.fc1.out_features
    assert recs["fc1"]["units_removed"] == 48 - m.fc1.out_features
    assert out.summary["params_after"] < out.summary["params_before"]
    # The pruned model is close to the dense one before any fine-tuning.
    assert ns.pipeline.accuracy(m, digits, "val") > acc_before - 0.15


def test_cnn_slices_sparse_filters_removed_and_artifact_round_trip(cnn, digits, tmp_path):
    result = ns.compress(
        cnn,
        [ns.step("normsparse", select={"types": ["Conv2d"]}, **FAST)],
        data=digits,
        seed=0,
        latency=False,
    )
    m = result.model
    enc = result.encodings.get("conv2.weight")
    assert isinstance(enc, Sparse)
    mask = enc.mask()
    per_slice = mask.reshape(*mask.shape[:2], -1)
    # Kernel granularity: every slice is stored whole or not at all.
    assert bool((per_slice.all(-1) | ~per_slice.any(-1)).all())
    assert 0 < int(per_slice.all(-1).sum()) < per_slice.shape[0] * per_slice.shape[1]
    assert m.conv2.out_channels < 12 or m.conv1.out_channels < 8  # some filter went entirely
    assert m.head.out_features == 10
    path = result.save(tmp_path / "cnn.nsk", report=False)
    assert abs(path.stat().st_size - result.report.storage_bytes) <= 64
    loaded = ns.load(path)
    x = digits.test.tensors[0][:16]
    torch.testing.assert_close(loaded.eval()(x), m.eval()(x), atol=1e-5, rtol=1e-5)
    assert result.report.storage_bytes < result.report.dense_bytes


def test_head_outputs_kept_when_selected(mlp, digits):
    out, _ = _compress_direct(
        copy.deepcopy(mlp), digits, {"types": ["Linear"], "protect_head": False}, **FAST
    )
    assert out.model.head.out_features == 10
    assert next(r.details for r in out.records if r.name == "head") == {"protected_head": True}


def test_keeps_zeros_of_an_earlier_pruning_step(mlp, digits):
    result = ns.compress(
        mlp,
        [
            ns.step("magnitude", select={"types": ["Linear"]}, sparsity=0.6),
            ns.step("normsparse", select={"types": ["Linear"]}, **FAST),
        ],
        data=digits,
        seed=0,
        latency=False,
    )
    enc = result.encodings.get("fc2.weight")
    assert isinstance(enc, Sparse)
    weight = result.model.fc2.weight.detach()
    assert 1 - enc.nonzeros / weight.numel() > 0.5  # the magnitude zeros survived L1 training
    assert int((weight != 0).sum()) == enc.nonzeros


def test_early_stopping_keeps_admissible_checkpoint(mlp, digits, caplog):
    # A huge penalty kills the network in the first epoch: no admissible checkpoint after the
    # start, so training stops after `patience` epochs, nothing is removed, and a warning says
    # so (the model comes back unpruned after the training).
    caplog.set_level("WARNING")
    out, _ = _compress_direct(
        copy.deepcopy(mlp),
        digits,
        {"types": ["Linear"]},
        epochs=10,
        l1=5.0,
        lr_magnitude=1.0,
        schedule="constant",
        patience=2,
        val_tolerance=0.0,
    )
    assert out.summary["epochs_run"] == 2 and out.summary["best_epoch"] == 0
    assert out.model.fc1.out_features == 48
    unpruned = [r.getMessage() for r in caplog.records if "returned unpruned" in r.getMessage()]
    assert len(unpruned) == 1 and "val_tolerance 0.000" in unpruned[0]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("l1", -0.1, "l1 (the L1 weight on the magnitudes) must be >= 0, got -0.1"),
        ("threshold", 1.0, "threshold must be in [0, 1)"),
        ("threshold", -0.2, "got -0.2"),
        ("epochs", 0, "greater than or equal to 1"),
        ("schedule", "exp", "'constant', 'linear' or 'cosine'"),
    ],
)
def test_bad_config_values(field, value, needle):
    with pytest.raises(ValidationError) as err:
        NormSparseConfig.model_validate({field: value})
    assert field in str(err.value) and needle in str(err.value)


def test_bad_config_through_pipeline_names_step_and_field(mlp, digits):
    with pytest.raises(RecipeError, match=r"step 0 \(normsparse\).*config\.l1.*-1"):
        ns.compress(mlp, [ns.Step(compressor="normsparse", config={"l1": -1})], data=digits)
    with pytest.raises(RecipeError, match=r"config\.threshold.*\[0, 1\)"):
        ns.compress(mlp, [ns.Step(compressor="normsparse", config={"threshold": 1.5})],
                    data=digits)


def test_nothing_linear_or_conv_selected(mlp, digits):
    only_norm = nn.Sequential(  # ten outputs, like the data's classes, and no Linear or conv
        nn.Flatten(), nn.LayerNorm(64), nn.Unflatten(1, (1, 64)), nn.AdaptiveAvgPool1d(10),
        nn.Flatten())
    with pytest.raises(SelectionError, match="selected no layers"):
        ns.compress(only_norm, [ns.step("normsparse")], data=digits)
    with pytest.raises(SelectionError, match="handles \\['Linear', 'Conv2d'\\]"):
        ns.compress(
            cnn_bn(), [ns.step("normsparse", select={"types": ["BatchNorm2d"]})], data=digits
        )
    # Only the head selected: its outputs are the classes, so there is nothing to remove.
    with pytest.raises(SelectionError, match="never removes the outputs of the classifier head"):
        _compress_direct(copy.deepcopy(mlp), digits, {"names": ["head"], "protect_head": False})


def cnn_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))


def test_needs_data(mlp):
    with pytest.raises(RecipeError, match="needs data"):
        ns.compress(mlp, [ns.step("normsparse")])


# -- a real network ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timm
def test_timm_resnet18_kernel_sparsity_and_artifact(tmp_path):
    pytest.importorskip("timm")
    data = ns.datasets.load("digits32")
    model = ns.load_model("timm:resnet18", **data.model_options())
    result = ns.compress(
        model,
        [
            ns.step(
                "normsparse",
                select={"types": ["Conv2d"]},
                epochs=1,
                l1=0.02,
                lr_magnitude=0.05,
                schedule="constant",
            )
        ],
        data=data,
        seed=0,
        latency=False,
    )
    sparse = [n for n, e in result.encodings.items() if isinstance(e, Sparse)]
    assert sparse, "no conv weight stored sparse"
    assert result.report.storage_bytes < result.report.dense_bytes
    path = result.save(tmp_path / "r18.nsk", report=False)
    loaded = ns.load(path)
    x = data.test.tensors[0][:4]
    torch.testing.assert_close(loaded.eval()(x), result.model.eval()(x), atol=1e-4, rtol=1e-4)


def test_dead_units_whose_removal_breaks_the_model_are_put_back(split_net):
    """Removing conv1's dead filters goes through a split whose sizes Torch-Pruning cannot
    update: that group is put back (the model runs, the units stay as zeros, the record says
    why) and conv2's dead filters are still removed."""
    model = split_net()
    with torch.no_grad():
        model.conv1.weight[[1, 5]] = 0
        model.conv2.weight[[2, 7, 11]] = 0
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1", "mix"))}
    info = ns.ModelInfo("split", input_shape=(1, 16, 16), num_classes=10, head="fc")
    layers = [("conv1", model.conv1), ("conv2", model.conv2)]
    skipped: dict[str, str] = {}
    removed = remove_dead_units(model, CompressionContext(info=info), layers, model.fc, 1, True,
                                skipped)
    assert removed == {"conv1": 0, "conv2": 3}
    assert "broke module mix" in skipped["conv1"] and "put back" in skipped["conv1"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
