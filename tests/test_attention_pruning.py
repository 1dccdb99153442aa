"""Structured pruning through multi-head attention (timm ViT/DeiT): statprune, rlprune's channel
mode and normsparse's removal of dead units keep heads and head dims consistent, the
attention's num_heads/head_dim follow, and the artifact reloads with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import netshrink as ns

timm = pytest.importorskip("timm")

pytestmark = [pytest.mark.timm, pytest.mark.usefixtures("single_thread")]

SIDE = 32


def _data() -> ns.DataSplits:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ns.ArrayDataset:
        images = torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
        return ns.ArrayDataset(images, torch.arange(n) % 10, mean=0.5, std=0.25)

    return ns.DataSplits(name="random32", train=split(16), val=split(8), test=split(8),
                         num_classes=10, extra={"input_shape": (3, SIDE, SIDE)})


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Attention"]


def _consistent(model: nn.Module) -> None:
    for attn in _attentions(model):
        width = attn.num_heads * attn.head_dim
        assert attn.qkv.out_features == 3 * width
        assert attn.proj.in_features == width == attn.attn_dim
        assert attn.scale == pytest.approx(attn.head_dim ** -0.5)


def _compress(spec: str, tmp_path, **config):
    data = _data()
    model = ns.load_model(spec, **data.model_options())
    before = [(a.num_heads, a.head_dim) for a in _attentions(model)]
    result = ns.compress(model, [ns.step("statprune", **config)], data=data, seed=0,
                         latency=False)
    pruned = result.model.eval()
    x, _ = data.batch("test", 4)
    with torch.no_grad():
        expected = pruned(x)
    loaded = ns.load(result.save(tmp_path / "vit.nsa", report=False)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert [(a.num_heads, a.head_dim) for a in _attentions(loaded)] == \
        [(a.num_heads, a.head_dim) for a in _attentions(pruned)]
    return result, before, x, expected


@pytest.mark.parametrize("spec", [f"timm:deit_tiny_patch16_224?input_size={SIDE}",
                                  f"timm:vit_tiny_patch16_224?input_size={SIDE}"])
def test_head_dims_pruned_alike_in_every_head(spec, tmp_path):
    result, before, x, expected = _compress(spec, tmp_path)
    model = result.model
    assert result.report.params_after < result.report.params_before
    _consistent(model)
    after = [(a.num_heads, a.head_dim) for a in _attentions(model)]
    assert [h for h, _ in after] == [h for h, _ in before]  # heads kept
    assert any(d < d0 for (_, d), (_, d0) in zip(after, before))
    details = {r.name: r.details for r in result.records}
    qkv = details["blocks.0.attn.qkv"]
    assert qkv["channels_before"] == 192 and qkv["heads_before"] == 3
    assert qkv["head_dim_after"] == model.blocks[0].attn.head_dim
    # the manual (unfused) attention path agrees with the fused one: scale followed head_dim
    unfused = copy.deepcopy(model)
    for attn in _attentions(unfused):
        attn.fused_attn = False
    with torch.no_grad():
        assert torch.allclose(unfused(x), expected, atol=1e-5)


def test_whole_heads(tmp_path):
    result, before, _, _ = _compress(f"timm:deit_tiny_patch16_224?input_size={SIDE}", tmp_path,
                                     attention="heads")
    _consistent(result.model)
    after = [(a.num_heads, a.head_dim) for a in _attentions(result.model)]
    assert all(d == 64 and 1 <= h <= 3 for h, d in after)
    assert sum(h for h, _ in after) < sum(h for h, _ in before)


def test_skip_leaves_attention_widths(tmp_path):
    result, before, _, _ = _compress(f"timm:deit_tiny_patch16_224?input_size={SIDE}", tmp_path,
                                     attention="skip")
    assert [(a.num_heads, a.head_dim) for a in _attentions(result.model)] == before
    details = {r.name: r.details for r in result.records}
    assert "attention='skip'" in details["blocks.0.attn.qkv"]["skipped"]
    assert result.model.blocks[0].mlp.fc1.out_features < 768  # the rest is still pruned


# -- attention netshrink cannot prune is refused per layer ---------------------------------------


class Tokens(nn.Module):
    """Patchify, one attention block, mean-pool, classify (``attn`` is built by the caller)."""

    def __init__(self, attn: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = attn
        self.fc1 = nn.Linear(dim, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        return self.head(torch.relu(self.fc1(x.mean(1))))


class Unrecognised(nn.Module):
    """Fused q/k/v under another name and without ``num_heads``: netshrink cannot tell heads."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.h = heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4) \
            .unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def _statprune_toy(attn: nn.Module) -> dict[str, dict]:
    from netshrink import CompressionContext, LayerSelector, ModelInfo
    from netshrink.plugins.statprune import StatPrune

    torch.manual_seed(0)
    model = Tokens(attn)
    info = ModelInfo("toy", input_shape=(3, 16, 16), num_classes=10, head="head")
    ctx = CompressionContext(info=info, seed=0, step_name="statprune")
    layers = LayerSelector(types=["Linear"]).resolve(model, head="head")
    out = StatPrune({"coupled": "skip"}).compress(model, layers, ctx)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # still runs
    return {r.name: r.details for r in out.records}


@pytest.mark.parametrize("attn, layer, reason", [
    (Unrecognised(), "attn.to_qkv", "torch.unbind"),
    (timm.layers.Attention(32, num_heads=4, qk_norm=True, norm_layer=nn.LayerNorm), "attn.qkv",
     "q_norm"),
])
def test_attention_that_cannot_be_pruned_is_refused_per_layer(attn, layer, reason):
    details = _statprune_toy(attn)
    assert reason in details[layer]["skipped"]
    assert details["fc1"].get("removed", 0) > 0  # other layers are still pruned


# -- rlprune channel mode -----------------------------------------------------------------------

SMALL_DEIT = f"timm:deit_tiny_patch16_224?input_size={SIDE}&depth=2"
RL_FAST = {"granularity": "channel", "target_sparsity": 0.5, "episodes": 2, "warmup": 2,
           "hidden": 8, "batch_size": 4}


def _roundtrip(result, tmp_path, x: torch.Tensor) -> None:
    """Saved and reloaded in this process: the same heads and the same outputs."""
    pruned = result.model.eval()
    with torch.no_grad():
        expected = pruned(x)
    loaded = ns.load(result.save(tmp_path / "vit.nsa", report=False)).eval()
    assert [(a.num_heads, a.head_dim) for a in _attentions(loaded)] == \
        [(a.num_heads, a.head_dim) for a in _attentions(pruned)]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_rlprune_channel_mode_prunes_head_dims_alike(tmp_path):
    data = _data()
    model = ns.load_model(SMALL_DEIT, **data.model_options())
    before = [(a.num_heads, a.head_dim) for a in _attentions(model)]
    result = ns.compress(model, [ns.step("rlprune", checkpoint=str(tmp_path / "rl.safetensors"),
                                         **RL_FAST)], data=data, seed=0, latency=False)
    assert result.report.params_after < result.report.params_before
    _consistent(result.model)
    after = [(a.num_heads, a.head_dim) for a in _attentions(result.model)]
    assert [h for h, _ in after] == [h for h, _ in before]  # heads kept, dims cut in each
    assert all(d < d0 for (_, d), (_, d0) in zip(after, before))
    details = {r.name: r.details for r in result.records}
    assert details["blocks.0.attn.qkv"]["channels_after"] == 3 * 3 * after[0][1]
    x, _ = data.batch("test", 4)
    _roundtrip(result, tmp_path, x)
    unfused = copy.deepcopy(result.model)  # the manual path agrees: scale followed head_dim
    for attn in _attentions(unfused):
        attn.fused_attn = False
    with torch.no_grad():
        assert torch.allclose(unfused(x), result.model(x), atol=1e-5)


def _toy_data(side: int = 16) -> ns.DataSplits:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, side, side, generator=gen)
    split = torch.utils.data.TensorDataset(x, torch.arange(8) % 10)
    return ns.DataSplits(name="toy", train=split, val=split, test=split, num_classes=10,
                         extra={"input_shape": (3, side, side)})


def test_rlprune_refuses_attention_it_cannot_cut_before_any_episode(tmp_path):
    from netshrink import CompressionContext, LayerSelector, ModelInfo, SelectionError
    from netshrink.plugins.rlprune import RLPrune

    torch.manual_seed(0)
    model = Tokens(timm.layers.Attention(32, num_heads=4, qk_norm=True,
                                         norm_layer=nn.LayerNorm))
    info = ModelInfo("toy", input_shape=(3, 16, 16), num_classes=10, head="head")
    ctx = CompressionContext(data=_toy_data(), info=info, seed=0, step_name="rlprune")
    layers = LayerSelector(types=["Linear"]).resolve(model, head="head")
    episodes = []
    rl = RLPrune({**RL_FAST, "checkpoint": str(tmp_path / "rl.safetensors")},
                 on_episode=lambda *args: episodes.append(args))
    with pytest.raises(SelectionError,
                       match=r"^rlprune channel mode refused \(nothing changed\): layer "
                             r"'attn\.qkv' .*q_norm"):
        rl.compress(model, layers, ctx)
    assert episodes == []
    assert model.attn.qkv.out_features == 96  # nothing changed


# -- normsparse: removal of dead units ----------------------------------------------------------


def _dead_rows(attn: nn.Module, positions: list[int], heads: list[int]) -> None:
    """Zero the q, k and v rows of ``positions`` in every head and of all of ``heads``."""
    width, dim = attn.head_dim, attn.num_heads * attn.head_dim
    with torch.no_grad():
        for k in range(3):
            for h in range(attn.num_heads):
                for p in range(width) if h in heads else positions:
                    attn.qkv.weight[k * dim + h * width + p] = 0


def test_normsparse_removes_dead_head_dims_and_heads_exactly():
    from netshrink import CompressionContext
    from netshrink.plugins.normsparse.removal import remove_dead_units

    torch.manual_seed(0)
    model = ns.load_model(SMALL_DEIT, num_classes=10).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    first, second = (block.attn for block in model.blocks)
    with torch.no_grad():
        for m in model.modules():  # dead rows still output their bias: it must be folded
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-0.5, 0.5)
        first.qkv.weight[3] = 0  # q row 3 of head 0 only: kept (k and v still read it)
        first.qkv.weight[[9, 192 + 9, 384 + 9]] = 0  # dim 9 of head 0 only: kept (equal heads)
        model.blocks[0].mlp.fc1.weight[:10] = 0
    _dead_rows(first, [5, 17], [])
    _dead_rows(second, [], [1])
    x = torch.randn(4, 3, SIDE, SIDE)
    with torch.no_grad():
        expected = model(x)
    skipped: dict[str, str] = {}
    removed = remove_dead_units(model, CompressionContext(info=ns.model_info(model)), layers,
                                model.head, 1, True, skipped=skipped)
    assert removed["blocks.0.attn.qkv"] == 3 * 3 * 2 and removed["blocks.1.attn.qkv"] == 3 * 64
    assert removed["blocks.0.mlp.fc1"] == 10 and skipped == {}
    assert (first.num_heads, first.head_dim, second.num_heads, second.head_dim) == (3, 62, 2, 64)
    _consistent(model)
    for fused in (True, False):
        for attn in (first, second):
            attn.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_normsparse_end_to_end_through_attention(tmp_path):
    data = _data()
    model = ns.load_model(SMALL_DEIT, **data.model_options())
    config = {"epochs": 4, "l1": 0.2, "lr_magnitude": 0.015, "threshold": 0.6, "batch_size": 4,
              "schedule": "constant", "patience": None, "val_tolerance": 1.0}
    result = ns.compress(model, [ns.step("normsparse", select={"types": ["Linear"]}, **config)],
                         data=data, seed=0, latency=False)
    details = {r.name: r.details for r in result.records}
    assert details["blocks.0.mlp.fc1"]["neurons_removed"] > 0
    assert any(details[f"blocks.{i}.attn.qkv"]["neurons_removed"] > 0 for i in range(2))
    assert result.report.params_after < result.report.params_before
    _consistent(result.model)
    x, _ = data.batch("test", 4)
    _roundtrip(result, tmp_path, x)


@pytest.mark.parametrize("attn, layer, reason", [
    (Unrecognised(), "attn.to_qkv", "torch.unbind"),
    (timm.layers.Attention(32, num_heads=4, qk_norm=True, norm_layer=nn.LayerNorm), "attn.qkv",
     "q_norm"),
])
def test_normsparse_keeps_dead_units_of_attention_it_cannot_cut(attn, layer, reason):
    from netshrink import CompressionContext, ModelInfo
    from netshrink.plugins.normsparse.removal import remove_dead_units

    torch.manual_seed(0)
    model = Tokens(attn).eval()
    qkv = model.get_submodule(layer)
    with torch.no_grad():
        qkv.weight[::4] = 0
        model.fc1.weight[:5] = 0
    info = ModelInfo("toy", input_shape=(3, 16, 16), num_classes=10, head="head")
    layers = [(layer, qkv), ("fc1", model.fc1)]
    skipped: dict[str, str] = {}
    removed = remove_dead_units(model, CompressionContext(info=info), layers, model.head, 1, True,
                                skipped=skipped)
    assert removed == {layer: 0, "fc1": 5}
    assert reason in skipped[layer] and qkv.out_features == 96
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # still runs


@pytest.mark.slow
@pytest.mark.parametrize("step", [
    ns.step("magnitude"), ns.step("quantize"), ns.step("svd"),
    ns.step("joint", epochs=0, target_ratio=2.0, calib_batches=1),
    ns.step("bioclust", population=2), ns.step("statprune"),
], ids=lambda s: s.compressor)
def test_deit_tiny_compresses_and_reloads_in_a_fresh_process_bit_exact(step, tmp_path):
    """The whole DeiT-tiny (12 blocks) at 32x32 with each unstructured/quantizing method and a
    structural one: saved, loaded in a fresh interpreter, the same outputs bit for bit."""
    import subprocess
    import sys

    data = _data()
    torch.manual_seed(0)
    model = ns.load_model(f"timm:deit_tiny_patch16_224?input_size={SIDE}",
                          **data.model_options())
    result = ns.compress(model, [step], data=data, seed=0, latency=False)
    assert result.report.storage_bytes < result.report.dense_bytes
    path = result.save(tmp_path / "deit.nsa", report=False)
    x, _ = data.batch("test", 4)
    with torch.no_grad():
        expected = result.model.eval()(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, netshrink as ns; torch.set_num_threads(1); "
            "x = torch.load(sys.argv[2]); m = ns.load(sys.argv[1]).eval(); "
            "torch.save(m(x).detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("step", [
    ns.step("joint", epochs=0, target_ratio=1.05, calib_batches=2),
    ns.step("statprune"),
    ns.step("rlprune", checkpoint=None, **RL_FAST),
], ids=lambda s: s.compressor)
def test_levit_caches_do_not_break_calibration_copies_or_put_back(step, tmp_path):
    """timm's LeViT caches attention biases built from its parameters in eval mode; after a
    forward with gradients (a calibration batch, Torch-Pruning's trace) they hold autograd
    graphs, which a second backward, a deepcopy or a snapshot cannot go through."""
    side = 64
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ns.ArrayDataset:
        images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
        return ns.ArrayDataset(images, torch.arange(n) % 10, mean=0.5, std=0.25)

    data = ns.DataSplits(name="random64", train=split(64), val=split(16), test=split(8),
                         num_classes=10, extra={"input_shape": (3, side, side)})
    torch.manual_seed(0)
    model = ns.load_model(f"timm:levit_128s?input_size={side}", **data.model_options())
    if step.compressor == "rlprune":
        step = ns.step("rlprune", checkpoint=str(tmp_path / "rl.st"), **RL_FAST)
    result = ns.compress(model, [step], data=data, seed=0, latency=False)
    assert result.report.storage_bytes < result.report.dense_bytes
    x, _ = data.batch("test", 4)
    with torch.no_grad():
        assert torch.equal(ns.load(result.save(tmp_path / "levit.nsa", report=False)).eval()(x),
                           result.model.eval()(x))
